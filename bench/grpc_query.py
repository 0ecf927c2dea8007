"""Direct asyncpg vs. MultiDatabaseClient → gRPC → service → PostgreSQL, in one run.

The service runs as its own process (``database-service serve``) on a private PostgreSQL that
this script starts; the baseline talks to the same PostgreSQL with a pool of the same size as the
tenant's pool in the service. For each workload and concurrency, prints throughput, p50, p99 and
the ratio to the baseline. Then bulk insert: rows/s through BulkInsert vs. asyncpg's
``copy_records_to_table``, same rows.

    .venv/bin/python bench/grpc_query.py [--seconds 5] [--rows 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvloop

from database_service.supervisor import EmbeddedPostgres, free_port
from database_service_client import MultiDatabaseClient

POOL = 8
PK = "SELECT user_id, email, subscription_tier FROM users WHERE user_id = $1"
RANGE = (
    "SELECT user_id, email, subscription_tier, created_at FROM users ORDER BY user_id LIMIT 1000"
)


async def run_load(
    call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        i = w
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - started) * 1000)
            i += concurrency

    for i in range(50):  # warm up statement caches and pools
        await call(i)
    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


def line(name: str, rps: float, lat: list[float], base: float | None) -> float:
    p50 = statistics.median(lat)
    p99 = sorted(lat)[max(0, int(len(lat) * 0.99) - 1)]
    ratio = "" if base is None else f"  {rps / base:5.2f}x of baseline throughput"
    print(f"  {name:<28} {rps:9.0f} req/s   p50 {p50:7.3f} ms   p99 {p99:7.3f} ms{ratio}")
    return rps


async def main(seconds: float, bulk_rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedPostgres(Path(tmp) / "pg") as pg:
            admin_token = secrets.token_urlsafe(32)
            http_port, grpc_port = free_port(), free_port()
            env = {
                **os.environ,
                "DBSVC_POSTGRES_URL": pg.dsn,
                "DBSVC_DATA_DIR": str(Path(tmp) / "data"),
                "DBSVC_HTTP_PORT": str(http_port),
                "DBSVC_GRPC_PORT": str(grpc_port),
                "DBSVC_NATS_EMBEDDED": "false",
                "DBSVC_BOOTSTRAP_ADMIN_TOKEN": admin_token,
                "DBSVC_POOL_MAX_PER_TENANT": str(POOL),
                "DBSVC_LOG_LEVEL": "WARNING",
            }
            service = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is polled
                [str(Path(sys.executable).parent / "database-service"), "serve"],
                env=env,
                stdout=subprocess.DEVNULL,
            )
            try:
                await bench(pg.dsn, http_port, grpc_port, admin_token, seconds, bulk_rows)
            finally:
                service.terminate()
                service.wait(30)


async def bench(
    dsn: str, http_port: int, grpc_port: int, admin_token: str, seconds: float, bulk_rows: int
) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as http:
        for _ in range(300):
            try:
                if (await http.get("/api/v1/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        created = await http.post(
            "/api/v1/admin/schema/create", json={"tenant_id": "bench"}, headers=admin
        )
        created.raise_for_status()
        await http.post(
            "/api/v1/admin/services",
            json={
                "service": "bench",
                "tenants": ["bench"],
                "scopes": ["read", "write"],
                "with_secret": False,
            },
            headers=admin,
        )
        issued = await http.post(
            "/api/v1/admin/tokens", json={"service": "bench", "ttl_seconds": 3600}, headers=admin
        )
        token = issued.json()["access_token"]

    owner = await asyncpg.connect(dsn)
    await owner.execute(
        "INSERT INTO tenant_bench.users (user_id, email, subscription_tier)"
        " SELECT 'u' || lpad(g::text, 6, '0'), 'u' || g || '@example.com', 'pro'"
        " FROM generate_series(1, 100000) g"
    )
    await owner.execute("ANALYZE tenant_bench.users")
    await owner.close()
    # The baseline: the same database, a pool of the same size, the tenant's schema.
    direct = await asyncpg.create_pool(
        dsn, min_size=POOL, max_size=POOL, server_settings={"search_path": "tenant_bench"}
    )
    assert direct is not None
    client = MultiDatabaseClient(f"127.0.0.1:{grpc_port}", "bench", token)

    def key(i: int) -> str:
        return f"u{i % 100000 + 1:06d}"

    async def direct_pk(i: int) -> Any:
        return await direct.fetch(PK, key(i))

    async def client_pk(i: int) -> Any:
        return await client.fetch_all(PK, [key(i)])

    async def direct_range(i: int) -> Any:
        return await direct.fetch(RANGE)

    async def client_range(i: int) -> Any:
        return await client.fetch_all(RANGE)

    version = await direct.fetchval("SHOW server_version")
    print(f"{seconds:g} s per measurement, pools of {POOL}, PostgreSQL {version}")
    for title, base_call, our_call in (
        ("PK lookup", direct_pk, client_pk),
        ("1,000-row read", direct_range, client_range),
    ):
        for concurrency in (1, 32):
            print(f"{title}, concurrency {concurrency}")
            rps, lat = await run_load(base_call, concurrency, seconds)
            base = line("direct asyncpg", rps, lat, None)
            rps, lat = await run_load(our_call, concurrency, seconds)
            line("MultiDatabaseClient → service", rps, lat, base)

    rows = [(f"b{i:07d}", f"b{i}@example.com", "free") for i in range(bulk_rows)]
    columns = ["user_id", "email", "subscription_tier"]
    async with direct.acquire() as conn:
        started = time.perf_counter()
        await conn.copy_records_to_table(
            "users", schema_name="tenant_bench", columns=columns, records=rows
        )
        base_rate = bulk_rows / (time.perf_counter() - started)
        await conn.execute("DELETE FROM tenant_bench.users WHERE user_id LIKE 'b%'")
    started = time.perf_counter()
    written = await client.bulk_insert("users", columns, rows, batch_size=5000)
    rate = written / (time.perf_counter() - started)
    print(f"Bulk insert of {bulk_rows} rows")
    print(f"  direct copy_records_to_table   {base_rate:9.0f} rows/s")
    print(f"  BulkInsert (client → service)  {rate:9.0f} rows/s   {rate / base_rate:5.2f}x")
    await client.close()
    await direct.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    uvloop.run(main(args.seconds, args.rows))
