"""Cluster backups through the service: the WAL archived by the serving instance, the seed's
``POST /api/v1/maintenance/backup`` as a job with progress, verification, a restore into a named
directory, the health document's view; and the CLI over the same directory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.backup.cluster import SLOT
from database_service.config import Settings
from tests.fix_pg import PgCluster
from tests.fix_service import cli_env, make_settings


@pytest.fixture(scope="module")
async def backed_up(
    pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Application, httpx.AsyncClient]]:
    """A serving core with DBSVC_BACKUP_DIR (no schedule: backups on request only)."""
    root = tmp_path_factory.mktemp("backup-api")
    settings = make_settings(
        pg_cluster, root / "data", backup_dir=root / "backups", backup_interval_hours=0
    )
    async with Application(settings, start_nats=False) as app:
        transport = httpx.ASGITransport(app=create_http_app(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            yield app, http
    admin = await asyncpg.connect(pg_cluster.admin_dsn)
    try:
        for _ in range(100):  # the archive's slot would keep the test server's WAL forever
            with contextlib.suppress(asyncpg.ObjectInUseError):
                await admin.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = $1",
                    SLOT,
                )
                break
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def _done(http: httpx.AsyncClient, headers: dict[str, str], url: str) -> dict[str, Any]:
    for _ in range(600):
        status: dict[str, Any] = (await http.get(url, headers=headers)).json()
        if status.get("state") in ("done", "failed"):
            return status
        await asyncio.sleep(0.1)
    pytest.fail(f"the backup did not finish: {status}")


async def test_a_backup_taken_through_rest_is_verified_listed_and_restorable(
    backed_up: tuple[Application, httpx.AsyncClient], admin_headers: dict[str, str]
) -> None:
    app, http = backed_up
    started = await http.post("/api/v1/maintenance/backup", headers=admin_headers)
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["backup"]["state"] == "running"
    status = await _done(http, admin_headers, body["status"])
    assert status["state"] == "done" and status["verified"] is True, status
    assert status["progress"]["done_bytes"] == status["progress"]["total_bytes"] > 0
    assert status["settings"]["max_connections"].isdigit()

    listing = (await http.get("/api/v1/maintenance/backups", headers=admin_headers)).json()
    assert [b["id"] for b in listing["backups"]] == [status["id"]]
    assert listing["archive"]["wal_archive"]["state"] in ("receiving", "restarting", "standby")

    verified = await http.post(
        f"/api/v1/maintenance/backups/{status['id']}/verify", headers=admin_headers
    )
    assert verified.status_code == 200 and verified.json()["verified"] is True

    restored = await http.post(
        "/api/v1/maintenance/restore", headers=admin_headers, json={"into": "copy-1"}
    )
    assert restored.status_code == 200, restored.text
    directory = Path(restored.json()["directory"])
    assert directory == app.settings.backup_dir / "restores" / "copy-1"  # type: ignore[operator]
    assert (directory / "recovery.signal").exists() and (directory / "PG_VERSION").exists()
    again = await http.post(
        "/api/v1/maintenance/restore", headers=admin_headers, json={"into": "copy-1"}
    )
    assert again.status_code == 409 and again.json()["error"]["code"] == "failed_precondition"

    health = (await http.get("/api/v1/health", headers=admin_headers)).json()
    assert health["backups"]["newest"]["id"] == status["id"]


async def test_a_corrupted_backup_is_refused_with_backup_invalid(
    backed_up: tuple[Application, httpx.AsyncClient], admin_headers: dict[str, str]
) -> None:
    app, http = backed_up
    body = (await http.post("/api/v1/maintenance/backup", headers=admin_headers)).json()
    status = await _done(http, admin_headers, body["status"])
    assert app.settings.backup_dir is not None
    victim = app.settings.backup_dir / "base" / status["id"] / "data" / "PG_VERSION"
    victim.write_text(victim.read_text().replace("1", "9"))  # PostgreSQL 1x → 9x, same size

    verified = await http.post(
        f"/api/v1/maintenance/backups/{status['id']}/verify", headers=admin_headers
    )
    assert verified.status_code == 409, verified.text
    assert verified.json()["error"]["code"] == "backup_invalid"
    assert "PG_VERSION: checksum mismatch" in verified.json()["error"]["message"]
    restored = await http.post(
        "/api/v1/maintenance/restore",
        headers=admin_headers,
        json={"into": "from-corrupted", "backup_id": status["id"]},
    )
    assert restored.status_code == 409 and restored.json()["error"]["code"] == "backup_invalid"
    assert not (app.settings.backup_dir / "restores" / "from-corrupted").exists()


@pytest.mark.parametrize("name", ["..", "a/b", "", "x" * 101, "../../etc"])
async def test_a_restore_names_a_directory_never_a_path(
    backed_up: tuple[Application, httpx.AsyncClient], admin_headers: dict[str, str], name: str
) -> None:
    _, http = backed_up
    response = await http.post(
        "/api/v1/maintenance/restore", headers=admin_headers, json={"into": name}
    )
    assert response.status_code == 400, response.text


async def test_without_a_backup_directory_backups_say_they_are_off(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await http.post("/api/v1/maintenance/backup", headers=admin_headers)
    assert response.status_code == 409
    assert "DBSVC_BACKUP_DIR" in response.json()["error"]["message"]
    health = (await http.get("/api/v1/health", headers=admin_headers)).json()
    assert health["backups"]["status"] == "not_configured"


async def test_the_cli_lists_and_verifies_the_same_backups(
    backed_up: tuple[Application, httpx.AsyncClient], settings: Settings
) -> None:
    app, _ = backed_up
    assert app.settings.backup_dir is not None
    env = cli_env(settings)
    command = [
        ".venv/bin/database-service",
        "backup",
        "list",
        "--dir",
        str(app.settings.backup_dir),
    ]
    listed = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    backups = json.loads(listed.stdout)
    assert backups and all(b["state"] == "done" for b in backups)
    good = next(b["id"] for b in backups if b["verified"])
    command = [".venv/bin/database-service", "backup", "verify", good,
               "--dir", str(app.settings.backup_dir)]  # fmt: skip
    verified = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env, timeout=120
    )
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["verified"] is True


async def test_the_schedule_takes_a_verified_backup_when_none_is_recent(
    pg_cluster: PgCluster,
    tmp_path_factory: pytest.TempPathFactory,
    backed_up: tuple[Application, httpx.AsyncClient],
) -> None:
    """A second instance with backups on: its schedule takes one at once (none yet in its
    directory), while the first instance keeps archiving the WAL (one archiver per cluster:
    the second waits, ``standby``)."""
    root = tmp_path_factory.mktemp("backup-schedule")
    settings = make_settings(
        pg_cluster, root / "data", backup_dir=root / "backups", backup_interval_hours=24
    )
    async with Application(settings, start_nats=False) as app:
        for _ in range(600):
            status = app.backup_admin.status()
            if status["newest"] is not None and status["newest"]["verified"] is not None:
                break  # taken and verified
            await asyncio.sleep(0.1)
        assert status["newest"]["verified"] is True, status
        assert status["wal_archive"]["state"] == "standby"
