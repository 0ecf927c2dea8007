"""How the time-series use cases hand their SQL to the query core (no database needed)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from database_service.application.timeseries import (
    CANDLE_BATCH_ROWS,
    PACKED_CANDLES_MAX,
    TimeSeries,
)
from database_service.auth import Principal
from database_service.query import QueryExecutor, TenantContext
from database_service.results import Column, Header, PackedRows, StatementKind, Summary
from database_service.timeseries.candles import (
    CANDLE_COLUMNS,
    PART_MINUTES,
    CandleQuery,
    packed_parts_sql,
)

DAY = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


class RecordingExecutor:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.answer: list[Any] = []

    def stream(self, principal: Any, ctx: Any, sql: str, params: Any, **options: Any) -> Any:
        self.calls.append({"sql": sql, "params": params, **options})

        async def events() -> AsyncGenerator[Any, None]:
            for event in self.answer:
                yield event

        return events()


def series() -> tuple[TimeSeries, RecordingExecutor]:
    executor = RecordingExecutor()
    return TimeSeries(cast(QueryExecutor, executor), shared_schema="shared"), executor


def test_a_long_range_of_minute_candles_is_read_in_large_cursor_fetches() -> None:
    ts, executor = series()
    end = DAY + dt.timedelta(days=10)  # 14,400 buckets: past what comes packed
    query = CandleQuery("EURUSD", DAY, end, dt.timedelta(minutes=1))
    assert query.buckets() > PACKED_CANDLES_MAX
    ts.candles(cast(Principal, None), cast(TenantContext, None), query)
    (call,) = executor.calls
    assert call["batch_rows"] == CANDLE_BATCH_ROWS >= 24 * 60
    assert call["read_only"] is True and call["own_sql"] is True
    assert "candles_1m" in call["sql"]


async def test_a_few_hours_of_minute_candles_are_one_row_packed_by_postgres() -> None:
    ts, executor = series()
    query = CandleQuery("EURUSD", DAY, DAY + dt.timedelta(hours=6), dt.timedelta(minutes=1))
    events = ts.candles(cast(Principal, None), cast(TenantContext, None), query)
    executor.answer = [
        Header([Column("count", "int8"), Column("coalesce", "text")], StatementKind.READ),
        [(2, '[["2024-05-01T00:00:00+00:00", "1.1"], ["2024-05-01T00:01:00+00:00", "1.2"]]')],
        Summary(1, "SELECT 1", 0.5, StatementKind.READ),
    ]
    out = [event async for event in events]
    (call,) = executor.calls
    assert "string_agg" in call["sql"] and "candles_1m" in call["sql"]
    assert "unnest" not in call["sql"]
    assert call["read_only"] is True and call["own_sql"] is True
    header, packed, summary = out
    assert isinstance(header, Header) and header.columns == CANDLE_COLUMNS
    assert packed == PackedRows(executor.answer[1][0][1].encode(), 2)
    assert isinstance(summary, Summary) and (summary.row_count, summary.command) == (2, "SELECT 2")


async def test_a_day_of_minute_candles_comes_in_parts_fetched_one_at_a_time() -> None:
    ts, executor = series()
    query = CandleQuery("EURUSD", DAY, DAY + dt.timedelta(days=1), dt.timedelta(minutes=1))
    events = ts.candles(cast(Principal, None), cast(TenantContext, None), query)
    first = '[["2024-05-01T00:00:00+00:00", "1.1"], ["2024-05-01T00:01:00+00:00", "1.2"]]'
    last = '[["2024-05-01T23:59:00+00:00", "1.3"]]'
    executor.answer = [
        Header([Column("n", "int8"), Column("packed", "text")], StatementKind.READ),
        [(2, first)],
        [(0, "[]")],  # a part without ticks sends nothing
        [(1, last)],
        Summary(3, "SELECT 3", 0.5, StatementKind.READ),
    ]
    out = [event async for event in events]
    (call,) = executor.calls
    assert "unnest" in call["sql"] and "candles_1m" in call["sql"]
    assert call["batch_rows"] == 1 and call["first_rows"] is False
    assert call["read_only"] is True and call["own_sql"] is True
    header, one, two, summary = out
    assert isinstance(header, Header) and header.columns == CANDLE_COLUMNS
    assert (one, two) == (PackedRows(first.encode(), 2), PackedRows(last.encode(), 1))
    assert isinstance(summary, Summary) and (summary.row_count, summary.command) == (3, "SELECT 3")


def test_raw_reads_keep_the_default_batch() -> None:
    ts, executor = series()
    ts.raw(cast(Principal, None), cast(TenantContext, None), "EURUSD", DAY, DAY)
    (call,) = executor.calls
    assert call["batch_rows"] == 500
    assert call["read_only"] is True


MINUTE = dt.timedelta(minutes=1)


def test_parts_cover_the_range_without_gaps_or_overlaps() -> None:
    start = DAY + dt.timedelta(minutes=7)
    end = start + dt.timedelta(hours=20, minutes=3)
    parted = packed_parts_sql("shared", CandleQuery("EURUSD", start, end, MINUTE))
    assert parted is not None
    _, params = parted
    lows, highs = params[6], params[7]
    assert lows[0] == start and highs[-1] == end
    assert all(high == low for high, low in zip(highs, lows[1:], strict=False))
    assert all(
        dt.timedelta(0) < h - lo <= dt.timedelta(minutes=PART_MINUTES)
        for lo, h in zip(lows, highs, strict=True)
    )
    assert len(lows) == 4


@pytest.mark.parametrize(
    "query",
    [
        CandleQuery("EURUSD", DAY, DAY + dt.timedelta(minutes=PART_MINUTES), MINUTE),
        CandleQuery("EURUSD", DAY, DAY + dt.timedelta(days=1), 5 * MINUTE),
        CandleQuery("EURUSD", DAY, DAY + dt.timedelta(days=1), MINUTE, gap_fill=True),
        CandleQuery("EURUSD", DAY, DAY + dt.timedelta(days=1), MINUTE, source="raw"),
        CandleQuery("EURUSD", DAY, DAY + dt.timedelta(days=1, seconds=1), MINUTE),
    ],
    ids=["one part", "5-minute", "gap-filled", "raw", "off the minute"],
)
def test_only_long_ungapped_ranges_of_the_minute_rollup_come_in_parts(query: CandleQuery) -> None:
    assert packed_parts_sql("shared", query) is None
