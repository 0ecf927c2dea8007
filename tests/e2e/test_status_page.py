"""The status page (issue #15), rendered by a real headless Chromium (``DBSVC_TEST_CHROMIUM``,
Debian's, installed by scripts/test.sh): signed in with a link, it shows the figures the API
serves — each marked with its key — and refreshes itself; without a session, or for a tenant's
own credentials, it shows nothing."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from tests.fix_service import TenantFactory, TokenFactory


def chromium() -> str:
    path = os.environ.get("DBSVC_TEST_CHROMIUM") or shutil.which("chromium")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI needs Chromium (scripts/chromium.sh install)")
        pytest.skip("no Chromium here (scripts/chromium.sh install)")
    return path


@pytest.fixture
async def served(core: Application) -> AsyncIterator[str]:
    """The HTTP front end on a real port (Chromium needs one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(
        create_http_app(core), host="127.0.0.1", port=port, log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def browse(url: str, *extra: str) -> str:
    """Chromium, headless, on ``url``, with a profile of its own (no cookie of an earlier
    visit): the DOM once loaded (and ``extra`` flags' effects)."""
    with tempfile.TemporaryDirectory(prefix="dbsvc-chromium-") as profile:
        process = await asyncio.create_subprocess_exec(
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", *extra, url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def figures(dom: str) -> dict[str, list[str]]:
    """Every ``data-k`` element's text, by key (a key repeats once per table row)."""
    found: dict[str, list[str]] = {}
    for key, text in re.findall(r'data-k="?([\w-]+)"?[^>]*>([^<]*)<', dom):
        found.setdefault(key, []).append(text)
    return found


def tenant_row(dom: str, tenant_id: str) -> dict[str, str]:
    match = re.search(rf'<tr data-tenant="?{re.escape(tenant_id)}"?>(.*?)</tr>', dom, re.S)
    assert match, f"no row for {tenant_id}"
    return {k: v[0] for k, v in figures(match.group(1)).items()}


async def link(base: str, headers: dict[str, str]) -> str:
    async with httpx.AsyncClient(base_url=base) as http:
        response = await http.post("/api/v1/status/link", headers=headers)
    assert response.status_code == 200, response.text
    path: str = response.json()["path"]
    return base + path


async def test_the_page_shows_what_the_api_serves_and_refreshes_itself(
    served: str,
    core: Application,
    admin_headers: dict[str, str],
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
    tmp_path: Path,
) -> None:
    tenant = await new_tenant("page")
    headers = await service_headers(
        [tenant.tenant_id], (Scope.READ,), **{"X-Tenant-Id": tenant.tenant_id}
    )
    async with httpx.AsyncClient(base_url=served) as http:
        for _ in range(3):
            done = await http.post("/api/v1/query", json={"sql": "SELECT 1"}, headers=headers)
            assert done.status_code == 200, done.text
        api: dict[str, Any] = (
            await http.get("/api/v1/metrics/performance", headers=admin_headers)
        ).json()
        health: dict[str, Any] = (await http.get("/health", headers=admin_headers)).json()

    # --virtual-time-budget lets the page's timers run: it refreshes its live part.
    dom = await browse(await link(served, admin_headers), "--dump-dom",
                       "--virtual-time-budget=8000")  # fmt: skip
    shown = figures(dom)
    assert shown["source"] == ["refresh"], "the page did not refresh itself"
    assert shown["version"] == [health["version"]]
    assert shown["workers"] == [str(health["workers"]["count"])]
    assert re.search(r'<tr data-dep="?postgresql"?>.*?>healthy<', dom, re.S)
    row = tenant_row(dom, tenant.tenant_id)
    pool = api["pools"][tenant.tenant_id]
    assert row["tenant-status"] == "active"
    assert (row["pool_size"], row["pool_max"]) == (str(pool["size"]), str(pool["max"]))
    assert int(shown["requests_last_60s"][0]) >= 3
    assert shown["hub"] == ["not_configured"]
    assert "<script" in dom and "https://" not in dom  # nothing from anywhere else

    screenshot = tmp_path / "status.png"
    await browse(await link(served, admin_headers), f"--screenshot={screenshot}",
                 "--window-size=1366,1000", "--hide-scrollbars")  # fmt: skip
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000
    if os.environ.get("DBSVC_STATUS_SCREENSHOT"):  # kept for a human to look at
        shutil.copy(screenshot, os.environ["DBSVC_STATUS_SCREENSHOT"])


async def test_without_a_session_the_page_shows_nothing(
    served: str,
    core: Application,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = await new_tenant("nopage")
    own_admin = await service_headers([tenant.tenant_id], (Scope.READ, Scope.ADMIN))
    async with httpx.AsyncClient(base_url=served) as http:
        anonymous = await http.get("/status")
        assert anonymous.status_code == 401 and tenant.tenant_id not in anonymous.text
        assert (await http.get("/status/fragment")).status_code == 401
        tenant_admin = await http.get("/status", headers=own_admin)
        assert tenant_admin.status_code == 403 and "pool" not in tenant_admin.text
        refused = await http.post("/api/v1/status/link", headers=own_admin)
        assert refused.status_code == 403
    async with httpx.AsyncClient(
        base_url=served, cookies={"dbsvc_status": "eyJrIjoi.c2Vzc2lvbiJ9"}
    ) as forged_client:
        assert (await forged_client.get("/status")).status_code == 401
    async with httpx.AsyncClient(base_url=served) as http:
        bad_link = await http.get("/status/login?code=nope", follow_redirects=False)
        assert bad_link.status_code == 401 and "set-cookie" not in bad_link.headers
    dom = await browse(served + "/status", "--dump-dom")
    assert tenant.tenant_id not in dom and "sign in" in dom
