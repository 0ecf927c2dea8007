"""PostgreSQL stops under the service and comes back: requests fail with 503 ``unavailable``
(not 500) over REST and UNAVAILABLE over gRPC, health says unhealthy, and all of it recovers by
itself when PostgreSQL returns."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import httpx
import pytest

import database_service_client
from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.observability import AuditEvent
from database_service.supervisor import EmbeddedPostgres
from tests.fix_service import ADMIN_TOKEN, MASTER_KEY

UNAVAILABLE_CODES = {"unavailable", "connection_exception"}


async def test_service_reports_and_survives_a_postgres_outage() -> None:
    with tempfile.TemporaryDirectory(prefix="dbsvc-outage-") as tmp:
        pgdata = Path(tmp) / "pg"
        async with EmbeddedPostgres(pgdata, stop_on_exit=True) as pg:
            settings = Settings.load(
                postgres_url=pg.dsn,
                data_dir=Path(tmp) / "data",
                master_key=MASTER_KEY,
                bootstrap_admin_token=ADMIN_TOKEN,
                nats_embedded=False,
                pool_acquire_timeout_seconds=2.0,
                grpc_port=0,
                grpc_shutdown_grace_seconds=1.0,
            )
            async with Application(settings, start_nats=False) as core:
                await core.tenants.create("outage")
                for name in ("outage-svc", "outage-late"):
                    await core.services.register(
                        name, tenants=["outage"], scopes=[Scope.READ], with_secret=False
                    )

                def headers(service: str) -> dict[str, str]:
                    token = core.tokens.issue(
                        service, tenants=["outage"], scopes=[Scope.READ], ttl_seconds=600
                    )
                    return {"Authorization": f"Bearer {token}", "X-Tenant-Id": "outage"}

                query = {"sql": "SELECT 1"}
                admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                transport = httpx.ASGITransport(app=create_http_app(core))
                async with (
                    httpx.AsyncClient(transport=transport, base_url="http://o") as http,
                    GrpcServer(core) as grpc_server,
                    database_service_client.MultiDatabaseClient(
                        f"127.0.0.1:{grpc_server.port}",
                        "outage",
                        core.tokens.issue(
                            "outage-svc", tenants=["outage"], scopes=[Scope.READ], ttl_seconds=600
                        ),
                    ) as client,
                    database_service_client.MultiDatabaseClient(
                        f"127.0.0.1:{grpc_server.port}", "outage", ADMIN_TOKEN
                    ) as admin_client,
                ):
                    ok = await http.post("/api/v1/query", json=query, headers=headers("outage-svc"))
                    assert ok.status_code == 200
                    assert (await client.fetch_all("SELECT 1")).rows == [(1,)]

                    await asyncio.to_thread(pg._server.stop)

                    # The tenant and the service are cached: the tenant's pool finds PostgreSQL gone.
                    down = await http.post(
                        "/api/v1/query", json=query, headers=headers("outage-svc")
                    )
                    assert down.status_code == 503, down.text
                    assert down.json()["error"]["code"] in UNAVAILABLE_CODES
                    # Lookups through the owner's pool: a service not seen yet (the service
                    # directory) and a tenant not cached (the registry) are 503 too, not 401/404.
                    unseen_service = await http.post(
                        "/api/v1/query", json=query, headers=headers("outage-late")
                    )
                    assert unseen_service.status_code == 503, unseen_service.text
                    assert unseen_service.json()["error"]["code"] in UNAVAILABLE_CODES
                    unseen_tenant = await http.post(
                        "/api/v1/query",
                        json=query,
                        headers={**admin, "X-Tenant-Id": "ghost"},
                    )
                    assert unseen_tenant.status_code == 503, unseen_tenant.text
                    assert unseen_tenant.json()["error"]["code"] in UNAVAILABLE_CODES

                    with pytest.raises(database_service_client.Unavailable) as grpc_down:
                        await client.fetch_all("SELECT 1")
                    assert grpc_down.value.code in UNAVAILABLE_CODES

                    # Paths with no translation of their own (partition listing, tenant creation)
                    # meet the front ends' last resort: still 503 / UNAVAILABLE, not 500 / UNKNOWN.
                    listing = await http.get("/api/v1/admin/partitions", headers=admin)
                    assert listing.status_code == 503, listing.text
                    assert listing.json()["error"]["code"] == "unavailable"
                    with pytest.raises(database_service_client.Unavailable):
                        await admin_client.create_tenant_schema("outage_later")

                    health = await http.get("/api/v1/health")
                    assert health.status_code == 503
                    assert health.json()["dependencies"]["postgresql"]["status"] == "unhealthy"

                    # pgserver keeps one server object per data directory and a second
                    # EmbeddedPostgres would get that stopped object back, so restart through it.
                    await asyncio.to_thread(pg._server.start)
                    assert pg._server.get_uri() == pg.dsn
                    for _ in range(50):
                        back = await http.post(
                            "/api/v1/query", json=query, headers=headers("outage-svc")
                        )
                        if back.status_code == 200:
                            break
                        assert back.status_code == 503, back.text
                        await asyncio.sleep(0.2)
                    assert back.status_code == 200, back.text
                    late = await http.post(
                        "/api/v1/query", json=query, headers=headers("outage-late")
                    )
                    assert late.status_code == 200, late.text
                    assert (await client.fetch_all("SELECT 1")).rows == [(1,)]
                    assert (await http.get("/api/v1/health")).json()["status"] == "healthy"

                    # The audit writer outlived the outage and writes again.
                    for _ in range(50):
                        written = core.audit.written
                        await core.audit.record(AuditEvent(action="outage.check"))
                        await core.audit.flush()
                        if core.audit.written > written:
                            break
                        await asyncio.sleep(0.2)
                    assert core.audit.written > written
