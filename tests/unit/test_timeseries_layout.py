"""Partition layout as pure functions, and the SQL of the TimescaleDB path (not runnable here:
this machine has no TimescaleDB, so the statements are checked as text)."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from database_service.timeseries import SeriesSpec, partition_ddl, timescale_sql
from database_service.timeseries.layout import aligned_ranges, floor_time, partition_name

HOUR = dt.timedelta(hours=1)
TICKS = SeriesSpec("trading_ticks", HOUR, 4, dt.timedelta(days=30))


def test_bounds_are_aligned_from_the_epoch() -> None:
    moment = dt.datetime(2024, 3, 5, 10, 42, 7, tzinfo=dt.UTC)
    assert floor_time(moment, HOUR) == dt.datetime(2024, 3, 5, 10, tzinfo=dt.UTC)
    assert floor_time(moment, dt.timedelta(hours=6)) == dt.datetime(2024, 3, 5, 6, tzinfo=dt.UTC)


def test_ranges_cover_the_window_without_gaps() -> None:
    start = dt.datetime(2024, 1, 1, 0, 30, tzinfo=dt.UTC)
    ranges = aligned_ranges(TICKS, start, start + dt.timedelta(hours=3))
    assert ranges[0][0] == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len(ranges) == 4


def test_partition_names_are_stable_and_sortable() -> None:
    start = dt.datetime(2024, 1, 2, 3, tzinfo=dt.UTC)
    assert partition_name("trading_ticks", start) == "trading_ticks_p20240102_0300"


def test_tick_partitions_are_sub_partitioned_by_company() -> None:
    start = dt.datetime(2024, 1, 2, 3, tzinfo=dt.UTC)
    ddl = partition_ddl("shared", TICKS, start, start + HOUR)
    assert ddl[0] == (
        'CREATE TABLE "shared"."trading_ticks_p20240102_0300" PARTITION OF "shared"."trading_ticks"'
        " FOR VALUES FROM ('2024-01-02T03:00:00+00:00') TO ('2024-01-02T04:00:00+00:00')"
        " PARTITION BY HASH (company_id)"
    )
    assert ddl[1:] == [
        f'CREATE TABLE "shared"."trading_ticks_p20240102_0300_h{i}" PARTITION OF'
        f' "shared"."trading_ticks_p20240102_0300" FOR VALUES WITH (MODULUS 4, REMAINDER {i})'
        for i in range(4)
    ]


def test_prediction_partitions_are_plain_ranges() -> None:
    spec = SeriesSpec("ai_predictions", dt.timedelta(hours=6))
    start = dt.datetime(2024, 1, 2, 6, tzinfo=dt.UTC)
    assert len(partition_ddl("shared", spec, start, start + spec.interval)) == 1


def test_timescale_path_matches_the_seed() -> None:
    assert timescale_sql("shared", TICKS) == [
        "SELECT create_hypertable('\"shared\".\"trading_ticks\"', 'time',"
        " chunk_time_interval => INTERVAL '3600 seconds', if_not_exists => true)",
        "SELECT add_dimension('\"shared\".\"trading_ticks\"', 'company_id',"
        " number_partitions => 4, if_not_exists => true)",
        'SELECT add_retention_policy(\'"shared"."trading_ticks"\','
        " INTERVAL '2592000 seconds', if_not_exists => true)",
    ]
    predictions = SeriesSpec("ai_predictions", dt.timedelta(hours=6))
    assert timescale_sql("shared", predictions) == [
        "SELECT create_hypertable('\"shared\".\"ai_predictions\"', 'time',"
        " chunk_time_interval => INTERVAL '21600 seconds', if_not_exists => true)"
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("60", 60), ("1m", 60), ("PT1M", 60), ("1h", 3600), ("PT1H", 3600), ("1d", 86400),
        ("P1D", 86400), ("15m", 900), ("30s", 30), ("1h30m", 5400), ("PT1H30M", 5400),
        ("4H", 14400), (" 5m ", 300), ("1w", 604800),
    ],
)  # fmt: skip
def test_candle_intervals_are_read_as_people_write_them(text: str, seconds: int) -> None:
    from database_service.timeseries.candles import parse_interval

    assert parse_interval(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "P", "PT", "1x", "abc", "-5", "1.5m", "m"])
def test_an_interval_not_understood_is_a_clear_error(text: str) -> None:
    from database_service.errors import InvalidParameters
    from database_service.timeseries.candles import parse_interval

    with pytest.raises(InvalidParameters, match="not understood"):
        parse_interval(text)
