"""Service authentication: tokens, scopes, tenants, disabled services, and the audit trail."""

from __future__ import annotations

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from tests.fix_service import TenantFactory, TokenFactory

QUERY = "/api/v1/query"


async def denied_events(
    http: httpx.AsyncClient, admin: dict[str, str], tenant_id: str | None
) -> list[dict]:
    params = {"tenant_id": tenant_id} if tenant_id else {}
    events = (await http.get("/api/v1/admin/audit", params=params, headers=admin)).json()["events"]
    return [e for e in events if e["outcome"] == "denied"]


async def test_missing_token_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post(QUERY, json={"sql": "SELECT 1", "tenant_id": "abc"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert response.headers["www-authenticate"] == "Bearer"


async def test_malformed_authorization_header_is_401(http: httpx.AsyncClient) -> None:
    response = await http.post(
        QUERY, json={"sql": "SELECT 1", "tenant_id": "abc"}, headers={"Authorization": "Basic abc"}
    )
    assert response.status_code == 401


async def test_forged_token_is_401(http: httpx.AsyncClient, core: Application) -> None:
    token = core.tokens.issue("svc", tenants=["*"], scopes=list(Scope), ttl_seconds=60)
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    response = await http.post(
        QUERY,
        json={"sql": "SELECT 1", "tenant_id": "abc"},
        headers={"Authorization": f"Bearer {forged}"},
    )
    assert response.status_code == 401


async def test_expired_token_is_401(
    http: httpx.AsyncClient, core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("exp")
    await core.services.register(
        "svc-expired", tenants=[tenant.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    token = core.tokens.issue(
        "svc-expired", tenants=[tenant.tenant_id], scopes=[Scope.READ], ttl_seconds=-60
    )
    response = await http.post(
        QUERY,
        json={"sql": "SELECT 1", "tenant_id": tenant.tenant_id},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401
    assert "expired" in response.json()["error"]["message"]


async def test_token_for_another_tenant_is_403_and_audited(
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
    admin_headers: dict[str, str],
) -> None:
    mine, theirs = await new_tenant("mine"), await new_tenant("theirs")
    headers = await service_headers([mine.tenant_id])
    response = await http.post(
        QUERY, json={"sql": "SELECT 1", "tenant_id": theirs.tenant_id}, headers=headers
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    events = await denied_events(http, admin_headers, theirs.tenant_id)
    assert events and events[0]["code"] == "permission_denied" and events[0]["action"] == "query"


async def test_read_scope_cannot_write(
    http: httpx.AsyncClient, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    tenant = await new_tenant("ro")
    headers = await service_headers([tenant.tenant_id], (Scope.READ,))
    response = await http.post(
        QUERY,
        json={
            "sql": "INSERT INTO users VALUES ('u1', 'u1@x', 'free')",
            "tenant_id": tenant.tenant_id,
        },
        headers=headers,
    )
    assert response.status_code == 403
    assert "'write'" in response.json()["error"]["message"]


async def test_read_scope_runs_in_a_read_only_transaction(
    http: httpx.AsyncClient, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    # nextval() writes, but the guard sees a SELECT: PostgreSQL's READ ONLY transaction stops it.
    tenant = await new_tenant("ro_tx")
    headers = await service_headers([tenant.tenant_id], (Scope.READ,))
    response = await http.post(
        QUERY,
        json={
            "sql": "SELECT nextval('trading_history_trade_id_seq')",
            "tenant_id": tenant.tenant_id,
        },
        headers=headers,
    )
    assert response.status_code == 403  # read_only_transaction (errors.py)
    assert response.json()["error"]["sqlstate"] == "25006"


async def test_ddl_needs_the_admin_scope(
    http: httpx.AsyncClient, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    tenant = await new_tenant("ddl")
    body = {"sql": "CREATE TABLE notes (id int)", "tenant_id": tenant.tenant_id}
    writer = await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE))
    assert (await http.post(QUERY, json=body, headers=writer)).status_code == 403
    admin = await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    response = await http.post(QUERY, json=body, headers=admin)
    assert response.status_code == 200, response.text


async def test_disabled_service_is_refused_even_with_a_valid_token(
    http: httpx.AsyncClient, core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dis")
    await core.services.register(
        "svc-disabled", tenants=[tenant.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    token = core.tokens.issue(
        "svc-disabled", tenants=[tenant.tenant_id], scopes=[Scope.READ], ttl_seconds=60
    )
    headers = {"Authorization": f"Bearer {token}"}
    body = {"sql": "SELECT 1", "tenant_id": tenant.tenant_id}
    assert (await http.post(QUERY, json=body, headers=headers)).status_code == 200
    await core.services.set_active("svc-disabled", False)
    core.authenticator.forget("svc-disabled")
    assert (await http.post(QUERY, json=body, headers=headers)).status_code == 401


async def test_token_scopes_are_narrowed_to_the_identity(
    http: httpx.AsyncClient, core: Application, new_tenant: TenantFactory
) -> None:
    # A token claiming more than its service holds gets only what the service holds.
    tenant = await new_tenant("narrow")
    await core.services.register(
        "svc-narrow", tenants=[tenant.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    token = core.tokens.issue("svc-narrow", tenants=["*"], scopes=list(Scope), ttl_seconds=60)
    response = await http.post(
        QUERY,
        json={"sql": "DELETE FROM users", "tenant_id": tenant.tenant_id},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 403


async def test_client_credentials_exchange_issues_a_working_token(
    http: httpx.AsyncClient, admin_headers: dict[str, str], new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("cc")
    created = await http.post(
        "/api/v1/admin/services",
        json={"service": "trading-engine-cc", "tenants": [tenant.tenant_id], "scopes": ["read"]},
        headers=admin_headers,
    )
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    wrong = await http.post(
        "/api/v1/auth/token", json={"service": "trading-engine-cc", "secret": "nope"}
    )
    assert wrong.status_code == 401
    issued = await http.post(
        "/api/v1/auth/token", json={"service": "trading-engine-cc", "secret": secret}
    )
    assert issued.status_code == 200
    token = issued.json()["access_token"]
    response = await http.post(
        QUERY,
        json={"sql": "SELECT 41 + 1 AS answer", "tenant_id": tenant.tenant_id},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.json()["rows"] == [[42]]


async def test_admin_routes_need_the_admin_scope(
    http: httpx.AsyncClient, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    tenant = await new_tenant("noadmin")
    headers = await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE))
    for method, path in [
        ("post", "/api/v1/admin/schema/create"),
        ("get", "/api/v1/admin/tenants"),
        ("post", f"/api/v1/admin/tenants/{tenant.tenant_id}/suspend"),
        ("get", "/api/v1/admin/services"),
    ]:
        kwargs = {"json": {"tenant_id": "newco"}} if method == "post" else {}
        response = await getattr(http, method)(path, headers=headers, **kwargs)
        assert response.status_code == 403, (path, response.text)


async def test_unauthenticated_attempts_are_audited(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    await http.post(
        QUERY,
        json={"sql": "SELECT 1", "tenant_id": "abc"},
        headers={"Authorization": "Bearer junk"},
    )
    events = (await http.get("/api/v1/admin/audit", headers=admin_headers)).json()["events"]
    assert any(e["code"] == "unauthenticated" and e["outcome"] == "denied" for e in events)


# --- the audit trail keeps who did what, not the values they sent ------------------------------


async def audit_rows(core: Application, tenant_id: str) -> list[dict]:
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT * FROM {core.settings.control_schema}.audit_log WHERE tenant_id = $1 ORDER BY id",
        tenant_id,
    )
    return [dict(r) for r in rows]


async def test_audit_details_do_not_keep_the_values_a_caller_sent(
    http: httpx.AsyncClient,
    core: Application,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = await new_tenant("redact")
    headers = await service_headers([tenant.tenant_id])
    secret = "hunter2-4111111111111111"
    bodies = [
        # The query core's parameter coercion: "...; got str '<value>'".
        {"sql": "SELECT * FROM users WHERE user_id = $1::text AND $2::int > 0",
         "params": ["u", secret]},
        # PostgreSQL: invalid input syntax for type integer: "<value>".
        {"sql": "SELECT $1::text::int", "params": [secret]},
        {"sql": f"SELECT '{secret}'::int"},
        {"sql": f"SELECT '{secret}'::uuid"},
        {"sql": "SELECT $1::int", "params": [{"card": secret}]},
    ]  # fmt: skip
    for body in bodies:
        response = await http.post(
            QUERY, json={**body, "tenant_id": tenant.tenant_id}, headers=headers
        )
        assert 400 <= response.status_code < 500, response.text
    rows = await audit_rows(core, tenant.tenant_id)
    failed = [r for r in rows if r["outcome"] != "ok"]
    assert len(failed) == len(bodies), rows
    assert all(r["detail"] for r in failed)  # what went wrong is kept...
    assert not any(secret in r["detail"] or "4111" in r["detail"] for r in failed), failed


async def test_an_error_that_is_not_the_services_own_is_audited_by_the_query_core(
    http: httpx.AsyncClient,
    core: Application,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = await new_tenant("bug")
    headers = await service_headers([tenant.tenant_id])

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaboom: internal detail")

    monkeypatch.setattr(core.guard, "classify_async", broken)
    response = await http.post(
        QUERY, json={"sql": "SELECT 1", "tenant_id": tenant.tenant_id}, headers=headers
    )
    assert response.status_code == 500 and "kaboom" not in response.text
    (row,) = [r for r in await audit_rows(core, tenant.tenant_id) if r["action"] == "query"]
    assert (row["outcome"], row["code"], row["detail"]) == ("error", "internal", "RuntimeError")
