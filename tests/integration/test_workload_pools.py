"""Pools per workload (the seed's "connection pools per workload"): a report holds an analytics
connection, never one of the OLTP pool an order needs; bulk loads have their own; each
workload has its own statement limit; health shows each pool."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import QueryError, ResourceExhausted
from database_service.query import TenantContext
from database_service.results import Summary
from database_service.tenancy import TenantLimits, TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings


@pytest.fixture(scope="module")
async def workloads(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Application]:
    """A core whose analytics pool holds one connection, waited for at most 1 s."""
    settings = make_settings(
        pg_cluster,
        tmp_path_factory.mktemp("workloads"),
        pool_max_per_tenant=3,
        pool_analytics_max_per_tenant=1,
        pool_bulk_max_per_tenant=1,
        pool_acquire_timeout_seconds=1.0,
        analytics_statement_timeout_ms=20_000,
    )
    async with Application(settings, start_nats=False, maintain_partitions=False) as app:
        yield app


async def _tenant(app: Application, statement_ms: int = 5_000) -> tuple[TenantRecord, Principal]:
    tenant = await app.tenants.create(
        f"wl_{secrets.token_hex(4)}",
        TenantLimits(connection_limit=10, statement_timeout_ms=statement_ms),
    )
    principal = Principal(
        "svc-wl", frozenset({tenant.tenant_id}), frozenset({Scope.READ, Scope.WRITE, Scope.ADMIN})
    )
    return tenant, principal


async def _report(app: Application, principal: Principal, tenant: TenantRecord, sql: str) -> Any:
    events = app.executor.stream(
        principal, TenantContext(tenant.tenant_id), sql, read_only=True, action="analytics"
    )
    summaries = [e async for e in events if isinstance(e, Summary)]
    return summaries[-1]


async def test_a_report_saturating_its_pool_leaves_the_oltp_pool_to_orders(
    workloads: Application,
) -> None:
    app = workloads
    tenant, principal = await _tenant(app)
    ctx = TenantContext(tenant.tenant_id)
    report = asyncio.create_task(_report(app, principal, tenant, "SELECT pg_sleep(2.5)"))
    for _ in range(200):  # until the report holds the analytics connection
        pools = app.pools.workload_stats().get(tenant.tenant_id, {})
        if pools.get("analytics") and pools["analytics"].in_use == 1:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the report never held its connection")

    # Orders go on meanwhile (30 lookups on the OLTP pool), all answered before the report is.
    latencies = []
    for _ in range(30):
        started = time.perf_counter()
        result = await app.executor.execute(principal, ctx, "SELECT 1 AS ok")
        latencies.append(time.perf_counter() - started)
        assert result.rows == [(1,)]
    assert not report.done()
    # A second report waits for the one analytics connection, not for an OLTP one: refused
    # after the pool's acquisition timeout, naming the pool.
    with pytest.raises(ResourceExhausted, match="analytics pool of 1"):
        await _report(app, principal, tenant, "SELECT 1")
    pools = app.pools.workload_stats()[tenant.tenant_id]
    assert pools["analytics"].in_use == 1 and pools["analytics"].max_size == 1
    assert pools["oltp"].max_size == 3
    summary = await report
    assert summary.row_count == 1
    print(
        f"\nOLTP lookups while a report held the analytics pool: median"
        f" {sorted(latencies)[len(latencies) // 2] * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms"
    )


async def test_each_workload_has_its_own_statement_limit(workloads: Application) -> None:
    app = workloads
    tenant, principal = await _tenant(app, statement_ms=300)
    ctx = TenantContext(tenant.tenant_id)
    with pytest.raises(QueryError) as refused:
        await app.executor.execute(principal, ctx, "SELECT pg_sleep(0.8)")
    assert refused.value.sqlstate == "57014"  # OLTP: the tenant's 300 ms
    summary = await _report(app, principal, tenant, "SELECT pg_sleep(0.8)")
    assert summary.row_count == 1  # analytics: up to 20 s


async def test_bulk_loads_use_the_bulk_pool(workloads: Application) -> None:
    app = workloads
    tenant, principal = await _tenant(app)
    ctx = TenantContext(tenant.tenant_id)
    await app.executor.execute(principal, ctx, "CREATE TABLE fills (id int PRIMARY KEY, qty int)")

    async def batches() -> AsyncIterator[list[list[int]]]:
        yield [[i, i * 10] for i in range(100)]

    assert await app.executor.bulk_insert(principal, ctx, "fills", ["id", "qty"], batches()) == 100
    pools = app.pools.workload_stats()[tenant.tenant_id]
    assert set(pools) == {"oltp", "bulk"} and pools["bulk"].max_size == 1


async def test_health_shows_each_workloads_pool(workloads: Application) -> None:
    app = workloads
    tenant, principal = await _tenant(app)
    await _report(app, principal, tenant, "SELECT 1")
    await app.executor.execute(principal, TenantContext(tenant.tenant_id), "SELECT 1")
    document = await app.health.document()
    across = document["database_details"]["postgresql"]["pool_workloads"]
    assert across["analytics"]["max"] >= 1 and across["oltp"]["max"] >= 3
    mine = await app.observability.performance(
        Principal("svc-wl", frozenset({tenant.tenant_id}), frozenset({Scope.READ})),
        tenant.tenant_id,
    )
    pools = mine["pools"][tenant.tenant_id]
    assert set(pools["workloads"]) == {"oltp", "analytics"}
    assert pools["workloads"]["analytics"]["max"] == 1
