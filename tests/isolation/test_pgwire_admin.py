"""The port's admin view (``SHOW POOLS / CLIENTS / SERVERS / STATS`` on the ``dbsvc-admin``
database, and ``GET /api/v1/admin/pgwire``): only services with the ``admin`` scope get in, a
tenant admin sees its own tenant's rows and nothing of another tenant's, a platform admin sees
every tenant; nothing but the four SHOW statements is answered."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire import codec
from database_service.pgwire.admin import ADMIN_DATABASE
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates
from tests.fix_service import ADMIN_TOKEN
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture(scope="module")
async def traffic(tenants: Tenants, port_login: PortLoginFactory) -> tuple[PortLogin, PortLogin]:
    """A and B each have a pool on the port, and a client of B stays connected."""
    a = await port_login(tenants.a.tenant_id)
    b = await port_login(tenants.b.tenant_id, (Scope.READ,))
    for login in (a, b):
        conn = await asyncpg.connect(login.dsn)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
    return a, b


@pytest.fixture
async def b_client(traffic: tuple[PortLogin, PortLogin]) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(traffic[1].dsn)
    yield conn
    await conn.close()


async def admin_rows(pgwire: PgWireServer, login: PortLogin, sql: str) -> list[list[bytes]]:
    raw = await RawClient.open(pgwire)
    try:
        seen = await raw.login(PortLogin(login.host, login.port, login.service, login.secret,
                                         ADMIN_DATABASE))  # fmt: skip
        assert seen[-1][:1] == b"Z", seen
        answer = await raw.query(sql)
        assert not sqlstates(answer), answer
        return [_values(payload) for kind, payload in answer if kind == b"D"]
    finally:
        raw.close()


def _values(payload: bytes) -> list[bytes]:
    count, offset, values = int.from_bytes(payload[:2]), 2, []
    for _ in range(count):
        length = int.from_bytes(payload[offset : offset + 4], signed=True)
        offset += 4
        values.append(b"" if length < 0 else payload[offset : offset + length])
        offset += max(length, 0)
    return values


@pytest.mark.parametrize("view", ["POOLS", "CLIENTS", "SERVERS", "STATS"])
async def test_a_tenant_admin_sees_only_its_own_tenant(
    view: str,
    tenants: Tenants,
    pgwire: PgWireServer,
    traffic: tuple[PortLogin, PortLogin],
    b_client: asyncpg.Connection,
) -> None:
    a_client = await asyncpg.connect(traffic[0].dsn)  # A's own client is listed, B's is not
    try:
        rows = await admin_rows(pgwire, traffic[0], f"SHOW {view}")
    finally:
        await a_client.close()
    flat = b" ".join(v for row in rows for v in row)
    assert tenants.b.tenant_id.encode() not in flat
    assert tenants.b.role_name.encode() not in flat
    if view != "SERVERS":  # A's server connections may all be closed by now
        assert tenants.a.tenant_id.encode() in flat


async def test_a_platform_admin_sees_every_tenant(
    core: Application,
    tenants: Tenants,
    pgwire: PgWireServer,
    traffic: tuple[PortLogin, PortLogin],
    b_client: asyncpg.Connection,
) -> None:
    name = f"pg-platform-{secrets.token_hex(3)}"
    _, secret = await core.services.register(name, tenants=["*"], scopes=(Scope.ADMIN,))
    assert secret is not None
    platform = PortLogin("127.0.0.1", pgwire.port, name, secret, ADMIN_DATABASE)
    pools = await admin_rows(pgwire, platform, "show pools;")
    tenants_seen = {row[0] for row in pools}
    assert {tenants.a.tenant_id.encode(), tenants.b.tenant_id.encode()} <= tenants_seen
    clients = await admin_rows(pgwire, platform, "SHOW CLIENTS")
    assert tenants.b.tenant_id.encode() in {row[2] for row in clients}
    stats = await admin_rows(pgwire, platform, "SHOW STATS")
    b_stats = [row for row in stats if row[0] == tenants.b.tenant_id.encode()]
    assert b_stats and int(b_stats[0][3]) >= 1  # B's queries


async def test_a_statement_the_relay_runs_shows_as_active_on_its_server(
    tenants: Tenants, pgwire: PgWireServer, traffic: tuple[PortLogin, PortLogin]
) -> None:
    """SHOW CLIENTS, SERVERS and POOLS count a statement the relay runs (no Python session
    holds its server connection) as Python's own: active, on that server connection."""
    if pgwire.relay is None:
        pytest.fail("the relay is not built (dbsvc_wire): this test needs it")
    a = traffic[0]
    conn = await asyncpg.connect(a.dsn, statement_cache_size=0)
    try:
        await conn.execute("SELECT pg_sleep(0.01)")  # Python runs the shape first
        running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(0.99)"))  # the relay's
        await asyncio.sleep(0.3)
        clients = await admin_rows(pgwire, a, "SHOW CLIENTS")
        servers = await admin_rows(pgwire, a, "SHOW SERVERS")
        pools = await admin_rows(pgwire, a, "SHOW POOLS")
        await running
    finally:
        await conn.close()
    mine = [row for row in clients if row[7] == str(conn.get_server_pid()).encode()]
    assert len(mine) == 1 and mine[0][4] == b"active" and mine[0][8], mine
    on = [row for row in servers if row[4] == mine[0][8]]
    assert len(on) == 1 and on[0][3] == b"active" and on[0][6] == a.service.encode(), on
    assert any(row[0] == tenants.a.tenant_id.encode() and int(row[2]) >= 1 for row in pools)


async def test_a_service_without_the_admin_scope_is_refused(
    tenants: Tenants, pgwire: PgWireServer, traffic: tuple[PortLogin, PortLogin]
) -> None:
    b = traffic[1]  # read only
    raw = await RawClient.open(pgwire)
    try:
        seen = await raw.login(PortLogin(b.host, b.port, b.service, b.secret, ADMIN_DATABASE))
        fields = codec.parse_error_fields(seen[-1][1:])
        assert fields["C"] == "42501" and fields["R"] == "dbsvc:permission_denied"
    finally:
        raw.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SHOW POOLS; SELECT 1",
        "SHOW server_version",
        "SELECT * FROM users",
        "SET application_name = 'x'",
    ],
)
async def test_only_the_four_shows_are_answered(
    sql: str, pgwire: PgWireServer, traffic: tuple[PortLogin, PortLogin]
) -> None:
    a = traffic[0]
    raw = await RawClient.open(pgwire)
    try:
        seen = await raw.login(PortLogin(a.host, a.port, a.service, a.secret, ADMIN_DATABASE))
        assert seen[-1][:1] == b"Z"
        assert sqlstates(await raw.query(sql)) == ["0A000"]
        assert not sqlstates(await raw.query("SHOW POOLS"))  # and the session goes on
    finally:
        raw.close()


async def test_psql_shows_the_pools(traffic: tuple[PortLogin, PortLogin], tenants: Tenants) -> None:
    a = traffic[0]
    env = {**os.environ, "PGPASSWORD": a.secret, "PGSSLMODE": "disable"}
    args = ["psql", "-X", "-A", "-t", "-h", a.host, "-p", str(a.port), "-U", a.service,
            "-d", ADMIN_DATABASE, "-c", "SHOW POOLS"]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert tenants.a.tenant_id in result.stdout and "transaction" in result.stdout


REST = "/api/v1/admin/pgwire"


async def test_the_rest_view_gives_a_tenant_admin_its_own_tenant_only(
    http: httpx.AsyncClient,
    tenants: Tenants,
    traffic: tuple[PortLogin, PortLogin],
    b_client: asyncpg.Connection,
) -> None:
    own = await http.get(REST, params={"tenant_id": tenants.a.tenant_id}, headers=tenants.a_headers)
    assert own.status_code == 200, own.text
    document = own.json()
    assert document["enabled"] is True
    assert {p["database"] for p in document["pools"]} == {tenants.a.tenant_id}
    assert tenants.b.tenant_id not in own.text and tenants.b.role_name not in own.text
    for params in ({"tenant_id": tenants.b.tenant_id}, {}):
        refused = await http.get(REST, params=params, headers=tenants.a_headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "permission_denied"
        assert tenants.b.role_name not in refused.text


async def test_the_rest_view_gives_the_platform_admin_every_tenant(
    http: httpx.AsyncClient,
    tenants: Tenants,
    traffic: tuple[PortLogin, PortLogin],
    b_client: asyncpg.Connection,
) -> None:
    response = await http.get(REST, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    document = response.json()
    databases = {p["database"] for p in document["pools"]}
    assert {tenants.a.tenant_id, tenants.b.tenant_id} <= databases
    assert tenants.b.tenant_id in {c["database"] for c in document["clients"]}
    assert set(document) >= {"pools", "clients", "servers", "stats"}


async def test_the_rest_view_needs_a_token(http: httpx.AsyncClient) -> None:
    assert (await http.get(REST)).status_code == 401
