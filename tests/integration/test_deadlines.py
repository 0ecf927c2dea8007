"""Time limits kept from outside a tenant session (postgres/deadlines.py), on real PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from database_service.app import Application
from database_service.errors import QueryError
from database_service.postgres import TenantLogin
from tests.fix_service import TenantFactory


async def _state(core: Application, pid: int) -> str | None:
    state: str | None = await core.owner_pool.fetchval(
        "SELECT state FROM pg_stat_activity WHERE pid = $1", pid
    )
    return state


def _login(core: Application, tenant: object) -> TenantLogin:
    return core.logins.login(tenant)  # type: ignore[arg-type]


async def test_a_statement_past_its_limit_is_canceled_and_its_connection_dropped(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dl_stmt")
    async with core.pools.acquire(_login(core, tenant)) as conn:
        pid = conn.get_server_pid()
        watch = core.deadlines.watch(
            conn, tenant.role_name, statement_seconds=0.3, total_seconds=30
        )
        started = time.perf_counter()
        with pytest.raises(QueryError) as info:
            async with watch.statement():
                await conn.execute("SET statement_timeout = 0")  # what a tenant could do
                await conn.execute("SELECT pg_sleep(5)")
        elapsed = time.perf_counter() - started
        watch.close()  # closes the connection: it is never handed to the next request
    async with core.pools.acquire(_login(core, tenant)) as again:
        assert again.get_server_pid() != pid
    assert info.value.sqlstate == "57014" and "limit of 300 ms" in info.value.message
    assert elapsed < 2
    for _ in range(40):
        if await _state(core, pid) is None:
            break
        await asyncio.sleep(0.1)
    assert await _state(core, pid) is None


async def test_a_session_idle_in_transaction_past_its_limit_is_ended(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dl_idle")
    async with core.pools.acquire(_login(core, tenant)) as conn:
        pid = conn.get_server_pid()
        watch = core.deadlines.watch(
            conn, tenant.role_name, statement_seconds=10, total_seconds=0.5
        )
        await conn.execute("SET idle_in_transaction_session_timeout = 0")
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
        await asyncio.sleep(0.7)  # a stream whose reader went quiet, holding the transaction
        assert watch.expired == "transaction"
        with pytest.raises(QueryError) as info:
            async with watch.statement():
                await conn.execute("SELECT 1")
        assert info.value.sqlstate == "57014"
        # Terminated by the owner after the grace period, though the client is still attached.
        for _ in range(60):
            if await _state(core, pid) is None:
                break
            await asyncio.sleep(0.1)
        assert await _state(core, pid) is None
        watch.close()


async def test_a_session_within_its_limits_keeps_its_connection(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dl_ok")
    async with core.pools.acquire(_login(core, tenant)) as conn:
        watch = core.deadlines.watch(conn, tenant.role_name, statement_seconds=5, total_seconds=5)
        async with watch.statement():
            assert await conn.fetchval("SELECT 1") == 1
        watch.close()
        assert watch.expired is None
        assert await conn.fetchval("SELECT 2") == 2


async def test_a_cancel_for_another_backend_of_the_same_pid_is_not_sent(
    core: Application, new_tenant: TenantFactory
) -> None:
    # The owner's signal names pid, role and a backend start before the limit passed: a pid
    # that now belongs to another session (here: another role) is left alone.
    tenant = await new_tenant("dl_pid")
    other = await asyncpg.connect(core.endpoints.postgres_dsn)
    try:
        pid = other.get_server_pid()
        signalled = await core.deadlines._signal(
            "pg_cancel_backend", pid, tenant.role_name, time.time()
        )
        assert signalled is False
        assert await other.fetchval("SELECT 1") == 1
    finally:
        await other.close()


async def test_a_short_limit_is_kept_while_longer_ones_are_armed(
    core: Application, new_tenant: TenantFactory
) -> None:
    # One timer serves every session (the earliest deadline known): a session with a short
    # limit, started after sessions with long ones armed it later, still ends on time, and
    # the long ones run on untouched.
    tenant = await new_tenant("dl_mixed")
    login = _login(core, tenant)

    async def long_one() -> int:
        async with core.pools.acquire(login) as conn:
            watch = core.deadlines.watch(
                conn, tenant.role_name, statement_seconds=30, total_seconds=60
            )
            try:
                with watch.statement():
                    value: int = await conn.fetchval("SELECT 7 FROM pg_sleep(1.2)")
                return value
            finally:
                watch.close()

    longs = [asyncio.create_task(long_one()) for _ in range(2)]
    await asyncio.sleep(0.2)
    async with core.pools.acquire(login) as conn:
        watch = core.deadlines.watch(
            conn, tenant.role_name, statement_seconds=0.3, total_seconds=60
        )
        started = time.perf_counter()
        with pytest.raises(QueryError) as info:
            with watch.statement():
                await conn.execute("SELECT pg_sleep(5)")
        elapsed = time.perf_counter() - started
        watch.close()
    assert info.value.sqlstate == "57014" and watch.expired == "statement"
    assert elapsed < 1
    assert await asyncio.gather(*longs) == [7, 7]


async def test_nested_statement_limits_each_keep_their_own(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dl_nested")
    async with core.pools.acquire(_login(core, tenant)) as conn:
        watch = core.deadlines.watch(
            conn, tenant.role_name, statement_seconds=0.4, total_seconds=30
        )
        with pytest.raises(QueryError) as info:
            async with watch.statement():
                with watch.statement():  # ends in time: the outer limit still runs
                    assert await conn.fetchval("SELECT 1") == 1
                await conn.execute("SELECT pg_sleep(5)")
        watch.close()
    assert info.value.sqlstate == "57014" and "limit of 400 ms" in info.value.message


async def test_a_caller_cancel_during_a_statement_stays_a_cancel(
    core: Application, new_tenant: TenantFactory
) -> None:
    # Not the limit's doing: the task's own cancellation (a client gone) propagates as such
    # and the session is not marked expired.
    tenant = await new_tenant("dl_cancel")
    async with core.pools.acquire(_login(core, tenant)) as conn:
        watch = core.deadlines.watch(conn, tenant.role_name, statement_seconds=30, total_seconds=30)

        async def run() -> None:
            with watch.statement():
                await conn.execute("SELECT pg_sleep(5)")

        task = asyncio.create_task(run())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert watch.expired is None
        watch.close()
