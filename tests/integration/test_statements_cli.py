"""``database-service stats`` and ``slow-queries``: the running service's figures (shared through
the run directory) and its slow-query log, from the operator's command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx

from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from tests.fix_service import TenantFactory, TokenFactory, cli_env

BIN = Path(sys.executable).parent / "database-service"


async def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the service under test keeps serving on this event loop meanwhile.
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN), *args],
        env=cli_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_stats_top_settings_and_slow_queries_from_the_command_line(
    core: Application,
    settings: Settings,
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = await new_tenant("cli_st")
    headers = await service_headers([tenant.tenant_id], (Scope.READ,))
    headers["X-Tenant-Id"] = tenant.tenant_id

    configured = await cli(
        settings, "stats", "settings", "--tenant", tenant.tenant_id, "--slow-query-ms", "0"
    )
    assert configured.returncode == 0, configured.stderr
    assert json.loads(configured.stdout)["slow_query_ms"] == 0
    await core.slow_queries.load()  # the CLI changed it: this process reloads within seconds

    for user in ("x", "y"):
        response = await http.post(
            "/api/v1/query",
            json={"sql": f"SELECT count(*) FROM users WHERE user_id = '{user}'"},
            headers=headers,
        )
        assert response.status_code == 200, response.text
    # A statement's figures are booked just after its answer (a loop callback): both first.
    recorder = core.statement_recorder
    assert recorder is not None
    for _ in range(200):
        booked = recorder.stats.export_tenant(tenant.tenant_id)["tenants"][tenant.tenant_id]
        if sum(entry["calls"] for entry in booked.values()) >= 2:
            break
        await asyncio.sleep(0.01)
    core.shared_statements.write()  # what the service's loop does every couple of seconds

    top = await cli(settings, "stats", "top", "--tenant", tenant.tenant_id)
    assert top.returncode == 0, top.stderr
    document = json.loads(top.stdout)
    [statement] = document["statements"]
    assert statement["statement"] == "SELECT count(*) FROM users WHERE user_id = $1"
    assert statement["calls"] == 2
    assert document["processes"] == 2  # the CLI's own (empty) and the service's

    for _ in range(100):
        slow = await cli(settings, "slow-queries", "--tenant", tenant.tenant_id)
        assert slow.returncode == 0, slow.stderr
        entries = json.loads(slow.stdout)["slow_queries"]
        if len(entries) == 2:
            break
        await asyncio.sleep(0.1)
    assert {e["fingerprint"] for e in entries} == {statement["fingerprint"]}
    assert all("Aggregate" in e["plan"] for e in entries)

    bad = await cli(settings, "stats", "top", "--tenant", tenant.tenant_id, "--order", "nope")
    assert bad.returncode == 1 and "invalid_parameters" in bad.stderr
    reset = await cli(
        settings, "stats", "settings", "--tenant", tenant.tenant_id, "--slow-query-ms", "default"
    )
    assert json.loads(reset.stdout)["slow_query_ms_overridden"] is False
