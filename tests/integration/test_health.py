"""Health document, Prometheus metrics, performance JSON and OpenAPI, with real readings."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx

from database_service.app import Application
from database_service.observability import NatsProbe
from database_service.supervisor import EmbeddedNats, free_port
from tests.fix_service import TenantFactory


async def test_health_document_has_the_seed_shape_with_real_values(
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    core: Application,
    admin_headers: dict[str, str],
) -> None:
    await new_tenant("health")
    core.health.invalidate()  # documents are cached for a second: one from before the tenant
    response = await http.get("/api/v1/health", headers=admin_headers)
    assert response.status_code == 200
    doc = response.json()
    assert doc["service_name"] == "database-service"
    assert doc["status"] == "healthy"
    assert doc["uptime_seconds"] > 0
    assert set(doc["performance_metrics"]) >= {
        "response_time_ms",
        "throughput_rps",
        "error_rate_percent",
    }
    assert set(doc["system_resources"]) == {
        "cpu_usage_percent",
        "memory_usage_mb",
        "disk_usage_percent",
    }
    assert doc["system_resources"]["memory_usage_mb"] > 10
    pg = doc["dependencies"]["postgresql"]
    assert pg["status"] == "healthy" and pg["latency_ms"] > 0 and pg["server_version"]
    for store in ("clickhouse", "nats", "kafka"):
        assert doc["dependencies"][store] == {"status": "not_configured"}
    # Vectors: the embedded pgvector where this PostgreSQL has it (the embedded 18 does,
    # Debian's 15 does not: then not configured, and health says why).
    vectors = doc["dependencies"]["weaviate"]
    with_pgvector = core.vector_store.version is not None
    assert vectors["status"] == ("healthy" if with_pgvector else "not_configured")
    assert vectors["implementation"] == "embedded pgvector"
    # The relationship graph runs embedded on PostgreSQL (stores/graph) until ArangoDB is set.
    graph = doc["dependencies"]["arangodb"]
    assert graph["status"] == "healthy" and graph["embedded"] is True
    assert "DBSVC_ARANGODB_URL" in graph["note"]
    # Without Redis: L1 alone, and health says what that means.
    cache = doc["dependencies"]["dragonflydb"]
    assert cache["status"] == "not_configured" and "L1 only" in cache["note"]
    assert cache["invalidation"]["mode"] == "local"
    assert "cache_hit_rate" in doc["performance_metrics"]
    active = await core.registry.count_active()
    assert doc["tenant_context"] == {
        "active_tenants": active,
        "tenant_isolation_status": "healthy",
        "isolation_problems": [],
    }
    details = doc["database_details"]["postgresql"]
    assert details["tenant_schemas"] == active and details["active_connections"] >= 1
    assert doc["database_details"]["clickhouse"] == {"status": "not_configured"}
    assert doc["database_details"]["weaviate"]["status"] == vectors["status"]
    assert doc["database_details"]["arangodb"]["status"] == "healthy"
    # Vectors and the graph are kept in PostgreSQL: no second store to span.
    assert doc["multi_db_performance"] == {
        "stores_configured": ["postgresql"],
        "cross_database_queries": {"possible": False, "stores": ["postgresql"]},
        "transaction_consistency": "single_store",
    }


async def test_the_seeds_health_path_serves_the_same_document(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    seed = await http.get("/health", headers=admin_headers)
    ours = await http.get("/api/v1/health", headers=admin_headers)
    assert seed.status_code == ours.status_code == 200
    assert set(seed.json()) == set(ours.json()) and "multi_db_performance" in seed.json()
    anonymous = await http.get("/health")
    assert set(anonymous.json()) == {
        "service_name",
        "status",
        "version",
        "timestamp",
        "dependencies",
    }


async def test_health_is_computed_at_most_once_a_second_however_often_asked(
    http: httpx.AsyncClient, core: Application
) -> None:
    import asyncio

    computed = 0
    original = core.health._document

    async def counting(detailed: bool) -> dict[str, object]:
        nonlocal computed
        computed += 1
        return await original(detailed)

    core.health.invalidate()
    core.health._document = counting  # type: ignore[method-assign]
    try:
        responses = await asyncio.gather(*(http.get("/api/v1/health") for _ in range(50)))
    finally:
        core.health._document = original  # type: ignore[method-assign]
    assert all(r.status_code == 200 for r in responses)
    assert computed == 1


async def test_health_without_credentials_is_status_only(
    http: httpx.AsyncClient, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("health_anon")
    response = await http.get("/api/v1/health")
    assert response.status_code == 200
    doc = response.json()
    assert set(doc) == {"service_name", "status", "version", "timestamp", "dependencies"}
    assert doc["status"] == "healthy"
    assert doc["dependencies"]["postgresql"] == {"status": "healthy", "embedded": False}
    assert doc["dependencies"]["kafka"] == {"status": "not_configured"}
    assert tenant.tenant_id not in response.text and tenant.schema_name not in response.text


async def test_health_with_a_bad_token_is_refused(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/v1/health", headers={"Authorization": "Bearer junk"})
    assert response.status_code == 401


async def test_isolation_status_is_a_real_check(
    http: httpx.AsyncClient, core: Application, admin_headers: dict[str, str]
) -> None:
    shared = core.settings.shared_schema
    await core.owner_pool.execute(f"ALTER TABLE {shared}.market_data NO FORCE ROW LEVEL SECURITY")
    core.health.invalidate()  # documents are cached for a second
    try:
        doc = (await http.get("/api/v1/health", headers=admin_headers)).json()
        assert doc["status"] == "unhealthy"
        assert doc["tenant_context"]["isolation_problems"] == [
            f"RLS not forced on {shared}.market_data"
        ]
        anonymous = await http.get("/api/v1/health")  # what a load balancer sees
        assert anonymous.status_code == 503 and anonymous.json()["status"] == "unhealthy"
        assert "market_data" not in anonymous.text
    finally:
        await core.owner_pool.execute(f"ALTER TABLE {shared}.market_data FORCE ROW LEVEL SECURITY")
        core.health.invalidate()
    assert (await http.get("/api/v1/health")).json()["status"] == "healthy"


async def test_request_figures_come_from_real_requests(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    for _ in range(5):
        await http.get("/openapi.json")
    perf = (await http.get("/api/v1/metrics/performance", headers=admin_headers)).json()
    assert perf["requests"] >= 5 and perf["throughput_rps"] > 0 and perf["response_time_ms"] > 0


async def test_nats_is_probed_when_configured() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp), port=free_port()) as nats_server:
            async with NatsProbe(nats_server.url) as probe:
                healthy = await probe.check()
        assert healthy["status"] == "healthy" and healthy["latency_ms"] >= 0
        down = NatsProbe(nats_server.url)
        assert (await down.check())["status"] == "unhealthy"


async def test_metrics_are_prometheus_text(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await http.get("/api/v1/health")
    assert (await http.get("/metrics")).status_code == 401
    response = await http.get("/metrics", headers=admin_headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "dbsvc_requests_total", "dbsvc_request_duration_seconds_bucket",
        "dbsvc_pool_connections_open_total", "dbsvc_pool_connections_max",
    ):  # fmt: skip
        assert name in text


async def test_openapi_lists_the_api(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    for path in (
        "/api/v1/query", "/api/v1/admin/schema/create", "/api/v1/admin/migration",
        "/api/v1/health", "/api/v1/metrics/performance", "/api/v1/auth/token",
    ):  # fmt: skip
        assert path in paths


async def test_a_background_loop_that_dies_is_restarted_and_shown_in_health(
    http: httpx.AsyncClient, core: Application, admin_headers: dict[str, str]
) -> None:
    import asyncio

    # The pool reaper, made to fail once (as a bug would): it comes back, and health says so.
    failures = 1
    original = core.pools._reap_forever

    async def failing_once() -> None:
        nonlocal failures
        if failures:
            failures -= 1
            raise RuntimeError("reaper bug")
        await original()

    core.pools._reap_forever = failing_once  # type: ignore[method-assign]
    try:
        core.pools._reaper.cancel()  # type: ignore[union-attr]
        await asyncio.gather(core.pools._reaper, return_exceptions=True)  # type: ignore[arg-type]
        core.pools._reaper = core.loops.start("tenant-pool-reaper", core.pools._reap_forever)
        for _ in range(100):
            state = core.loops.document()["tenant-pool-reaper"]
            if state["restarts"] == 1 and state["state"] == "running":
                break
            await asyncio.sleep(0.02)
        core.health.invalidate()
        doc = (await http.get("/api/v1/health", headers=admin_headers)).json()
        reaper = doc["background_loops"]["tenant-pool-reaper"]
        assert reaper["restarts"] == 1 and reaper["last_error"] == "RuntimeError: reaper bug"
        assert reaper["state"] == "running"
        assert "audit-writer" in doc["background_loops"]
    finally:
        core.pools._reap_forever = original  # type: ignore[method-assign]


async def test_the_owners_connections_are_split_so_long_holders_cannot_starve_requests(
    core: Application,
) -> None:
    names = {
        r["application_name"]
        for r in await core.owner_pool.fetch(
            "SELECT DISTINCT application_name FROM pg_stat_activity"
            " WHERE application_name LIKE 'dbsvc-owner%'"
        )
    }
    assert {
        "dbsvc-owner", "dbsvc-owner-audit", "dbsvc-owner-maintenance", "dbsvc-owner-outbox"
    } <= names  # fmt: skip
    # A migration holding every maintenance connection leaves lookups and audit free (and a
    # partition round running meanwhile waits for one, never holding one while it waits).
    async with core.maintenance_pool.acquire(), core.maintenance_pool.acquire():
        assert await core.owner_pool.fetchval("SELECT 1") == 1
        assert await core.audit_pool.fetchval("SELECT 1") == 1
