"""The gRPC DatabaseService (seed: "Method 2: gRPC"), on the same query core as REST.

Metadata: ``authorization: Bearer <token>``, ``x-tenant-id``, optional ``x-user-id``. Every RPC
authenticates first, then checks scopes through the core; errors leave through ``abort_with``.
Deadlines and client cancellation cancel the handler, which cancels the running statement in
PostgreSQL and returns its connection to the pool.

Every RPC goes through ``_rpc``: a request whose bytes did not decode (``Undecodable``, from the
deserializers ``server.py`` installs) is ``INVALID_ARGUMENT`` / ``invalid_request``; an exception
that is neither a service error nor an escaped driver error is a bug, logged with its traceback,
counted, audited and answered ``INTERNAL`` / ``internal`` without its text. Both are audited.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from database_service.api.grpc.encoding import Encoder, chunk_rows, columns_message, encoders_for
from database_service.api.grpc.status import abort_with
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    escaped_driver_error,
    unavailable,
)
from database_service.observability import AuditEvent
from database_service.observability.health import performance_document
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

__all__ = ["Servicer", "Undecodable", "tolerant"]

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


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request deserializer returns for bytes that are not the request message (invalid
    UTF-8 in a string field, a truncated varint, ...): ``_rpc`` answers it INVALID_ARGUMENT.
    Raising in the deserializer instead would end the call as INTERNAL, unaudited."""

    message_type: str
    reason: str


def tolerant(parse: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    """A request deserializer that returns ``Undecodable`` instead of raising."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, UnicodeDecodeError) as exc:
            return Undecodable(message_type, str(exc))

    return deserialize


@dataclass(slots=True)
class _Call:
    """What is known about the current call, for the audit row and the tenant's figures."""

    action: str = "grpc"
    service: str | None = None
    tenant_id: str | None = None  # set once the caller may act for it


_CALL: ContextVar[_Call] = ContextVar("dbsvc_grpc_call")


def _call() -> _Call:
    call = _CALL.get(None)
    if call is None:  # called outside _rpc
        call = _Call()
        _CALL.set(call)
    return call


def _rpc(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Count, time and translate errors for one RPC, unary or streaming."""
    name = handler.__name__
    action = f"grpc.{name}"

    def record(servicer: Servicer, started: float, code: str, call: _Call) -> None:
        metrics = servicer.core.metrics
        elapsed = time.perf_counter() - started
        metrics.requests.labels("grpc", name, code).inc()
        metrics.request_seconds.labels("grpc", name).observe(elapsed)
        if code != "ok":
            metrics.errors.labels(code).inc()
        servicer.core.window.record(elapsed, code not in _SERVER_ERRORS, call.tenant_id)

    async def undecodable(servicer: Servicer, request: Undecodable) -> InvalidRequest:
        exc = InvalidRequest(
            f"invalid request: not a valid {request.message_type} message ({request.reason})"
        )
        await servicer.denied(None, None, action, exc)
        return exc

    async def checked(servicer: Servicer, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A client stream, with an undecodable message turned into InvalidRequest."""
        async for message in requests:
            if isinstance(message, Undecodable):
                raise await undecodable(servicer, message)
            yield message

    async def fail(
        servicer: Servicer, context: Any, started: float, call: _Call, exc: Exception
    ) -> NoReturn:
        if isinstance(exc, DatabaseServiceError):
            error = exc
        elif escaped_driver_error(exc):
            # Last resort: PostgreSQL unreachable on a path without its own translation is
            # still UNAVAILABLE, which clients retry, not UNKNOWN.
            log.warning("%s: PostgreSQL error reached the last resort", name, exc_info=exc)
            error = unavailable(name, exc)
        else:
            log.error("%s: unexpected error", name, exc_info=exc)
            servicer.core.metrics.unhandled.labels("grpc", name).inc()
            await servicer.core.audit.record(
                AuditEvent(
                    service=call.service,
                    tenant_id=call.tenant_id,
                    action=action,
                    outcome="error",
                    code="internal",
                    detail=type(exc).__name__,
                )
            )
            error = DatabaseServiceError("internal error: the service logged it")
        record(servicer, started, error.error_code, call)
        await abort_with(context, error)

    async def begin(servicer: Servicer, call: _Call, request: Any) -> Any:
        _CALL.set(call)  # each RPC runs in its own task, so in its own context
        if isinstance(request, Undecodable):
            raise await undecodable(servicer, request)
        if hasattr(request, "__aiter__"):  # client streaming: check each message as it comes
            return checked(servicer, request)
        return request

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: Servicer, request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            call = _Call(action=action)
            try:
                request = await begin(self, call, request)
                async for message in handler(self, request, context):
                    yield message
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await fail(self, context, started, call, exc)
            record(self, started, "ok", call)

        return stream

    @functools.wraps(handler)
    async def unary(self: Servicer, request: Any, context: Any) -> Any:
        started = time.perf_counter()
        call = _Call(action=action)
        try:
            request = await begin(self, call, request)
            result = await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await fail(self, context, started, call, exc)
        record(self, started, "ok", call)
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

    async def denied(
        self,
        principal: Principal | None,
        tenant_id: str | None,
        action: str,
        exc: DatabaseServiceError,
    ) -> None:
        """Count and audit a refusal (the caller raises it)."""
        service = principal.service if principal else None
        await self.core.audit.denied(service, tenant_id, action, exc)

    async def _require(
        self, principal: Principal, scope: Scope, action: str, tenant_id: str | None = None
    ) -> None:
        try:
            principal.require(scope, tenant_id)
        except PermissionDenied as exc:
            await self.denied(principal, tenant_id, action, exc)
            raise

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        call = _call()
        try:
            principal = await self.core.authenticator.authenticate(
                authorization if isinstance(authorization, str) else None
            )
        except Unauthenticated as exc:  # not Unavailable: PostgreSQL being down denies no one
            await self.denied(None, None, call.action, exc)
            raise
        call.service = principal.service
        return principal

    @staticmethod
    def _tenant_header(context: grpc.aio.ServicerContext) -> str | None:
        tenant_id = dict(context.invocation_metadata() or ()).get("x-tenant-id")
        return tenant_id if isinstance(tenant_id, str) and tenant_id else None

    @staticmethod
    def _acting_for(principal: Principal, tenant_id: str) -> None:
        """Count this call in the tenant's figures, once the caller may act for it."""
        if principal.can_act_for(tenant_id):
            _call().tenant_id = tenant_id

    async def _caller(self, context: grpc.aio.ServicerContext) -> tuple[Principal, TenantContext]:
        principal = await self._principal(context)
        metadata = dict(context.invocation_metadata() or ())
        tenant_id = self._tenant_header(context)
        if tenant_id is None:
            raise InvalidRequest("the x-tenant-id metadata is required")
        user_id = metadata.get("x-user-id")
        ctx = TenantContext(
            validate_tenant_id(tenant_id), user_id if isinstance(user_id, str) else None
        )
        self._acting_for(principal, ctx.tenant_id)
        return principal, ctx

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
        await self._require(principal, Scope.ADMIN, "tenant.create", tenant_id)
        self._acting_for(principal, tenant_id)
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
        """Lists the tenant's partitioned tables and the shared time-series tables (read scope
        for the tenant); maintain, detach and attach change the shared tables, so they need the
        platform administrator. The shared partitions' sizes and row estimates describe every
        tenant's rows: only a platform principal sees them, anyone else sees 0."""
        principal, ctx = await self._caller(context)
        manager = self.core.partitions
        shared = self.core.settings.shared_schema
        action_name = pb.PartitionAction.Name(request.action).lower()
        action = f"partitions.{action_name.removeprefix('partition_action_')}"
        report = ""
        if request.action == pb.PARTITION_ACTION_LIST:
            await self._require(principal, Scope.READ, action, ctx.tenant_id)
        else:
            await self._require(principal, Scope.ADMIN, action, ctx.tenant_id)
            try:
                principal.require_platform(Scope.ADMIN)
            except PermissionDenied as exc:
                await self.denied(principal, ctx.tenant_id, action, exc)
                raise
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
                    action=action,
                    detail=f"{request.table} {request.partition}".strip() or None,
                )
            )
        tenant = await self.core.registry.get_active(ctx.tenant_id)
        infos = await manager.list(request.table or None, schemas=[tenant.schema_name, shared])
        figures = principal.is_platform

        def partition(p: Any) -> pb.Partition:
            visible = figures or not p.parent.startswith(f"{shared}.")
            return pb.Partition(
                parent=p.parent,
                name=p.name,
                bound=p.bound,
                rows_estimate=p.rows_estimate if visible else 0,
                bytes=p.bytes if visible else 0,
            )

        return pb.PartitionResponse(partitions=[partition(p) for p in infos], report_json=report)

    # --- health ----------------------------------------------------------------------------

    async def _optional_principal(self, context: grpc.aio.ServicerContext) -> Principal | None:
        """The caller when it sent credentials (bad ones are refused), else None."""
        if dict(context.invocation_metadata() or ()).get("authorization") is None:
            return None
        try:
            return await self._principal(context)
        except Unavailable:
            return None  # PostgreSQL is down: answer what anyone may see

    @_rpc
    async def HealthCheck(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        """The small document for anyone; the full one for a platform principal holding
        metrics or admin (as ``GET /api/v1/health``)."""
        principal = await self._optional_principal(context)
        detailed = principal is not None and principal.is_platform_with(Scope.METRICS, Scope.ADMIN)
        document = await self.core.health.document(detailed=detailed)
        return pb.HealthResponse(status=document["status"], document_json=json.dumps(document))

    @_rpc
    async def GetPerformanceMetrics(
        self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PerformanceMetrics:
        """A platform principal holding metrics or admin sees the service's figures; anyone else
        the figures of the tenant named by x-tenant-id (required, one it may act for) only."""
        principal = await self._principal(context)
        core = self.core
        if principal.is_platform_with(Scope.METRICS, Scope.ADMIN):
            document = performance_document(core.window, core.pools, audit=core.audit)
        else:
            tenant_id = self._tenant_header(context)
            if tenant_id is None:
                raise InvalidRequest("the x-tenant-id metadata is required: figures are per tenant")
            tenant_id = validate_tenant_id(tenant_id)
            await self._require_tenant(principal, tenant_id, "metrics.performance")
            self._acting_for(principal, tenant_id)
            document = performance_document(core.window, core.pools, tenant_id=tenant_id)
        return pb.PerformanceMetrics(
            requests=document["requests"],
            throughput_rps=document["throughput_rps"],
            response_time_ms=document["response_time_ms"],
            p50_ms=document["p50_ms"],
            p99_ms=document["p99_ms"],
            error_rate_percent=document["error_rate_percent"],
            pool_connections_open=document["pool_connections_open"],
            document_json=json.dumps(document),
        )

    async def _require_tenant(self, principal: Principal, tenant_id: str, action: str) -> None:
        if not principal.can_act_for(tenant_id):
            exc = PermissionDenied(
                f"service {principal.service!r} may not act for tenant {tenant_id!r}"
            )
            await self.denied(principal, tenant_id, action, exc)
            raise exc
