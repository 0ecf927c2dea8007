"""Every RPC of DatabaseService end to end: MultiDatabaseClient → gRPC → service → PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
from decimal import Decimal

import asyncpg
import asyncpg.connect_utils
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from database_service.app import Application
from database_service.auth import Scope
from database_service.postgres import PoolStats
from database_service.tenancy import TenantRecord
from database_service_client import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    NotConfigured,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from database_service_client import MultiDatabaseClient as Client
from database_service_client._proto import database_service_pb2 as pb
from database_service_client.values import from_row
from tests.fix_service import ClientFactory, TenantFactory

ALL = (Scope.READ, Scope.WRITE, Scope.ADMIN)
USERS = ["user_id", "email", "subscription_tier"]


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("grpc")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> Client:
    return await client_for(tenant, ALL)


async def count(client: Client, table: str = "users") -> int:
    return int((await client.fetch_all(f"SELECT count(*) FROM {table}")).rows[0][0])


async def role_activity(core: Application, tenant: TenantRecord) -> list[str]:
    rows = await core.owner_pool.fetch(
        "SELECT state FROM pg_stat_activity WHERE usename = $1 AND state = 'active'",
        tenant.role_name,
    )
    return [r["state"] for r in rows]


async def test_query_streams_header_rows_and_summary_with_typed_values(client: Client) -> None:
    stream = client.execute_query(
        "SELECT g AS n, g * 1.5::numeric AS price, $1::timestamptz AS at, $2::jsonb AS doc,"
        " $3::bytea AS raw, ARRAY[g, g] AS pair FROM generate_series(1, 3) g",
        [dt.datetime(2024, 5, 6, tzinfo=dt.UTC), {"k": [1]}, b"\x01\x02"],
    )
    rows = [row async for row in stream]
    assert [c.name for c in stream.columns] == ["n", "price", "at", "doc", "raw", "pair"]
    assert rows[1] == (
        2,
        Decimal("3.0"),
        dt.datetime(2024, 5, 6, tzinfo=dt.UTC),
        {"k": [1]},
        b"\x01\x02",
        [2, 2],
    )
    assert stream.summary is not None
    assert (stream.summary.row_count, stream.summary.command, stream.summary.statement_class) == (
        3,
        "SELECT 3",
        "read",
    )


async def test_rows_are_chunked_by_bytes(client: Client) -> None:
    stream = client.execute_query(
        "SELECT repeat('x', 1000) FROM generate_series(1, 500)", max_chunk_bytes=16_384
    )
    call = stream._start()  # the raw stream, to count the messages (packed rows)
    chunks = [m async for m in call if m.rows.packed]
    assert len(chunks) >= 30
    assert all(len(m.rows.packed) <= 16_384 + 1100 for m in chunks)
    assert sum(len(json.loads(m.rows.packed)) for m in chunks) == 500


async def test_rows_as_value_messages_for_a_caller_that_does_not_ask_for_packed_rows(
    client: Client,
) -> None:
    request = pb.QueryRequest(
        sql="SELECT g, g * 1.5::numeric AS price, 'x' || g AS t FROM generate_series(1, 3) g"
    )
    messages = [m async for m in client.stub.ExecuteQuery(request, metadata=client._metadata())]
    rows = [from_row(r) for m in messages for r in m.rows.rows]
    assert rows == [(g, Decimal(g) * Decimal("1.5"), f"x{g}") for g in (1, 2, 3)]
    assert not any(m.rows.packed for m in messages)


async def test_a_chunk_with_a_non_finite_float_goes_as_values_and_keeps_it(client: Client) -> None:
    result = await client.fetch_all(
        "SELECT x FROM unnest(ARRAY['NaN', 'Infinity', '-Infinity', '1.5']::float8[]) AS x"
    )
    values = [row[0] for row in result.rows]
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf, 1.5]


async def test_write_through_execute_query_reports_rows_affected(client: Client) -> None:
    result = await client.fetch_all(
        "INSERT INTO users VALUES ($1, $2, 'pro'), ($3, $4, 'free') RETURNING user_id",
        ["a", "a@x", "b", "b@x"],
    )
    assert result.rows == [("a",), ("b",)]
    assert (result.row_count, result.command) == (2, "INSERT 0 2")


async def test_errors_carry_status_code_sqlstate_and_position(client: Client) -> None:
    with pytest.raises(InvalidArgument) as syntax:
        await client.fetch_all("SELECT * FRM users")
    assert (syntax.value.code, syntax.value.sqlstate, syntax.value.position) == (
        "sql_syntax_error",
        "42601",
        10,
    )
    with pytest.raises(NotFound) as missing:
        await client.fetch_all("SELECT * FROM nowhere")
    assert (missing.value.sqlstate, missing.value.position) == ("42P01", 15)
    await client.fetch_all("INSERT INTO users VALUES ('dup', 'dup@x', 'pro')")
    with pytest.raises(AlreadyExists) as duplicate:
        await client.fetch_all("INSERT INTO users VALUES ('dup', 'other@x', 'pro')")
    assert duplicate.value.code == "unique_violation"


async def test_rich_status_details_carry_error_info(client: Client) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from database_service_client._proto import database_service_pb2 as pb

    call = client.stub.ExecuteQuery(
        pb.QueryRequest(sql="SELECT * FRM x"), metadata=client._metadata()
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    status = await rpc_status.aio.from_call(call)
    assert status is not None and info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    detail = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(detail)
    assert detail.reason == "sql_syntax_error" and detail.metadata["sqlstate"] == "42601"


async def test_transaction_is_all_or_nothing(client: Client) -> None:
    results = await client.transaction(
        [
            ("INSERT INTO users VALUES ($1, $2, 'pro')", ["t1", "t1@x"]),
            ("SELECT count(*) FROM users", []),
        ],
        isolation="serializable",
    )
    assert results[0].command == "INSERT 0 1" and results[1].rows == [(1,)]
    with pytest.raises(AlreadyExists) as failed:
        await client.transaction(
            [
                "INSERT INTO users VALUES ('t2', 't2@x', 'pro')",
                "INSERT INTO users VALUES ('t1', 'again@x', 'pro')",
            ]
        )
    assert "statement 2" in failed.value.message
    assert await count(client) == 1


async def test_read_only_transaction_refuses_writes(client: Client) -> None:
    with pytest.raises(PermissionDenied) as info:  # 25006 is read_only_transaction (errors.py)
        await client.transaction(["INSERT INTO users VALUES ('ro', 'ro@x', 'pro')"], read_only=True)
    assert info.value.sqlstate == "25006"


async def test_bulk_insert_streams_rows_by_copy(client: Client) -> None:
    async def rows():  # type: ignore[no-untyped-def]
        for i in range(5000):
            yield (f"u{i}", f"u{i}@x", "pro")

    assert await client.bulk_insert("users", USERS, rows(), batch_size=700) == 5000
    assert await count(client) == 5000


async def test_bulk_insert_with_one_bad_row_writes_nothing(client: Client) -> None:
    rows = [(f"u{i}", f"u{i}@x", "pro") for i in range(1000)]
    rows[499] = ("u499", 12345, "pro")  # email must be text
    with pytest.raises(InvalidArgument) as bad_type:
        await client.bulk_insert("users", USERS, rows)
    assert "row 500" in bad_type.value.message and "email" in bad_type.value.message
    rows[499] = ("u0", "dup@x", "pro")  # a duplicate key, found by PostgreSQL during COPY
    with pytest.raises(AlreadyExists) as duplicate:
        await client.bulk_insert("users", USERS, rows)
    assert "row 500" in duplicate.value.message
    assert await count(client) == 0
    # What the client knows of stores it learns from the service, not from a list of its own.
    with pytest.raises(NotConfigured, match="unknown to this service"):
        await client.execute_multi_db_operation({"mongodb": {"find": {}}})
    assert (await client.stores())["clickhouse"] == "not_configured"


async def test_bulk_insert_into_a_shared_table_goes_through_rls(
    client: Client, tenant: TenantRecord
) -> None:
    written = await client.bulk_insert(
        "market_data", ["symbol", "user_id"], [("EURUSD", "u1")] * 10
    )
    assert written == 10
    result = await client.fetch_all("SELECT DISTINCT company_id FROM market_data")
    assert result.rows == [(tenant.tenant_id,)]


async def test_bulk_insert_names_unknown_tables_and_columns(client: Client) -> None:
    with pytest.raises(NotFound):
        await client.bulk_insert("nope", ["a"], [(1,)])
    with pytest.raises(InvalidArgument, match="no column"):
        await client.bulk_insert("users", ["user_id", "bogus"], [("x", 1)])
    with pytest.raises(InvalidArgument, match="lower-case identifiers"):
        await client.bulk_insert('users"; drop table users; --', ["user_id"], [("x",)])


async def test_bulk_update_is_keyed_and_all_or_nothing(client: Client) -> None:
    await client.bulk_insert("users", USERS, [(f"u{i}", f"u{i}@x", "pro") for i in range(100)])
    updated = await client.bulk_update(
        "users", ["user_id"], ["subscription_tier"], [(f"u{i}", "free") for i in range(40)]
    )
    assert updated == 40
    bad = [(f"u{i}", "enterprise") for i in range(40, 60)] + [
        ("u60", "platinum")
    ]  # check violation
    with pytest.raises(InvalidArgument):
        await client.bulk_update("users", ["user_id"], ["subscription_tier"], bad)
    tiers = await client.fetch_all(
        "SELECT subscription_tier, count(*) FROM users GROUP BY 1 ORDER BY 1"
    )
    assert tiers.rows == [("free", 40), ("pro", 60)]


async def test_deadline_cancels_the_statement_in_postgres(
    client: Client, core: Application, tenant: TenantRecord
) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeadlineExceeded):
        await client.fetch_all("SELECT pg_sleep(30)", timeout=0.5)
    assert asyncio.get_running_loop().time() - started < 5
    for _ in range(50):
        if not await role_activity(core, tenant):
            break
        await asyncio.sleep(0.1)
    assert await role_activity(core, tenant) == []


async def test_a_deadline_whose_cancel_is_lost_still_ends_the_statement(
    client: Client, core: Application, tenant: TenantRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CancelRequest that reaches PostgreSQL before the backend has read the statement is
    lost (on a loaded machine, a short deadline can do that): the statement given up is
    cancelled again a moment later, not left to run its 30 s."""

    async def lost(**_: object) -> None:
        return None  # PostgreSQL never hears of it

    monkeypatch.setattr(asyncpg.connect_utils, "_cancel", lost)
    before = core.deadlines.recancelled
    with pytest.raises(DeadlineExceeded):
        await client.fetch_all("SELECT pg_sleep(30)", timeout=0.5)
    for _ in range(80):
        if not await role_activity(core, tenant):
            break
        await asyncio.sleep(0.1)
    assert await role_activity(core, tenant) == []
    assert core.deadlines.recancelled == before + 1


async def test_cancelled_stream_frees_its_connection(
    client: Client, core: Application, tenant: TenantRecord
) -> None:
    stream = client.execute_query("SELECT g, pg_sleep(0.001) FROM generate_series(1, 100000) g")
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 100:
            break
    for _ in range(50):
        pool = core.pools.stats().get(tenant.tenant_id)
        if pool is not None and pool.in_use == 0 and not await role_activity(core, tenant):
            break
        await asyncio.sleep(0.1)
    pool = core.pools.stats()[tenant.tenant_id]
    assert pool.in_use == 0
    assert await role_activity(core, tenant) == []
    assert (await client.fetch_all("SELECT 1")).rows == [(1,)]


async def test_analytics_queries_are_read_only(client: Client) -> None:
    result = await client.analytics_query("SELECT count(*) FROM generate_series(1, 10)").fetch_all()
    assert result.rows == [(10,)]
    with pytest.raises(InvalidArgument) as refused:
        await client.analytics_query("DELETE FROM users").fetch_all()
    assert refused.value.sqlstate == "25006"


async def test_time_series_returns_the_tenants_ticks_in_range(client: Client) -> None:
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    ticks = [
        (base + dt.timedelta(minutes=i), "u1", "EURUSD", Decimal("1.1"), Decimal("1.2"), i)
        for i in range(10)
    ]
    await client.bulk_insert(
        "trading_ticks", ["time", "user_id", "symbol", "bid", "ask", "volume"], ticks
    )
    result = await client.time_series(
        "EURUSD", base + dt.timedelta(minutes=2), base + dt.timedelta(minutes=5)
    )
    assert [r[5] for r in result.rows] == [2, 3, 4]
    limited = await client.time_series("EURUSD", base, base + dt.timedelta(hours=1), limit=4)
    assert len(limited.rows) == 4


async def test_create_tenant_schema_needs_admin(
    client_for: ClientFactory, tenant: TenantRecord
) -> None:
    admin = await client_for(tenant, ALL, token_tenants=["*"])
    created = await admin.create_tenant_schema("grpc_made", connection_limit=3)
    assert created["schema"] and created["status"] == "active"  # schema names are opaque
    with pytest.raises(AlreadyExists):
        await admin.create_tenant_schema("grpc_made")
    writer = await client_for(tenant, (Scope.READ, Scope.WRITE), token_tenants=["*"])
    with pytest.raises(PermissionDenied):
        await writer.create_tenant_schema("grpc_denied")


async def test_manage_partitions_lists_the_tenants_partitions(
    client: Client, tenant: TenantRecord
) -> None:
    await client.fetch_all("CREATE TABLE events (at date NOT NULL, v int) PARTITION BY RANGE (at)")
    await client.fetch_all(
        "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    )
    await client.fetch_all(
        "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
    )
    parts = await client.partitions("events")
    assert [p["name"] for p in parts] == ["events_2024", "events_2025"]
    assert (
        parts[0]["parent"] == f"{tenant.schema_name}.events" and "2024-01-01" in parts[0]["bound"]
    )


async def test_health_and_metrics(client: Client, tenant: TenantRecord) -> None:
    # A tenant's token: the small health document, and the tenant's own figures.
    document = await client.health()
    assert (
        document["status"] == "healthy"
        and document["dependencies"]["postgresql"]["status"] == "healthy"
    )
    assert "tenant_context" not in document
    await client.fetch_all("SELECT 1")
    metrics = await client.metrics()
    assert metrics["requests"] >= 1 and metrics["tenant_id"] == tenant.tenant_id
    assert set(metrics["pools"]) == {tenant.tenant_id} and metrics["pool_connections_open"] >= 1


async def test_health_and_metrics_for_the_platform(
    client_for: ClientFactory, tenant: TenantRecord
) -> None:
    platform = await client_for(tenant, (Scope.METRICS,), token_tenants=["*"])
    document = await platform.health()
    assert document["tenant_context"]["active_tenants"] >= 1
    metrics = await platform.metrics()
    assert "tenant_id" not in metrics and "audit_events_written" in metrics


async def test_standard_health_service_and_reflection(grpc_target: str) -> None:
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="database_service.v1.DatabaseService")
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():  # type: ignore[no-untyped-def]
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for answer in reflection.ServerReflectionInfo(ask()):
            names = {s.name for s in answer.list_services_response.service}
            assert "database_service.v1.DatabaseService" in names
            assert "database_service.v1.GraphService" in names
            break


async def test_metrics_count_grpc_requests(
    client: Client, http: object, admin_headers: dict[str, str]
) -> None:
    await client.fetch_all("SELECT 1")
    import httpx

    assert isinstance(http, httpx.AsyncClient)
    text = (await http.get("/metrics", headers=admin_headers)).text
    assert 'dbsvc_requests_total{code="ok",front_end="grpc",operation="Query"}' in text


async def test_metrics_show_the_garbage_collectors_pauses(
    http: object, admin_headers: dict[str, str]
) -> None:
    import gc

    import httpx

    assert isinstance(http, httpx.AsyncClient)
    gc.collect()  # the application's probe notes it; the scrape observes it
    text = (await http.get("/metrics", headers=admin_headers)).text
    assert 'dbsvc_gc_pause_seconds_count{generation="2"}' in text


async def test_bad_token_is_unauthenticated(grpc_target: str, tenant: TenantRecord) -> None:
    async with Client(grpc_target, tenant.tenant_id, "not-a-token") as bad:
        with pytest.raises(Unauthenticated):
            await bad.fetch_all("SELECT 1")


async def test_multi_db_operation_runs_postgresql_and_refuses_unconfigured_stores(
    client: Client,
) -> None:
    result = await client.execute_multi_db_operation(
        {"postgresql": {"query": "SELECT $1::int + 1", "params": [41]}}
    )
    assert result["postgresql"].rows == [(42,)]
    with pytest.raises(NotConfigured, match="clickhouse"):
        await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('never', 'n@x', 'pro')"},
                "clickhouse": {"query": "SELECT 1"},
            }
        )
    assert await count(client) == 0


async def test_idempotent_calls_are_retried_on_unavailable(tenant: TenantRecord) -> None:
    from database_service.supervisor import free_port

    async with Client(
        f"127.0.0.1:{free_port()}", tenant.tenant_id, "t", retries=2, backoff=0.05
    ) as down:
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable):
            await down.health()
        assert asyncio.get_running_loop().time() - started >= 0.15  # 0.05 + 0.1 of backoff


async def test_shutdown_drains_in_flight_calls(core: Application, tenant: TenantRecord) -> None:
    from database_service.api.grpc import GrpcServer

    # A service's token: the bootstrap admin token is refused for tenant data.
    name = f"drain-{tenant.tenant_id}"
    await core.services.register(
        name, tenants=[tenant.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    token = core.tokens.issue(name, tenants=[tenant.tenant_id], scopes=[Scope.READ], ttl_seconds=60)
    server = GrpcServer(core)
    await server.__aenter__()
    async with Client(f"127.0.0.1:{server.port}", tenant.tenant_id, token) as c:
        await c.fetch_all("SELECT 1")  # connected
        await core.pools.drain()  # that call's connection back in the pool (released after it)
        slow = asyncio.create_task(c.fetch_all("SELECT pg_sleep(0.5), 7"))
        # In flight: the call holds a tenant connection (not merely sent, which under load may
        # still be on its way when the server stops).
        idle = PoolStats(0, 0, 0, 0)
        async with asyncio.timeout(10):
            while core.pools.stats().get(tenant.tenant_id, idle).in_use == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await server.__aexit__(None, None, None)  # grace is 1 s in tests
        assert (await slow).rows[0][1] == 7


async def test_the_seeds_dict_params_bind_by_name_and_store_the_values(client: Client) -> None:
    # The seed's own example passes the signal as a dict: it once bound the dict's *keys*.
    signal = {"signal_id": "sig-42", "symbol": "EURUSD", "action": "buy"}
    await client.execute_multi_db_operation(
        {
            "postgresql": {
                "query": "INSERT INTO trading_signals (signal_id, symbol, action)"
                " VALUES (:signal_id, :symbol, :action)",
                "params": signal,
                "company_id": client.tenant_id,
            }
        }
    )
    stored = await client.fetch_all(
        "SELECT signal_id, symbol, action FROM trading_signals WHERE signal_id = :id",
        {"id": "sig-42"},
    )
    assert stored.rows == [("sig-42", "EURUSD", "buy")]
    with pytest.raises(ValueError, match="names no :name"):
        await client.execute_multi_db_operation(
            {
                "postgresql": {
                    "query": "INSERT INTO trading_signals VALUES ($1, $2)",
                    "params": signal,
                }
            }
        )


async def test_an_operation_for_another_company_is_refused_before_anything_runs(
    client: Client,
) -> None:
    with pytest.raises(PermissionDenied, match="names company"):
        await client.execute_multi_db_operation(
            {
                "postgresql": {
                    "query": "INSERT INTO users VALUES ('never2', 'n2@x', 'pro')",
                    "company_id": "someone_else",
                }
            }
        )
    assert (await client.fetch_all("SELECT count(*) FROM users WHERE user_id = 'never2'")).rows == [
        (0,)
    ]


async def test_calls_spread_over_several_connections(
    client_for: ClientFactory, tenant: TenantRecord
) -> None:
    client = await client_for(tenant, ALL, connections=3)
    results = await asyncio.gather(*(client.fetch_all("SELECT $1::int", [i]) for i in range(9)))
    assert [r.rows for r in results] == [[(i,)] for i in range(9)]
    assert len(client._channels) == 3
