"""The local Kafka broker (scripts/kafka.sh) through aiokafka: topics, produce, consumer groups
with manual commits."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

MESSAGES = 1000
PARTITIONS = 4


async def drain(consumer: AIOKafkaConsumer, want: int, seconds: float) -> list[tuple[int, bytes]]:
    """(partition, value) of what the consumer gets until it has ``want`` or ``seconds`` pass,
    committing after each batch."""
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        batches = await consumer.getmany(timeout_ms=500, max_records=200)
        for tp, records in batches.items():
            got.extend((tp.partition, r.value) for r in records if r.value is not None)
        if batches:
            await consumer.commit()
    return got


def group_consumer(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )


async def test_topic_produce_consume_and_commit(
    kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    topic, group = f"{kafka_topic_prefix}events", f"{kafka_topic_prefix}group"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
        # Created is not yet listed: the broker answering may not have the new metadata yet.
        deadline = time.monotonic() + 30
        while topic not in await admin.list_topics():
            assert time.monotonic() < deadline, f"{topic} not listed within 30 s"
            await asyncio.sleep(0.1)
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == set(range(PARTITIONS))
        sent = [
            await producer.send(topic, f"m{i:04d}".encode(), key=f"k{i % 16}".encode())
            for i in range(MESSAGES)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()

    consumer = group_consumer(kafka_bootstrap, topic, group)
    await consumer.start()
    try:
        got = await drain(consumer, MESSAGES, 60)
    finally:
        await consumer.stop()
    assert len(got) == MESSAGES
    assert sorted(v for _, v in got) == [f"m{i:04d}".encode() for i in range(MESSAGES)]
    per_partition: dict[int, list[bytes]] = defaultdict(list)
    for partition, value in got:
        per_partition[partition].append(value)
    assert set(per_partition) == set(range(PARTITIONS))
    assert all(values == sorted(values) for values in per_partition.values())  # order kept

    # The same group again: the commits hold, so nothing is delivered twice; only what comes new.
    again = group_consumer(kafka_bootstrap, topic, group)
    await again.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        assert sum([await again.committed(tp) or 0 for tp in parts]) == MESSAGES
        assert await drain(again, 1, 3) == []
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for i in range(10):
                await producer.send_and_wait(topic, f"n{i}".encode())
        finally:
            await producer.stop()
        fresh = await drain(again, 10, 30)
    finally:
        await again.stop()
    assert sorted(v for _, v in fresh) == [f"n{i}".encode() for i in range(10)]
