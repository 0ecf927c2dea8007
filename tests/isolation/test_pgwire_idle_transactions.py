"""A port client that holds a transaction open and then says nothing for longer than the
tenants' transaction limit (``DBSVC_TENANT_TRANSACTION_TIMEOUT_MS``; one second here) is ended
with 25P03, as PostgreSQL's idle_in_transaction_session_timeout ends a session: its work is
rolled back and its server connection goes back to the pool for the next client. A client idle
outside a transaction holds nothing and is left alone."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire import codec
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, RawClient, sqlstates
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

LIMIT = 1.0


@pytest.fixture(scope="module")
async def port(core: Application) -> AsyncIterator[PgWireServer]:
    server = PgWireServer(
        core, host="127.0.0.1", port=0, max_per_tenant=1, idle_transaction_seconds=LIMIT
    )
    await server.start()
    yield server
    await server.close()


@pytest.fixture(scope="module")
async def login(core: Application, tenants: Tenants, port: PgWireServer) -> PortLogin:
    name = f"pgidle-{secrets.token_hex(4)}"
    scopes = [Scope.READ, Scope.WRITE, Scope.ADMIN]
    _, secret = await core.services.register(name, tenants=[tenants.a.tenant_id], scopes=scopes)
    assert secret is not None
    login = PortLogin("127.0.0.1", port.port, name, secret, tenants.a.tenant_id)
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS idle_probe (id int)")
    finally:
        await conn.close()
    return login


async def test_a_client_idle_in_a_transaction_is_ended_and_rolled_back(
    port: PgWireServer, login: PortLogin
) -> None:
    client = RawClient(*await asyncio.open_connection("127.0.0.1", port.port))
    try:
        assert (await client.login(login))[-1][:1] == b"Z"
        assert sqlstates(await client.query("BEGIN")) == []
        assert sqlstates(await client.query("INSERT INTO idle_probe VALUES (1)")) == []
        kind, payload = await client.read()  # nothing sent: the port speaks after LIMIT
        fields = codec.parse_error_fields(payload)
        assert kind == b"E" and fields["C"] == "25P03" and fields["S"] == "FATAL"
        assert fields["R"] == "dbsvc:idle_in_transaction_timeout"
        assert await client.reader.read() == b""  # and closes the connection
    finally:
        client.close()
    # The only server connection of the pool (max 1) serves the next client at once, and
    # the insert was rolled back.
    conn = await asyncpg.connect(login.dsn)
    try:
        assert await asyncio.wait_for(conn.fetchval("SELECT count(*) FROM idle_probe"), 5) == 0
    finally:
        await conn.close()


async def test_a_client_idle_outside_a_transaction_is_left_alone(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        await asyncio.sleep(LIMIT * 2)
        assert await conn.fetchval("SELECT 1") == 1
        async with conn.transaction():  # a busy transaction is not idle
            for _ in range(4):
                await conn.execute("SELECT pg_sleep($1::float8)", LIMIT / 2)
    finally:
        await conn.close()
