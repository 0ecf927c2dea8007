"""Attacks through the PostgreSQL wire port: the login, the SQL guard on every Query and Parse,
statement names and cancel keys of other clients, malformed bytes, and a client that leaves in
the middle of a transaction. Tenant B (the victim) must come out unchanged and unread."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire import codec
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


def no_secret(messages: list[tuple[bytes, bytes]] | list[bytes]) -> None:
    for message in messages:
        raw = message if isinstance(message, bytes) else b"".join(message)
        assert SECRET.encode() not in raw


@pytest.fixture(scope="module")
async def attacker(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    return await port_login(tenants.a.tenant_id)


@pytest.fixture
async def raw(pgwire: PgWireServer) -> AsyncIterator[RawClient]:
    client = await RawClient.open(pgwire)
    yield client
    client.close()


def fatal_sqlstate(messages: list[bytes]) -> str:
    assert messages and messages[-1][:1] == b"E", messages
    return codec.parse_error_fields(messages[-1][1:])["C"]


async def test_a_startup_for_another_tenants_database_is_refused(
    tenants: Tenants, attacker: PortLogin, raw: RawClient
) -> None:
    other = PortLogin(attacker.host, attacker.port, attacker.service, attacker.secret,
                      tenants.b.tenant_id)  # fmt: skip
    assert fatal_sqlstate(await raw.login(other)) == "42501"


async def test_a_wrong_password_and_an_unknown_service_fail_alike(
    attacker: PortLogin, pgwire: PgWireServer
) -> None:
    wrong = await RawClient.open(pgwire)
    unknown = await RawClient.open(pgwire)
    try:
        first = await wrong.login(attacker, password="not-the-secret")
        nobody = PortLogin(attacker.host, attacker.port, "pg-nobody", "x", attacker.tenant_id)
        second = await unknown.login(nobody)
        assert fatal_sqlstate(first) == fatal_sqlstate(second) == "28P01"
    finally:
        wrong.close()
        unknown.close()


async def test_a_service_without_a_scram_verifier_is_refused_clearly(
    core: Application, tenants: Tenants, raw: RawClient, pgwire: PgWireServer
) -> None:
    await core.services.register(
        "pg-tokenonly", tenants=[tenants.a.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    login = PortLogin("127.0.0.1", pgwire.port, "pg-tokenonly", "x", tenants.a.tenant_id)
    messages = await raw.login(login)
    assert fatal_sqlstate(messages) == "28000"
    assert b"no SCRAM verifier" in messages[-1]


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE postgres",
        "SET default_transaction_read_only = off",
        "SELECT * FROM pg_catalog.pg_authid",
        "SELECT query FROM pg_stat_activity",
        "SELECT pg_read_file('/etc/passwd')",
        "COPY (SELECT 1) TO PROGRAM 'id'",
        "LISTEN events",
        "PREPARE p AS SELECT 1",
        "DO $$ BEGIN PERFORM 1; END $$",
        "SELECT set_config('role', 'postgres', false)",
        "BEGIN; SET ROLE postgres",
    ],
)
async def test_statements_the_guard_refuses_are_refused_on_the_port(
    attacker: PortLogin, sql: str
) -> None:
    conn = await asyncpg.connect(attacker.dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as raised:
            await conn.execute(sql)
        assert raised.value.sqlstate in ("42501", "0A000", "42601")
        assert await conn.fetchval("SELECT current_user") != "postgres"
    finally:
        await conn.close()


async def test_reading_the_victims_schema_is_refused(
    tenants: Tenants, attacker: PortLogin, raw: RawClient
) -> None:
    await raw.login(attacker)
    for sql in (
        f"SELECT * FROM {tenants.b.schema_name}.users",
        f"SELECT count(*) FROM {tenants.shared}.market_data WHERE company_id = "
        f"'{tenants.b.tenant_id}'",
    ):
        answer = await raw.query(sql)
        no_secret(answer)
        refused = sqlstates(answer)
        if refused:
            assert refused[0] in ("42501", "42P01")
        else:  # row-level security: the shared table shows none of B's rows
            rows = [p for k, p in answer if k == b"D"]
            assert rows and rows[0].endswith(b"0")


async def test_a_pipelined_second_statement_is_refused(
    tenants: Tenants, attacker: PortLogin, raw: RawClient
) -> None:
    await raw.login(attacker)
    answer = await raw.query(f"SELECT 1; SELECT * FROM {tenants.b.schema_name}.users")
    assert sqlstates(answer) == ["42501"] and not [k for k, _ in answer if k == b"D"]
    # Two Query messages in one write: each is classified, the second refused alone.
    raw.send(b"Q", codec.cstring("SELECT 1"))
    raw.send(b"Q", codec.cstring("SET ROLE postgres"))
    first, second = await raw.until_ready(), await raw.until_ready()
    assert sqlstates(first) == [] and sqlstates(second) == ["42501"]
    # The extended protocol: a Parse carrying two statements is refused, the batch skipped.
    raw.send(b"P", codec.cstring("") + codec.cstring("SELECT 1; RESET ALL") + b"\x00\x00")
    raw.send(b"B", b"\x00\x00" + b"\x00\x00\x00\x00\x00\x00")
    raw.send(b"E", b"\x00\x00\x00\x00\x00")
    raw.send(b"S")
    answer = await raw.until_ready()
    assert sqlstates(answer) == ["42501"] and [k for k, _ in answer] == [b"E", b"Z"]


async def test_a_refused_statement_fails_the_transaction_like_postgres(
    attacker: PortLogin, raw: RawClient
) -> None:
    await raw.login(attacker)
    assert (await raw.query("BEGIN"))[-1] == (b"Z", b"T")
    answer = await raw.query("SET ROLE postgres")
    assert sqlstates(answer) == ["42501"] and answer[-1] == (b"Z", b"E")
    assert sqlstates(await raw.query("SELECT 1")) == ["25P02"]
    answer = await raw.query("COMMIT")
    assert (b"C", codec.cstring("ROLLBACK")) in answer and answer[-1] == (b"Z", b"I")


async def test_another_clients_prepared_statement_is_not_reachable(
    attacker: PortLogin, pgwire: PgWireServer
) -> None:
    owner = await asyncpg.connect(attacker.dsn)
    other = await RawClient.open(pgwire)
    try:
        statement = await owner.prepare("SELECT 42")
        name = statement.get_name()
        await other.login(attacker)
        other.send(b"B", b"\x00" + codec.cstring(name) + b"\x00\x00\x00\x00\x00\x00")
        other.send(b"E", b"\x00\x00\x00\x00\x00")
        other.send(b"S")
        assert sqlstates(await other.until_ready()) == ["26000"]
    finally:
        await owner.close()
        other.close()


async def test_a_cancel_key_guessed_for_another_client_cancels_nothing(
    attacker: PortLogin, pgwire: PgWireServer
) -> None:
    victim = await RawClient.open(pgwire)
    try:
        await victim.login(attacker)
        pid, key = victim.backend_key
        victim.send(b"Q", codec.cstring("SELECT pg_sleep(1)"))
        await asyncio.sleep(0.2)
        for guess in (key ^ 1, 0, 0xFFFFFFFF):
            reader, writer = await asyncio.open_connection("127.0.0.1", pgwire.port)
            writer.write(struct.pack("!IIII", 16, codec.CANCEL_REQUEST_CODE, pid, guess))
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing said
            writer.close()
        answer = await victim.until_ready()
        assert sqlstates(answer) == []  # the sleep ran to its end
    finally:
        victim.close()


@pytest.mark.parametrize(
    ("raw_bytes", "sqlstate"),
    [
        (b"Q\x00\x00\x00\x02", "08P01"),  # a length shorter than itself
        (b"Q\x7f\xff\xff\xff", "08P01"),  # 2 GB announced
        (b"Q\x00\x00\x00\x08abcd", "08P01"),  # a Query without its NUL
    ],
)
async def test_malformed_and_oversized_messages_end_the_connection(
    attacker: PortLogin, raw: RawClient, raw_bytes: bytes, sqlstate: str
) -> None:
    await raw.login(attacker)
    raw.writer.write(raw_bytes)
    kind, payload = await raw.read()
    assert kind == b"E" and codec.parse_error_fields(payload)["C"] == sqlstate
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""


async def test_copy_messages_outside_copy_are_ignored_like_postgres(
    attacker: PortLogin, raw: RawClient
) -> None:
    # What a client sends after a COPY that failed before its data began: PostgreSQL ignores
    # it, and so does the port; nothing of it reaches a server connection.
    await raw.login(attacker)
    raw.send(b"d", b"1\tstray\n")
    raw.send(b"c")
    raw.send(b"f", codec.cstring("never mind"))
    answer = await raw.query("SELECT 1")
    assert sqlstates(answer) == [] and answer[-1] == (b"Z", b"I")


@pytest.mark.parametrize(
    "packet",
    [
        struct.pack("!I", 12) + b"GET / HT",  # an HTTP client on the wrong port
        struct.pack("!I", 3),  # a length shorter than itself
        struct.pack("!I", 1 << 30),  # 1 GB announced before anything is read
    ],
)
async def test_a_garbage_startup_packet_is_refused(raw: RawClient, packet: bytes) -> None:
    raw.writer.write(packet)
    kind, payload = await raw.read()
    assert kind == b"E" and codec.parse_error_fields(payload)["C"] == "08P01"
    assert await asyncio.wait_for(raw.reader.read(), 5) == b""


async def test_a_client_that_leaves_mid_transaction_is_rolled_back_and_its_server_reused(
    attacker: PortLogin, pgwire: PgWireServer
) -> None:
    setup = await asyncpg.connect(attacker.dsn)
    try:
        await setup.execute("CREATE TABLE IF NOT EXISTS left_behind (n int)")
        leaving = await RawClient.open(pgwire)
        await leaving.login(attacker)
        await leaving.query("BEGIN")
        assert sqlstates(await leaving.query("INSERT INTO left_behind VALUES (1)")) == []
        opened = sum(f.active + f.idle for f in pgwire.pools.figures())
        leaving.writer.transport.abort()  # gone, no Terminate, transaction open
        await asyncio.sleep(0.3)
        assert await setup.fetchval("SELECT count(*) FROM left_behind") == 0
        for _ in range(3):  # the rolled back connection serves others cleanly
            assert await setup.fetchval("SELECT count(*) FROM left_behind") == 0
        assert sum(f.active + f.idle for f in pgwire.pools.figures()) <= opened
    finally:
        await setup.close()


async def test_deallocate_all_forgets_only_the_senders_statements(
    attacker: PortLogin, raw: RawClient
) -> None:
    owner = await asyncpg.connect(attacker.dsn)
    try:
        statement = await owner.prepare("SELECT 7")
        assert await statement.fetchval() == 7
        await raw.login(attacker)
        answer = await raw.query("DEALLOCATE ALL")
        assert sqlstates(answer) == [] and (b"C", codec.cstring("DEALLOCATE ALL")) in answer
        for _ in range(3):  # still prepared wherever the owner's statement runs
            assert await statement.fetchval() == 7
    finally:
        await owner.close()


async def test_a_read_only_service_cannot_begin_a_read_write_transaction(
    tenants: Tenants, port_login: PortLoginFactory, raw: RawClient
) -> None:
    reader = await port_login(tenants.a.tenant_id, scopes=(Scope.READ,))
    await raw.login(reader)
    for sql in (
        "BEGIN READ WRITE",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET default_transaction_read_only = off",
    ):
        answer = await raw.query(sql)
        assert sqlstates(answer) in (["25006"], ["42501"]), (sql, answer)
    answer = await raw.query("SHOW transaction_read_only")
    assert (b"D", b"\x00\x01\x00\x00\x00\x02on") in answer


async def test_a_tracked_setting_follows_its_client_and_no_other(
    attacker: PortLogin, pgwire: PgWireServer
) -> None:
    setter = await asyncpg.connect(attacker.dsn)
    others = [await asyncpg.connect(attacker.dsn) for _ in range(3)]
    try:
        await setter.execute("SET TimeZone = 'Asia/Tokyo'")
        for _ in range(4):  # whichever server connection runs it, the client's setting holds
            assert await setter.fetchval("SHOW TimeZone") == "Asia/Tokyo"
            for other in others:
                assert await other.fetchval("SHOW TimeZone") != "Asia/Tokyo"
    finally:
        await setter.close()
        for other in others:
            await other.close()
