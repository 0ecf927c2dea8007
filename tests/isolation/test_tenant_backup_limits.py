"""Tenant A's administrator using its own exports and restores to exhaust what every tenant
shares: the service's disk (each export file is a copy of the tenant's data) and the tenant's
connections. At most one export and one restore of a tenant run at a time, and a tenant keeps at
most MAX_KEPT_EXPORTS export files; past either, ``resource_exhausted`` (429) before anything
runs, and deleting an export makes room again."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from database_service.app import Application
from database_service.application.tenant_backups import MAX_KEPT_EXPORTS
from database_service.auth import Scope
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory, TokenFactory
from tests.integration.test_tenant_backup import fill
from tests.isolation.test_tenant_backup_scope import _finished

RWA = (Scope.READ, Scope.WRITE, Scope.ADMIN)


async def test_a_tenant_runs_one_export_at_a_time_and_keeps_a_bounded_number(
    core: Application,
    pg_cluster: PgCluster,
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    a = await new_tenant("bkl")
    await fill(core, pg_cluster, a, scale=8)
    own = await service_headers([a.tenant_id], RWA)
    base = f"/api/v1/admin/tenants/{a.tenant_id}"
    # Two at once: the second is refused while the first runs.
    first, second = await asyncio.gather(
        http.post(f"{base}/export", headers=own), http.post(f"{base}/export", headers=own)
    )
    codes = sorted([first.status_code, second.status_code])
    assert codes == [202, 429], (first.text, second.text)
    refused = second if second.status_code == 429 else first
    assert refused.json()["error"]["code"] == "resource_exhausted"
    started = first if first.status_code == 202 else second
    jobs: list[dict[str, Any]] = [
        await _finished(http, f"{base}/exports/{started.json()['id']}", own)
    ]
    # Up to the bound, one after another.
    while len(jobs) < MAX_KEPT_EXPORTS:
        answer = await http.post(f"{base}/export", headers=own)
        assert answer.status_code == 202, answer.text
        jobs.append(await _finished(http, f"{base}/exports/{answer.json()['id']}", own))
    assert all(j["state"] == "done" for j in jobs)
    answer = await http.post(f"{base}/export", headers=own)
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "resource_exhausted"
    # Deleting one makes room for one.
    deleted = await http.delete(f"{base}/exports/{jobs[0]['id']}", headers=own)
    assert deleted.status_code in (200, 204), deleted.text
    answer = await http.post(f"{base}/export", headers=own)
    assert answer.status_code == 202, answer.text
    await _finished(http, f"{base}/exports/{answer.json()['id']}", own)


async def test_a_tenant_runs_one_restore_at_a_time(
    core: Application,
    pg_cluster: PgCluster,
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    a = await new_tenant("bkr")
    await fill(core, pg_cluster, a, scale=8)
    own = await service_headers([a.tenant_id], RWA)
    base = f"/api/v1/admin/tenants/{a.tenant_id}"
    started = await http.post(f"{base}/export", headers=own)
    job = await _finished(http, f"{base}/exports/{started.json()['id']}", own)
    file = (await http.get(f"{base}/exports/{job['id']}/file", headers=own)).content
    first, second = await asyncio.gather(
        http.post(f"{base}/restore?replace=true", content=file, headers=own),
        http.post(f"{base}/restore?replace=true", content=file, headers=own),
    )
    codes = sorted([first.status_code, second.status_code])
    assert codes == [202, 429], (first.text, second.text)
    done = first if first.status_code == 202 else second
    restored = await _finished(http, f"{base}/restores/{done.json()['id']}", own)
    assert restored["state"] == "done", restored
    # Afterwards a restore runs again.
    again = await http.post(f"{base}/restore?replace=true", content=file, headers=own)
    assert again.status_code == 202, again.text
    assert (await _finished(http, f"{base}/restores/{again.json()['id']}", own))["state"] == "done"


async def test_one_export_at_a_time_holds_across_serving_processes(
    core: Application,
    pg_cluster: PgCluster,
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    """Workers share the backup directory: a second process's export of the tenant is refused
    while the first process's runs (the claim is a lock file, not this process's memory), and
    taken once it ends."""
    from database_service.application.tenant_backups import TenantBackupAdmin

    a = await new_tenant("bkw")
    await fill(core, pg_cluster, a, scale=8)
    own = await service_headers([a.tenant_id], RWA)
    base = f"/api/v1/admin/tenants/{a.tenant_id}"
    # Another serving process: its own TenantBackupAdmin on the same directory.
    other = TenantBackupAdmin(core.access, core.tenant_backups._backups)
    other._claim("export", a.tenant_id)
    try:
        refused = await http.post(f"{base}/export", headers=own)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "resource_exhausted"
    finally:
        other._release("export", a.tenant_id)
    started = await http.post(f"{base}/export", headers=own)
    assert started.status_code == 202, started.text
    await _finished(http, f"{base}/exports/{started.json()['id']}", own)
