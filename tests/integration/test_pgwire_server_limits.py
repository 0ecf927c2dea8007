"""The wire port's server connections do not stay open for ever: one idle in its pool for
``DBSVC_PGWIRE_SERVER_IDLE_SECONDS`` is closed (as PgBouncer's ``server_idle_timeout``), and
one older than ``DBSVC_PGWIRE_SERVER_LIFETIME_SECONDS`` is closed when it next goes idle
instead of being lent again (as ``server_lifetime``), never in the middle of a transaction.
Checked in PostgreSQL's own pg_stat_activity, the admin view, the health document and the
metrics."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire.server import PgWireServer
from database_service.tenancy import TenantRecord
from tests.fix_pgwire import PortLogin

IDLE = 0.6
LIFETIME = 1.0


@pytest.fixture(scope="module")
async def tenant(core: Application) -> TenantRecord:
    return await core.tenants.create(f"pgl_{secrets.token_hex(4)}")


async def _port(core: Application, **limits: float) -> AsyncIterator[PgWireServer]:
    port = PgWireServer(core, host="127.0.0.1", port=0, max_per_tenant=2, **limits)
    await port.start()
    try:
        yield port
    finally:
        await port.close()


@pytest.fixture
async def idle_port(core: Application) -> AsyncIterator[PgWireServer]:
    async for port in _port(core, server_idle_seconds=IDLE, server_lifetime_seconds=0):
        yield port


@pytest.fixture
async def aging_port(core: Application) -> AsyncIterator[PgWireServer]:
    async for port in _port(core, server_idle_seconds=60, server_lifetime_seconds=LIFETIME):
        yield port


async def _login(core: Application, port: PgWireServer, tenant: TenantRecord) -> PortLogin:
    name = f"pg-{secrets.token_hex(4)}"
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    _, secret = await core.services.register(name, tenants=[tenant.tenant_id], scopes=scopes)
    assert secret is not None
    return PortLogin("127.0.0.1", port.port, name, secret, tenant.tenant_id)


def server_pids(port: PgWireServer, state: str | None = None) -> set[int]:
    rows = port.show()["servers"]
    assert isinstance(rows, list)
    return {r["pid"] for r in rows if state is None or r["state"] == state}


async def backends(core: Application, pids: set[int]) -> set[int]:
    rows = await core.owner_pool.fetch(
        "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
    )
    return {r["pid"] for r in rows}


async def gone(core: Application, pids: set[int]) -> bool:
    """Whether PostgreSQL's backends of ``pids`` have exited (they do so a moment after the
    port closes their connections)."""
    for _ in range(100):
        if not await backends(core, pids):
            return True
        await asyncio.sleep(0.05)
    return False


def closed_metric(core: Application, reason: str) -> float:
    value = core.metrics.registry.get_sample_value(
        "dbsvc_pgwire_servers_closed_total", {"reason": reason}
    )
    return value or 0.0


async def test_an_idle_server_connection_is_closed_after_the_idle_limit(
    core: Application, idle_port: PgWireServer, tenant: TenantRecord
) -> None:
    login = await _login(core, idle_port, tenant)
    before = closed_metric(core, "idle")
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        idle = server_pids(idle_port, "idle")
        assert len(idle) == 1 and await backends(core, idle) == idle
        row = next(r for r in idle_port.show()["servers"] if r["pid"] in idle)  # type: ignore[union-attr,index]
        assert row["age_seconds"] >= 0 and 0 <= row["idle_seconds"] < IDLE
        await asyncio.sleep(IDLE * 3)
        assert server_pids(idle_port) == set()
        assert await gone(core, idle)  # PostgreSQL's backend is gone too
        assert idle_port.servers_closed.get("idle", 0) >= 1
        assert closed_metric(core, "idle") - before >= 1
        health = idle_port.health()
        assert health["server_idle_seconds"] == IDLE and health["servers"] == 0
        # The client never noticed: its next transaction gets a new server connection.
        assert await conn.fetchval("SELECT 2") == 2
        assert len(server_pids(idle_port)) == 1
    finally:
        await conn.close()


async def test_a_busy_server_connection_is_not_closed_for_idleness(
    core: Application, idle_port: PgWireServer, tenant: TenantRecord
) -> None:
    login = await _login(core, idle_port, tenant)
    conn = await asyncpg.connect(login.dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1")
            held = server_pids(idle_port, "active")
            await asyncio.sleep(IDLE * 3)  # lent to this client: not idle in its pool
            assert server_pids(idle_port, "active") == held
            assert await conn.fetchval("SELECT 3") == 3
    finally:
        await conn.close()


async def test_a_server_connection_past_its_lifetime_finishes_its_transaction_then_closes(
    core: Application, aging_port: PgWireServer, tenant: TenantRecord
) -> None:
    login = await _login(core, aging_port, tenant)
    before = closed_metric(core, "lifetime")
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS aging (x int)")
        async with conn.transaction():
            await conn.execute("INSERT INTO aging VALUES (1)")
            first = server_pids(aging_port, "active")
            await asyncio.sleep(LIFETIME * 1.5)  # past its age: still this transaction's
            await conn.execute("INSERT INTO aging VALUES (2)")
            assert server_pids(aging_port, "active") == first
        # Given back past its age: closed, not lent again.
        assert server_pids(aging_port) == set()
        assert await gone(core, first)
        assert await conn.fetchval("SELECT count(*) FROM aging") == 2
        assert server_pids(aging_port).isdisjoint(first)
        assert closed_metric(core, "lifetime") - before >= 1
    finally:
        await conn.close()


async def test_an_idle_server_connection_past_its_lifetime_is_closed_in_the_pool(
    core: Application, aging_port: PgWireServer, tenant: TenantRecord
) -> None:
    login = await _login(core, aging_port, tenant)
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        idle = server_pids(aging_port, "idle")
        assert idle
        await asyncio.sleep(LIFETIME * 2.5)
        assert server_pids(aging_port) == set()
        assert await gone(core, idle)
        assert aging_port.servers_closed.get("lifetime", 0) >= 1
    finally:
        await conn.close()
