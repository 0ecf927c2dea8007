"""A service with ClickHouse analytics on chDB (the real engine, in this process), one per test
session: chDB opens one data path per process, so every analytics test shares it (each test
makes its own tenants). Its replication loop is off: tests drive the replicator themselves
(``drain``), so what they assert is what a batch did. At the end, the triggers' queueing is
turned off again and the queue emptied: the rest of the suite shares the cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.analytics.replicator import REPLICATOR_LOCK_KEY, set_capture
from database_service.app import Application
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings


@pytest.fixture(scope="session")
async def ch_core(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Application]:
    settings = make_settings(
        pg_cluster,
        tmp_path_factory.mktemp("ch-data"),
        clickhouse_enabled=True,
        clickhouse_replicate=False,
    )
    async with Application(settings, start_nats=False) as app:
        yield app
        async with app.owner_pool.acquire() as conn:
            await set_capture(conn, settings.control_schema, False)
            await conn.execute(f"TRUNCATE {settings.control_schema}.analytics_changes")
            await conn.execute(f"TRUNCATE {settings.control_schema}.analytics_inflight")


async def drain(app: Application) -> int:
    """Replicate everything queued, under the replication lock, as the running loop would."""
    assert app.analytics is not None
    conn = await asyncpg.connect(app.postgres_dsn)
    try:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", REPLICATOR_LOCK_KEY)
        return await app.analytics.replicator.drain(conn)
    finally:
        await conn.close()
