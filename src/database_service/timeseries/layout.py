"""The partition layout of a time-series table, as pure functions (no database).

A table is range-partitioned by ``time`` at ``interval`` (the seed's chunk_time_interval: 1 hour
for ticks, 6 hours for predictions); each range partition may be hash sub-partitioned by
``company_id`` (the seed's ``add_dimension(..., number_partitions => 4)`` for ticks). Partition
bounds are aligned to the interval from the Unix epoch, so every instance computes the same names.

With TimescaleDB installed, the same spec becomes ``create_hypertable`` / ``add_dimension`` /
``add_retention_policy`` (``timescale_sql``); this machine has no TimescaleDB, so that SQL is
unit-tested but not run here.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from database_service.tenancy.ids import quote_ident

__all__ = ["SeriesSpec", "aligned_ranges", "partition_ddl", "partition_name", "timescale_sql"]

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    table: str
    interval: dt.timedelta
    hash_partitions: int = 0
    retention: dt.timedelta | None = None
    ahead: dt.timedelta = dt.timedelta(hours=24)
    behind: dt.timedelta = dt.timedelta(hours=2)


def floor_time(moment: dt.datetime, interval: dt.timedelta) -> dt.datetime:
    step = int(interval.total_seconds())
    seconds = int((moment - EPOCH).total_seconds())
    return EPOCH + dt.timedelta(seconds=seconds - seconds % step)


def aligned_ranges(
    spec: SeriesSpec, start: dt.datetime, end: dt.datetime
) -> list[tuple[dt.datetime, dt.datetime]]:
    """The interval-aligned ranges covering [start, end)."""
    ranges = []
    cursor = floor_time(start, spec.interval)
    while cursor < end:
        ranges.append((cursor, cursor + spec.interval))
        cursor += spec.interval
    return ranges


def partition_name(table: str, start: dt.datetime) -> str:
    return f"{table}_p{start.astimezone(dt.UTC):%Y%m%d_%H%M}"


def partition_ddl(schema: str, spec: SeriesSpec, start: dt.datetime, end: dt.datetime) -> list[str]:
    """CREATE statements for one range partition (and its hash sub-partitions)."""
    name = partition_name(spec.table, start)
    parent = f"{quote_ident(schema)}.{quote_ident(spec.table)}"
    qualified = f"{quote_ident(schema)}.{quote_ident(name)}"
    bounds = f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
    if not spec.hash_partitions:
        return [f"CREATE TABLE {qualified} PARTITION OF {parent} {bounds}"]
    statements = [
        f"CREATE TABLE {qualified} PARTITION OF {parent} {bounds} PARTITION BY HASH (company_id)"
    ]
    for remainder in range(spec.hash_partitions):
        sub = f"{quote_ident(schema)}.{quote_ident(f'{name}_h{remainder}')}"
        statements.append(
            f"CREATE TABLE {sub} PARTITION OF {qualified}"
            f" FOR VALUES WITH (MODULUS {spec.hash_partitions}, REMAINDER {remainder})"
        )
    return statements


def timescale_sql(schema: str, spec: SeriesSpec) -> list[str]:
    """What the TimescaleDB path runs instead of native partitioning, on a plain table."""
    table = f"{quote_ident(schema)}.{quote_ident(spec.table)}"
    seconds = int(spec.interval.total_seconds())
    statements = [
        f"SELECT create_hypertable('{table}', 'time',"
        f" chunk_time_interval => INTERVAL '{seconds} seconds', if_not_exists => true)"
    ]
    if spec.hash_partitions:
        statements.append(
            f"SELECT add_dimension('{table}', 'company_id',"
            f" number_partitions => {spec.hash_partitions}, if_not_exists => true)"
        )
    if spec.retention is not None:
        statements.append(
            f"SELECT add_retention_policy('{table}',"
            f" INTERVAL '{int(spec.retention.total_seconds())} seconds', if_not_exists => true)"
        )
    return statements
