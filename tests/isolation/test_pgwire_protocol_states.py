"""The PostgreSQL wire port in each protocol state, against what no driver sends.

* What one client leaves on a pooled server connection — its unnamed prepared statement, its
  portals — is not another client's to Bind, Describe or Execute: the second client never sent
  that SQL, so the guard never saw it from that client (another service of the tenant running
  an INSERT the first parsed and never executed, for instance).
* Malformed extended-protocol messages (truncated Bind, Parse, Describe, Execute, Close, bad
  subtypes, negative counts and lengths), sent at startup, idle, inside a transaction, after an
  error before Sync, inside COPY: each gets an ErrorResponse with a SQLSTATE (the connection
  may end, as PostgreSQL ends it on 08P01), never a bare close, and the port goes on serving
  other clients.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.pgwire import codec
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_LEFT_BEHIND = "left-behind-by-another-client"


@pytest.fixture(scope="module")
async def writer_login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    return await port_login(tenants.a.tenant_id)


@pytest.fixture(scope="module")
async def another_writer_login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    return await port_login(tenants.a.tenant_id)


@pytest.fixture
async def raw(pgwire: PgWireServer) -> AsyncIterator[RawClient]:
    client = await RawClient.open(pgwire)
    yield client
    client.close()


async def _leave_an_unnamed_statement(pgwire: PgWireServer, login: PortLogin, sql: str) -> None:
    """Parse ``sql`` as the unnamed statement and go: the server connection goes back to the
    pool with the statement on it. Three clients at once inside a transaction (begun and
    committed by named statements: a simple Query would drop the unnamed one), so that several
    idle connections have it."""
    clients = [await RawClient.open(pgwire) for _ in range(3)]

    def run_named(client: RawClient, name: str, text: str) -> None:
        client.send(b"P", codec.cstring(name) + codec.cstring(text) + b"\x00\x00")
        client.send(b"B", b"\x00" + codec.cstring(name) + b"\x00\x00\x00\x00\x00\x00")
        client.send(b"E", b"\x00\x00\x00\x00\x00")

    try:
        for client in clients:
            await client.login(login)
            run_named(client, "open", "BEGIN")
            client.send(b"P", b"\x00" + codec.cstring(sql) + b"\x00\x00")
            client.send(b"S")
            assert sqlstates(await client.until_ready()) == []
        for client in clients:
            run_named(client, "done", "COMMIT")
            client.send(b"S")
            assert sqlstates(await client.until_ready()) == []
    finally:
        for client in clients:
            client.close()


def _bind_unnamed() -> bytes:
    return b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00"


@pytest.mark.parametrize("second", ["same_service", "another_service"])
@pytest.mark.parametrize("follow_up", ["execute", "describe_statement", "describe_portal"])
async def test_an_unnamed_statement_another_client_left_on_the_server_is_not_reachable(
    pgwire: PgWireServer,
    writer_login: PortLogin,
    another_writer_login: PortLogin,
    raw: RawClient,
    follow_up: str,
    second: str,
) -> None:
    await _leave_an_unnamed_statement(pgwire, writer_login, f"SELECT '{_LEFT_BEHIND}'::text")
    await raw.login(writer_login if second == "same_service" else another_writer_login)
    for _ in range(3):  # whichever idle server connection it is lent
        if follow_up == "describe_statement":
            raw.send(b"D", b"S\x00")
        else:
            raw.send(b"B", _bind_unnamed())
            raw.send(b"D" if follow_up == "describe_portal" else b"E", b"P\x00" if
                     follow_up == "describe_portal" else b"\x00\x00\x00\x00\x00")  # fmt: skip
        raw.send(b"S")
        answer = await raw.until_ready()
        assert _LEFT_BEHIND.encode() not in b"".join(p for _, p in answer)
        assert sqlstates(answer) == ["26000"], answer
        assert [k for k, _ in answer if k in b"12DTt"] == [], answer
    # The client's own unnamed statement still works as PostgreSQL's does.
    raw.send(b"P", b"\x00" + codec.cstring("SELECT 7") + b"\x00\x00")
    raw.send(b"B", _bind_unnamed())
    raw.send(b"E", b"\x00\x00\x00\x00\x00")
    raw.send(b"S")
    answer = await raw.until_ready()
    assert sqlstates(answer) == [] and (b"D", b"\x00\x01\x00\x00\x00\x017") in answer


async def test_another_service_cannot_run_an_insert_left_behind_unexecuted(
    pgwire: PgWireServer,
    writer_login: PortLogin,
    another_writer_login: PortLogin,
    raw: RawClient,
) -> None:
    setup = await asyncpg.connect(writer_login.dsn)
    try:
        await setup.execute("CREATE TABLE IF NOT EXISTS left_insert (n int)")
        await setup.execute("TRUNCATE left_insert")
    finally:
        await setup.close()
    # Parsed, never executed, by the writer: the INSERT waits on the server connection.
    await _leave_an_unnamed_statement(pgwire, writer_login, "INSERT INTO left_insert VALUES (1)")
    await raw.login(another_writer_login)
    for _ in range(3):
        raw.send(b"B", _bind_unnamed())
        raw.send(b"E", b"\x00\x00\x00\x00\x00")
        raw.send(b"S")
        assert sqlstates(await raw.until_ready()) == ["26000"]
    check = await asyncpg.connect(writer_login.dsn)
    try:
        assert await check.fetchval("SELECT count(*) FROM left_insert") == 0
    finally:
        await check.close()


# -- malformed messages in every state -----------------------------------------------------

_MALFORMED: dict[str, tuple[bytes, bytes]] = {
    "parse_without_nul": (b"P", b"\x00SELECT 1"),
    "parse_negative_type_count": (b"P", b"\x00" + codec.cstring("SELECT 1") + b"\xff\xff"),
    "parse_more_types_than_sent": (b"P", b"\x00" + codec.cstring("SELECT $1") + b"\x00\x05"),
    "bind_empty": (b"B", b""),
    "bind_portal_only": (b"B", b"\x00"),
    "bind_negative_format_count": (b"B", b"\x00\x00\xff\xff"),
    "bind_more_params_than_sent": (b"B", b"\x00\x00\x00\x00\x00\x09"),
    "bind_negative_param_length": (b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xf0"),
    "bind_param_longer_than_message": (b"B", b"\x00\x00\x00\x00\x00\x01\x7f\xff\xff\xff"),
    "bind_truncated_result_formats": (b"B", b"\x00\x00\x00\x00\x00\x00\x00\x05"),
    "describe_empty": (b"D", b""),
    "describe_bad_subtype": (b"D", b"X\x00"),
    "describe_without_nul": (b"D", b"Sname"),
    "execute_empty": (b"E", b""),
    "execute_truncated_max_rows": (b"E", b"\x00\x00\x01"),
    "execute_negative_max_rows": (b"E", b"\x00\xff\xff\xff\xff"),
    "close_empty": (b"C", b""),
    "close_bad_subtype": (b"C", b"X\x00"),
    "close_without_nul": (b"C", b"Pname"),
    "flush_with_payload": (b"H", b"junk"),
    "sync_with_payload": (b"S", b"junk"),
    "query_empty": (b"Q", b""),
    "function_call": (b"F", b"\x00\x00\x00\x01"),
    "password_after_login": (b"p", b"secret\x00"),
    "unknown_type": (b"z", b""),
    "nul_type": (b"\x00", b""),
}

_STATES = ["idle", "in_transaction", "after_error_before_sync", "failed_transaction"]


async def _enter(raw: RawClient, state: str) -> None:
    if state in ("in_transaction", "failed_transaction"):
        assert sqlstates(await raw.query("BEGIN")) == []
    if state == "failed_transaction":
        assert sqlstates(await raw.query("SELECT 1/0")) == ["22012"]
    if state == "after_error_before_sync":
        raw.send(b"P", b"\x00" + codec.cstring("SELECT 1/0") + b"\x00\x00")
        raw.send(b"B", _bind_unnamed())
        raw.send(b"E", b"\x00\x00\x00\x00\x00")
        raw.send(b"H")
        kinds = []
        while b"E" not in kinds:
            kind, _ = await raw.read()
            kinds.append(kind)


async def _answered_or_ended_with_an_error(raw: RawClient) -> list[tuple[bytes, bytes]]:
    """What comes back up to ReadyForQuery, or up to the close after an ErrorResponse; fails on
    a close with no ErrorResponse before it."""
    seen: list[tuple[bytes, bytes]] = []
    while True:
        try:
            kind, payload = await raw.read()
        except asyncio.IncompleteReadError:
            assert any(k == b"E" for k, _ in seen), f"closed without an ErrorResponse: {seen}"
            return seen
        seen.append((kind, payload))
        if kind == b"Z":
            return seen


@pytest.mark.parametrize("state", _STATES)
@pytest.mark.parametrize("name", sorted(_MALFORMED))
async def test_a_malformed_message_in_any_state_gets_a_sqlstate_and_others_are_served(
    writer_login: PortLogin, raw: RawClient, state: str, name: str
) -> None:
    await raw.login(writer_login)
    await _enter(raw, state)
    kind, payload = _MALFORMED[name]
    raw.send(kind, payload)
    raw.send(b"S")
    answer = await _answered_or_ended_with_an_error(raw)
    assert SECRET.encode() not in b"".join(p for _, p in answer)
    for _, fields in ((k, p) for k, p in answer if k == b"E"):
        assert codec.parse_error_fields(fields).get("C"), answer
    # Another client of the port is served meanwhile and after.
    other = await asyncpg.connect(writer_login.dsn)
    try:
        assert await asyncio.wait_for(other.fetchval("SELECT 1"), 10) == 1
    finally:
        await other.close()


async def test_a_malformed_message_inside_copy_in_gets_a_sqlstate(
    writer_login: PortLogin, raw: RawClient
) -> None:
    setup = await asyncpg.connect(writer_login.dsn)
    try:
        await setup.execute("CREATE TABLE IF NOT EXISTS copy_target (n int)")
    finally:
        await setup.close()
    await raw.login(writer_login)
    for kind, payload in _MALFORMED.values():
        raw.send(b"Q", codec.cstring("COPY copy_target FROM STDIN"))
        first, _ = await raw.read()
        if first != b"G":
            break
        raw.send(kind, payload)
        raw.send(b"c")
        answer = await _answered_or_ended_with_an_error(raw)
        if answer[-1][0] != b"Z":
            return  # the connection ended, with an ErrorResponse
    answer = await raw.query("SELECT 1")
    assert answer[-1][0] == b"Z"


async def test_a_startup_packet_with_broken_parameters_gets_a_sqlstate(
    pgwire: PgWireServer,
) -> None:
    bodies = [
        struct.pack("!I", codec.PROTOCOL_3_0) + b"user\x00",  # a name without its value
        struct.pack("!I", codec.PROTOCOL_3_0) + b"user",  # no NUL at all
        struct.pack("!I", codec.PROTOCOL_3_0) + b"\xff\xfe\x00x\x00\x00",  # not UTF-8
        struct.pack("!I", 2 << 16),  # protocol 2
        struct.pack("!I", (3 << 16) | 9),  # protocol 3.9
        struct.pack("!I", 80877104),  # GSSENCRequest
    ]
    for body in bodies:
        client = await RawClient.open(pgwire)
        try:
            client.writer.write(struct.pack("!I", len(body) + 4) + body)
            first = await asyncio.wait_for(client.reader.read(1), 10)
            if first == b"N":  # GSSENC refused: the client may go on with a startup
                continue
            assert first in (b"E", b"v"), (body, first)
        finally:
            client.close()
