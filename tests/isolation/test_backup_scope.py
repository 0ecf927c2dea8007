"""A cluster backup holds every tenant's rows: taking, listing, verifying and restoring one is the
platform administrator's alone. Tenant A's own administrator, a reader, a service acting for
several tenants and an anonymous caller are all refused, before anything runs (no backup
directory is made, nothing is restored), and the refusals are audited."""

from __future__ import annotations

import secrets

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from tests.isolation.fix_attack import Tenants

ENDPOINTS = [
    ("POST", "/api/v1/maintenance/backup", None),
    ("GET", "/api/v1/maintenance/backups", None),
    ("GET", "/api/v1/maintenance/backups/20260101T000000Z-abcdef", None),
    ("POST", "/api/v1/maintenance/backups/20260101T000000Z-abcdef/verify", None),
    ("POST", "/api/v1/maintenance/restore", {"into": "stolen"}),
]


async def _token(core: Application, tenants: list[str], scopes: list[Scope]) -> dict[str, str]:
    name = f"backup-attack-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=tenants, scopes=scopes, with_secret=False)
    token = core.tokens.issue(name, tenants=tenants, scopes=scopes, ttl_seconds=600)
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize("who", ["tenant_admin", "reader", "spanning", "anonymous"])
async def test_only_the_platform_administrator_reaches_cluster_backups(
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    who: str,
    method: str,
    path: str,
    body: dict[str, str] | None,
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    headers = {
        "tenant_admin": lambda: _token(core, [a], [Scope.READ, Scope.WRITE, Scope.ADMIN]),
        "reader": lambda: _token(core, [a], [Scope.READ]),
        "spanning": lambda: _token(core, [a, b], [Scope.READ, Scope.WRITE, Scope.ADMIN]),
    }
    sent = await headers[who]() if who in headers else {}
    response = await http.request(method, path, headers=sent, json=body)
    assert response.status_code == (401 if who == "anonymous" else 403), response.text
    root = core.settings.backup_dir or core.settings.data_dir / "backups"
    assert not (root / "restores" / "stolen").exists()
