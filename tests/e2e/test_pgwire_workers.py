"""The PostgreSQL wire port in ``serve`` with two workers (SO_REUSEPORT): a CancelRequest
arrives on a new connection, which the kernel may hand to either worker. The client's key names
its worker; the other worker passes the request on over a Unix socket in the run directory, so
every cancel reaches its backend. ``dbsvc_pgwire_cancel_requests_total{route="forwarded"}``
shows that some did cross."""

from __future__ import annotations

import asyncio
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.pgwire.admin import ADMIN_DATABASE
from database_service.supervisor import free_port
from tests.fix_pgwire import PortLogin, RawClient
from tests.fix_service import ADMIN_TOKEN, cli_env

BIN = Path(sys.executable).parent / "database-service"
CANCELS = 12  # each lands on the other worker with probability 1/2: all local is 1 in 4096


@dataclass
class Served:
    base: str
    dsn: str


@pytest.fixture(scope="module")
async def wire_login(core: Application) -> tuple[str, str, str]:
    """A tenant and a service with a secret for it, made before ``serve`` starts."""
    tenant = f"pgw_workers_{secrets.token_hex(3)}"
    service = f"pgw-workers-{secrets.token_hex(3)}"
    await core.tenants.create(tenant)
    _, secret = await core.services.register(service, tenants=[tenant], scopes=[Scope.READ])
    assert secret is not None
    return tenant, service, secret


@pytest.fixture(scope="module")
def served(
    settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    wire_login: tuple[str, str, str],
) -> Iterator[Served]:
    """``serve`` with two workers and the wire port on the session's PostgreSQL."""
    tmp = tmp_path_factory.mktemp("pgwire-workers")
    tenant, service, secret = wire_login
    http_port, grpc_port, wire_port = free_port(), free_port(), free_port()
    env = cli_env(
        settings,
        DBSVC_DATA_DIR=str(tmp / "data"),
        DBSVC_WORKERS="2",
        DBSVC_HTTP_PORT=str(http_port),
        DBSVC_GRPC_PORT=str(grpc_port),
        DBSVC_PGWIRE_PORT=str(wire_port),
        DBSVC_INGEST_ENABLED="false",
    )
    log = tmp / "serve.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([str(BIN), "serve"], env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Database Service is running." not in log.read_text(errors="replace"):
            assert process.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        yield Served(
            f"http://127.0.0.1:{http_port}",
            f"postgresql://{service}:{secret}@127.0.0.1:{wire_port}/{tenant}?sslmode=disable",
        )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def cancels(served: Served, route: str) -> float:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = httpx.get(f"{served.base}/metrics", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    pattern = rf'dbsvc_pgwire_cancel_requests_total\{{route="{route}"\}} (\S+)'
    return sum(float(m) for m in re.findall(pattern, response.text))


async def test_every_cancel_reaches_its_backend_whichever_worker_receives_it(
    served: Served,
) -> None:
    for _ in range(CANCELS):
        conn = await asyncpg.connect(served.dsn)
        try:
            task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(30)"))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            task.cancel()  # asyncpg sends a CancelRequest on a new connection: either worker
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await conn.fetchval("SELECT 1") == 1
            # The backend stopped sleeping: the cancel reached it (not the 30 s running out).
            assert time.monotonic() - started < 10
        finally:
            await conn.close()
    assert cancels(served, "forwarded") >= 1
    assert cancels(served, "local") >= CANCELS


@pytest.fixture(scope="module")
async def wire_admin(core: Application, wire_login: tuple[str, str, str]) -> tuple[str, str]:
    """A service with the admin scope over the same tenant, for the admin database."""
    service = f"pgw-admin-{secrets.token_hex(3)}"
    _, secret = await core.services.register(
        service, tenants=[wire_login[0]], scopes=[Scope.READ, Scope.ADMIN]
    )
    assert secret is not None
    return service, secret


async def test_the_admin_view_shows_every_workers_clients(
    served: Served, wire_login: tuple[str, str, str], wire_admin: tuple[str, str]
) -> None:
    """Eight clients, spread over both workers by the kernel (all on one: 1 in 128): the REST
    view and SHOW CLIENTS on ``dbsvc-admin``, whichever worker answers, list all eight, each
    row naming its worker; pools are listed per worker too."""
    tenant, service, _ = wire_login
    clients = [await asyncpg.connect(served.dsn) for _ in range(8)]
    try:
        for conn in clients:
            assert await conn.fetchval("SELECT 1") == 1
        await asyncio.sleep(2.5)  # each worker's snapshot is rewritten every second
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=served.base, headers=headers, timeout=10) as http:
            for _ in range(4):  # several requests: either worker may answer each
                response = await http.get("/api/v1/admin/pgwire")
                assert response.status_code == 200, response.text
                document = response.json()
                mine = [row for row in document["clients"] if row["user"] == service]
                assert len(mine) == 8, document["clients"]
                assert {row["worker"] for row in mine} == {0, 1}
                pools = [row for row in document["pools"] if row["database"] == tenant]
                assert {row["worker"] for row in pools} == {0, 1}
        admin_name, admin_secret = wire_admin
        port = int(served.dsn.rsplit(":", 1)[1].split("/", 1)[0])
        for _ in range(3):  # new connections: either worker may answer each
            raw = RawClient(*await asyncio.open_connection("127.0.0.1", port))
            try:
                login = PortLogin("127.0.0.1", port, admin_name, admin_secret, ADMIN_DATABASE)
                assert (await raw.login(login))[-1][:1] == b"Z"
                answer = await raw.query("SHOW CLIENTS")
            finally:
                raw.close()
            assert answer[0][0] == b"T" and b"worker\x00" in answer[0][1]
            rows = [values(payload) for kind, payload in answer if kind == b"D"]
            mine = [row for row in rows if row[1] == service.encode()]
            assert len(mine) == 8 and {row[-1] for row in mine} == {b"0", b"1"}, rows
    finally:
        for conn in clients:
            await conn.close()


def values(payload: bytes) -> list[bytes]:
    """A DataRow's values (NULL as b"")."""
    count, offset, out = int.from_bytes(payload[:2]), 2, []
    for _ in range(count):
        length = int.from_bytes(payload[offset : offset + 4], signed=True)
        offset += 4
        out.append(b"" if length < 0 else payload[offset : offset + length])
        offset += max(length, 0)
    return out
