"""The stale fallback (the seed's DatabaseFallbackManager's cached tier): while PostgreSQL is
down, a read that allows it gets the last cached answer, marked stale with its age, over gRPC
and REST; a read that does not allow it, or that was never cached, is 503/UNAVAILABLE as ever;
writes are never faked. Fresh answers again once PostgreSQL is back."""

from __future__ import annotations

import asyncio
import datetime as dt
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
from database_service.supervisor import EmbeddedPostgres
from tests.fix_service import ADMIN_TOKEN, MASTER_KEY

SHORT = dt.timedelta(milliseconds=200)
READ = "SELECT qty FROM stock WHERE id = $1"


async def test_a_stale_answer_stands_in_while_postgres_is_down() -> None:
    with tempfile.TemporaryDirectory(prefix="dbsvc-stale-") as tmp:
        async with EmbeddedPostgres(Path(tmp) / "pg", stop_on_exit=True) as pg:
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
                await core.tenants.create("stale")
                scopes = [Scope.READ, Scope.WRITE, Scope.ADMIN]
                await core.services.register(
                    "stale-svc", tenants=["stale"], scopes=scopes, with_secret=False
                )
                token = core.tokens.issue(
                    "stale-svc", tenants=["stale"], scopes=scopes, ttl_seconds=600
                )
                headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": "stale"}
                transport = httpx.ASGITransport(app=create_http_app(core))
                async with (
                    httpx.AsyncClient(transport=transport, base_url="http://s") as http,
                    GrpcServer(core) as grpc_server,
                    database_service_client.MultiDatabaseClient(
                        f"127.0.0.1:{grpc_server.port}", "stale", token, retries=0
                    ) as client,
                ):
                    await client.fetch_all("CREATE TABLE stock (id int PRIMARY KEY, qty int)")
                    await client.fetch_all("INSERT INTO stock VALUES (1, 10)")
                    cached = await client.fetch_all(READ, [1], cache=SHORT)
                    assert (cached.rows, cached.cache) == ([(10,)], "miss")
                    body = {"sql": READ, "params": [1], "cache_ttl_ms": 200}
                    rest = await http.post("/api/v1/query", json=body, headers=headers)
                    assert rest.json()["cache"]["status"] == "miss", rest.text
                    await asyncio.sleep(0.3)  # past the TTL: only the stale store has them

                    await asyncio.to_thread(pg._server.stop)
                    # Down for longer than the tenant registry keeps a record fresh (2 s): the
                    # fallback must not depend on PostgreSQL answering who the tenant is.
                    await asyncio.sleep(2.5)

                    stale = await client.fetch_all(READ, [1], cache=SHORT, allow_stale=True)
                    assert (stale.rows, stale.cache, stale.stale) == ([(10,)], "stale", True)
                    assert stale.cache_age_ms >= 2800
                    rest = await http.post(
                        "/api/v1/query", json={**body, "allow_stale": True}, headers=headers
                    )
                    assert rest.status_code == 200, rest.text
                    assert rest.json()["cache"]["stale"] is True
                    assert rest.json()["rows"] == [[10]]
                    # Not allowed, never cached, or a write: unavailable as ever.
                    with pytest.raises(database_service_client.Unavailable):
                        await client.fetch_all(READ, [1], cache=SHORT)
                    with pytest.raises(database_service_client.Unavailable):
                        await client.fetch_all(READ, [2], cache=SHORT, allow_stale=True)
                    write = await http.post(
                        "/api/v1/query",
                        json={"sql": "UPDATE stock SET qty = 0 WHERE id = 1", "allow_stale": True},
                        headers=headers,
                    )
                    assert write.status_code == 503, write.text

                    await asyncio.to_thread(pg._server.start)
                    for _ in range(50):
                        try:
                            fresh = await client.fetch_all(READ, [1], cache=SHORT, allow_stale=True)
                        except database_service_client.Unavailable:
                            await asyncio.sleep(0.2)
                            continue
                        if not fresh.stale:
                            break
                        await asyncio.sleep(0.2)
                    assert (fresh.rows, fresh.stale) == ([(10,)], False)
