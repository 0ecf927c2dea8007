"""A client of the wire port preparing distinct named statements without end.

Each named statement is kept twice: by the port (the client's Parse, to prepare it again on
whichever server connection the client is lent next) and by PostgreSQL, for the life of the
server connection, in the backend's memory. Without a bound, one client grows the port worker's
memory and a shared backend's as far as it likes. Past ``MAX_PREPARED_BYTES`` (per client, per
server connection) a Parse is refused with 54000, the client's session and its earlier
statements go on, and a server connection holding more than half of it is not lent again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from database_service.pgwire import codec
from database_service.pgwire.backend import MAX_PREPARED_BYTES
from database_service.pgwire.server import MAX_NAME_BYTES, MAX_STATEMENTS, PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_PAD = 60_000  # bytes of each statement's text (the tests' guard takes up to 64 KiB)


@pytest.fixture
async def raw(pgwire: PgWireServer) -> AsyncIterator[RawClient]:
    client = await RawClient.open(pgwire)
    yield client
    client.close()


def _statement(n: int) -> str:
    return f"SELECT {n} AS n, length('{'x' * _PAD}') AS pad"


async def test_a_client_cannot_prepare_statements_without_end(
    tenants: Tenants, port_login: PortLoginFactory, raw: RawClient, pgwire: PgWireServer
) -> None:
    login: PortLogin = await port_login(tenants.a.tenant_id)
    await raw.login(login)
    count = MAX_PREPARED_BYTES // _PAD + 8
    refused_at = None
    for n in range(count):
        raw.send(b"P", codec.cstring(f"s{n}") + codec.cstring(_statement(n)) + b"\x00\x00")
        raw.send(b"S")
        answer = await raw.until_ready()
        if sqlstates(answer):
            assert sqlstates(answer) == ["54000"], answer
            refused_at = n
            break
    assert refused_at is not None, f"{count} statements of {_PAD} bytes were all prepared"
    assert refused_at * _PAD <= MAX_PREPARED_BYTES
    # The session goes on, and so do its statements.
    raw.send(b"B", b"\x00" + codec.cstring("s0") + b"\x00\x00\x00\x00\x00\x00")
    raw.send(b"E", b"\x00\x00\x00\x00\x00")
    raw.send(b"S")
    answer = await raw.until_ready()
    assert sqlstates(answer) == [] and any(k == b"D" for k, _ in answer)
    # Closing statements makes room for the client again.
    for n in range(refused_at):
        raw.send(b"C", b"S" + codec.cstring(f"s{n}"))
    raw.send(b"S")
    assert sqlstates(await raw.until_ready()) == []
    raw.send(b"P", codec.cstring("again") + codec.cstring("SELECT 1") + b"\x00\x00")
    raw.send(b"S")
    assert sqlstates(await raw.until_ready()) == []
    # No server connection of the pool holds more than the bound.
    assert all(
        s.prepared_bytes <= MAX_PREPARED_BYTES
        for pool in pgwire.pools._pools.values()
        for s in pool.idle
    )


@pytest.mark.parametrize("where", ["statement", "portal"])
async def test_a_name_longer_than_the_port_keeps_is_refused(
    tenants: Tenants, port_login: PortLoginFactory, raw: RawClient, where: str
) -> None:
    await raw.login(await port_login(tenants.a.tenant_id))
    long = "n" * (MAX_NAME_BYTES + 1)
    if where == "statement":
        raw.send(b"P", codec.cstring(long) + codec.cstring("SELECT 1") + b"\x00\x00")
    else:
        raw.send(b"P", b"\x00" + codec.cstring("SELECT 1") + b"\x00\x00")
        raw.send(b"B", codec.cstring(long) + b"\x00" + b"\x00\x00\x00\x00\x00\x00")
    raw.send(b"S")
    assert sqlstates(await raw.until_ready()) == ["42622"]
    assert sqlstates(await raw.query("SELECT 1")) == []


async def test_portals_are_forgotten_with_their_transaction(
    tenants: Tenants, port_login: PortLoginFactory, raw: RawClient, pgwire: PgWireServer
) -> None:
    await raw.login(await port_login(tenants.a.tenant_id))
    session = pgwire.sessions[raw.backend_key[0]]
    raw.send(b"P", codec.cstring("s") + codec.cstring("SELECT 1") + b"\x00\x00")
    raw.send(b"S")
    await raw.until_ready()
    for n in range(300):
        raw.send(b"B", codec.cstring(f"p{n}") + codec.cstring("s") + b"\x00" * 6)
        raw.send(b"E", codec.cstring(f"p{n}") + b"\x00\x00\x00\x00")
        raw.send(b"S")
        assert sqlstates(await raw.until_ready()) == []
    assert len(session.portal_verdicts) + len(session.virtual_portals) <= 1


async def test_a_client_keeps_a_bounded_number_of_statements(
    tenants: Tenants, port_login: PortLoginFactory, raw: RawClient, pgwire: PgWireServer
) -> None:
    await raw.login(await port_login(tenants.a.tenant_id))
    session = pgwire.sessions[raw.backend_key[0]]
    for n in range(MAX_STATEMENTS + 5):
        raw.send(b"P", codec.cstring(f"s{n}") + codec.cstring("SELECT 1") + b"\x00\x00")
    raw.send(b"S")
    assert sqlstates(await raw.until_ready()) == ["54000"]
    assert len(session.statements) + len(session.virtual) == MAX_STATEMENTS
    assert sqlstates(await raw.query("SELECT 1")) == []
