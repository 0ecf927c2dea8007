"""Tokens one by one: revocation by ``jti``, the audience, the maximum lifetime.

A revoked token is refused at once by the instance that revoked it and by every other instance
within the authenticator's cache period; its siblings keep working. Only the administrator of
every tenant of a token's service may revoke it (another tenant's service gets the answer a
missing one gets). A token of another deployment (same key and issuer, another audience) is
refused, and so is one without an audience. No token outlives DBSVC_TOKEN_MAX_TTL_SECONDS.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import httpx
import jwt
import pytest

from database_service.app import Application
from database_service.auth import Scope, TokenCodec
from database_service.auth.tokens import everything
from database_service.errors import Unauthenticated
from database_service.tenancy.secrets import derive_key
from database_service_client import MultiDatabaseClient
from database_service_client import Unauthenticated as ClientUnauthenticated
from tests.fix_pg import PgCluster
from tests.fix_service import MASTER_KEY, make_settings
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

REVOKE = "/api/v1/admin/tokens/revoke"
PLATFORM = everything(service="test-platform")


async def query(http: httpx.AsyncClient, token: str, tenant_id: str) -> httpx.Response:
    return await http.post(
        "/api/v1/query",
        json={"sql": "SELECT 1", "tenant_id": tenant_id},
        headers={"Authorization": f"Bearer {token}"},
    )


async def registered(core: Application, tenants: list[str], scopes: list[Scope]) -> str:
    name = f"rv-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=tenants, scopes=scopes, with_secret=False)
    return name


def blanked(response: httpx.Response, *names: str) -> tuple[int, str]:
    text = response.text
    for name in names:
        text = text.replace(name, "<name>")
    return response.status_code, text


async def test_a_revoked_token_is_refused_and_its_siblings_are_not(
    http: httpx.AsyncClient, grpc_target: str, core: Application, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    name = await registered(core, [a], [Scope.READ])
    minted = []
    for _ in range(2):
        response = await http.post(
            "/api/v1/admin/tokens", json={"service": name}, headers=tenants.a_headers
        )
        assert response.status_code == 200, response.text
        minted.append(response.json())
    first, second = (m["access_token"] for m in minted)
    assert minted[0]["token_id"] and minted[0]["token_id"] != minted[1]["token_id"]
    assert (await query(http, first, a)).status_code == 200

    revoked = await http.post(REVOKE, json={"token": first}, headers=tenants.a_headers)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["token_id"] == minted[0]["token_id"]
    assert revoked.json()["revoked"] and not revoked.json()["already_revoked"]
    refused = await query(http, first, a)
    assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
    async with MultiDatabaseClient(grpc_target, a, first, retries=0) as client:
        with pytest.raises(ClientUnauthenticated):
            await client.fetch_all("SELECT 1")
    assert (await query(http, second, a)).status_code == 200  # its sibling still works

    by_id = {"service": name, "token_id": minted[1]["token_id"]}
    assert (await http.post(REVOKE, json=by_id, headers=tenants.a_headers)).status_code == 200
    assert (await query(http, second, a)).status_code == 401
    again = await http.post(REVOKE, json=by_id, headers=tenants.a_headers)
    assert again.status_code == 200 and again.json()["already_revoked"]

    await core.audit.flush()
    revocations = await core.owner_pool.fetch(
        f"SELECT detail FROM {core.settings.control_schema}.audit_log"
        " WHERE action = 'token.revoke' AND outcome = 'ok' AND detail LIKE $1",
        f"{name} %",
    )
    assert len(revocations) == 3


async def test_revocation_reaches_every_instance_within_the_cache_period(
    core: Application, pg_cluster: PgCluster, tmp_path: Path, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    name = await registered(core, [a], [Scope.READ])
    token = core.tokens.issue(name, tenants=[a], scopes=[Scope.READ], ttl_seconds=600)
    other = Application(
        make_settings(pg_cluster, tmp_path),
        start_nats=False,
        migrate_tenants_on_start=False,
        maintain_partitions=False,
    )
    await other.__aenter__()
    try:
        assert other.tokens.audience == core.tokens.audience  # one deployment, one audience
        await other.authenticator.authenticate(f"Bearer {token}")  # cached there now
        revoked = await core.service_admin.revoke_token(PLATFORM, token=token)
        assert revoked.service == name
        started = time.monotonic()
        with pytest.raises(Unauthenticated, match="revoked"):
            await core.authenticator.authenticate(f"Bearer {token}")  # here: at once
        while True:
            try:
                await other.authenticator.authenticate(f"Bearer {token}")
            except Unauthenticated as exc:
                assert "revoked" in exc.message
                break
            assert time.monotonic() - started < 5.0 + 2.0, "still accepted after the cache period"
            await asyncio.sleep(0.2)
    finally:
        await other.__aexit__(None, None, None)


@pytest.mark.parametrize("target", ["victim", "platform"])
async def test_a_tenant_admin_cannot_revoke_another_tenants_tokens(
    http: httpx.AsyncClient, core: Application, tenants: Tenants, target: str
) -> None:
    b = tenants.b.tenant_id
    holder = [b] if target == "victim" else ["*"]
    name = await registered(core, holder, [Scope.READ])
    token = core.tokens.issue(name, tenants=[b], scopes=[Scope.READ], ttl_seconds=600)
    jti = core.tokens.inspect(token).token_id
    ghost = f"ghost-{secrets.token_hex(4)}"

    by_token = await http.post(REVOKE, json={"token": token}, headers=tenants.a_headers)
    by_id = await http.post(
        REVOKE, json={"service": name, "token_id": jti}, headers=tenants.a_headers
    )
    missing = await http.post(
        REVOKE, json={"service": ghost, "token_id": jti}, headers=tenants.a_headers
    )
    assert by_token.status_code == by_id.status_code == 404, (by_token.text, by_id.text)
    # The answer a service that does not exist gets: no roster of other tenants' services.
    assert blanked(by_id, name) == blanked(missing, ghost)
    assert (await query(http, token, b)).status_code == 200  # still valid
    assert not await core.authenticator.is_revoked(name, jti)


async def test_a_token_of_another_deployment_cannot_be_revoked_here(
    http: httpx.AsyncClient, admin_headers: dict[str, str], core: Application
) -> None:
    foreign = _foreign_codec(core).issue("svc", tenants=["*"], scopes=[], ttl_seconds=60)
    response = await http.post(REVOKE, json={"token": foreign}, headers=admin_headers)
    assert response.status_code == 400 and "not a token of this deployment" in response.text


def _foreign_codec(core: Application) -> TokenCodec:
    """Same master key, same issuer, another deployment."""
    return TokenCodec(
        derive_key(MASTER_KEY, "service-tokens"),
        issuer=core.settings.token_issuer,
        audience="urn:database-service:another-deployment",
    )


async def test_tokens_of_another_deployment_or_without_an_audience_are_refused(
    http: httpx.AsyncClient, core: Application, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    name = await registered(core, [a], [Scope.READ])
    ours = core.tokens.issue(name, tenants=[a], scopes=[Scope.READ], ttl_seconds=60)
    assert (await query(http, ours, a)).status_code == 200
    assert core.tokens.audience.startswith("urn:database-service:")
    theirs = _foreign_codec(core).issue(name, tenants=[a], scopes=[Scope.READ], ttl_seconds=60)
    assert (await query(http, theirs, a)).status_code == 401
    # A token in the old shape (no audience), signed with the same key.
    now = int(time.time())
    claims = {
        "iss": core.settings.token_issuer, "sub": name, "iat": now, "exp": now + 60,
        "jti": secrets.token_hex(16), "tenants": [a], "scopes": ["read"],
    }  # fmt: skip
    unaddressed = jwt.encode(claims, derive_key(MASTER_KEY, "service-tokens"), algorithm="HS256")
    response = await query(http, unaddressed, a)
    assert response.status_code == 401 and "aud" in response.json()["error"]["message"]


async def test_no_token_outlives_the_maximum_lifetime(
    http: httpx.AsyncClient, admin_headers: dict[str, str], core: Application, tenants: Tenants
) -> None:
    maximum = core.settings.token_max_ttl_seconds
    name, secret = await _with_secret(core, tenants.a.tenant_id)
    too_long = maximum + 3600
    issued = await http.post(
        "/api/v1/admin/tokens",
        json={"service": name, "ttl_seconds": too_long},
        headers=admin_headers,
    )
    assert issued.status_code == 400, issued.text
    assert "DBSVC_TOKEN_MAX_TTL_SECONDS" in issued.json()["error"]["message"]
    exchanged = await http.post(
        "/api/v1/auth/token", json={"service": name, "secret": secret, "ttl_seconds": too_long}
    )
    assert exchanged.status_code == 400, exchanged.text
    at_most = await http.post(
        "/api/v1/admin/tokens",
        json={"service": name, "ttl_seconds": maximum},
        headers=admin_headers,
    )
    assert at_most.status_code == 200 and at_most.json()["expires_in"] == maximum
    claims = jwt.decode(at_most.json()["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == maximum
    default = await http.post("/api/v1/auth/token", json={"service": name, "secret": secret})
    assert default.status_code == 200
    assert default.json()["expires_in"] == core.settings.token_default_ttl_seconds


async def _with_secret(core: Application, tenant_id: str) -> tuple[str, str]:
    name = f"ttl-{secrets.token_hex(4)}"
    _, secret = await core.service_admin.create(PLATFORM, name, tenants=[tenant_id], scopes="read")
    assert secret is not None
    return name, secret


async def test_service_token_helper_still_mints_working_tokens(
    http: httpx.AsyncClient, core: Application, tenants: Tenants
) -> None:
    # The fixtures' tokens carry this deployment's audience and an id like every other.
    token = await service_token(core, [tenants.a.tenant_id], [Scope.READ])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == core.tokens.audience and claims["jti"]
    assert (await query(http, token, tenants.a.tenant_id)).status_code == 200
