"""OpenTelemetry traces, exported over OTLP/gRPC: off, and free, unless an endpoint is set.

On (``DBSVC_OTEL_EXPORTER_OTLP_ENDPOINT``, or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``
keep it off), a ``Tracing`` has a TracerProvider of its own with a batching OTLP exporter (the
exporter and the batch processor read the other ``OTEL_*`` variables: headers, certificates,
timeouts, ``OTEL_BSP_*``; the sampler reads ``OTEL_TRACES_SAMPLER``), installs asyncpg's
instrumentation, and hands out the gRPC server interceptor and the FastAPI instrumentation that
continue a caller's W3C ``traceparent``. Its ``spans`` (``Spans``) make the service's own spans:
authorization, the SQL guard, pool acquisition, the statement, ingestion batches.

Off, nothing of OpenTelemetry is even imported: no provider, no instrumentation, no interceptor;
components hold ``spans = None`` and test that before any span work (a no-op tracer's span
still costs microseconds a call; the query path takes about a millisecond).

The provider is never made the global one: OpenTelemetry lets a process set that once, and a
process may build several Applications (the tests do); it is passed to each instrumentation
instead. asyncpg's instrumentation patches the driver's classes, so it is the process's: the
Tracing that installs it removes it at shutdown, and another one meanwhile leaves it alone.

What never leaves the process: SQL parameter values. asyncpg's instrumentation is told not to
capture them and the service's spans never carry them; and since an error message may quote a
value (PostgreSQL's "invalid input syntax for type integer: ...", asyncpg's encoding errors),
spans are exported without exception messages, stack traces or status descriptions: the
exception's type and the service's error code (``error.type``) remain. Statement text is kept
(placeholders, not values), cut at 4 KB on export unless ``OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT``
says otherwise (the SDK's own limit would log a warning for every value it cuts).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from database_service import __version__
from database_service.errors import DatabaseServiceError, QueryError

if TYPE_CHECKING:
    import grpc
    from fastapi import FastAPI
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Link, Span, SpanKind, Tracer, TraceState
    from opentelemetry.util.types import Attributes

    from database_service.config import Settings

__all__ = [
    "AUTHORIZE",
    "DB_OPERATION",
    "DB_STATEMENT",
    "DB_SYSTEM",
    "INGEST_BATCH",
    "INGEST_MESSAGES",
    "INGEST_RECORDS",
    "INGEST_SOURCE",
    "INGEST_TENANTS",
    "INGEST_WRITE",
    "POOL_ACQUIRE",
    "POSTGRESQL",
    "SQL_GUARD",
    "STATEMENT",
    "STATEMENT_CLASS",
    "TENANT_ID",
    "SpanScope",
    "Spans",
    "Tracing",
]

log = logging.getLogger(__name__)

# The service's spans.
AUTHORIZE = "dbsvc.authorize"  # QueryExecutor.authorize: tenant, guard, scopes
SQL_GUARD = "dbsvc.sql_guard"  # the guard's classification, inside AUTHORIZE
POOL_ACQUIRE = "dbsvc.pool.acquire"  # a tenant connection (TenantPools.acquire)
STATEMENT = "dbsvc.statement"  # one statement of a caller's, prepare to last row
INGEST_BATCH = "dbsvc.ingest.batch"  # a batch pulled from NATS or Kafka, decode to commit
INGEST_WRITE = "dbsvc.ingest.write"  # one tenant's records of a batch, retries included

# Their attributes (OpenTelemetry's names where it has one).
TENANT_ID = "tenant.id"
STATEMENT_CLASS = "db.statement.class"  # the guard's verdict: read, write, ddl
DB_SYSTEM = "db.system"
POSTGRESQL = "postgresql"
DB_OPERATION = "db.operation"  # the command tag: SELECT, INSERT, CREATE TABLE, ...
DB_STATEMENT = "db.statement"  # the text, with placeholders: never a parameter's value
ERROR_TYPE = "error.type"  # the service's error code, "cancelled", or the exception's type
INGEST_SOURCE = "messaging.system"  # nats, kafka
INGEST_MESSAGES = "messaging.batch.message_count"
INGEST_RECORDS = "dbsvc.ingest.records"
INGEST_TENANTS = "dbsvc.ingest.tenants"

# Probes and scrapers call these every few seconds: a trace each would bury the requests.
_QUIET_HTTP = "/health$,/api/v1/health$,/metrics$"
_QUIET_GRPC = ("grpc.health.v1.Health", "grpc.reflection.")
_TEXT_LIMIT = 4096  # characters of a text attribute (a statement's) exported
# Exception event attributes kept on export (message and stack trace may quote a value).
_KEPT_EXCEPTION_ATTRIBUTES = frozenset({"exception.type", "exception.escaped"})
_PARAMETERS = "db.statement.parameters"  # asyncpg's, were anyone to turn capturing on

Kind = Literal["internal", "client", "consumer"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


class Tracing:
    """Traces for one Application: built by the composition root, shut down with it.

    ``Tracing()`` is off; ``Tracing(exporter)`` is on, exporting through ``exporter`` (the
    composition root's is OTLP/gRPC; tests may give another)."""

    def __init__(
        self, exporter: SpanExporter | None = None, *, service_name: str = "database-service"
    ) -> None:
        self.spans: Spans | None = None
        self._provider: TracerProvider | None = None
        self._owns_asyncpg = False
        self._apps: list[FastAPI] = []
        if exporter is not None:
            self._start(exporter, service_name)

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing:
        env = os.environ
        endpoint = settings.otel_exporter_otlp_endpoint
        configured = endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        configured = configured or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        exporter_kind = env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        if not configured or _env_true("OTEL_SDK_DISABLED") or exporter_kind == "none":
            return cls()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        # Ours when set explicitly, else the standard variable, else our default.
        name = settings.otel_service_name
        if "otel_service_name" not in settings.model_fields_set:
            name = env.get("OTEL_SERVICE_NAME") or name
        # Without our endpoint the exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
        return cls(OTLPSpanExporter(endpoint=endpoint), service_name=name)

    @property
    def enabled(self) -> bool:
        return self._provider is not None

    def _start(self, exporter: SpanExporter, service_name: str) -> None:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor  # noqa: PLC0415
        from opentelemetry.sdk.resources import (  # noqa: PLC0415
            SERVICE_INSTANCE_ID,
            SERVICE_NAME,
            Resource,
        )
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

        detected = Resource.create()  # OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME, the SDK's
        ours: dict[str, str] = {SERVICE_NAME: service_name}
        if SERVICE_INSTANCE_ID not in detected.attributes:
            ours[SERVICE_INSTANCE_ID] = str(uuid.uuid4())  # each worker process is an instance
        provider = TracerProvider(
            resource=detected.merge(Resource(ours)),
            shutdown_on_exit=False,  # ``shutdown`` does it; an atexit hook would hold us
        )
        provider.sampler = _requests_only(provider.sampler)  # before any tracer is made
        provider.add_span_processor(BatchSpanProcessor(_redacting(exporter, _text_limit())))
        self._provider = provider
        self.spans = Spans(provider.get_tracer("database_service", __version__))
        instrumentor = AsyncPGInstrumentor(capture_parameters=False)  # type: ignore[no-untyped-call]
        if instrumentor.is_instrumented_by_opentelemetry:
            log.warning(
                "asyncpg is traced already (another Application in this process): its spans"
                " go to that one's exporter"
            )
        else:
            instrumentor.instrument(tracer_provider=provider)
            self._owns_asyncpg = True
        log.info("traces on: service %s, exported by %s", service_name, type(exporter).__name__)

    def grpc_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """For ``grpc.aio.server(interceptors=...)``: a server span per call, continuing the
        caller's ``traceparent`` metadata (none when off; health checks and reflection never)."""
        if self._provider is None:
            return []
        from opentelemetry.instrumentation.grpc import (  # noqa: PLC0415
            aio_server_interceptor,
            filters,
        )

        quiet = filters.any_of(*(filters.service_prefix(p) for p in _QUIET_GRPC))
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self._provider, filter_=filters.negate(quiet)
        )
        return [interceptor]

    def instrument_http(self, app: FastAPI) -> None:
        """A server span per HTTP request, continuing the caller's ``traceparent`` header
        (nothing when off; health and metrics unless ``OTEL_PYTHON_*_EXCLUDED_URLS`` say)."""
        if self._provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415

        env = os.environ
        from_env = env.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") or env.get(
            "OTEL_PYTHON_EXCLUDED_URLS"
        )
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self._provider,
            excluded_urls=None if from_env else _QUIET_HTTP,
            exclude_spans=["receive", "send"],  # a span per ASGI message is noise here
        )
        self._apps.append(app)

    async def shutdown(self) -> None:
        """Remove the instrumentation and export what is left (off: nothing to do)."""
        provider, self._provider = self._provider, None
        self.spans = None
        if provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415

        for app in self._apps:
            FastAPIInstrumentor.uninstrument_app(app)
        self._apps.clear()
        if self._owns_asyncpg:
            from opentelemetry.instrumentation.asyncpg import (  # noqa: PLC0415
                AsyncPGInstrumentor,
            )

            AsyncPGInstrumentor().uninstrument()  # type: ignore[no-untyped-call]
            self._owns_asyncpg = False
        # The last export may wait for a slow collector: not on the event loop.
        await asyncio.to_thread(provider.shutdown)


class Spans:
    """The service's own spans; exists only while tracing is on.

    Everything OpenTelemetry is looked up once here, so that a span costs what the SDK takes
    and no import or attribute lookup more."""

    def __init__(self, tracer: Tracer) -> None:
        from opentelemetry import context, propagate, trace  # noqa: PLC0415

        self._tracer = tracer
        self._attach = context.attach
        self._detach = context.detach
        self._in_context = trace.set_span_in_context
        self._span_of = trace.get_current_span
        self._extract = propagate.extract
        self._link = trace.Link
        self._kinds = {
            "internal": trace.SpanKind.INTERNAL,
            "client": trace.SpanKind.CLIENT,
            "consumer": trace.SpanKind.CONSUMER,
        }
        self._error = trace.Status(trace.StatusCode.ERROR)
        # The headers the configured propagators read (traceparent, tracestate, baggage).
        self.fields = frozenset(propagate.get_global_textmap().fields)

    def scope(
        self, name: str, attributes: Attributes, *, kind: Kind = "internal", current: bool = True
    ) -> SpanScope:
        """A span for a ``with`` (or ``async with``) block, a child of the current one."""
        span = self._tracer.start_span(name, kind=self._kinds[kind], attributes=attributes)
        return SpanScope(self, span, current=current, end=True)

    def pool_acquire(self, tenant_id: str) -> SpanScope:
        """For ``TenantPools``, which cannot import this module's names (a cycle)."""
        return self.scope(POOL_ACQUIRE, {TENANT_ID: tenant_id, DB_SYSTEM: POSTGRESQL})

    def use(self, span: Span, *, end: bool = False) -> SpanScope:
        """``span`` made current for a block (ended with it only when ``end``)."""
        return SpanScope(self, span, current=True, end=end)

    def failed(self, span: Span, exc: BaseException) -> None:
        """Mark ``span`` failed by ``exc``: its code, never its message (see the module)."""
        sqlstate = getattr(exc, "sqlstate", None)
        if isinstance(exc, DatabaseServiceError):
            code = exc.error_code
        elif isinstance(sqlstate, str):  # PostgreSQL's, not translated yet: as it will be
            code = QueryError("", sqlstate=sqlstate).error_code
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            code = "cancelled"
        else:
            code = type(exc).__qualname__
        span.set_attribute(ERROR_TYPE, code)
        span.set_status(self._error)

    def carrier(self, headers: Iterable[tuple[str, str | bytes]]) -> dict[str, str] | None:
        """The trace context headers of a message (NATS: a dict's items; Kafka: its list of
        pairs), by lower-case name; None when it has none."""
        found: dict[str, str] = {}
        for key, value in headers:
            name = key.lower()
            if name in self.fields:
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                found[name] = text
        return found or None

    def batch(
        self, transport: str, carriers: Sequence[Mapping[str, str] | None], messages: int
    ) -> Span:
        """The span of an ingestion batch, not yet current: a child of the first message's
        trace context, linked to every other one (a batch may gather several publishers)."""
        parent = None
        links = []
        seen: set[tuple[int, int]] = set()
        for carrier in carriers:
            if not carrier:
                continue
            found = self._extract(carrier)
            remote = self._span_of(found).get_span_context()
            key = (remote.trace_id, remote.span_id)
            if not remote.is_valid or key in seen:
                continue
            seen.add(key)
            if parent is None:
                parent = found
            else:
                links.append(self._link(remote))
        return self._tracer.start_span(
            INGEST_BATCH,
            context=parent,
            kind=self._kinds["consumer"],
            links=links,
            attributes={INGEST_SOURCE: transport, INGEST_MESSAGES: messages},
        )


class SpanScope:
    """A span for a block: made current while it runs and ended after it (``Spans.scope``).

    ``current=False``: only ended. For a block that yields to its caller (an async generator):
    a context attached before a ``yield`` and detached after it could be detached in another
    context (a generator closed by the event loop's finalizer), which OpenTelemetry refuses."""

    __slots__ = ("_end", "_spans", "_token", "current", "span")

    def __init__(self, spans: Spans, span: Span, *, current: bool, end: bool) -> None:
        self._spans = spans
        self.span = span
        self.current = current
        self._end = end
        self._token: Any = None

    def __enter__(self) -> Span:
        if self.current:
            spans = self._spans
            self._token = spans._attach(spans._in_context(self.span))
        return self.span

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None:
                self._spans.failed(self.span, exc)
        finally:
            if self._token is not None:
                self._spans._detach(self._token)
                self._token = None
            if self._end:
                self.span.end()

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(kind, exc, tb)


def _requests_only(inner: Sampler) -> Sampler:
    """``inner``, but a client span (a driver call) that would start a trace is dropped: the
    statements run outside any request or batch (migrations at start, partition maintenance,
    lookups of background loops) would otherwise each be a trace of one span."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult  # noqa: PLC0415
    from opentelemetry.trace import SpanKind, get_current_span  # noqa: PLC0415

    class RequestsOnly(Sampler):
        def should_sample(
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            parent = get_current_span(parent_context).get_span_context()
            if kind is SpanKind.CLIENT and not parent.is_valid:
                return SamplingResult(Decision.DROP)
            return inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return f"RequestsOnly{{{inner.get_description()}}}"

    return RequestsOnly()


def _text_limit() -> int:
    try:
        return int(os.environ.get("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", _TEXT_LIMIT))
    except ValueError:
        return _TEXT_LIMIT


def _redacting(exporter: SpanExporter, text_limit: int) -> SpanExporter:
    """``exporter``, given spans without what may quote a value (exception messages and stack
    traces, status descriptions, captured statement parameters) and with no text attribute
    longer than ``text_limit`` (statements of a megabyte would make exports fail)."""
    from opentelemetry.sdk.trace import Event, ReadableSpan  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: PLC0415
    from opentelemetry.trace import Status  # noqa: PLC0415

    def long(value: object) -> bool:
        return isinstance(value, str) and len(value) > text_limit

    def redacted(span: ReadableSpan) -> ReadableSpan:
        attributes = span.attributes or {}
        exceptions = any(e.name == "exception" for e in span.events)
        too_long = any(long(v) for v in attributes.values())
        if not (exceptions or too_long or span.status.description or _PARAMETERS in attributes):
            return span  # the common case: exported as it is
        events = [
            Event(
                e.name,
                {k: v for k, v in (e.attributes or {}).items() if k in _KEPT_EXCEPTION_ATTRIBUTES},
                e.timestamp,
            )
            if e.name == "exception"
            else e
            for e in span.events
        ]
        return ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes={
                k: v[:text_limit] if long(v) else v  # type: ignore[index]
                for k, v in attributes.items()
                if k != _PARAMETERS
            },
            events=events,
            links=span.links,
            kind=span.kind,
            status=Status(span.status.status_code),
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    class Redacting(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return exporter.export([redacted(s) for s in spans])

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30_000) -> bool:
            return exporter.force_flush(timeout_millis)

    return Redacting()
