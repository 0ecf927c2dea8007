"""Time-series reads: raw ticks and predictions, candles, the last tick of every symbol.

The SQL is built here once, for every front end, and runs read-only as the tenant through the
query core (which authorizes, audits and streams it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, Sequence
from typing import Any, cast

from database_service.auth import Principal
from database_service.errors import InvalidParameters
from database_service.moments import utc_moment
from database_service.query import QueryExecutor, TenantContext
from database_service.results import (
    Column,
    Event,
    Header,
    PackedRows,
    StatementKind,
    Summary,
    ValueKind,
)
from database_service.tenancy import quote_ident
from database_service.timeseries.candles import (
    CANDLE_COLUMNS,
    NUMERIC_COLUMNS,
    CandleQuery,
    candle_sql,
    last_tick_sql,
    packed_parts_sql,
    packed_sql,
)

__all__ = ["SERIES_COLUMNS", "TimeSeries"]

# What a raw read returns, per table.
SERIES_COLUMNS = {
    "trading_ticks": "time, user_id, symbol, bid, ask, volume, spread",
    "ai_predictions": "time, user_id, symbol, prediction_type, confidence, model_version,"
    " features, result",
}

Events = AsyncGenerator[Event, None]

# Up to this many buckets, candles come as PackedRows made by PostgreSQL (about 150 bytes a
# candle in JSON); a longer range is streamed by cursor in batches.
PACKED_CANDLES_MAX = 10_000

# Rows per cursor fetch for candles beyond the first rows (which come in one round trip): a
# candle is about 200 bytes, so at most ~1 MB is held per fetch.
CANDLE_BATCH_ROWS = 5_000


async def numeric_as_text(events: Events, names: Sequence[str]) -> Events:
    """A result whose numeric columns the SQL read as text, with those columns typed ``numeric``
    again: the values stay exact text on their way to the caller, who gets decimals."""
    async with contextlib.aclosing(events):
        async for event in events:
            if not isinstance(event, Header):
                yield event
                continue
            columns = [
                Column(c.name, "numeric", ValueKind.DECIMAL) if c.name in names else c
                for c in event.columns
            ]
            yield Header(columns, event.kind)


class TimeSeries:
    def __init__(self, executor: QueryExecutor, *, shared_schema: str) -> None:
        self._executor = executor
        self._shared = shared_schema

    def _stream(
        self,
        principal: Principal,
        ctx: TenantContext,
        sql: str,
        params: list[Any],
        *,
        batch_rows: int = 500,
        first_rows: bool = True,
    ) -> Events:
        return self._executor.stream(
            principal,
            ctx,
            sql,
            params,
            batch_rows=batch_rows,
            read_only=True,
            own_sql=True,
            first_rows=first_rows,
            action="timeseries",
        )

    def raw(
        self,
        principal: Principal,
        ctx: TenantContext,
        symbol: str,
        start: dt.datetime | None,
        end: dt.datetime | None,
        *,
        table: str = "trading_ticks",
        limit: int = 0,
    ) -> Events:
        """Rows of a symbol in [start, end), oldest first."""
        if not symbol or start is None or end is None:
            raise InvalidParameters("symbol, start and end are required")
        if table not in SERIES_COLUMNS:
            raise InvalidParameters(f"table must be one of {', '.join(SERIES_COLUMNS)}")
        if limit < 0:
            raise InvalidParameters("limit must be 0 (no limit) or more")
        start, end = utc_moment(start, "start"), utc_moment(end, "end")
        sql = (
            f"SELECT {SERIES_COLUMNS[table]} FROM {quote_ident(self._shared)}.{table}"
            " WHERE symbol = $1 AND time >= $2 AND time < $3 ORDER BY time"
        )
        params: list[Any] = [symbol, start, end]
        if limit:
            sql += " LIMIT $4"
            params.append(limit)
        return self._stream(principal, ctx, sql, params)

    def candles(self, principal: Principal, ctx: TenantContext, query: CandleQuery) -> Events:
        parts = packed_parts_sql(self._shared, query)
        if parts is not None and query.buckets() <= PACKED_CANDLES_MAX:
            return self._packed(principal, ctx, *parts, by_part=True)
        sql, params = candle_sql(self._shared, query)
        if query.buckets() <= PACKED_CANDLES_MAX:
            return self._packed(principal, ctx, packed_sql(sql), params)
        events = self._stream(principal, ctx, sql, params, batch_rows=CANDLE_BATCH_ROWS)
        return numeric_as_text(events, NUMERIC_COLUMNS)

    async def _packed(
        self,
        principal: Principal,
        ctx: TenantContext,
        sql: str,
        params: list[Any],
        *,
        by_part: bool = False,
    ) -> Events:
        """Candles as PostgreSQL writes them in JSON (``packed_sql``): rows of (count, JSON
        array), each sent on as ``PackedRows`` under the candles' own header. A day of 1-minute
        candles cost more in per-value Python (asyncpg's decoding here, the encoding for the
        wire) than PostgreSQL took to find them.

        ``by_part``: the rows are parts of the range (``packed_parts_sql``), fetched a row at a
        time so each goes on while PostgreSQL makes the next."""
        if by_part:
            events = self._stream(principal, ctx, sql, params, batch_rows=1, first_rows=False)
        else:
            events = self._stream(principal, ctx, sql, params)
        total = 0
        header = False
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, Header):
                    continue
                if isinstance(event, Summary):
                    yield Summary(total, f"SELECT {total}", event.duration_ms, event.kind)
                    continue
                for count, text in cast(Sequence[Sequence[Any]], event):
                    if not header:
                        header = True
                        yield Header(CANDLE_COLUMNS, StatementKind.READ)
                    if count:
                        total += count
                        yield PackedRows(text.encode(), count)

    def last(
        self, principal: Principal, ctx: TenantContext, since: dt.datetime | None = None
    ) -> Events:
        """The latest tick of every symbol since ``since`` (default: a day ago)."""
        since = since or dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        since = utc_moment(since, "since")
        sql, params = last_tick_sql(self._shared, since)
        return self._stream(principal, ctx, sql, params)
