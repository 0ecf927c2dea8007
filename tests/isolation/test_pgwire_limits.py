"""The tenant's statement limit on the PostgreSQL wire port, kept from outside the session:
a statement that traps its own cancel is cancelled, then its backend terminated; outside a
transaction block the client gets 57014 and goes on, inside one its session ends (the
transaction is lost, as when PostgreSQL terminates a backend). The server connection is never
lent again, so the late termination cannot hit another client's transaction."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from database_service.app import Application
from database_service.pgwire.server import ClientSession, PgWireServer
from database_service.tenancy import TenantLimits, TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_pgwire import PortLogin, PortLoginFactory

pytestmark = pytest.mark.usefixtures("unchanged_victim")

FUNCTIONS = {
    # Traps the cancel: only the termination ends it.
    "trapped": (
        "PERFORM set_config('statement_timeout', '0', true);"
        " FOR i IN 1..40 LOOP BEGIN PERFORM pg_sleep(0.2);"
        " EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP;"
    ),
    # Lifts its own limit: the port's cancel ends it.
    "lifted": "PERFORM set_config('statement_timeout', '0', true); PERFORM pg_sleep(8);",
}


@pytest.fixture(scope="module")
async def limited(core: Application) -> TenantRecord:
    return await core.tenants.create(f"pglim_{secrets.token_hex(3)}", TenantLimits(10, 1000))


@pytest.fixture(scope="module")
async def login(
    core: Application, limited: TenantRecord, port_login: PortLoginFactory, pg_cluster: PgCluster
) -> AsyncIterator[PortLogin]:
    # The function is planted on the tenant's own login, straight to PostgreSQL: the guard
    # would refuse what it does.
    conn = await asyncpg.connect(
        pg_cluster.dsn, user=limited.role_name, password=core.secret_box.open(limited.role_secret)
    )
    try:
        for name, body in FUNCTIONS.items():
            await conn.execute(
                f"CREATE OR REPLACE FUNCTION {name}() RETURNS int LANGUAGE plpgsql AS $$"
                f" BEGIN {body} RETURN 1; END $$"
            )
    finally:
        await conn.close()
    yield await port_login(limited.tenant_id)


@pytest.fixture
def relayed_failures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SQLSTATEs of the failed statements the relay reports to Python, in order."""
    failures: list[str] = []
    original = ClientSession.relayed_failed

    def counted(self: ClientSession, verdict: Any, sqlstate: str, message: str) -> None:
        failures.append(sqlstate)
        original(self, verdict, sqlstate, message)

    monkeypatch.setattr(ClientSession, "relayed_failed", counted)
    return failures


async def _busy(core: Application, limited: TenantRecord) -> int:
    return int(
        await core.owner_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1::text[])"
            " AND state <> 'idle'",
            list(limited.roles),
        )
    )


async def _settle(core: Application, limited: TenantRecord) -> None:
    for _ in range(60):
        if await _busy(core, limited) == 0:
            return
        await asyncio.sleep(0.1)
    assert await _busy(core, limited) == 0


@pytest.mark.parametrize("function", FUNCTIONS)
async def test_outside_a_block_the_statement_fails_and_the_client_goes_on(
    login: PortLogin, core: Application, limited: TenantRecord, function: str
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        started = time.perf_counter()
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.fetchval(f"SELECT {function}()")
        assert time.perf_counter() - started < 6
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    await _settle(core, limited)


async def test_a_relayed_statement_past_the_limit_fails_and_the_client_goes_on(
    login: PortLogin,
    core: Application,
    limited: TenantRecord,
    pgwire: PgWireServer,
    pg_cluster: PgCluster,
    relayed_failures: list[str],
) -> None:
    """A statement the relay runs (a shape Python ran once before) that traps its cancel is
    ended by the relay's own timer: the client gets 57014 and goes on, the backend is
    terminated and its server connection never lent again."""
    if pgwire.relay is None:
        pytest.fail("the relay is not built (dbsvc_wire): this test needs it")
    conn = await asyncpg.connect(
        pg_cluster.dsn, user=limited.role_name, password=core.secret_box.open(limited.role_secret)
    )
    try:  # trapped() for n rounds of 0.2 s: a shape with a constant
        body = FUNCTIONS["trapped"].replace("1..40", "1..n")
        await conn.execute(
            "CREATE OR REPLACE FUNCTION trapped_for(n int) RETURNS int LANGUAGE plpgsql AS $$"
            f" BEGIN {body} RETURN 1; END $$"
        )
    finally:
        await conn.close()
    conn = await asyncpg.connect(login.dsn, statement_cache_size=0)
    try:
        await conn.execute("SELECT trapped_for(1)")  # Python runs it; the relay may from now on
        started = time.perf_counter()
        with pytest.raises(asyncpg.QueryCanceledError, match="limit"):
            await conn.execute("SELECT trapped_for(40)")
        assert time.perf_counter() - started < 6
        await asyncio.sleep(0.1)  # the relay's events are drained every 20 ms
        assert len(relayed_failures) == 1  # the relay ran it, and told Python (audit, statistics)
        await _settle(core, limited)
        for _ in range(12):  # the client goes on, and every pooled connection works
            await conn.execute("SELECT trapped_for(0)")
    finally:
        await conn.close()
    await _settle(core, limited)


async def test_a_relayed_statement_whose_backend_dies_is_failed_and_audited(
    login: PortLogin,
    core: Application,
    limited: TenantRecord,
    pgwire: PgWireServer,
    relayed_failures: list[str],
) -> None:
    """A backend terminated under a statement the relay runs: the client is told (08006, its
    session ends, as on the Python path) and the statement counts as failed, not lost."""
    if pgwire.relay is None:
        pytest.fail("the relay is not built (dbsvc_wire): this test needs it")
    conn = await asyncpg.connect(login.dsn, statement_cache_size=0)
    try:
        await conn.execute("SELECT pg_sleep(0.01)")  # Python runs the shape first
        running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(0.9)"))
        await asyncio.sleep(0.3)
        killed = await core.owner_pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE usename = ANY($1::text[]) AND query = 'SELECT pg_sleep(0.9)'",
            list(limited.roles),
        )
        assert killed == 1
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await running
        await asyncio.sleep(0.1)  # the relay's events are drained every 20 ms
        assert relayed_failures == ["57P01"]  # what PostgreSQL said, once
    finally:
        await conn.close()
    await _settle(core, limited)


@pytest.mark.parametrize("function", FUNCTIONS)
async def test_inside_a_block_the_session_ends_and_nothing_else_is_hit(
    login: PortLogin, core: Application, limited: TenantRecord, function: str
) -> None:
    other = await asyncpg.connect(login.dsn)  # another client of the tenant, in a transaction
    conn = await asyncpg.connect(login.dsn)
    done = asyncio.Event()

    async def keep_busy() -> int:
        # Never idle longer than the tenant's idle-in-transaction timeout (2 s here).
        count = 0
        while not done.is_set():
            count += await other.fetchval("SELECT 1")
            await asyncio.sleep(0.3)
        return count

    try:
        await other.execute("BEGIN")
        busy = asyncio.ensure_future(keep_busy())
        await conn.execute("BEGIN")
        started = time.perf_counter()
        with pytest.raises((asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError)):
            await conn.fetchval(f"SELECT {function}()")  # returns once the backend is terminated
        assert time.perf_counter() - started < 6
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await conn.fetchval("SELECT 1")  # the session is over
        await asyncio.sleep(0.5)
        done.set()
        assert await busy > 0  # the other transaction was not hit
        await other.execute("COMMIT")
    finally:
        await conn.close()
        await other.close()
    await _settle(core, limited)
    fresh = await asyncpg.connect(login.dsn)
    try:
        for _ in range(12):  # every pooled connection still works
            assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await fresh.close()
