"""Statement statistics, slow queries and their plans never cross tenants (issue #15).

Statements are marked by CTE names: pg_query's fingerprint ignores constants and column
aliases, but not relation names.

Tenant A runs statements through every front end that runs tenant SQL (``front_end``); the
victim B runs its own, marked, with a slow-query threshold of 0 so each one is logged with its
plan. A's figures and slow-query log hold A's statements only (even the very same text B runs is
counted apart); A's token, whatever its scopes, cannot read, reset, clear or configure B's; a
statement A tries to run as B is refused before anything is counted for B. The index advice
drawn from B's slow statements, and index builds on B's tables, are B's alone too. Figures are read
over REST (the gRPC front end has no statistics service).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd, service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")


def _bearer(token: str, tenant_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    return {**headers, **({"X-Tenant-Id": tenant_id} if tenant_id else {})}


async def _victim_runs(
    http: httpx.AsyncClient, tenants: Tenants, admin_headers: dict[str, str], marker: str
) -> None:
    """B logs every statement (threshold 0) and runs a marked read and the shared text."""
    response = await http.put(
        f"/api/v1/admin/tenants/{tenants.b.tenant_id}/statement-settings",
        json={"slow_query_ms": 0, "keep_parameters": True},
        headers=admin_headers,
    )
    assert response.status_code == 200, response.text
    for sql in (
        f"WITH {marker} AS (SELECT email FROM users WHERE user_id = $1) SELECT * FROM {marker}",
        f"WITH same_{marker} AS (SELECT 1 AS v) SELECT v FROM same_{marker}",
        f"WITH same_{marker} AS (SELECT 1 AS v) SELECT v FROM same_{marker}",
    ):
        done = await http.post(
            "/api/v1/query",
            json={"sql": sql, "params": ["b-user"] if "$1" in sql else []},
            headers={**tenants.b_headers, "X-Tenant-Id": tenants.b.tenant_id},
        )
        assert done.status_code == 200, done.text


async def _slow_log(http: httpx.AsyncClient, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await http.get("/api/v1/slow-queries?limit=1000", headers=headers)
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["slow_queries"]
    return entries


async def test_figures_slow_queries_and_plans_stay_with_their_tenant(
    front_end: FrontEnd,
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    admin_headers: dict[str, str],
) -> None:
    marker = f"m_{front_end.name}_{secrets.token_hex(3)}"
    await _victim_runs(http, tenants, admin_headers, marker)
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    response = await http.put(
        f"/api/v1/admin/tenants/{a}/statement-settings",
        json={"slow_query_ms": 0},
        headers=admin_headers,
    )
    assert response.status_code == 200, response.text

    own = await front_end.run(f"WITH same_{marker} AS (SELECT 1 AS v) SELECT v FROM same_{marker}")
    assert own.ok, own
    # As B, with A's token: refused before anything is counted for B.
    refused = await front_end.run(
        f"WITH forged_{marker} AS (SELECT 2 AS v) SELECT v FROM forged_{marker}", tenant_id=b
    )
    assert refused.refused and refused.code == "permission_denied", refused

    token = await service_token(core, [a], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    mine = _bearer(token, a)
    document = (await http.get("/api/v1/statements?limit=1000", headers=mine)).json()
    texts = [s["statement"] for s in document["statements"]]
    assert not [t for t in texts if f"WITH {marker} " in t or "forged_" in t], texts
    [same] = [s for s in document["statements"] if f"same_{marker}" in s["statement"]]
    assert same["calls"] == 1  # B ran the same text twice: counted for B only

    # A's slow-query log (its plans taken afterwards) holds A's statement, nothing of B's.
    for _ in range(100):
        entries = await _slow_log(http, mine)
        if any(f"same_{marker}" in e["statement"] for e in entries):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"A's statement was not logged: {entries}")
    seen = repr(entries)
    assert f"WITH {marker} " not in seen and "b-user" not in seen and "forged_" not in seen
    assert tenants.b.schema_name not in seen and b not in seen

    # B's figures hold B's statements (twice the shared text), and nothing A tried as B.
    victim = _bearer(tenants.b_headers["Authorization"].split()[1], b)
    theirs = (await http.get("/api/v1/statements?limit=1000", headers=victim)).json()["statements"]
    [same_b] = [s for s in theirs if f"same_{marker}" in s["statement"]]
    assert same_b["calls"] == 2
    assert not [s for s in theirs if "forged_" in s["statement"]]


@pytest.mark.parametrize("scopes", [(Scope.READ,), (Scope.READ, Scope.WRITE, Scope.ADMIN)])
async def test_another_tenants_figures_are_refused(
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    admin_headers: dict[str, str],
    scopes: tuple[Scope, ...],
) -> None:
    marker = f"r_{secrets.token_hex(3)}"
    await _victim_runs(http, tenants, admin_headers, marker)
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    token = await service_token(core, [a], scopes)
    attempts = [
        ("GET", "/api/v1/statements", _bearer(token, b), None),
        ("GET", f"/api/v1/statements?tenant_id={b}", _bearer(token), None),
        ("GET", "/api/v1/slow-queries", _bearer(token, b), None),
        ("GET", f"/api/v1/slow-queries?tenant_id={b}&limit=1000", _bearer(token), None),
        ("POST", "/api/v1/statements/reset", _bearer(token, b), None),
        ("DELETE", "/api/v1/slow-queries", _bearer(token, b), None),
        ("GET", f"/api/v1/admin/tenants/{b}/statement-settings", _bearer(token), None),
        (
            "PUT",
            f"/api/v1/admin/tenants/{b}/statement-settings",
            _bearer(token),
            {"slow_query_ms": 999999},
        ),
        # Index advice reads B's slow statements and tables; building one is B's admin's call.
        ("GET", "/api/v1/index-advice", _bearer(token, b), None),
        ("GET", f"/api/v1/index-advice?tenant_id={b}", _bearer(token), None),
        (
            "POST",
            f"/api/v1/admin/tenants/{b}/indexes",
            _bearer(token),
            {"table": "users", "columns": ["email"]},
        ),
        ("GET", f"/api/v1/admin/tenants/{b}/indexes/users_pkey", _bearer(token), None),
    ]
    for method, path, headers, body in attempts:
        response = await http.request(method, path, headers=headers, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert marker not in response.text and "b-user" not in response.text
        assert response.json()["error"]["code"] == "permission_denied"
    # Without credentials: nothing.
    anonymous = await http.get("/api/v1/statements", headers={"X-Tenant-Id": b})
    assert anonymous.status_code == 401
    # A's own settings, by contrast, A may read; setting them is the platform's.
    own = await http.get(f"/api/v1/admin/tenants/{a}/statement-settings", headers=_bearer(token))
    assert own.status_code == 200, own.text
    forbidden = await http.put(
        f"/api/v1/admin/tenants/{a}/statement-settings",
        json={"slow_query_ms": 0},
        headers=_bearer(token),
    )
    assert forbidden.status_code == 403

    # Nothing was reset, cleared or changed for B.
    victim = _bearer(tenants.b_headers["Authorization"].split()[1], b)
    theirs = (await http.get("/api/v1/statements?limit=1000", headers=victim)).json()["statements"]
    assert any(marker in s["statement"] for s in theirs)
    settings = (
        await http.get(f"/api/v1/admin/tenants/{b}/statement-settings", headers=victim)
    ).json()
    assert settings["slow_query_ms"] == 0
    for _ in range(100):
        logged = await _slow_log(http, victim)
        if any(f"WITH {marker} " in e["statement"] for e in logged):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"B's statement was not logged: {logged}")


async def test_the_platform_reads_any_tenant(
    http: httpx.AsyncClient, tenants: Tenants, admin_headers: dict[str, str]
) -> None:
    marker = f"p_{secrets.token_hex(3)}"
    await _victim_runs(http, tenants, admin_headers, marker)
    b = tenants.b.tenant_id
    document = (
        await http.get("/api/v1/statements?limit=1000", headers={**admin_headers, "X-Tenant-Id": b})
    ).json()
    assert any(marker in s["statement"] for s in document["statements"])
    for _ in range(100):
        response = await http.get(
            "/api/v1/slow-queries", headers={**admin_headers, "X-Tenant-Id": b}
        )
        entries = response.json()["slow_queries"]
        plans = [e for e in entries if f"WITH {marker} " in e["statement"]]
        if plans:
            assert "users" in plans[0]["plan"]
            # B keeps its parameters, but they are B's data: not for the bootstrap
            # administrator, who holds no data scope (B's own service reads them).
            assert plans[0]["parameters"] == "redacted" and "b-user" not in plans[0]["plan"]
            victim = _bearer(tenants.b_headers["Authorization"].split()[1], b)
            own = await _slow_log(http, victim)
            [mine] = [e for e in own if e["id"] == plans[0]["id"]]
            assert mine["parameters"] == ["b-user"] and "'b-user'" in mine["plan"]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"B's statement was not logged: {entries}")
