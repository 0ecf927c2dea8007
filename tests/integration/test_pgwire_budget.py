"""The wire port's server connections count against the service's PostgreSQL budget
(``DBSVC_POOL_GLOBAL_MAX``, the tenant pools' cap): with a cap of 3, port clients and the REST
front end together never hold more than 3 tenant connections (counted in pg_stat_activity),
and a port client that cannot get one within the acquisition timeout gets 53300 at once
instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire.server import PgWireServer
from database_service.tenancy import TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings

CAP = 3
ACQUIRE_SECONDS = 1.0
RWA = (Scope.READ, Scope.WRITE, Scope.ADMIN)


@dataclass
class Small:
    app: Application
    port: PgWireServer
    http: httpx.AsyncClient
    tenants: list[TenantRecord]
    dsns: list[str]  # the port, as a service of each tenant
    headers: list[dict[str, str]]  # REST, as a service of each tenant


@pytest.fixture(scope="module")
async def small(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Small]:
    settings = make_settings(
        pg_cluster,
        tmp_path_factory.mktemp("budget"),
        pool_global_max=CAP,
        pool_max_per_tenant=2,
        pool_acquire_timeout_seconds=ACQUIRE_SECONDS,
    )
    async with Application(settings, start_nats=False, maintain_partitions=False) as app:
        port = PgWireServer(app, host="127.0.0.1", port=0)
        await port.start()
        tenants, dsns, headers = [], [], []
        for _ in range(3):
            tenant = await app.tenants.create(f"budget_{secrets.token_hex(3)}")
            name = f"pgb-{secrets.token_hex(4)}"
            _, secret = await app.services.register(name, tenants=[tenant.tenant_id], scopes=RWA)
            token = app.tokens.issue(name, tenants=[tenant.tenant_id], scopes=RWA, ttl_seconds=600)
            tenants.append(tenant)
            dsns.append(
                f"postgresql://{name}:{secret}@127.0.0.1:{port.port}/{tenant.tenant_id}"
                "?sslmode=disable"
            )
            headers.append({"Authorization": f"Bearer {token}"})
        for dsn in dsns:
            # A first login learns the server's parameters on a server connection (kept idle:
            # the cap is then full of idle port connections, closed as others need room).
            await (await asyncpg.connect(dsn)).close()
        transport = httpx.ASGITransport(app=create_http_app(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            try:
                yield Small(app, port, http, tenants, dsns, headers)
            finally:
                await port.close()


async def tenant_connections(small: Small) -> int:
    roles = [t.role_name for t in small.tenants]
    count = await small.app.owner_pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename LIKE ANY ($1::text[])",
        [role + "%" for role in roles],
    )
    return int(count)


def _state(small: Small) -> dict[str, object]:
    """What holds or waits for the budget now (for settling, and for a failure's message)."""
    relay = small.port.relay
    return {
        "budget_open": small.app.pools.open_connections,
        "budget_waiting": small.app.pools.starved(),
        "rest_in_use": {t: s.in_use for t, s in small.app.pools.stats().items() if s.in_use},
        "port_pools": [
            (p.login.tenant_id, p.open, len(p.idle), len(p.waiters)) for p in small.port.pools.all()
        ],
        "relay_lent": relay.lent if relay is not None else 0,
        "port_sessions": len(small.port.sessions),
    }


async def _settled(small: Small) -> None:
    """Wait until nothing of an earlier test holds or waits for a connection: no port session
    or relay holding one, nothing waiting for room, no REST request. What ends (a server the
    relay keeps for a second, a lend still waiting for room, a REST pool closing) ends within
    seconds; what does not is a leak, and fails here with what holds it."""
    for _ in range(100):
        relay = small.port.relay
        if (
            not small.app.pools.starved()
            and not any(s.in_use for s in small.app.pools.stats().values())
            and (relay is None or relay.lent == 0)
            and not small.port.sessions
            and all(p.open == len(p.idle) and not p.waiters for p in small.port.pools.all())
        ):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"connections still held or awaited after 10 s: {_state(small)}")


async def test_port_and_rest_together_never_exceed_the_cap(small: Small) -> None:
    peak = 0
    stop = asyncio.Event()
    outcomes: dict[str, int] = {}

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await tenant_connections(small))
            await asyncio.sleep(0.02)

    async def through_port(index: int) -> None:
        conn = await asyncpg.connect(small.dsns[index % 3], statement_cache_size=0)
        try:
            for _ in range(4):
                try:
                    await conn.execute("SELECT pg_sleep(0.1)")
                    outcomes["port ok"] = outcomes.get("port ok", 0) + 1
                except asyncpg.PostgresError as exc:
                    assert exc.sqlstate == "53300", exc
                    outcomes["port 53300"] = outcomes.get("port 53300", 0) + 1
        finally:
            await conn.close()

    async def through_rest(index: int) -> None:
        tenant = small.tenants[index % 3]
        for _ in range(4):
            response = await small.http.post(
                "/api/v1/query",
                json={"sql": "SELECT pg_sleep(0.1)", "params": [], "tenant_id": tenant.tenant_id},
                headers=small.headers[index % 3],
            )
            assert response.status_code in (200, 429), response.text
            key = "rest ok" if response.status_code == 200 else "rest exhausted"
            outcomes[key] = outcomes.get(key, 0) + 1

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(through_port(i) for i in range(6)),
                             *(through_rest(i) for i in range(6)))  # fmt: skip
    finally:
        stop.set()
        await sampler
    assert 0 < peak <= CAP, (peak, outcomes)
    assert outcomes.get("port ok", 0) > 0 and outcomes.get("rest ok", 0) > 0, outcomes
    assert small.app.pools.open_connections <= CAP


async def test_a_client_without_room_gets_53300_within_the_acquire_timeout(
    small: Small,
) -> None:
    await _settled(small)
    holders: list[asyncpg.Connection] = []
    try:
        # Three transactions held open on the port (tenants 0, 0, 1): the whole budget.
        for index in (0, 0, 1):
            conn = await asyncpg.connect(small.dsns[index], statement_cache_size=0)
            holders.append(conn)
            try:
                await conn.execute("BEGIN")
            except asyncpg.PostgresError as exc:
                raise AssertionError(f"{exc}: {_state(small)}") from exc
            await conn.execute("SELECT 1")
        assert await tenant_connections(small) == CAP
        late = await asyncpg.connect(small.dsns[2], statement_cache_size=0)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(asyncpg.PostgresError) as info:
                await late.execute("SELECT 1")
            waited = asyncio.get_running_loop().time() - started
            assert info.value.sqlstate == "53300"
            assert info.value.server_source_function == "dbsvc:too_many_connections"
            assert ACQUIRE_SECONDS * 0.9 <= waited < ACQUIRE_SECONDS + 3
            # The REST front end is told the same (resource_exhausted).
            response = await small.http.post(
                "/api/v1/query",
                json={"sql": "SELECT 1", "params": [], "tenant_id": small.tenants[2].tenant_id},
                headers=small.headers[2],
            )
            assert response.status_code == 429 and "resource_exhausted" in response.text
            # Room again once a transaction ends: the late client goes on.
            await holders[0].execute("COMMIT")
            assert await late.fetchval("SELECT 2") == 2
        finally:
            await late.close()
    finally:
        for conn in holders:
            with contextlib.suppress(Exception):
                await conn.close()


async def _relay_holds(small: Small, count: int) -> None:
    """Wait (2 s at most) until the relay holds ``count`` server connections."""
    assert small.port.relay is not None
    for _ in range(200):
        if small.port.relay.lent >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the relay holds {small.port.relay.lent}, not {count}: {_state(small)}")


async def test_server_connections_the_relay_holds_idle_make_room_for_a_waiter(
    small: Small,
) -> None:
    """The relay keeps a server connection a while after its statement (for the next); with
    the budget full, a client that needs room gets it from those at once, not a 53300 after
    the acquisition timeout. Without a relay (not built) this is the plain pool's case."""
    await _settled(small)
    if small.port.relay is None:
        pytest.fail("the relay is not built (dbsvc_wire): this test needs it")
    clients = [await asyncpg.connect(small.dsns[i], statement_cache_size=0) for i in (0, 2)]
    holders: list[asyncpg.Connection] = []
    try:
        for conn in clients:
            for _ in range(3):  # the first of a shape runs in Python, the next in the relay
                await conn.execute("SELECT 1")  # a simple Query (the relay runs those)
        await _relay_holds(small, 2)
        # Transactions of tenant 1 need two server connections: the budget (3) is full of
        # the relay's idle ones and whatever the pools keep idle.
        for _ in range(2):
            conn = await asyncpg.connect(small.dsns[1], statement_cache_size=0)
            holders.append(conn)
            await conn.execute("BEGIN")
            assert await conn.fetchval("SELECT 1") == 1
        assert await tenant_connections(small) <= CAP
        # The relay's clients still get served, once the transactions end.
        for conn in holders:
            await conn.execute("COMMIT")
        for conn in clients:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        for conn in (*clients, *holders):
            with contextlib.suppress(Exception):
                await conn.close()


async def test_a_rest_pool_that_goes_idle_makes_room_for_a_port_client_waiting(
    small: Small,
) -> None:
    """A port client that waits for room while a REST request holds the last connection gets
    it when that request ends (its pool, idle then, is closed for the waiter), not a 53300
    at the acquisition timeout."""
    await _settled(small)
    holders: list[asyncpg.Connection] = []
    late: asyncpg.Connection | None = None
    try:
        for _ in range(2):  # two of the three: transactions of tenant 0 on the port
            conn = await asyncpg.connect(small.dsns[0], statement_cache_size=0)
            holders.append(conn)
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1")
        rest = asyncio.create_task(
            small.http.post(
                "/api/v1/query",
                json={
                    "sql": "SELECT pg_sleep(0.4)",
                    "params": [],
                    "tenant_id": small.tenants[1].tenant_id,
                },
                headers=small.headers[1],
            )
        )
        for _ in range(200):  # the REST request holds the third
            if small.app.pools.stats().get(small.tenants[1].tenant_id, None) and (
                small.app.pools.stats()[small.tenants[1].tenant_id].in_use
            ):
                break
            await asyncio.sleep(0.01)
        late = await asyncpg.connect(small.dsns[2], statement_cache_size=0)
        await late.execute("BEGIN")  # waits for room: the REST request ends within the timeout
        await late.execute("SELECT 1")
        assert (await rest).status_code == 200
        assert await tenant_connections(small) <= CAP
    finally:
        for conn in (*holders, *([late] if late is not None else [])):
            with contextlib.suppress(Exception):
                await conn.close()
