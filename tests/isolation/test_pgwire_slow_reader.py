"""A client of the wire port that sends a query with a large result and stops reading.

Without a bound, the port's relay waits for ever to hand the client its rows: the server
connection (and its slot of the service's PostgreSQL budget, shared by every tenant and front
end) stays held as long as the client keeps its socket open, past the tenant's statement limit.
The tenant's statement limit bounds this as it bounds a slow statement: once past it, the
client's session ends and its server connection goes (the budget slot is given back), while
another client of the same tenant, and another tenant's, are served meanwhile.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time

import asyncpg
import pytest

from database_service.app import Application
from database_service.pgwire import codec
from database_service.pgwire.server import PgWireServer
from database_service.tenancy import TenantLimits
from tests.fix_pgwire import PortLoginFactory, RawClient
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_HUGE = "SELECT repeat('x', 100000) FROM generate_series(1, 1000000)"  # 100 GB of rows


def _active(pgwire: PgWireServer, tenant_id: str) -> int:
    return sum(f.active for f in pgwire.pools.figures() if f.tenant_id == tenant_id)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
async def test_a_client_that_stops_reading_gives_its_server_connection_back_past_the_limit(
    core: Application,
    tenants: Tenants,
    pgwire: PgWireServer,
    port_login: PortLoginFactory,
    protocol: str,
) -> None:
    slow = await core.tenants.create(f"noread_{secrets.token_hex(3)}", TenantLimits(10, 1000))
    login = await port_login(slow.tenant_id)
    other = await port_login(tenants.a.tenant_id)
    stuck = await RawClient.open(pgwire)
    # The client's socket receive buffer kept small, so the port's writes back up quickly.
    stuck.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        await stuck.login(login)
        if protocol == "simple":
            stuck.send(b"Q", codec.cstring(_HUGE))
        else:
            stuck.send(b"P", b"\x00" + codec.cstring(_HUGE) + b"\x00\x00")
            stuck.send(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
            stuck.send(b"E", b"\x00\x00\x00\x00\x00")
            stuck.send(b"S")
        await stuck.writer.drain()
        await asyncio.sleep(0.5)
        assert _active(pgwire, slow.tenant_id) == 1  # it is running, its rows backing up
        # Others are served meanwhile: another tenant, and another client of the same tenant.
        for each in (other, login):
            conn = await asyncpg.connect(each.dsn)
            try:
                started = time.perf_counter()
                assert await asyncio.wait_for(conn.fetchval("SELECT 1"), 10) == 1
                assert time.perf_counter() - started < 5
            finally:
                await conn.close()
        # Past the tenant's limit (1 s, and the port's margin), the connection is given back
        # although the client never read nor left.
        for _ in range(75):  # up to 15 s
            if not _active(pgwire, slow.tenant_id):
                break
            await asyncio.sleep(0.2)
        assert _active(pgwire, slow.tenant_id) == 0, "the server connection is still held"
        backends = await core.owner_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'",
            slow.role_name,
        )
        assert backends == 0
    finally:
        stuck.writer.transport.abort()
