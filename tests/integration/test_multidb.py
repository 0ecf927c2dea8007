"""``execute_multi_db_operation`` across the stores, server-side (gRPC ``MultiDatabase.Execute``
through the client, REST ``POST /api/v1/multi-db``), with its transactional outbox, on real back
ends: the session's PostgreSQL (pgvector, the PostgreSQL graph, the embedded key-value store)
and a real Redis for the store-down and exactly-once cases."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from database_service.api.grpc import GrpcServer
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.tenancy import TenantRecord
from database_service_client import (
    MultiDatabaseClient,
    QueryResult,
)
from tests.fix_pg import PgCluster
from tests.fix_redis import RedisServer, _missing
from tests.fix_service import ClientFactory, TenantFactory, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("mdb")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> MultiDatabaseClient:
    return await client_for(tenant, (Scope.READ, Scope.WRITE))


def admin_of(tenant_id: str) -> Principal:
    return Principal(service="mdb-admin", tenants=frozenset({tenant_id}), scopes=frozenset(Scope))


async def outbox_rows(core: Application, tenant_id: str) -> list[dict[str, Any]]:
    rows = await core.owner_pool.fetch(
        f"SELECT id, store, status, attempts, last_error FROM"
        f" {core.settings.control_schema}.multidb_outbox WHERE tenant_id = $1 ORDER BY id",
        tenant_id,
    )
    return [dict(r) for r in rows]


async def signals_collection(core: Application, tenant_id: str) -> None:
    await core.vectors.create_collection(
        admin_of(tenant_id),
        TenantContext(tenant_id),
        "Signals",
        3,
        "cosine",
        {"symbol": "text"},
    )


def seed_operation(tenant_id: str, signal: dict[str, Any], object_id: str) -> dict[str, Any]:
    """The seed's example as written, plus a vector and a graph part."""
    return {
        "postgresql": {
            "query": "INSERT INTO trading_signals (signal_id, symbol, action)"
            " VALUES (:signal_id, :symbol, :action)",
            "params": signal,
            "company_id": tenant_id,
        },
        "dragonflydb": {
            "operation": "set",
            "key": f"signal:{tenant_id}:{signal['signal_id']}",
            "value": signal,
            "ttl": 300,
        },
        "vector": {
            "operation": "upsert",
            "class": "Signals",
            "objects": [
                {"id": object_id, "vector": [0.1, 0.2, 0.3], "properties": {"symbol": "EURUSD"}}
            ],
        },
        "graph": {
            "operation": "upsert",
            "vertices": [
                {"collection": "signals", "key": signal["signal_id"], "properties": {"a": 1}},
                {"collection": "symbols", "key": "EURUSD"},
            ],
            "edges": [
                {
                    "collection": "about",
                    "from": f"signals/{signal['signal_id']}",
                    "to": "symbols/EURUSD",
                }
            ],
        },
    }


@pytest.mark.pgvector  # a vector part on pgvector: the embedded 18 has it, Debian's 15 not
async def test_the_seeds_example_runs_across_every_store(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    tid = tenant.tenant_id
    await signals_collection(core, tid)
    signal = {"signal_id": "sig-1", "symbol": "EURUSD", "action": "buy"}
    object_id = str(uuid.uuid4())
    result = await client.execute_multi_db_operation(seed_operation(tid, signal, object_id))
    assert {n: o.status for n, o in result.outcomes.items()} == dict.fromkeys(
        ("postgresql", "dragonflydb", "vector", "graph"), "applied"
    )
    # PostgreSQL, the vector collection and the graph committed together; the key-value write
    # went through the outbox.
    assert [n for n, o in result.outcomes.items() if o.atomic] == ["postgresql", "vector", "graph"]
    assert isinstance(result["postgresql"], QueryResult)
    assert result["postgresql"].command == "INSERT 0 1"
    assert result["dragonflydb"] is True
    assert result["vector"] == 1
    assert result["graph"] == {"vertices": 2, "edges": 1}
    assert not result.pending and not result.failed
    # Every store holds what the call wrote.
    stored = await client.fetch_all("SELECT symbol, action FROM trading_signals")
    assert stored.rows == [("EURUSD", "buy")]
    assert await client.kv_get(f"signal:{tid}:sig-1") == (
        b'{"signal_id": "sig-1", "symbol": "EURUSD", "action": "buy"}'
    )
    objects = await core.vectors.get_objects(
        admin_of(tid), TenantContext(tid), "Signals", [object_id]
    )
    assert [o.properties["symbol"] for o in objects] == ["EURUSD"]
    edge = await core.graphs.get_edge(
        admin_of(tid), TenantContext(tid), "about/" + (await _edge_key(core, tid))
    )
    assert edge is not None and edge.to_id == "symbols/EURUSD"
    # The outbox row of the call is applied, once.
    rows = await outbox_rows(core, tid)
    assert [(r["store"], r["status"], r["attempts"]) for r in rows] == [
        ("dragonflydb", "applied", 1)
    ]


async def _edge_key(core: Application, tenant_id: str) -> str:
    from database_service.stores.graph.model import edge_key

    return edge_key("signals/sig-1", "symbols/EURUSD")


@pytest.mark.pgvector  # a vector part on pgvector: the embedded 18 has it, Debian's 15 not
async def test_reads_run_directly_after_the_commit(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    tid = tenant.tenant_id
    await signals_collection(core, tid)
    signal = {"signal_id": "sig-r", "symbol": "EURUSD", "action": "sell"}
    await client.execute_multi_db_operation(seed_operation(tid, signal, str(uuid.uuid4())))
    result = await client.execute_multi_db_operation(
        {
            "postgresql": {"query": "SELECT count(*) AS n FROM trading_signals"},
            "dragonflydb": {"operation": "mget", "keys": [f"signal:{tid}:sig-r", "absent"]},
            "vector": {
                "operation": "similarity_search",
                "class": "Signals",
                "vector": [0.1, 0.2, 0.3],
            },
            "graph": {"operation": "traverse", "start": "signals/sig-r", "max_depth": 1},
        }
    )
    assert result["postgresql"].rows == [(1,)]
    assert result["dragonflydb"][1] is None and b"sig-r" in result["dragonflydb"][0]
    assert result["vector"]["count"] == 1
    assert [h["vertex"]["_id"] for h in result["graph"]["hits"]] == ["symbols/EURUSD"]
    # Reads record nothing.
    assert len(await outbox_rows(core, tid)) == 1


async def test_dict_params_bind_by_name_never_as_keys(
    client: MultiDatabaseClient, http: httpx.AsyncClient, tenant: TenantRecord, core: Application
) -> None:
    signal = {"signal_id": "sig-d", "symbol": "GBPUSD", "action": "buy"}
    # $name placeholders, the order of the dict's keys unlike the statement's.
    await client.execute_multi_db_operation(
        {
            "postgresql": {
                "query": "INSERT INTO trading_signals (action, symbol, signal_id)"
                " VALUES ($action, $symbol, $signal_id)",
                "params": signal,
            }
        }
    )
    stored = await client.fetch_all(
        "SELECT signal_id, symbol, action FROM trading_signals WHERE signal_id = 'sig-d'"
    )
    assert stored.rows == [("sig-d", "GBPUSD", "buy")]
    # REST: the same, named :name, and a dict with a statement that names nothing is refused.
    token = await _token(core, tenant.tenant_id, [Scope.READ, Scope.WRITE])
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant.tenant_id}
    response = await http.post(
        "/api/v1/multi-db",
        json={
            "operation": {
                "postgresql": {
                    "query": "SELECT :b::int - :a::int AS d",
                    "params": {"a": 1, "b": 43},
                }
            }
        },
        headers=headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["stores"]["postgresql"]["result"]["rows"] == [[42]]
    response = await http.post(
        "/api/v1/multi-db",
        json={"operation": {"postgresql": {"query": "SELECT $1, $2", "params": {"a": 1}}}},
        headers=headers,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert "postgresql part" in response.json()["error"]["message"]


async def _token(core: Application, tenant_id: str, scopes: list[Scope]) -> str:
    name = f"mdb-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=[tenant_id], scopes=scopes, with_secret=False)
    return core.tokens.issue(name, tenants=[tenant_id], scopes=scopes, ttl_seconds=600)


async def test_a_failing_postgresql_part_records_and_applies_nothing(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    from database_service_client import AlreadyExists

    await client.execute_multi_db_operation(
        {"postgresql": {"query": "INSERT INTO users VALUES ('u1', 'u1@x', 'pro')"}}
    )
    with pytest.raises(AlreadyExists):
        await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('u1', 'again@x', 'pro')"},
                "dragonflydb": {"operation": "incr", "key": "never"},
                "graph": {"operation": "upsert", "vertices": [{"collection": "v", "key": "no"}]},
            }
        )
    assert await client.kv_get("never") is None
    assert (
        await core.graphs.get_vertex(
            admin_of(tenant.tenant_id), TenantContext(tenant.tenant_id), "v/no"
        )
        is None
    )
    assert await outbox_rows(core, tenant.tenant_id) == []


@pytest.mark.parametrize(
    ("operation", "code"),
    [
        ({"mongodb": {"find": {}}}, "not_configured"),
        ({"vector": {"operation": "upsert", "class": "X"}}, "invalid_request"),
        ({"graph": {"operation": "drop_everything"}}, "invalid_request"),
        (
            {"dragonflydb": {"operation": "set", "key": "k", "value": "v", "ttl": -1}},
            "invalid_request",
        ),
        ({"clickhouse": {"query": "SELECT 1"}}, "not_configured"),
        ({"postgresql": {"query": "SELECT 1", "statements": ["SELECT 2"]}}, "invalid_request"),
    ],
)
async def test_a_bad_part_refuses_the_whole_operation_before_anything_runs(
    core: Application,
    http: httpx.AsyncClient,
    tenant: TenantRecord,
    operation: dict[str, Any],
    code: str,
) -> None:
    token = await _token(core, tenant.tenant_id, [Scope.READ, Scope.WRITE])
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant.tenant_id}
    body = {
        "operation": {
            "postgresql": {"query": "INSERT INTO users VALUES ('never', 'n@x', 'pro')"},
            **operation,
        }
    }
    response = await http.post("/api/v1/multi-db", json=body, headers=headers)
    assert response.status_code in (400, 409), response.text
    assert response.json()["error"]["code"] == code
    count = await core.owner_pool.fetchval(f"SELECT count(*) FROM {tenant.schema_name}.users")
    assert count == 0
    assert await outbox_rows(core, tenant.tenant_id) == []


async def test_a_reader_cannot_write_other_stores(
    client_for: ClientFactory, tenant: TenantRecord
) -> None:
    from database_service_client import PermissionDenied

    reader = await client_for(tenant, (Scope.READ,))
    with pytest.raises(PermissionDenied, match="write scope"):
        await reader.execute_multi_db_operation(
            {"dragonflydb": {"operation": "set", "key": "k", "value": "v"}}
        )


async def test_a_failed_entry_is_kept_listed_and_retried_by_an_admin(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord, http: httpx.AsyncClient
) -> None:
    tid = tenant.tenant_id
    await client.kv_set("counter", "not a number")
    result = await client.execute_multi_db_operation(
        {
            "postgresql": {"query": "INSERT INTO users VALUES ('f1', 'f1@x', 'pro')"},
            "dragonflydb": {"operation": "incr", "key": "counter"},
        }
    )
    outcome = result.outcomes["dragonflydb"]
    assert result.outcomes["postgresql"].status == "applied"
    # The store refused it (not an integer): failed at once, not retried.
    assert (outcome.status, outcome.code) == ("failed", "failed_precondition")
    assert outcome.reason and "integer" in outcome.reason
    assert result["dragonflydb"] is None
    token = await _token(core, tid, [Scope.READ, Scope.WRITE, Scope.ADMIN])
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tid}
    listed = await http.get("/api/v1/multi-db/outbox", params={"status": "failed"}, headers=headers)
    assert listed.status_code == 200, listed.text
    entries = listed.json()["entries"]
    assert [(e["id"], e["attempts"]) for e in entries] == [(outcome.entry_id, 1)]
    assert "integer" in entries[0]["last_error"]
    await client.kv_set("counter", "41")
    retried = await http.post("/api/v1/multi-db/outbox/retry", json={}, headers=headers)
    assert retried.status_code == 200, retried.text
    assert [(r["status"], r["result"]) for r in retried.json()["retried"]] == [("applied", 42)]
    assert await client.kv_get("counter") == b"42"
    # A writer without admin may not list or retry.
    plain_token = await _token(core, tid, [Scope.READ, Scope.WRITE])
    plain = {"Authorization": f"Bearer {plain_token}", "X-Tenant-Id": tid}
    assert (await http.get("/api/v1/multi-db/outbox", headers=plain)).status_code == 403
    assert (
        await http.post("/api/v1/multi-db/outbox/retry", json={}, headers=plain)
    ).status_code == 403


@pytest.mark.pgvector  # a vector part on pgvector: the embedded 18 has it, Debian's 15 not
async def test_a_joined_write_that_fails_rolls_the_postgresql_part_back(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    """The vector collection lives in the tenant's schema: its write is in the transaction, so
    its failure is the operation's and nothing is kept."""
    from database_service_client import NotFound

    with pytest.raises(NotFound):
        await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('j1', 'j1@x', 'pro')"},
                "dragonflydb": {"operation": "set", "key": "j", "value": "1"},
                "vector": {
                    "operation": "upsert",
                    "class": "NoSuchCollection",
                    "objects": [{"vector": [1.0, 0.0, 0.0]}],
                },
            }
        )
    count = await core.owner_pool.fetchval(f"SELECT count(*) FROM {tenant.schema_name}.users")
    assert count == 0
    assert await client.kv_get("j") is None
    assert await outbox_rows(core, tenant.tenant_id) == []


async def test_an_entry_applied_twice_has_the_effect_of_once(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    """A crash between the store's acknowledgement and the mark: the entry is applied again.
    ``incr`` records the entry id with the increment, so the second application adds nothing."""
    result = await client.execute_multi_db_operation(
        {"dragonflydb": {"operation": "incr", "key": "hits", "by": 5}}
    )
    assert result["dragonflydb"] == 5
    entry = result.outcomes["dragonflydb"].entry_id
    table = f"{core.settings.control_schema}.multidb_outbox"
    await core.owner_pool.execute(f"UPDATE {table} SET status = 'pending' WHERE id = $1", entry)
    again = await core.multidb_outbox.apply(entry)
    assert (again.status, again.result) == ("applied", 5)
    assert await client.kv_get("hits") == b"5"


async def test_health_and_metrics_show_the_outbox(
    core: Application, client: MultiDatabaseClient
) -> None:
    result = await client.execute_multi_db_operation(
        {"dragonflydb": {"operation": "set", "key": "m", "value": "1"}}
    )
    outcome = result.outcomes["dragonflydb"]
    if outcome.status != "applied":
        # Left pending by the request (a loaded machine: its apply ran out of time); applied
        # here, as the loop would, so the applied counter has a sample to show.
        await core.multidb_outbox.apply(outcome.entry_id)
    await core.multidb_outbox.refresh_figures()
    section = (await core.health.document())["multidb_outbox"]
    assert section["pending"] >= 0 and "oldest_pending_seconds" in section
    text = core.metrics.render().decode()
    assert 'dbsvc_multidb_outbox_applied_total{store="dragonflydb"}' in text
    assert 'dbsvc_multidb_outbox_recorded_total{store="dragonflydb"}' in text
    assert "dbsvc_multidb_outbox_pending " in text
    assert "dbsvc_multidb_outbox_apply_lag_seconds_bucket" in text


# -- with a Redis that goes down -------------------------------------------------------------


@pytest.fixture
async def redis_service(
    pg_cluster: PgCluster, tmp_path: Path
) -> AsyncIterator[tuple[Application, MultiDatabaseClient, RedisServer, str]]:
    server = RedisServer(tmp_path / "redis")
    try:
        server.start()
    except RuntimeError as exc:
        _missing(str(exc))  # fails under CI=true, skips elsewhere
    settings = make_settings(
        pg_cluster,
        tmp_path / "data",
        redis_url=server.url,
        multidb_outbox_interval_seconds=0.2,
        multidb_outbox_backoff_seconds=0.1,
        multidb_outbox_backoff_max_seconds=0.5,
        multidb_outbox_max_attempts=1000,
    )
    try:
        async with Application(settings, start_nats=False, maintain_partitions=False) as core:
            tenant_id = f"mdbr_{secrets.token_hex(4)}"
            await core.tenants.create(tenant_id)
            token = await _token(core, tenant_id, [Scope.READ, Scope.WRITE])
            async with (
                GrpcServer(core) as grpc_server,
                MultiDatabaseClient(
                    f"127.0.0.1:{grpc_server.port}", tenant_id, token, retries=0
                ) as c,
            ):
                yield core, c, server, tenant_id
    finally:
        server.stop()


async def test_with_redis_down_writes_are_pending_then_applied_by_the_loop(
    redis_service: tuple[Application, MultiDatabaseClient, RedisServer, str],
) -> None:
    core, client, server, tid = redis_service
    server.stop()
    result = await client.execute_multi_db_operation(
        {
            "postgresql": {"query": "INSERT INTO users VALUES ('r1', 'r1@x', 'pro')"},
            "dragonflydb": {"operation": "incr", "key": "orders", "by": 3},
        }
    )
    assert result.outcomes["postgresql"].status == "applied"
    assert result.outcomes["dragonflydb"].status == "pending"
    assert result.outcomes["dragonflydb"].reason
    assert result["dragonflydb"] is None
    await asyncio.sleep(0.5)  # a few failed attempts of the loop
    rows = await outbox_rows(core, tid)
    assert rows[0]["status"] == "pending" and rows[0]["attempts"] >= 2
    server.start()
    redis = aioredis.Redis.from_url(server.url)
    try:
        async with asyncio.timeout(15):
            while (await outbox_rows(core, tid))[0]["status"] != "applied":  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert await redis.get(f"dbsvc:{{{tid}}}:kv:orders".encode()) == b"3"
        # Applied again (a crash before the mark): the increment's record stops a second add.
        entry = rows[0]["id"]
        table = f"{core.settings.control_schema}.multidb_outbox"
        await core.owner_pool.execute(f"UPDATE {table} SET status = 'pending' WHERE id = $1", entry)
        assert (await core.multidb_outbox.apply(entry)).status == "applied"
        assert await redis.get(f"dbsvc:{{{tid}}}:kv:orders".encode()) == b"3"
        assert await redis.exists(f"dbsvc:{{{tid}}}:applied:outbox:{entry}".encode())
    finally:
        await redis.aclose()


@pytest.mark.pgvector  # a vector part on pgvector: the embedded 18 has it, Debian's 15 not
async def test_with_a_user_id_vector_and_graph_writes_go_through_the_outbox(
    core: Application, tenant: TenantRecord
) -> None:
    """A request with a user id runs its transaction on the tenant's user-scoped login; the
    vector and graph stores write as the company, so their writes are outbox entries there."""
    tid = tenant.tenant_id
    await signals_collection(core, tid)
    object_id = str(uuid.uuid4())
    answer = await core.multidb.execute(
        admin_of(tid),
        TenantContext(tid, "trader-1"),
        {
            "postgresql": {"query": "INSERT INTO users VALUES ('trader-1', 't@x', 'pro')"},
            "vector": {
                "operation": "upsert",
                "class": "Signals",
                "objects": [{"id": object_id, "vector": [0.1, 0.2, 0.3]}],
            },
            "graph": {"operation": "upsert", "vertices": [{"collection": "users", "key": "t1"}]},
        },
    )
    stores = answer["stores"]
    assert stores["postgresql"]["status"] == "applied"
    for name in ("vector", "graph"):
        assert stores[name]["status"] == "applied" and "entry_id" in stores[name]
        assert not stores[name].get("atomic")
    got = await core.vectors.get_objects(admin_of(tid), TenantContext(tid), "Signals", [object_id])
    assert len(got) == 1
    assert await core.graphs.get_vertex(admin_of(tid), TenantContext(tid), "users/t1") is not None
    assert [r["store"] for r in await outbox_rows(core, tid)] == ["vector", "graph"]


async def test_a_joined_graph_write_fails_as_the_graph_api_says(
    client: MultiDatabaseClient, core: Application, tenant: TenantRecord
) -> None:
    from database_service_client import NotFound

    with pytest.raises(NotFound) as info:
        await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('g1', 'g1@x', 'pro')"},
                "graph": {
                    "operation": "upsert",
                    "edges": [{"collection": "follows", "from": "users/a", "to": "users/b"}],
                },
            }
        )
    assert info.value.code == "vertex_not_found"
    count = await core.owner_pool.fetchval(f"SELECT count(*) FROM {tenant.schema_name}.users")
    assert count == 0


async def test_a_tenants_first_graph_writes_at_once_all_succeed(
    client: MultiDatabaseClient, core: Application, tenant: TenantRecord
) -> None:
    """The graph's tables are made by the tenant's first graph write, inside the operation's
    transaction. Several first writes at once: one CREATE wins, the others meet its catalog rows
    once it commits, and must go on with the tables it made instead of failing."""
    results = await asyncio.gather(
        *(
            client.execute_multi_db_operation(
                {
                    "postgresql": {"query": "SELECT 1"},
                    "graph": {
                        "operation": "upsert",
                        "vertices": [{"collection": "first", "_key": f"v{i}"}],
                    },
                }
            )
            for i in range(6)
        ),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, BaseException)], results
    count = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenant.schema_name}._graph_vertices"
    )
    assert count == 6
