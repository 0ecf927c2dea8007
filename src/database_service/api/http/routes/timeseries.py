"""``GET /api/v1/timeseries/{ticks,candles,last}``: rows as NDJSON, streamed from the cursor."""

import datetime as dt
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from database_service.api.http.deps import Authenticated, Core, TenantHeader, aware, tenant_context
from database_service.query import Header as ResultHeader
from database_service.query import Summary, encode_value
from database_service.results import PackedRows, unpacked
from database_service.timeseries.candles import DEFAULT_ORIGIN, CandleQuery, parse_interval

router = APIRouter(tags=["timeseries"])


async def ndjson(events: AsyncGenerator[Any, None]) -> StreamingResponse:
    """The first event is awaited before the response starts, so authorization and SQL errors
    still get their status codes; a client that goes away mid-stream releases the cursor."""
    header = await anext(events)
    assert isinstance(header, ResultHeader)
    names = [c.name for c in header.columns]

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                if isinstance(event, Summary | ResultHeader):
                    continue
                rows = unpacked(event, header.columns) if isinstance(event, PackedRows) else event
                for row in rows:
                    item = {n: encode_value(v) for n, v in zip(names, row, strict=True)}
                    yield json.dumps(item).encode() + b"\n"
        finally:
            await events.aclose()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/api/v1/timeseries/ticks")
async def ticks(
    request: Request,
    core: Core,
    principal: Authenticated,
    symbol: str,
    start: dt.datetime,
    end: dt.datetime,
    limit: int = Query(default=0, ge=0),
    x_tenant_id: TenantHeader = None,
) -> StreamingResponse:
    """Raw ticks of a symbol in [start, end), as NDJSON."""
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    return await ndjson(
        core.timeseries.raw(principal, ctx, symbol, aware(start), aware(end), limit=limit)
    )


@router.get("/api/v1/timeseries/candles")
async def candles(
    request: Request,
    core: Core,
    principal: Authenticated,
    symbol: str,
    start: dt.datetime,
    end: dt.datetime,
    interval: str = Query(
        default="60",
        description="1 s to 1 day: seconds (60), units (30s, 1m, 15m, 1h, 1d) or ISO 8601"
        " (PT1M, PT1H, P1D)",
    ),
    timezone: str = "UTC",
    origin: dt.datetime = DEFAULT_ORIGIN,
    gap_fill: bool = False,
    source: str = "auto",
    x_tenant_id: TenantHeader = None,
) -> StreamingResponse:
    """OHLCV candles with VWAP and spread statistics, as NDJSON (see timeseries/candles.py)."""
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    query = CandleQuery(
        symbol, aware(start), aware(end), parse_interval(interval), timezone,
        aware(origin), gap_fill, source,
    )  # fmt: skip
    return await ndjson(core.timeseries.candles(principal, ctx, query))


@router.get("/api/v1/timeseries/last")
async def last_tick(
    request: Request,
    core: Core,
    principal: Authenticated,
    since: dt.datetime,
    x_tenant_id: TenantHeader = None,
) -> StreamingResponse:
    """The latest tick of every symbol since ``since``, as NDJSON."""
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    return await ndjson(core.timeseries.last(principal, ctx, aware(since)))
