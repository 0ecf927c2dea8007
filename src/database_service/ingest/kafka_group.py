"""The Kafka consumer: one member of a consumer group, offsets committed after PostgreSQL.

The group spreads the topics' partitions across service instances. Offsets are committed by
hand, only after the pipeline has committed the batch's records (or their dead letters); auto
commit is off. On a rebalance, revocation waits for the batch in hand to finish and commit, so
a partition changes hands at a committed offset; if a commit still fails (the member was
evicted), the new owner reads the batch again and the unique event ids make that harmless.

aiokafka rather than confluent-kafka: it is asyncio-native (confluent's consumer blocks and
would need a thread per poll) and ``bench/kafka_clients.py`` measures both on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, TopicAlreadyExistsError

from database_service.ingest.consumer import Consumer, Overlap
from database_service.ingest.deadletters import NewDeadLetter
from database_service.ingest.pipeline import (
    Inbound,
    IngestPipeline,
    Prepared,
    TransportStats,
)

__all__ = ["KafkaIngest", "KafkaSettings"]

log = logging.getLogger(__name__)

TRANSPORT = "kafka"


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    bootstrap: str
    topics: Sequence[str]
    group: str
    dead_letter_topic: str
    partitions: int
    max_records: int
    tls: ssl.SSLContext | None = None  # security protocol SSL with it, else plaintext

    def client_options(self) -> dict[str, Any]:
        """What every aiokafka client of these settings is given."""
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap}
        if self.tls is not None:
            options |= {"security_protocol": "SSL", "ssl_context": self.tls}
        return options


class _WaitForBatch(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, lock: asyncio.Lock, stats: TransportStats) -> None:
        self._lock = lock
        self._stats = stats

    async def on_partitions_revoked(self, revoked: Any) -> None:
        async with self._lock:  # the batch in hand commits before its partitions move
            self._stats.partitions = []

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._stats.partitions = sorted(f"{tp.topic}/{tp.partition}" for tp in assigned)
        log.info("kafka ingest: assigned %s", ", ".join(self._stats.partitions) or "nothing")


class KafkaIngest(Consumer):
    transport = TRANSPORT
    stop_grace_seconds = 10.0

    def __init__(self, settings: KafkaSettings, pipeline: IngestPipeline) -> None:
        super().__init__(pipeline)
        self._s = settings
        self._lock = asyncio.Lock()
        self._producer: Any = None

    async def _session(self) -> None:
        consumer = producer = None
        try:
            await self._ensure_topics()
            producer = AIOKafkaProducer(**self._s.client_options(), acks="all")
            await producer.start()
            self._producer = producer
            consumer = AIOKafkaConsumer(
                **self._s.client_options(),
                group_id=self._s.group,
                client_id="database-service-ingest",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self._s.max_records,
                session_timeout_ms=10_000,
                heartbeat_interval_ms=2_000,
            )
            consumer.subscribe(
                list(self._s.topics), listener=_WaitForBatch(self._lock, self._stats)
            )
            await consumer.start()
            self._stats.state = "running"
            await self._consume(consumer)
        finally:
            # Both are stopped even if a stop is cancelled (shutdown cancels the session); the
            # exception that ended the session still propagates after this block.
            for client in (consumer, producer):
                if client is not None:
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await client.stop()

    async def reachable(self, timeout: float = 2.0) -> str | None:
        """None when a broker answers a metadata request now, else why not (for health: the
        consumer itself only notices a lost broker through its own retries)."""
        if self._producer is None:
            return self._stats.last_error or "not connected yet"
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), timeout)
        except Exception as exc:  # any failure is the answer
            return f"{type(exc).__name__}: {exc}"[:300]
        return None

    async def _ensure_topics(self) -> None:
        admin = AIOKafkaAdminClient(**self._s.client_options())
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            wanted = [*self._s.topics, self._s.dead_letter_topic]
            missing = [t for t in wanted if t not in existing]
            if missing:
                with contextlib.suppress(TopicAlreadyExistsError):  # another instance won
                    await admin.create_topics([NewTopic(t, self._s.partitions, 1) for t in missing])
        finally:
            await admin.close()

    async def _consume(self, consumer: Any) -> None:
        overlap = Overlap()
        try:
            lag_checked = 0.0
            while not self._stopping:
                batches = await consumer.getmany(timeout_ms=1000, max_records=self._s.max_records)
                if time.monotonic() - lag_checked > 2.0:
                    self._stats.lag = await _lag(consumer)
                    lag_checked = time.monotonic()
                if not batches:
                    continue
                spans = self._pipeline.spans  # trace headers are read only while traces are on
                inbound = [
                    Inbound(
                        r.value or b"",
                        f"{r.topic}/{r.partition}@{r.offset}",
                        _auth(r.headers),
                        None if spans is None else spans.carrier(r.headers or ()),
                    )
                    for records in batches.values()
                    for r in records
                ]
                prepared = await self._pipeline.prepare(TRANSPORT, inbound)
                offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
                await overlap.submit(self._finish(consumer, prepared, offsets))
            await overlap.drain()
        finally:
            await overlap.cancel()  # uncommitted: the group re-reads it, the ids dedupe

    async def _finish(self, consumer: Any, prepared: Prepared, offsets: dict[Any, int]) -> None:
        async with self._lock:
            # A poison message is dead-lettered whole; committing past it is Kafka's 'term'.
            await self._pipeline.store(prepared, announce=self._announce)
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                log.warning("kafka ingest: commit after rebalance failed (%s); the new owner "
                            "re-reads the batch and finds it stored", exc)  # fmt: skip

    async def _announce(self, letters: Sequence[NewDeadLetter]) -> None:
        for letter in letters:
            await self._producer.send(
                self._s.dead_letter_topic,
                letter.payload,
                key=(letter.tenant_id or "").encode(),
                headers=[
                    ("dbsvc-code", letter.code.encode()),
                    ("dbsvc-reason", letter.reason[:1000].encode()),
                    ("dbsvc-source", letter.source[:200].encode()),
                ],
            )
        await self._producer.flush()


def _auth(headers: Sequence[tuple[str, bytes]] | None) -> str | None:
    for key, value in headers or ():
        if key.lower() == "authorization":
            return value.decode(errors="replace")
    return None


async def _lag(consumer: Any) -> int:
    """Records behind the partitions' high watermarks (as of the last fetch)."""
    total = 0
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is not None:
            total += max(0, high - await consumer.position(tp))
    return total
