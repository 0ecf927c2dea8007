"""Tenant A's administrator against per-tenant export and restore (REST): it may export and
restore its own tenant only. It cannot export B, restore over B, read B's export jobs or
download B's files (answered like jobs that do not exist), move B's file into A, or slip in a
file edited to name another tenant. The bootstrap token, which never reads tenant data, cannot
export. B's data is compared before and after."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory, TokenFactory
from tests.integration.test_tenant_backup import fill, snapshot

RWA = (Scope.READ, Scope.WRITE, Scope.ADMIN)


async def _finished(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[str, Any]:
    for _ in range(300):
        answer = await http.get(url, headers=headers)
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()
        if job["state"] != "running":
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {url} did not finish")


async def _export(
    http: httpx.AsyncClient, tenant: TenantRecord, headers: dict[str, str]
) -> tuple[str, bytes]:
    started = await http.post(f"/api/v1/admin/tenants/{tenant.tenant_id}/export", headers=headers)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    job = await _finished(
        http, f"/api/v1/admin/tenants/{tenant.tenant_id}/exports/{job_id}", headers
    )
    assert job["state"] == "done", job
    assert job["rows_done"] == job["rows_total"] == job["result"]["rows"] > 0
    assert "file" not in job  # no server paths
    file = await http.get(
        f"/api/v1/admin/tenants/{tenant.tenant_id}/exports/{job_id}/file", headers=headers
    )
    assert file.status_code == 200
    return job_id, file.content


@pytest.fixture
async def pair(
    core: Application, pg_cluster: PgCluster, new_tenant: TenantFactory
) -> tuple[TenantRecord, TenantRecord]:
    a, b = await new_tenant("bka"), await new_tenant("bkb")
    await fill(core, pg_cluster, a, scale=8)
    await fill(core, pg_cluster, b, scale=9)
    return a, b


async def test_a_tenant_admin_exports_and_restores_its_own_tenant_only(
    core: Application,
    http: httpx.AsyncClient,
    pair: tuple[TenantRecord, TenantRecord],
    service_headers: TokenFactory,
    admin_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    a, b = pair
    own = await service_headers([a.tenant_id], RWA)
    platform = await service_headers(["*"], RWA)
    b_before = await snapshot(core, b.tenant_id)
    a_before = await snapshot(core, a.tenant_id)

    # A exports A; the file holds A's rows only (RLS), no other tenant's id.
    a_job, a_file = await _export(http, a, own)
    with zipfile.ZipFile(io.BytesIO(a_file)) as archive:
        manifest = json.loads(archive.read("manifest.json"))
    ticks = next(t for t in manifest["tables"] if t["name"] == "trading_ticks")
    assert manifest["tenant_id"] == a.tenant_id and ticks["rows"] == 8
    assert b.tenant_id.encode() not in a_file

    # ... and cannot export B, nor read or download B's export.
    refused = await http.post(f"/api/v1/admin/tenants/{b.tenant_id}/export", headers=own)
    assert refused.status_code == 403
    b_job, b_file = await _export(http, b, platform)
    for url in (
        f"/api/v1/admin/tenants/{b.tenant_id}/exports/{b_job}",
        f"/api/v1/admin/tenants/{b.tenant_id}/exports/{b_job}/file",
    ):
        assert (await http.get(url, headers=own)).status_code == 403
    # Under A's id, B's job is answered like one that does not exist.
    for url in (
        f"/api/v1/admin/tenants/{a.tenant_id}/exports/{b_job}",
        f"/api/v1/admin/tenants/{a.tenant_id}/exports/{b_job}/file",
        f"/api/v1/admin/tenants/{a.tenant_id}/exports/{'0' * 16}",
        f"/api/v1/admin/tenants/{a.tenant_id}/exports/..%2F..%2Fmaster",
    ):
        answer = await http.get(url, headers=own)
        assert answer.status_code == 404, (url, answer.text)

    # Restore over B: refused before anything is stored, whatever the file.
    for body in (a_file, b_file):
        answer = await http.post(
            f"/api/v1/admin/tenants/{b.tenant_id}/restore?replace=true", content=body, headers=own
        )
        assert answer.status_code == 403
    # B's genuine file into A: refused (another tenant's file), and re-keying is platform-only.
    answer = await http.post(
        f"/api/v1/admin/tenants/{a.tenant_id}/restore?replace=true", content=b_file, headers=own
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_parameters"
    answer = await http.post(
        f"/api/v1/admin/tenants/{a.tenant_id}/restore?replace=true&from_tenant={b.tenant_id}",
        content=b_file,
        headers=own,
    )
    assert answer.status_code == 403
    # A's own file edited to name B (or A's restore of it into B): the signature fails.
    forged = tmp_path / "forged"
    with (
        zipfile.ZipFile(io.BytesIO(a_file)) as src,
        zipfile.ZipFile(forged, "w") as dst,
    ):
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "manifest.json":
                data = json.dumps({**json.loads(data), "tenant_id": b.tenant_id}).encode()
            dst.writestr(item, data)
    answer = await http.post(
        f"/api/v1/admin/tenants/{a.tenant_id}/restore?replace=true",
        content=forged.read_bytes(),
        headers=own,
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "backup_corrupt"

    # The bootstrap token never reads tenant data: no export.
    answer = await http.post(f"/api/v1/admin/tenants/{a.tenant_id}/export", headers=admin_headers)
    assert answer.status_code == 403

    # A's own file back into A (replace): allowed, and A is as it was.
    answer = await http.post(
        f"/api/v1/admin/tenants/{a.tenant_id}/restore?replace=true", content=a_file, headers=own
    )
    assert answer.status_code == 202, answer.text
    job = await _finished(
        http, f"/api/v1/admin/tenants/{a.tenant_id}/restores/{answer.json()['id']}", own
    )
    assert job["state"] == "done", job
    assert job["result"]["replaced"] and job["rows_done"] == job["rows_total"]
    assert await snapshot(core, a.tenant_id) == a_before
    assert await snapshot(core, b.tenant_id) == b_before
    assert a_job != b_job

    # A cannot delete B's export file; it can delete its own (then it is gone).
    b_url = f"/api/v1/admin/tenants/{b.tenant_id}/exports/{b_job}"
    assert (await http.delete(b_url, headers=own)).status_code == 403
    assert (await http.get(f"{b_url}/file", headers=platform)).status_code == 200
    a_url = f"/api/v1/admin/tenants/{a.tenant_id}/exports/{a_job}"
    assert (await http.delete(a_url, headers=own)).status_code == 200
    assert (await http.get(f"{a_url}/file", headers=own)).status_code == 404
    assert (await http.get(a_url, headers=own)).json()["state"] == "deleted"

    # Every refusal is audited under the tenant it was about; what was done, too.
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT tenant_id, action, outcome FROM {core.settings.control_schema}.audit_log"
        " WHERE tenant_id = ANY($1::text[]) AND action LIKE 'tenant.%'",
        [a.tenant_id, b.tenant_id],
    )
    seen = {(r["tenant_id"], r["action"], r["outcome"]) for r in rows}
    assert {
        (b.tenant_id, "tenant.export", "denied"),
        (b.tenant_id, "tenant.restore", "denied"),
        (b.tenant_id, "tenant.backup_job", "denied"),
        (a.tenant_id, "tenant.backup_job", "denied"),  # B's job asked for under A's id
        (a.tenant_id, "tenant.restore", "denied"),  # B's file re-keyed into A
        (a.tenant_id, "tenant.export", "ok"),
        (a.tenant_id, "tenant.restore", "ok"),
        (a.tenant_id, "tenant.export.download", "ok"),
    } <= seen


async def test_the_platform_restores_a_deleted_tenant_and_into_a_new_id(
    core: Application,
    http: httpx.AsyncClient,
    pair: tuple[TenantRecord, TenantRecord],
    service_headers: TokenFactory,
) -> None:
    a, b = pair
    platform = await service_headers(["*"], RWA)
    a_before, b_before = await snapshot(core, a.tenant_id), await snapshot(core, b.tenant_id)
    _, a_file = await _export(http, a, platform)
    deleted = await http.delete(
        f"/api/v1/admin/tenants/{a.tenant_id}?confirm=true", headers=platform
    )
    assert deleted.status_code == 200
    answer = await http.post(
        f"/api/v1/admin/tenants/{a.tenant_id}/restore", content=a_file, headers=platform
    )
    assert answer.status_code == 202, answer.text
    job = await _finished(
        http, f"/api/v1/admin/tenants/{a.tenant_id}/restores/{answer.json()['id']}", platform
    )
    assert job["state"] == "done" and job["result"]["created"], job
    assert await snapshot(core, a.tenant_id) == a_before

    copy_id = f"bkcopy_{secrets.token_hex(3)}"
    answer = await http.post(
        f"/api/v1/admin/tenants/{copy_id}/restore?from_tenant={a.tenant_id}",
        content=a_file,
        headers=platform,
    )
    assert answer.status_code == 202, answer.text
    job = await _finished(
        http, f"/api/v1/admin/tenants/{copy_id}/restores/{answer.json()['id']}", platform
    )
    assert job["state"] == "done", job
    assert await snapshot(core, copy_id) == a_before
    assert await snapshot(core, b.tenant_id) == b_before

    # A damaged upload: 400 at once, no job, nothing created.
    damaged = bytearray(a_file)
    damaged[len(damaged) // 3] ^= 0x10
    ghost = f"bkghost_{secrets.token_hex(3)}"
    answer = await http.post(
        f"/api/v1/admin/tenants/{ghost}/restore?from_tenant={a.tenant_id}",
        content=bytes(damaged),
        headers=platform,
    )
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "backup_corrupt"
    missing = await http.get(f"/api/v1/admin/tenants/{ghost}", headers=platform)
    assert missing.status_code == 404
