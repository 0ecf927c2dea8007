"""Tokens at the command line: ``token issue --ttl`` is bounded, ``token revoke`` works,
``ingest-load`` carries a least-privilege token of its own (never the bootstrap token), and
every administrative action of the CLI is audited under the operator's name."""

from __future__ import annotations

import asyncio
import getpass
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import jwt

from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.errors import Unauthenticated
from tests.fix_nats import NatsServer
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory, cli_env, make_settings

BIN = Path(sys.executable).parent / "database-service"


async def cli(
    settings: Settings, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN), *args],
        env=cli_env(settings, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def audited(core: Application, action: str, detail_like: str) -> list[dict[str, object]]:
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT * FROM {core.settings.control_schema}.audit_log"
        " WHERE action = $1 AND detail LIKE $2 ORDER BY id",
        action,
        detail_like,
    )
    return [dict(r) for r in rows]


async def refused_within_cache_period(core: Application, token: str) -> None:
    """Another process revoked it: this instance refuses it within its cache period."""
    deadline = time.monotonic() + 5.0 + 2.0
    while True:
        try:
            await core.authenticator.authenticate(f"Bearer {token}")
        except Unauthenticated as exc:
            assert "revoked" in exc.message
            return
        assert time.monotonic() < deadline, "still accepted after the cache period"
        await asyncio.sleep(0.2)


async def test_token_issue_ttl_is_bounded(settings: Settings, core: Application) -> None:
    name = f"cli-ttl-{secrets.token_hex(3)}"
    await core.services.register(name, tenants=["*"], scopes=[Scope.READ], with_secret=False)
    too_long = await cli(
        settings, "token", "issue", "--service", name,
        "--ttl", str(core.settings.token_max_ttl_seconds + 1),
    )  # fmt: skip
    assert too_long.returncode == 1, too_long.stdout
    assert "DBSVC_TOKEN_MAX_TTL_SECONDS" in too_long.stderr
    assert (await cli(settings, "token", "issue", "--service", name, "--ttl", "0")).returncode == 2
    issued = await cli(settings, "token", "issue", "--service", name, "--ttl", "120")
    assert issued.returncode == 0, issued.stderr
    claims = jwt.decode(issued.stdout.strip(), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 120
    assert claims["aud"] == core.tokens.audience


async def test_token_revoke_from_the_command_line(settings: Settings, core: Application) -> None:
    name = f"cli-rv-{secrets.token_hex(3)}"
    await core.services.register(name, tenants=["*"], scopes=[Scope.READ], with_secret=False)
    first = core.tokens.issue(name, tenants=["*"], scopes=[Scope.READ], ttl_seconds=600)
    second = core.tokens.issue(name, tenants=["*"], scopes=[Scope.READ], ttl_seconds=600)
    for token in (first, second):
        await core.authenticator.authenticate(f"Bearer {token}")

    by_token = await cli(settings, "token", "revoke", "--token", "-", stdin=first + "\n")
    assert by_token.returncode == 0, by_token.stderr
    assert json.loads(by_token.stdout)["service"] == name
    await refused_within_cache_period(core, first)
    await core.authenticator.authenticate(f"Bearer {second}")  # only that one

    jti = core.tokens.inspect(second).token_id
    by_id = await cli(settings, "token", "revoke", "--service", name, "--token-id", jti)
    assert by_id.returncode == 0, by_id.stderr
    await refused_within_cache_period(core, second)
    neither = await cli(settings, "token", "revoke", "--service", name)
    assert neither.returncode == 2

    operator = f"cli:{getpass.getuser()}"
    events = await audited(core, "token.revoke", f"{name} %")
    assert [e["service"] for e in events] == [operator, operator]


async def test_cli_admin_actions_are_audited_under_the_operator(
    settings: Settings, core: Application
) -> None:
    tenant_id = f"cli_aud_{secrets.token_hex(3)}"
    assert (await cli(settings, "tenant", "create", tenant_id)).returncode == 0
    name = f"cli-aud-{secrets.token_hex(3)}"
    issued = await cli(
        settings, "token", "issue", "--service", name, "--register",
        "--tenants", tenant_id, "--scopes", "read",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    jti = core.tokens.inspect(issued.stdout.strip()).token_id
    operator = f"cli:{getpass.getuser()}"
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT action, outcome, tenant_id, detail FROM {core.settings.control_schema}.audit_log"
        " WHERE service = $1 AND (tenant_id = $2 OR detail LIKE $3) ORDER BY id",
        operator,
        tenant_id,
        f"{name}%",
    )
    actions = [(r["action"], r["outcome"]) for r in rows]
    assert ("tenant.create", "ok") in actions
    assert ("service.create", "ok") in actions
    assert any(r["action"] == "token.issue" and f"jti={jti}" in r["detail"] for r in rows)


async def test_ingest_load_mints_an_ingest_only_token_for_its_tenant(
    core: Application,
    pg_cluster: PgCluster,
    nats_server: NatsServer,
    new_tenant: TenantFactory,
    tmp_path: Path,
) -> None:
    tenant = await new_tenant("load_tok")
    consumer = Application(
        make_settings(pg_cluster, tmp_path / "serve", nats_url=nats_server.url),
        start_nats=False,
        consume=True,
        maintain_partitions=False,
        migrate_tenants_on_start=False,
    )
    await consumer.__aenter__()
    try:
        deadline = time.monotonic() + 60
        while consumer.ingest.stats("nats").state != "running":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        since = await core.owner_pool.fetchval("SELECT now()")
        done = await cli(
            consumer.settings, "ingest-load", "--tenant", tenant.tenant_id, "--ticks", "200",
            "--batch", "100", "--transport", "nats", "--seed", "3",
            DBSVC_NATS_URL=nats_server.url, DBSVC_DATA_DIR=str(tmp_path / "cli"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        count = f"SELECT count(*) FROM {core.settings.shared_schema}.trading_ticks"
        stored = 0
        for _ in range(100):
            stored = await core.owner_pool.fetchval(
                f"{count} WHERE company_id = $1", tenant.tenant_id
            )
            if stored == 200:
                break
            await asyncio.sleep(0.1)
        assert stored == 200
    finally:
        await consumer.__aexit__(None, None, None)
    # It was not the bootstrap token: a token of the ingest-load service, audited when minted,
    # with only the ingest scope for this tenant, living the default lifetime.
    identity = await core.services.find("ingest-load")
    assert identity is not None and identity.scopes == {Scope.INGEST}
    await core.audit.flush()
    minted = await core.owner_pool.fetch(
        f"SELECT detail FROM {core.settings.control_schema}.audit_log"
        " WHERE action = 'token.issue' AND detail LIKE 'ingest-load %' AND at >= $1",
        since,
    )
    assert len(minted) == 1
    assert f"ttl={core.settings.token_default_ttl_seconds}" in minted[0]["detail"]
    letters = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {core.settings.control_schema}.dead_letters WHERE tenant_id = $1",
        tenant.tenant_id,
    )
    assert letters == 0


async def test_the_minted_ingest_token_holds_nothing_else(
    core: Application, new_tenant: TenantFactory
) -> None:
    from database_service.cli import _ingest_token  # the helper ingest-load uses

    tenant = await new_tenant("mint")
    token = await _ingest_token(core, tenant.tenant_id)
    principal = await core.authenticator.authenticate(f"Bearer {token}")
    assert principal.scopes == {Scope.INGEST}
    assert principal.tenants == {tenant.tenant_id}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == core.settings.token_default_ttl_seconds
