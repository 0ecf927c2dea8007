"""A driver's own pool over the PostgreSQL wire port: asyncpg's ``Pool.release`` sends its
reset query (``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;``) as one
Query each time a connection goes back; the port answers it, so the pool keeps its connections
(one login each, not one per release) and what a borrower SET is gone for the next one."""

from __future__ import annotations

import secrets

import asyncpg
import pytest

from database_service.app import Application
from database_service.pgwire.server import PgWireServer
from database_service.tenancy import TenantRecord
from tests.fix_pgwire import PortLogin, PortLoginFactory


@pytest.fixture(scope="module")
async def tenant(core: Application) -> TenantRecord:
    return await core.tenants.create(f"pgp_{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
async def login(tenant: TenantRecord, port_login: PortLoginFactory) -> PortLogin:
    return await port_login(tenant.tenant_id)


def logins(core: Application) -> float:
    value = core.metrics.registry.get_sample_value("dbsvc_pgwire_logins_total", {"outcome": "ok"})
    return value or 0.0


def clients_of(pgwire: PgWireServer, service: str) -> int:
    shown = pgwire.show()["clients"]
    assert isinstance(shown, list)
    return sum(1 for row in shown if row.get("user") == service)


async def test_an_asyncpg_pool_logs_in_once_per_connection_not_per_release(
    core: Application, pgwire: PgWireServer, login: PortLogin
) -> None:
    before = logins(core)
    pool = await asyncpg.create_pool(login.dsn, min_size=2, max_size=2)
    assert pool is not None
    try:
        for round_ in range(50):
            async with pool.acquire() as conn:
                assert await conn.fetchval("SELECT $1::int", round_) == round_
        assert logins(core) - before == 2
        assert clients_of(pgwire, login.service) == 2
    finally:
        await pool.close()


async def test_a_setting_made_before_release_is_gone_for_the_next_borrower(
    login: PortLogin,
) -> None:
    pool = await asyncpg.create_pool(
        login.dsn, min_size=1, max_size=1, server_settings={"application_name": "pooled"}
    )
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'borrower'")
            await conn.execute("SET TimeZone = 'Asia/Tokyo'")
            await conn.execute("SET dbsvc.user_id = 'u1'")
            assert await conn.fetchval("SHOW application_name") == "borrower"
            first = conn.get_server_pid()
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == first  # the same connection, not a new login
            assert await conn.fetchval("SHOW application_name") == "pooled"
            assert await conn.fetchval("SHOW TimeZone") != "Asia/Tokyo"
            # No user id left: DDL (refused with one) runs.
            await conn.execute("CREATE TABLE IF NOT EXISTS after_release (x int)")
    finally:
        await pool.close()


async def test_a_connection_released_inside_a_transaction_is_rolled_back_and_kept(
    core: Application, login: PortLogin
) -> None:
    pool = await asyncpg.create_pool(login.dsn, min_size=1, max_size=1)
    assert pool is not None
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS left_open (x int)")
        before = logins(core)
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO left_open VALUES (1)")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM left_open") == 0
        assert logins(core) == before
    finally:
        await pool.close()
