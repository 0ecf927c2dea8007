"""Writes that bypass the service reach the cache through PostgreSQL's notifications (control
migration 0009, tenant migration 0004, cache.PostgresInvalidationListener)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from database_service.app import Application
from database_service.cache import Generations, PostgresInvalidationListener
from database_service.tenancy import TenantRecord, quote_ident
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory

pytestmark = pytest.mark.integration


async def wait_for_change(
    generations: Generations, tenant: str, relation: str, before: int, timeout_s: float = 5.0
) -> float:
    started = time.monotonic()
    while True:
        snap = await generations.snapshot(tenant, [relation])
        assert snap is not None
        if dict(snap)[relation] > before:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"no invalidation of {relation}"
        await asyncio.sleep(0.005)


async def generation(generations: Generations, tenant: str, relation: str) -> int:
    snap = await generations.snapshot(tenant, [relation])
    assert snap is not None
    return dict(snap)[relation]


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("cache")


@pytest.fixture
async def owner(pg_cluster: PgCluster) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg_cluster.dsn)
    yield conn
    await conn.close()


def listener_for(
    pg_cluster: PgCluster, core: Application, generations: Generations
) -> PostgresInvalidationListener:
    return PostgresInvalidationListener(
        lambda: asyncpg.connect(pg_cluster.dsn),
        generations,
        control_schema=core.settings.control_schema,
    )


async def test_tenant_tables_are_watched(
    core: Application, tenant: TenantRecord, owner: asyncpg.Connection
) -> None:
    names = await owner.fetch(
        "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
        " WHERE c.relnamespace = $1::regnamespace AND t.tgname = 'dbsvc_cache_insert'",
        tenant.schema_name,
    )
    watched = {r["relname"] for r in names}
    assert {"users", "positions", "mt5_accounts", "trading_history"} <= watched
    assert not {n for n in watched if n.startswith("_ingest_")}


async def test_direct_writes_bump_generations(
    core: Application, pg_cluster: PgCluster, tenant: TenantRecord, owner: asyncpg.Connection
) -> None:
    generations = Generations(None)
    listener = listener_for(pg_cluster, core, generations)
    await listener.start()
    try:
        assert await listener.wait_listening()
        schema = quote_ident(tenant.schema_name)
        users = f"{tenant.schema_name}.users"
        before = await generation(generations, tenant.tenant_id, users)
        await owner.execute(
            f"INSERT INTO {schema}.users (user_id, email, subscription_tier)"
            " VALUES ('u1', 'u1@example.com', 'free')"
        )
        lag = await wait_for_change(generations, tenant.tenant_id, users, before)
        print(f"NOTIFY → generation bump: {lag * 1000:.2f} ms")
        # A rolled-back write notifies nothing.
        before = await generation(generations, tenant.tenant_id, users)
        with pytest.raises(RuntimeError):
            async with owner.transaction():
                await owner.execute(f"DELETE FROM {schema}.users")
                raise RuntimeError("roll back")
        await asyncio.sleep(0.3)
        assert await generation(generations, tenant.tenant_id, users) == before
        # Shared tables: only the tenant whose rows were written is invalidated.
        shared = core.settings.shared_schema
        relation = f"{shared}.tenant_configurations"
        before = await generation(generations, tenant.tenant_id, relation)
        other_before = await generation(generations, "someone_else", relation)
        await owner.execute(
            f"INSERT INTO {quote_ident(shared)}.tenant_configurations"
            " (company_id, config_key, config_value) VALUES ($1, 'k', '{}')",
            tenant.tenant_id,
        )
        await wait_for_change(generations, tenant.tenant_id, relation, before)
        assert await generation(generations, "someone_else", relation) == other_before
        # A partitioned shared table (transition tables on the parent).
        relation = f"{shared}.trading_ticks"
        before = await generation(generations, tenant.tenant_id, relation)
        await owner.execute(
            f"INSERT INTO {quote_ident(shared)}.trading_ticks (time, company_id, user_id, symbol)"
            " VALUES (now(), $1, 'u1', 'EURUSD')",
            tenant.tenant_id,
        )
        await wait_for_change(generations, tenant.tenant_id, relation, before)
        # Tenant '*' (what TRUNCATE of a shared table sends: it has no transition table)
        # reaches every tenant. Sent by hand: truncating a shared table would disturb the
        # session's other tests.
        relation = f"{shared}.tenant_configurations"
        before = await generation(generations, tenant.tenant_id, relation)
        control = quote_ident(core.settings.control_schema)
        await owner.execute(
            f"SELECT pg_notify('dbsvc_invalidate', {control}.cache_signed($1))",
            f"*|{relation}|{10**9}|0",
        )
        await wait_for_change(generations, tenant.tenant_id, relation, before)
        # A table created later in the tenant's schema is watched from creation (event trigger).
        await owner.execute(f"CREATE TABLE {schema}.created_later (a int)")
        relation = f"{tenant.schema_name}.created_later"
        before = await generation(generations, tenant.tenant_id, relation)
        await owner.execute(f"INSERT INTO {schema}.created_later VALUES (1)")
        await wait_for_change(generations, tenant.tenant_id, relation, before)
        assert listener.notifications >= 4
    finally:
        await listener.aclose()


async def test_notifications_count_once_in_redis_with_many_instances(
    core: Application,
    pg_cluster: PgCluster,
    tenant: TenantRecord,
    owner: asyncpg.Connection,
    redis_db_url: str,
) -> None:
    channel = f"dbsvc:invalidate:pg:{time.monotonic_ns()}"
    instances = [Generations(redis_db_url, channel=channel, timeout_s=0.5) for _ in range(3)]
    listeners = [listener_for(pg_cluster, core, g) for g in instances]
    redis = aioredis.Redis.from_url(redis_db_url)
    try:
        for g in instances:
            await g.start()
            assert await g.wait_attached()
        for listener in listeners:
            await listener.start()
            assert await listener.wait_listening()
        positions = f"{tenant.schema_name}.users"
        await owner.execute(
            f"INSERT INTO {quote_ident(tenant.schema_name)}.users (user_id, email,"
            " subscription_tier) VALUES ('once', 'once@example.com', 'free')"
        )
        for g in instances:
            await wait_for_change(g, tenant.tenant_id, positions, 0)
        await asyncio.sleep(0.2)  # every listener has applied it by now
        count = await redis.hget(f"dbsvc:{{{tenant.tenant_id}}}:gen", positions)
        assert int(count or 0) == 1  # three instances heard it; Redis counted it once
        values = {await generation(g, tenant.tenant_id, positions) for g in instances}
        assert values == {1}
    finally:
        for listener in listeners:
            await listener.aclose()
        for g in instances:
            await g.aclose()
        await redis.aclose()
