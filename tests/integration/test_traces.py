"""Traces, as a collector receives them (``tests/fix_otlp.py``): a caller's W3C ``traceparent``
continued over gRPC, HTTP, NATS and Kafka; spans for authorization, the SQL guard, pool
acquisition, the statement and asyncpg's calls, with tenant and statement class; never a
parameter's value, not even in an error quoting it. Off (no endpoint), nothing is installed and
no span is made."""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import nats
import opentelemetry.context.contextvars_context
import opentelemetry.sdk.trace
import opentelemetry.trace
import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service.observability import tracing
from database_service.tenancy import TenantRecord
from database_service_client import MultiDatabaseClient, tick
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto import ingest_pb2
from database_service_client.values import to_value
from tests.fix_ingest import IngestEnv
from tests.fix_otlp import CLIENT, CONSUMER, SERVER, OtlpReceiver, Received
from tests.fix_pg import PgCluster
from tests.fix_service import ClientFactory, TenantFactory, TokenFactory, make_settings

SECRET = "secret-param-7731"  # a parameter value no span may carry
ASYNCPG_SCOPE = "opentelemetry.instrumentation.asyncpg"


def traceparent() -> tuple[str, str, str]:
    """A caller's ``traceparent``, its trace id and its span id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def one(spans: list[Received], name: str) -> Received:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [(s.name, s.attributes) for s in spans]
    return found[0]


def has(*names: str) -> Any:
    return lambda spans: all(any(s.name == n for s in spans) for n in names)


def has_server(*names: str) -> Any:
    """``has(*names)`` and the server span: it ends last (after an error, after the abort), so
    it may come in a later export than the spans inside it."""
    inside = has(*names)
    return lambda spans: inside(spans) and any(s.kind == SERVER for s in spans)


def assert_no_secret(spans: list[Received]) -> None:
    for span in spans:
        assert not [t for t in span.texts() if SECRET in t], span


# -- off: the default --------------------------------------------------------------------------
# First in this module: the traced service below installs asyncpg's instrumentation process-wide
# while it lives.


async def test_off_nothing_is_installed_and_no_span_is_made(
    core: Application,
    client_for: ClientFactory,
    new_tenant: TenantFactory,
    http: httpx.AsyncClient,
    service_headers: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not core.tracing.enabled and core.tracing.spans is None
    assert core.tracing.grpc_interceptors() == []
    assert core.executor._spans is None and core.pools._spans is None and core.ingest.spans is None
    assert not AsyncPGInstrumentor().is_instrumented_by_opentelemetry
    tenant = await new_tenant("off")
    client = await client_for(tenant, (Scope.READ, Scope.WRITE, Scope.ADMIN))
    headers = {**await service_headers([tenant.tenant_id]), "X-Tenant-Id": tenant.tenant_id}

    # Every way a span comes to be: a tracer of the SDK's or the API's (no-op, proxy), or a
    # context made current.
    made: list[str] = []

    def spy(owner: type, name: str) -> None:
        original = getattr(owner, name)

        def called(*args: Any, **kwargs: Any) -> Any:
            made.append(f"{owner.__name__}.{name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, called)

    for owner in (
        opentelemetry.sdk.trace.Tracer,
        opentelemetry.trace.NoOpTracer,
        opentelemetry.trace.ProxyTracer,
    ):
        spy(owner, "start_span")
        spy(owner, "start_as_current_span")
    spy(opentelemetry.context.contextvars_context.ContextVarsRuntimeContext, "attach")

    await client.fetch_all("CREATE TABLE t (id int, body text)")
    await client.fetch_all("INSERT INTO t VALUES ($1, $2)", [1, "one"])
    assert (await client.fetch_all("SELECT body FROM t WHERE id = $1", [1])).rows == [("one",)]
    assert [row async for row in client.execute_query("SELECT id FROM t")] == [(1,)]
    response = await http.post(
        "/api/v1/query", json={"sql": "SELECT $1::int AS n", "params": [2]}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert made == []


# -- on ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _export_at_once() -> Iterator[None]:
    """Batches leave every 50 ms instead of 5 s (the standard variable, read by the SDK)."""
    before = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "50"
    yield
    if before is None:
        del os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    else:
        os.environ["OTEL_BSP_SCHEDULE_DELAY"] = before


@dataclass
class Traced:
    """A service instance exporting to the receiver, with its front ends and a tenant."""

    core: Application
    tenant: TenantRecord
    client: MultiDatabaseClient  # gRPC, read, write and admin
    http: httpx.AsyncClient
    headers: dict[str, str]  # for REST, the same service


@pytest.fixture(scope="module")
async def traced(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory, otlp_receiver: OtlpReceiver
) -> AsyncIterator[Traced]:
    settings = make_settings(
        pg_cluster,
        tmp_path_factory.mktemp("traced"),
        otel_exporter_otlp_endpoint=otlp_receiver.endpoint,
        otel_service_name="dbsvc-under-test",
    )
    async with Application(settings, start_nats=False, maintain_partitions=False) as core:
        tenant = await core.tenants.create(f"traced_{secrets.token_hex(4)}")
        scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
        name = f"traced-{secrets.token_hex(4)}"
        await core.services.register(
            name, tenants=[tenant.tenant_id], scopes=scopes, with_secret=False
        )
        token = core.tokens.issue(name, tenants=[tenant.tenant_id], scopes=scopes, ttl_seconds=600)
        async with GrpcServer(core) as server:
            client = MultiDatabaseClient(
                f"127.0.0.1:{server.port}", {"company_id": tenant.tenant_id}, token
            )
            transport = httpx.ASGITransport(app=create_http_app(core))
            async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as h:
                headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant.tenant_id}
                await client.fetch_all("CREATE TABLE notes (id int, body text UNIQUE)")
                try:
                    yield Traced(core, tenant, client, h, headers)
                finally:
                    await client.close()


async def grpc_query(traced: Traced, sql: str, params: list[Any], parent: str) -> Any:
    client = traced.client
    request = pb.QueryRequest(sql=sql, params=[to_value(p) for p in params])
    metadata = (*client._metadata(), ("traceparent", parent))
    return await client.stub.Query(request, metadata=metadata)


def assert_request_tree(spans: list[Received], server: Received, tenant_id: str, kind: str) -> None:
    """Authorization (with the guard inside), pool acquisition and the statement, under the
    request's server span, each naming the tenant; the class where it is known."""
    authorize = one(spans, tracing.AUTHORIZE)
    guard = one(spans, tracing.SQL_GUARD)
    acquire = one(spans, tracing.POOL_ACQUIRE)
    statement = one(spans, tracing.STATEMENT)
    assert authorize.parent_span_id == server.span_id
    assert guard.parent_span_id == authorize.span_id
    assert acquire.parent_span_id == server.span_id
    assert statement.parent_span_id == server.span_id
    assert statement.kind == CLIENT
    for span in (authorize, guard, acquire, statement):
        assert span.attributes[tracing.TENANT_ID] == tenant_id
        assert span.attributes[tracing.DB_SYSTEM] == "postgresql"
    for span in (authorize, guard, statement):
        assert span.attributes[tracing.STATEMENT_CLASS] == kind


async def test_a_grpc_query_continues_the_callers_trace(
    traced: Traced, otlp_receiver: OtlpReceiver
) -> None:
    header, trace_id, caller = traceparent()
    sql = "SELECT $1::text AS v"
    await grpc_query(traced, sql, [SECRET], header)
    spans = await otlp_receiver.wait_for_trace(
        trace_id, has_server(tracing.STATEMENT, tracing.POOL_ACQUIRE, tracing.SQL_GUARD)
    )
    server = next(s for s in spans if s.kind == SERVER)
    assert server.parent_span_id == caller
    assert server.attributes["rpc.method"] == "Query"
    assert_request_tree(spans, server, traced.tenant.tenant_id, "read")
    statement = one(spans, tracing.STATEMENT)
    assert statement.attributes[tracing.DB_STATEMENT] == sql
    assert statement.attributes[tracing.DB_OPERATION] == "SELECT"
    assert server.resource["service.name"] == "dbsvc-under-test"
    assert server.resource["service.instance.id"]
    assert_no_secret(spans)


async def test_asyncpg_spans_carry_the_text_never_the_parameters(
    traced: Traced, otlp_receiver: OtlpReceiver
) -> None:
    header, trace_id, _ = traceparent()
    sql = "INSERT INTO notes VALUES ($1, $2)"
    await grpc_query(traced, sql, [7731, SECRET], header)
    spans = await otlp_receiver.wait_for_trace(trace_id, has(tracing.STATEMENT, "INSERT"))
    statement = one(spans, tracing.STATEMENT)
    assert statement.attributes[tracing.STATEMENT_CLASS] == "write"
    driver = one(spans, "INSERT")  # asyncpg's span of the statement's execution
    assert driver.scope == ASYNCPG_SCOPE and driver.kind == CLIENT
    assert driver.parent_span_id == statement.span_id
    assert driver.attributes["db.statement"] == sql
    assert "db.statement.parameters" not in driver.attributes
    assert_no_secret(spans)


async def test_an_error_quoting_a_parameter_is_exported_without_its_message(
    traced: Traced, otlp_receiver: OtlpReceiver
) -> None:
    """PostgreSQL's DETAIL quotes the value ("Key (body)=(...) already exists"); asyncpg's
    instrumentation records the exception: only its type leaves the process."""
    sql = "INSERT INTO notes VALUES ($1, $2)"
    await grpc_query(traced, sql, [1, SECRET + "-dup"], traceparent()[0])
    header, trace_id, caller = traceparent()
    with pytest.raises(grpc.aio.AioRpcError):
        await grpc_query(traced, sql, [2, SECRET + "-dup"], header)
    spans = await otlp_receiver.wait_for_trace(trace_id, has_server(tracing.STATEMENT, "INSERT"))
    driver = one(spans, "INSERT")
    (event,) = [attributes for name, attributes in driver.events if name == "exception"]
    assert event["exception.type"].endswith("UniqueViolationError")
    assert set(event) <= {"exception.type", "exception.escaped"}  # no message, no stack
    statement = one(spans, tracing.STATEMENT)
    assert statement.attributes["error.type"] == "unique_violation"
    assert statement.status_code == 2 and statement.status_message == ""
    server = next(s for s in spans if s.kind == SERVER)
    assert server.parent_span_id == caller
    assert_no_secret(spans)


async def test_an_http_query_continues_the_callers_trace(
    traced: Traced, otlp_receiver: OtlpReceiver
) -> None:
    header, trace_id, caller = traceparent()
    response = await traced.http.post(
        "/api/v1/query",
        json={"sql": "SELECT $1::text AS v", "params": [SECRET]},
        headers={**traced.headers, "traceparent": header},
    )
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [[SECRET]]
    spans = await otlp_receiver.wait_for_trace(trace_id, has_server(tracing.STATEMENT))
    server = next(s for s in spans if s.kind == SERVER)
    assert server.parent_span_id == caller
    assert server.scope == "opentelemetry.instrumentation.fastapi"
    assert_request_tree(spans, server, traced.tenant.tenant_id, "read")
    assert_no_secret(spans)


async def test_health_checks_and_probes_make_no_traces(
    traced: Traced, otlp_receiver: OtlpReceiver
) -> None:
    header, trace_id, _ = traceparent()
    response = await traced.http.get("/health", headers={"traceparent": header})
    assert response.status_code == 200
    # A traced request after it: once its spans are in, the probe's would be too.
    marker, marker_trace, _ = traceparent()
    await grpc_query(traced, "SELECT 1", [], marker)
    await otlp_receiver.wait_for_trace(marker_trace, has(tracing.STATEMENT))
    assert otlp_receiver.trace(trace_id) == []


# -- ingestion ---------------------------------------------------------------------------------


def batch_of(tenant_id: str, n: int) -> bytes:
    now = dt.datetime.now(dt.UTC)
    ticks = [
        tick(tenant_id, "EURUSD", now + dt.timedelta(milliseconds=i), bid=1.1, ask=1.2, volume=1)
        for i in range(n)
    ]
    return ingest_pb2.IngestBatch(ticks=ticks).SerializeToString()


def assert_batch(spans: list[Received], caller: str, source: str, tenant_id: str, n: int) -> None:
    batch = one(spans, tracing.INGEST_BATCH)
    assert batch.kind == CONSUMER and batch.parent_span_id == caller
    assert batch.attributes[tracing.INGEST_SOURCE] == source
    assert batch.attributes[tracing.INGEST_RECORDS] == n
    assert batch.attributes[tracing.TENANT_ID] == tenant_id
    assert batch.attributes[tracing.INGEST_TENANTS] == [tenant_id]
    write = one(spans, tracing.INGEST_WRITE)
    assert write.parent_span_id == batch.span_id
    assert write.attributes[tracing.TENANT_ID] == tenant_id
    assert write.attributes[tracing.INGEST_RECORDS] == n
    acquire = one(spans, tracing.POOL_ACQUIRE)
    assert acquire.attributes[tracing.TENANT_ID] == tenant_id


async def test_an_ingestion_batch_continues_its_publishers_trace(
    ingest_env: IngestEnv,
    new_tenant: TenantFactory,
    otlp_receiver: OtlpReceiver,
) -> None:
    tenant = await new_tenant("traced_ingest")
    token = await ingest_env.token([tenant.tenant_id])
    await ingest_env.instance(otel_exporter_otlp_endpoint=otlp_receiver.endpoint)

    nats_header, nats_trace, nats_caller = traceparent()
    nc = await nats.connect(ingest_env.nats.url)
    try:
        await nc.jetstream().publish(
            "database.trading-data",
            batch_of(tenant.tenant_id, 3),
            headers={"Authorization": f"Bearer {token}", "traceparent": nats_header},
        )
    finally:
        await nc.close()
    # The batch span ends (and is exported) after its write span: wait for both.
    spans = await otlp_receiver.wait_for_trace(
        nats_trace, has(tracing.INGEST_WRITE, tracing.INGEST_BATCH)
    )
    assert_batch(spans, nats_caller, "nats", tenant.tenant_id, 3)

    kafka_header, kafka_trace, kafka_caller = traceparent()
    producer = AIOKafkaProducer(bootstrap_servers=ingest_env.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            ingest_env.topics["trading"],
            batch_of(tenant.tenant_id, 2),
            headers=[
                ("authorization", f"Bearer {token}".encode()),
                ("traceparent", kafka_header.encode()),
            ],
        )
    finally:
        await producer.stop()
    spans = await otlp_receiver.wait_for_trace(
        kafka_trace, has(tracing.INGEST_WRITE, tracing.INGEST_BATCH), timeout=60
    )
    assert_batch(spans, kafka_caller, "kafka", tenant.tenant_id, 2)
    assert await ingest_env.wait_ticks(tenant.tenant_id, 5) == 5
