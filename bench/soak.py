"""Soak: a steady mixed load against ``database-service serve`` for N minutes, per minute figures.

The service runs as its own process on a private PostgreSQL with its embedded nats-server (a
child of ``serve``). Callers (``--concurrency``, default 8) share one pace (``--rate`` operations
per second, 0 = as fast as they go) and draw each operation from the mix (``--mix``):

- ``pk``      a primary-key read (``fetch_all``),
- ``upsert``  ``INSERT … ON CONFLICT DO UPDATE`` of one row,
- ``scan``    a 1,000-row read streamed through ``execute_query``,
- ``tx``      a transaction of two updates (in key order) and an insert,
- ``bulk``    ``bulk_insert`` of 100 rows;

meanwhile ``MarketDataPublisher`` publishes ticks on NATS at ``--ingest-rate`` ticks/s. Every
minute it prints throughput, p99 latency (all and per operation), errors, ticks stored and the
resident memory (RSS) of every process of the service: ``serve`` and its children. The last
line is ``{"bench": "soak", ...}`` with the per-minute list, the error total and the RSS of every
process at the start and the end.

    .venv/bin/python bench/soak.py [--minutes 6] [--concurrency 8] [--rate 260]
        [--ingest-rate 100] [--workers 0] [--mix pk=64,upsert=20,scan=10,tx=5,bulk=1]
        [--interval 60] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psutil
from harness import (  # bench/ is on sys.path when run as a script
    Service,
    reporting,
    running_service,
)

from database_service.supervisor import free_port
from database_service_client import MarketDataPublisher, MultiDatabaseClient, tick

TENANT = "soak"
KEYS = 10_000  # rows of soak_kv; PK reads and upserts pick among them
DEFAULT_MIX = "pk=64,upsert=20,scan=10,tx=5,bulk=1"
MB = 1024 * 1024


# --- the service's processes ------------------------------------------------------------------


def service_process() -> psutil.Process:
    """``database-service serve``, a child of this process (the harness started it)."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "serve" in child.cmdline() and any("database-service" in a for a in child.cmdline()):
                return child
    raise RuntimeError("database-service serve is not running under this process")


def rss(root: psutil.Process) -> dict[str, float]:
    """RSS in MB of the service process and each of its descendants, by ``name[pid]``."""
    figures: dict[str, float] = {}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            figures[f"{label(process, root)}[{process.pid}]"] = process.memory_info().rss / MB
    return figures


def label(process: psutil.Process, root: psutil.Process) -> str:
    if process.pid == root.pid:
        return "serve"
    command = " ".join(process.cmdline())
    for hint, name in (
        ("resource_tracker", "mp-resource-tracker"),
        ("spawn_main", "mp-worker"),
        ("forkserver", "mp-forkserver"),
        ("database-service", "worker"),
    ):
        if hint in command:
            return name
    return process.name()


# --- load -------------------------------------------------------------------------------------


@dataclass
class Minute:
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    ticks_published: int = 0


class Pace:
    """One schedule shared by every caller: the k-th operation starts at start + k / rate. A
    caller that falls more than a second behind drops the backlog instead of bursting."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_at = time.perf_counter()

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        now = time.perf_counter()
        self.next_at = max(self.next_at + 1 / self.rate, now - 1)
        if self.next_at > now:
            await asyncio.sleep(self.next_at - now)


class Load:
    def __init__(self, client: MultiDatabaseClient, mix: dict[str, float]) -> None:
        self.client = client
        self.kinds = list(mix)
        self.weights = list(mix.values())
        self.minute = Minute()
        self.examples: dict[str, str] = {}  # error type -> first message
        self.operations: dict[str, Callable[[random.Random], Awaitable[Any]]] = {
            "pk": self.pk,
            "upsert": self.upsert,
            "scan": self.scan,
            "tx": self.tx,
            "bulk": self.bulk,
        }
        unknown = set(mix) - set(self.operations)
        if unknown:
            raise SystemExit(f"unknown operations in --mix: {', '.join(sorted(unknown))}")

    async def pk(self, rng: random.Random) -> Any:
        return await self.client.fetch_all(
            "SELECT id, value, n, updated_at FROM soak_kv WHERE id = $1", [rng.randrange(KEYS)]
        )

    async def upsert(self, rng: random.Random) -> Any:
        return await self.client.fetch_all(
            "INSERT INTO soak_kv (id, value, n, updated_at) VALUES ($1, $2, 1, now())"
            " ON CONFLICT (id) DO UPDATE SET value = excluded.value, n = soak_kv.n + 1,"
            " updated_at = now()",
            [rng.randrange(KEYS), f"v{rng.random():.12f}"],
        )

    async def scan(self, rng: random.Random) -> Any:
        count = 0
        stream = self.client.execute_query(
            "SELECT id, value, n, updated_at FROM soak_kv WHERE id >= $1 ORDER BY id LIMIT 1000",
            [rng.randrange(KEYS - 1000)],
        )
        async for _ in stream:
            count += 1
        if count != 1000:
            raise RuntimeError(f"scan read {count} rows, not 1000")

    async def tx(self, rng: random.Random) -> Any:
        a, b = sorted(rng.sample(range(KEYS), 2))  # one lock order: no deadlocks between callers
        return await self.client.transaction(
            [
                ("UPDATE soak_kv SET n = n + 1 WHERE id = $1", [a]),
                ("UPDATE soak_kv SET n = n - 1 WHERE id = $1", [b]),
                ("INSERT INTO soak_log (kv, delta) VALUES ($1, 1)", [a]),
            ]
        )

    async def bulk(self, rng: random.Random) -> Any:
        base = rng.randrange(KEYS)
        return await self.client.bulk_insert(
            "soak_log", ["kv", "delta"], [(base + i, i) for i in range(100)]
        )

    async def caller(self, seed: int, pace: Pace, stop: asyncio.Event) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            await pace.wait()
            kind = rng.choices(self.kinds, self.weights)[0]
            minute = self.minute
            started = time.perf_counter()
            try:
                await self.operations[kind](rng)
            except Exception as error:  # counted and shown; the soak goes on
                name = f"{kind}:{type(error).__name__}"
                minute.errors[name] += 1
                self.examples.setdefault(name, str(error)[:300])
            else:
                minute.latencies[kind].append((time.perf_counter() - started) * 1000)


async def publish(
    publisher: MarketDataPublisher, rate: int, load: Load, stop: asyncio.Event
) -> None:
    """``rate`` ticks per second in 10 batches a second, stamped now."""
    if rate <= 0:
        return
    per_batch = max(1, rate // 10)
    period = per_batch / rate
    next_at = time.perf_counter()
    seq = 0
    while not stop.is_set():
        now = dt.datetime.now(dt.UTC)
        records = [
            tick(TENANT, f"S{(seq + i) % 20:02d}", now, bid=1.1 + (seq + i) % 100 / 1e5,
                 ask=1.1002, volume=(seq + i) % 9 + 1, user_id="soak")
            for i in range(per_batch)
        ]  # fmt: skip
        seq += per_batch
        minute = load.minute
        try:
            report = await publisher.publish_ticks(records, batch_size=per_batch)
            if report.ok:
                minute.ticks_published += per_batch
            else:
                minute.errors["ingest:publish"] += 1
                load.examples.setdefault("ingest:publish", str(report.to_dict())[:300])
        except Exception as error:
            minute.errors[f"ingest:{type(error).__name__}"] += 1
            load.examples.setdefault(f"ingest:{type(error).__name__}", str(error)[:300])
        next_at += period
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


# --- figures ----------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def summarize(
    index: int, minute: Minute, seconds: float, stored: int, memory: dict[str, float]
) -> dict[str, Any]:
    every = [v for values in minute.latencies.values() for v in values]
    return {
        "minute": index,
        "ops": len(every),
        "ops_s": round(len(every) / seconds, 1),
        "p99_ms": round(p99(every), 2),
        "p99_ms_by_op": {k: round(p99(v), 2) for k, v in sorted(minute.latencies.items())},
        "ops_by_op": {k: len(v) for k, v in sorted(minute.latencies.items())},
        "errors": sum(minute.errors.values()),
        "errors_by_kind": dict(minute.errors),
        "ticks_published": minute.ticks_published,
        "ticks_stored": stored,
        "rss_mb": {k: round(v, 1) for k, v in memory.items()},
    }


def line(figures: dict[str, Any]) -> str:
    by_op = ", ".join(f"{k} {v:.1f}" for k, v in figures["p99_ms_by_op"].items())
    memory = ", ".join(f"{k} {v:.1f} MB" for k, v in figures["rss_mb"].items())
    return (
        f"minute {figures['minute']:>3}: {figures['ops']:>7,} ops ({figures['ops_s']:7.1f}/s)"
        f"  p99 {figures['p99_ms']:7.1f} ms ({by_op})  errors {figures['errors']}"
        f"  ticks {figures['ticks_stored']:,}/{figures['ticks_published']:,}  RSS {memory}"
    )


# --- the run ----------------------------------------------------------------------------------


async def prepare(service: Service) -> tuple[str, MultiDatabaseClient]:
    _, token = await service.tenant(TENANT, ["read", "write", "admin", "ingest"])
    client = MultiDatabaseClient(service.grpc, TENANT, token, timeout=60)
    await client.fetch_all(
        "CREATE TABLE soak_kv (id int PRIMARY KEY, value text NOT NULL, n bigint NOT NULL,"
        " updated_at timestamptz NOT NULL)"
    )
    await client.fetch_all(
        "CREATE TABLE soak_log (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
        " at timestamptz NOT NULL DEFAULT now(), kv int NOT NULL, delta int NOT NULL)"
    )
    now = dt.datetime.now(dt.UTC)
    await client.bulk_insert(
        "soak_kv",
        ["id", "value", "n", "updated_at"],
        [(i, f"v{i}", 0, now) for i in range(KEYS)],
        batch_size=2000,
    )
    return token, client


async def main(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    nats_port = free_port()
    env = {
        "DBSVC_NATS_EMBEDDED": "true",
        "DBSVC_NATS_PORT": str(nats_port),
        "DBSVC_WORKERS": str(args.workers),
    }
    env |= dict(item.split("=", 1) for item in args.env)
    async with running_service(**env) as service:
        serve = psutil.Process(service.pid) if getattr(service, "pid", 0) else service_process()
        token, client = await prepare(service)
        owner = await asyncpg.connect(service.dsn)
        load = Load(client, mix)
        stop = asyncio.Event()
        async with MarketDataPublisher(token, nats_url=f"nats://127.0.0.1:{nats_port}") as pub:
            pace = Pace(args.rate)
            tasks = [
                asyncio.create_task(load.caller(seed, pace, stop))
                for seed in range(args.concurrency)
            ]
            tasks.append(asyncio.create_task(publish(pub, args.ingest_rate, load, stop)))
            print(
                f"soak: {args.minutes} min, {args.concurrency} callers, rate"
                f" {args.rate or 'unpaced'} ops/s, mix {args.mix}, ingest {args.ingest_rate}"
                f" ticks/s; serve pid {serve.pid}",
                flush=True,
            )
            rss_start = rss(serve)
            minutes: list[dict[str, Any]] = []
            figures |= {
                "minutes": args.minutes,
                "interval_s": args.interval,
                "concurrency": args.concurrency,
                "rate": args.rate,
                "ingest_rate": args.ingest_rate,
                "mix": mix,
                "per_minute": minutes,  # filled in minute by minute
            }
            stored_before = 0
            try:
                for index in range(1, args.minutes + 1):
                    began = time.perf_counter()
                    await asyncio.sleep(args.interval)
                    minute, load.minute = load.minute, Minute()
                    seconds = time.perf_counter() - began
                    stored = int(
                        await owner.fetchval(
                            "SELECT count(*) FROM shared.trading_ticks WHERE company_id = $1",
                            TENANT,
                        )
                    )
                    figures = summarize(index, minute, seconds, stored - stored_before, rss(serve))
                    stored_before = stored
                    minutes.append(figures)
                    print(line(figures), flush=True)
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                await client.close()
                await owner.close()
            rss_end = rss(serve)
    for name, message in load.examples.items():
        print(f"  first {name}: {message}")
    errors = sum(m["errors"] for m in minutes)
    # The service's own processes (serve, its workers and their helpers; not nats-server):
    # after the first report (warm-up), in MB per minute whatever --interval is.
    start_mb, end_mb = service_mb(minutes[0]["rss_mb"]), service_mb(minutes[-1]["rss_mb"])
    growth = (
        (end_mb - start_mb) / ((len(minutes) - 1) * args.interval / 60) if len(minutes) > 1 else 0.0
    )
    print(
        f"{len(minutes)} min, {sum(m['ops'] for m in minutes):,} operations, {errors} errors;"
        f" the service's processes {service_mb(rss_start):.1f} MB at the start,"
        f" {start_mb:.1f} -> {end_mb:.1f} MB from the first report to the last"
        f" ({growth:+.2f} MB/min)"
    )
    figures |= {
        "errors": errors,
        "ops_s": statistics_mean([m["ops_s"] for m in minutes]),
        "rss_start_mb": {k: round(v, 1) for k, v in rss_start.items()},
        "rss_end_mb": {k: round(v, 1) for k, v in rss_end.items()},
        "service_rss_growth_mb_per_min": growth,
    }


def service_mb(rss: dict[str, float]) -> float:
    return sum(mb for name, mb in rss.items() if not name.startswith("nats-server"))


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, default=260, help="operations/s, 0 = unpaced")
    parser.add_argument("--ingest-rate", type=int, default=100, help="ticks/s over NATS")
    parser.add_argument(
        "--interval", type=float, default=60, help="seconds per report (a 'minute')"
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="DBSVC_WORKERS (serving processes; 0 = per core)"
    )
    parser.add_argument("--mix", default=DEFAULT_MIX, help="operation=weight,...")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the service (repeatable)"
    )
    # Its last line, printed by harness.reporting on exit (and on interruption):
    # {"bench": "soak", ...the figures below}
    with reporting("soak") as figures:
        asyncio.run(main(parser.parse_args(), figures))
