"""An access token as the password on the PostgreSQL wire port: user ``token`` asks for it with
cleartext password authentication, which the port accepts only over TLS (refused before the
client sends anything otherwise). The token is checked as REST and gRPC check it: signature,
expiry, revocation, the service's tenants and scopes. SCRAM-SHA-256 stays the default."""

from __future__ import annotations

import struct

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire import codec
from database_service.pgwire.server import TOKEN_USER, PgWireServer
from tests.fix_pgwire import RawClient, TlsPort
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

REVOKE = "/api/v1/admin/tokens/revoke"


async def connect(tls: TlsPort, tenant_id: str, token: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=tls.port, user=TOKEN_USER, password=token, database=tenant_id,
        ssl=tls.client_context,
    )  # fmt: skip


async def test_a_token_over_tls_logs_in_as_its_service(
    core: Application, tenants: Tenants, pgwire_tls: TlsPort
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ,))
    conn = await connect(pgwire_tls, tenants.a.tenant_id, token)
    try:
        service = core.tokens.inspect(token).service
        assert conn.get_settings().session_authorization == service
        assert await conn.fetchval("SELECT count(*) FROM users") >= 0
        with pytest.raises(asyncpg.PostgresError) as info:  # read scope only
            await conn.execute("INSERT INTO users VALUES ('t', 't@x', 'free')")
        assert info.value.server_source_function == "dbsvc:permission_denied"
    finally:
        await conn.close()


async def test_a_token_without_tls_is_refused_before_it_is_sent(
    tenants: Tenants, pgwire: PgWireServer
) -> None:
    raw = await RawClient.open(pgwire)
    try:
        await raw.startup(TOKEN_USER, tenants.a.tenant_id)
        kind, payload = await raw.read()
        # No AuthenticationCleartextPassword: the FATAL comes first.
        assert kind == b"E", (kind, payload)
        fields = codec.parse_error_fields(payload)
        assert fields["C"] == "28000" and "TLS" in fields["M"]
        assert fields["R"] == "dbsvc:unauthenticated"
    finally:
        raw.close()


async def test_asyncpg_without_tls_gets_the_clear_error(
    core: Application, tenants: Tenants, pgwire: PgWireServer
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ,))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="only over TLS"):
        await asyncpg.connect(
            host="127.0.0.1", port=pgwire.port, user=TOKEN_USER, password=token,
            database=tenants.a.tenant_id, ssl=False,
        )  # fmt: skip


@pytest.mark.parametrize(
    "token",
    ["not-a-token", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", ""],
    ids=["garbage", "forged", "empty"],
)
async def test_a_bad_token_is_refused(tenants: Tenants, pgwire_tls: TlsPort, token: str) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(pgwire_tls, tenants.a.tenant_id, token)


async def test_an_expired_token_is_refused(
    core: Application, tenants: Tenants, pgwire_tls: TlsPort
) -> None:
    name = "pg-expired"
    await core.services.register(
        name, tenants=[tenants.a.tenant_id], scopes=(Scope.READ,), with_secret=False
    )
    token = core.tokens.issue(
        name, tenants=[tenants.a.tenant_id], scopes=(Scope.READ,), ttl_seconds=-120
    )
    with pytest.raises(asyncpg.InvalidPasswordError):
        await connect(pgwire_tls, tenants.a.tenant_id, token)


async def test_a_revoked_token_is_refused(
    core: Application, tenants: Tenants, pgwire_tls: TlsPort, http: httpx.AsyncClient
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ,))
    conn = await connect(pgwire_tls, tenants.a.tenant_id, token)
    await conn.close()
    revoked = await http.post(REVOKE, json={"token": token}, headers=tenants.a_headers)
    assert revoked.status_code == 200, revoked.text
    with pytest.raises(asyncpg.InvalidPasswordError, match="revoked"):
        await connect(pgwire_tls, tenants.a.tenant_id, token)


async def test_a_token_for_a_naming_bs_database_is_refused(
    core: Application, tenants: Tenants, pgwire_tls: TlsPort
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await connect(pgwire_tls, tenants.b.tenant_id, token)


async def test_scram_stays_the_default_for_services(tenants: Tenants, pgwire: PgWireServer) -> None:
    raw = await RawClient.open(pgwire)
    try:
        await raw.startup("some-service", tenants.a.tenant_id)
        kind, payload = await raw.read()
        assert kind == b"R" and payload[:4] == struct.pack("!I", 10)  # AuthenticationSASL
        assert b"SCRAM-SHA-256" in payload
    finally:
        raw.close()
