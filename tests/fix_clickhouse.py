"""A service with ClickHouse analytics on chDB (the real engine, in its host process), one per
test session (each test makes its own tenants). Its replication loop is off: tests drive the
replicator themselves (``drain``), so what they assert is what a batch did.

The triggers' queueing is cluster-wide, and the rest of the suite shares the cluster: it is on
only inside ``capturing`` (the ``ch`` fixture, and the isolation module's setup), and the queue
is emptied when it is turned off, so other tests' writes cost nothing extra."""

from __future__ import annotations

import contextlib
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
        # No TTL on ClickHouse's ticks: tests replicate ticks from weeks ago (the reports' are
        # from 2026-11-02) and compare them with PostgreSQL, where no retention runs here.
        ts_retention_days=36_500,
    )
    # No partition maintenance: the session's own service does it; a second one's retention
    # would drop other tests' old ticks under them (the 2024 candles).
    async with Application(settings, start_nats=False, maintain_partitions=False) as app:
        await _stop_capture(app)
        yield app
        await _stop_capture(app)


async def _stop_capture(app: Application) -> None:
    control = app.settings.control_schema
    async with app.owner_pool.acquire() as conn:
        await set_capture(conn, control, False)
        await conn.execute(f"TRUNCATE {control}.analytics_changes, {control}.analytics_inflight")


@contextlib.asynccontextmanager
async def capturing(app: Application) -> AsyncIterator[Application]:
    """Changes queued for ClickHouse while inside (as a service with analytics has them).

    Starts from an empty queue: other tests' tenant deletions queue purges whether capture is
    on or not (in the delete's transaction), and those tenants never reached ClickHouse."""
    await _stop_capture(app)
    async with app.owner_pool.acquire() as conn:
        await set_capture(conn, app.settings.control_schema, True)
    try:
        yield app
    finally:
        await _stop_capture(app)


@pytest.fixture
async def ch(ch_core: Application) -> AsyncIterator[Application]:
    """The analytics service, capturing changes for the length of a test."""
    async with capturing(ch_core) as app:
        yield app


async def drain(app: Application) -> int:
    """Replicate everything queued, under the replication lock, as the running loop would."""
    assert app.analytics is not None
    conn = await asyncpg.connect(app.postgres_dsn)
    try:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", REPLICATOR_LOCK_KEY)
        return await app.analytics.replicator.drain(conn)
    finally:
        await conn.close()
