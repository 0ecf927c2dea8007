"""The isolation suite's attacks against ``database-service serve`` with two workers.

A chosen subset of ``tests/isolation`` runs here unchanged: this module points the fixtures the
attacks use (``http``, ``grpc_target``, ``grpcio_target``) at a ``serve`` of two workers on the
session's PostgreSQL (``grpcio_target``: another, with the compiled gRPC front off), so every
attack goes through a worker process, over REST, gRPC queries and gRPC transactions, with the victim's data checked unchanged after each (``unchanged_victim``). New
connections spread the attacks over both workers; the last test checks that both answered some.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.supervisor import free_port
from tests.fix_pgwire import PortLogin, PortLoginFactory
from tests.fix_service import ADMIN_TOKEN, cli_env
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import FrontEnd

# The attacks, collected again in this module: they run against the two workers.
from tests.isolation.test_attacks_through_service import (  # noqa: F401
    test_attack_is_refused_before_reaching_postgres,
    test_forged_company_id_on_insert_is_refused_by_rls,
    test_shared_tables_show_only_the_tenants_own_rows,
    test_tenant_cannot_read_another_company_by_filtering_shared_rows,
    test_tenant_header_alone_cannot_reach_b,
    test_token_for_a_cannot_name_tenant_b,
)
from tests.isolation.test_grpc_attacks import (  # noqa: F401
    as_a,
    as_a_bulk,
    as_a_naming_b,
    test_bulk_insert_into_b_schema_is_refused,
    test_sql_naming_b_is_refused_on_every_query_rpc,
    test_time_series_returns_only_a_ticks,
    test_token_for_a_cannot_name_b_in_metadata,
)
from tests.isolation.test_shared_keys import (  # noqa: F401
    test_an_explicit_id_of_another_tenant_neither_collides_nor_reveals,
    test_the_old_shared_sequence_is_gone,
)
from tests.isolation.test_sql_in_strings import test_sql_hidden_in_strings_is_refused  # noqa: F401
from tests.isolation.test_user_context import (  # noqa: F401
    a_rows,
    test_a_user_sees_its_rows_and_the_companys_only,
    test_ddl_with_a_user_id_is_refused,
    test_rows_written_for_another_user_are_refused,
    test_the_guard_refuses_setting_the_user_id,
)

pytestmark = pytest.mark.usefixtures("unchanged_victim")

BIN = Path(sys.executable).parent / "database-service"


@dataclass
class ServeProcess:
    process: subprocess.Popen[bytes]
    base: str
    grpc_target: str
    log: Path
    wire_port: int = 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def _serve(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory, **extra: str
) -> Iterator[ServeProcess]:
    """``serve`` with two workers on the session's PostgreSQL (its control plane is migrated by
    ``core``), the same names and secrets; no NATS."""
    tmp = tmp_path_factory.mktemp("workers-isolation")
    http_port, grpc_port, wire_port = free_port(), free_port(), free_port()
    env = cli_env(
        settings,
        DBSVC_DATA_DIR=str(tmp / "data"),
        DBSVC_WORKERS="2",
        DBSVC_HTTP_PORT=str(http_port),
        DBSVC_GRPC_PORT=str(grpc_port),
        DBSVC_PGWIRE_PORT=str(wire_port),
        DBSVC_TS_CREATE_AHEAD_HOURS="1",
        DBSVC_INGEST_ENABLED="false",
        **extra,
    )
    log = tmp / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [str(BIN), "serve"], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    served = ServeProcess(
        process, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log, wire_port
    )
    try:
        deadline = time.monotonic() + 120
        while "Database Service is running." not in served.output():
            assert process.poll() is None, served.output()
            assert time.monotonic() < deadline, served.output()
            time.sleep(0.1)
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def two_workers(
    core: Application, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    """The serve every attack goes through (the gRPC port: the compiled front)."""
    with _serve(settings, tmp_path_factory) as served:
        yield served


@pytest.fixture(scope="module")
def grpcio_target(
    core: Application, settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The ``grpcio_query`` front end's: a serve of two workers whose gRPC port grpcio serves
    itself (as with TLS or tracing on)."""
    with _serve(settings, tmp_path_factory, DBSVC_GRPC_FRONT="false") as served:
        yield served.grpc_target


@pytest.fixture(scope="module")
async def http(two_workers: ServeProcess) -> AsyncIterator[httpx.AsyncClient]:
    """REST of the two workers; no keep-alive, so each request may reach either worker."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=two_workers.base, limits=limits, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_target(two_workers: ServeProcess) -> str:
    return two_workers.grpc_target


@pytest.fixture(scope="module")
def port_login(core: Application, two_workers: ServeProcess) -> PortLoginFactory:
    """Logins to the two workers' PostgreSQL wire port (the pgwire front end's)."""

    async def make(
        tenant_id: str,
        scopes: tuple[Scope, ...] = (Scope.READ, Scope.WRITE, Scope.ADMIN),
        tenants: list[str] | None = None,
    ) -> PortLogin:
        name = f"pgw-{secrets.token_hex(4)}"
        _, secret = await core.services.register(
            name, tenants=tenants or [tenant_id], scopes=scopes
        )
        assert secret is not None
        return PortLogin("127.0.0.1", two_workers.wire_port, name, secret, tenant_id)

    return make


async def test_sql_naming_the_victims_schema_is_refused_on_every_front_end(
    front_end: FrontEnd, tenants: Tenants
) -> None:
    outcome = await front_end.run(f"SELECT * FROM {tenants.b.schema_name}.users")
    assert outcome.refused and outcome.code == "sql_rejected", outcome


async def test_shared_rows_are_only_the_tenants_own_on_every_front_end(
    front_end: FrontEnd, tenants: Tenants
) -> None:
    outcome = await front_end.run(f"SELECT DISTINCT company_id FROM {tenants.shared}.market_data")
    assert outcome.ok, outcome
    assert outcome.values() == {tenants.a.tenant_id}


async def test_a_token_for_a_naming_b_is_refused_on_every_front_end(
    front_end: FrontEnd, tenants: Tenants
) -> None:
    outcome = await front_end.run("SELECT * FROM users", tenant_id=tenants.b.tenant_id)
    assert outcome.refused and outcome.status in {"403", "PERMISSION_DENIED"}, outcome


async def test_both_workers_answered_the_attacks(
    http: httpx.AsyncClient, two_workers: ServeProcess
) -> None:
    response = await http.get("/api/v1/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    document: dict[str, Any] = response.json()
    assert SECRET not in json.dumps(document)
    processes = document["workers"]["processes"]
    assert len(processes) == 2 and all(p["up"] for p in processes), processes
    assert all(p["requests_last_60s"] for p in processes), processes
    assert document["workers"]["restarts"] == 0
    assert os.getpid() not in {p["pid"] for p in processes}
