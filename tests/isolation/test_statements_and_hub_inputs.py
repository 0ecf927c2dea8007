"""Tenant A's figures and the Central Hub's endpoints with odd inputs: orderings that are not
columns (or are SQL), tenant ids that are not ids (NUL, path separators, 10,000 characters,
another tenant's in the header and A's in the query), fingerprints with NUL or wildcards; a
tenant token on the hub's endpoints; hub bodies that are huge, deeply nested or of the wrong
types. Each is a clear 4xx with a stable code — never a 500 — and B's figures and hub state are
neither read nor changed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_ODD_TENANTS = [
    "",
    "\x00",
    "../x",
    "a/b",
    "x" * 10_000,
    "%",
    "*",
    "' OR 1=1 --",
    "ÄÖ",
    "pg_catalog",
]


def _clear(response: httpx.Response, *allowed: int) -> dict[str, Any]:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    assert SECRET not in response.text
    document: dict[str, Any] = response.json()
    if response.status_code >= 400:
        assert document["error"]["code"], document
    if allowed:
        assert response.status_code in allowed, response.text[:300]
    return document


@pytest.mark.parametrize("order", ["xyz", "total_ms; DROP TABLE users", "1", "", "calls DESC"])
async def test_an_ordering_that_is_not_a_figure_is_refused(
    http: httpx.AsyncClient, tenants: Tenants, order: str
) -> None:
    response = await http.get(
        "/api/v1/statements",
        params={"order": order},
        headers={**tenants.a_headers, "X-Tenant-Id": tenants.a.tenant_id},
    )
    _clear(response, 400, 422)


@pytest.mark.parametrize("tenant", _ODD_TENANTS, ids=range(len(_ODD_TENANTS)))
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/statements"),
        ("POST", "/api/v1/statements/reset"),
        ("GET", "/api/v1/slow-queries"),
        ("DELETE", "/api/v1/slow-queries"),
    ],
)
async def test_a_tenant_id_that_is_not_one_is_refused_on_the_figures(
    http: httpx.AsyncClient, tenants: Tenants, method: str, path: str, tenant: str
) -> None:
    response = await http.request(
        method, path, params={"tenant_id": tenant}, headers=tenants.a_headers
    )
    _clear(response, 400, 403, 404, 422)


@pytest.mark.parametrize(("method", "path"), [("POST", "/api/v1/statements/reset"),
                                             ("DELETE", "/api/v1/slow-queries")])  # fmt: skip
async def test_the_header_and_the_query_naming_two_tenants_resets_neither_of_bs(
    http: httpx.AsyncClient, tenants: Tenants, method: str, path: str
) -> None:
    for header, query in (
        (tenants.a.tenant_id, tenants.b.tenant_id),
        (tenants.b.tenant_id, tenants.a.tenant_id),
    ):
        response = await http.request(
            method,
            path,
            params={"tenant_id": query},
            headers={**tenants.a_headers, "X-Tenant-Id": header},
        )
        document = _clear(response)
        if response.status_code == 200:
            assert tenants.b.tenant_id not in response.text, document


@pytest.mark.parametrize("fingerprint", ["\x00", "%", "*", "' OR 1=1", "a" * 64])
async def test_an_odd_fingerprint_finds_nothing_of_another_tenant(
    http: httpx.AsyncClient, tenants: Tenants, fingerprint: str
) -> None:
    response = await http.get(
        "/api/v1/slow-queries",
        params={"fingerprint": fingerprint},
        headers={**tenants.a_headers, "X-Tenant-Id": tenants.a.tenant_id},
    )
    document = _clear(response, 200, 400, 422)
    assert tenants.b.tenant_id not in str(document)


HUB_BODIES: dict[str, Any] = {
    "nested": "[" * 100_000 + "]" * 100_000,
    "object_nested": '{"a":' * 30_000 + "1" + "}" * 30_000,
    "not_json": "{",
    "a_number": "1",
    "updates_not_a_list": '{"updates": {}}',
    "huge_version": '{"tenant_id": "x", "version": 1' + "0" * 5000 + "}",
    "float_version": '{"tenant_id": "x", "version": 1.5}',
    "nan_version": '{"tenant_id": "x", "version": NaN}',
    "many_rules": '{"tenant_id": "x", "version": 1, "cache_rules": {'
    + ",".join(f'"t{i}": 1000' for i in range(10_000))
    + "}}",
}


@pytest.mark.parametrize("body", sorted(HUB_BODIES))
async def test_a_tenant_token_cannot_push_hub_configuration_whatever_the_body(
    http: httpx.AsyncClient, tenants: Tenants, body: str
) -> None:
    response = await http.post(
        "/api/v1/hub/tenant-config",
        content=HUB_BODIES[body],
        headers={**tenants.a_headers, "Content-Type": "application/json"},
    )
    _clear(response, 400, 403, 413, 422)


@pytest.mark.parametrize("body", sorted(HUB_BODIES))
async def test_odd_hub_bodies_from_the_platform_are_refused_clearly(
    http: httpx.AsyncClient, admin_headers: dict[str, str], body: str
) -> None:
    response = await http.post(
        "/api/v1/hub/tenant-config",
        content=HUB_BODIES[body],
        headers={**admin_headers, "Content-Type": "application/json"},
    )
    _clear(response, 400, 404, 413, 422)


async def test_a_tenant_token_cannot_read_the_hubs_state(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.get("/api/v1/hub", headers=tenants.a_headers)
    _clear(response, 403)
    assert tenants.b.tenant_id not in response.text
