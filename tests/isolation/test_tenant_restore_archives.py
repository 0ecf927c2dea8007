"""Tenant A's administrator uploading crafted files to ``POST /api/v1/admin/tenants/{A}/restore``.

A tenant may restore its own exports, so the archive reader is reachable by any tenant admin
with bytes of its choosing. Each crafted file — not a zip, truncated, without a manifest, a
manifest that is not JSON, nested deeper than a parser's stack, a decompression bomb, of a
future or ill-typed format version, unsigned, a second manifest appended, extra or duplicated
members, a zip of very many entries — is refused with a stable code (``backup_corrupt`` /
``backup_unsupported``, HTTP 4xx), A's data is unchanged, the restore slot is free again
afterwards, and B's requests are answered meanwhile (the file is read off the event loop).
"""

from __future__ import annotations

import asyncio
import io
import json
import statistics
import time
import zipfile
from collections.abc import Callable
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
_CODES = {"backup_corrupt", "backup_unsupported", "invalid_request", "invalid_parameters"}


def _zip(members: dict[str, bytes], *, compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def _manifest(**fields: Any) -> bytes:
    return json.dumps({"format": "dbsvc-tenant-backup", "format_version": 2, **fields}).encode()


def _bomb() -> bytes:
    """A manifest.json that inflates to 256 MiB from a few hundred KiB."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("manifest.json", "w", force_zip64=True) as handle:
            handle.write(b'{"format": "dbsvc-tenant-backup", "pad": "')
            block = b" " * (1 << 20)
            for _ in range(256):
                handle.write(block)
            handle.write(b'"}')
    return out.getvalue()


def _patched_manifest(*, method: int | None = None, flags: int | None = None) -> bytes:
    """A manifest member whose headers (local and central) claim an unsupported compression
    method or encryption."""
    raw = bytearray(_zip({"manifest.json": _manifest()}))
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = raw.find(signature)
        if flags is not None:
            raw[at + flag_at : at + flag_at + 2] = flags.to_bytes(2, "little")
        if method is not None:
            raw[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
    return bytes(raw)


def _many_entries(count: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for i in range(count):
            archive.writestr(f"m{i}", b"")
        archive.writestr("manifest.json", _manifest())
    return out.getvalue()


CRAFTED: dict[str, Callable[[], bytes]] = {
    "empty": lambda: b"",
    "not_a_zip": lambda: b"hello, this is not a zip file" * 10,
    "zip_without_manifest": lambda: _zip({"tables/users.copy": b"PGCOPY"}),
    "manifest_not_json": lambda: _zip({"manifest.json": b"{not json"}),
    "manifest_not_utf8": lambda: _zip({"manifest.json": b"\xff\xfe\x00{"}),
    "manifest_a_list": lambda: _zip({"manifest.json": b"[]"}),
    "manifest_nested_deeply": lambda: _zip({"manifest.json": b"[" * 200_000 + b"]" * 200_000}),
    "manifest_object_nested_deeply": lambda: _zip(
        {"manifest.json": b'{"a":' * 100_000 + b"1" + b"}" * 100_000}
    ),
    "other_format": lambda: _zip({"manifest.json": json.dumps({"format": "x"}).encode()}),
    "future_version": lambda: _zip({"manifest.json": _manifest(format_version=99)}),
    "version_as_text": lambda: _zip({"manifest.json": _manifest(format_version="2")}),
    "version_as_bool": lambda: _zip({"manifest.json": _manifest(format_version=True)}),
    "version_as_float": lambda: _zip({"manifest.json": _manifest(format_version=2.0)}),
    "version_huge": lambda: _zip({"manifest.json": _manifest(format_version=10**400)}),
    "unsigned": lambda: _zip({"manifest.json": _manifest(tenant_id="x", tables=[])}),
    "signature_not_text": lambda: _zip({"manifest.json": _manifest(signature=["a"])}),
    "manifest_decompression_bomb": _bomb,
    "manifest_unknown_compression": lambda: _patched_manifest(method=99),
    "manifest_encrypted": lambda: _patched_manifest(flags=1),
    "many_entries": lambda: _many_entries(30_000),
}


@pytest.fixture
async def own(core: Application, pg_cluster: PgCluster, new_tenant: TenantFactory) -> TenantRecord:
    tenant = await new_tenant("rsa")
    await fill(core, pg_cluster, tenant, scale=3)
    return tenant


async def _restore(
    http: httpx.AsyncClient, tenant: TenantRecord, headers: dict[str, str], body: bytes
) -> httpx.Response:
    return await http.post(
        f"/api/v1/admin/tenants/{tenant.tenant_id}/restore",
        params={"replace": "true"},
        content=body,
        headers={**headers, "Content-Type": "application/octet-stream"},
        timeout=120,
    )


def _refused(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    assert response.json()["error"]["code"] in _CODES, response.text[:300]


@pytest.mark.parametrize("name", sorted(CRAFTED))
async def test_a_crafted_archive_is_refused_and_changes_nothing(
    core: Application,
    http: httpx.AsyncClient,
    pg_cluster: PgCluster,
    own: TenantRecord,
    service_headers: TokenFactory,
    name: str,
) -> None:
    headers = await service_headers([own.tenant_id], RWA)
    before = await snapshot(core, own.tenant_id)
    _refused(await _restore(http, own, headers, CRAFTED[name]()))
    assert await snapshot(core, own.tenant_id) == before
    # The restore slot is free again: the next crafted file gets its own answer, not "busy".
    _refused(await _restore(http, own, headers, b"again"))


async def _exported(
    http: httpx.AsyncClient, tenant: TenantRecord, headers: dict[str, str]
) -> bytes:
    started = await http.post(f"/api/v1/admin/tenants/{tenant.tenant_id}/export", headers=headers)
    assert started.status_code == 202, started.text
    url = f"/api/v1/admin/tenants/{tenant.tenant_id}/exports/{started.json()['id']}"
    for _ in range(600):
        job = (await http.get(url, headers=headers)).json()
        if job["state"] != "running":
            break
        await asyncio.sleep(0.05)
    assert job["state"] == "done", job
    return (await http.get(url + "/file", headers=headers)).content


def _edited(real: bytes, edit: str) -> bytes:
    """A real export with one edit, the signed manifest kept as it is."""
    source = zipfile.ZipFile(io.BytesIO(real))
    names = source.namelist()
    member = next(n for n in names if n != "manifest.json")
    if edit == "truncated":
        return real[: len(real) // 2]
    if edit == "cut_before_central_directory":
        return real[: real.rfind(b"PK\x01\x02")]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name in names:
            archive.writestr(name, source.read(name))
        if edit == "second_manifest":
            archive.writestr("manifest.json", _manifest(tenant_id="other", tables=[]))
        elif edit == "extra_member":
            archive.writestr("tables/extra.copy", b"PGCOPY\n\xff\r\n\x00")
        elif edit == "member_duplicated_with_other_bytes":
            archive.writestr(member, b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 12)
        elif edit == "traversal_member":
            archive.writestr("../../../../tmp/dbsvc-escape", b"x")
    return out.getvalue()


EDITS = [
    "truncated",
    "cut_before_central_directory",
    "second_manifest",
    "extra_member",
    "member_duplicated_with_other_bytes",
    "traversal_member",
]


# Duplicated names are the attack; zipfile warns when it writes them.
@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
@pytest.mark.parametrize("edit", EDITS)
async def test_an_edited_export_is_refused_and_changes_nothing(
    core: Application,
    http: httpx.AsyncClient,
    pg_cluster: PgCluster,
    own: TenantRecord,
    service_headers: TokenFactory,
    edit: str,
) -> None:
    headers = await service_headers([own.tenant_id], RWA)
    real = await _exported(http, own, headers)
    before = await snapshot(core, own.tenant_id)
    _refused(await _restore(http, own, headers, _edited(real, edit)))
    assert await snapshot(core, own.tenant_id) == before


async def test_reading_a_crafted_archive_does_not_stall_another_tenants_requests(
    http: httpx.AsyncClient,
    own: TenantRecord,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    other = await new_tenant("rsb")
    a_headers = await service_headers([own.tenant_id], RWA)
    b_headers = await service_headers([other.tenant_id], (Scope.READ,))
    files = [_bomb(), _many_entries(60_000)]

    async def b_latencies(stop: asyncio.Event) -> list[float]:
        seen = []
        while not stop.is_set():
            started = time.perf_counter()
            answer = await http.post(
                "/api/v1/query",
                json={"sql": "SELECT 1", "tenant_id": other.tenant_id},
                headers=b_headers,
            )
            assert answer.status_code == 200
            seen.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
        return seen

    stop = asyncio.Event()
    watcher = asyncio.create_task(b_latencies(stop))
    await asyncio.sleep(0.2)
    for body in files:
        _refused(await _restore(http, own, a_headers, body))
    stop.set()
    seen = await watcher
    assert seen and max(seen) < 2.0, (max(seen), statistics.median(seen))
