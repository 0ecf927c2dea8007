"""``MultiDatabaseClient``: what backend services import to talk to the Database Service.

One gRPC channel per client, reused by every call. Calls that cannot change data (health,
metrics, time series, analytics, partition listing, key-value reads, and queries the caller
marks ``idempotent=True``) are retried with exponential backoff on UNAVAILABLE, and a stream only
before its first message; nothing else is retried.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from database_service_client._proto import analytics_pb2 as apb
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto import multidb_pb2 as mpb
from database_service_client._proto.analytics_pb2_grpc import AnalyticsReportsStub
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from database_service_client._proto.multidb_pb2_grpc import MultiDatabaseStub
from database_service_client.errors import (
    DatabaseServiceError,
    FailedPrecondition,
    NotConfigured,
    PermissionDenied,
    from_rpc_error,
)
from database_service_client.graph import GraphMethods
from database_service_client.params import bind
from database_service_client.tls import TlsOptions
from database_service_client.values import from_row, pack_rows, to_row, to_value, unpack_rows
from database_service_client.vectors import VectorMethods

__all__ = ["Column", "MultiDatabaseClient", "QueryResult", "QueryStream", "StatementResult"]

T = TypeVar("T")
# Parameters of a statement: by position ($1, $2, ...) or by name (:name).
Params = Sequence[Any] | Mapping[str, Any]
_ISOLATION = {
    "read_committed": pb.ISOLATION_LEVEL_READ_COMMITTED,
    "repeatable_read": pb.ISOLATION_LEVEL_REPEATABLE_READ,
    "serializable": pb.ISOLATION_LEVEL_SERIALIZABLE,
}
Key = str | bytes
_KV_FIELDS = {
    "get": ({"key"}, set()),
    "set": ({"key", "value"}, {"ttl", "ttl_ms"}),
    "delete": ({"key"}, set()),
    "incr": ({"key"}, {"by"}),
    "expire": ({"key"}, {"ttl", "ttl_ms"}),
    "mget": ({"keys"}, set()),
}


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(slots=True)
class QueryResult:
    columns: list[Column]
    rows: list[tuple[Any, ...]]
    row_count: int
    command: str
    duration_ms: float
    # What the service's result cache did when asked (``fetch_all(cache=...)``): "hit",
    # "miss", "bypass" (``cache_reason`` says why), "stale" (PostgreSQL was unreachable: the
    # last cached answer, ``cache_age_ms`` old); "" when not asked.
    cache: str = ""
    cache_reason: str = ""
    cache_age_ms: float = 0.0
    stale: bool = False

    def dicts(self) -> list[dict[str, Any]]:
        names = [c.name for c in self.columns]
        return [dict(zip(names, row, strict=True)) for row in self.rows]


@dataclass(slots=True)
class StatementResult:
    columns: list[Column]
    rows: list[tuple[Any, ...]]
    row_count: int
    command: str


class _ResultReader:
    """What both result streams share: rows as they arrive, ``columns`` once the header came,
    ``summary`` at the end, and the whole result at once."""

    columns: list[Column]
    summary: pb.ResultSummary | None
    _kinds: list[str] = []  # replaced when a header comes, never changed in place

    def __aiter__(self) -> AsyncIterator[tuple[Any, ...]]:
        return self._rows()

    async def _rows(self) -> AsyncIterator[tuple[Any, ...]]:
        # aclosing: a reader leaving its loop early ends the call now, not when collected.
        async with contextlib.aclosing(self._chunks()) as chunks:
            async for rows in chunks:
                for row in rows:
                    yield row

    def _chunks(self) -> AsyncGenerator[list[tuple[Any, ...]], None]:
        """The rows message by message (a whole result is gathered a message at a time, not
        a row at a time through the generators)."""
        raise NotImplementedError

    def _read(self, message: Any) -> list[tuple[Any, ...]]:
        if message.HasField("header"):
            self.columns = [Column(c.name, c.type) for c in message.header.columns]
            self._kinds = [c.kind for c in message.header.columns]
        rows = _rows_of(message.rows, self._kinds)
        if message.HasField("summary"):
            self.summary = message.summary
        return rows

    async def fetch_all(self) -> QueryResult:
        rows: list[tuple[Any, ...]] = []
        async with contextlib.aclosing(self._chunks()) as chunks:
            async for chunk in chunks:
                rows += chunk
        summary = self.summary
        return QueryResult(
            columns=self.columns,
            rows=rows,
            row_count=summary.row_count if summary else len(rows),
            command=summary.command if summary else "",
            duration_ms=summary.duration_ms if summary else 0.0,
        )


@dataclass
class QueryStream(_ResultReader):
    """``async for row in stream``; ``columns`` once the header arrived, ``summary`` at the end.

    Leaving the loop early cancels the call, which cancels the statement on the server."""

    _start: Callable[[], Any]
    _retries: int
    _backoff: float
    columns: list[Column] = field(default_factory=list)
    summary: pb.ResultSummary | None = None

    async def _chunks(self) -> AsyncGenerator[list[tuple[Any, ...]], None]:
        attempt = 0
        while True:
            call = self._start()
            received = False
            try:
                async for message in call:
                    received = True
                    yield self._read(message)
                return
            except grpc.aio.AioRpcError as exc:
                retry = (
                    exc.code() is grpc.StatusCode.UNAVAILABLE
                    and not received
                    and attempt < self._retries
                )
                if not retry:
                    raise from_rpc_error(exc) from None
                attempt += 1
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            finally:
                call.cancel()


class PulledStream(_ResultReader):
    """``async for row in stream`` over ``StreamQuery``: the server sends result messages only as
    this side asks for them (``window`` ahead of what has been read), so a slow reader holds
    the server back instead of filling memory on either side. Leaving the loop early, or
    ``cancel()``, tells the server to stop the statement."""

    def __init__(self, start: Callable[[AsyncIterator[Any]], Any], first: Any, window: int):
        if window < 1:
            raise ValueError("window must be at least 1")
        self._start = start
        self._first = first
        self._window = window
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._call: Any = None
        self.columns: list[Column] = []
        self.summary: pb.ResultSummary | None = None
        self.messages = 0  # result messages received

    async def _requests(self) -> AsyncIterator[Any]:
        yield pb.StreamQueryRequest(start=self._first)
        yield pb.StreamQueryRequest(pull=self._window)
        while True:
            request = await self._outbox.get()
            if request is None:
                return
            yield request
            if request.HasField("cancel"):
                return

    async def _chunks(self) -> AsyncGenerator[list[tuple[Any, ...]], None]:
        self._call = self._start(self._requests())
        try:
            async for message in self._call:
                self.messages += 1
                yield self._read(message)
                if self.summary is not None:
                    return
                self._outbox.put_nowait(pb.StreamQueryRequest(pull=1))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            if self.summary is None:
                await self.cancel()
            else:
                self._outbox.put_nowait(None)

    async def cancel(self) -> None:
        """Stop the statement on the server (and the call)."""
        self._outbox.put_nowait(pb.StreamQueryRequest(cancel=True))
        if self._call is not None:
            await asyncio.sleep(0)  # let the cancel go out before the call is torn down
            self._call.cancel()


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _rows_of(chunk: pb.RowChunk, kinds: list[str]) -> list[tuple[Any, ...]]:
    """A chunk's rows, packed (one JSON decode) or as Value messages."""
    if chunk.packed:
        return unpack_rows(chunk.packed, kinds)
    return [from_row(row) for row in chunk.rows]


# A result past the service's limits, or a service older than the unary Query call.
_STREAM_INSTEAD = frozenset({"result_too_large", "unimplemented"})


class MultiDatabaseClient(GraphMethods, VectorMethods):
    """Talks to one Database Service for one tenant (and optionally one user).

    ``tenant_context`` is a tenant id, or a mapping with ``company_id`` (or ``tenant_id``) and
    optionally ``user_id`` — the seed's shape."""

    def __init__(
        self,
        host: str,
        tenant_context: Mapping[str, str] | str,
        token: str | None,
        *,
        timeout: float | None = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        tls: TlsOptions | bool | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 16 * 1_048_576,
        connections: int = 1,
    ) -> None:
        """``token``: the service's bearer token; None when a client certificate alone
        identifies it (``tls=TlsOptions(cert_file=..., key_file=...)``). ``tls``: True for
        TLS with the default trust roots, or ``TlsOptions``; ``credentials``: any other gRPC
        channel credentials. ``connections``: HTTP/2 connections to spread calls over (one
        connection is served by one of the service's workers)."""
        if isinstance(tenant_context, str):
            tenant_context = {"company_id": tenant_context}
        tenant = tenant_context.get("company_id") or tenant_context.get("tenant_id")
        if not tenant:
            raise ValueError("tenant_context needs a company_id (or tenant_id)")
        self.host = host
        self.tenant_id = tenant
        self.user_id = tenant_context.get("user_id")
        self.timeout = timeout
        self._token = token
        self._retries = retries
        self._backoff = backoff
        if tls is not None and credentials is not None:
            raise ValueError("give tls or credentials, not both")
        options = TlsOptions() if tls is True else tls or None
        self._credentials = options.credentials() if options is not None else credentials
        self._options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            *(options.channel_options() if options is not None else []),
        ]
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self._connections = connections
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[DatabaseServiceStub] = []
        self._next = 0
        self._stores: dict[str, str] | None = None
        self._multidb_stub: MultiDatabaseStub | None = None

    async def __aenter__(self) -> MultiDatabaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()

    def _open(self) -> None:
        # Each channel its own connection (a local subchannel pool): the service's workers
        # share its port and the kernel gives each connection to one of them.
        options = [*self._options, ("grpc.use_local_subchannel_pool", 1)]
        for _ in range(self._connections):
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(self.host, self._credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(self.host, options=options)
            self._channels.append(channel)
            self._stubs.append(DatabaseServiceStub(channel))

    @property
    def stub(self) -> DatabaseServiceStub:
        """The stub of the next connection (round robin over ``connections``)."""
        if not self._stubs:
            self._open()
        if self._connections == 1:
            return self._stubs[0]
        self._next = (self._next + 1) % self._connections
        return self._stubs[self._next]

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        metadata = [("x-tenant-id", self.tenant_id)]
        if self._token is not None:
            metadata.append(("authorization", f"Bearer {self._token}"))
        if self.user_id:
            metadata.append(("x-user-id", self.user_id))
        return tuple(metadata)

    async def _unary(
        self, call: Callable[..., Any], request: Any, *, retry: bool, timeout: float | None
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await call(
                    request, metadata=self._metadata(), timeout=timeout or self.timeout
                )
            except grpc.aio.AioRpcError as exc:
                if not (
                    retry and exc.code() is grpc.StatusCode.UNAVAILABLE and attempt < self._retries
                ):
                    raise from_rpc_error(exc) from None
                attempt += 1
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))

    def _stream(
        self, call: Callable[..., Any], request: Any, *, retry: bool, timeout: float | None
    ) -> QueryStream:
        return QueryStream(
            lambda: call(request, metadata=self._metadata(), timeout=timeout or self.timeout),
            self._retries if retry else 0,
            self._backoff,
        )

    # --- queries -----------------------------------------------------------------------------

    def execute_query(
        self,
        sql: str,
        params: Params = (),
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        max_chunk_bytes: int = 0,
    ) -> QueryStream:
        """Stream the rows of one statement: ``async for row in client.execute_query(...)``.

        ``params`` is a sequence (``$1``, ``$2``, ...) or a mapping (``:name`` placeholders)."""
        sql, values = bind(sql, params)
        request = pb.QueryRequest(
            sql=sql,
            params=[to_value(p) for p in values],
            max_chunk_bytes=max_chunk_bytes,
            row_encoding=pb.ROW_ENCODING_PACKED,
        )
        return self._stream(self.stub.ExecuteQuery, request, retry=idempotent, timeout=timeout)

    def stream_query(
        self,
        sql: str,
        params: Params = (),
        *,
        window: int = 4,
        max_chunk_bytes: int = 0,
        timeout: float | None = None,
    ) -> PulledStream:
        """Stream a large result with flow control (``StreamQuery``): at most ``window``
        messages of about ``max_chunk_bytes`` are in flight, the server's cursor waits for a
        slow reader, and breaking out of ``async for`` cancels the statement."""
        sql, values = bind(sql, params)
        first = pb.QueryRequest(
            sql=sql,
            params=[to_value(p) for p in values],
            max_chunk_bytes=max_chunk_bytes,
            row_encoding=pb.ROW_ENCODING_PACKED,
        )
        return PulledStream(
            lambda requests: self.stub.StreamQuery(
                requests, metadata=self._metadata(), timeout=timeout or self.timeout
            ),
            first,
            window,
        )

    async def fetch_all(
        self,
        sql: str,
        params: Params = (),
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        cache: dt.timedelta | None = None,
        allow_stale: bool = False,
    ) -> QueryResult:
        """The whole result of one statement, in one call (``Query``) when it is within the
        service's result limits; a larger one is streamed instead (``ExecuteQuery``): the
        service refused it having changed nothing.

        ``cache``: let the service answer a read from its result cache, and keep its result
        this long (capped by the service; a read it cannot cache safely runs as ever, and
        ``QueryResult.cache_reason`` says why). ``allow_stale``: while PostgreSQL is
        unreachable, take the last cached answer (``QueryResult.stale``) instead of an
        ``Unavailable`` error."""
        sql, values = bind(sql, params)
        request = pb.QueryRequest(
            sql=sql,
            params=[to_value(p) for p in values],
            row_encoding=pb.ROW_ENCODING_PACKED,
            cache_ttl_ms=0 if cache is None else max(1, int(cache.total_seconds() * 1000)),
            allow_stale=allow_stale,
        )
        try:
            message = await self._unary(self.stub.Query, request, retry=idempotent, timeout=timeout)
        except DatabaseServiceError as exc:
            if exc.code not in _STREAM_INSTEAD:
                raise
            stream = self._stream(
                self.stub.ExecuteQuery, request, retry=idempotent, timeout=timeout
            )
            return await stream.fetch_all()
        summary = message.summary
        columns = message.header.columns
        return QueryResult(
            columns=[Column(c.name, c.type) for c in columns],
            rows=_rows_of(message.rows, [c.kind for c in columns]),
            row_count=summary.row_count,
            command=summary.command,
            duration_ms=summary.duration_ms,
            cache=summary.cache,
            cache_reason=summary.cache_reason,
            cache_age_ms=summary.cache_age_ms,
            stale=summary.stale,
        )

    def analytics_query(
        self,
        sql: str,
        params: Params = (),
        *,
        engine: str = "",
        timeout: float | None = None,
    ) -> QueryStream:
        """A read-only query for analytics; streamed, retried on UNAVAILABLE.

        ``engine``: ``""`` (ClickHouse where the service has it enabled, else PostgreSQL),
        ``"clickhouse"`` (ClickHouse SQL over the tenant's replicated tables, no parameters) or
        ``"postgresql"`` (PostgreSQL SQL with parameters)."""
        sql, values = bind(sql, params)
        request = pb.AnalyticsQueryRequest(
            sql=sql,
            params=[to_value(p) for p in values],
            row_encoding=pb.ROW_ENCODING_PACKED,
            engine=engine,
        )
        return self._stream(self.stub.ExecuteAnalyticsQuery, request, retry=True, timeout=timeout)

    async def analytics_report(
        self,
        name: str,
        *,
        symbol: str | None = None,
        start: dt.datetime | None = None,
        end: dt.datetime | None = None,
        interval_minutes: int = 0,
        price_decimals: int | None = None,
        horizon_minutes: int = 0,
        timeout: float | None = None,
    ) -> QueryResult:
        """A ready-made report on ClickHouse: ``trading_performance``, ``market_trends``,
        ``volume_profile``, ``signal_performance`` or ``prediction_accuracy`` (the service's
        README says what each computes)."""
        request = apb.ReportRequest(
            name=name,
            symbol=symbol or "",
            interval_minutes=interval_minutes,
            horizon_minutes=horizon_minutes,
            row_encoding=pb.ROW_ENCODING_PACKED,
        )
        if price_decimals is not None:
            request.price_decimals = price_decimals
        if start is not None:
            request.start.FromDatetime(_aware(start))
        if end is not None:
            request.end.FromDatetime(_aware(end))
        if not self._stubs:
            self._open()
        stub = AnalyticsReportsStub(self._channels[0])
        message = await self._unary(stub.GetReport, request, retry=True, timeout=timeout)
        summary = message.summary
        columns = message.header.columns
        return QueryResult(
            columns=[Column(c.name, c.type) for c in columns],
            rows=_rows_of(message.rows, [c.kind for c in columns]),
            row_count=summary.row_count,
            command=summary.command,
            duration_ms=summary.duration_ms,
        )

    async def time_series(
        self,
        symbol: str,
        start: dt.datetime,
        end: dt.datetime,
        *,
        table: str = "trading_ticks",
        limit: int = 0,
        timeout: float | None = None,
    ) -> QueryResult:
        request = pb.TimeSeriesRequest(
            table=table, symbol=symbol, limit=limit, row_encoding=pb.ROW_ENCODING_PACKED
        )
        request.start.FromDatetime(_aware(start))
        request.end.FromDatetime(_aware(end))
        stream = self._stream(self.stub.GetTimeSeriesData, request, retry=True, timeout=timeout)
        return await stream.fetch_all()

    async def candles(
        self,
        symbol: str,
        start: dt.datetime,
        end: dt.datetime,
        interval: dt.timedelta = dt.timedelta(minutes=1),
        *,
        timezone: str = "UTC",
        origin: dt.datetime | None = None,
        gap_fill: bool = False,
        source: str = "auto",
        timeout: float | None = None,
    ) -> QueryResult:
        """OHLCV candles with VWAP and spread statistics: bucket, open, high, low, close, volume,
        ticks, vwap, spread_avg, spread_min, spread_max."""
        request = pb.TimeSeriesRequest(
            kind=pb.TIME_SERIES_KIND_CANDLES,
            symbol=symbol,
            interval_seconds=int(interval.total_seconds()),
            timezone=timezone,
            gap_fill=gap_fill,
            source=source,
            row_encoding=pb.ROW_ENCODING_PACKED,
        )
        request.start.FromDatetime(_aware(start))
        request.end.FromDatetime(_aware(end))
        if origin is not None:
            request.origin.FromDatetime(_aware(origin))
        stream = self._stream(self.stub.GetTimeSeriesData, request, retry=True, timeout=timeout)
        return await stream.fetch_all()

    async def last_ticks(self, since: dt.datetime, *, timeout: float | None = None) -> QueryResult:
        """The latest tick of every symbol since ``since``."""
        request = pb.TimeSeriesRequest(
            kind=pb.TIME_SERIES_KIND_LAST_TICK, row_encoding=pb.ROW_ENCODING_PACKED
        )
        request.start.FromDatetime(_aware(since))
        stream = self._stream(self.stub.GetTimeSeriesData, request, retry=True, timeout=timeout)
        return await stream.fetch_all()

    async def transaction(
        self,
        statements: Sequence[str | tuple[str, Params]],
        *,
        isolation: str = "read_committed",
        read_only: bool = False,
        timeout: float | None = None,
    ) -> list[StatementResult]:
        """Several statements atomically; on any error nothing is kept and the error is raised."""
        if isolation not in _ISOLATION:
            raise ValueError(f"isolation must be one of {', '.join(_ISOLATION)}")
        request = pb.TransactionRequest(isolation=_ISOLATION[isolation], read_only=read_only)
        for statement in statements:
            sql, params = (statement, ()) if isinstance(statement, str) else statement
            sql, values = bind(sql, params)
            request.statements.append(pb.Statement(sql=sql, params=[to_value(p) for p in values]))
        response = await self._unary(
            self.stub.ExecuteTransaction, request, retry=False, timeout=timeout
        )
        return [
            StatementResult(
                columns=[Column(c.name, c.type) for c in r.columns],
                rows=[from_row(row) for row in r.rows],
                row_count=r.row_count,
                command=r.command,
            )
            for r in response.results
        ]

    # --- bulk --------------------------------------------------------------------------------

    @staticmethod
    async def _batches(
        rows: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]], batch_size: int
    ) -> AsyncIterator[list[Sequence[Any]]]:
        batch: list[Sequence[Any]] = []
        if isinstance(rows, AsyncIterable):
            async for row in rows:
                batch.append(row)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        else:
            for row in rows:
                batch.append(row)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    async def bulk_insert(
        self,
        table: str,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]],
        *,
        batch_size: int = 1000,
        timeout: float | None = None,
    ) -> int:
        """Stream rows into ``table``; all or nothing. Returns the rows written.

        Batches go packed (one JSON array, see ``pack_rows``) unless they hold what JSON cannot
        carry (bytes, integers past 64 bits); those go as Values."""
        first = pb.BulkInsertRequest(table=table, columns=list(columns))
        sent = [0]
        requests = self._bulk_messages(first, rows, batch_size, sent)
        response = await self._unary(self.stub.BulkInsert, requests, retry=False, timeout=timeout)
        _check_packed_read(int(response.rows_sent), sent[0])
        return int(response.rows_written)

    async def _bulk_messages(
        self,
        first: T,
        rows: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]],
        batch_size: int,
        sent: list[int],
    ) -> AsyncIterator[T]:
        """``first``, then a message of the same type per batch: packed when JSON can carry
        the batch, else as Values. ``sent[0]`` counts the rows."""
        message: Any = type(first)
        yield first
        async for batch in self._batches(rows, batch_size):
            sent[0] += len(batch)
            packed = pack_rows(batch)
            if packed is not None:
                yield message(packed=packed)
            else:
                yield message(rows=[to_row(r) for r in batch])

    async def bulk_update(
        self,
        table: str,
        key_columns: Sequence[str],
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]],
        *,
        batch_size: int = 1000,
        timeout: float | None = None,
    ) -> int:
        """Each row: key values, then new values. All or nothing. Returns the rows updated."""
        first = pb.BulkUpdateRequest(
            table=table, key_columns=list(key_columns), columns=list(columns)
        )
        sent = [0]
        requests = self._bulk_messages(first, rows, batch_size, sent)
        response = await self._unary(self.stub.BulkUpdate, requests, retry=False, timeout=timeout)
        _check_packed_read(int(response.rows_sent), sent[0])
        return int(response.rows_updated)

    # --- schema and health -------------------------------------------------------------------

    async def create_tenant_schema(
        self, tenant_id: str, *, connection_limit: int = 0, statement_timeout_ms: int = 0
    ) -> dict[str, Any]:
        request = pb.SchemaRequest(
            tenant_id=tenant_id,
            connection_limit=connection_limit,
            statement_timeout_ms=statement_timeout_ms,
        )
        r = await self._unary(self.stub.CreateTenantSchema, request, retry=False, timeout=None)
        return {
            "tenant_id": r.tenant_id,
            "schema": r.schema,
            "role": r.role,
            "status": r.status,
            "created_at": r.created_at.ToDatetime(tzinfo=dt.UTC),
        }

    async def partitions(
        self,
        table: str = "",
        *,
        action: str = "list",
        partition: str = "",
        start: dt.datetime | None = None,
    ) -> list[dict[str, Any]]:
        """List partitions; ``action`` maintain/detach/attach needs admin over every tenant."""
        request = pb.PartitionRequest(
            table=table,
            action=getattr(pb, f"PARTITION_ACTION_{action.upper()}"),
            partition=partition,
        )
        if start is not None:
            request.start.FromDatetime(_aware(start))
        response = await self._unary(
            self.stub.ManagePartitions, request, retry=action == "list", timeout=None
        )
        return [
            {"parent": p.parent, "name": p.name, "bound": p.bound,
             "rows_estimate": p.rows_estimate, "bytes": p.bytes}
            for p in response.partitions
        ]  # fmt: skip

    async def health(self) -> dict[str, Any]:
        response = await self._unary(
            self.stub.HealthCheck, pb.HealthRequest(), retry=True, timeout=None
        )
        document: dict[str, Any] = json.loads(response.document_json)
        return document

    async def metrics(self) -> dict[str, Any]:
        response = await self._unary(
            self.stub.GetPerformanceMetrics, pb.MetricsRequest(), retry=True, timeout=None
        )
        document: dict[str, Any] = json.loads(response.document_json)
        return document

    # --- key-value (the seed's "dragonflydb") ------------------------------------------------

    async def _kv(
        self, request: pb.KeyValueRequest, *, retry: bool, timeout: float | None
    ) -> pb.KeyValueResponse:
        try:
            response: pb.KeyValueResponse = await self._unary(
                self.stub.KeyValue, request, retry=retry, timeout=timeout
            )
        except DatabaseServiceError as exc:
            if exc.code == "unimplemented":
                raise NotConfigured(
                    "this service does not run key-value operations (it is older than this"
                    " client); upgrade it",
                    code="not_configured",
                ) from None
            raise
        return response

    async def kv_get(self, key: Key, *, timeout: float | None = None) -> bytes | None:
        """The value of ``key`` in the tenant's key-value store, or None. Keys are the
        tenant's own: any bytes (a str is sent as UTF-8), 1 to 1024 of them."""
        request = pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_GET, key=_key(key))
        response = await self._kv(request, retry=True, timeout=timeout)
        return response.value if response.found else None

    async def kv_set(
        self,
        key: Key,
        value: str | bytes,
        *,
        ttl: dt.timedelta | None = None,
        timeout: float | None = None,
    ) -> None:
        """Store ``value`` (bytes, or a str as UTF-8; at most 1 MiB) under ``key``, expiring
        after ``ttl`` (kept until deleted when None)."""
        request = pb.KeyValueRequest(
            operation=pb.KEY_VALUE_OPERATION_SET, key=_key(key), value=_kv_value(value)
        )
        if ttl is not None:
            request.ttl_ms = _ttl_ms(ttl)
        await self._kv(request, retry=False, timeout=timeout)

    async def kv_delete(self, key: Key, *, timeout: float | None = None) -> bool:
        """Delete ``key``; whether it existed."""
        request = pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_DELETE, key=_key(key))
        return (await self._kv(request, retry=False, timeout=timeout)).found

    async def kv_incr(self, key: Key, by: int = 1, *, timeout: float | None = None) -> int:
        """Add ``by`` to the integer at ``key`` (a missing key counts from 0); the new value.
        A value that is not a 64-bit integer raises FailedPrecondition and is left as it is."""
        request = pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_INCR, key=_key(key), by=by)
        return int((await self._kv(request, retry=False, timeout=timeout)).number)

    async def kv_expire(self, key: Key, ttl: dt.timedelta, *, timeout: float | None = None) -> bool:
        """Let ``key`` expire after ``ttl``; whether the key exists."""
        request = pb.KeyValueRequest(
            operation=pb.KEY_VALUE_OPERATION_EXPIRE, key=_key(key), ttl_ms=_ttl_ms(ttl)
        )
        return (await self._kv(request, retry=False, timeout=timeout)).found

    async def kv_mget(
        self, keys: Sequence[Key], *, timeout: float | None = None
    ) -> list[bytes | None]:
        """The values of ``keys`` (at most 1000), in order; None for a missing key."""
        request = pb.KeyValueRequest(
            operation=pb.KEY_VALUE_OPERATION_MGET, keys=[_key(k) for k in keys]
        )
        response = await self._kv(request, retry=True, timeout=timeout)
        return [item.value if item.found else None for item in response.items]

    def _seed_kv(self, operation: Mapping[str, Any]) -> dict[str, Any]:
        """The seed's ``{"operation": "set", "key", "value", "ttl"}`` as the service's part,
        checked now (before anything of a multi-store operation is sent). ``ttl`` is in seconds
        (or a timedelta), ``ttl_ms`` in milliseconds; a ``value`` that is neither str nor bytes
        is stored as its JSON text (``1`` as ``"1"``, so ``incr`` counts on from it). Keys and
        values travel in base64: any bytes are a key or a value."""
        name = operation.get("operation")
        if name not in _KV_FIELDS:
            raise ValueError(
                f"the dragonflydb operation needs 'operation': one of {', '.join(_KV_FIELDS)}"
            )
        needed, optional = _KV_FIELDS[name]
        given = set(operation) - {"operation", "company_id", "tenant_id"}
        if needed - given or given - needed - optional:
            wanted = ", ".join(sorted(needed)) + "".join(f" [{f}]" for f in sorted(optional))
            raise ValueError(f"the dragonflydb {name} operation takes {wanted}")
        if "ttl" in given and "ttl_ms" in given:
            raise ValueError("give ttl (seconds) or ttl_ms, not both")
        ttl: dt.timedelta | None = None
        if "ttl" in given and operation["ttl"] is not None:
            seconds = operation["ttl"]
            ttl = seconds if isinstance(seconds, dt.timedelta) else dt.timedelta(seconds=seconds)
        elif "ttl_ms" in given and operation["ttl_ms"] is not None:
            ttl = dt.timedelta(milliseconds=operation["ttl_ms"])
        part: dict[str, Any] = {"operation": name}
        if ttl is not None:
            part["ttl_ms"] = _ttl_ms(ttl)  # refused now, not by the service
        if name == "mget":
            if isinstance(operation["keys"], str | bytes):
                raise ValueError("the dragonflydb mget operation's 'keys' is a list of keys")
            keys = [_key(k) for k in operation["keys"]]
            return {**part, "keys_base64": [base64.b64encode(k).decode() for k in keys]}
        part["key_base64"] = base64.b64encode(_key(operation["key"])).decode()
        if name == "incr":
            by = operation.get("by", 1)
            if isinstance(by, bool) or not isinstance(by, int):
                raise ValueError("the dragonflydb incr operation's 'by' must be an integer")
            part["by"] = by
        elif name == "expire" and ttl is None:
            raise ValueError("the dragonflydb expire operation needs a ttl")
        elif name == "set":
            value = operation["value"]
            raw = value if isinstance(value, str | bytes | bytearray) else json.dumps(value)
            part["value_base64"] = base64.b64encode(_kv_value(raw)).decode()
        return part

    # --- the seed's shape ----------------------------------------------------------------------

    async def stores(self) -> dict[str, str]:
        """The stores the service knows and each one's status (``not_configured`` for those
        this deployment does not have), from its health document; asked once per client."""
        if self._stores is None:
            document = await self.health()
            self._stores = {
                name: str(dependency.get("status", "unknown"))
                for name, dependency in document.get("dependencies", {}).items()
            }
        return self._stores

    async def execute_multi_db_operation(
        self, operations: Mapping[str, Mapping[str, Any]], *, timeout: float | None = None
    ) -> MultiDbResult:
        """The seed's ``{"postgresql": {...}, "dragonflydb": {...}, ...}`` call: one call to the
        service (``MultiDatabase.Execute``), which runs it as follows.

        Every part is checked before anything runs: an unknown store or one this deployment has
        not configured raises NotConfigured, a malformed part ValueError (checked here) or
        InvalidArgument (checked by the service, naming the part), a part naming another
        ``company_id``/``tenant_id`` than this client's tenant PermissionDenied.

        The ``postgresql`` part (``{"query": sql, "params": [...] or {...}}`` — a mapping binds
        ``:name``/``$name`` placeholders by name — or ``{"statements": [...]}``) runs in one
        transaction, and the writes of the other stores are recorded in a transactional outbox
        in that same transaction: if the PostgreSQL part fails its error is raised and nothing
        else happens. After the commit the service applies the outbox entries (retried in the
        background with backoff when a store is down, exactly once), and runs reads directly.

        Parts: ``dragonflydb`` ``{"operation": "set", "key", "value", "ttl"}`` (``ttl``
        seconds, ``ttl_ms`` milliseconds; a value neither bytes nor str is stored as its JSON
        text), ``get``, ``delete``, ``incr`` (``by``), ``expire`` (``ttl``), ``mget``
        (``keys``); ``clickhouse`` ``{"query": sql}`` (a read; writes are refused as
        ``not_supported`` in this build); ``vector`` (or ``weaviate``) ``{"operation":
        "upsert", "class", "objects"}``, ``delete`` (``ids`` or ``where``),
        ``similarity_search`` (``vector``, ``limit``, ``certainty``...); ``graph`` (or
        ``arangodb``) ``{"operation": "upsert", "vertices", "edges"}``, ``delete``
        (``vertex_id`` or ``edge_id``), ``traverse`` (``start``, ``max_depth``...).

        The answer maps each part to its result — a QueryResult for ``postgresql`` (a list of
        StatementResult for ``statements``) and ``clickhouse``; for ``dragonflydb`` the value
        (bytes or None), True for set, whether the key existed (delete, expire), the new number
        (incr), the list of values (mget); the store's answer for the others — or None when the
        part is not applied: ``result.outcomes[name]`` says ``applied``, ``pending`` (the
        service applies it later) or ``failed`` (``reason``)."""
        parts: dict[str, dict[str, Any]] = {}
        for name, operation in operations.items():
            for field_name in ("company_id", "tenant_id"):
                company = operation.get(field_name)
                if company is not None and company != self.tenant_id:
                    raise PermissionDenied(
                        f"the {name} operation names company {company!r}, but this client acts"
                        f" for {self.tenant_id!r}",
                        code="permission_denied",
                    )
            part = {k: v for k, v in operation.items() if k not in ("company_id", "tenant_id")}
            if name in ("dragonflydb", "redis"):
                part = self._seed_kv(operation)
            elif name == "postgresql":
                _check_sql_part(part)
            parts[name] = part
        if not self._stubs:
            self._open()
        stub = self._multidb_stub
        if stub is None:
            stub = self._multidb_stub = MultiDatabaseStub(self._channels[0])
        request = mpb.MultiDbRequest(
            operation_json=json.dumps(parts, default=_json_default).encode()
        )
        response = await self._unary(stub.Execute, request, retry=False, timeout=timeout)
        answer = json.loads(response.result_json)
        result = MultiDbResult(operation_id=answer.get("operation_id", ""))
        for name, document in answer.get("stores", {}).items():
            outcome = StoreOutcome(
                status=document.get("status", ""),
                reason=document.get("reason"),
                code=document.get("code"),
                atomic=bool(document.get("atomic", False)),
                entry_id=document.get("entry_id"),
                raw=document.get("result"),
            )
            result.outcomes[name] = outcome
            result[name] = _store_result(name, parts.get(name, {}), outcome)
        return result


class StoreOutcome:
    """What became of one part of a multi-store operation: ``status`` is ``applied``,
    ``pending`` (recorded; the service applies it later) or ``failed`` (``reason``, ``code``);
    ``atomic``: committed with the PostgreSQL part; ``entry_id``: its outbox entry; ``raw``:
    the store's answer as the service sent it."""

    __slots__ = ("atomic", "code", "entry_id", "raw", "reason", "status")

    def __init__(
        self,
        *,
        status: str,
        reason: str | None = None,
        code: str | None = None,
        atomic: bool = False,
        entry_id: int | None = None,
        raw: Any = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.code = code
        self.atomic = atomic
        self.entry_id = entry_id
        self.raw = raw

    def __repr__(self) -> str:
        return f"StoreOutcome(status={self.status!r}, reason={self.reason!r})"


class MultiDbResult(dict[str, Any]):
    """Part name → its result (None unless applied); ``outcomes`` says per part whether it was
    applied, is pending or failed; ``operation_id`` names the call in the outbox."""

    def __init__(self, *, operation_id: str) -> None:
        super().__init__()
        self.operation_id = operation_id
        self.outcomes: dict[str, StoreOutcome] = {}

    @property
    def pending(self) -> list[str]:
        return [n for n, o in self.outcomes.items() if o.status == "pending"]

    @property
    def failed(self) -> list[str]:
        return [n for n, o in self.outcomes.items() if o.status == "failed"]


def _check_sql_part(part: Mapping[str, Any]) -> None:
    """A ``postgresql`` part's params checked here as ``fetch_all`` checks them (a mapping must
    bind by name, never by its keys); the service binds them again itself."""
    if "query" in part:
        bind(part["query"], part.get("params"))
    elif "statements" not in part:
        raise ValueError("the postgresql operation needs 'query' or 'statements'")


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)  # Decimal, UUID: their text, which PostgreSQL reads exactly


def _query_result(document: Mapping[str, Any]) -> QueryResult:
    columns = document.get("columns", [])
    rows = unpack_rows(json.dumps(document.get("rows", [])).encode(), [c["kind"] for c in columns])
    return QueryResult(
        columns=[Column(c["name"], c["type"]) for c in columns],
        rows=rows,
        row_count=int(document.get("row_count", len(rows))),
        command=str(document.get("command", "")),
        duration_ms=0.0,
    )


def _store_result(name: str, part: Mapping[str, Any], outcome: StoreOutcome) -> Any:
    """A part's result as the old client-side calls returned it."""
    raw = outcome.raw
    if outcome.status != "applied":
        return None
    if name in ("postgresql", "clickhouse") and isinstance(raw, Mapping):  # a read's rows
        if "statements" in raw:
            return [
                StatementResult(r.columns, r.rows, r.row_count, r.command)
                for r in map(_query_result, raw["statements"])
            ]
        return _query_result(raw)
    if name in ("dragonflydb", "redis"):
        operation = part.get("operation")
        if operation == "get":
            return None if raw is None else base64.b64decode(raw)
        if operation == "mget":
            return [None if v is None else base64.b64decode(v) for v in raw]
        return raw
    return raw


def _key(key: Key) -> bytes:
    """A key-value key as sent: bytes as they are, a str as UTF-8."""
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise TypeError(f"a key is str or bytes, not {type(key).__name__}")


def _kv_value(value: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"a value is str or bytes, not {type(value).__name__}")


def _ttl_ms(ttl: dt.timedelta) -> int:
    """A TTL in whole milliseconds (rounded up, so a short positive TTL is never 0)."""
    if not isinstance(ttl, dt.timedelta):
        raise TypeError(f"a ttl is a timedelta, not {type(ttl).__name__}")
    if ttl <= dt.timedelta(0):
        raise ValueError("a ttl must be positive")
    return -(-(ttl // dt.timedelta(microseconds=1)) // 1000)


def _check_packed_read(read: int, sent: int) -> None:
    """A server older than packed bulk rows ignores them (an unknown field) and reads fewer rows
    than were sent: say so instead of returning a short count as if it were the answer."""
    if read != sent:
        raise FailedPrecondition(
            f"the service read {read} of the {sent} rows sent: it is older than this client"
            " (packed bulk rows); upgrade the service",
            code="version_mismatch",
        )
