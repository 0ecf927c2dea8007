"""Raw binary COPY vs. end-to-end ingestion through NATS and Kafka, in one run.

The service runs as its own process (``database-service serve``) on a private PostgreSQL, a
private nats-server and the Kafka broker of ``scripts/kafka.sh`` (or ``DBSVC_TEST_KAFKA_BOOTSTRAP``).
For each round the same number of ticks is loaded

- by asyncpg ``copy_records_to_table`` straight into ``shared.trading_ticks`` (the baseline: no
  decoding, no staging, no dedupe; the 1-minute rollup trigger fires in both paths), and
- by ``MarketDataPublisher`` on NATS only, Kafka only, and both at once (every tick twice, stored
  once), timed from the first publish until the last tick is committed.

Prints ticks/s per path, the median of the rounds and the ratio to raw COPY.

    .venv/bin/python bench/ingest.py [--ticks 200000] [--rounds 3] [--batch 1000]

The last line is one JSON object of the figures (``{"bench": "ingest", ...}``, printed by
``harness.reporting``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import secrets
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from harness import reporting, running_service  # bench/ is on sys.path when run as a script

from database_service.supervisor import EmbeddedNats
from database_service_client import MarketDataPublisher, tick
from database_service_client._proto import ingest_pb2
from database_service_client.publish import Kind

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["event_id", "time", "company_id", "user_id", "symbol", "bid", "ask", "volume", "spread"]


def kafka_sh(*args: str) -> str:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "kafka.sh"), *args], check=True, capture_output=True,
        text=True,
    )  # fmt: skip
    return done.stdout.strip()


@contextlib.contextmanager
def kafka_bootstrap() -> Iterator[str]:
    """The broker of DBSVC_TEST_KAFKA_BOOTSTRAP, or a lease on scripts/kafka.sh's broker."""
    given = os.environ.get("DBSVC_TEST_KAFKA_BOOTSTRAP")
    if given:
        yield given
        return
    lease = str(os.getpid())
    kafka_sh("acquire", lease)
    try:
        yield kafka_sh("url")
    finally:
        kafka_sh("release", lease)


def raw_rows(n: int, start: dt.datetime) -> list[tuple[object, ...]]:
    return [
        (uuid.uuid4(), start + dt.timedelta(microseconds=i * 500), "bench", "load", f"S{i % 10}",
         Decimal("1.10000") + Decimal(i % 100) / 100000, Decimal("1.10020"), i % 9 + 1,
         Decimal("0.20"))
        for i in range(n)
    ]  # fmt: skip


def ticks(n: int, start: dt.datetime) -> list[ingest_pb2.Tick]:
    return [
        tick("bench", f"S{i % 10}", start + dt.timedelta(microseconds=i * 500),
             bid=1.1 + (i % 100) / 100000, ask=1.1002, volume=i % 9 + 1, spread=0.2,
             user_id="load")
        for i in range(n)
    ]  # fmt: skip


async def count(owner: asyncpg.Connection) -> int:
    return int(await owner.fetchval("SELECT count(*) FROM shared.trading_ticks"))


async def raw_copy(owner: asyncpg.Connection, n: int, start: dt.datetime) -> float:
    rows = raw_rows(n, start)
    began = time.perf_counter()
    await owner.copy_records_to_table(
        "trading_ticks", schema_name="shared", columns=COLUMNS, records=rows
    )
    return n / (time.perf_counter() - began)


async def through_service(
    owner: asyncpg.Connection,
    publisher: MarketDataPublisher,
    n: int,
    start: dt.datetime,
    batch: int,
) -> float:
    records = ticks(n, start)
    before = await count(owner)
    began = time.perf_counter()
    report = await publisher.publish_ticks(records, batch_size=batch)
    if not report.ok:
        raise RuntimeError(f"publishing failed: {report.to_dict()}")
    deadline = time.monotonic() + 600
    while await count(owner) < before + n:
        if time.monotonic() > deadline:
            raise RuntimeError("ingestion did not finish within 600 s")
        await asyncio.sleep(0.02)
    return n / (time.perf_counter() - began)


async def main(n: int, rounds: int, batch: int, figures: dict[str, Any]) -> None:
    with kafka_bootstrap() as bootstrap:
        await run(bootstrap, n, rounds, batch, figures)


_KEYS = {"raw COPY": "raw_copy", "NATS": "nats", "Kafka": "kafka", "NATS+Kafka": "nats_kafka"}


def summary(paths: dict[str, list[float]], n: int, batch: int) -> dict[str, float | int]:
    """Medians of the rounds so far, and each path's ratio to raw COPY."""
    base = statistics.median(paths["raw COPY"])
    figures: dict[str, float | int] = {"ticks": n, "rounds": len(paths["raw COPY"]), "batch": batch}
    for name, values in paths.items():
        figures[f"{_KEYS[name]}_ticks_s"] = statistics.median(values)
        if name != "raw COPY":
            figures[f"{_KEYS[name]}_ratio"] = statistics.median(values) / base
    return figures


async def run(bootstrap: str, n: int, rounds: int, batch: int, figures: dict[str, Any]) -> None:
    prefix = f"bench{secrets.token_hex(3)}-"
    topics: dict[Kind, str] = {"trading": f"{prefix}trading", "analytics": f"{prefix}analytics"}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as nats_server,
            running_service(
                DBSVC_NATS_URL=nats_server.url,
                DBSVC_KAFKA_BOOTSTRAP=bootstrap,
                DBSVC_INGEST_KAFKA_TOPICS=f'["{topics["trading"]}", "{topics["analytics"]}"]',
                DBSVC_INGEST_KAFKA_GROUP=f"{prefix}group",
                DBSVC_INGEST_KAFKA_DEAD_LETTER_TOPIC=f"{prefix}dead",
            ) as service,
        ):
            token = await service.tenant_token("bench", ["ingest"])
            owner = await asyncpg.connect(service.dsn)
            await asyncio.sleep(3)  # the consumers subscribe and join their group
            paths: dict[str, list[float]] = {
                "raw COPY": [],
                "NATS": [],
                "Kafka": [],
                "NATS+Kafka": [],
            }
            publishers = {
                "NATS": MarketDataPublisher(token, nats_url=nats_server.url),
                "Kafka": MarketDataPublisher(token, kafka_bootstrap=bootstrap, kafka_topics=topics),
                "NATS+Kafka": MarketDataPublisher(
                    token, nats_url=nats_server.url, kafka_bootstrap=bootstrap, kafka_topics=topics
                ),
            }
            for p in publishers.values():
                await p.__aenter__()
            try:
                start = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
                await through_service(owner, publishers["NATS"], 2_000, start, batch)  # warm-up
                for r in range(rounds):
                    at = start + dt.timedelta(minutes=10 * (r + 1))
                    paths["raw COPY"].append(await raw_copy(owner, n, at))
                    for i, (name, publisher) in enumerate(publishers.items()):
                        when = at + dt.timedelta(minutes=2 * (i + 1))
                        paths[name].append(await through_service(owner, publisher, n, when, batch))
                    print(f"round {r + 1}: " + ", ".join(
                        f"{k} {v[-1]:,.0f}/s" for k, v in paths.items()
                    ), flush=True)  # fmt: skip
                    figures |= summary(paths, n, batch)
            finally:
                for p in publishers.values():
                    await p.__aexit__(None, None, None)
                await owner.close()
    base = statistics.median(paths["raw COPY"])
    print(f"\n{n:,} ticks per path, {rounds} rounds, batches of {batch}; medians:")
    for name, values in paths.items():
        median = statistics.median(values)
        print(f"  {name:<12} {median:12,.0f} ticks/s   {median / base:6.1%} of raw COPY")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    # Its last line, printed by harness.reporting on exit (and on interruption):
    # {"bench": "ingest", ...the figures below}
    with reporting("ingest") as figures:
        asyncio.run(main(args.ticks, args.rounds, args.batch, figures))
