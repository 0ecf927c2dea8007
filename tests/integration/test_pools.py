"""Per-tenant pools under a global cap, against real PostgreSQL logins."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.errors import ResourceExhausted
from database_service.postgres import TenantLogin, TenantPools
from tests.fix_service import ClientFactory, TenantFactory


async def logins(core: Application, new_tenant: TenantFactory, n: int) -> list[TenantLogin]:
    tenants = [await new_tenant("pool") for _ in range(n)]
    return [
        TenantLogin(t.tenant_id, t.role_name, core.secret_box.open(t.role_secret)) for t in tenants
    ]


def pools_for(
    core: Application,
    *,
    max_per_tenant: int,
    global_max: int,
    idle_seconds: float = 30,
    acquire_timeout: float = 2,
) -> TenantPools:
    return TenantPools(
        core.endpoints.postgres_dsn,
        max_per_tenant=max_per_tenant,
        global_max=global_max,
        idle_seconds=idle_seconds,
        acquire_timeout=acquire_timeout,
    )


async def test_each_tenant_connects_as_its_own_role(
    core: Application, new_tenant: TenantFactory
) -> None:
    a, b = await logins(core, new_tenant, 2)
    async with pools_for(core, max_per_tenant=2, global_max=4) as pools:
        for login in (a, b):
            async with pools.acquire(login) as conn:
                assert await conn.fetchval("SELECT session_user") == login.role
        assert set(pools.stats()) == {a.tenant_id, b.tenant_id}


async def test_global_cap_evicts_idle_pools_to_make_room(
    core: Application, new_tenant: TenantFactory
) -> None:
    a, b, c = await logins(core, new_tenant, 3)
    async with pools_for(core, max_per_tenant=1, global_max=2) as pools:
        for login in (a, b, c):
            async with pools.acquire(login) as conn:
                await conn.fetchval("SELECT 1")
        assert pools.open_connections <= 2
        assert c.tenant_id in pools.stats()


async def test_global_cap_refuses_when_every_connection_is_busy(
    core: Application, new_tenant: TenantFactory
) -> None:
    a, b = await logins(core, new_tenant, 2)
    async with pools_for(core, max_per_tenant=1, global_max=1, acquire_timeout=0.5) as pools:
        async with pools.acquire(a) as conn:
            await conn.fetchval("SELECT 1")
            with pytest.raises(ResourceExhausted, match="connections are all in use"):
                async with pools.acquire(b):
                    pass


async def test_idle_pools_are_closed(core: Application, new_tenant: TenantFactory) -> None:
    (a,) = await logins(core, new_tenant, 1)
    async with pools_for(core, max_per_tenant=1, global_max=2, idle_seconds=0.3) as pools:
        async with pools.acquire(a) as conn:
            await conn.fetchval("SELECT 1")
        for _ in range(40):
            if not pools.stats():
                break
            await asyncio.sleep(0.1)
        assert pools.stats() == {} and pools.open_connections == 0


async def test_suspending_a_tenant_closes_its_pool(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("pool_susp")
    login = TenantLogin(
        tenant.tenant_id, tenant.role_name, core.secret_box.open(tenant.role_secret)
    )
    async with core.pools.acquire(login) as conn:
        await conn.fetchval("SELECT 1")
    assert tenant.tenant_id in core.pools.stats()
    await core.tenants.suspend(tenant.tenant_id)
    assert tenant.tenant_id not in core.pools.stats()
    await core.tenants.resume(tenant.tenant_id)


async def test_requests_recover_when_postgres_terminates_pooled_connections(
    core: Application, new_tenant: TenantFactory, client_for: ClientFactory
) -> None:
    # A failover or an operator's pg_terminate_backend kills idle pooled connections; the next
    # request must get a fresh one, not an error.
    tenant = await new_tenant("pool_kill")
    client = await client_for(tenant, (Scope.READ,))
    for _ in range(3):
        assert (await client.fetch_all("SELECT 1")).rows == [(1,)]
    killed = await core.owner_pool.fetchval(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
        tenant.role_name,
    )
    assert killed >= 1
    for _ in range(3):
        assert (await client.fetch_all("SELECT 1")).rows == [(1,)]


async def test_eviction_never_closes_a_pool_that_became_busy_while_another_closed(
    core: Application, new_tenant: TenantFactory
) -> None:
    """Eviction walks a list of idle pools and awaits each close; a pool further down that list
    may get a request meanwhile, and must then be left alone (its in_use is checked again)."""
    a, b, c = await logins(core, new_tenant, 3)
    async with pools_for(core, max_per_tenant=1, global_max=2, acquire_timeout=1.5) as pools:
        for login in (b, c):  # both idle, B the least recently used: closed first
            async with pools.acquire(login) as conn:
                await conn.fetchval("SELECT 1")
        entry_b = pools._entries[(b.role, "oltp")]
        closing = asyncio.Event()

        class SlowToClose:
            """B's pool, whose close takes half a second (asyncpg's Pool has slots)."""

            def __init__(self, pool: Any) -> None:
                self._pool = pool

            def __getattr__(self, name: str) -> Any:
                return getattr(self._pool, name)

            async def close(self) -> None:
                closing.set()
                await asyncio.sleep(0.5)
                await self._pool.close()

        entry_b.pool = SlowToClose(entry_b.pool)  # type: ignore[assignment]
        # Room never appears, so eviction goes on down its list after B.
        pools._budget.limit = 0

        async def c_works() -> int:
            await closing.wait()
            async with pools.acquire(c) as conn:
                found = int(await conn.fetchval("SELECT 1 FROM pg_sleep(1)"))
                # Checked while the request still holds it (once idle, with A waiting for
                # room, it may be closed for A: test_an_idle_pool_is_closed_for_a_waiter).
                assert (c.role, "oltp") in pools._entries, (
                    "C's pool was closed while a request was using it"
                )
                return found

        async def a_wants_room() -> None:
            with pytest.raises(ResourceExhausted):
                async with pools.acquire(a):
                    pass

        busy, _ = await asyncio.gather(c_works(), a_wants_room())
        assert busy == 1
        assert (b.role, "oltp") not in pools._entries
        pools._budget.limit = 2  # C's pool, closed for A once idle, opens again
        async with pools.acquire(c) as conn:
            assert await conn.fetchval("SELECT session_user") == c.role


async def test_an_idle_pool_is_closed_for_a_waiter(
    core: Application, new_tenant: TenantFactory
) -> None:
    """A request that waits for room under the cap gets it when another tenant's request
    ends (that pool, idle now, is closed for it), not at the acquisition timeout: eviction
    ran before it began to wait, while that pool was busy."""
    a, b = await logins(core, new_tenant, 2)
    async with pools_for(core, max_per_tenant=1, global_max=1, acquire_timeout=3) as pools:
        started = asyncio.Event()

        async def b_works() -> None:
            async with pools.acquire(b) as conn:
                started.set()
                await conn.fetchval("SELECT pg_sleep(0.3)")

        async def a_waits() -> int:
            await started.wait()
            async with pools.acquire(a) as conn:
                return int(await conn.fetchval("SELECT 1"))

        _, got = await asyncio.gather(b_works(), a_waits())
        assert got == 1
        assert (b.role, "oltp") not in pools._entries  # closed for A
        assert pools._budget.waiting == 0


async def test_a_busy_pool_still_bounds_the_wait_for_a_connection(
    core: Application, new_tenant: TenantFactory
) -> None:
    # An idle connected connection is handed over with no deadline armed (nothing waits); a
    # pool whose connections are all in use still refuses after the acquisition limit.
    from database_service.postgres.pools import _idle_connected

    (login,) = await logins(core, new_tenant, 1)
    async with pools_for(core, max_per_tenant=1, global_max=10, acquire_timeout=0.5) as pools:
        async with pools.acquire(login) as conn:
            first = conn.get_server_pid()
        await pools.drain()  # its reset (a round trip) runs after the block
        entry = pools._entries[(login.role, "oltp")]
        assert _idle_connected(entry.pool)
        async with pools.acquire(login) as conn:
            assert conn.get_server_pid() == first
            assert not _idle_connected(entry.pool)
            with pytest.raises(ResourceExhausted, match="no connection free within"):
                async with pools.acquire(login):
                    pass
        await pools.drain()
        assert entry.in_use == 0
        # A pooled connection that was closed is not taken for an idle one: it reconnects.
        async with pools.acquire(login) as conn:
            conn.terminate()
        await pools.drain()
        assert not _idle_connected(entry.pool)
        async with pools.acquire(login) as conn:
            assert await conn.fetchval("SELECT 1") == 1


@pytest.fixture
async def login(core: Application, new_tenant: TenantFactory) -> TenantLogin:
    (one,) = await logins(core, new_tenant, 1)
    return one


def _entry(pools: TenantPools, login: TenantLogin) -> Any:
    """The login's OLTP pool entry."""
    return pools._entries[(login.role, "oltp")]


async def test_a_connection_released_after_the_answer_serves_the_next_request_at_once(
    core: Application, login: TenantLogin
) -> None:
    # Back-to-back requests on a pool of one each find the connection back (a release with a
    # reset runs after the block, in a task): the next acquire waits for a pending release,
    # not for the acquisition limit, and the pool never opens a second connection.
    async with pools_for(core, max_per_tenant=1, global_max=10, acquire_timeout=0.5) as pools:
        pids = set()
        for _ in range(50):
            async with pools.acquire(login) as conn:
                pids.add(conn.get_server_pid())
                assert await conn.fetchval("SELECT 1") == 1
        assert len(pids) == 1
        entry = _entry(pools, login)
        await pools.drain()
        assert entry.in_use == 0


async def test_closing_the_pools_finishes_the_releases_under_way(
    core: Application, login: TenantLogin
) -> None:
    async with pools_for(core, max_per_tenant=2, global_max=10) as pools:
        for _ in range(2):
            async with pools.acquire(login) as conn:
                await conn.execute("SET application_name = 'left behind'")  # needs a reset
        entry = _entry(pools, login)
        assert pools._releasing and entry.in_use == 1  # the last release: not run yet
    assert not pools._releasing and entry.in_use == 0  # close() waited for it


async def _kept(pools: TenantPools, login: TenantLogin) -> tuple[int, Any]:
    """One request that needs no reset (as the query core's stateless reads): its connection
    is kept for the next one. Its server pid, and the login's pool entry."""
    async with pools.acquire(login) as conn:
        pid: int = conn.get_server_pid()
        await conn.fetchval("SELECT 1")
        conn.skip_next_reset()  # type: ignore[union-attr]
    return pid, _entry(pools, login)


async def test_a_connection_that_needs_no_reset_is_kept_for_the_next_request(
    core: Application, login: TenantLogin
) -> None:
    async with pools_for(core, max_per_tenant=2, global_max=10) as pools:
        pid, entry = await _kept(pools, login)
        assert len(entry.ready) == 1 and entry.in_use == 0
        assert pools.stats()[login.tenant_id].idle == 1  # counted idle, though asyncpg lent it
        async with pools.acquire(login) as conn:
            assert conn.get_server_pid() == pid and not entry.ready
            # Its next user must say again that it needs no reset: this one changed the session.
            assert conn._con.reset_needed  # type: ignore[union-attr]
            await conn.execute("SET application_name = 'left behind'")
        await pools.drain()
        assert not entry.ready  # reset and given back to asyncpg, not kept
        async with pools.acquire(login) as conn:
            assert conn.get_server_pid() == pid
            assert await conn.fetchval("SHOW application_name") == "dbsvc-tenant-oltp"


async def test_a_request_waiting_for_a_connection_gets_the_one_released_not_the_kept_stack(
    core: Application, login: TenantLogin
) -> None:
    # A pool of one, busy: the waiter in asyncpg's queue gets the connection when it is
    # released, even though it needs no reset (kept, it would wait until the acquisition limit).
    async with pools_for(core, max_per_tenant=1, global_max=10, acquire_timeout=2) as pools:
        holding = asyncio.Event()
        go = asyncio.Event()

        async def first() -> None:
            async with pools.acquire(login) as conn:
                holding.set()
                await go.wait()
                conn.skip_next_reset()  # type: ignore[union-attr]

        task = asyncio.create_task(first())
        await holding.wait()

        async def second() -> int:
            async with pools.acquire(login) as conn:
                return int(await conn.fetchval("SELECT 1"))

        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.05)  # queued in asyncpg's acquire
        go.set()
        await task
        async with asyncio.timeout(1):
            assert await waiter == 1
        await pools.drain()  # the waiter's own release (with a reset) runs after it
        entry = _entry(pools, login)
        assert not entry.ready and entry.in_use == 0


async def test_closing_a_pool_gives_its_kept_connections_back_first(
    core: Application, login: TenantLogin
) -> None:
    # asyncpg's close waits for every connection it lent: kept ones must not hold it up.
    async with pools_for(core, max_per_tenant=2, global_max=10) as pools:
        _, entry = await _kept(pools, login)
        async with asyncio.timeout(2):
            await pools.close_tenant(login.tenant_id)
        assert not entry.ready and entry.pool.is_closing()
        assert pools.open_connections == 0


async def test_kept_connections_unused_for_a_second_go_back_to_asyncpg(
    core: Application, login: TenantLogin
) -> None:
    # Back in asyncpg's pool, its inactivity timer closes the ones a quieter load no longer
    # needs (kept, they would stay open while the login is in use at all).
    async with pools_for(core, max_per_tenant=2, global_max=10) as pools:
        _, entry = await _kept(pools, login)
        assert entry.ready and entry.expiry is not None
        await asyncio.sleep(2.2)  # the timer's first run finds it just short of a second
        await pools.drain()
        assert not entry.ready and entry.expiry is None
        assert entry.in_use == 0 and entry.pool.get_idle_size() == 1


async def test_a_kept_connection_postgres_ended_is_not_handed_out(
    core: Application, login: TenantLogin
) -> None:
    async with pools_for(core, max_per_tenant=2, global_max=10) as pools:
        pid, entry = await _kept(pools, login)
        async with core.owner_pool.acquire() as owner:
            assert await owner.fetchval("SELECT pg_terminate_backend($1)", pid)
        conn, _ = entry.ready[-1]
        async with asyncio.timeout(5):
            # Closed, and its holder given back by asyncpg (the proxy then lends nothing).
            while getattr(conn, "_con", None) is not None and not conn.is_closed():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        async with pools.acquire(login) as fresh:
            assert fresh.get_server_pid() != pid
            assert await fresh.fetchval("SELECT 1") == 1
        await pools.drain()
        assert entry.in_use == 0
