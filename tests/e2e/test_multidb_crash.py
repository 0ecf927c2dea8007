"""A crash between the commit of a multi-store operation and the application of its outbox loses
nothing and applies nothing twice: ``database-service serve`` (embedded PostgreSQL: pgvector,
the PostgreSQL graph, the embedded key-value store) is SIGKILLed while its applier is stalled by
the test hook ``DBSVC_TEST_MULTIDB_APPLY_DELAY_SECONDS`` (after the commit, before the key-value
store saw its write), started again without it, and every store converges — the ``incr`` part
exactly once. The vector and graph writes committed with the PostgreSQL part (one
transaction), so they are there even before the restart."""

from __future__ import annotations

import asyncio
import base64
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.multidb.outbox import APPLY_DELAY_ENV
from database_service_client import MultiDatabaseClient
from database_service_client import Unavailable as ClientUnavailable
from tests.e2e.test_serve import _PORTS, Served, children_left


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path (see tests/e2e/test_serve.py: the embedded PostgreSQL's user
    # must traverse every parent directory).
    with tempfile.TemporaryDirectory(prefix="dbsvc-multidb-") as tmp:
        yield Path(tmp) / "data"


def _tenant_token(served: Served, tenant_id: str) -> str:
    admin = served.admin()
    created = httpx.post(
        f"{served.base}/api/v1/admin/schema/create", json={"tenant_id": tenant_id}, headers=admin
    )
    assert created.status_code == 201, created.text
    scopes = ["read", "write", "admin"]
    service = httpx.post(
        f"{served.base}/api/v1/admin/services",
        json={
            "service": "mdb-crash",
            "tenants": [tenant_id],
            "scopes": scopes,
            "with_secret": False,
        },
        headers=admin,
    )
    assert service.status_code == 201, service.text
    token = httpx.post(
        f"{served.base}/api/v1/admin/tokens",
        json={"service": "mdb-crash", "ttl_seconds": 3600},
        headers=admin,
    )
    assert token.status_code == 200, token.text
    return str(token.json()["access_token"])


async def _entries(
    http: httpx.AsyncClient, base: str, headers: dict[str, str]
) -> list[dict[str, Any]]:
    response = await http.get(f"{base}/api/v1/multi-db/outbox", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    return list(response.json()["entries"])


async def test_a_kill_between_commit_and_apply_converges_exactly_once(data_dir: Path) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        await _converges(http, data_dir)


async def _converges(http: httpx.AsyncClient, data_dir: Path) -> None:
    tenant_id = "crashmdb"
    first = Served(data_dir, env={APPLY_DELAY_ENV: "600", "DBSVC_WORKERS": "1"})
    try:
        await asyncio.to_thread(first.wait_healthy, 60)
        token = await asyncio.to_thread(_tenant_token, first, tenant_id)
        headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id}
        made = await http.post(
            f"{first.base}/api/v1/vector/collections",
            json={"name": "Signals", "dimension": 3, "properties": {"symbol": "text"}},
            headers=headers,
        )
        assert made.status_code == 201, made.text
        object_id = str(uuid.uuid4())
        operation = {
            "postgresql": {
                "query": "INSERT INTO trading_signals (signal_id, symbol, action)"
                " VALUES (:signal_id, :symbol, :action)",
                "params": {"signal_id": "sig-crash", "symbol": "EURUSD", "action": "buy"},
                "company_id": tenant_id,
            },
            "dragonflydb": {"operation": "incr", "key": "signals:count", "by": 7},
            "vector": {
                "operation": "upsert",
                "class": "Signals",
                "objects": [{"id": object_id, "vector": [0.1, 0.2, 0.3], "properties": {}}],
            },
            "graph": {
                "operation": "upsert",
                "vertices": [{"collection": "signals", "key": "sig-crash"}],
            },
        }
        grpc_target = f"127.0.0.1:{first.env['DBSVC_GRPC_PORT']}"
        async with MultiDatabaseClient(grpc_target, tenant_id, token, retries=0) as client:
            call = asyncio.create_task(client.execute_multi_db_operation(operation))
            # Committed: the PostgreSQL row, the vector and graph writes (the same transaction)
            # and the key-value write's pending entry; the applier is stalled.
            deadline = time.monotonic() + 30
            while len(await _entries(http, first.base, headers)) < 1:
                assert time.monotonic() < deadline, first.output()
                await asyncio.sleep(0.1)
            assert {e["status"] for e in await _entries(http, first.base, headers)} == {"pending"}
            committed = await http.get(
                f"{first.base}/api/v1/vector/collections/Signals/objects/{object_id}",
                headers=headers,
            )
            assert committed.status_code == 200, committed.text  # with the PostgreSQL part
            first.kill(leave_children=True)  # as the OOM killer would: no chance to apply
            with pytest.raises(ClientUnavailable):
                await call
    finally:
        first.kill(leave_children=True)

    again = Served(data_dir, env={k: first.env[k] for k in _PORTS})
    try:
        await asyncio.to_thread(again.wait_healthy, 60)
        deadline = time.monotonic() + 30
        while {e["status"] for e in await _entries(http, again.base, headers)} != {"applied"}:
            assert time.monotonic() < deadline, again.output()
            await asyncio.sleep(0.2)
        entries = await _entries(http, again.base, headers)
        assert [(e["store"], e["attempts"]) for e in entries] == [("dragonflydb", 1)]
        await asyncio.sleep(2.5)  # more passes of the background applier change nothing
        kv = await http.post(
            f"{again.base}/api/v1/kv/get", json={"key": "signals:count"}, headers=headers
        )
        assert kv.status_code == 200, kv.text
        body = kv.json()
        value = body["value"] if body["encoding"] == "utf-8" else base64.b64decode(body["value"])
        assert value in ("7", b"7")  # incr by 7, exactly once
        got = await http.get(
            f"{again.base}/api/v1/vector/collections/Signals/objects/{object_id}", headers=headers
        )
        assert got.status_code == 200, got.text
        vertex = await http.get(
            f"{again.base}/api/v1/graph/vertices/signals/sig-crash", headers=headers
        )
        assert vertex.status_code == 200, vertex.text
        rows = await http.post(
            f"{again.base}/api/v1/query",
            json={"sql": "SELECT count(*) FROM trading_signals", "tenant_id": tenant_id},
            headers=headers,
        )
        assert rows.status_code == 200, rows.text
        assert rows.json()["rows"] == [[1]]
        code, output = await asyncio.to_thread(again.stop)
        assert code == 0, output
    finally:
        again.kill()
    assert children_left(data_dir) == []
