"""A pooled driver's reset statements through the PostgreSQL wire port (RESET ALL, DISCARD ALL,
UNLISTEN *, CLOSE ALL, SELECT pg_advisory_unlock_all(), and asyncpg's four as one Query):
answered by the port from the client's own state, never sent to a server connection other
clients share, and no way around the guard: a reset beside any other statement is refused
whole, the unlock call with anything else is an ordinary (refused) statement, and DISCARD ALL
inside a transaction fails as in PostgreSQL (25001)."""

from __future__ import annotations

import asyncpg
import pytest

from database_service.pgwire import codec
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

ASYNCPG_RESET = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"


@pytest.fixture(scope="module")
async def login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    login = await port_login(tenants.a.tenant_id)
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS reset_probe (id int)")
        await conn.execute("INSERT INTO reset_probe VALUES (1)")
    finally:
        await conn.close()
    return login


async def raw(pgwire: PgWireServer, login: PortLogin) -> RawClient:
    return await RawClient.logged_in(pgwire, login)


def tags(messages: list[tuple[bytes, bytes]]) -> list[str]:
    return [codec.read_cstring(p)[0] for k, p in messages if k == b"C"]


async def test_asyncpgs_reset_query_is_answered_as_postgresql_would(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    client = await raw(pgwire, login)
    try:
        answer = await client.query(ASYNCPG_RESET)
        assert sqlstates(answer) == []
        assert tags(answer) == ["SELECT 1", "CLOSE CURSOR ALL", "UNLISTEN", "RESET"]
        rows = [p for k, p in answer if k == b"D"]
        assert rows == [b"\x00\x01\x00\x00\x00\x00"]  # one row, one (void, empty) column
        assert answer[-1] == (b"Z", b"I")
    finally:
        client.close()


@pytest.mark.parametrize(
    ("sql", "tag"),
    [
        ("RESET ALL", "RESET"),
        ("DISCARD ALL", "DISCARD ALL"),
        ("DISCARD TEMP", "DISCARD TEMP"),
        ("DISCARD PLANS", "DISCARD PLANS"),
        ("UNLISTEN *", "UNLISTEN"),
        ("CLOSE ALL", "CLOSE CURSOR ALL"),
    ],
)
async def test_each_reset_statement_has_its_command_tag(
    pgwire: PgWireServer, login: PortLogin, sql: str, tag: str
) -> None:
    client = await raw(pgwire, login)
    try:
        answer = await client.query(sql)
        assert sqlstates(answer) == [] and tags(answer) == [tag]
    finally:
        client.close()


async def test_reset_all_returns_settings_and_user_id_to_the_startup_values(
    login: PortLogin,
) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"application_name": "start"})
    try:
        await conn.execute("SET application_name = 'changed'")
        await conn.execute("SET TimeZone = 'Asia/Tokyo'")
        await conn.execute("SET dbsvc.user_id = 'u1'")
        await conn.execute("RESET ALL")
        assert await conn.fetchval("SHOW application_name") == "start"
        assert await conn.fetchval("SHOW TimeZone") != "Asia/Tokyo"
        # No user id any more: DDL, refused with one, is accepted again.
        await conn.execute("CREATE TABLE IF NOT EXISTS reset_after_user (x int)")
    finally:
        await conn.close()


async def test_reset_all_keeps_a_startup_user_id_as_the_session_default(
    login: PortLogin,
) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "u1"})
    try:
        await conn.execute("RESET dbsvc.user_id")
        await conn.execute("CREATE TABLE IF NOT EXISTS reset_default_user (x int)")
        await conn.execute("RESET ALL")
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute("CREATE TABLE reset_default_user2 (x int)")
        assert "user id" in str(info.value)
    finally:
        await conn.close()


async def test_discard_all_forgets_the_clients_prepared_statements(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    client = await raw(pgwire, login)
    try:
        client.send(b"P", codec.cstring("mine") + codec.cstring("SELECT 1") + b"\x00\x00")
        client.send(b"S")
        assert sqlstates(await client.until_ready()) == []
        assert tags(await client.query("DISCARD ALL")) == ["DISCARD ALL"]
        client.send(b"B", b"\x00" + codec.cstring("mine") + b"\x00\x00\x00\x00\x00\x00")
        client.send(b"S")
        assert sqlstates(await client.until_ready()) == ["26000"]
    finally:
        client.close()


async def test_discard_all_cannot_clear_another_clients_state(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    """Two clients on the same tenant (so on the same server connections): one's DISCARD ALL
    and RESET ALL leave the other's prepared statement and settings as they were."""
    victim = await asyncpg.connect(login.dsn, server_settings={"application_name": "victim"})
    attacker = await raw(pgwire, login)
    try:
        await victim.execute("SET TimeZone = 'Asia/Tokyo'")
        statement = await victim.prepare("SELECT count(*) FROM reset_probe")
        for sql in ("DISCARD ALL", "RESET ALL", ASYNCPG_RESET, "DEALLOCATE ALL"):
            assert sqlstates(await attacker.query(sql)) == []
        assert await statement.fetchval() == 1
        assert await victim.fetchval("SHOW TimeZone") == "Asia/Tokyo"
        assert await victim.fetchval("SHOW application_name") == "victim"
    finally:
        attacker.close()
        await victim.close()


@pytest.mark.parametrize(
    "sql",
    [
        "RESET ALL; DELETE FROM reset_probe",
        "DELETE FROM reset_probe; RESET ALL",
        "DISCARD ALL; DELETE FROM reset_probe",
        "UNLISTEN *; DELETE FROM reset_probe",
        f"{ASYNCPG_RESET} DELETE FROM reset_probe;",
        "ROLLBACK; DELETE FROM reset_probe",
        "RESET ALL; ROLLBACK; DELETE FROM reset_probe",
    ],
)
async def test_a_reset_cannot_carry_another_statement_past_the_guard(
    pgwire: PgWireServer, login: PortLogin, sql: str
) -> None:
    client = await raw(pgwire, login)
    try:
        answer = await client.query(sql)
        assert sqlstates(answer) == ["42501"] and tags(answer) == []
        assert tags(await client.query("SELECT count(*) FROM reset_probe")) == ["SELECT 1"]
    finally:
        client.close()
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM reset_probe") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_advisory_unlock_all(), pg_advisory_lock(1)",
        "SELECT pg_advisory_unlock_all(), current_setting('dbsvc.user_id')",
        "SELECT pg_advisory_unlock_all() FROM reset_probe",
        "SELECT pg_advisory_unlock_all() WHERE (SELECT count(*) FROM pg_authid) > 0",
        "SELECT pg_advisory_unlock_all() AS x",
        "SELECT pg_advisory_lock(1); SELECT pg_advisory_unlock_all()",
    ],
)
async def test_the_unlock_call_is_special_only_alone(
    pgwire: PgWireServer, login: PortLogin, sql: str
) -> None:
    client = await raw(pgwire, login)
    try:
        answer = await client.query(sql)
        assert sqlstates(answer) == ["42501"] and not [k for k, _ in answer if k == b"D"]
    finally:
        client.close()


async def test_discard_all_inside_a_transaction_fails_as_in_postgresql(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("INSERT INTO reset_probe VALUES (2)")
        with pytest.raises(asyncpg.ActiveSQLTransactionError):
            await conn.execute("DISCARD ALL")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await transaction.rollback()
        assert await conn.fetchval("SELECT count(*) FROM reset_probe") == 1
    finally:
        await conn.close()


async def test_close_all_inside_a_transaction_goes_to_its_server_connection(
    login: PortLogin,
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        async with conn.transaction():
            assert await conn.execute("CLOSE ALL") == "CLOSE CURSOR ALL"
            assert await conn.execute("UNLISTEN *") == "UNLISTEN"
            await conn.execute("SELECT pg_advisory_unlock_all()")
    finally:
        await conn.close()


async def test_a_rollback_before_the_reset_ends_the_clients_transaction(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    client = await raw(pgwire, login)
    try:
        await client.query("BEGIN")
        await client.query("INSERT INTO reset_probe VALUES (3)")
        answer = await client.query("ROLLBACK;\n" + ASYNCPG_RESET)
        assert sqlstates(answer) == []
        assert tags(answer)[0] == "ROLLBACK" and answer[-1] == (b"Z", b"I")
    finally:
        client.close()
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM reset_probe") == 1
    finally:
        await conn.close()


async def test_reset_statements_work_through_the_extended_protocol(login: PortLogin) -> None:
    """psycopg sends a pool's reset as Parse/Bind/Execute."""
    import psycopg

    def run() -> list[object]:
        with psycopg.connect(login.dsn, autocommit=True) as conn:
            conn.execute("SET application_name = 'x'")
            seen: list[object] = [conn.execute("DISCARD ALL").statusmessage]
            seen.append(conn.execute("SELECT pg_advisory_unlock_all()").fetchall())
            seen.append(conn.execute("SHOW application_name").fetchone())
            return seen

    import asyncio

    assert await asyncio.to_thread(run) == ["DISCARD ALL", [("",)], ("",)]


async def test_discard_all_in_a_psycopg_transaction_fails_as_in_postgresql(
    login: PortLogin,
) -> None:
    """psycopg's default (not autocommit) opens a transaction first: DISCARD ALL then fails
    with 25001 through the extended protocol, and the transaction with it."""
    import asyncio

    import psycopg

    def run() -> tuple[str | None, str | None]:
        first: str | None = None
        with psycopg.connect(login.dsn) as conn:
            conn.execute("INSERT INTO reset_probe VALUES (4)")
            try:
                conn.execute("DISCARD ALL")
            except psycopg.Error as exc:
                first = exc.sqlstate
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                return first, exc.sqlstate
            return first, None

    assert await asyncio.to_thread(run) == ("25001", "25P02")
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM reset_probe") == 1
    finally:
        await conn.close()


async def test_reset_all_inside_a_transaction_takes_effect_at_commit(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"application_name": "start"})
    try:
        default = await conn.fetchval("SHOW TimeZone")
        await conn.execute("SET TimeZone = 'Asia/Tokyo'")
        await conn.execute("SET application_name = 'changed'")
        async with conn.transaction():
            await conn.execute("RESET ALL")
            assert await conn.fetchval("SHOW TimeZone") == default
            assert await conn.fetchval("SHOW application_name") == "start"
        assert await conn.fetchval("SHOW TimeZone") == default
        assert await conn.fetchval("SHOW application_name") == "start"
        assert conn.get_settings().application_name == "start"
    finally:
        await conn.close()


async def test_reset_all_inside_a_transaction_is_undone_by_rollback(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    conn = await asyncpg.connect(login.dsn, server_settings={"application_name": "start"})
    other = await asyncpg.connect(login.dsn)  # keeps other server connections in use
    try:
        await conn.execute("SET TimeZone = 'Asia/Tokyo'")
        await conn.execute("SET application_name = 'changed'")
        await conn.execute("BEGIN")
        await conn.execute("RESET ALL")
        assert await conn.fetchval("SHOW application_name") == "start"
        await conn.execute("ROLLBACK")
        assert conn.get_settings().application_name == "changed"
        for _ in range(3):  # whichever server connection runs the next transactions
            assert await other.fetchval("SELECT 1") == 1
            assert await conn.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            assert await conn.fetchval("SHOW application_name") == "changed"
    finally:
        await other.close()
        await conn.close()


async def test_reset_all_in_a_failed_transaction_is_refused_as_postgresql_does(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    client = await raw(pgwire, login)
    try:
        await client.query("SET TimeZone = 'Asia/Tokyo'")
        await client.query("BEGIN")
        assert sqlstates(await client.query("SELECT 1/0")) == ["22012"]
        answer = await client.query("RESET ALL")
        assert sqlstates(answer) == ["25P02"] and answer[-1] == (b"Z", b"E")
        await client.query("ROLLBACK")
        shown = await client.query("SHOW TimeZone")
        assert next(p for k, p in shown if k == b"D").endswith(b"Asia/Tokyo")
    finally:
        client.close()


async def test_discard_all_inside_a_transaction_is_still_refused(
    pgwire: PgWireServer, login: PortLogin
) -> None:
    client = await raw(pgwire, login)
    try:
        await client.query("BEGIN")
        answer = await client.query("DISCARD ALL")
        assert sqlstates(answer) == ["25001"]
        await client.query("ROLLBACK")
    finally:
        client.close()
