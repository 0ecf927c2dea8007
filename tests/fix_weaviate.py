"""Weaviate for the tests: ``DBSVC_TEST_WEAVIATE_URL`` (with ``DBSVC_TEST_WEAVIATE_API_KEY``: a
server that requires it, as the service's production one does), or
a private server started for the session from ``scripts/weaviate.sh path`` (built once with
``bash scripts/weaviate.sh install``: ``go install`` of weaviate-server, cached outside the repo).

Without either, the Weaviate tests skip with the reason, except under CI (``CI=true``), where a
missing server fails the run. ``WeaviateServer`` is also what a test uses to stop and restart a
server of its own (the restart test): every port explicit (HTTP, gRPC, gossip, data, Raft, Raft's
internal RPC), its data in a temporary directory, API-key authentication (the service holds the
key; anonymous access is off).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.supervisor import free_port
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WeaviateTarget:
    url: str
    api_key: str | None


def weaviate_binary() -> Path | None:
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "scripts" / "weaviate.sh"), "path"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(out)
    return path if path.is_file() and os.access(path, os.X_OK) else None


class WeaviateServer:
    """A private single-node weaviate-server that can be stopped and started again on its ports
    and data (a restart keeps what was written)."""

    def __init__(self, binary: Path, data_dir: Path) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.api_key = secrets.token_urlsafe(24)
        self.port = free_port()
        self._ports = {
            "GRPC_PORT": free_port(),
            "CLUSTER_GOSSIP_BIND_PORT": free_port(),
            "CLUSTER_DATA_BIND_PORT": free_port(),
            "RAFT_PORT": free_port(),
            "RAFT_INTERNAL_RPC_PORT": free_port(),
        }
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> WeaviateTarget:
        return WeaviateTarget(self.url, self.api_key)

    def start(self, timeout: float = 90.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            # Without an advertised address it picks an interface's (IPv6 here) and dies.
            "CLUSTER_HOSTNAME": "node1",
            "CLUSTER_ADVERTISE_ADDR": "127.0.0.1",
            "RAFT_JOIN": f"node1:{self._ports['RAFT_PORT']}",
            "RAFT_BOOTSTRAP_EXPECT": "1",
            "PERSISTENCE_DATA_PATH": str(self.data_dir),
            "AUTHENTICATION_ANONYMOUS_ACCESS_ENABLED": "false",
            "AUTHENTICATION_APIKEY_ENABLED": "true",
            "AUTHENTICATION_APIKEY_ALLOWED_KEYS": self.api_key,
            "AUTHENTICATION_APIKEY_USERS": "dbsvc",
            "DEFAULT_VECTORIZER_MODULE": "none",
            "DISABLE_TELEMETRY": "true",
            "LOG_LEVEL": "warning",
            "GOMAXPROCS": "2",
            **{k: str(v) for k, v in self._ports.items()},
        }
        log = (self.data_dir / "server.log").open("ab")
        self._process = subprocess.Popen(
            [str(self.binary), "--host", "127.0.0.1", "--port", str(self.port), "--scheme", "http"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"weaviate-server exited (see {self.data_dir / 'server.log'})")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/.well-known/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weaviate-server not ready after {timeout} s on port {self.port}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _missing(reason: str) -> NoReturn:
    """No Weaviate to test against: under CI (``CI=true``) the run fails; elsewhere the Weaviate
    tests skip, saying how to get one."""
    reason += " (bash scripts/weaviate.sh install)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " — CI must run the vector suites against a real Weaviate")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def weaviate_target() -> Iterator[WeaviateTarget]:
    """The Weaviate server of the session."""
    url = os.environ.get("DBSVC_TEST_WEAVIATE_URL")
    if url:
        yield WeaviateTarget(url, os.environ.get("DBSVC_TEST_WEAVIATE_API_KEY") or None)
        return
    binary = weaviate_binary()
    if binary is None:
        _missing("no DBSVC_TEST_WEAVIATE_URL and no weaviate-server built")
    with tempfile.TemporaryDirectory(prefix="dbsvc-test-weaviate-") as tmp:
        server = WeaviateServer(binary, Path(tmp))
        server.start()
        try:
            yield server.target
        finally:
            server.stop()


@pytest.fixture
async def private_weaviate(tmp_path: Path) -> AsyncIterator[WeaviateServer]:
    """A weaviate-server of the test's own, which the test may stop and start again."""
    binary = weaviate_binary()
    if binary is None:
        _missing("no weaviate-server built")
    server = WeaviateServer(binary, tmp_path / "weaviate")
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


@dataclass
class Stack:
    """A service on one vector store: its core, gRPC target and REST client."""

    store: str
    core: Application
    grpc_target: str
    http: httpx.AsyncClient


@asynccontextmanager
async def weaviate_service(
    pg_cluster: PgCluster, data_dir: Path, target: WeaviateTarget
) -> AsyncIterator[Stack]:
    """The service with its vector collections on a Weaviate server (DBSVC_WEAVIATE_URL), on
    the session's PostgreSQL (its tenants and services are the session service's)."""
    settings = make_settings(
        pg_cluster, data_dir, weaviate_url=target.url, weaviate_api_key=target.api_key
    )
    async with (
        Application(settings, start_nats=False, maintain_partitions=False) as core,
        GrpcServer(core) as server,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_http_app(core)), base_url="http://dbsvc.test"
        ) as http,
    ):
        yield Stack("weaviate", core, f"127.0.0.1:{server.port}", http)


@pytest.fixture(scope="module")
async def weaviate_stack(
    pg_cluster: PgCluster,
    weaviate_target: WeaviateTarget,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    """A service on the session's Weaviate, for one test module."""
    async with weaviate_service(pg_cluster, tmp_path_factory.mktemp("wv"), weaviate_target) as s:
        yield s


def store_stack(request: pytest.FixtureRequest) -> Stack:
    """For a fixture parametrised over the stores: the session's own service (pgvector), or one
    on Weaviate (``weaviate_stack``)."""
    if request.param == "pgvector":
        return Stack(
            "pgvector",
            request.getfixturevalue("core"),
            request.getfixturevalue("grpc_target"),
            request.getfixturevalue("http"),
        )
    made: Stack = request.getfixturevalue("weaviate_stack")
    return made
