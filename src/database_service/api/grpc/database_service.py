"""The gRPC DatabaseService (seed: "Method 2: gRPC"): a thin adapter over the application layer.

Each RPC reads its caller (``calls.Caller``), turns the request into a call of the query core or
a use case — which authorize and audit themselves — and the result into messages. Deadlines and
client cancellation cancel the handler, which cancels the running statement in PostgreSQL and
returns its connection to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from database_service.analytics.service import choose_engine
from database_service.api.grpc.calls import Caller, rpc
from database_service.api.grpc.encoding import (
    add_rows,
    columns_message,
    encoded_result,
    encoders_for,
    hit_tail,
    result_message,
    result_messages,
    summary_tail,
    unpack_bulk,
)
from database_service.app import Application
from database_service.application.keyvalue import KeyValueCommand, Operation
from database_service.errors import InvalidParameters
from database_service.moments import timestamp_field as _time
from database_service.observability.notices import Notices
from database_service.query.caching import CacheOptions
from database_service.query.executor import Isolation
from database_service.results import Event, QueryResult
from database_service.tenancy import validate_tenant_id
from database_service.timeseries.candles import DEFAULT_ORIGIN, CandleQuery
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceServicer
from database_service_client.values import from_row, from_value

__all__ = ["DatabaseService"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_KV_OPERATIONS: dict[int, Operation] = {
    pb.KEY_VALUE_OPERATION_GET: Operation.GET,
    pb.KEY_VALUE_OPERATION_SET: Operation.SET,
    pb.KEY_VALUE_OPERATION_DELETE: Operation.DELETE,
    pb.KEY_VALUE_OPERATION_INCR: Operation.INCR,
    pb.KEY_VALUE_OPERATION_EXPIRE: Operation.EXPIRE,
    pb.KEY_VALUE_OPERATION_MGET: Operation.MGET,
}
_ISOLATION: dict[int, Isolation] = {
    pb.ISOLATION_LEVEL_UNSPECIFIED: "read_committed",
    pb.ISOLATION_LEVEL_READ_COMMITTED: "read_committed",
    pb.ISOLATION_LEVEL_REPEATABLE_READ: "repeatable_read",
    pb.ISOLATION_LEVEL_SERIALIZABLE: "serializable",
}


def _message_rows(message: Any) -> list[Any]:
    """A bulk message's rows: packed (one JSON array) or as Row messages, never both."""
    if message.packed:
        if len(message.rows):
            raise InvalidParameters("a bulk message carries rows or packed rows, not both")
        return unpack_bulk(message.packed)
    return [from_row(r) for r in message.rows]


def _timestamp(value: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


class _Flow:
    """The client's credit for StreamQuery: how many more messages it asked for, and whether
    it canceled or stopped asking."""

    def __init__(self) -> None:
        self.credit = 0
        self.canceled = False
        self.closed = False
        self._changed = asyncio.Event()

    async def read(self, requests: AsyncIterator[pb.StreamQueryRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "cancel":
                    self.canceled = True
                    break
                if kind != "pull":
                    self.canceled = True
                    raise InvalidParameters("after 'start', StreamQuery takes 'pull' or 'cancel'")
                self.credit += request.pull
                self._changed.set()
        finally:
            self.closed = True
            self._changed.set()

    async def wait_for_credit(self) -> bool:
        """True when a message may be sent; False when the client canceled, or stopped
        sending with no credit left."""
        while not self.canceled and self.credit <= 0:
            if self.closed:
                return False
            self._changed.clear()
            await self._changed.wait()
        return not self.canceled

    def spent(self) -> None:
        self.credit -= 1


def _encoded(result: QueryResult, packed: bool) -> pb.QueryResult | bytes:
    """``Query``'s answer: bytes written directly when packed (``encoded_result``), else the
    message."""
    if packed:
        data = encoded_result(result)
        if data is not None:
            return data
    return result_message(result, pb.QueryResult, packed=packed)


def _with_summary(data: bytes, result: QueryResult) -> bytes:
    """An encoded answer with its summary's duration and cache fields set (when the result
    cache was asked): the stored bytes of a cached one are sent as they are."""
    info = result.cache
    if info is None:
        return data
    return data + summary_tail(
        result.duration_ms, info.status, info.age_ms or 0.0, info.stale, info.reason or ""
    )


def _packed_bytes(result: QueryResult) -> bytes:
    data = encoded_result(result)
    return data if data is not None else _values_bytes(result)


def _values_bytes(result: QueryResult) -> bytes:
    return result_message(result, pb.QueryResult).SerializeToString()


class DatabaseService(DatabaseServiceServicer):
    def __init__(self, core: Application, *, default_chunk_bytes: int) -> None:
        self.core = core
        self.caller = Caller(core)
        self.notices = Notices(log)
        self.default_chunk_bytes = default_chunk_bytes

    def _messages(
        self, events: AsyncIterator[Event], message: Callable[..., T], request: Any
    ) -> AsyncGenerator[T, None]:
        """Result events as ``message``s, chunked and encoded as ``request`` asks."""
        return result_messages(
            events,
            message,
            request.max_chunk_bytes or self.default_chunk_bytes,
            packed=request.row_encoding == pb.ROW_ENCODING_PACKED,
        )

    # --- queries ---------------------------------------------------------------------------

    @rpc
    async def ExecuteQuery(
        self, request: pb.QueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.QueryResult]:
        principal, ctx = await self.caller.tenant(context)
        params = [from_value(v) for v in request.params]
        events = self.core.executor.stream(principal, ctx, request.sql, params)
        async for message in self._messages(events, pb.QueryResult, request):
            yield message

    @rpc
    async def Query(
        self, request: pb.QueryRequest, context: grpc.aio.ServicerContext
    ) -> pb.QueryResult | bytes:
        """ExecuteQuery's result in one message: the fast path for small results (bounded by
        the result limits: past them, ``result_too_large`` and nothing changed). A packed answer
        is written as bytes (``encoded_result``) and one from the result cache goes as the bytes
        it was stored as, with its summary's tail (``server.add_servicer`` sends bytes as they
        are)."""
        executor = self.core.executor
        replay_key = check_key = None
        if request.cache_ttl_ms:  # asked of the cache: answered again without the coroutines?
            known = self.caller.known(context, request)
            if known is not None:
                principal, replay_key = known
                replayed = executor.replay(principal, replay_key)
                if replayed is not None:
                    self.caller.replayed(principal, replay_key[1])
                    return replayed.payload + hit_tail(replayed.duration_ms, replayed.age_ms)
        elif not request.allow_stale:  # checked before? (the rules are asked below)
            known_statement = self.caller.known_statement(context, request.sql)
            if known_statement is not None:
                principal, check_key = known_statement
                checked = executor.checked(principal, check_key)
                if checked is not None and not executor.caches_by_rule(checked.ctx.tenant_id):
                    self.caller.replayed(principal, checked.ctx.tenant_id)
                    params = [from_value(v) for v in request.params]
                    result = await executor.execute(
                        principal, checked.ctx, request.sql, params, checked=checked
                    )
                    return _encoded(result, request.row_encoding == pb.ROW_ENCODING_PACKED)
        principal, ctx = await self.caller.tenant(context)
        params = [from_value(v) for v in request.params]
        packed = request.row_encoding == pb.ROW_ENCODING_PACKED
        if not (
            request.cache_ttl_ms or request.allow_stale or executor.caches_by_rule(ctx.tenant_id)
        ):
            result = await executor.execute(
                principal, ctx, request.sql, params, check_key=check_key
            )
            return _encoded(result, packed)
        options = CacheOptions(
            ttl_ms=request.cache_ttl_ms,
            allow_stale=request.allow_stale,
            form="grpc-packed" if packed else "grpc-values",
            encode=_packed_bytes if packed else _values_bytes,
        )
        result = await executor.execute(
            principal, ctx, request.sql, params, cache=options, replay_key=replay_key
        )
        if result.payload is not None:  # from the cache: its stored bytes, sent as they are
            return _with_summary(result.payload, result)
        encoded = _encoded(result, packed)
        if result.cache is None:
            return encoded
        data = encoded if isinstance(encoded, bytes) else encoded.SerializeToString()
        return _with_summary(data, result)

    @rpc
    async def StreamQuery(
        self,
        request_iterator: AsyncIterator[pb.StreamQueryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.QueryResult]:
        """ExecuteQuery with flow control: result messages go out only as the client asks for
        them (``pull``), the cursor waits meanwhile (bounded by the tenant's transaction limit),
        and ``cancel`` — or the client going away — stops the statement at once."""
        principal, ctx = await self.caller.tenant(context)
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("kind") != "start":
            raise InvalidParameters("the first StreamQuery message must be 'start', the query")
        start = first.start
        params = [from_value(v) for v in start.params]
        events = self.core.executor.stream(principal, ctx, start.sql, params)
        messages = self._messages(events, pb.QueryResult, start)
        flow = _Flow()
        reader = asyncio.create_task(flow.read(requests))
        try:
            while await flow.wait_for_credit():
                message = await anext(messages, None)
                if message is None:
                    return
                yield message
                flow.spent()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, InvalidParameters):
                await reader
            await messages.aclose()
            await events.aclose()  # releases the cursor and its connection now

    @rpc
    async def ExecuteAnalyticsQuery(
        self, request: pb.AnalyticsQueryRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnalyticsResult]:
        # ClickHouse when enabled (or asked for), else PostgreSQL as before (analytics/service.py).
        principal, ctx = await self.caller.tenant(context)
        params = [from_value(v) for v in request.params]
        analytics = self.core.analytics.analytics if self.core.analytics is not None else None
        if choose_engine(request.engine, analytics) == "clickhouse":
            assert analytics is not None
            events = analytics.stream(principal, ctx, request.sql, params)
        else:
            events = self.core.executor.stream(
                principal, ctx, request.sql, params, read_only=True, action="analytics"
            )
        async for message in self._messages(events, pb.AnalyticsResult, request):
            yield message

    @rpc
    async def GetTimeSeriesData(
        self, request: pb.TimeSeriesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TimeSeriesData]:
        principal, ctx = await self.caller.tenant(context)
        series = self.core.timeseries
        start, end = _time(request, "start"), _time(request, "end")
        if request.kind == pb.TIME_SERIES_KIND_LAST_TICK:
            events = series.last(principal, ctx, start)
        elif request.kind == pb.TIME_SERIES_KIND_CANDLES:
            if not request.symbol or start is None or end is None:
                raise InvalidParameters("symbol, start and end are required")
            query = CandleQuery(
                symbol=request.symbol,
                start=start,
                end=end,
                interval=dt.timedelta(seconds=request.interval_seconds or 60),
                timezone=request.timezone or "UTC",
                origin=_time(request, "origin") or DEFAULT_ORIGIN,
                gap_fill=request.gap_fill,
                source=request.source or "auto",
            )
            events = series.candles(principal, ctx, query)
        else:
            events = series.raw(
                principal,
                ctx,
                request.symbol,
                start,
                end,
                table=request.table or "trading_ticks",
                limit=request.limit,
            )
        async for message in self._messages(events, pb.TimeSeriesData, request):
            yield message

    @rpc
    async def ExecuteTransaction(
        self, request: pb.TransactionRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransactionResponse:
        principal, ctx = await self.caller.tenant(context)
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
            out = response.results.add(
                columns=columns_message(item.columns),
                row_count=item.row_count,
                command=item.command,
            )
            add_rows(out, item.rows, encoders_for(item.columns))
        return response

    # --- bulk ------------------------------------------------------------------------------

    @staticmethod
    async def _first(requests: AsyncIterator[T], what: str) -> T:
        async for first in requests:
            return first
        raise InvalidParameters(f"{what}: the stream was empty")

    @staticmethod
    async def _rows(first: Any, requests: AsyncIterator[Any]) -> AsyncIterator[list[Any]]:
        yield _message_rows(first)
        async for message in requests:
            yield _message_rows(message)

    async def _counted(
        self, first: Any, requests: AsyncIterator[Any], counter: list[int]
    ) -> AsyncIterator[list[Any]]:
        async for rows in self._rows(first, requests):
            counter[0] += len(rows)
            yield rows

    @rpc
    async def BulkInsert(
        self,
        request_iterator: AsyncIterator[pb.BulkInsertRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.BulkInsertResponse:
        principal, ctx = await self.caller.tenant(context)
        started = time.perf_counter()
        first = await self._first(request_iterator, "BulkInsert")
        if not first.table or not first.columns:
            raise InvalidParameters("the first BulkInsert message must name table and columns")
        sent = [0]
        written = await self.core.executor.bulk_insert(
            principal,
            ctx,
            first.table,
            list(first.columns),
            self._counted(first, request_iterator, sent),
        )
        return pb.BulkInsertResponse(
            rows_written=written,
            rows_sent=sent[0],
            duration_ms=(time.perf_counter() - started) * 1000,
        )

    @rpc
    async def BulkUpdate(
        self,
        request_iterator: AsyncIterator[pb.BulkUpdateRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.BulkUpdateResponse:
        principal, ctx = await self.caller.tenant(context)
        started = time.perf_counter()
        first = await self._first(request_iterator, "BulkUpdate")
        if not first.table or not first.key_columns or not first.columns:
            raise InvalidParameters(
                "the first BulkUpdate message must name table, key_columns and columns"
            )
        sent = [0]
        updated = await self.core.executor.bulk_update(
            principal,
            ctx,
            first.table,
            list(first.key_columns),
            list(first.columns),
            self._counted(first, request_iterator, sent),
        )
        return pb.BulkUpdateResponse(
            rows_updated=updated,
            rows_sent=sent[0],
            duration_ms=(time.perf_counter() - started) * 1000,
        )

    # --- schema ----------------------------------------------------------------------------

    @rpc
    async def CreateTenantSchema(
        self, request: pb.SchemaRequest, context: grpc.aio.ServicerContext
    ) -> pb.SchemaResponse:
        principal = await self.caller.principal(context)
        tenant_id = validate_tenant_id(request.tenant_id)
        self.caller.acting_for(principal, tenant_id)
        record = await self.core.tenant_admin.create(
            principal,
            tenant_id,
            connection_limit=request.connection_limit or None,
            statement_timeout_ms=request.statement_timeout_ms or None,
        )
        return pb.SchemaResponse(
            tenant_id=record.tenant_id,
            schema=record.schema_name,
            role=record.role_name,
            status=record.status,
            created_at=_timestamp(record.created_at),
        )

    @rpc
    async def ManagePartitions(
        self, request: pb.PartitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PartitionResponse:
        """Lists the tenant's partitioned tables and the shared time-series tables (``read`` for
        the tenant; the shared ones without figures unless the caller is a platform principal);
        maintain, detach and attach change the shared tables: the platform administrator's."""
        principal, ctx = await self.caller.tenant(context)
        admin = self.core.partition_admin
        report = ""
        if request.action == pb.PARTITION_ACTION_MAINTAIN:
            done = await admin.maintain(principal, tenant_id=ctx.tenant_id)
            report = json.dumps(done.to_dict() if done else {"skipped": True})
        elif request.action == pb.PARTITION_ACTION_DETACH:
            await admin.detach(principal, request.table, request.partition, tenant_id=ctx.tenant_id)
        elif request.action == pb.PARTITION_ACTION_ATTACH:
            start = _time(request, "start")
            if start is None:
                raise InvalidParameters("attach needs the start of the partition's range")
            await admin.attach(
                principal, request.table, request.partition, start, tenant_id=ctx.tenant_id
            )
        infos = await admin.list(principal, request.table or None, tenant_id=ctx.tenant_id)
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

    @rpc
    async def HealthCheck(
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        """The small document for anyone; the full one for a platform principal holding
        metrics or admin (as ``GET /api/v1/health``)."""
        principal = await self.caller.optional_principal(context)
        document = await self.core.observability.health(principal)
        return pb.HealthResponse(status=document["status"], document_json=json.dumps(document))

    @rpc
    async def GetPerformanceMetrics(
        self, request: pb.MetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PerformanceMetrics:
        """A platform principal holding metrics or admin sees the service's figures; anyone else
        the figures of the tenant named by x-tenant-id (required, one it may act for) only."""
        principal = await self.caller.principal(context)
        tenant_id = self.caller.tenant_header(context)
        document = await self.core.observability.performance(principal, tenant_id)
        if "tenant_id" in document:
            self.caller.acting_for(principal, document["tenant_id"])
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

    # --- key-value -------------------------------------------------------------------------

    @rpc
    async def KeyValue(
        self, request: pb.KeyValueRequest, context: grpc.aio.ServicerContext
    ) -> pb.KeyValueResponse:
        """One key-value operation for the tenant of x-tenant-id (``application.keyvalue``)."""
        principal, ctx = await self.caller.tenant(context)
        operation = _KV_OPERATIONS.get(request.operation)
        if operation is None:
            known = ", ".join(o.name for o in Operation)
            raise InvalidParameters(f"operation is required: one of {known}")
        command = KeyValueCommand(
            operation,
            key=request.key if operation is not Operation.MGET or request.key else None,
            value=request.value if request.HasField("value") else None,
            ttl_ms=request.ttl_ms if request.HasField("ttl_ms") else None,
            by=request.by if request.HasField("by") else None,
            keys=list(request.keys) if operation is Operation.MGET or request.keys else None,
        )
        result = await self.core.key_value.execute(principal, ctx, command)
        return pb.KeyValueResponse(
            found=result.found,
            value=result.value or b"",
            number=result.number or 0,
            items=[pb.KeyValueItem(found=v is not None, value=v or b"") for v in result.values],
        )
