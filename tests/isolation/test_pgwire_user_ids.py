"""The user id on the PostgreSQL wire port: chosen per connection (startup) and per
transaction (``SET dbsvc.user_id``), kept by the port, and signed by it for each transaction
with ``control.enter_user`` on the tenant's user-scoped login. Whatever a client sends, the
server-side ``dbsvc.user_id`` is never the client's doing: every other spelling is refused, and
a user-scoped transaction sees its user's rows and the company's only.

Rows of tenant A: one per user ``u1``, ``u2`` and one without a user (as test_user_context.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import psycopg
import pytest

from database_service.app import Application
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

SYMBOLS = "SELECT symbol FROM market_data WHERE symbol IN ('PU1', 'PU2', 'PALL') ORDER BY 1"
U1 = [("PALL",), ("PU1",)]
U2 = [("PALL",), ("PU2",)]
COMPANY = [("PALL",), ("PU1",), ("PU2",)]


@pytest.fixture(scope="module")
async def login(core: Application, tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, user_id, symbol)"
        " VALUES ($1, 'u1', 'PU1'), ($1, 'u2', 'PU2'), ($1, NULL, 'PALL')",
        tenants.a.tenant_id,
    )
    return await port_login(tenants.a.tenant_id)


async def symbols(conn: asyncpg.Connection) -> list[tuple[str]]:
    return [tuple(r) for r in await conn.fetch(SYMBOLS)]


async def test_a_startup_parameter_sets_the_user_id(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        assert await symbols(conn) == U1
    finally:
        await conn.close()


async def test_libpq_options_set_the_user_id(login: PortLogin) -> None:
    def run() -> list[tuple[str]]:
        with psycopg.connect(login.dsn, options="-c dbsvc.user_id=u2", autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(SYMBOLS).fetchall()]

    assert await asyncio.to_thread(run) == U2


async def test_set_and_reset_change_the_user_id_for_the_next_transactions(
    login: PortLogin,
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await symbols(conn) == COMPANY
        await conn.execute("SET dbsvc.user_id = 'u1'")
        assert await symbols(conn) == U1
        await conn.execute("SET dbsvc.user_id TO u2")
        assert await symbols(conn) == U2
        await conn.execute("RESET dbsvc.user_id")
        assert await symbols(conn) == COMPANY
    finally:
        await conn.close()


async def test_a_transaction_block_keeps_its_user_and_commits(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        async with conn.transaction(isolation="repeatable_read"):
            assert await symbols(conn) == U1
            await conn.execute("INSERT INTO market_data (user_id, symbol) VALUES ('u1', 'PTX')")
            assert await conn.fetchval("SHOW transaction_isolation") == "repeatable read"
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("DELETE FROM market_data WHERE symbol = 'PTX'")
                raise RuntimeError("rolled back")
        assert await conn.fetchval("SELECT count(*) FROM market_data WHERE symbol = 'PTX'") == 1
        await conn.execute("DELETE FROM market_data WHERE symbol = 'PTX'")
        assert await conn.fetchval("SELECT count(*) FROM market_data WHERE symbol = 'PTX'") == 0
    finally:
        await conn.close()


async def test_psycopg_transactions_with_a_user_id(login: PortLogin) -> None:
    def run() -> tuple[list[tuple[str]], int]:
        with psycopg.connect(login.dsn, options="-c dbsvc.user_id=u1") as conn:
            seen = [tuple(r) for r in conn.execute(SYMBOLS).fetchall()]  # BEGIN (extended)
            conn.execute("INSERT INTO market_data (user_id, symbol) VALUES ('u1', 'PSY')")
            conn.rollback()
            left = conn.execute("SELECT count(*) FROM market_data WHERE symbol = 'PSY'")
            count = left.fetchone()
            conn.commit()
            assert count is not None
            return seen, count[0]

    assert await asyncio.to_thread(run) == (U1, 0)


async def test_the_user_id_cannot_change_inside_a_transaction(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        async with conn.transaction():
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute("SET dbsvc.user_id = 'u2'")
            assert info.value.sqlstate == "25001"
            assert info.value.server_source_function == "dbsvc:invalid_transaction_state"
    finally:
        await conn.close()

    # ... nor in the extended protocol's implicit transaction (psycopg's BEGIN + SET).
    def run() -> str | None:
        with psycopg.connect(login.dsn, options="-c dbsvc.user_id=u1") as conn:
            conn.execute("SELECT 1")
            try:
                conn.execute("SET dbsvc.user_id = 'u2'")
            except psycopg.Error as exc:
                return exc.sqlstate
            return None

    assert await asyncio.to_thread(run) == "25001"


@pytest.mark.parametrize(
    "sql",
    [
        "SET LOCAL dbsvc.user_id = 'u2'",
        "SET LOCAL dbsvc.user_id TO DEFAULT",
        "SELECT set_config('dbsvc.user_id', 'u2', false)",
        "SELECT set_config('dbsvc.user_id', 'u2', true)",
        "SELECT pg_catalog.set_config('dbsvc.user_sig', 'x', true)",
        "SET dbsvc.user_sig = 'x'",
        "SET \"dbsvc.user_sig\" = 'x'",
        "SELECT 1; SET dbsvc.user_id = 'u2'",
        "SET dbsvc.user_id = 'u2'; SELECT 1",
        "SET application_name = 'x'; SET dbsvc.user_id = 'u2'",
        "SELECT dbsvc_control.enter_user('u2', '\\x00'::bytea)",
    ],
)
async def test_every_other_spelling_is_refused(login: PortLogin, sql: str) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(sql)
        assert info.value.sqlstate in ("42501", "42601", "0A000"), info.value
        assert await symbols(conn) == U1  # the user id is still the port's
    finally:
        await conn.close()


@pytest.mark.parametrize("sql", ["RESET ALL", "DISCARD ALL", "RESET ALL; DISCARD ALL"])
async def test_reset_all_returns_to_the_startup_user_id_never_to_none(
    login: PortLogin, sql: str
) -> None:
    """RESET ALL / DISCARD ALL undo a ``SET dbsvc.user_id`` and keep the startup packet's, as
    PostgreSQL's RESET ALL returns to the session defaults: never to the company's rows.
    (No statement cache: DISCARD ALL forgets named statements, as PostgreSQL's does.)"""
    conn = await asyncpg.connect(
        login.dsn, server_settings={"dbsvc.user_id": "u1"}, statement_cache_size=0
    )
    try:
        await conn.execute("SET dbsvc.user_id = 'u2'")
        assert await symbols(conn) == U2
        await conn.execute(sql)
        assert await symbols(conn) == U1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SET \"dbsvc.user_id\" = 'u2'",
        "SET \"DBSVC.USER_ID\" = 'u2'",
        "SET SESSION dbsvc.user_id = u2",
    ],
)
async def test_other_spellings_of_set_are_the_ports_and_never_reach_postgres(
    login: PortLogin, sql: str
) -> None:
    # PostgreSQL folds a setting's name to lower case: these name the same setting, and the
    # port keeps them as it keeps SET dbsvc.user_id. The server's own value is never the
    # client's: a company-wide transaction sees none.
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute(sql)
        assert await symbols(conn) == U2
        await conn.execute("RESET dbsvc.user_id")
        assert await conn.fetchval("SELECT current_setting('dbsvc.user_id', true)") in (None, "")
    finally:
        await conn.close()


@pytest.mark.parametrize("value", ["'a b'", "''", "'" + "x" * 51 + "'", "a, b", "'u1''; --'"])
async def test_an_invalid_user_id_is_refused_and_changes_nothing(
    login: PortLogin, value: str
) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(f"SET dbsvc.user_id = {value}")
        assert info.value.sqlstate == "22023"
        assert info.value.server_source_function == "dbsvc:invalid_parameters"
        assert await symbols(conn) == U1
    finally:
        await conn.close()


async def test_an_invalid_user_id_at_startup_refuses_the_login(login: PortLogin) -> None:
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1'; DROP"})
    assert info.value.sqlstate == "22023"


async def test_a_user_scoped_transaction_holds_the_signed_user_only(
    login: PortLogin, tenants: Tenants
) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        # The server-side setting is the one control.enter_user signed for this transaction.
        assert await conn.fetchval("SELECT current_setting('dbsvc.user_id', true)") == "u1"
        # Writing a row for another user is refused by PostgreSQL's policy.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("INSERT INTO market_data (user_id, symbol) VALUES ('u2', 'PF')")
        # An error in a statement outside a block rolls the port's transaction back; the next
        # statement gets a new one, signed again.
        assert await symbols(conn) == U1
    finally:
        await conn.close()


async def test_the_port_opens_user_transactions_on_the_user_scoped_login(
    login: PortLogin, tenants: Tenants
) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        assert await conn.fetchval("SELECT session_user") == tenants.a.user_role_name
        await conn.execute("RESET dbsvc.user_id")
        assert await conn.fetchval("SELECT session_user") == tenants.a.role_name
    finally:
        await conn.close()


async def test_raw_simple_query_begin_and_commit_with_a_user_id(
    login: PortLogin, raw_login: RawClient
) -> None:
    answers = await raw_login.query("SET dbsvc.user_id = 'u1'")
    assert [k for k, _ in answers] == [b"C", b"Z"] and answers[-1][1] == b"I"
    begin = await raw_login.query("BEGIN")
    assert [k for k, _ in begin] == [b"C", b"Z"] and begin[-1][1] == b"T"
    read = await raw_login.query(SYMBOLS)
    assert read[-1][1] == b"T" and not sqlstates(read)
    rows = [p for k, p in read if k == b"D"]
    assert len(rows) == 2
    again = await raw_login.query("BEGIN")  # as PostgreSQL: a warning, still in the block
    assert [k for k, _ in again] == [b"N", b"C", b"Z"]
    commit = await raw_login.query("COMMIT")
    assert commit[-1][1] == b"I"
    after = await raw_login.query("SELECT 1")
    assert after[-1] == (b"Z", b"I")


@pytest.fixture
async def raw_login(login: PortLogin, pgwire: PgWireServer) -> AsyncIterator[RawClient]:
    client = await RawClient.open(pgwire)
    seen = await client.login(login)
    assert seen[-1][:1] == b"Z", seen
    yield client
    client.close()


def _bind_execute_sync(raw: RawClient, statement: str) -> None:
    raw.send(b"B", b"\x00" + statement.encode() + b"\x00" + b"\x00\x00\x00\x00\x00\x00")
    raw.send(b"E", b"\x00\x00\x00\x00\x00")
    raw.send(b"S")


async def test_a_begin_prepared_before_the_user_id_is_set_opens_a_signed_transaction(
    raw_login: RawClient,
) -> None:
    raw_login.send(b"P", b"b1\x00BEGIN\x00\x00\x00")
    raw_login.send(b"S")
    assert [k for k, _ in await raw_login.until_ready()] == [b"1", b"Z"]
    await raw_login.query("SET dbsvc.user_id = 'u1'")
    _bind_execute_sync(raw_login, "b1")
    answer = await raw_login.until_ready()
    assert [k for k, _ in answer] == [b"2", b"C", b"Z"] and answer[-1][1] == b"T"
    inside = await raw_login.query("SELECT current_setting('dbsvc.user_id', true)")
    assert next(p for k, p in inside if k == b"D").endswith(b"u1") and inside[-1][1] == b"T"
    assert (await raw_login.query("COMMIT"))[-1] == (b"Z", b"I")


async def test_a_begin_prepared_with_a_user_id_runs_as_a_real_begin_after_reset(
    raw_login: RawClient, tenants: Tenants
) -> None:
    await raw_login.query("SET dbsvc.user_id = 'u1'")
    raw_login.send(b"P", b"b2\x00BEGIN\x00\x00\x00")
    raw_login.send(b"S")
    assert [k for k, _ in await raw_login.until_ready()] == [b"1", b"Z"]
    await raw_login.query("RESET dbsvc.user_id")
    _bind_execute_sync(raw_login, "b2")
    answer = await raw_login.until_ready()
    assert [k for k, _ in answer] == [b"2", b"C", b"Z"] and answer[-1][1] == b"T"
    who = await raw_login.query("SELECT session_user")
    assert next(p for k, p in who if k == b"D").endswith(tenants.a.role_name.encode())
    assert who[-1][1] == b"T"  # still inside the client's transaction
    assert (await raw_login.query("ROLLBACK"))[-1] == (b"Z", b"I")


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
async def test_reset_all_inside_a_transaction_resets_the_user_id_only_at_commit(
    login: PortLogin, tenants: Tenants, end: str
) -> None:
    """RESET ALL in a transaction block, as PostgreSQL's: transactional. The transaction's own
    user stays (signed when it began, never reset by the tenant's SQL); a SET user id goes back
    to the startup one when the transaction commits, and stays when it rolls back."""
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        await conn.execute("SET dbsvc.user_id = 'u2'")
        await conn.execute("BEGIN")
        await conn.execute("RESET ALL")
        assert await symbols(conn) == U2
        assert await conn.fetchval("SELECT current_setting('dbsvc.user_id', true)") == "u2"
        assert await conn.fetchval("SELECT session_user") == tenants.a.user_role_name
        await conn.execute(end)
        assert await symbols(conn) == (U1 if end == "COMMIT" else U2)
    finally:
        await conn.close()


async def test_tenant_cannot_reset_its_role_or_user_id_with_reset_all_in_a_transaction(
    login: PortLogin, tenants: Tenants
) -> None:
    """A transaction of a startup user: RESET ALL there leaves the user-scoped role, the signed
    user id and the port's statement limit as they were, during the transaction and after it
    (a startup user id is the session default: never the company's rows)."""
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        limit = await conn.fetchval("SHOW statement_timeout")
        async with conn.transaction():
            await conn.execute("RESET ALL")
            assert await symbols(conn) == U1
            assert await conn.fetchval("SELECT current_setting('dbsvc.user_id', true)") == "u1"
            assert await conn.fetchval("SELECT session_user") == tenants.a.user_role_name
            assert await conn.fetchval("SELECT current_user") == tenants.a.user_role_name
            assert await conn.fetchval("SHOW statement_timeout") == limit
        assert await symbols(conn) == U1
        assert await conn.fetchval("SELECT session_user") == tenants.a.user_role_name
    finally:
        await conn.close()
