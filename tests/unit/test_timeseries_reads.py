"""How the time-series use cases hand their SQL to the query core (no database needed)."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from database_service.application.timeseries import CANDLE_BATCH_ROWS, TimeSeries
from database_service.auth import Principal
from database_service.query import QueryExecutor, TenantContext
from database_service.timeseries.candles import CandleQuery

DAY = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


class RecordingExecutor:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def stream(self, principal: Any, ctx: Any, sql: str, params: Any, **options: Any) -> Any:
        self.calls.append({"sql": sql, "params": params, **options})
        return None


def series() -> tuple[TimeSeries, RecordingExecutor]:
    executor = RecordingExecutor()
    return TimeSeries(cast(QueryExecutor, executor), shared_schema="shared"), executor


def test_a_day_of_minute_candles_is_one_cursor_fetch() -> None:
    ts, executor = series()
    query = CandleQuery("EURUSD", DAY, DAY + dt.timedelta(days=1), dt.timedelta(minutes=1))
    ts.candles(cast(Principal, None), cast(TenantContext, None), query)
    (call,) = executor.calls
    assert call["batch_rows"] == CANDLE_BATCH_ROWS >= 24 * 60
    assert call["read_only"] is True
    assert "candles_1m" in call["sql"]


def test_raw_reads_keep_the_default_batch() -> None:
    ts, executor = series()
    ts.raw(cast(Principal, None), cast(TenantContext, None), "EURUSD", DAY, DAY)
    (call,) = executor.calls
    assert call["batch_rows"] == 500
    assert call["read_only"] is True
