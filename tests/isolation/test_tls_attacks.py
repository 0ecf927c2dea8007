"""Tenant A's service, identified by its client certificate (mutual TLS), attacks tenant B over
every front end: naming B with the certificate alone, with B's service token, and with the
bootstrap administrator's token. Each is refused; the certificate never lends its identity to
another credential, and another credential never widens what the certificate may do."""

from __future__ import annotations

from typing import Any

import pytest

from database_service_client import DatabaseServiceError, PermissionDenied, Unauthenticated
from tests.e2e.fix_tls import TlsService, tls_service_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(300)

FRONT_ENDS = ["grpc", "rest"]


async def attempt(
    service: TlsService, front_end: str, tenant: str, token: str | None, sql: str
) -> Any:
    """Run ``sql`` for ``tenant`` with A's client certificate (and ``token``, if any): the
    rows, or the client error / HTTP status it met."""
    if front_end == "grpc":
        async with service.client(tenant, token, "svc-a") as client:
            try:
                return (await client.fetch_all(sql)).rows
            except DatabaseServiceError as exc:
                return type(exc)
    headers = {"X-Tenant-Id": tenant}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with service.http("svc-a") as http:
        response = http.post("/api/v1/query", json={"sql": sql}, headers=headers)
    if response.status_code != 200:
        return {401: Unauthenticated, 403: PermissionDenied}.get(
            response.status_code, response.status_code
        )
    return [tuple(r.values()) if isinstance(r, dict) else tuple(r) for r in response.json()["rows"]]


@pytest.fixture(scope="module")
def a_row(tls_service: TlsService) -> None:
    """One row in each tenant's users table, so a leak would show."""
    for tenant, token in (
        (tls_service.tenant_a, tls_service.token_a),
        (tls_service.tenant_b, tls_service.token_b),
    ):
        with tls_service.http("svc-a" if tenant == tls_service.tenant_a else "svc-b") as http:
            response = http.post(
                "/api/v1/query",
                json={
                    "sql": "INSERT INTO users (user_id, email, subscription_tier)"
                    " VALUES ($1, $2, 'pro')",
                    "params": [f"{tenant}-user", f"{tenant}@example.com"],
                },
                headers={"X-Tenant-Id": tenant, "Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 200, response.text


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_certificate_alone_cannot_name_another_tenant(
    tls_service: TlsService, a_row: None, front_end: str
) -> None:
    result = await attempt(
        tls_service, front_end, tls_service.tenant_b, None, "SELECT * FROM users"
    )
    assert result is PermissionDenied


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_certificate_with_b_services_token_is_refused(
    tls_service: TlsService, a_row: None, front_end: str
) -> None:
    result = await attempt(
        tls_service, front_end, tls_service.tenant_b, tls_service.token_b, "SELECT * FROM users"
    )
    assert result is Unauthenticated


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_certificate_with_the_bootstrap_token_is_refused(
    tls_service: TlsService, a_row: None, front_end: str
) -> None:
    admin = (tls_service.served.data_dir / "admin.token").read_text().strip()
    result = await attempt(
        tls_service, front_end, tls_service.tenant_b, admin, "SELECT * FROM users"
    )
    assert result is Unauthenticated


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_certificate_reads_only_its_own_tenant(
    tls_service: TlsService, a_row: None, front_end: str
) -> None:
    rows = await attempt(
        tls_service, front_end, tls_service.tenant_a, None, "SELECT user_id FROM users"
    )
    assert rows == [(f"{tls_service.tenant_a}-user",)]
