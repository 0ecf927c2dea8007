"""What routing and tenant validation cost: the same primary-key lookup, in one run, by

  1. direct asyncpg on the tenant's own role (baseline: prepared statement, one pool),
  2. the query core in-process (token check, tenant lookup, SQL guard, scopes, typed params,
     tenant pool, audit),
  3. the REST front end in-process (the same, plus FastAPI/JSON), over an ASGI transport.

Prints the median and p99 latency of each at concurrency 1, and the overhead against the
baseline. The seed's budget for routing and tenant validation is < 2 ms.

    .venv/bin/python bench/query_core.py [--n 2000]

Uses the embedded PostgreSQL in a temporary directory, or DBSVC_BENCH_POSTGRES_URL.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import httpx
import uvloop

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.postgres.pools import TenantConnection
from database_service.query import TenantContext

SQL = "SELECT user_id, email, subscription_tier FROM users WHERE user_id = $1"


async def measure(n: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    for i in range(min(200, n)):  # warm caches and pools
        await call(i)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def report(name: str, samples: list[float], baseline: float | None) -> float:
    median = statistics.median(samples)
    p99 = sorted(samples)[int(len(samples) * 0.99) - 1]
    extra = (
        ""
        if baseline is None
        else f"   overhead {median - baseline:+.3f} ms  ratio {median / baseline:.2f}x"
    )
    print(f"{name:<34} median {median:7.3f} ms   p99 {p99:7.3f} ms{extra}")
    return median


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overrides: dict[str, object] = {"data_dir": Path(tmp), "nats_embedded": False}
        if url := os.environ.get("DBSVC_BENCH_POSTGRES_URL"):
            overrides["postgres_url"] = url
        settings = Settings.load(**overrides)
        async with Application(settings, start_nats=False) as core:
            tenant = await core.tenants.create("bench")
            await core.owner_pool.execute(
                f"INSERT INTO {tenant.schema_name}.users (user_id, email, subscription_tier)"
                " SELECT 'u' || g, 'u' || g || '@x', 'pro' FROM generate_series(1, 10000) g"
            )
            await core.services.register(
                "bench", tenants=["bench"], scopes=[Scope.READ], with_secret=False
            )
            token = core.tokens.issue(
                "bench", tenants=["bench"], scopes=[Scope.READ], ttl_seconds=3600
            )
            principal = await core.authenticator.authenticate(f"Bearer {token}")
            ctx = TenantContext("bench")
            password = core.secret_box.open(tenant.role_secret)
            direct = await asyncpg.create_pool(
                core.endpoints.postgres_dsn,
                user=tenant.role_name,
                password=password,
                min_size=1,
                max_size=1,
                # The service's release reset (tenants may not call pg_advisory_unlock_all).
                connection_class=TenantConnection,
            )
            assert direct is not None
            transport = httpx.ASGITransport(app=create_http_app(core))
            headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": "bench"}
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:

                async def by_asyncpg(i: int) -> object:
                    # A read-only transaction, as the service runs read-scope callers.
                    async with direct.acquire() as conn, conn.transaction(readonly=True):
                        return await conn.fetch(SQL, f"u{i % 10000 + 1}")

                async def by_core(i: int) -> object:
                    return await core.executor.execute(principal, ctx, SQL, [f"u{i % 10000 + 1}"])

                async def by_rest(i: int) -> object:
                    response = await http.post(
                        "/api/v1/query",
                        json={"sql": SQL, "params": [f"u{i % 10000 + 1}"]},
                        headers=headers,
                    )
                    assert response.status_code == 200, response.text
                    return response

                print(f"PK lookup, concurrency 1, n={n}, tenant {tenant.tenant_id}")
                baseline = report(
                    "direct asyncpg (tenant role)", await measure(n, by_asyncpg), None
                )
                report("query core (in-process)", await measure(n, by_core), baseline)
                report("REST /api/v1/query (ASGI)", await measure(n, by_rest), baseline)
            await direct.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    uvloop.run(main(parser.parse_args().n))
