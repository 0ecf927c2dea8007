"""The service as its own process for benchmarks: a private PostgreSQL, `database-service serve`
on free ports, and an admin token; stopped on exit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from database_service.supervisor import EmbeddedPostgres, free_port


@dataclass(frozen=True)
class Service:
    dsn: str  # superuser DSN of the PostgreSQL the service uses
    http: str
    grpc: str
    admin_token: str

    async def tenant_token(self, tenant: str, scopes: list[str]) -> str:
        """Create a tenant and a service identity for it; return a token."""
        admin = {"Authorization": f"Bearer {self.admin_token}"}
        async with httpx.AsyncClient(base_url=self.http, timeout=60) as http:
            created = await http.post(
                "/api/v1/admin/schema/create", json={"tenant_id": tenant}, headers=admin
            )
            created.raise_for_status()
            name = f"bench-{tenant}".replace("_", "-")
            body = {"service": name, "tenants": [tenant], "scopes": scopes, "with_secret": False}
            (await http.post("/api/v1/admin/services", json=body, headers=admin)).raise_for_status()
            issued = await http.post("/api/v1/admin/tokens", json={"service": name}, headers=admin)
            issued.raise_for_status()
            token: str = issued.json()["access_token"]
            return token


@contextlib.asynccontextmanager
async def running_service(**env: str) -> AsyncIterator[Service]:
    with tempfile.TemporaryDirectory() as tmp:
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
                    pg.dsn, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", token
                )
                async with httpx.AsyncClient(base_url=service.http) as http:
                    for _ in range(600):
                        with contextlib.suppress(httpx.HTTPError):
                            if (await http.get("/api/v1/health")).status_code == 200:
                                break
                        await asyncio.sleep(0.1)
                yield service
            finally:
                process.terminate()
                process.wait(30)
