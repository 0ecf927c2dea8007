"""The NATS JetStream consumer: a durable pull consumer that several instances share.

The stream and the durable consumer are created if missing (subjects, retention and max age from
settings). The loop pulls at most ``batch_messages`` messages, hands them to the pipeline, and
acknowledges only after the pipeline returns (committed); a message that is poison as a whole is
``term``-ed, so JetStream never redelivers it. From the moment a batch is fetched until it is
acknowledged (decoding and authenticating it, which waits for PostgreSQL when it is down;
waiting for the batch before it; storing it), its messages are marked in progress every third of
the ack wait, so JetStream does not hand them to another instance meanwhile; while the pipeline
waits for PostgreSQL nothing more is pulled. Losing NATS only pauses this loop; the client
reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from database_service.ingest.consumer import Consumer, Overlap
from database_service.ingest.deadletters import NewDeadLetter
from database_service.ingest.pipeline import Inbound, IngestPipeline, Prepared, Verdict

__all__ = ["JetStreamIngest", "JetStreamSettings"]

log = logging.getLogger(__name__)

TRANSPORT = "nats"


@dataclass(frozen=True, slots=True)
class JetStreamSettings:
    url: str
    stream: str
    subjects: Sequence[str]
    durable: str
    dead_letter_subject: str
    max_age_seconds: float
    ack_wait_seconds: float
    batch_messages: int
    max_ack_pending: int
    tls: ssl.SSLContext | None = None  # a tls:// URL without it: the system trust store


class JetStreamIngest(Consumer):
    transport = TRANSPORT

    def __init__(self, settings: JetStreamSettings, pipeline: IngestPipeline) -> None:
        super().__init__(pipeline)
        self._s = settings
        self._nc: Any = None
        self._beats: set[asyncio.Task[None]] = set()  # held batches' in-progress tasks

    async def _session(self) -> None:
        await self._consume(await self._subscribe())

    async def _close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _subscribe(self) -> Any:
        s = self._s
        if self._nc is None:
            self._nc = await nats.connect(
                s.url,
                name="database-service-ingest",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                error_cb=self._on_error,
                tls=s.tls,
            )
        js = self._nc.jetstream()
        await _ensure_stream(
            js,
            StreamConfig(
                name=s.stream,
                subjects=list(s.subjects),
                retention=RetentionPolicy.LIMITS,
                max_age=s.max_age_seconds,
                duplicate_window=min(120.0, s.max_age_seconds),
            ),
        )
        await _ensure_stream(
            js,
            StreamConfig(
                name=f"{s.stream}_DEAD_LETTERS",
                subjects=[s.dead_letter_subject],
                retention=RetentionPolicy.LIMITS,
                max_age=s.max_age_seconds,
            ),
        )
        await js.add_consumer(
            s.stream,
            config=ConsumerConfig(
                durable_name=s.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=s.ack_wait_seconds,
                max_deliver=-1,
                max_ack_pending=s.max_ack_pending,
                filter_subjects=list(s.subjects),
            ),
        )
        sub = await js.pull_subscribe_bind(durable=s.durable, stream=s.stream)
        self._js = js
        self._stats.state = "running"
        log.info("nats ingest: consuming %s as %s", ", ".join(s.subjects), s.durable)
        return sub

    async def _consume(self, sub: Any) -> None:
        overlap = Overlap()
        try:
            lag_checked = 0.0
            while not self._stopping:
                if not self._nc.is_connected:  # the client reconnects by itself; say so meanwhile
                    self._stats.state = "disconnected"
                    await asyncio.sleep(0.2)
                    continue
                if self._stats.state == "disconnected":
                    self._stats.state = "running"
                if time.monotonic() - lag_checked > 2.0:
                    lag_checked = time.monotonic()
                    with contextlib.suppress(NatsTimeout, TimeoutError):  # lag can wait
                        info = await sub.consumer_info()
                        self._stats.lag = info.num_pending + info.num_ack_pending
                try:
                    msgs = await sub.fetch(self._s.batch_messages, timeout=1.0)
                except (NatsTimeout, TimeoutError):  # nothing arrived (nats-py raises either)
                    continue
                beat = self._keep_alive(msgs)  # held from now on: in progress until acknowledged
                spans = self._pipeline.spans  # trace headers are read only while traces are on
                inbound = [
                    Inbound(
                        m.data,
                        m.subject,
                        (m.headers or {}).get("Authorization"),
                        None if spans is None else spans.carrier((m.headers or {}).items()),
                    )
                    for m in msgs
                ]
                prepared = await self._pipeline.prepare(TRANSPORT, inbound)
                finish = self._finish(msgs, prepared, beat)
                try:
                    await overlap.submit(finish)
                except BaseException:  # the batch before failed: this one never starts
                    finish.close()
                    raise
            await overlap.drain()
        finally:
            await overlap.cancel()  # unacknowledged: JetStream redelivers, the ids dedupe
            for beat in list(self._beats):  # batches that never finished
                beat.cancel()

    async def _finish(
        self, msgs: Sequence[Any], prepared: Prepared, beat: asyncio.Task[None]
    ) -> None:
        try:
            verdicts = await self._pipeline.store(prepared, announce=self._announce)
        finally:
            beat.cancel()
        for msg, verdict in zip(msgs, verdicts, strict=True):
            await (msg.ack() if verdict is Verdict.ACK else msg.term())

    def _keep_alive(self, msgs: Sequence[Any]) -> asyncio.Task[None]:
        """Tell JetStream every third of the ack wait that the messages are still being worked
        on (their ack wait starts again), until the task is cancelled."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self._s.ack_wait_seconds / 3)
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        task = asyncio.create_task(beat(), name="nats-ingest-in-progress")
        self._beats.add(task)
        task.add_done_callback(self._beats.discard)
        return task

    async def _announce(self, letters: Sequence[NewDeadLetter]) -> None:
        for letter in letters:
            await self._js.publish(
                self._s.dead_letter_subject,
                letter.payload,
                headers={
                    "Dbsvc-Code": letter.code,
                    "Dbsvc-Reason": json.dumps(letter.reason[:1000]),
                    "Dbsvc-Tenant": letter.tenant_id or "",
                    "Dbsvc-Source": letter.source[:200],
                },
            )

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats ingest: client error: %s", exc)


async def _ensure_stream(js: Any, config: StreamConfig) -> None:
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
    else:
        await js.update_stream(config)
