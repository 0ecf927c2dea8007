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
                return int(await conn.fetchval("SELECT 1 FROM pg_sleep(1)"))

        async def a_wants_room() -> None:
            with pytest.raises(ResourceExhausted):
                async with pools.acquire(a):
                    pass

        busy, _ = await asyncio.gather(c_works(), a_wants_room())
        assert busy == 1
        assert (b.role, "oltp") not in pools._entries
        assert (c.role, "oltp") in pools._entries, (
            "C's pool was closed while a request was using it"
        )
        async with pools.acquire(c) as conn:
            assert await conn.fetchval("SELECT session_user") == c.role


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


async def test_a_connection_released_after_the_answer_serves_the_next_request_at_once(
    core: Application, new_tenant: TenantFactory
) -> None:
    # Back-to-back requests on a pool of one each find the connection back (a release with a
    # reset runs after the block, in a task): the next acquire waits for a pending release,
    # not for the acquisition limit, and the pool never opens a second connection.
    (login,) = await logins(core, new_tenant, 1)
    async with pools_for(core, max_per_tenant=1, global_max=10, acquire_timeout=0.5) as pools:
        pids = set()
        for _ in range(50):
            async with pools.acquire(login) as conn:
                pids.add(conn.get_server_pid())
                assert await conn.fetchval("SELECT 1") == 1
        assert len(pids) == 1
        entry = pools._entries[(login.role, "oltp")]
        await pools.drain()
        assert entry.in_use == 0


async def test_closing_the_pools_finishes_the_releases_under_way(
    core: Application, new_tenant: TenantFactory
) -> None:
    (login,) = await logins(core, new_tenant, 1)
    async with pools_for(core, max_per_tenant=2, global_max=10) as pools:
        for _ in range(2):
            async with pools.acquire(login) as conn:
                await conn.execute("SET application_name = 'left behind'")  # needs a reset
        entry = pools._entries[(login.role, "oltp")]
        assert pools._releasing and entry.in_use == 1  # the last release: not run yet
    assert not pools._releasing and entry.in_use == 0  # close() waited for it
