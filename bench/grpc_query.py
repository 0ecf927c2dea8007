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
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import uvloop
from harness import running_service  # bench/ is on sys.path when run as a script

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
    deadline = started + seconds
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return len(latencies) / (time.perf_counter() - started), latencies


def line(name: str, rps: float, lat: list[float], base: float | None) -> float:
    p50 = statistics.median(lat)
    p99 = sorted(lat)[max(0, int(len(lat) * 0.99) - 1)]
    ratio = "" if base is None else f"  {rps / base:5.2f}x of baseline throughput"
    print(f"  {name:<28} {rps:9.0f} req/s   p50 {p50:7.3f} ms   p99 {p99:7.3f} ms{ratio}")
    return rps


async def main(seconds: float, bulk_rows: int) -> None:
    async with running_service(DBSVC_POOL_MAX_PER_TENANT=str(POOL)) as service:
        token = await service.tenant_token("bench", ["read", "write"])
        await bench(service.dsn, service.grpc, token, seconds, bulk_rows)


async def bench(dsn: str, grpc_target: str, token: str, seconds: float, bulk_rows: int) -> None:
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
    client = MultiDatabaseClient(grpc_target, "bench", token)

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
