"""The gRPC DatabaseService (seed: "Method 2: gRPC"), on the same query core as REST.

Metadata: ``authorization: Bearer <token>``, ``x-tenant-id``, optional ``x-user-id``. Every RPC
authenticates first, then checks scopes through the core; errors leave through ``abort_with``.
Deadlines and client cancellation cancel the handler, which cancels the running statement in
PostgreSQL and returns its connection to the pool.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from database_service.api.grpc.encoding import Encoder, chunk_rows, columns_message, encoders_for
from database_service.api.grpc.status import abort_with
from database_service.app import Application
from database_service.auth import ALL_TENANTS, Principal, Scope
from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
    escaped_driver_error,
    unavailable,
)
from database_service.observability import AuditEvent
from database_service.query import Header, Summary, TenantContext
from database_service.query.executor import Isolation
from database_service.tenancy import TenantLimits, quote_ident, validate_tenant_id
from database_service.timeseries.candles import (
    DEFAULT_ORIGIN,
    CandleQuery,
    candle_sql,
    last_tick_sql,
)
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceServicer
from database_service_client.values import from_row, from_value

__all__ = ["Servicer"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_ISOLATION: dict[int, Isolation] = {
    pb.ISOLATION_LEVEL_UNSPECIFIED: "read_committed",
    pb.ISOLATION_LEVEL_READ_COMMITTED: "read_committed",
    pb.ISOLATION_LEVEL_REPEATABLE_READ: "repeatable_read",
    pb.ISOLATION_LEVEL_SERIALIZABLE: "serializable",
}
_TIME_SERIES = {
    "trading_ticks": "time, user_id, symbol, bid, ask, volume, spread",
    "ai_predictions": "time, user_id, symbol, prediction_type, confidence, model_version,"
    " features, result",
}


def _rpc(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Count, time and translate errors for one RPC, unary or streaming."""
    name = handler.__name__

    def service_error(exc: Exception) -> DatabaseServiceError | None:
        """The error to send, or None to let gRPC report it as UNKNOWN (a bug)."""
        if isinstance(exc, DatabaseServiceError):
            return exc
        if escaped_driver_error(exc):
            # Last resort: PostgreSQL unreachable on a path without its own translation is
            # still UNAVAILABLE, which clients retry, not UNKNOWN.
            log.warning("%s: PostgreSQL error reached the last resort", name, exc_info=exc)
            return unavailable(name, exc)
        return None

    def record(servicer: Servicer, started: float, code: str) -> None:
        metrics = servicer.core.metrics
        elapsed = time.perf_counter() - started
        metrics.requests.labels("grpc", name, code).inc()
        metrics.request_seconds.labels("grpc", name).observe(elapsed)
        if code != "ok":
            metrics.errors.labels(code).inc()
        servicer.core.window.record(elapsed, code not in _SERVER_ERRORS)

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Servicer, request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for message in handler(self, request, context):
                    yield message
            except Exception as exc:
                error = service_error(exc)
                if error is None:
                    raise
                record(self, started, error.error_code)
                await abort_with(context, error)
            record(self, started, "ok")

        return stream

    @functools.wraps(handler)
    async def unary(self: Servicer, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        try:
            result = await handler(self, request, context)
        except Exception as exc:
            error = service_error(exc)
            if error is None:
                raise
            record(self, started, error.error_code)
            await abort_with(context, error)
        record(self, started, "ok")
        return result

    return unary


_SERVER_ERRORS = {"internal", "database_error", "unavailable", "connection_exception"}


def _timestamp(value: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class Servicer(DatabaseServiceServicer):
    def __init__(self, core: Application, *, default_chunk_bytes: int) -> None:
        self.core = core
        self.default_chunk_bytes = default_chunk_bytes

    # --- identity --------------------------------------------------------------------------

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        try:
            return await self.core.authenticator.authenticate(
                authorization if isinstance(authorization, str) else None
            )
        except Unauthenticated as exc:  # not Unavailable: PostgreSQL being down denies no one
            await self.core.audit.record(
                AuditEvent(action="grpc", outcome="denied", code=exc.error_code, detail=exc.message)
            )
            raise

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[Principal, TenantContext]:
        principal = await self._principal(context)
        metadata = dict(context.invocation_metadata() or ())
        tenant_id = metadata.get("x-tenant-id")
        if not isinstance(tenant_id, str) or not tenant_id:
            raise InvalidRequest("the x-tenant-id metadata is required")
        user_id = metadata.get("x-user-id")
        return principal, TenantContext(
            validate_tenant_id(tenant_id), user_id if isinstance(user_id, str) else None
        )

    # --- queries ---------------------------------------------------------------------------

    async def _results(
        self,
        events: AsyncIterator[Header | Sequence[Any] | Summary],
        message: Callable[..., T],
        max_chunk_bytes: int,
    ) -> AsyncIterator[T]:
        """Messages of about ``max_chunk_bytes``: the header rides with the first rows and the
        summary with the last, so a small result is a single message (one write, not three)."""
        limit = max_chunk_bytes or self.default_chunk_bytes
        encoders: list[Encoder] = []
        header: pb.ResultHeader | None = None
        pending: pb.RowChunk | None = None
        async for event in events:
            if isinstance(event, Header):
                encoders = encoders_for(event.columns)
                header = pb.ResultHeader(columns=columns_message(event.columns))
            elif isinstance(event, Summary):
                summary = pb.ResultSummary(
                    row_count=event.row_count,
                    command=event.command,
                    duration_ms=event.duration_ms,
                    statement_class=event.kind.value,
                )
                yield message(header=header, rows=pending, summary=summary)
            else:
                for chunk in chunk_rows(event, encoders, limit):
                    if pending is not None:
                        yield message(header=header, rows=pending)
                        header = None
                    pending = chunk

    @_rpc
    async def ExecuteQuery(
        self, request: pb.QueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.QueryResult]:
        principal, ctx = await self._caller(context)
        params = [from_value(v) for v in request.params]
        events = self.core.executor.stream(principal, ctx, request.sql, params)
        async for message in self._results(events, pb.QueryResult, request.max_chunk_bytes):
            yield message

    @_rpc
    async def ExecuteAnalyticsQuery(
        self, request: pb.AnalyticsQueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnalyticsResult]:
        # Routed to PostgreSQL through the same core until the analytics store lands.
        principal, ctx = await self._caller(context)
        params = [from_value(v) for v in request.params]
        events = self.core.executor.stream(
            principal, ctx, request.sql, params, read_only=True, action="analytics"
        )
        async for message in self._results(events, pb.AnalyticsResult, request.max_chunk_bytes):
            yield message

    @_rpc
    async def GetTimeSeriesData(
        self, request: pb.TimeSeriesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TimeSeriesData]:
        principal, ctx = await self._caller(context)
        sql, params = self._time_series_sql(request)
        events = self.core.executor.stream(
            principal, ctx, sql, params, read_only=True, action="timeseries"
        )
        async for message in self._results(events, pb.TimeSeriesData, request.max_chunk_bytes):
            yield message

    def _time_series_sql(self, request: pb.TimeSeriesRequest) -> tuple[str, list[Any]]:
        shared = self.core.settings.shared_schema
        start = request.start.ToDatetime(tzinfo=dt.UTC) if request.HasField("start") else None
        end = request.end.ToDatetime(tzinfo=dt.UTC) if request.HasField("end") else None
        if request.kind == pb.TIME_SERIES_KIND_LAST_TICK:
            return last_tick_sql(shared, start or dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        if not request.symbol or start is None or end is None:
            raise InvalidParameters("symbol, start and end are required")
        if request.kind == pb.TIME_SERIES_KIND_CANDLES:
            query = CandleQuery(
                symbol=request.symbol,
                start=start,
                end=end,
                interval=dt.timedelta(seconds=request.interval_seconds or 60),
                timezone=request.timezone or "UTC",
                origin=(
                    request.origin.ToDatetime(tzinfo=dt.UTC)
                    if request.HasField("origin")
                    else DEFAULT_ORIGIN
                ),
                gap_fill=request.gap_fill,
                source=request.source or "auto",
            )
            return candle_sql(shared, query)
        table = request.table or "trading_ticks"
        if table not in _TIME_SERIES:
            raise InvalidParameters(f"table must be one of {', '.join(_TIME_SERIES)}")
        sql = (
            f"SELECT {_TIME_SERIES[table]} FROM {quote_ident(shared)}.{table}"
            " WHERE symbol = $1 AND time >= $2 AND time < $3 ORDER BY time"
        )
        params: list[Any] = [request.symbol, start, end]
        if request.limit:
            sql += " LIMIT $4"
            params.append(request.limit)
        return sql, params

    @_rpc
    async def ExecuteTransaction(
        self, request: pb.TransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransactionResponse:
        principal, ctx = await self._caller(context)
        statements = [(s.sql, [from_value(v) for v in s.params]) for s in request.statements]
        result = await self.core.executor.transaction(
            principal,
            ctx,
            statements,
            isolation=_ISOLATION.get(request.isolation, "read_committed"),
            read_only=request.read_only,
        )
        response = pb.TransactionResponse(duration_ms=result.duration_ms)
        for item in result.results:
            encoders = encoders_for(item.columns)
            out = response.results.add(
                columns=columns_message(item.columns),
                row_count=item.row_count,
                command=item.command,
            )
            for record in item.rows:
                add = out.rows.add().values.add
                for encode, value in zip(encoders, record, strict=True):
                    encode(add, value)
        return response

    # --- bulk ------------------------------------------------------------------------------

    @staticmethod
    async def _first(requests: AsyncIterator[T], what: str) -> T:
        async for first in requests:
            return first
        raise InvalidParameters(f"{what}: the stream was empty")

    @staticmethod
    async def _rows(
        first: Any, requests: AsyncIterator[Any]
    ) -> AsyncIterator[list[tuple[Any, ...]]]:
        yield [from_row(r) for r in first.rows]
        async for message in requests:
            yield [from_row(r) for r in message.rows]

    @_rpc
    async def BulkInsert(
        self,
        request_iterator: AsyncIterator[pb.BulkInsertRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.BulkInsertResponse:
        principal, ctx = await self._caller(context)
        started = time.perf_counter()
        first = await self._first(request_iterator, "BulkInsert")
        if not first.table or not first.columns:
            raise InvalidParameters("the first BulkInsert message must name table and columns")
        written = await self.core.executor.bulk_insert(
            principal, ctx, first.table, list(first.columns), self._rows(first, request_iterator)
        )
        return pb.BulkInsertResponse(
            rows_written=written, duration_ms=(time.perf_counter() - started) * 1000
        )

    @_rpc
    async def BulkUpdate(
        self,
        request_iterator: AsyncIterator[pb.BulkUpdateRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.BulkUpdateResponse:
        principal, ctx = await self._caller(context)
        started = time.perf_counter()
        first = await self._first(request_iterator, "BulkUpdate")
        if not first.table or not first.key_columns or not first.columns:
            raise InvalidParameters(
                "the first BulkUpdate message must name table, key_columns and columns"
            )
        sent = 0

        async def counted() -> AsyncIterator[list[tuple[Any, ...]]]:
            nonlocal sent
            async for rows in self._rows(first, request_iterator):
                sent += len(rows)
                yield rows

        updated = await self.core.executor.bulk_update(
            principal, ctx, first.table, list(first.key_columns), list(first.columns), counted()
        )
        return pb.BulkUpdateResponse(
            rows_updated=updated, rows_sent=sent, duration_ms=(time.perf_counter() - started) * 1000
        )

    # --- schema ----------------------------------------------------------------------------

    @_rpc
    async def CreateTenantSchema(
        self, request: pb.SchemaRequest, context: grpc.aio.ServicerContext
    ) -> pb.SchemaResponse:
        principal = await self._principal(context)
        tenant_id = validate_tenant_id(request.tenant_id)
        principal.require(Scope.ADMIN, tenant_id)
        defaults = self.core.tenants.default_limits
        record = await self.core.tenants.create(
            tenant_id,
            TenantLimits(
                request.connection_limit or defaults.connection_limit,
                request.statement_timeout_ms or defaults.statement_timeout_ms,
            ),
        )
        await self.core.audit.record(
            AuditEvent(service=principal.service, tenant_id=tenant_id, action="tenant.create")
        )
        return pb.SchemaResponse(
            tenant_id=record.tenant_id,
            schema=record.schema_name,
            role=record.role_name,
            status=record.status,
            created_at=_timestamp(record.created_at),
        )

    @_rpc
    async def ManagePartitions(
        self, request: pb.PartitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PartitionResponse:
        """Lists the tenant's partitioned tables and the shared time-series tables; maintain,
        detach and attach change shared tables, so they need admin over every tenant."""
        principal, ctx = await self._caller(context)
        manager = self.core.partitions
        report = ""
        if request.action == pb.PARTITION_ACTION_LIST:
            principal.require(Scope.READ, ctx.tenant_id)
        else:
            principal.require(Scope.ADMIN, ctx.tenant_id)
            if ALL_TENANTS not in principal.tenants:
                raise PermissionDenied("changing shared partitions needs admin over every tenant")
            if request.action == pb.PARTITION_ACTION_MAINTAIN:
                done = await manager.maintain()
                report = json.dumps(done.to_dict() if done else {"skipped": True})
            elif request.action == pb.PARTITION_ACTION_DETACH:
                await manager.detach(request.table, request.partition)
            elif request.action == pb.PARTITION_ACTION_ATTACH:
                if not request.HasField("start"):
                    raise InvalidParameters("attach needs the start of the partition's range")
                await manager.attach(
                    request.table, request.partition, request.start.ToDatetime(tzinfo=dt.UTC)
                )
            await self.core.audit.record(
                AuditEvent(
                    service=principal.service,
                    tenant_id=ctx.tenant_id,
                    action=f"partitions.{pb.PartitionAction.Name(request.action).lower()}",
                    detail=f"{request.table} {request.partition}".strip() or None,
                )
            )
        tenant = await self.core.registry.get_active(ctx.tenant_id)
        infos = await manager.list(
            request.table or None, schemas=[tenant.schema_name, self.core.settings.shared_schema]
        )
        return pb.PartitionResponse(
            partitions=[
                pb.Partition(
                    parent=p.parent,
                    name=p.name,
                    bound=p.bound,
                    rows_estimate=p.rows_estimate,
                    bytes=p.bytes,
                )
                for p in infos
            ],
            report_json=report,
        )

    # --- health ----------------------------------------------------------------------------

    @_rpc
    async def HealthCheck(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        document = await self.core.health.document()
        return pb.HealthResponse(status=document["status"], document_json=json.dumps(document))

    @_rpc
    async def GetPerformanceMetrics(
        self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PerformanceMetrics:
        s = self.core.window.summary()
        document = {
            "requests": s.requests,
            "throughput_rps": s.throughput_rps,
            "response_time_ms": s.response_time_ms,
            "p50_ms": s.p50_ms,
            "p99_ms": s.p99_ms,
            "error_rate_percent": s.error_rate_percent,
            "pool_connections_open": self.core.pools.open_connections,
            "pools": {t: p.in_use for t, p in self.core.pools.stats().items()},
        }
        return pb.PerformanceMetrics(
            requests=s.requests,
            throughput_rps=s.throughput_rps,
            response_time_ms=s.response_time_ms,
            p50_ms=s.p50_ms,
            p99_ms=s.p99_ms,
            error_rate_percent=s.error_rate_percent,
            pool_connections_open=self.core.pools.open_connections,
            document_json=json.dumps(document),
        )
