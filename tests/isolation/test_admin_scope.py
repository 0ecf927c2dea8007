"""Tenant A's administrator attacks through the admin API: its ``admin`` scope covers tenant A
only. Anything about another tenant (its services, tokens, audit rows, tenant record, migration)
is refused, and anything spanning tenants (every service, all audit events, the shared
partitions, migrating every tenant) needs the platform administrator (tenants ``*``).

A non-platform caller asking about another tenant's service gets exactly the answer it gets for a
service that does not exist. Every refusal is audited. B's data is compared with a snapshot after
each attack (``unchanged_victim``).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client import MultiDatabaseClient, PermissionDenied
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

RWA = (Scope.READ, Scope.WRITE, Scope.ADMIN)


@dataclass
class Services:
    own: str  # tenants [A], read + write
    own_ingest: str  # tenants [A], read + ingest: a scope A's administrator does not hold
    victim: str  # tenants [B]
    spanning: str  # tenants [A, B]
    platform: str  # tenants ['*']
    ghost: str  # never registered


@pytest.fixture
async def services(core: Application, tenants: Tenants) -> Services:
    tag = secrets.token_hex(3)
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    defined = {
        "own": ([a], [Scope.READ, Scope.WRITE]),
        "own_ingest": ([a], [Scope.READ, Scope.INGEST]),
        "victim": ([b], [Scope.READ, Scope.WRITE]),
        "spanning": ([a, b], [Scope.READ]),
        "platform": (["*"], [Scope.READ]),
    }
    names: dict[str, str] = {}
    for key, (tenant_ids, scopes) in defined.items():
        names[key] = f"{key.replace('_', '-')}-{tag}"
        await core.services.register(
            names[key], tenants=tenant_ids, scopes=scopes, with_secret=False
        )
    return Services(**names, ghost=f"ghost-{tag}")


def no_secret(response: httpx.Response) -> httpx.Response:
    assert SECRET not in response.text
    return response


async def mint(http: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return no_secret(await http.post("/api/v1/admin/tokens", json=body, headers=headers))


def answer(response: httpx.Response, name: str) -> tuple[int, str]:
    """The response with the service's name blanked, to compare two refusals."""
    return response.status_code, response.text.replace(name, "<service>")


async def denied_since(
    http: httpx.AsyncClient, admin_headers: dict[str, str], since: dt.datetime
) -> list[dict[str, Any]]:
    events = (
        await http.get("/api/v1/admin/audit", params={"limit": 1000}, headers=admin_headers)
    ).json()["events"]
    return [
        e
        for e in events
        if e["outcome"] == "denied" and dt.datetime.fromisoformat(e["at"]) >= since
    ]


# --- tokens --------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["victim", "spanning", "platform"])
async def test_tenant_admin_cannot_mint_token_for_another_tenants_service(
    http: httpx.AsyncClient, tenants: Tenants, services: Services, target: str
) -> None:
    name = getattr(services, target)
    refused = await mint(http, tenants.a_headers, service=name)
    missing = await mint(http, tenants.a_headers, service=services.ghost)
    assert refused.status_code == 404, refused.text
    # No existence oracle: the same answer as for a service that does not exist.
    assert answer(refused, name) == answer(missing, services.ghost)


async def test_minted_victim_token_never_reaches_the_victims_tables(
    http: httpx.AsyncClient, tenants: Tenants, services: Services
) -> None:
    minted = await mint(
        http, tenants.a_headers, service=services.victim, tenants=[tenants.b.tenant_id]
    )
    assert "access_token" not in minted.json()
    assert minted.status_code == 404


async def test_tenant_admin_mints_tokens_for_its_own_service(
    http: httpx.AsyncClient, tenants: Tenants, services: Services
) -> None:
    minted = await mint(http, tenants.a_headers, service=services.own, scopes=["read"])
    assert minted.status_code == 200, minted.text
    headers = {"Authorization": f"Bearer {minted.json()['access_token']}"}
    own = await http.post(
        "/api/v1/query", json={"sql": "SELECT 1", "tenant_id": tenants.a.tenant_id}, headers=headers
    )
    assert own.status_code == 200
    other = await http.post(
        "/api/v1/query",
        json={"sql": "SELECT * FROM users", "tenant_id": tenants.b.tenant_id},
        headers=headers,
    )
    assert no_secret(other).status_code == 403


@pytest.mark.parametrize("widened", [["{b}"], ["{a}", "{b}"], ["*"]])
async def test_tenant_admin_cannot_widen_a_tokens_tenants(
    http: httpx.AsyncClient, tenants: Tenants, services: Services, widened: list[str]
) -> None:
    asked = [t.format(a=tenants.a.tenant_id, b=tenants.b.tenant_id) for t in widened]
    refused = await mint(http, tenants.a_headers, service=services.own, tenants=asked)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "permission_denied"


async def test_tenant_admin_cannot_mint_scopes_the_service_does_not_hold(
    http: httpx.AsyncClient, tenants: Tenants, services: Services
) -> None:
    # A's administrator holds admin, but the service does not: the token may not carry it.
    refused = await mint(http, tenants.a_headers, service=services.own, scopes=["read", "admin"])
    assert refused.status_code == 403, refused.text


async def test_tenant_admin_cannot_mint_for_a_service_with_scopes_it_does_not_hold(
    http: httpx.AsyncClient, tenants: Tenants, services: Services
) -> None:
    refused = await mint(http, tenants.a_headers, service=services.own_ingest)
    assert refused.status_code == 403, refused.text
    narrowed = await mint(http, tenants.a_headers, service=services.own_ingest, scopes=["read"])
    assert narrowed.status_code == 403, narrowed.text


async def test_platform_admin_mints_for_any_service(
    http: httpx.AsyncClient, admin_headers: dict[str, str], services: Services
) -> None:
    for name in (services.victim, services.spanning, services.platform):
        assert (await mint(http, admin_headers, service=name)).status_code == 200


# --- services ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant_ids", "scopes"),
    [
        (["{b}"], ["read"]),
        (["{a}", "{b}"], ["read"]),
        (["*"], ["read"]),
        (["{a}"], ["ingest"]),
        (["{a}"], ["metrics"]),
    ],
    ids=["other tenant", "spanning", "every tenant", "unheld scope", "metrics scope"],
)
async def test_tenant_admin_cannot_create_a_service_beyond_its_tenants_and_scopes(
    http: httpx.AsyncClient, tenants: Tenants, tenant_ids: list[str], scopes: list[str]
) -> None:
    body = {
        "service": f"made-{secrets.token_hex(3)}",
        "tenants": [t.format(a=tenants.a.tenant_id, b=tenants.b.tenant_id) for t in tenant_ids],
        "scopes": scopes,
        "with_secret": False,
    }
    response = no_secret(
        await http.post("/api/v1/admin/services", json=body, headers=tenants.a_headers)
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "permission_denied"


async def test_tenant_admin_creates_a_service_within_its_tenants_and_scopes(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    body = {
        "service": f"made-{secrets.token_hex(3)}",
        "tenants": [tenants.a.tenant_id],
        "scopes": ["read", "write"],
        "with_secret": False,
    }
    response = await http.post("/api/v1/admin/services", json=body, headers=tenants.a_headers)
    assert response.status_code == 201, response.text


async def test_tenant_admin_lists_only_services_within_its_tenants(
    http: httpx.AsyncClient, tenants: Tenants, services: Services
) -> None:
    response = await http.get("/api/v1/admin/services", headers=tenants.a_headers)
    assert response.status_code == 200
    listed = response.json()["services"]
    names = {s["service"] for s in listed}
    assert {services.own, services.own_ingest} <= names
    assert not names & {services.victim, services.spanning, services.platform}
    for service in listed:
        assert service["tenants"] == [tenants.a.tenant_id], service
    assert tenants.b.tenant_id not in response.text


async def test_platform_admin_lists_every_service(
    http: httpx.AsyncClient, admin_headers: dict[str, str], services: Services
) -> None:
    listed = (await http.get("/api/v1/admin/services", headers=admin_headers)).json()["services"]
    assert {services.victim, services.spanning, services.platform} <= {s["service"] for s in listed}


# --- audit ---------------------------------------------------------------------------------


async def test_audit_without_a_tenant_filter_needs_the_platform_admin(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = no_secret(await http.get("/api/v1/admin/audit", headers=tenants.a_headers))
    assert response.status_code == 403, response.text[:300]


async def test_tenant_admin_cannot_read_another_tenants_audit(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.get(
        "/api/v1/admin/audit", params={"tenant_id": tenants.b.tenant_id}, headers=tenants.a_headers
    )
    assert response.status_code == 403


async def test_tenant_admin_reads_only_its_own_tenants_audit_rows(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    await tenants.attack(http, "SELECT 1")
    response = await http.get(
        "/api/v1/admin/audit", params={"tenant_id": tenants.a.tenant_id}, headers=tenants.a_headers
    )
    assert response.status_code == 200
    events = response.json()["events"]
    assert events and {e["tenant_id"] for e in events} == {tenants.a.tenant_id}


# --- partitions ----------------------------------------------------------------------------

PARTITION_CALLS: dict[
    str, Callable[[httpx.AsyncClient, dict[str, str]], Awaitable[httpx.Response]]
] = {
    "list": lambda h, hd: h.get("/api/v1/admin/partitions", headers=hd),
    "list one table": lambda h, hd: h.get(
        "/api/v1/admin/partitions", params={"table": "trading_ticks"}, headers=hd
    ),
    "maintain": lambda h, hd: h.post("/api/v1/admin/partitions/maintain", headers=hd),
    "detach": lambda h, hd: h.post(
        "/api/v1/admin/partitions/trading_ticks/trading_ticks_default/detach", headers=hd
    ),
    "attach": lambda h, hd: h.post(
        "/api/v1/admin/partitions/trading_ticks/trading_ticks_default/attach",
        params={"start": "2024-01-01T00:00:00Z"},
        headers=hd,
    ),
}


@pytest.mark.parametrize("call", PARTITION_CALLS.values(), ids=PARTITION_CALLS.keys())
async def test_rest_partitions_need_the_platform_admin(
    http: httpx.AsyncClient, tenants: Tenants, call: Any
) -> None:
    response = await call(http, tenants.a_headers)
    assert response.status_code == 403, response.text[:300]
    assert "rows_estimate" not in response.text


@pytest.mark.parametrize("action", ["maintain", "detach", "attach"])
async def test_grpc_partition_changes_need_the_platform_admin(
    as_a: MultiDatabaseClient, action: str
) -> None:
    with pytest.raises(PermissionDenied):
        await as_a.partitions(
            "trading_ticks",
            action=action,
            partition="trading_ticks_default",
            start=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        )


# --- migration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"tenant_ids": None},
        {"tenant_ids": []},
        {"tenant_ids": ["{b}"]},
        {"tenant_ids": ["{a}", "{b}"]},
    ],
    ids=["all", "all (null)", "control plane only", "other tenant", "own and other"],
)
async def test_tenant_admin_cannot_migrate_beyond_its_tenants(
    http: httpx.AsyncClient, tenants: Tenants, body: dict[str, Any]
) -> None:
    if body.get("tenant_ids"):
        body = {
            "tenant_ids": [
                t.format(a=tenants.a.tenant_id, b=tenants.b.tenant_id) for t in body["tenant_ids"]
            ]
        }
    response = no_secret(
        await http.post("/api/v1/admin/migration", json=body, headers=tenants.a_headers)
    )
    assert response.status_code == 403, response.text[:300]
    assert response.json()["error"]["code"] == "permission_denied"


async def test_tenant_admin_migrates_its_own_tenant_and_sees_only_it(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.post(
        "/api/v1/admin/migration",
        json={"tenant_ids": [tenants.a.tenant_id]},
        headers=tenants.a_headers,
    )
    assert response.status_code == 200, response.text
    assert [t["tenant_id"] for t in response.json()["tenants"]] == [tenants.a.tenant_id]


# --- tenants -------------------------------------------------------------------------------


async def test_tenant_admin_lists_only_its_own_tenants(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.get("/api/v1/admin/tenants", headers=tenants.a_headers)
    assert response.status_code == 200
    assert [t["tenant_id"] for t in response.json()["tenants"]] == [tenants.a.tenant_id]


TENANT_CALLS: dict[
    str, Callable[[httpx.AsyncClient, str, dict[str, str]], Awaitable[httpx.Response]]
] = {
    "get": lambda h, t, hd: h.get(f"/api/v1/admin/tenants/{t}", headers=hd),
    "suspend": lambda h, t, hd: h.post(f"/api/v1/admin/tenants/{t}/suspend", headers=hd),
    "resume": lambda h, t, hd: h.post(f"/api/v1/admin/tenants/{t}/resume", headers=hd),
    "delete": lambda h, t, hd: h.delete(f"/api/v1/admin/tenants/{t}?confirm=true", headers=hd),
}


@pytest.mark.parametrize("call", TENANT_CALLS.values(), ids=TENANT_CALLS.keys())
async def test_tenant_admin_cannot_touch_another_tenant_and_learns_nothing(
    http: httpx.AsyncClient, tenants: Tenants, call: Any
) -> None:
    victim = tenants.b.tenant_id
    ghost = f"ghost_{secrets.token_hex(4)}"
    refused = no_secret(await call(http, victim, tenants.a_headers))
    missing = await call(http, ghost, tenants.a_headers)
    assert refused.status_code == 403
    assert (refused.status_code, refused.text.replace(victim, "<t>")) == (
        missing.status_code,
        missing.text.replace(ghost, "<t>"),
    )


@pytest.fixture
async def as_a(core: Application, grpc_target: str, tenants: Tenants) -> Any:
    token = await service_token(core, [tenants.a.tenant_id], RWA)
    async with MultiDatabaseClient(grpc_target, tenants.a.tenant_id, token, retries=0) as client:
        yield client


@pytest.mark.parametrize("front_end", ["rest", "grpc"])
async def test_tenant_admin_cannot_create_another_tenant_and_is_audited(
    http: httpx.AsyncClient,
    tenants: Tenants,
    as_a: MultiDatabaseClient,
    admin_headers: dict[str, str],
    front_end: str,
) -> None:
    since = dt.datetime.now(dt.UTC)
    hijacked = f"hijack_{secrets.token_hex(4)}"
    if front_end == "rest":
        response = await http.post(
            "/api/v1/admin/schema/create", json={"tenant_id": hijacked}, headers=tenants.a_headers
        )
        assert response.status_code == 403
    else:
        with pytest.raises(PermissionDenied):
            await as_a.create_tenant_schema(hijacked)
    events = await denied_since(http, admin_headers, since)
    assert any(e["tenant_id"] == hijacked and e["action"] == "tenant.create" for e in events)


# --- the audit trail -----------------------------------------------------------------------


async def test_every_admin_refusal_is_audited(
    http: httpx.AsyncClient,
    tenants: Tenants,
    services: Services,
    admin_headers: dict[str, str],
) -> None:
    since = dt.datetime.now(dt.UTC)
    a = tenants.a_headers
    await mint(http, a, service=services.victim)
    await mint(http, a, service=services.own, tenants=[tenants.b.tenant_id])
    await http.post(
        "/api/v1/admin/services",
        json={
            "service": f"x-{secrets.token_hex(3)}",
            "tenants": [tenants.b.tenant_id],
            "scopes": ["read"],
        },
        headers=a,
    )
    await http.get("/api/v1/admin/audit", headers=a)
    await http.get("/api/v1/admin/partitions", headers=a)
    await http.post("/api/v1/admin/migration", json={}, headers=a)
    actions = {e["action"] for e in await denied_since(http, admin_headers, since)}
    assert {
        "token.issue",
        "service.create",
        "audit.read",
        "partitions.list",
        "migrate",
    } <= actions, actions


# --- the status page and the Central Hub's endpoints (issue #15) --------------------------------


async def test_tenant_admin_cannot_reach_the_status_page_or_the_hub_endpoints(
    http: httpx.AsyncClient, core: Application, tenants: Tenants
) -> None:
    """Every tenant's pools, slow statements and configuration are on these pages: a tenant's
    administrator (even one spanning A and B) gets none of it, and cannot suspend B or raise
    its own limits through the hub's endpoint."""
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    for tenant_ids in ([a], [a, b]):
        token = await service_token(core, tenant_ids, (*RWA, Scope.METRICS))
        headers = {"Authorization": f"Bearer {token}"}
        for method, path, body in (
            ("GET", "/status", None),
            ("GET", "/status/fragment", None),
            ("POST", "/api/v1/status/link", None),
            ("GET", "/api/v1/hub", None),
            ("POST", "/api/v1/hub/tenant-config",
             {"tenant_id": b, "version": 99, "status": "suspended"}),
            ("POST", "/api/v1/hub/tenant-config",
             {"tenant_id": a, "version": 99, "limits": {
                 "connection_limit": 500, "statement_timeout_ms": 3_600_000}}),
        ):  # fmt: skip
            response = await http.request(method, path, json=body, headers=headers)
            assert response.status_code == 403, (path, response.text[:300])
            assert b not in response.text or path == "/api/v1/hub/tenant-config"
    assert (await core.registry.get(b)).active
    assert (await core.registry.get(a)).limits.connection_limit != 500
