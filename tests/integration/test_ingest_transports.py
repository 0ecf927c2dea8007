"""Ingestion over real transports: a nats-server of the test's own and the Kafka broker of
scripts/kafka.sh, consumed by service instances on the session's PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from aiokafka import AIOKafkaConsumer
from nats.errors import TimeoutError as NatsTimeout

from database_service.ingest.pipeline import Inbound, Prepared
from database_service_client import event_id_for, tick
from database_service_client._proto import ingest_pb2
from tests.fix_ingest import IngestEnv
from tests.fix_kafka import PrivateKafka
from tests.fix_service import TenantFactory

START = dt.datetime(2026, 11, 25, 9, tzinfo=dt.UTC)


def make_ticks(tenant_id: str, n: int, *, seed: str = "s", start: int = 0) -> list[ingest_pb2.Tick]:
    return [
        tick(
            tenant_id,
            f"SYM{i % 5}",
            START + dt.timedelta(milliseconds=i),
            bid=1.1 + (i % 100) * 1e-5,
            ask=1.1003 + (i % 100) * 1e-5,
            volume=i % 9 + 1,
            user_id="u1",
            event_id=event_id_for(tenant_id, seed, i),
        )
        for i in range(start, start + n)
    ]


async def test_ticks_published_on_both_transports_are_stored_exactly_once(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("both")
    token = await ingest_env.token([tenant.tenant_id])
    service = await ingest_env.instance()
    ticks = make_ticks(tenant.tenant_id, 10_000)
    async with ingest_env.publisher(token) as publisher:
        report = await publisher.publish_ticks(ticks, batch_size=500)
    assert report.ok, report.to_dict()
    assert await ingest_env.wait_ticks(tenant.tenant_id, 10_000) == 10_000
    stats = {t: service.ingest.stats(t) for t in ("nats", "kafka")}
    # Each transport delivered every record; together they stored each once.
    assert stats["nats"].records == stats["kafka"].records == 10_000
    assert stats["nats"].stored + stats["kafka"].stored == 10_000
    assert stats["nats"].duplicates + stats["kafka"].duplicates == 10_000
    # Publishing the same events again (a producer retry) changes nothing.
    async with ingest_env.publisher(token) as publisher:
        await publisher.publish_ticks(ticks[:2_000], batch_size=500)
    assert await ingest_env.wait_ticks(tenant.tenant_id, 10_001, timeout=3) == 10_000
    health = await service.health.document()
    assert health["dependencies"]["ingestion"]["status"] == "healthy"
    assert health["dependencies"]["kafka"]["status"] == "healthy"


async def test_poison_messages_are_dead_lettered_without_blocking_the_stream(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("poison")
    token = await ingest_env.token([tenant.tenant_id])
    await ingest_env.instance()
    nc = await nats.connect(ingest_env.nats.url)
    try:
        js = nc.jetstream()
        garbage = b"\x0a\xff\xff\xff garbage"
        await js.publish(
            "database.trading-data", garbage, headers={"Authorization": f"Bearer {token}"}
        )
        await js.publish("database.trading-data", b"\x01\x02", headers={})  # no token either
        unknown = ingest_pb2.IngestBatch(ticks=make_ticks("no_such_tenant", 3)).SerializeToString()
        await js.publish(
            "database.trading-data", unknown, headers={"Authorization": f"Bearer {token}"}
        )
        async with ingest_env.publisher(token, kafka=False) as publisher:
            await publisher.publish_ticks(make_ticks(tenant.tenant_id, 300), batch_size=100)
        assert await ingest_env.wait_ticks(tenant.tenant_id, 300) == 300
        codes = sorted(d.code for d in await ingest_env.core.dead_letters.list(limit=10_000)
                       if d.payload in (garbage, b"\x01\x02") or d.tenant_id == "no_such_tenant")  # fmt: skip
        assert codes == ["bad_protobuf", "permission_denied", "permission_denied",
                         "permission_denied", "unauthenticated"], codes  # fmt: skip
        # The dead letters were announced on the dead-letter subject as well.
        dead = await js.stream_info("DATABASE_INGEST_DEAD_LETTERS")
        assert dead.state.messages == 5
        # Poison was terminated, not left to be redelivered: nothing is pending.
        info = await js.consumer_info("DATABASE_INGEST", "database-service-ingest")
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await nc.close()


async def test_two_instances_share_one_stream_without_double_writing(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    # Kafka keys by tenant (one tenant's records stay in order), so several tenants spread the
    # records over the partitions the two members split between them.
    tenants = [(await new_tenant("pair")).tenant_id for _ in range(6)]
    token = await ingest_env.token(tenants)
    first = await ingest_env.instance(ingest_batch_messages=2)
    second = await ingest_env.instance(ingest_batch_messages=2)
    members = (first.ingest.stats("kafka"), second.ingest.stats("kafka"))
    for _ in range(150):  # the group settles: every partition owned by exactly one member
        owned = [p for m in members for p in m.partitions]
        if len(owned) == 8 and len(set(owned)) == 8 and all(m.partitions for m in members):
            break
        await asyncio.sleep(0.1)
    assert all(m.partitions for m in members), [m.partitions for m in members]
    records = [t for tenant_id in tenants for t in make_ticks(tenant_id, 1_000)]
    async with ingest_env.publisher(token) as publisher:
        await publisher.publish_ticks(records, batch_size=100)
    for tenant_id in tenants:
        assert await ingest_env.wait_ticks(tenant_id, 1_000) == 1_000
    for transport in ("nats", "kafka"):
        a, b = first.ingest.stats(transport), second.ingest.stats(transport)
        assert a.records + b.records == 6_000, transport  # each message went to one member
    nats_a, nats_b = first.ingest.stats("nats"), second.ingest.stats("nats")
    assert nats_a.records > 0 and nats_b.records > 0, (nats_a.records, nats_b.records)
    stored = sum(app.ingest.stats(t).stored for app in (first, second) for t in ("nats", "kafka"))
    assert stored == 6_000


async def test_nats_stopped_kafka_carries_on_and_nats_catches_up_when_back(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("natsdown")
    token = await ingest_env.token([tenant.tenant_id])
    service = await ingest_env.instance()
    async with ingest_env.publisher(token) as publisher:
        await publisher.publish_ticks(make_ticks(tenant.tenant_id, 1_000), batch_size=250)
        assert await ingest_env.wait_ticks(tenant.tenant_id, 1_000) == 1_000
        await ingest_env.nats.stop()
        report = await publisher.publish_ticks(
            make_ticks(tenant.tenant_id, 2_000, start=1_000), batch_size=250
        )
        assert report.transports["kafka"].records == 2_000
        assert report.transports["nats"].errors
        assert await ingest_env.wait_ticks(tenant.tenant_id, 3_000) == 3_000
        health = await service.health.document()
        assert health["dependencies"]["nats"]["status"] == "unhealthy"
        assert health["dependencies"]["ingestion"]["status"] == "degraded"
    await ingest_env.nats.start()
    # NATS back: the consumer reconnects by itself and takes new records.
    async with ingest_env.publisher(token, kafka=False) as publisher:
        await publisher.publish_ticks(
            make_ticks(tenant.tenant_id, 500, start=3_000), batch_size=250
        )
    assert await ingest_env.wait_ticks(tenant.tenant_id, 3_500) == 3_500
    for _ in range(50):
        if service.ingest.stats("nats").state == "running":
            break
        await asyncio.sleep(0.2)
    assert service.ingest.stats("nats").state == "running"


async def test_kafka_stopped_nats_carries_on_and_kafka_catches_up_when_back(
    ingest_env: IngestEnv, new_tenant: TenantFactory, private_kafka: PrivateKafka
) -> None:
    env = dataclasses.replace(ingest_env, kafka_bootstrap=private_kafka.bootstrap)
    tenant = await new_tenant("kafkadown")
    token = await env.token([tenant.tenant_id])
    service = await env.instance()
    async with env.publisher(token) as publisher:
        await publisher.publish_ticks(make_ticks(tenant.tenant_id, 1_000), batch_size=250)
    assert await env.wait_ticks(tenant.tenant_id, 1_000) == 1_000
    await asyncio.to_thread(private_kafka.stop)
    health = await service.health.document()
    assert health["dependencies"]["kafka"]["status"] == "unhealthy"
    async with env.publisher(token, kafka=False) as publisher:
        await publisher.publish_ticks(
            make_ticks(tenant.tenant_id, 2_000, start=1_000), batch_size=250
        )
    assert await env.wait_ticks(tenant.tenant_id, 3_000) == 3_000  # NATS alone
    await asyncio.to_thread(private_kafka.start)
    # Kafka back: the consumer resumes by itself; what only Kafka carries gets stored.
    async with env.publisher(token, nats=False) as publisher:
        report = await publisher.publish_ticks(
            make_ticks(tenant.tenant_id, 500, start=3_000), batch_size=250
        )
    assert report.ok, report.to_dict()
    assert await env.wait_ticks(tenant.tenant_id, 3_500, timeout=90) == 3_500
    assert (await service.health.document())["dependencies"]["kafka"]["status"] == "healthy"


async def test_kafka_dead_letters_are_announced_on_the_dead_letter_topic(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("kdl")
    token = await ingest_env.token([tenant.tenant_id])
    await ingest_env.instance(nats=False)
    bad = make_ticks(tenant.tenant_id, 2)
    bad[1].user_id = "x" * 200  # varchar(50)
    async with ingest_env.publisher(token, nats=False) as publisher:
        await publisher.publish_ticks(bad, batch_size=10)
    assert await ingest_env.wait_ticks(tenant.tenant_id, 1) == 1
    consumer = AIOKafkaConsumer(
        f"{ingest_env.prefix}database-dead-letter",
        bootstrap_servers=ingest_env.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"{ingest_env.prefix}reader",
    )
    await consumer.start()
    try:
        records = await consumer.getmany(timeout_ms=10_000)
    finally:
        await consumer.stop()
    letters = [r for rs in records.values() for r in rs]
    assert len(letters) == 1
    headers = dict(letters[0].headers)
    assert headers["dbsvc-code"] == b"data_exception"
    assert b"SQLSTATE 22001" in headers["dbsvc-reason"]
    replayable = ingest_pb2.IngestBatch.FromString(letters[0].value)
    assert replayable.ticks[0].event_id == bad[1].event_id


async def test_ingest_load_publishes_to_both_transports_and_a_rerun_stores_nothing_twice(
    ingest_env: IngestEnv, new_tenant: TenantFactory, tmp_path: Path
) -> None:
    tenant = await new_tenant("load")
    token = await ingest_env.token([tenant.tenant_id])
    await ingest_env.instance()
    env = {
        **os.environ,
        "DBSVC_DATA_DIR": str(tmp_path / "cli"),
        "DBSVC_NATS_URL": ingest_env.nats.url,
        "DBSVC_KAFKA_BOOTSTRAP": ingest_env.kafka_bootstrap,
        "DBSVC_INGEST_KAFKA_TOPICS": json.dumps(list(ingest_env.topics.values())),
    }
    command = [
        str(Path(sys.executable).parent / "database-service"), "ingest-load",
        "--tenant", tenant.tenant_id, "--ticks", "3000", "--batch", "500", "--seed", "7",
        "--token", token,
    ]  # fmt: skip
    for _ in range(2):
        done = await asyncio.to_thread(
            subprocess.run, command, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["transports"]["nats"]["acked_ticks"] == 3000
        assert summary["transports"]["kafka"]["acked_ticks"] == 3000
        assert "100% 3000/3000 ticks" in done.stderr  # the progress bar's last line
        assert await ingest_env.wait_ticks(tenant.tenant_id, 3000) == 3000


async def test_a_fetched_batch_stays_in_progress_while_it_is_prepared(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    # Preparing a batch can wait as long as storing one: authentication waits for PostgreSQL
    # while it is down. JetStream must not hand the batch to another instance meanwhile.
    tenant = await new_tenant("held")
    token = await ingest_env.token([tenant.tenant_id])
    ack_wait = 2.0
    service = await ingest_env.instance(kafka=False, ingest_ack_wait_seconds=ack_wait)
    prepare = service.ingest.prepare
    held, release = asyncio.Event(), asyncio.Event()

    async def stalled(transport: str, messages: list[Inbound]) -> Prepared:
        held.set()
        await release.wait()
        return await prepare(transport, messages)

    service.ingest.prepare = stalled  # type: ignore[method-assign]
    async with ingest_env.publisher(token, kafka=False) as publisher:
        await publisher.publish_ticks(make_ticks(tenant.tenant_id, 10), batch_size=10)
    async with asyncio.timeout(30):
        await held.wait()
    # Another member of the durable consumer asks for messages for three ack waits: none.
    nc = await nats.connect(ingest_env.nats.url)
    try:
        other = await nc.jetstream().pull_subscribe_bind(
            durable="database-service-ingest", stream="DATABASE_INGEST"
        )
        with pytest.raises((NatsTimeout, TimeoutError)):
            await other.fetch(1, timeout=3 * ack_wait)
    finally:
        release.set()
        await nc.close()
    assert await ingest_env.wait_ticks(tenant.tenant_id, 10) == 10
    assert service.ingest.stats("nats").messages == 1


async def test_a_poison_record_on_both_transports_is_one_dead_letter_announced_once(
    ingest_env: IngestEnv, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dlonce")
    token = await ingest_env.token([tenant.tenant_id])
    service = await ingest_env.instance()
    records = make_ticks(tenant.tenant_id, 3, seed="dl")
    records[1].user_id = "x" * 200  # varchar(50)
    async with ingest_env.publisher(token) as publisher:
        report = await publisher.publish_ticks(records, batch_size=10)
    assert report.ok, report.to_dict()
    assert await ingest_env.wait_ticks(tenant.tenant_id, 2) == 2
    for _ in range(100):  # both transports delivered it
        if all(service.ingest.stats(t).records == 3 for t in ("nats", "kafka")):
            break
        await asyncio.sleep(0.1)
    assert [service.ingest.stats(t).records for t in ("nats", "kafka")] == [3, 3]
    letters = await ingest_env.core.dead_letters.list(tenant_id=tenant.tenant_id, limit=100)
    assert [(d.code, d.event_id) for d in letters] == [("data_exception", records[1].event_id)]
    # Announced by whichever transport stored it, not by both.
    nc = await nats.connect(ingest_env.nats.url)
    try:
        on_nats = (await nc.jetstream().stream_info("DATABASE_INGEST_DEAD_LETTERS")).state.messages
    finally:
        await nc.close()
    consumer = AIOKafkaConsumer(
        f"{ingest_env.prefix}database-dead-letter",
        bootstrap_servers=ingest_env.kafka_bootstrap,
        auto_offset_reset="earliest",
        group_id=f"{ingest_env.prefix}reader",
    )
    await consumer.start()
    try:
        on_kafka = sum(len(r) for r in (await consumer.getmany(timeout_ms=5_000)).values())
    finally:
        await consumer.stop()
    assert (on_nats, on_kafka) in {(1, 0), (0, 1)}
