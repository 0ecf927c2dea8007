"""What routing, tenant validation and the REST front end cost: the same primary-key lookup, in
one run, by

  in-process, concurrency 1 (what the seed's < 2 ms budget for routing and validation is about):
  1. direct asyncpg on the tenant's own role (baseline: prepared statement, one pool),
  2. the query core in-process (token check, tenant lookup, SQL guard, scopes, typed params,
     tenant pool, audit),
  3. the REST front end in-process (the same, plus FastAPI/JSON), over an ASGI transport;

  over real sockets, concurrency 1 and 32 (one keep-alive connection per worker):
  4. a bare HTTP echo: a raw ASGI app under the same uvicorn configuration and event loop as
     ``database-service serve``, in its own process, answering every POST with a body of the
     same size as the service's answer to the PK lookup (the floor of the HTTP stack),
  5. direct asyncpg with a pool of the size of the tenant's pool in the service,
  6. the query core in this process (no HTTP: what the service's own work costs at that
     concurrency, on the same pool size),
  7. ``POST /api/v1/query`` on ``database-service serve`` in its own process.

Prints throughput, p50 and p99 of each and the ratios, and ends with one JSON line (``reporting``):
``direct_c1_p50_ms``, ``core_c1_p50_ms``, ``rest_asgi_c1_p50_ms`` (in-process), then per
concurrency ``{echo,direct,core,rest}_c{1,32}_{rps,p50_ms,p99_ms}``, ``rest_c{1,32}_vs_echo``
(throughput ratio), ``rest_c{1,32}_vs_direct`` and ``rest_c{1,32}_p50_over_echo_ms``.

The service and the echo server run in processes of their own, as deployed, so that neither
shares an event loop with the load generator. The load generator is a lean keep-alive HTTP/1.1
client (``RawHttp``): httpx spends about as much CPU per request as the servers measured, and
on a 2-core machine that would flatten every ratio. The client still competes with the servers
for CPU, alike for the echo and the service: compare them in the same run, as ratios. The
in-process part always runs on uvloop; ``--loop`` picks the servers' loop (``serve``'s default
is asyncio: ``DBSVC_EVENT_LOOP``).

    .venv/bin/python bench/query_core.py [--n 2000] [--seconds 5] [--loop asyncio|uvloop]

Uses a private embedded PostgreSQL (started by ``harness.running_service``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import uvloop
from harness import (  # bench/ is on sys.path when run as a script
    closed_loop,
    p99,
    reporting,
    running_service,
)

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.config import Settings
from database_service.postgres.pools import TenantConnection
from database_service.query import TenantContext
from database_service.supervisor import free_port

SQL = "SELECT user_id, email, subscription_tier FROM users WHERE user_id = $1"
ROWS = 10_000
POOL = 8  # the tenant's pool in the service, and the direct baseline's at concurrency 32


def key(i: int) -> str:
    return f"u{i % ROWS + 1}"


# --- the bare HTTP baseline -------------------------------------------------------------------


def echo_app(body: bytes) -> Callable[..., Awaitable[None]]:
    """A raw ASGI app: read the request, answer ``body`` as JSON."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve_echo(port: int, body_file: str, loop: str) -> None:
    """The echo server's process: uvicorn configured as ``database-service serve`` does."""
    import uvicorn  # noqa: PLC0415

    config = uvicorn.Config(
        echo_app(Path(body_file).read_bytes()),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level=None,
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)
    if loop == "uvloop":
        uvloop.run(server.serve())
    else:
        asyncio.run(server.serve())


@contextlib.asynccontextmanager
async def echo_server(body: bytes, loop: str) -> AsyncIterator[str]:
    with tempfile.NamedTemporaryFile(suffix=".json") as file:
        file.write(body)
        file.flush()
        port = free_port()
        process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is polled
            [sys.executable, __file__, "--echo-server", str(port), file.name, "--loop", loop]
        )
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url) as http:
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.post("/", content=b"{}")).status_code == 200:
                            break
                    await asyncio.sleep(0.05)
            yield url
        finally:
            process.terminate()
            process.wait(30)


# --- a lean HTTP/1.1 client ------------------------------------------------------------------


class RawHttp:
    """One keep-alive HTTP/1.1 connection, requests with Content-Length only. httpx costs the
    client about as much CPU per request as the servers measured here; on a shared 2-core
    machine that would flatten every ratio, so the socket runs use this."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        fixed = {"Host": f"{host}:{port}", "Content-Type": "application/json", **headers}
        self.head = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self.head, len(body), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v)
            for k, _, v in (h.partition(b":") for h in lines[1:])
            if k.lower() == b"content-length"
        )
        return status, await self.reader.readexactly(length)

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


# --- measuring --------------------------------------------------------------------------------


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
    extra = (
        ""
        if baseline is None
        else f"   overhead {median - baseline:+.3f} ms  ratio {median / baseline:.2f}x"
    )
    print(f"  {name:<32} p50 {median:7.3f} ms   p99 {p99(samples):7.3f} ms{extra}")
    return median


def line(name: str, rps: float, lat: list[float], base: float | None) -> dict[str, float]:
    p50 = statistics.median(lat)
    ratio = "" if base is None else f"  {rps / base:5.2f}x of echo throughput"
    print(f"  {name:<32} {rps:8.0f} req/s   p50 {p50:7.3f} ms   p99 {p99(lat):7.3f} ms{ratio}")
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99(lat)}


# --- the run ----------------------------------------------------------------------------------


async def main(n: int, seconds: float, loop: str, figures: dict[str, Any]) -> None:
    master_key = secrets.token_urlsafe(48)
    env = {
        "DBSVC_POOL_MAX_PER_TENANT": str(POOL),
        "DBSVC_MASTER_KEY": master_key,
        "DBSVC_EVENT_LOOP": loop,
        "DBSVC_WORKERS": "1",
    }
    async with running_service(**env) as service:
        schema, token = await service.tenant("bench", ["read"])
        owner = await asyncpg.connect(service.dsn)
        await owner.execute(
            f"INSERT INTO {schema}.users (user_id, email, subscription_tier)"
            f" SELECT 'u' || g, 'u' || g || '@example.com', 'pro'"
            f" FROM generate_series(1, {ROWS}) g"
        )
        await owner.execute(f"ANALYZE {schema}.users")
        await owner.close()
        with tempfile.TemporaryDirectory() as tmp:
            # A second instance on the same control plane (same master key): the in-process
            # measurements and the tenant's login for the direct baseline.
            settings = Settings.load(
                postgres_url=service.dsn,
                data_dir=Path(tmp),
                master_key=master_key,
                nats_embedded=False,
                pool_max_per_tenant=POOL,
            )
            async with Application(settings, start_nats=False) as core:
                figures |= await bench(core, service.http, token, n, seconds, loop)


async def bench(
    core: Application, service_url: str, token: str, n: int, seconds: float, loop: str
) -> dict[str, Any]:
    tenant = await core.registry.get("bench")
    # The service's pool, the in-process core's and the direct baseline's, all on this role.
    await core.owner_pool.execute(f'ALTER ROLE "{tenant.role_name}" CONNECTION LIMIT 64')
    principal = await core.authenticator.authenticate(f"Bearer {token}")
    ctx = TenantContext("bench")
    password = core.secret_box.open(tenant.role_secret)
    direct = await asyncpg.create_pool(
        core.endpoints.postgres_dsn,
        user=tenant.role_name,
        password=password,
        min_size=1,
        max_size=POOL,
        # The service's release reset (tenants may not call pg_advisory_unlock_all).
        connection_class=TenantConnection,
    )
    assert direct is not None
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": "bench"}
    figures: dict[str, Any] = {"loop": loop}

    async def by_asyncpg(i: int) -> object:
        # A read-only transaction, as the service runs read-scope callers.
        async with direct.acquire() as conn, conn.transaction(readonly=True):
            return await conn.fetch(SQL, key(i))

    async def by_core(i: int) -> object:
        return await core.executor.execute(principal, ctx, SQL, [key(i)])

    def post_call(http: httpx.AsyncClient) -> Callable[[int], Awaitable[object]]:
        async def call(i: int) -> object:
            response = await http.post(
                "/api/v1/query", json={"sql": SQL, "params": [key(i)]}, headers=headers
            )
            assert response.status_code == 200, response.text
            return response

        return call

    def raw_call(http: RawHttp) -> Callable[[int], Awaitable[object]]:
        async def call(i: int) -> object:
            body = b'{"sql":"%s","params":["%s"]}' % (SQL.encode(), key(i).encode())
            status, answer = await http.post("/api/v1/query", body)
            assert status == 200, answer
            return answer

        return call

    transport = httpx.ASGITransport(app=create_http_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
        print(f"PK lookup, in-process, concurrency 1, n={n}")
        base = report("direct asyncpg (tenant role)", await measure(n, by_asyncpg), None)
        figures["direct_c1_p50_ms"] = base
        figures["core_c1_p50_ms"] = report(
            "query core (in-process)", await measure(n, by_core), base
        )
        figures["rest_asgi_c1_p50_ms"] = report(
            "REST /api/v1/query (ASGI)", await measure(n, post_call(http)), base
        )
        figures["core_overhead_ms"] = figures["core_c1_p50_ms"] - base

    # The echo answers a body of the size of the service's answer to the same lookup.
    async with httpx.AsyncClient(base_url=service_url) as http:
        sample = await post_call(http)(0)
        assert isinstance(sample, httpx.Response)
        body = sample.content
    print(f"\nPK lookup over sockets ({seconds:g} s each, response {len(body)} bytes, loop {loop})")
    figures["response_bytes"] = len(body)
    async with echo_server(body, loop) as echo_url:
        for concurrency in (1, 32):
            print(f"concurrency {concurrency}")
            clients = [
                RawHttp(url, headers) for url in (echo_url, service_url) for _ in range(concurrency)
            ]
            echo_clients, rest_clients = clients[:concurrency], clients[concurrency:]
            try:
                rps, lat = await closed_loop([raw_call(c) for c in echo_clients], seconds)
                echo = line("bare HTTP echo (uvicorn)", rps, lat, None)
                rps, lat = await closed_loop([by_asyncpg] * concurrency, seconds)
                asyncpg_ = line("direct asyncpg", rps, lat, echo["rps"])
                rps, lat = await closed_loop([by_core] * concurrency, seconds)
                core_ = line("query core (in-process, no HTTP)", rps, lat, echo["rps"])
                rps, lat = await closed_loop([raw_call(c) for c in rest_clients], seconds)
                rest = line("REST /api/v1/query (service)", rps, lat, echo["rps"])
            finally:
                for client in clients:
                    await client.aclose()
            c = f"c{concurrency}"
            for name, got in (
                ("echo", echo),
                ("direct", asyncpg_),
                ("core", core_),
                ("rest", rest),
            ):
                for figure, value in got.items():
                    figures.setdefault(f"{name}_{c}_{figure}", value)
            figures[f"rest_{c}_vs_echo"] = rest["rps"] / echo["rps"]
            figures[f"rest_{c}_vs_direct"] = rest["rps"] / asyncpg_["rps"]
            figures[f"rest_{c}_p50_over_echo_ms"] = rest["p50_ms"] - echo["p50_ms"]
    await direct.close()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="in-process samples per path")
    parser.add_argument("--seconds", type=float, default=5.0, help="per socket measurement")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--echo-server", nargs=2, metavar=("PORT", "BODY_FILE"))
    args = parser.parse_args()
    if args.echo_server:
        serve_echo(int(args.echo_server[0]), args.echo_server[1], args.loop)
    else:
        with reporting("query_core") as figures:
            uvloop.run(main(args.n, args.seconds, args.loop, figures))
