"""``POST /api/v1/analytics/query``: one read-only analytics query for the caller's tenant.

On ClickHouse when the service has it enabled (or ``engine`` is ``"clickhouse"``): ClickHouse
SQL over the tenant's replicated tables (``trading_ticks``, ``ai_predictions``, ``candles_1m``,
``trading_history``, ``trading_signals``), behind the analytics guard; else on PostgreSQL, as a
read-only statement with ``$1`` parameters. The answer has ``POST /api/v1/query``'s shape, with
``store`` naming who answered.
"""

import datetime as dt
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from database_service.analytics.reports import ReportParams
from database_service.analytics.service import choose_engine
from database_service.api.http.deps import tenant_context
from database_service.api.http.routes.queries import _HEADERS, _body, _JsonParts, caller
from database_service.app import Application
from database_service.auth import Principal
from database_service.errors import FailedPrecondition, ResultTooLarge
from database_service.results import (
    Column,
    Event,
    Header,
    PackedRows,
    QueryResult,
    StatementKind,
    Summary,
    unpacked,
)

router = APIRouter(tags=["analytics"])


class AnalyticsQueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sql: StrictStr = Field(description="One SELECT (ClickHouse SQL on ClickHouse)")
    params: list[Any] = Field(default_factory=list, description="PostgreSQL only: $1, $2, ...")
    engine: Literal["", "clickhouse", "postgresql"] = Field(
        default="", description="'' (ClickHouse where enabled), 'clickhouse' or 'postgresql'"
    )
    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")
    user_id: StrictStr | None = Field(default=None, description="Or the X-User-Id header")


@router.post("/api/v1/analytics/query", openapi_extra={"parameters": _HEADERS})
async def analytics_query(
    principal: Annotated[Principal, Depends(caller)],
    body: AnalyticsQueryRequest,
    request: Request,
) -> Response:
    """Run one read-only analytics query for a tenant."""
    core: Application = request.app.state.core
    ctx = tenant_context(
        request,
        principal,
        body.tenant_id,
        body.user_id or request.headers.get("x-user-id"),
        header=request.headers.get("x-tenant-id"),
    )
    analytics = core.analytics.analytics if core.analytics is not None else None
    if choose_engine(body.engine, analytics) == "clickhouse":
        assert analytics is not None
        result = await analytics.query(principal, ctx, body.sql, body.params)
    else:
        # Streamed read-only, as gRPC's: a write is refused before it runs.
        events = core.executor.stream(
            principal, ctx, body.sql, body.params, read_only=True, action="analytics"
        )
        result = await _collect(events, core.settings.max_result_rows)
    parts = _body(result, core.settings.max_result_bytes)
    parts[-1] = parts[-1][:-1] + b',"store":"' + result.store.encode() + b'"}'
    return _JsonParts(parts)


class ReportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbol: StrictStr | None = Field(default=None, description="market_trends, volume_profile")
    start: dt.datetime | None = Field(default=None, description="With a time zone")
    end: dt.datetime | None = Field(default=None, description="With a time zone; exclusive")
    interval_minutes: int = Field(default=60, description="market_trends: 1 to 10080")
    price_decimals: int = Field(default=3, description="volume_profile: 0 to 6")
    horizon_minutes: int = Field(
        default=60, description="signal_performance, prediction_accuracy: 1 to 10080"
    )
    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")


@router.post("/api/v1/analytics/reports/{name}", openapi_extra={"parameters": _HEADERS[:2]})
async def analytics_report(
    name: str,
    principal: Annotated[Principal, Depends(caller)],
    body: ReportRequest,
    request: Request,
) -> Response:
    """A ready-made report on ClickHouse: trading_performance, market_trends, volume_profile,
    signal_performance or prediction_accuracy (``analytics/reports.py`` says what each
    computes)."""
    core: Application = request.app.state.core
    ctx = tenant_context(
        request, principal, body.tenant_id, None, header=request.headers.get("x-tenant-id")
    )
    analytics = core.analytics.analytics if core.analytics is not None else None
    if analytics is None:
        raise FailedPrecondition(
            "ClickHouse analytics is not enabled on this service (DBSVC_CLICKHOUSE_ENABLED)"
        )
    params = ReportParams(
        symbol=body.symbol,
        start=body.start,
        end=body.end,
        interval_minutes=body.interval_minutes,
        price_decimals=body.price_decimals,
        horizon_minutes=body.horizon_minutes,
    )
    result = await analytics.report(principal, ctx, name, params)
    parts = _body(result, core.settings.max_result_bytes)
    parts[-1] = parts[-1][:-1] + b',"store":"clickhouse"}'
    return _JsonParts(parts)


async def _collect(events: AsyncGenerator[Event, None], max_rows: int) -> QueryResult:
    columns: list[Column] = []
    rows: list[Any] = []
    summary: Summary | None = None
    try:
        async for event in events:
            if isinstance(event, Header):
                columns = list(event.columns)
            elif isinstance(event, Summary):
                summary = event
            elif isinstance(event, PackedRows):
                rows.extend(unpacked(event, columns))
            else:
                rows.extend(event)
            if len(rows) > max_rows:
                raise ResultTooLarge(
                    f"the result has more than {max_rows} rows; add a LIMIT or use the"
                    " streaming gRPC API"
                )
    finally:
        await events.aclose()
    assert summary is not None
    return QueryResult(
        columns=columns,
        rows=rows,
        command=summary.command,
        row_count=summary.row_count,
        kind=StatementKind.READ,
        duration_ms=summary.duration_ms,
    )
