"""aiokafka vs. confluent-kafka for the ingestion consumer: produce and consume rates, in one run.

Against ``DBSVC_TEST_KAFKA_BOOTSTRAP`` or the local single-node broker of scripts/kafka.sh (on a
lease: started here when needed, stopped again if this run started it). Each repetition creates
fresh 4-partition topics, produces N ~100-byte keyed messages with each client, then consumes one
topic with each client in its own consumer group, the way the service would from asyncio (uvloop):

- aiokafka: ``AIOKafkaConsumer.getmany(max_records=B)``, ``commit()`` after each batch;
- confluent-kafka: ``Consumer.consume(num_messages=B)`` and ``commit(asynchronous=False)``, each
  through ``asyncio.to_thread``; between the two the batch is handled on the event loop.

Producers: aiokafka ``send()`` with the delivery futures awaited every 10,000 messages;
confluent-kafka ``produce()`` with ``poll(0)`` every 1,000 and ``flush()`` in a thread at the
end; both acks=all, linger 5 ms, no compression. Consume rates run from the first batch to the
last (the group join is shown apart). Medians of 3 repetitions, client order alternating.

    .venv/bin/python bench/kafka_clients.py [--messages 200000] [--batch 1000] [--repeat 3]

The last line is one JSON object of the figures (``{"bench": "kafka_clients", ...}``, printed by
``harness.reporting``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiokafka
import confluent_kafka
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from harness import reporting  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
VALUE_BYTES = 100
KEYS = 64  # distinct keys, as many series feeding the topic


@dataclass(frozen=True)
class Consumed:
    rate: float  # msgs/s from the first batch to the last
    join_s: float  # subscribe to first batch (group join, first fetch)


Messages = list[tuple[bytes, bytes]]  # (key, value), built before any clock starts


def make_messages(n: int) -> Messages:
    messages = []
    for i in range(n):
        value = f'{{"seq":{i},"symbol":"SYM{i % KEYS:02d}","bid":1.08421,"ask":1.08424,"pad":"'
        value += "x" * (VALUE_BYTES - len(value) - 2) + '"}'
        messages.append((f"k{i % KEYS}".encode(), value.encode()))
    return messages


def check(values: int, total_bytes: int, n: int) -> None:
    if values != n or total_bytes != n * VALUE_BYTES:
        raise RuntimeError(f"consumed {values} messages / {total_bytes} bytes, expected {n}")


async def produce_aiokafka(bootstrap: str, topic: str, messages: Messages) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20
    )
    await producer.start()
    try:
        await producer.partitions_for(topic)  # metadata before the clock starts
        started = time.perf_counter()
        pending: list[asyncio.Future[object]] = []
        for key, value in messages:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) == 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return len(messages) / (time.perf_counter() - started)
    finally:
        await producer.stop()


async def produce_confluent(bootstrap: str, topic: str, messages: Messages) -> float:
    failures: list[str] = []

    def delivered(error: confluent_kafka.KafkaError | None, _: confluent_kafka.Message) -> None:
        if error is not None:
            failures.append(str(error))

    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "compression.type": "none"}
    )
    producer.list_topics(topic, timeout=10)  # metadata before the clock starts
    started = time.perf_counter()
    for i, (key, value) in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:  # local queue full: let deliveries drain
                await asyncio.to_thread(producer.poll, 0.05)
        if i % 1000 == 0:
            producer.poll(0)
    left = await asyncio.to_thread(producer.flush, 60)
    elapsed = time.perf_counter() - started
    if left or failures:
        raise RuntimeError(f"confluent producer: {left} undelivered, errors {failures[:3]}")
    return len(messages) / elapsed


async def consume_aiokafka(bootstrap: str, topic: str, n: int, batch: int) -> Consumed:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"{topic}-aiokafka",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    subscribed = time.perf_counter()
    await consumer.start()
    try:
        values = total = 0
        first, first_count = 0.0, 0
        while values < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=batch)
            if not batches:
                continue
            if not first:
                first, first_count = time.perf_counter(), sum(len(b) for b in batches.values())
            for records in batches.values():
                for record in records:
                    values += 1
                    total += len(record.value or b"")
            await consumer.commit()
        ended = time.perf_counter()
    finally:
        await consumer.stop()
    check(values, total, n)
    return Consumed((n - first_count) / (ended - first), first - subscribed)


async def consume_confluent(bootstrap: str, topic: str, n: int, batch: int) -> Consumed:
    consumer = confluent_kafka.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-confluent",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    subscribed = time.perf_counter()
    consumer.subscribe([topic])
    try:
        values = total = 0
        first, first_count = 0.0, 0
        while values < n:
            messages = await asyncio.to_thread(consumer.consume, batch, 1.0)
            if not messages:
                continue
            if not first:
                first, first_count = time.perf_counter(), len(messages)
            for message in messages:
                error = message.error()
                if error is not None:
                    raise RuntimeError(f"confluent consumer: {error}")
                values += 1
                total += len(message.value() or b"")
            await asyncio.to_thread(consumer.commit, asynchronous=False)
        ended = time.perf_counter()
    finally:
        await asyncio.to_thread(consumer.close)
    check(values, total, n)
    return Consumed((n - first_count) / (ended - first), first - subscribed)


def kafka_sh(*args: str) -> subprocess.CompletedProcess[str]:
    script = str(ROOT / "scripts" / "kafka.sh")
    return subprocess.run(["bash", script, *args], check=True, capture_output=True, text=True)


def acquire_broker() -> str | None:
    """The bootstrap, from the variable or from a lease on scripts/kafka.sh's broker (started when
    needed, stopped by release_broker if this lease started it and no test session holds one)."""
    bootstrap = os.environ.get("DBSVC_TEST_KAFKA_BOOTSTRAP")
    if bootstrap:
        return bootstrap
    try:
        kafka_sh("acquire", str(os.getpid()))
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"scripts/kafka.sh could not start Kafka:\n{error.stderr}") from None
    return None


def release_broker() -> None:
    kafka_sh("release", str(os.getpid()))


async def main(bootstrap: str, n: int, batch: int, repeat: int, figures: dict[str, Any]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    produced: dict[str, list[float]] = {"aiokafka": [], "confluent-kafka": []}
    consumed: dict[str, list[Consumed]] = {"aiokafka": [], "confluent-kafka": []}
    producers: dict[str, Callable[[str, str, Messages], Awaitable[float]]] = {
        "aiokafka": produce_aiokafka,
        "confluent-kafka": produce_confluent,
    }
    consumers: dict[str, Callable[[str, str, int, int], Awaitable[Consumed]]] = {
        "aiokafka": consume_aiokafka,
        "confluent-kafka": consume_confluent,
    }
    print(
        f"broker {bootstrap}; {n:,} messages of {VALUE_BYTES} B, {PARTITIONS} partitions, "
        f"consume batches of {batch}; aiokafka {aiokafka.__version__}, "
        f"confluent-kafka {confluent_kafka.__version__} (librdkafka {confluent_kafka.libversion()[0]})",
        flush=True,
    )
    messages = make_messages(n)
    try:
        for rep in range(repeat):
            order = list(producers) if rep % 2 == 0 else list(reversed(producers))
            topics = {name: f"bench-{secrets.token_hex(4)}-{name}" for name in order}
            await admin.create_topics(
                [
                    NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                    for t in topics.values()
                ]
            )
            line: list[str] = []
            for name in order:
                rate = await producers[name](bootstrap, topics[name], messages)
                produced[name].append(rate)
                line.append(f"produce {name} {rate:,.0f}/s")
            # Both consumers read the same topic (each in its own group), so they see equal data.
            source = topics["aiokafka"]
            for name in order:
                result = await consumers[name](bootstrap, source, n, batch)
                consumed[name].append(result)
                line.append(f"consume {name} {result.rate:,.0f}/s")
            print(f"  run {rep + 1}: " + "; ".join(line), flush=True)
            figures |= summary(produced, consumed, n, batch)
            await admin.delete_topics(list(topics.values()))
    finally:
        await admin.close()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def spread(values: list[float]) -> str:
        return f"{med(values):>9,.0f} ({min(values):,.0f}-{max(values):,.0f})"

    print(f"median (min-max) of {repeat}, msgs/s; ratio = confluent-kafka / aiokafka medians")
    rates = {
        "produce": (produced["aiokafka"], produced["confluent-kafka"]),
        "consume": (
            [r.rate for r in consumed["aiokafka"]],
            [r.rate for r in consumed["confluent-kafka"]],
        ),
    }
    for direction, (a, c) in rates.items():
        print(
            f"  {direction}  aiokafka {spread(a):<28} confluent-kafka {spread(c):<28}"
            f" ratio {med(c) / med(a):5.2f}x"
        )
    join_a = med([r.join_s for r in consumed["aiokafka"]])
    join_c = med([r.join_s for r in consumed["confluent-kafka"]])
    print(f"  group join to first batch: aiokafka {join_a:.2f} s, confluent-kafka {join_c:.2f} s")


def summary(
    produced: dict[str, list[float]], consumed: dict[str, list[Consumed]], n: int, batch: int
) -> dict[str, Any]:
    """Medians of the runs so far."""
    med = statistics.median
    pa, pc = med(produced["aiokafka"]), med(produced["confluent-kafka"])
    ca = med([r.rate for r in consumed["aiokafka"]])
    cc = med([r.rate for r in consumed["confluent-kafka"]])
    return {
        "messages": n,
        "batch": batch,
        "repeat": len(produced["aiokafka"]),
        "produce_aiokafka_msgs_s": pa,
        "produce_confluent_msgs_s": pc,
        "produce_ratio": pc / pa,
        "consume_aiokafka_msgs_s": ca,
        "consume_confluent_msgs_s": cc,
        "consume_ratio": cc / ca,
        "join_aiokafka_s": med([r.join_s for r in consumed["aiokafka"]]),
        "join_confluent_s": med([r.join_s for r in consumed["confluent-kafka"]]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=1000, help="max records per consume batch")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    bootstrap = acquire_broker()
    try:
        url = bootstrap or kafka_sh("url").stdout.strip()
        # Its last line, printed by harness.reporting on exit (and on interruption):
        # {"bench": "kafka_clients", ...the figures below}
        with reporting("kafka_clients") as figures:
            uvloop.run(main(url, args.messages, args.batch, args.repeat, figures))
    finally:
        if bootstrap is None:
            release_broker()
