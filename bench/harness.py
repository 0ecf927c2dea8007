"""The service as its own process for benchmarks: a private PostgreSQL, `database-service serve`
on free ports, and an admin token; stopped on exit. ``emit`` prints a bench's figures as its
last line: one JSON object, ``{"bench": "<name>", ...}``, for scripts and CI to read."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from database_service.supervisor import EmbeddedPostgres, free_port
from database_service.tls import make_dev_certificates


@dataclass(frozen=True)
class Service:
    dsn: str  # superuser DSN of the PostgreSQL the service uses
    http: str
    grpc: str
    admin_token: str
    pid: int = 0  # of `database-service serve` (its workers are its children)
    ca_file: str | None = None  # the CA of its certificate when it serves TLS

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True

    async def tenant_token(self, tenant: str, scopes: list[str]) -> str:
        """Create a tenant and a service identity for it; return a token."""
        return (await self.tenant(tenant, scopes))[1]

    async def tenant(self, tenant: str, scopes: list[str]) -> tuple[str, str]:
        """Create a tenant and a service identity for it; return its schema (an opaque name)
        and a token."""
        admin = {"Authorization": f"Bearer {self.admin_token}"}
        async with httpx.AsyncClient(base_url=self.http, timeout=60, verify=self.verify) as http:
            created = await http.post(
                "/api/v1/admin/schema/create", json={"tenant_id": tenant}, headers=admin
            )
            created.raise_for_status()
            schema: str = created.json()["schema"]
            name = f"bench-{tenant}".replace("_", "-")
            body = {"service": name, "tenants": [tenant], "scopes": scopes, "with_secret": False}
            (await http.post("/api/v1/admin/services", json=body, headers=admin)).raise_for_status()
            issued = await http.post("/api/v1/admin/tokens", json={"service": name}, headers=admin)
            issued.raise_for_status()
            token: str = issued.json()["access_token"]
            return schema, token


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                tree.extend(int(child) for child in task.read_text().split())
        index += 1
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far: what a server costs per
    request, which other load on a shared machine changes far less than its throughput."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (the service and its workers)."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for status_line in Path(f"/proc/{member}/status").read_text().splitlines():
                if status_line.startswith("VmRSS:"):
                    total += int(status_line.split()[1]) * 1024
    return total


def emit(figures: dict[str, Any]) -> None:
    """The bench's last line: ``{"bench": "<name>", ...}``, one JSON object (floats rounded to
    4 digits)."""
    assert isinstance(figures.get("bench"), str), "figures name their bench"
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    print(json.dumps(rounded), flush=True)


def _stopped(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the bench's cleanup runs (services stop)


@contextlib.contextmanager
def reporting(bench: str) -> Iterator[dict[str, Any]]:
    """The bench's figures, filled in as they are measured, printed as its last line when it
    ends. A bench stopped early (Ctrl-C, or SIGTERM from a time limit) still ends with that
    line: the figures measured so far and ``"interrupted": true``."""
    figures: dict[str, Any] = {"bench": bench}
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        yield figures
    except KeyboardInterrupt:
        emit({**figures, "interrupted": True})
        raise SystemExit(130) from None
    else:
        emit(figures)
    finally:
        signal.signal(signal.SIGTERM, previous)


def p99(samples: Sequence[float]) -> float:
    return sorted(samples)[max(0, int(len(samples) * 0.99) - 1)]


async def closed_loop(
    calls: Sequence[Callable[[int], Awaitable[Any]]], seconds: float
) -> tuple[float, list[float]]:
    """One worker per call (the same call repeated, or each with its own connection), each
    sending its next request when the last answered, for ``seconds``: requests per second and
    the latencies in ms. Each worker warms up first (connections, statement caches, pools)."""
    latencies: list[float] = []
    concurrency = len(calls)

    async def worker(w: int) -> None:
        call, i = calls[w], w
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - started) * 1000)
            i += concurrency

    for w, call in enumerate(calls):
        for i in range(max(2, 50 // concurrency)):
            await call(w + i)
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


@contextlib.asynccontextmanager
async def running_service(*, tls: bool = False, **env: str) -> AsyncIterator[Service]:
    """``tls``: serve with a development CA's certificate (``Service.ca_file``)."""
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = None
        if tls:
            certs = make_dev_certificates(Path(tmp) / "tls")
            ca_file = str(certs.ca_cert)
            env = {
                "DBSVC_TLS_CERT_FILE": str(certs.server_cert),
                "DBSVC_TLS_KEY_FILE": str(certs.server_key),
                **env,
            }
        async with EmbeddedPostgres(Path(tmp) / "pg") as pg:
            token = secrets.token_urlsafe(32)
            http_port, grpc_port = free_port(), free_port()
            environment = {
                **os.environ,
                "DBSVC_POSTGRES_URL": pg.dsn,
                "DBSVC_DATA_DIR": str(Path(tmp) / "data"),
                "DBSVC_HTTP_PORT": str(http_port),
                "DBSVC_GRPC_PORT": str(grpc_port),
                "DBSVC_NATS_EMBEDDED": "false",
                "DBSVC_BOOTSTRAP_ADMIN_TOKEN": token,
                "DBSVC_LOG_LEVEL": "WARNING",
                **env,
            }
            process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is polled
                [str(Path(sys.executable).parent / "database-service"), "serve"],
                env=environment,
                stdout=subprocess.DEVNULL,
            )
            try:
                service = Service(
                    pg.dsn,
                    f"{'https' if tls else 'http'}://127.0.0.1:{http_port}",
                    f"127.0.0.1:{grpc_port}",
                    token,
                    process.pid,
                    ca_file,
                )
                async with httpx.AsyncClient(base_url=service.http, verify=service.verify) as http:
                    for _ in range(600):
                        with contextlib.suppress(httpx.HTTPError):
                            if (await http.get("/api/v1/health")).status_code == 200:
                                break
                        await asyncio.sleep(0.1)
                yield service
            finally:
                process.terminate()
                process.wait(30)
