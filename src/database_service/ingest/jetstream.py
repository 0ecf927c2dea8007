"""The NATS JetStream consumer: a durable pull consumer that several instances share.

The stream and the durable consumer are created if missing (subjects, retention and max age from
settings). The loop pulls at most ``batch_messages`` messages, hands them to the pipeline, and
acknowledges only after the pipeline returns (committed); a message that is poison as a whole is
``term``-ed, so JetStream never redelivers it. While the pipeline waits for PostgreSQL, the held
messages are marked in progress so JetStream does not hand them to another instance meanwhile,
and nothing more is pulled. Losing NATS only pauses this loop; the client reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from database_service.ingest.deadletters import NewDeadLetter
from database_service.ingest.pipeline import Inbound, IngestPipeline, Verdict

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


class JetStreamIngest:
    def __init__(self, settings: JetStreamSettings, pipeline: IngestPipeline) -> None:
        self._s = settings
        self._pipeline = pipeline
        self._stats = pipeline.stats(TRANSPORT)
        self._nc: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> JetStreamIngest:
        self._task = asyncio.create_task(self._run(), name="ingest-nats")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Let the batch in hand commit and be acknowledged; whatever is cut short is
        # redelivered later and deduplicated.
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            try:
                sub = await self._subscribe()
                delay = 0.2
                await self._consume(sub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._stats.state = "disconnected"
                self._stats.errors += 1
                self._stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("nats ingest: %s; retrying in %.1fs", self._stats.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
        lag_checked = 0.0
        while not self._stopping:
            if time.monotonic() - lag_checked > 2.0:
                info = await sub.consumer_info()
                self._stats.lag = info.num_pending + info.num_ack_pending
                lag_checked = time.monotonic()
            try:
                msgs = await sub.fetch(self._s.batch_messages, timeout=1.0)
            except NatsTimeout:
                continue
            inbound = [
                Inbound(m.data, m.subject, (m.headers or {}).get("Authorization")) for m in msgs
            ]
            async with self._keep_alive(msgs):
                verdicts = await self._pipeline.process(TRANSPORT, inbound, announce=self._announce)
            for msg, verdict in zip(msgs, verdicts, strict=True):
                await (msg.ack() if verdict is Verdict.ACK else msg.term())

    @contextlib.asynccontextmanager
    async def _keep_alive(self, msgs: Sequence[Any]) -> AsyncIterator[None]:
        """Tell JetStream the held messages are still being worked on (ack wait resets)."""

        async def beat() -> None:
            while True:
                await asyncio.sleep(self._s.ack_wait_seconds / 3)
                for msg in msgs:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        task = asyncio.create_task(beat())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

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
