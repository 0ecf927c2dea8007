"""The client-credentials exchange (``POST /api/v1/auth/token``) under attack.

scrypt costs ~75-120 ms here. It must never run on the event loop that serves REST, gRPC and
ingestion (hammering the endpoint would stall all of them), it must cost the same whether the
service exists or not (else timing lists the services), and it is rate-limited per client
address and per service name (429 ``resource_exhausted`` with Retry-After, audited).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth.tokens import everything, hash_secret
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings

OPERATOR = everything(service="test-operator")
UNLIMITED = {
    "auth_rate_per_source": 10_000.0,
    "auth_burst_per_source": 10_000,
    "auth_rate_per_service": 10_000.0,
    "auth_burst_per_service": 10_000,
    "auth_max_in_flight": 10_000,
}


async def instance(cluster: PgCluster, data_dir: Path, **overrides: Any) -> tuple[Application, Any]:
    settings = make_settings(cluster, data_dir, **overrides)
    app = Application(
        settings, start_nats=False, migrate_tenants_on_start=False, maintain_partitions=False
    )
    await app.__aenter__()
    return app, create_http_app(app)


@pytest.fixture
async def unlimited(
    pg_cluster: PgCluster, tmp_path: Path
) -> AsyncIterator[tuple[Application, Any]]:
    app, http_app = await instance(pg_cluster, tmp_path, **UNLIMITED)
    try:
        yield app, http_app
    finally:
        await app.__aexit__(None, None, None)


def client(http_app: Any, source: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=http_app, client=(source, 40_000))
    return httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test")


async def exchange(http: httpx.AsyncClient, service: str, secret: str) -> httpx.Response:
    return await http.post("/api/v1/auth/token", json={"service": service, "secret": secret})


async def a_service(core: Application) -> tuple[str, str]:
    name = f"cc-{secrets.token_hex(4)}"
    _, secret = await core.service_admin.create(OPERATOR, name, tenants=["*"], scopes="read")
    assert secret is not None
    return name, secret


async def one_hash_seconds() -> float:
    """What one scrypt costs here (the least of three: the others waited for a CPU)."""
    took = []
    for _ in range(3):
        started = time.perf_counter()
        await asyncio.to_thread(hash_secret, "x" * 43)
        took.append(time.perf_counter() - started)
    return min(took)


async def test_the_event_loop_keeps_serving_while_the_endpoint_is_hammered(
    unlimited: tuple[Application, Any],
) -> None:
    core, http_app = unlimited
    name, _ = await a_service(core)
    scrypt = await one_hash_seconds()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - started - 0.005)

    workers, each = 4, 6  # a steady hammering, not one burst
    hammered = workers * each

    async def hammer(http: httpx.AsyncClient) -> list[int]:
        return [(await exchange(http, name, "wrong")).status_code for _ in range(each)]

    async with client(http_app) as http:
        await exchange(http, name, "warm-up")  # caches, pools, the dummy hash
        tick = asyncio.create_task(ticker())
        started = time.perf_counter()
        answers = await asyncio.gather(*(hammer(http) for _ in range(workers)))
        took = time.perf_counter() - started
        stop.set()
        await tick
    assert [s for a in answers for s in a] == [401] * hammered
    assert took >= hammered * scrypt * 0.5  # every request really hashed
    # On the loop, each scrypt blocked every other coroutine for its whole duration (a stall
    # of about `scrypt` per request); on a hashing thread the loop keeps answering.
    stalls = [lag for lag in lags if lag > scrypt * 0.6]
    blocked = sum(lag for lag in lags if lag > 0.02)
    assert len(stalls) <= hammered // 6, (stalls, scrypt)
    assert blocked < hammered * scrypt * 0.2, (blocked, hammered, scrypt)


async def test_timing_does_not_tell_which_services_exist(
    unlimited: tuple[Application, Any],
) -> None:
    core, http_app = unlimited
    existing, _ = await a_service(core)
    no_secret = f"nosecret-{secrets.token_hex(4)}"
    await core.service_admin.create(
        OPERATOR, no_secret, tenants=["*"], scopes="read", with_secret=False
    )
    times: dict[str, list[float]] = {"existing": [], "no secret": [], "unknown": []}
    names = {"existing": existing, "no secret": no_secret}
    async with client(http_app) as http:
        await exchange(http, existing, "warm-up")
        for round_ in range(15):
            for kind, measured in times.items():
                name = names.get(kind, f"ghost-{round_}-{secrets.token_hex(3)}")
                started = time.perf_counter()
                response = await exchange(http, name, "wrong-secret")
                measured.append(time.perf_counter() - started)
                assert response.status_code == 401
                assert response.json()["error"]["message"] == "unknown service or wrong secret"
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    # Before: ~80 ms for an existing name, ~2 ms for an unknown one. Generous bounds: noise on
    # a busy machine, not a 40x gap.
    for kind in ("no secret", "unknown"):
        ratio = medians[kind] / medians["existing"]
        assert 0.6 < ratio < 1.6, medians


async def test_over_the_rate_limits_the_answer_is_429_with_retry_after_and_audited(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    core, http_app = await instance(
        pg_cluster,
        tmp_path,
        auth_rate_per_source=0.01,
        auth_burst_per_source=3,
        auth_rate_per_service=0.01,
        auth_burst_per_service=5,
    )
    try:
        name, secret = await a_service(core)
        since = await core.owner_pool.fetchval("SELECT now()")
        # Per source: three exchanges, then 429 whatever the name, right or wrong.
        async with client(http_app, "10.1.0.1") as one:
            assert (await exchange(one, name, secret)).status_code == 200
            assert (await exchange(one, name, "wrong")).status_code == 401
            assert (await exchange(one, "ghost-abc", "wrong")).status_code == 401
            limited = [await exchange(one, name, secret) for _ in range(3)]
        for response in limited:
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "resource_exhausted"
            assert "10.1.0.1" in response.json()["error"]["message"]
            assert int(response.headers["retry-after"]) >= 1
        # Per service: its burst is shared by every source; the fifth is the last.
        statuses = []
        for i in range(4):
            async with client(http_app, f"10.2.0.{i}") as other:
                statuses.append((await exchange(other, name, "wrong")).status_code)
        assert statuses == [401, 401, 401, 429], statuses
        # An unknown name is limited exactly like an existing one (no oracle either way).
        ghost = f"ghost-{secrets.token_hex(4)}"
        ghost_statuses = []
        for i in range(6):
            async with client(http_app, f"10.3.0.{i}") as other:
                ghost_statuses.append((await exchange(other, ghost, "wrong")).status_code)
        assert ghost_statuses == [401] * 5 + [429], ghost_statuses
        # Audited: refusals are recorded (a run of them once a second, with a count).
        await core.audit.flush()
        rows = await core.owner_pool.fetch(
            f"SELECT * FROM {core.settings.control_schema}.audit_log"
            " WHERE action = 'auth.token' AND code = 'resource_exhausted' AND at >= $1",
            since,
        )
        details = " | ".join(r["detail"] for r in rows)
        assert rows and all(r["outcome"] == "denied" for r in rows)
        assert "from 10.1.0.1" in details and f"for service '{name}'" in details
        assert len(rows) < 5  # the three refusals from 10.1.0.1 made one record, not three
    finally:
        await core.__aexit__(None, None, None)
