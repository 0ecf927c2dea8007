"""What only the Weaviate store has, on a real Weaviate server: each tenant collection is a class
of its own with Weaviate's native multi-tenancy (one Weaviate tenant, the company), metrics
mapped to Weaviate's distances, the health entry with the server's real state, a server that goes
away and comes back (a clear 503 meanwhile, nothing written lost), HNSW recall against exact
search computed from the same vectors, idempotent upserts, and a tenant's deletion dropping its
classes. (Everything the stores share runs on both in test_vectors.py.)"""

from __future__ import annotations

import datetime as dt
import math
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.auth import Scope
from database_service.stores.vector.weaviate import class_name
from database_service.supervisor import free_port
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from tests.fix_pg import PgCluster
from tests.fix_weaviate import Stack, WeaviateServer, WeaviateTarget, weaviate_service
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.integration, pytest.mark.weaviate]


def _unit(rng: random.Random, dim: int) -> list[float]:
    v = [rng.gauss(0, 1) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


async def _client(stack: Stack) -> tuple[str, MultiDatabaseClient, dict[str, str]]:
    core = stack.core
    tenant = await core.tenants.create(f"wv_{secrets.token_hex(4)}")
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    token = await service_token(core, [tenant.tenant_id], scopes)
    client = MultiDatabaseClient(stack.grpc_target, tenant.tenant_id, token, retries=0)
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant.tenant_id}
    return tenant.tenant_id, client, headers


@pytest.fixture
async def raw(weaviate_target: WeaviateTarget) -> AsyncIterator[httpx.AsyncClient]:
    """Weaviate itself, with the service's key: to see what the service made there."""
    key = weaviate_target.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(
        base_url=weaviate_target.url, headers=headers, trust_env=False
    ) as client:
        yield client


async def test_each_tenant_collection_is_a_class_with_one_weaviate_tenant(
    weaviate_stack: Stack, raw: httpx.AsyncClient
) -> None:
    tenant_id, client, _ = await _client(weaviate_stack)
    try:
        for name, metric, distance in [
            ("TradingPatterns", "cosine", "cosine"),
            ("Euclid", "l2", "l2-squared"),
            ("Inner", "dot", "dot"),
        ]:
            await client.vector_create_collection(name, 3, metric=metric,
                                                  properties={"symbol": "text", "n": "int"})  # fmt: skip
            cls = class_name(tenant_id, name)
            assert cls.startswith("Dbsvc_") and cls.endswith("_" + name.lower())
            assert tenant_id not in cls  # the schema does not list tenant ids
            schema = (await raw.get(f"/v1/schema/{cls}")).json()
            assert schema["multiTenancyConfig"]["enabled"] is True
            assert schema["vectorIndexConfig"]["distance"] == distance
            assert schema["vectorizer"] == "none"
            props = {p["name"]: p for p in schema["properties"]}
            assert props["symbol"]["tokenization"] == "field"
            assert props["n"]["dataType"] == ["int"]
            tenants = (await raw.get(f"/v1/schema/{cls}/tenants")).json()
            assert [t["name"] for t in tenants] == [tenant_id]
        assert {c["name"] for c in await client.vector_list_collections()} == {
            "TradingPatterns", "Euclid", "Inner"
        }  # fmt: skip
    finally:
        await client.close()


async def test_weaviate_itself_refuses_another_tenant_in_a_tenants_class(
    weaviate_stack: Stack, raw: httpx.AsyncClient
) -> None:
    """The second layer: should a request ever name B's class, it still names the caller's
    Weaviate tenant, which B's class does not have."""
    b, client, _ = await _client(weaviate_stack)
    a = f"wv_{secrets.token_hex(4)}"
    try:
        await client.vector_create_collection("Secrets", 2, properties={"note": "text"})
        await client.vector_upsert("Secrets", [{"vector": [1, 0], "properties": {"note": "s"}}])
        cls = class_name(b, "Secrets")
        query = f'{{ Get {{ {cls}(tenant: "{a}", limit: 10) {{ note }} }} }}'
        answer = (await raw.post("/v1/graphql", json={"query": query})).json()
        assert not (answer.get("data") or {}).get("Get", {}).get(cls)
        assert "tenant not found" in str(answer["errors"])
        batch = {"objects": [{"class": cls, "tenant": a, "vector": [0, 1]}]}
        written = (await raw.post("/v1/batch/objects", json=batch)).json()
        assert "tenant not found" in str(written[0]["result"]["errors"])
        assert await client.vector_count("Secrets") == 1
    finally:
        await client.close()


async def test_an_upsert_of_the_same_ids_is_idempotent(weaviate_stack: Stack) -> None:
    _, client, _ = await _client(weaviate_stack)
    try:
        await client.vector_create_collection("Again", 2, properties={"n": "int"})
        batch = [
            {"id": str(uuid.UUID(int=i + 1)), "vector": [1.0, float(i)], "properties": {"n": i}}
            for i in range(1200)
        ]  # fmt: skip (3 chunks)
        assert await client.vector_upsert("Again", batch) == 1200
        assert await client.vector_upsert("Again", batch) == 1200
        assert await client.vector_count("Again") == 1200
        (one,) = await client.vector_get("Again", [batch[1100]["id"]], with_vector=True)
        assert one["properties"] == {"n": 1100} and one["vector"] == [1.0, 1100.0]
    finally:
        await client.close()


async def test_health_reports_the_weaviate_server(weaviate_stack: Stack) -> None:
    _, client, _ = await _client(weaviate_stack)
    try:
        await client.vector_create_collection("Counted", 2)
        core = weaviate_stack.core
        core.health.invalidate()
        document = await core.health.document(detailed=True)
        entry = document["dependencies"]["weaviate"]
        assert entry["status"] == "healthy", entry
        assert entry["implementation"] == "weaviate" and entry["embedded"] is False
        assert entry["ready"] is True
        assert entry["version"] == "1.35.2"
        assert 0 < entry["latency_ms"] < 3000
        assert entry["collections"] >= 1 and entry["tenants_with_collections"] >= 1
        assert "@" not in entry["url"]
    finally:
        await client.close()


async def test_hnsw_search_on_weaviate_recalls_what_exact_search_finds(
    weaviate_stack: Stack,
) -> None:
    """5,000 random 64-dimensional unit vectors: Weaviate's HNSW search against the exact
    nearest 10 computed here from the same vectors, over 40 queries; and with a filter keeping
    5% of them."""
    _, client, _ = await _client(weaviate_stack)
    try:
        await client.vector_create_collection("Recall", 64, properties={"bucket": "int"})
        rng = random.Random(11)
        stored: list[tuple[str, list[float], int]] = []
        for _ in range(5):
            batch = []
            for i in range(1000):
                oid, vector = str(uuid.uuid4()), _unit(rng, 64)
                stored.append((oid, vector, i % 20))
                batch.append({"id": oid, "vector": vector, "properties": {"bucket": i % 20}})
            await client.vector_upsert("Recall", batch)

        def exact(query: list[float], bucket: int | None = None) -> set[str]:
            scored = [
                (-sum(a * b for a, b in zip(v, query, strict=True)), oid)
                for oid, v, k in stored
                if bucket is None or k == bucket
            ]
            return {oid for _, oid in sorted(scored)[:10]}

        found = 0
        seconds: list[float] = []
        for _ in range(40):
            query = _unit(rng, 64)
            started = time.perf_counter()
            hits = await client.vector_search("Recall", query, limit=10)
            seconds.append(time.perf_counter() - started)
            found += len({h["id"] for h in hits} & exact(query))
        where = {"path": "bucket", "operator": "Equal", "value": 3}
        filtered = 0
        for _ in range(10):
            query = _unit(rng, 64)
            hits = await client.vector_search("Recall", query, limit=10, where=where)
            assert len(hits) == 10 and {h["properties"]["bucket"] for h in hits} == {3}
            filtered += len({h["id"] for h in hits} & exact(query, 3))
        seconds.sort()
        print(
            f"weaviate recall@10 {found / 400:.3f}, filtered {filtered / 100:.3f},"
            f" p50 {seconds[20] * 1000:.1f} ms, max {seconds[-1] * 1000:.1f} ms"
        )
        assert found / 400 >= 0.95, found / 400
        assert filtered / 100 >= 0.9, filtered / 100
    finally:
        await client.close()


async def test_deleting_a_tenant_drops_its_weaviate_classes(
    weaviate_stack: Stack, raw: httpx.AsyncClient
) -> None:
    from database_service.auth.tokens import everything

    tenant_id, client, _ = await _client(weaviate_stack)
    try:
        await client.vector_create_collection("Doomed", 2)
        await client.vector_upsert("Doomed", [{"vector": [1, 2]}])
    finally:
        await client.close()
    cls = class_name(tenant_id, "Doomed")
    assert (await raw.get(f"/v1/schema/{cls}")).status_code == 200
    operator = everything(service="vector-test-operator")
    await weaviate_stack.core.tenant_admin.delete(operator, tenant_id, confirm=True)
    assert (await raw.get(f"/v1/schema/{cls}")).status_code == 404
    # The id made again starts with no collections.
    recreated = await weaviate_stack.core.tenants.create(tenant_id)
    assert recreated.tenant_id == tenant_id
    assert (await raw.get(f"/v1/schema/{cls}")).status_code == 404


async def test_a_restarted_server_gives_a_clear_503_then_serves_what_was_written(
    private_weaviate: WeaviateServer, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    async with weaviate_service(pg_cluster, tmp_path / "data", private_weaviate.target) as stack:
        _, client, headers = await _client(stack)
        try:
            await client.vector_create_collection("Kept", 2, properties={"n": "int"})
            objects = [{"id": str(uuid.uuid4()), "vector": [1.0, float(i)],
                        "properties": {"n": i}} for i in range(10)]  # fmt: skip
            assert await client.vector_upsert("Kept", objects) == 10
            private_weaviate.stop()

            with pytest.raises(DatabaseServiceError) as down:
                await client.vector_search("Kept", [1.0, 0.0])
            assert down.value.status.name == "UNAVAILABLE", down.value
            assert down.value.code == "vector_store_unavailable"
            rest = await stack.http.post(
                "/api/v1/vector/collections/Kept/search", headers=headers,
                json={"vector": [1.0, 0.0]},
            )  # fmt: skip
            assert rest.status_code == 503, rest.text
            assert rest.json()["error"]["code"] == "vector_store_unavailable"
            assert str(private_weaviate.port) not in rest.text  # no server address to callers
            stack.core.health.invalidate()
            document: dict[str, Any] = await stack.core.health.document(detailed=True)
            entry = document["dependencies"]["weaviate"]
            assert entry["status"] == "unhealthy" and "did not answer" in entry["error"]
            assert entry["ready"] is False

            private_weaviate.start()
            hits = await client.vector_search("Kept", [1.0, 0.0], limit=10)
            assert {h["id"] for h in hits} == {o["id"] for o in objects}
            assert await client.vector_count("Kept") == 10
            stack.core.health.invalidate()
            document = await stack.core.health.document(detailed=True)
            assert document["dependencies"]["weaviate"]["status"] == "healthy"
        finally:
            await client.close()


async def test_operations_are_audited_and_weaviate_requests_counted(
    weaviate_stack: Stack, admin_headers: dict[str, str]
) -> None:
    core = weaviate_stack.core
    tenant_id, client, _ = await _client(weaviate_stack)
    since = dt.datetime.now(dt.UTC)
    try:
        await client.vector_create_collection("Audited", 2, properties={"n": "int"})
        await client.vector_upsert("Audited", [{"vector": [1, 0], "properties": {"n": 1}}])
        await client.vector_search("Audited", [1, 0])
        with pytest.raises(DatabaseServiceError):
            await client.vector_search("Audited", [1, 0], where={"path": "nope",
                                                                 "operator": "Equal", "value": 1})  # fmt: skip
        with pytest.raises(DatabaseServiceError):
            await client.vector_get_collection("Missing")
    finally:
        await client.close()
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT action, outcome, code, statement_class FROM {core.settings.control_schema}.audit_log"
        " WHERE tenant_id = $1 AND action LIKE 'vector.%' AND at >= $2 ORDER BY at",
        tenant_id,
        since,
    )
    assert [(r["action"], r["outcome"], r["code"]) for r in rows] == [
        ("vector.create_collection", "ok", "create_collection"),
        ("vector.upsert", "ok", "upsert"),
        ("vector.search", "ok", "search"),
        ("vector.search", "denied", "invalid_filter"),
        ("vector.get_collection", "error", "collection_not_found"),
    ]
    assert [r["statement_class"] for r in rows[:3]] == ["ddl", "write", "read"]
    text = (await weaviate_stack.http.get("/metrics", headers=admin_headers)).text
    assert 'dbsvc_weaviate_requests_total{endpoint="POST /v1/graphql",outcome="ok"}' in text
    assert 'dbsvc_weaviate_requests_total{endpoint="POST /v1/batch/objects",outcome="ok"}' in text
    assert 'endpoint="GET /v1/schema/{class}"' in text  # class names stay out of labels
    assert 'dbsvc_vector_searches_total{code="invalid_filter",store="weaviate"}' in text


async def test_a_service_whose_weaviate_is_not_there_starts_and_answers_503(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """Nothing listens at the URL: the service starts anyway (the server may come later),
    health says unhealthy, and a vector request is a clear 503."""
    nowhere = WeaviateTarget(f"http://127.0.0.1:{free_port()}", "key")
    async with weaviate_service(pg_cluster, tmp_path / "data", nowhere) as stack:
        _, client, headers = await _client(stack)
        try:
            with pytest.raises(DatabaseServiceError) as down:
                await client.vector_list_collections()
            assert down.value.code == "vector_store_unavailable"
            assert down.value.status.name == "UNAVAILABLE"
            rest = await stack.http.get("/api/v1/vector/collections", headers=headers)
            assert rest.status_code == 503
        finally:
            await client.close()
        stack.core.health.invalidate()
        entry = (await stack.core.health.document(detailed=True))["dependencies"]["weaviate"]
        assert entry["status"] == "unhealthy" and entry["ready"] is False


async def test_a_suspended_tenant_reaches_none_of_its_weaviate_collections(
    weaviate_stack: Stack,
) -> None:
    from database_service.auth.tokens import everything

    tenant_id, client, _ = await _client(weaviate_stack)
    admin = weaviate_stack.core.tenant_admin
    operator = everything(service="vector-test-operator")
    try:
        await client.vector_create_collection("Paused", 2)
        await client.vector_upsert("Paused", [{"vector": [1, 0]}])
        await admin.suspend(operator, tenant_id)
        for call in (
            client.vector_search("Paused", [1, 0]),
            client.vector_upsert("Paused", [{"vector": [0, 1]}]),
            client.vector_list_collections(),
        ):
            with pytest.raises(DatabaseServiceError) as refused:
                await call
            assert refused.value.code == "tenant_suspended"
        await admin.resume(operator, tenant_id)
        assert await client.vector_count("Paused") == 1  # kept, and nothing written meanwhile
    finally:
        await client.close()


async def test_a_class_dropped_behind_the_services_back_is_a_missing_collection(
    weaviate_stack: Stack, raw: httpx.AsyncClient
) -> None:
    """Within the seconds the service keeps a collection's schema, another instance drops it:
    every operation says collection_not_found, never a server error."""
    tenant_id, client, _ = await _client(weaviate_stack)
    try:
        await client.vector_create_collection("Gone", 2, properties={"n": "int"})
        await client.vector_upsert("Gone", [{"vector": [1, 0], "properties": {"n": 1}}])
        assert (await raw.delete(f"/v1/schema/{class_name(tenant_id, 'Gone')}")).status_code == 200
        where = {"path": "n", "operator": "Equal", "value": 1}
        for call in (
            lambda: client.vector_upsert("Gone", [{"vector": [0, 1]}]),
            lambda: client.vector_search("Gone", [1, 0]),
            lambda: client.vector_count("Gone"),
            lambda: client.vector_get("Gone", [str(uuid.uuid4())]),
            lambda: client.vector_delete("Gone", where=where),
        ):
            with pytest.raises(DatabaseServiceError) as missing:
                await call()
            assert missing.value.code == "collection_not_found", missing.value
        # No class is left behind (a server with auto-schema on makes one for the batch).
        assert (await raw.get(f"/v1/schema/{class_name(tenant_id, 'Gone')}")).status_code == 404
    finally:
        await client.close()


async def test_a_wrong_api_key_is_an_unavailable_store_not_the_callers_fault(
    weaviate_target: WeaviateTarget, pg_cluster: PgCluster, tmp_path: Path
) -> None:
    if not weaviate_target.api_key:
        pytest.fail("the test Weaviate runs with an API key (anonymous access off)")
    wrong = WeaviateTarget(weaviate_target.url, "not-the-key")
    async with weaviate_service(pg_cluster, tmp_path / "data", wrong) as stack:
        _, client, _ = await _client(stack)
        try:
            with pytest.raises(DatabaseServiceError) as refused:
                await client.vector_list_collections()
            assert refused.value.code == "vector_store_unavailable"
            assert "DBSVC_WEAVIATE_API_KEY" in refused.value.message
            assert "not-the-key" not in refused.value.message
        finally:
            await client.close()
        stack.core.health.invalidate()
        entry = (await stack.core.health.document(detailed=True))["dependencies"]["weaviate"]
        assert entry["status"] == "unhealthy" and "credentials" in entry["error"]


async def test_the_longest_collection_name_fits_weaviates_class_names(
    weaviate_stack: Stack,
) -> None:
    _, client, _ = await _client(weaviate_stack)
    name = "L" + "x_9" * 15 + "Zz"  # 48 characters, the most a name may have
    try:
        assert len(name) == 48
        await client.vector_create_collection(name, 2, properties={"p" * 48: "text"})
        await client.vector_upsert(name, [{"vector": [1, 0], "properties": {"p" * 48: "v"}}])
        (hit,) = await client.vector_search(name, [1, 0])
        assert hit["properties"] == {"p" * 48: "v"}
        assert [c["name"] for c in await client.vector_list_collections()] == [name]
    finally:
        await client.close()
