"""MarketDataPublisher against a real nats-server (JetStream, tests/fix_nats.py) and a real Kafka
broker (tests/fix_kafka.py): the same batch bytes on both, with the auth headers; one transport
down does not stop the other."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from nats.js.api import RawStreamMsg

from database_service.supervisor import free_port
from database_service_client import (
    MarketDataPublisher,
    PublishError,
    event_id_for,
    tick,
)
from database_service_client._proto import ingest_pb2
from database_service_client.publish import batch_id
from tests.fix_nats import NatsServer

TOKEN = "test-token-0123456789abcdefghij"
TICKS = 2500
STREAM = "INGEST_TEST"


async def make_stream(url: str, subjects: list[str]) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=subjects)
    finally:
        await nc.close()


async def stream_messages(url: str) -> list[RawStreamMsg]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        count = (await js.stream_info(STREAM)).state.messages
        return [await js.get_msg(STREAM, seq) for seq in range(1, count + 1)]
    finally:
        await nc.close()


async def make_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=4, replication_factor=1)])
    finally:
        await admin.close()


async def topic_records(bootstrap: str, topic: str, want: int) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        got: list[Any] = []  # aiokafka ConsumerRecord
        deadline = time.monotonic() + 30
        while len(got) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend(records)
        return got
    finally:
        await consumer.stop()


def ticks(n: int, tenant: str = "abc") -> list[ingest_pb2.Tick]:
    start = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    return [
        tick(
            tenant,
            "EURUSD",
            start + timedelta(milliseconds=i),
            bid=1.08 + i * 1e-5,
            ask=1.0802 + i * 1e-5,
            volume=i,
            user_id="load",
            event_id=event_id_for(tenant, "test", i),
        )
        for i in range(n)
    ]


async def test_same_batches_on_both_transports(
    nats_server: NatsServer, kafka_bootstrap: str, kafka_topic_prefix: str
) -> None:
    nats_url = nats_server.url
    subject, topic = f"{kafka_topic_prefix}trading", f"{kafka_topic_prefix}trading"
    await make_stream(nats_url, [subject])
    await make_topic(kafka_bootstrap, topic)
    published = ticks(TICKS)

    async with MarketDataPublisher(
        TOKEN,
        nats_url=nats_url,
        kafka_bootstrap=kafka_bootstrap,
        producer="test-publish",
        nats_subjects={"trading": subject},
        kafka_topics={"trading": topic},
    ) as publisher:
        report = await publisher.publish_ticks(published, batch_size=1000)

    assert report.ok, report.to_dict()
    assert (report.batches, report.records) == (3, TICKS)
    for name in ("nats", "kafka"):
        t = report.transports[name]
        assert (t.batches, t.records, t.failed_batches, t.errors) == (3, TICKS, 0, [])

    on_nats = await stream_messages(nats_url)
    on_kafka = await topic_records(kafka_bootstrap, topic, 3)
    assert len(on_nats) == 3
    assert len(on_kafka) == 3
    nats_bytes = [m.data for m in on_nats]
    kafka_bytes = [r.value for r in on_kafka]
    assert nats_bytes == kafka_bytes  # the same bytes, in the same order (one partition)

    for message in on_nats:
        assert message.subject == subject
        assert message.headers is not None
        assert message.headers["Authorization"] == f"Bearer {TOKEN}"
        assert message.data is not None
        assert message.headers["Nats-Msg-Id"] == batch_id(message.data)
    for record in on_kafka:
        assert record.key == b"abc"
        assert ("authorization", f"Bearer {TOKEN}".encode()) in record.headers
    assert len({r.partition for r in on_kafka}) == 1

    batches = [ingest_pb2.IngestBatch.FromString(data) for data in nats_bytes if data]
    assert [len(b.ticks) for b in batches] == [1000, 1000, 500]
    assert all(b.producer == "test-publish" and b.published_at_unix_us > 0 for b in batches)
    assert [t for b in batches for t in b.ticks] == published


async def test_one_transport_down(nats_server: NatsServer, kafka_topic_prefix: str) -> None:
    subject = f"{kafka_topic_prefix}trading"
    await make_stream(nats_server.url, [subject])
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: Kafka cannot connect
    async with MarketDataPublisher(
        TOKEN,
        nats_url=nats_server.url,
        kafka_bootstrap=nowhere,
        nats_subjects={"trading": subject},
        timeout=3,
        cooldown=0.5,
    ) as publisher:
        assert publisher.connected == ("nats",)
        report = await publisher.publish_ticks(ticks(10), batch_size=5)
        assert not report.ok
        assert (report.transports["nats"].batches, report.transports["nats"].records) == (2, 10)
        kafka = report.transports["kafka"]
        assert (kafka.batches, kafka.failed_batches, kafka.failed_records) == (0, 2, 10)
        assert kafka.errors and "not connected" in kafka.errors[0]

        # The same bytes again: JetStream drops the duplicate by its Nats-Msg-Id.
        first = (await stream_messages(nats_server.url))[0].data
        again = await publisher.publish_batch(
            ingest_pb2.IngestBatch.FromString(first or b""), kind="trading"
        )
        assert again.transports["nats"].batches == 1
        assert len(await stream_messages(nats_server.url)) == 2

        # NATS goes away too: every transport failed, at once (no waiting for the timeout).
        await nats_server.stop()
        started = time.monotonic()
        with pytest.raises(PublishError, match="every transport") as raised:
            await publisher.publish_ticks(ticks(5, "bb"))
        assert time.monotonic() - started < 3
        assert set(raised.value.errors) == {"nats", "kafka"}
        assert raised.value.report.transports["nats"].failed_batches == 1

        # Back: the client reconnects by itself and publishing works again.
        await nats_server.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                report = await publisher.publish_ticks(ticks(5, "bb"))
                break
            except PublishError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        assert report.transports["nats"].batches == 1
    assert len(await stream_messages(nats_server.url)) == 3

    # Both down from the start: nothing to publish on.
    with pytest.raises(PublishError, match="no transport could connect"):
        async with MarketDataPublisher(
            TOKEN, nats_url=f"nats://127.0.0.1:{free_port()}", kafka_bootstrap=nowhere, timeout=2
        ):
            pass
