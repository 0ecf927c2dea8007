"""Direct asyncpg vs. MultiDatabaseClient → gRPC → service → PostgreSQL vs. a bare gRPC echo,
in one run.

The service runs as its own process (``database-service serve``) on a private PostgreSQL that
this script starts; the baseline talks to the same PostgreSQL with a pool of the same size as the
tenant's pool in the service. The echo (``--echo-server``, this script) is the floor of the
stack: a trivial DatabaseService in its own process, same channel options, answering with the
service's own response bytes for the same request, driven by the same client the same way. For each
workload and concurrency: throughput, p50, p99 and the ratios to direct asyncpg and to the echo.
Next to the echo, the floor of any Python gateway: the same echo running each statement on one
of 8 asyncpg connections first (``--pg``; no authentication, tenancy, guard, limits, encoding or
bookkeeping), and the service's ratio to it. Then a 1,000,000-row stream (``execute_query``)
against an asyncpg cursor, with the service's memory before and after, BulkInsert against
``copy_records_to_table``, PK lookups over TLS against plaintext, and PK lookups at c=32 with the calls spread over 1, 2 and 4 connections
(echo and service alike; the workers' CPU shows how the kernel spread the connections).

The last line is one JSON object of the figures (``{"bench": "grpc_query", ...}``).

    .venv/bin/python bench/grpc_query.py [--seconds 5] [--rows 200000] [--stream-rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import uvloop
from harness import (  # bench/ is on sys.path as a script
    closed_loop,
    cpu_seconds,
    p99,
    reporting,
    rss_bytes,
    running_service,
)

from database_service.supervisor import free_port
from database_service_client import MultiDatabaseClient, TlsOptions
from database_service_client._proto import database_service_pb2 as pb

POOL = 8
BULK_ROUNDS = 3
PK = "SELECT user_id, email, subscription_tier FROM users WHERE user_id = $1"
RANGE = (
    "SELECT user_id, email, subscription_tier, created_at FROM users ORDER BY user_id LIMIT 1000"
)
STREAM = "SELECT g, md5(g::text) AS h FROM generate_series(1, $1::int) AS g"


def key(i: int) -> str:
    """The ``i``-th PK lookup's key, over the 100,000 users ``bench`` loads."""
    return f"u{i % 100000 + 1:06d}"


@dataclass
class Figures:
    rps: float
    p50: float
    p99: float


async def run_load(
    call: Callable[[int], Awaitable[Any]], concurrency: int, seconds: float
) -> Figures:
    rps, latencies = await closed_loop([call] * concurrency, seconds)
    return Figures(rps, statistics.median(latencies), p99(latencies))


def line(name: str, f: Figures, direct: Figures | None = None, echo: Figures | None = None) -> None:
    ratios = ""
    if direct is not None:
        ratios += f"  {f.rps / direct.rps:5.2f}x direct"
    if echo is not None:
        ratios += f"  {f.rps / echo.rps:5.2f}x echo"
    print(f"  {name:<30} {f.rps:8.0f} req/s  p50 {f.p50:7.3f} ms  p99 {f.p99:7.3f} ms{ratios}")


async def serve_echo(
    port: int, small: bytes, large: bytes, dsn: str | None = None, schema: str | None = None
) -> None:
    """The echo's process: a DatabaseService answering every ``Query`` and ``ExecuteQuery``
    with the service's own bytes for the same request (``LIMIT 1000`` in the SQL: the large
    answer), with the service's channel options (``api/grpc/server.py``), on grpc.aio.

    With ``dsn`` it is the floor of any Python gateway instead: each ``Query`` is decoded and
    its statement run on one of ``POOL`` asyncpg connections (on the tenant's schema), whose
    rows are thrown away for the recorded answer. No authentication, tenancy, SQL guard,
    limits, encoding or bookkeeping: what gRPC and one asyncpg round trip cost together."""

    def pick(request: bytes) -> bytes:
        return large if b"LIMIT 1000" in request else small

    # A list of connections, not asyncpg's pool (whose acquire and release cost more than the
    # service's own hand-over): the leanest way to share 8 connections among callers.
    idle: list[asyncpg.Connection] = []
    waiting: collections.deque[asyncio.Future[asyncpg.Connection]] = collections.deque()
    if dsn is not None:
        idle = [
            await asyncpg.connect(dsn, server_settings={"search_path": schema or ""})
            for _ in range(POOL)
        ]

    async def query(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if dsn is not None:
            decoded = pb.QueryRequest.FromString(request)
            if idle:
                conn = idle.pop()
            else:
                waiting.append(asyncio.get_running_loop().create_future())
                conn = await waiting[-1]
            try:
                await conn.fetch(decoded.sql, *[p.string_value for p in decoded.params])
            finally:
                if waiting:
                    waiting.popleft().set_result(conn)
                else:
                    idle.append(conn)
        return pick(request)

    async def execute_query(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield pick(request)

    handler = grpc.method_handlers_generic_handler(
        "database_service.v1.DatabaseService",
        {
            "Query": grpc.unary_unary_rpc_method_handler(query),
            "ExecuteQuery": grpc.unary_stream_rpc_method_handler(execute_query),
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 * 1_048_576),
            ("grpc.max_send_message_length", 16 * 1_048_576),
            ("grpc.max_concurrent_streams", 256),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


@contextlib.asynccontextmanager
async def echo_server(
    small: bytes, large: bytes, *, dsn: str | None = None, schema: str | None = None
) -> AsyncIterator[str]:
    """The echo in a process of its own (this script, ``--echo-server``); with ``dsn``, the
    echo that runs each statement on asyncpg first (``--pg``, see ``serve_echo``)."""
    with tempfile.TemporaryDirectory() as tmp:
        await asyncio.to_thread(Path(tmp, "small").write_bytes, small)
        await asyncio.to_thread(Path(tmp, "large").write_bytes, large)
        port = free_port()
        command = [
            sys.executable, __file__, "--echo-server", str(port), f"{tmp}/small", f"{tmp}/large"
        ]  # fmt: skip
        if dsn is not None:
            command += ["--pg", dsn, schema or ""]
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is read below
            command, stdout=subprocess.PIPE
        )
        try:
            assert process.stdout is not None
            await asyncio.to_thread(process.stdout.readline)
            yield f"127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(10)


async def recorded(target: str, token: str, sql: str, params: list[Any]) -> bytes:
    """The service's response bytes for one ``Query`` call (what the echo answers)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(
            "/database_service.v1.DatabaseService/Query",
            request_serializer=pb.QueryRequest.SerializeToString,
        )
        request = pb.QueryRequest(sql=sql, row_encoding=pb.ROW_ENCODING_PACKED)
        for value in params:
            request.params.add(string_value=value)
        metadata = (("authorization", f"Bearer {token}"), ("x-tenant-id", "bench"))
        response: bytes = await call(request, metadata=metadata)
        return response


async def main(
    seconds: float, bulk_rows: int, stream_rows: int, only: str | None, figures: dict[str, Any]
) -> None:
    async with running_service(DBSVC_POOL_MAX_PER_TENANT=str(POOL)) as service:
        schema, token = await service.tenant("bench", ["read", "write"])
        if only in (None, "query"):
            figures |= await bench(service.dsn, service.grpc, service.pid, schema, token, seconds)
        if only in (None, "stream"):
            figures |= await bench_stream(
                service.dsn, service.grpc, service.pid, token, stream_rows
            )
        if only in (None, "bulk"):
            figures |= await bench_bulk(service.dsn, service.grpc, schema, token, bulk_rows)
        if only in (None, "tls"):
            figures |= await bench_tls(service.dsn, service.grpc, schema, token, seconds)
        if only in (None, "spread"):
            figures |= await bench_spread(service.grpc, service.pid, token, seconds)


async def bench(
    dsn: str, target: str, pid: int, schema: str, token: str, seconds: float
) -> dict[str, float]:
    owner = await asyncpg.connect(dsn)
    await owner.execute(
        f"INSERT INTO {schema}.users (user_id, email, subscription_tier)"
        " SELECT 'u' || lpad(g::text, 6, '0'), 'u' || g || '@example.com', 'pro'"
        " FROM generate_series(1, 100000) g"
    )
    await owner.execute(f"ANALYZE {schema}.users")
    version = await owner.fetchval("SHOW server_version")
    await owner.close()
    # The baseline: the same database, a pool of the same size, the tenant's schema.
    direct = await asyncpg.create_pool(
        dsn, min_size=POOL, max_size=POOL, server_settings={"search_path": schema}
    )
    assert direct is not None
    client = MultiDatabaseClient(target, "bench", token)
    small = await recorded(target, token, PK, ["u000001"])
    large = await recorded(target, token, RANGE, [])

    out: dict[str, float] = {}
    print(f"{seconds:g} s per measurement, pools of {POOL}, PostgreSQL {version}")
    async with (
        echo_server(small, large) as echo_target,
        echo_server(small, large, dsn=dsn, schema=schema) as floor_target,
    ):
        echo = MultiDatabaseClient(echo_target, "bench", token)
        pg_echo = MultiDatabaseClient(floor_target, "bench", token)
        for name, sql, args in (("pk", PK, True), ("range", RANGE, False)):
            for concurrency in (1, 32):

                async def by_asyncpg(i: int, sql: str = sql, args: bool = args) -> Any:
                    return await direct.fetch(sql, *([key(i)] if args else []))

                def by(c: MultiDatabaseClient, sql: str = sql, args: bool = args) -> Any:
                    async def call(i: int) -> Any:
                        return await c.fetch_all(sql, [key(i)] if args else [])

                    return call

                print(f"{'PK lookup' if name == 'pk' else '1,000-row read'}, c={concurrency}")
                base = await run_load(by_asyncpg, concurrency, seconds)
                line("direct asyncpg", base)
                floor = await run_load(by(echo), concurrency, seconds)
                line("bare gRPC echo (same client)", floor, base)
                gateway = await run_load(by(pg_echo), concurrency, seconds)
                line("echo + asyncpg (Python floor)", gateway, base, floor)
                ours = await run_load(by(client), concurrency, seconds)
                line("MultiDatabaseClient → service", ours, base, floor)
                print(f"  {'':<30} service / (echo + asyncpg): {ours.rps / gateway.rps:5.2f}x")
                prefix = f"{name}_c{concurrency}"
                out |= {
                    f"{prefix}_vs_echo_asyncpg": ours.rps / gateway.rps,
                    f"echo_asyncpg_{prefix}_vs_echo": gateway.rps / floor.rps,
                    f"{prefix}_p50_ms": ours.p50,
                    f"{prefix}_p99_ms": ours.p99,
                    f"{prefix}_rps": ours.rps,
                    f"{prefix}_vs_echo": ours.rps / floor.rps,
                    f"{prefix}_vs_direct": ours.rps / base.rps,
                    f"echo_{prefix}_p50_ms": floor.p50,
                    f"direct_{prefix}_p50_ms": base.p50,
                }
                if name == "pk":  # the names for the PK figures
                    out[f"echo_c{concurrency}_p50_ms"] = floor.p50
                    out[f"direct_c{concurrency}_p50_ms"] = base.p50
        await echo.close()
        await pg_echo.close()
    print(f"  service RSS {rss_bytes(pid) / 1e6:.0f} MB")
    await client.close()
    await direct.close()
    return out


async def bench_stream(dsn: str, target: str, pid: int, token: str, rows: int) -> dict[str, float]:
    direct = await asyncpg.connect(dsn)
    started = time.perf_counter()
    count = 0
    async with direct.transaction():
        async for _ in direct.cursor(STREAM, rows, prefetch=5000):
            count += 1
    base = count / (time.perf_counter() - started)
    await direct.close()
    client = MultiDatabaseClient(target, "bench", token, timeout=600)
    before = rss_bytes(pid)
    peak = before
    started = time.perf_counter()
    count = 0
    async for _ in client.execute_query(STREAM, [rows]):
        count += 1
        if count % 100_000 == 0:
            peak = max(peak, rss_bytes(pid))
    ours = count / (time.perf_counter() - started)
    await client.close()
    print(f"Stream of {rows} rows")
    print(f"  asyncpg cursor (prefetch 5000)  {base:9.0f} rows/s")
    print(
        f"  execute_query (client→service)  {ours:9.0f} rows/s   {ours / base:5.2f}x"
        f"   service RSS {before / 1e6:.0f} MB before, {peak / 1e6:.0f} MB peak"
    )
    return {
        "stream_rows_per_s": ours,
        "stream_vs_cursor": ours / base,
        "stream_rss_growth_mb": (peak - before) / 1e6,
    }


async def bench_bulk(
    dsn: str, target: str, schema: str, token: str, bulk_rows: int
) -> dict[str, float]:
    """Alternating rounds of the two, each into the same emptied and vacuumed table: medians."""
    rows = [(f"b{i:07d}", f"b{i}@example.com", "free") for i in range(bulk_rows)]
    columns = ["user_id", "email", "subscription_tier"]
    conn = await asyncpg.connect(dsn)
    client = MultiDatabaseClient(target, "bench", token, timeout=600)

    async def emptied() -> None:
        await conn.execute(f"DELETE FROM {schema}.users WHERE user_id LIKE 'b%'")
        await conn.execute(f"VACUUM {schema}.users")

    direct: list[float] = []
    through: list[float] = []
    for _ in range(BULK_ROUNDS):
        started = time.perf_counter()
        await conn.copy_records_to_table("users", schema_name=schema, columns=columns, records=rows)
        direct.append(bulk_rows / (time.perf_counter() - started))
        await emptied()
        started = time.perf_counter()
        written = await client.bulk_insert("users", columns, rows, batch_size=5000)
        through.append(written / (time.perf_counter() - started))
        await emptied()
    await client.close()
    await conn.close()
    base, ours = statistics.median(direct), statistics.median(through)
    print(f"Bulk insert of {bulk_rows} rows, median of {BULK_ROUNDS} alternating rounds")
    print(f"  direct copy_records_to_table   {base:9.0f} rows/s")
    print(f"  BulkInsert (client → service)  {ours:9.0f} rows/s   {ours / base:5.2f}x")
    return {"bulk_rows_per_s": ours, "bulk_vs_copy": ours / base}


async def users(dsn: str, schema: str) -> None:
    owner = await asyncpg.connect(dsn)
    if not await owner.fetchval(f"SELECT count(*) FROM {schema}.users WHERE user_id LIKE 'u%'"):
        await owner.execute(
            f"INSERT INTO {schema}.users (user_id, email, subscription_tier)"
            " SELECT 'u' || lpad(g::text, 6, '0'), 'u' || g || '@example.com', 'pro'"
            " FROM generate_series(1, 100000) g"
        )
        await owner.execute(f"ANALYZE {schema}.users")
    await owner.close()


async def bench_tls(
    dsn: str, target: str, schema: str, token: str, seconds: float
) -> dict[str, float]:
    """PK lookups at concurrency 32 over plaintext (this run's service) and over TLS (the same
    service configuration with a development certificate), alternating rounds: medians."""
    await users(dsn, schema)
    async with running_service(tls=True, DBSVC_POOL_MAX_PER_TENANT=str(POOL)) as secure:
        tls_schema, tls_token = await secure.tenant("bench", ["read", "write"])
        await users(secure.dsn, tls_schema)
        plain = MultiDatabaseClient(target, "bench", token)
        over_tls = MultiDatabaseClient(
            secure.grpc, "bench", tls_token, tls=TlsOptions(ca_file=secure.ca_file)
        )

        def by(client: MultiDatabaseClient) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> Any:
                return await client.fetch_all(PK, [key(i)])

            return call

        rounds: dict[str, list[float]] = {"plain": [], "tls": []}
        for _ in range(2):
            rounds["plain"].append((await run_load(by(plain), 32, seconds)).rps)
            rounds["tls"].append((await run_load(by(over_tls), 32, seconds)).rps)
        await plain.close()
        await over_tls.close()
    plain_rps, tls_rps = statistics.median(rounds["plain"]), statistics.median(rounds["tls"])
    print("PK lookup, c=32, plaintext vs TLS (median of 2 alternating rounds)")
    print(f"  plaintext  {plain_rps:8.0f}/s")
    print(f"  TLS        {tls_rps:8.0f}/s   {tls_rps / plain_rps:5.2f}x")
    return {
        "pk_c32_tls_rps": tls_rps,
        "pk_c32_plain_rps": plain_rps,
        "tls_vs_plain": tls_rps / plain_rps,
    }


async def bench_spread(target: str, pid: int, token: str, seconds: float) -> dict[str, float]:
    """PK lookups at c=32 with the client's calls spread over 1, 2 and 4 HTTP/2 connections,
    the echo and the service driven alike (alternating, two rounds each). One connection
    reaches one worker; the kernel hands each new connection to a worker (SO_REUSEPORT, by a
    hash of its addresses), so the workers' CPU is printed: how evenly they shared the load."""
    workers = psutil.Process(pid).children()
    small = await recorded(target, token, PK, ["u000001"])
    out: dict[str, float] = {}
    print(f"PK lookup, c=32, calls spread over connections ({len(workers)} workers)")
    async with echo_server(small, small) as echo_target:
        for connections in (1, 2, 4):
            rounds: dict[str, list[float]] = {"echo": [], "service": []}
            shares: list[str] = []
            for _ in range(2):
                for kind, where in (("echo", echo_target), ("service", target)):
                    client = MultiDatabaseClient(where, "bench", token, connections=connections)

                    async def call(i: int, client: MultiDatabaseClient = client) -> Any:
                        return await client.fetch_all(PK, [key(i)])

                    before = [cpu_seconds(w.pid) for w in workers]
                    rounds[kind].append((await run_load(call, 32, seconds)).rps)
                    if kind == "service":
                        used = [
                            cpu_seconds(w.pid) - b for w, b in zip(workers, before, strict=True)
                        ]
                        shares.append("/".join(f"{u:.1f}" for u in used))
                    await client.close()
            echo_rps = statistics.median(rounds["echo"])
            ours = statistics.median(rounds["service"])
            print(
                f"  {connections} connection(s): echo {echo_rps:6.0f}/s  service {ours:6.0f}/s"
                f"  {ours / echo_rps:5.2f}x echo   workers' CPU s per round: {', '.join(shares)}"
            )
            out[f"pk_c32_connections{connections}_vs_echo"] = ours / echo_rps
            out[f"pk_c32_connections{connections}_rps"] = ours
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--stream-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--only", choices=["query", "stream", "bulk", "tls", "spread"], help="one part alone"
    )
    parser.add_argument("--echo-server", nargs=3, metavar=("PORT", "SMALL", "LARGE"))
    parser.add_argument("--pg", nargs=2, metavar=("DSN", "SCHEMA"), help="(with --echo-server)")
    args = parser.parse_args()
    if args.echo_server:  # the echo's own process (see echo_server)
        port, small, large = args.echo_server
        dsn, schema = args.pg or (None, None)
        asyncio.run(
            serve_echo(int(port), Path(small).read_bytes(), Path(large).read_bytes(), dsn, schema)
        )
    else:
        # Its last line, printed by harness.reporting on exit (and on interruption):
        # {"bench": "grpc_query", ...the figures below}
        with reporting("grpc_query") as figures:
            uvloop.run(main(args.seconds, args.rows, args.stream_rows, args.only, figures))
