"""Tracing without a collector: off by default and then nothing is installed; on, what the
settings and the standard OTEL_* variables decide, trace context read from message headers, a
batch's span continuing its publishers' traces, and what never leaves the process (exception
messages, status descriptions, statement parameters). Spans are read from an in-memory exporter
after ``shutdown`` (which exports what is left)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from database_service.config import Settings
from database_service.errors import PermissionDenied
from database_service.observability import tracing as t
from database_service.observability.tracing import Spans, Tracing

SECRET = "secret-param-7731"
_OTEL_VARIABLES = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    "DBSVC_OTEL_EXPORTER_OTLP_ENDPOINT",
    "DBSVC_OTEL_SERVICE_NAME",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in _OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    # Every test shuts down what it turned on: asyncpg is the process's, not the test's.
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry


def asyncpg_traced() -> bool:
    return hasattr(asyncpg.connection.Connection.execute, "__wrapped__")


def traceparent() -> tuple[str, int, int]:
    trace_id, span_id = secrets.randbits(128), secrets.randbits(64)
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


@pytest.fixture
async def memory() -> AsyncIterator[tuple[Tracing, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter, service_name="unit")
    try:
        yield tracing, exporter
    finally:
        await tracing.shutdown()


def spans_of(tracing: Tracing) -> Spans:
    assert tracing.spans is not None
    return tracing.spans


async def exported(tracing: Tracing, exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    await tracing.shutdown()
    return {span.name: span for span in exporter.get_finished_spans()}


# -- off ---------------------------------------------------------------------------------------


async def test_without_an_endpoint_nothing_is_installed() -> None:
    tracing = Tracing.from_settings(Settings())
    assert not tracing.enabled and tracing.spans is None
    assert tracing.grpc_interceptors() == []
    app = FastAPI()
    tracing.instrument_http(app)
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert not asyncpg_traced()
    await tracing.shutdown()


@pytest.mark.parametrize(
    ("variable", "value"), [("OTEL_SDK_DISABLED", "true"), ("OTEL_TRACES_EXPORTER", "none")]
)
async def test_the_standard_switches_keep_it_off(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    tracing = Tracing.from_settings(Settings(otel_exporter_otlp_endpoint="http://127.0.0.1:9"))
    assert not tracing.enabled


# -- on ----------------------------------------------------------------------------------------


async def test_the_standard_endpoint_variable_turns_it_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    tracing = Tracing.from_settings(Settings())
    try:
        assert tracing.enabled and tracing.spans is not None
        assert len(tracing.grpc_interceptors()) == 1
        assert asyncpg_traced()
        assert AsyncPGInstrumentor().capture_parameters is False
        app = FastAPI()
        tracing.instrument_http(app)
        assert app._is_instrumented_by_opentelemetry  # type: ignore[attr-defined]
    finally:
        await tracing.shutdown()
    assert not asyncpg_traced()
    assert not app._is_instrumented_by_opentelemetry  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("ours", "standard", "expected"),
    [
        (None, None, "database-service"),
        (None, "from-otel", "from-otel"),
        ("from-dbsvc", "from-otel", "from-dbsvc"),
    ],
)
async def test_the_service_name_is_ours_if_set_else_the_standard_one(
    monkeypatch: pytest.MonkeyPatch, ours: str | None, standard: str | None, expected: str
) -> None:
    if standard is not None:
        monkeypatch.setenv("OTEL_SERVICE_NAME", standard)
    values = {"otel_exporter_otlp_endpoint": "http://127.0.0.1:9"}
    if ours is not None:
        values["otel_service_name"] = ours
    tracing = Tracing.from_settings(Settings(**values))  # type: ignore[arg-type]
    try:
        assert tracing._provider is not None
        resource = tracing._provider.resource.attributes
        assert resource["service.name"] == expected
        assert resource["service.instance.id"]
    finally:
        await tracing.shutdown()


async def test_a_second_tracing_leaves_asyncpg_to_the_first() -> None:
    first, second = Tracing(InMemorySpanExporter()), Tracing(InMemorySpanExporter())
    await second.shutdown()
    assert asyncpg_traced()  # still the first one's
    await first.shutdown()
    assert not asyncpg_traced()


# -- trace context from messages ---------------------------------------------------------------


async def test_trace_headers_are_read_from_nats_and_kafka_headers(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    spans = spans_of(memory[0])
    header = traceparent()[0]
    nats = {"Authorization": "Bearer x", "TraceParent": header, "Nats-Msg-Id": "1"}
    assert spans.carrier(nats.items()) == {"traceparent": header}
    kafka = [
        ("authorization", b"Bearer x"),
        ("traceparent", header.encode()),
        ("tracestate", b"a=1"),
    ]
    assert spans.carrier(kafka) == {"traceparent": header, "tracestate": "a=1"}
    assert spans.carrier([("authorization", b"Bearer x")]) is None
    assert spans.carrier(()) is None


async def test_a_batch_continues_its_first_publishers_trace_and_links_the_others(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = memory
    first, first_trace, first_span = traceparent()
    other, other_trace, other_span = traceparent()
    carriers = [None, {"traceparent": first}, {"traceparent": other}, {"traceparent": first}]
    spans_of(tracing).batch("nats", carriers, messages=4).end()
    spans_of(tracing).batch("kafka", [None, {"traceparent": "garbage"}], messages=2).end()
    await tracing.shutdown()
    found = {s.attributes[t.INGEST_SOURCE]: s for s in exporter.get_finished_spans()}
    batch = found["nats"]
    assert batch.kind is trace.SpanKind.CONSUMER
    assert batch.parent is not None and batch.parent.is_remote
    assert (batch.context.trace_id, batch.parent.span_id) == (first_trace, first_span)
    assert [(link.context.trace_id, link.context.span_id) for link in batch.links] == [
        (other_trace, other_span)
    ]
    assert batch.attributes[t.INGEST_MESSAGES] == 4
    lonely = found["kafka"]
    assert lonely.parent is None and not lonely.links


# -- the service's spans -----------------------------------------------------------------------


async def test_a_scope_is_current_while_it_runs_unless_told_otherwise(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exporter = memory
    spans = spans_of(tracing)
    with spans.scope("dbsvc.outer", {}) as outer:
        assert trace.get_current_span() is outer
        async with spans.scope("dbsvc.detached", {}, current=False):
            assert trace.get_current_span() is outer
        with spans.scope("dbsvc.inner", {}):
            pass
    assert trace.get_current_span() is trace.INVALID_SPAN
    found = await exported(tracing, exporter)
    outer_id = found["dbsvc.outer"].context.span_id
    assert found["dbsvc.inner"].parent.span_id == outer_id  # type: ignore[union-attr]
    assert found["dbsvc.detached"].parent.span_id == outer_id  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PermissionDenied(f"no: {SECRET}"), "permission_denied"),
        (asyncpg.UniqueViolationError(f"Key (body)=({SECRET}) already exists"), "unique_violation"),
        (asyncio.CancelledError(), "cancelled"),
        (ValueError(SECRET), "ValueError"),
    ],
)
async def test_a_failed_scope_names_the_error_by_its_code_never_its_message(
    memory: tuple[Tracing, InMemorySpanExporter], error: BaseException, code: str
) -> None:
    tracing, exporter = memory
    with pytest.raises(type(error)), spans_of(tracing).scope("dbsvc.failing", {}):
        raise error
    span = (await exported(tracing, exporter))["dbsvc.failing"]
    assert span.attributes["error.type"] == code
    assert span.status.status_code is trace.StatusCode.ERROR
    assert not span.status.description and not span.events


async def test_a_driver_call_outside_any_request_is_not_traced(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    """Start-up migrations, partition maintenance, background lookups: no trace of one span."""
    tracing, exporter = memory
    spans = spans_of(tracing)
    with spans.scope("SELECT", {}, kind="client") as alone:
        assert not alone.is_recording()
    with spans.scope("dbsvc.request", {}), spans.scope("INSERT", {}, kind="client") as inside:
        assert inside.is_recording()
    assert set(await exported(tracing, exporter)) == {"dbsvc.request", "INSERT"}


async def test_what_may_quote_a_value_is_not_exported(
    memory: tuple[Tracing, InMemorySpanExporter],
) -> None:
    """Instrumentations record exceptions with their message and stack, and set status
    descriptions from them; the exporter gets neither, nor captured parameters, nor a
    statement's text past 4 KB."""
    tracing, exporter = memory
    assert tracing._provider is not None
    tracer = tracing._provider.get_tracer("an.instrumentation")
    with tracer.start_as_current_span("dbsvc.request"):
        with pytest.raises(ValueError), tracer.start_as_current_span("INSERT") as span:
            span.set_attribute("db.statement", "INSERT INTO t VALUES ($1)")
            span.set_attribute("db.statement.parameters", f"('{SECRET}',)")
            raise ValueError(f"invalid input: {SECRET}")
        with tracer.start_as_current_span("SELECT") as span:
            span.set_attribute("db.statement", "SELECT " + "x, " * 5000 + "1")
    found = await exported(tracing, exporter)
    failed = found["INSERT"]
    assert failed.attributes == {"db.statement": "INSERT INTO t VALUES ($1)"}
    (event,) = failed.events
    assert event.name == "exception"
    assert dict(event.attributes or {}) == {
        "exception.type": "ValueError",
        "exception.escaped": "False",
    }
    assert failed.status.status_code is trace.StatusCode.ERROR and not failed.status.description
    assert len(found["SELECT"].attributes["db.statement"]) == 4096  # type: ignore[arg-type]
