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
from database_service.pgwire.server import PgWireServer
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
