"""``database-service serve`` with ``DBSVC_WORKERS=2``: two serving processes on the same gRPC and
HTTP ports under one supervisor.

Requests over both front ends land on both workers; ``/metrics`` and the health document add up
what every worker did; PostgreSQL never sees more of a tenant's connections than the configured
per-tenant cap, whichever worker holds them; a worker killed with SIGKILL is replaced while the
other keeps serving; SIGTERM stops the workers and the embedded servers and exits 0.

One instance serves the whole module (starting one costs seconds); the tests run in order and
the last one stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import psutil
import pytest

from database_service_client._proto import database_service_pb2, database_service_pb2_grpc
from tests.e2e.test_serve import Served, children_left, postmaster_running

PER_TENANT_CAP = 4  # DBSVC_POOL_MAX_PER_TENANT: 2 connections per worker


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    # Not under pytest's tmp_path (see test_serve.data_dir).
    with tempfile.TemporaryDirectory(prefix="dbsvc-workers-") as tmp:
        server = Served(
            Path(tmp) / "data",
            env={
                "DBSVC_WORKERS": "2",
                "DBSVC_POOL_MAX_PER_TENANT": str(PER_TENANT_CAP),
                "DBSVC_GRPC_SHUTDOWN_GRACE_SECONDS": "2",
            },
        )
        try:
            server.wait_for_line("Database Service is running.", timeout=90)
            server.wait_healthy(timeout=30)
            yield server
        finally:
            server.kill()


def health(served: Served) -> dict[str, Any]:
    """The full document, over a new connection (so any worker may answer)."""
    response = httpx.get(f"{served.base}/api/v1/health", headers=served.admin(), timeout=10)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def grpc_health(served: Served) -> dict[str, Any]:
    """The same document over gRPC ``HealthCheck``, on a new channel (a new connection)."""
    target = f"127.0.0.1:{served.env['DBSVC_GRPC_PORT']}"
    with grpc.insecure_channel(target) as channel:
        stub = database_service_pb2_grpc.DatabaseServiceStub(channel)
        reply = stub.HealthCheck(
            database_service_pb2.HealthRequest(),
            metadata=[("authorization", served.admin()["Authorization"])],
            timeout=10,
        )
    document: dict[str, Any] = json.loads(reply.document_json)
    return document


def worker_pids(document: dict[str, Any]) -> set[int]:
    return {p["pid"] for p in document["workers"]["processes"]}


def metric(served: Served, name: str, **labels: str) -> float:
    """The value of one sample of ``/metrics`` (0 when absent)."""
    response = httpx.get(f"{served.base}/metrics", headers=served.admin(), timeout=10)
    assert response.status_code == 200, response.text
    for line in response.text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def tenant_with_token(served: Served, tenant_id: str) -> dict[str, str]:
    """Create a tenant and a service for it (over REST); the headers to query as it."""
    base, admin = served.base, served.admin()
    created = httpx.post(
        f"{base}/api/v1/admin/schema/create", json={"tenant_id": tenant_id}, headers=admin
    )
    assert created.status_code == 201, created.text
    service = httpx.post(
        f"{base}/api/v1/admin/services",
        json={
            "service": f"svc-{tenant_id}",
            "tenants": [tenant_id],
            "scopes": ["read", "write"],
            "with_secret": False,
        },
        headers=admin,
    )
    assert service.status_code in (200, 201), service.text
    token = httpx.post(
        f"{base}/api/v1/admin/tokens", json={"service": f"svc-{tenant_id}"}, headers=admin
    )
    assert token.status_code in (200, 201), token.text
    return {"Authorization": f"Bearer {token.json()['access_token']}", "X-Tenant-Id": tenant_id}


def query(served: Served, headers: dict[str, str], sql: str) -> httpx.Response:
    return httpx.post(f"{served.base}/api/v1/query", json={"sql": sql}, headers=headers, timeout=30)


def test_requests_over_both_front_ends_land_on_every_worker(served: Served) -> None:
    document = health(served)
    workers = document["workers"]
    assert workers["count"] == 2
    assert [p["index"] for p in workers["processes"]] == [0, 1]
    assert all(p["up"] for p in workers["processes"]), workers
    assert [p["primary"] for p in workers["processes"]] == [True, False]
    assert workers["restarts"] == 0
    # The workers use the supervisor's embedded servers, and say so.
    assert document["dependencies"]["postgresql"]["embedded"] is True
    assert document["dependencies"]["nats"]["embedded"] is True
    assert document["system_resources"]["memory_usage_mb"] > 0
    pids = worker_pids(document)
    assert len(pids) == 2 and served.process.pid not in pids
    assert f"workers    2 processes (pids {', '.join(map(str, sorted(pids)))}" in served.output()
    # The kernel spreads new connections over the workers' sockets (SO_REUSEPORT).
    over_http = {health(served)["workers"]["answered_by"]["pid"] for _ in range(30)}
    over_grpc = {grpc_health(served)["workers"]["answered_by"]["pid"] for _ in range(30)}
    assert over_http == pids, (over_http, pids)
    assert over_grpc == pids, (over_grpc, pids)


def test_metrics_and_health_add_up_what_every_worker_did(served: Served) -> None:
    labels = {"front_end": "http", "operation": "/api/v1/health", "code": "ok"}
    before = metric(served, "dbsvc_requests_total", **labels)
    answered = [health(served)["workers"]["answered_by"]["pid"] for _ in range(20)]
    assert len(set(answered)) == 2, answered  # both workers counted some of them
    # One figure for the instance: each worker's counter file, added up.
    assert metric(served, "dbsvc_requests_total", **labels) - before == 20
    # The global cap across the workers' pools is the configured one (64, split 32 + 32).
    assert metric(served, "dbsvc_pool_connections_max") == 64

    # Request figures of the last minute: one tenant's queries, whichever worker ran them.
    headers = tenant_with_token(served, "figures")
    for _ in range(20):
        assert query(served, headers, "SELECT 1").status_code == 200
    time.sleep(1.5)  # each worker's snapshot is at most a second old
    performance = httpx.get(
        f"{served.base}/api/v1/metrics/performance", headers=headers, timeout=10
    ).json()
    per_worker = [p["requests_last_60s"] for p in health(served)["workers"]["processes"]]
    assert performance["requests"] == 20, performance
    assert performance["p50_ms"] > 0 and performance["p99_ms"] >= performance["p50_ms"]
    assert all(n > 0 for n in per_worker), per_worker  # both workers ran some
    document = health(served)
    assert document["performance_metrics"]["requests_last_60s"] >= 20


async def test_a_tenants_connections_never_exceed_its_cap_across_workers(
    served: Served,
) -> None:
    headers = await asyncio.to_thread(tenant_with_token, served, "capped")
    async with httpx.AsyncClient(base_url=served.base, headers=served.admin()) as admin:
        tenants = (await admin.get("/api/v1/admin/tenants")).json()
    role = next(t["role"] for t in tenants["tenants"] if t["tenant_id"] == "capped")
    owner = await asyncpg.connect(f"postgresql://postgres@/postgres?host={served.data_dir / 'pg'}")
    highest = every = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal highest, every
        while not done.is_set():
            # The OLTP pools' connections (queries); the analytics and bulk pools have caps of
            # their own (here the slow-query log's plans use an analytics connection).
            oltp, total = await owner.fetchrow(
                "SELECT count(*) FILTER (WHERE application_name = 'dbsvc-tenant-oltp'), count(*)"
                " FROM pg_stat_activity WHERE usename = $1",
                role,
            )
            highest, every = max(highest, oltp), max(every, total)
            await asyncio.sleep(0.02)

    # No keep-alive: every request opens a connection of its own, which either worker accepts.
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=None)
    try:
        async with httpx.AsyncClient(base_url=served.base, limits=limits, timeout=60) as http:
            watcher = asyncio.create_task(watch())
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/api/v1/query", json={"sql": "SELECT pg_sleep(0.4)"}, headers=headers
                    )
                    for _ in range(16)
                )
            )
            done.set()
            await watcher
    finally:
        await owner.close()
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses]
    assert highest <= PER_TENANT_CAP, highest
    assert highest > PER_TENANT_CAP // 2, highest  # both workers held connections at once
    assert every <= PER_TENANT_CAP + 2 + 2, every  # and the analytics and bulk pools' (2 each)


def wait_until_its_sockets_are_closed(pid: int, timeout: float = 10) -> None:
    """Until the killed process's files are released, its listening sockets are still in the
    ports' SO_REUSEPORT groups: a connection the kernel hands one of them in that moment is
    reset when the socket closes (the client sees ECONNRESET and retries; it was never
    accepted, so nothing was lost). Neither the leader's zombie state (its other threads may
    still be exiting with the files open) nor an empty ``/proc/<pid>/fd`` is enough: the last
    thread drops its file table before the sockets' final release runs (deferred to its exit
    work), and a reset was seen in that gap. The supervisor reaps the worker only after all of
    that is done, so wait until ``/proc/<pid>`` is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} not reaped {timeout} s after SIGKILL")


def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(served: Served) -> None:
    headers = tenant_with_token(served, "steady")
    labels = {"front_end": "http", "operation": "/api/v1/health", "code": "ok"}
    before = health(served)["workers"]["processes"]
    counted = metric(served, "dbsvc_requests_total", **labels)
    victim, survivor = before[0]["pid"], before[1]["pid"]  # the primary goes
    os.kill(victim, signal.SIGKILL)
    wait_until_its_sockets_are_closed(victim)

    # Until the replacement serves, every request (a new connection each) is answered: by the
    # survivor (or by the replacement as soon as it listens), never lost with the dead one.
    served_meanwhile = 0
    deadline = time.monotonic() + 90
    while True:
        document = health(served)
        assert grpc_health(served)["status"] in ("healthy", "degraded")
        response = query(served, headers, "SELECT 1 AS one")
        assert response.status_code == 200, response.text
        assert response.json()["rows"] == [[1]]
        primary = document["workers"]["processes"][0]
        if primary["pid"] != victim and primary["up"]:
            break
        assert document["workers"]["answered_by"]["pid"] != victim
        served_meanwhile += 1
        assert time.monotonic() < deadline, served.output()
    assert served_meanwhile > 0  # the test did ask during the replacement
    replacement = primary["pid"]
    assert primary["restarts"] == 1 and primary["last_exit"] == "killed by SIGKILL", primary
    assert document["workers"]["restarts"] == 1
    assert document["workers"]["processes"][1] | {"requests_last_60s": None} == before[1] | {
        "requests_last_60s": None
    }
    assert f"worker 0 (pid {victim}) ended (killed by SIGKILL)" in served.output()
    # The replacement serves too, and the dead worker's counts stay in the instance's totals.
    answered = {health(served)["workers"]["answered_by"]["pid"] for _ in range(30)}
    assert answered == {replacement, survivor}, answered
    assert metric(served, "dbsvc_requests_total", **labels) >= counted + served_meanwhile


def test_sigterm_stops_the_workers_and_the_embedded_servers(served: Served) -> None:
    pids = worker_pids(health(served))
    code, output = served.stop(signal.SIGTERM)
    assert code == 0, output
    assert "Database Service stopped." in output
    assert "Traceback" not in output, output
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert not postmaster_running(served.data_dir)
    assert children_left(served.data_dir) == []


def test_one_worker_is_one_process() -> None:
    """``DBSVC_WORKERS=1``: ``serve`` itself serves, as before there were workers."""
    with tempfile.TemporaryDirectory(prefix="dbsvc-workers-") as tmp:
        single = Served(Path(tmp) / "data", env={"DBSVC_WORKERS": "1"})
        try:
            single.wait_for_line("Database Service is running.", timeout=90)
            document = single.wait_healthy(timeout=30)
            assert health(single)["workers"] == {
                "count": 1,
                "answered_by": {"index": 0, "pid": single.process.pid},
                "restarts": 0,
                "processes": [{"index": 0, "pid": single.process.pid, "up": True, "restarts": 0}],
            }
            assert document["status"] == "healthy"
            children = psutil.Process(single.process.pid).children()
            assert not [c for c in children if "database_service.cli" in " ".join(c.cmdline())]
            assert "  workers    " not in single.output()
            code, output = single.stop(signal.SIGTERM)
            assert code == 0, output
        finally:
            single.kill()
