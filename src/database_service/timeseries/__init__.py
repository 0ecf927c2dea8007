"""Time series: partitioned tables, partition maintenance, candles and rollups."""

from database_service.timeseries.layout import SeriesSpec, partition_ddl, timescale_sql
from database_service.timeseries.partitions import (
    MaintenanceReport,
    PartitionInfo,
    PartitionManager,
)

__all__ = [
    "MaintenanceReport",
    "PartitionInfo",
    "PartitionManager",
    "SeriesSpec",
    "partition_ddl",
    "timescale_sql",
]
