"""Two service instances sharing PostgreSQL and Redis (L2 and cluster-wide invalidation): a
write through one is not served stale by the other past the invalidation lag, an L2 entry one
instance stored answers the other, and Redis going away leaves both serving (from PostgreSQL,
health saying so) until it is back."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service_client import MultiDatabaseClient
from tests.fix_pg import PgCluster
from tests.fix_redis import RedisServer
from tests.fix_service import make_settings

TTL = dt.timedelta(seconds=60)
READ = "SELECT qty FROM stock WHERE id = $1"


class Instance:
    def __init__(self, core: Application, client: MultiDatabaseClient) -> None:
        self.core = core
        self.client = client


@pytest.fixture
async def cluster(
    pg_cluster: PgCluster, tmp_path: Path, private_redis: RedisServer
) -> AsyncIterator[list[Instance]]:
    tenant = f"cl_{secrets.token_hex(4)}"
    async with AsyncExitStack() as stack:
        instances = []
        for n in range(2):
            # A Redis call's budget well past CI's scheduling delays (50 ms by default): what is
            # under test is sharing through Redis, not how fast it answers on a loaded machine.
            settings = make_settings(
                pg_cluster,
                tmp_path / f"i{n}",
                redis_url=private_redis.url,
                cache_redis_timeout_ms=1000,
            )
            core = await stack.enter_async_context(Application(settings, start_nats=False))
            if n == 0:
                await core.tenants.create(tenant)
                scopes = [Scope.READ, Scope.WRITE, Scope.ADMIN]
                await core.services.register(
                    f"svc-{tenant}", tenants=[tenant], scopes=scopes, with_secret=False
                )
                token = core.tokens.issue(
                    f"svc-{tenant}", tenants=[tenant], scopes=scopes, ttl_seconds=600
                )
            server = await stack.enter_async_context(GrpcServer(core))
            client = await stack.enter_async_context(
                MultiDatabaseClient(f"127.0.0.1:{server.port}", tenant, token, retries=0)
            )
            instances.append(Instance(core, client))
        writer = instances[0].client
        await writer.fetch_all("CREATE TABLE stock (id int PRIMARY KEY, qty int)")
        await writer.fetch_all("INSERT INTO stock SELECT g, 0 FROM generate_series(1, 50) g")
        # PostgreSQL's notifications of these writes reach both instances a moment later (and
        # invalidate once more what the writer's own invalidation did): let them land.
        await asyncio.sleep(0.5)
        yield instances


async def test_a_write_in_one_instance_is_not_served_stale_by_the_other(
    cluster: list[Instance],
) -> None:
    a, b = cluster
    lags = []
    for round_ in range(1, 21):
        key = round_ % 5 + 1
        # Cached in B first. The previous round's write is invalidated twice (the writer's own
        # message, then PostgreSQL's notification a moment later): the second may drop the
        # entry read first, on a loaded machine after B already saw the new value.
        for _ in range(100):
            await b.client.fetch_all(READ, [key], cache=TTL)
            if (await b.client.fetch_all(READ, [key], cache=TTL)).cache == "hit":
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("B never answered the read from its cache")
        await a.client.fetch_all("UPDATE stock SET qty = $2 WHERE id = $1", [key, round_])
        acknowledged = time.perf_counter()
        while True:
            seen = await b.client.fetch_all(READ, [key], cache=TTL)
            if seen.rows == [(round_,)]:
                break
            assert time.perf_counter() - acknowledged < 2.0, "stale past 2 s"
            await asyncio.sleep(0.001)
        lags.append((time.perf_counter() - acknowledged) * 1000)
    print(f"invalidation lag: p50 {statistics.median(lags):.2f} ms, max {max(lags):.2f} ms")


async def test_an_entry_one_instance_stored_answers_the_other(cluster: list[Instance]) -> None:
    a, b = cluster
    first = await a.client.fetch_all(READ, [42], cache=TTL)
    assert first.cache == "miss"
    second = await b.client.fetch_all(READ, [42], cache=TTL)
    assert (second.rows, second.cache) == (first.rows, "hit")
    assert b.core.result_cache.l2_hits >= 1


async def test_redis_going_away_leaves_the_service_serving(
    cluster: list[Instance], private_redis: RedisServer
) -> None:
    a, _ = cluster
    transport = httpx.ASGITransport(app=create_http_app(a.core))
    async with httpx.AsyncClient(transport=transport, base_url="http://a") as http:
        await a.client.fetch_all(READ, [7], cache=TTL)
        private_redis.stop()
        # Reads keep their answers (from PostgreSQL while invalidation cannot be trusted).
        for _ in range(20):
            result = await a.client.fetch_all(READ, [7], cache=TTL)
            assert result.rows == [(0,)]
        await a.client.fetch_all("UPDATE stock SET qty = 5 WHERE id = 7")
        assert (await a.client.fetch_all(READ, [7], cache=TTL)).rows == [(5,)]
        for _ in range(50):
            a.core.health.invalidate()
            document = (await http.get("/api/v1/health?detail=true")).json()
            if document["dependencies"]["dragonflydb"]["status"] == "unhealthy":
                break
            await asyncio.sleep(0.1)
        assert document["dependencies"]["dragonflydb"]["status"] == "unhealthy"
        private_redis.start()
        for _ in range(100):
            await a.client.fetch_all(READ, [7], cache=TTL)
            a.core.health.invalidate()
            document = (await http.get("/api/v1/health")).json()
            if document["dependencies"]["dragonflydb"]["status"] == "healthy":
                break
            await asyncio.sleep(0.1)
        assert document["dependencies"]["dragonflydb"]["status"] == "healthy"
        assert (await a.client.fetch_all(READ, [7], cache=TTL)).rows == [(5,)]
