"""Drivers' own pools over the PostgreSQL wire port, as applications run them: SQLAlchemy 2
async (asyncpg and psycopg dialects) and psycopg_pool (async and sync). Each checks many
checkouts and checkins, prepared statements, transactions rolled back, what a borrower SET
against what the next borrower sees, and that the port logs each pooled connection in once
(not once per checkout)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg
import pytest

from database_service.app import Application
from database_service.pgwire.server import PgWireServer
from database_service.tenancy import TenantRecord
from tests.fix_pgwire import PortLogin, PortLoginFactory

ROUNDS = 30


@pytest.fixture(scope="module")
async def tenant(core: Application) -> TenantRecord:
    return await core.tenants.create(f"pgd_{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
async def login(tenant: TenantRecord, port_login: PortLoginFactory) -> PortLogin:
    login = await port_login(tenant.tenant_id)
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int NOT NULL)")
        await conn.execute("INSERT INTO accounts SELECT g, 100 FROM generate_series(1, 10) g")
    finally:
        await conn.close()
    return login


def logins(core: Application) -> float:
    value = core.metrics.registry.get_sample_value("dbsvc_pgwire_logins_total", {"outcome": "ok"})
    return value or 0.0


def clients_of(pgwire: PgWireServer, service: str) -> int:
    shown = pgwire.show()["clients"]
    assert isinstance(shown, list)
    return sum(1 for row in shown if row.get("user") == service)


def url(login: PortLogin, dialect: str) -> str:
    return (
        f"postgresql+{dialect}://{login.service}:{login.secret}@{login.host}:{login.port}/"
        f"{login.tenant_id}"
    )


def _connect_args(dialect: str) -> dict[str, Any]:
    # asyncpg: no SSLRequest; psycopg: prepare every statement from its second execution.
    return (
        {"ssl": False} if dialect == "asyncpg" else {"sslmode": "disable", "prepare_threshold": 1}
    )


# -- SQLAlchemy 2 async ------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["asyncpg", "psycopg"])
async def test_sqlalchemy_pool_checks_out_many_times_on_one_login_per_connection(
    core: Application, pgwire: PgWireServer, login: PortLogin, dialect: str
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    before = logins(core)
    engine = create_async_engine(
        url(login, dialect), pool_size=2, max_overflow=0, connect_args=_connect_args(dialect)
    )
    try:

        async def borrower(offset: int) -> int:
            total = 0
            for round_ in range(ROUNDS):
                async with engine.connect() as conn:
                    result = await conn.execute(
                        text("SELECT balance + :n FROM accounts WHERE id = :id"),
                        {"n": round_, "id": 1 + (offset + round_) % 10},
                    )
                    total += result.scalar_one() - round_
            return total

        assert await asyncio.gather(borrower(0), borrower(5)) == [100 * ROUNDS] * 2
        assert logins(core) - before == 2
        assert clients_of(pgwire, login.service) == 2
    finally:
        await engine.dispose()


@pytest.mark.parametrize("dialect", ["asyncpg", "psycopg"])
async def test_sqlalchemy_transactions_commit_and_roll_back_through_the_pool(
    login: PortLogin, dialect: str
) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        url(login, dialect), pool_size=1, max_overflow=0, connect_args=_connect_args(dialect)
    )
    move = text("UPDATE accounts SET balance = balance + :d WHERE id = :id")
    try:
        async with engine.begin() as conn:
            await conn.execute(move, [{"d": -10, "id": 2}, {"d": 10, "id": 3}])
        with pytest.raises(RuntimeError):
            async with engine.begin() as conn:
                await conn.execute(move, {"d": -50, "id": 2})
                raise RuntimeError("roll back")
        async with engine.connect() as conn:  # checked in without commit: rolled back
            await conn.execute(move, {"d": -70, "id": 2})
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT id, balance FROM accounts WHERE id IN (2, 3)"))
            assert sorted(tuple(r) for r in rows) == [(2, 90), (3, 110)]
        async with engine.begin() as conn:
            await conn.execute(move, [{"d": 10, "id": 2}, {"d": -10, "id": 3}])
    finally:
        await engine.dispose()


@pytest.mark.parametrize("dialect", ["asyncpg", "psycopg"])
async def test_sqlalchemy_a_set_made_in_one_checkout_is_not_seen_by_the_next(
    login: PortLogin, dialect: str
) -> None:
    """SQLAlchemy rolls a connection back at checkin, which undoes a SET made in the
    transaction; one committed is cleared by a reset hook running RESET ALL (inside the
    transaction the driver opens), as SQLAlchemy's documentation suggests for PostgreSQL."""
    from sqlalchemy import event, text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        url(login, dialect), pool_size=1, max_overflow=0, connect_args=_connect_args(dialect)
    )
    resets = 0

    @event.listens_for(engine.sync_engine, "reset")
    def _reset(dbapi_connection: Any, record: Any, state: Any) -> None:
        nonlocal resets
        if not state.terminate_only:
            cursor = dbapi_connection.cursor()
            cursor.execute("RESET ALL")
            cursor.close()
            resets += 1
        dbapi_connection.commit()

    show = text("SHOW TimeZone")
    try:
        async with engine.connect() as conn:
            default = (await conn.execute(show)).scalar_one()
            await conn.execute(text("SET TimeZone = 'Asia/Tokyo'"))
            assert (await conn.execute(show)).scalar_one() == "Asia/Tokyo"
        async with engine.connect() as conn:
            await conn.execute(text("SET TimeZone = 'Europe/Paris'"))
            await conn.execute(text("SET application_name = 'borrowed'"))
            await conn.commit()
            assert (await conn.execute(show)).scalar_one() == "Europe/Paris"
        async with engine.connect() as conn:
            assert (await conn.execute(show)).scalar_one() == default
            assert (await conn.execute(text("SHOW application_name"))).scalar_one() != "borrowed"
        assert resets >= 3
    finally:
        await engine.dispose()


# -- psycopg_pool ------------------------------------------------------------------------------


def _reset_all(conn: Any) -> None:
    """psycopg_pool's reset hook: RESET ALL in a transaction of its own, committed (the pool
    wants the connection idle when the hook returns)."""
    conn.execute("RESET ALL")
    conn.commit()


async def _areset_all(conn: Any) -> None:
    await conn.execute("RESET ALL")
    await conn.commit()


async def test_psycopg_async_pool_prepares_and_logs_in_once_per_connection(
    core: Application, pgwire: PgWireServer, login: PortLogin
) -> None:
    from psycopg_pool import AsyncConnectionPool

    before = logins(core)
    pool = AsyncConnectionPool(
        login.dsn,
        min_size=2,
        max_size=2,
        kwargs={"prepare_threshold": 1},
        reset=_areset_all,
        open=False,
    )
    await pool.open(wait=True)
    try:

        async def borrower(offset: int) -> int:
            total = 0
            for round_ in range(ROUNDS):
                async with pool.connection() as conn:
                    cursor = await conn.execute(
                        "SELECT balance FROM accounts WHERE id = %s", (1 + (offset + round_) % 10,)
                    )
                    row = await cursor.fetchone()
                    assert row is not None
                    total += row[0]
            return total

        assert await asyncio.gather(borrower(0), borrower(3), borrower(6)) == [100 * ROUNDS] * 3
        assert logins(core) - before == 2
        assert clients_of(pgwire, login.service) == 2
        # Server-side prepared statements were used: the port's servers hold some.
        assert any(row["prepared"] for row in pgwire.show()["servers"])  # type: ignore[index,union-attr]
    finally:
        await pool.close()


async def test_psycopg_async_pool_transactions_and_settings_do_not_leak(
    login: PortLogin,
) -> None:
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(login.dsn, min_size=1, max_size=1, reset=_areset_all, open=False)
    await pool.open(wait=True)
    try:
        async with pool.connection() as conn:
            default = (await (await conn.execute("SHOW TimeZone")).fetchone() or ("",))[0]
            await conn.execute("SET TimeZone = 'Asia/Tokyo'")
            await conn.execute("UPDATE accounts SET balance = 0 WHERE id = 4")
            await conn.rollback()
            await conn.execute("SET TimeZone = 'America/Lima'")
            await conn.commit()
        async with pool.connection() as conn:
            assert (await (await conn.execute("SHOW TimeZone")).fetchone() or ("",))[0] == default
            row = await (await conn.execute("SELECT balance FROM accounts WHERE id = 4")).fetchone()
            assert row == (100,)
            async with conn.transaction():
                await conn.execute("UPDATE accounts SET balance = 1 WHERE id = 5")
                await conn.execute("SET application_name = 'inside'")
            await conn.execute("UPDATE accounts SET balance = 100 WHERE id = 5")
            await conn.commit()
        async with pool.connection() as conn:
            row = await (await conn.execute("SHOW application_name")).fetchone()
            assert row is not None and row[0] != "inside"
    finally:
        await pool.close()


async def test_psycopg_sync_pool_runs_through_the_port(core: Application, login: PortLogin) -> None:
    before = logins(core)
    # The port runs on this test's event loop: the blocking pool runs on a thread.
    await asyncio.to_thread(_sync_pool, login)
    assert logins(core) - before == 2


def _sync_pool(login: PortLogin) -> None:
    from psycopg_pool import ConnectionPool

    with ConnectionPool(
        login.dsn,
        min_size=2,
        max_size=2,
        kwargs={"prepare_threshold": 2},
        reset=_reset_all,
    ) as pool:
        pool.wait()
        for round_ in range(ROUNDS):
            with pool.connection() as conn:
                row = conn.execute(
                    "SELECT balance FROM accounts WHERE id = %s", (1 + round_ % 10,)
                ).fetchone()
                assert row == (100,)
                if round_ % 7 == 0:
                    conn.execute("SET DateStyle = 'German'")
                    conn.commit()
        with pool.connection() as conn:
            row = conn.execute("SHOW DateStyle").fetchone()
            assert row is not None and "German" not in row[0]
