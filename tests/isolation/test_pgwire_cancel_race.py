"""A cancel request that races the end of its client's statement.

The port cancels the backend of the server connection its client holds; reaching PostgreSQL
takes a connection of its own. If the client's statement ends meanwhile and the server
connection goes back to the pool, the next client lent it — another service of the tenant —
must not have its statement cancelled by the first client's request. The delay between the
port's decision and PostgreSQL receiving the cancel is widened here (a wrapper sleeps before
the real ``send_cancel``) so the race is taken every time; the cancel itself is real.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable

import pytest

from database_service.pgwire import codec
from database_service.pgwire import server as port_module
from database_service.pgwire.backend import PgAddress
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture
def slow_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    real: Callable[[PgAddress, int, int], Awaitable[None]] = port_module.send_cancel

    async def later(address: PgAddress, pid: int, key: int) -> None:
        await asyncio.sleep(0.8)
        await real(address, pid, key)

    monkeypatch.setattr(port_module, "send_cancel", later)


async def test_a_late_cancel_does_not_reach_the_next_client_of_the_server_connection(
    tenants: Tenants, pgwire: PgWireServer, port_login: PortLoginFactory, slow_cancel: None
) -> None:
    first_login: PortLogin = await port_login(tenants.a.tenant_id)
    second_login: PortLogin = await port_login(tenants.a.tenant_id)
    first, second = await RawClient.open(pgwire), await RawClient.open(pgwire)
    try:
        await first.login(first_login)
        await second.login(second_login)
        first.send(b"Q", codec.cstring("SELECT pg_sleep(0.2)"))
        await asyncio.sleep(0.1)
        pid, key = first.backend_key
        reader, writer = await asyncio.open_connection("127.0.0.1", pgwire.port)
        writer.write(struct.pack("!IIII", 16, codec.CANCEL_REQUEST_CODE, pid, key))
        await writer.drain()
        await first.until_ready()  # its statement ended before the cancel arrived
        # The second client is lent the connection the first gave back (the pool's idle one).
        answer = await second.query("SELECT pg_sleep(1.5)")
        assert sqlstates(answer) == [], "another client's cancel cancelled this statement"
        writer.close()
        await asyncio.wait_for(reader.read(), 5)
    finally:
        first.close()
        second.close()
