"""``MarketDataPublisher``: publish market data for the Database Service to ingest.

Records (``Tick``, ``Prediction``, ``TradingSignal``, ``TenantRow`` of
``database_service.v1``) are packed into ``IngestBatch`` messages, and each batch's bytes go to
NATS JetStream and Kafka at the same time::

    async with MarketDataPublisher(token, nats_url="nats://127.0.0.1:4222",
                                   kafka_bootstrap="127.0.0.1:9092") as publisher:
        report = await publisher.publish_ticks(
            tick("abc", "EURUSD", now, bid=1.0841, ask=1.0843) for now in times
        )

Every record carries a stable event id; the service stores each event once per tenant however
often and on however many transports it arrives, so publishing twice (or on both transports) is
safe. Use :func:`event_id_for` for ids derived from the tenant and your own keys, so a re-run
re-publishes the same events instead of new ones.

A batch holds the records of one tenant and is keyed by that tenant on Kafka, so one tenant's
records keep their order in one partition. A transport that fails does not stop the other: the
:class:`PublishReport` counts what each acknowledged and keeps the errors; :class:`PublishError`
is raised only when every configured transport failed for a batch.

Needs the ``publish`` extra (``nats-py``, ``aiokafka``), imported only when a publisher connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import ssl
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from time import monotonic, time_ns
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import grpc

from database_service_client._proto import ingest_pb2
from database_service_client.errors import DatabaseServiceError

if TYPE_CHECKING:
    from types import TracebackType

    from nats.aio.client import Client as NatsClient
    from nats.js.client import JetStreamContext

__all__ = [
    "DEFAULT_KAFKA_TOPICS",
    "DEFAULT_NATS_SUBJECTS",
    "EVENT_ID_NAMESPACE",
    "Kind",
    "MarketDataPublisher",
    "PublishError",
    "PublishReport",
    "Record",
    "TransportReport",
    "batch_id",
    "batch_key",
    "event_id_for",
    "iter_batches",
    "new_event_id",
    "prediction",
    "tick",
]

log = logging.getLogger(__name__)

Kind: TypeAlias = Literal["trading", "analytics"]
Record: TypeAlias = (
    ingest_pb2.Tick | ingest_pb2.Prediction | ingest_pb2.TradingSignal | ingest_pb2.TenantRow
)

DEFAULT_NATS_SUBJECTS: Mapping[Kind, str] = {
    "trading": "database.trading-data",
    "analytics": "database.real-time-analytics",
}
DEFAULT_KAFKA_TOPICS: Mapping[Kind, str] = {
    "trading": "database-trading-data",
    "analytics": "database-analytics-data",
}
# uuid5(NAMESPACE_URL, "urn:database-service:ingest:event-id"); fixed forever: ids derive from it.
EVENT_ID_NAMESPACE = uuid.UUID("eaeb40c3-87d9-514e-b26f-53e44cb76a24")
_NAMESPACE_BYTES = EVENT_ID_NAMESPACE.bytes
# What the service accepts as a tenant id (no "/": the tenant cannot run into the key's parts).
_TENANT_ID = re.compile(r"[a-z][a-z0-9_]{1,40}")
# Below the 1 MiB both NATS (max_payload) and Kafka (max.message.bytes) accept by default.
DEFAULT_MAX_BATCH_BYTES = 900_000
MAX_ERRORS_KEPT = 20

# Which IngestBatch field holds a record type, and which transport subject/topic it travels on.
_FIELDS: dict[type[Any], tuple[str, Kind]] = {
    ingest_pb2.Tick: ("ticks", "trading"),
    ingest_pb2.Prediction: ("predictions", "analytics"),
    ingest_pb2.TradingSignal: ("signals", "trading"),
    ingest_pb2.TenantRow: ("rows", "trading"),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_WIRE_OVERHEAD = 6  # field tag + length varint of one record inside the batch


# --- records -----------------------------------------------------------------------------------


def event_id_for(tenant_id: str, *key: object) -> str:
    """A stable event id for a record of ``tenant_id``, from your own key: e.g.
    ``event_id_for("abc", "feed-1", "EURUSD", seq)``. The same tenant and key give the same id,
    so re-publishing them stores nothing twice; two tenants never get the same id, whatever
    their keys (the tenant id leads the name, and a tenant id has no ``/``, which joins the
    parts), so two tenants fed the same market data keep their events apart.

    ``str(uuid5(EVENT_ID_NAMESPACE, "/".join([tenant_id, *key])))``, computed without
    ``uuid.UUID``, which is twice as slow (a load generator makes hundreds of thousands): an id
    from an earlier version's ``event_id_for(tenant_id, *key)`` is the same id.

    Raises ``ValueError`` when ``tenant_id`` is not a tenant id or no key follows it: the call
    of earlier versions without the tenant, ``event_id_for("feed-1", "EURUSD", seq)``, gave every
    tenant the same ids; pass the record's tenant first."""
    if not (isinstance(tenant_id, str) and _is_tenant_id(tenant_id)):
        raise ValueError(
            f"event_id_for(tenant_id, *key): {tenant_id!r} is not a tenant id. The record's tenant"
            " comes first, so that two tenants' ids never collide: e.g."
            " event_id_for('abc', 'feed-1', 'EURUSD', 42) (ids without the tenant are no longer"
            " made)"
        )
    if not key:
        raise ValueError("event_id_for(tenant_id, *key) needs a key after the tenant id")
    name = "/".join([tenant_id, *[str(p) for p in key]])
    digest = hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()
    return _uuid_text(digest, 0x50)


@functools.lru_cache(maxsize=1024)
def _is_tenant_id(value: str) -> bool:
    return _TENANT_ID.fullmatch(value) is not None


def new_event_id() -> str:
    """A random event id (UUID v4 text)."""
    return _uuid_text(os.urandom(16), 0x40)


def _uuid_text(raw: bytes, version: int) -> str:
    b = bytearray(raw[:16])
    b[6] = (b[6] & 0x0F) | version
    b[8] = (b[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def unix_us(time: datetime | int) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC, an int as microseconds."""
    if isinstance(time, int):
        return time
    if time.tzinfo is None:
        time = time.replace(tzinfo=UTC)
    return (time - _EPOCH) // _MICROSECOND


def tick(
    tenant_id: str,
    symbol: str,
    time: datetime | int,
    *,
    bid: float | None = None,
    ask: float | None = None,
    volume: int | None = None,
    spread: float | None = None,
    user_id: str = "",
    event_id: str | None = None,
) -> ingest_pb2.Tick:
    """One tick. ``time``: a datetime (naive = UTC) or microseconds since the epoch; the event id
    is a new random UUID unless given (see :func:`event_id_for`)."""
    message = ingest_pb2.Tick(
        event_id=event_id or new_event_id(),
        tenant_id=tenant_id,
        user_id=user_id,
        symbol=symbol,
        time_unix_us=unix_us(time),
    )
    if bid is not None:
        message.bid = bid
    if ask is not None:
        message.ask = ask
    if volume is not None:
        message.volume = volume
    if spread is not None:
        message.spread = spread
    return message


def prediction(
    tenant_id: str,
    symbol: str,
    time: datetime | int,
    *,
    prediction_type: str,
    confidence: float,
    model_version: str = "",
    features: Mapping[str, Any] | str | None = None,
    result: Mapping[str, Any] | str | None = None,
    user_id: str = "",
    event_id: str | None = None,
) -> ingest_pb2.Prediction:
    """One AI prediction; ``features`` and ``result`` are JSON objects (a mapping, or JSON text)."""
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    return ingest_pb2.Prediction(
        event_id=event_id or new_event_id(),
        tenant_id=tenant_id,
        user_id=user_id,
        symbol=symbol,
        time_unix_us=unix_us(time),
        prediction_type=prediction_type,
        confidence=confidence,
        model_version=model_version,
        features_json=_json(features),
        result_json=_json(result),
    )


def _json(value: Mapping[str, Any] | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


# --- batches -----------------------------------------------------------------------------------


def batch_key(batch: ingest_pb2.IngestBatch) -> bytes | None:
    """The Kafka key of a batch: the tenant id of its first record (None for an empty batch)."""
    for name in ("ticks", "predictions", "signals", "rows"):
        records = getattr(batch, name)
        if records:
            tenant: str = records[0].tenant_id
            return tenant.encode()
    return None


def batch_id(data: bytes) -> str:
    """The batch id of serialized batch bytes (JetStream's ``Nats-Msg-Id``): the same bytes, e.g.
    a retry, get the same id, which JetStream de-duplicates within its window."""
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _record_count(batch: ingest_pb2.IngestBatch) -> int:
    return len(batch.ticks) + len(batch.predictions) + len(batch.signals) + len(batch.rows)


@dataclass(slots=True)
class _Open:
    """The batch being filled for one (kind, tenant)."""

    kind: Kind
    records: dict[str, list[Record]] = field(default_factory=dict)
    count: int = 0
    size: int = 0

    def build(self, producer: str) -> tuple[Kind, ingest_pb2.IngestBatch]:
        batch = ingest_pb2.IngestBatch(producer=producer)
        for name, records in self.records.items():
            getattr(batch, name).extend(records)
        return self.kind, batch


def iter_batches(
    records: Iterable[Record],
    *,
    batch_size: int = 1000,
    producer: str = "database-service-client",
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    max_buffered: int | None = None,
) -> Iterator[tuple[Kind, ingest_pb2.IngestBatch]]:
    """Pack records into ``(kind, IngestBatch)``: at most ``batch_size`` records and about
    ``max_batch_bytes`` serialized bytes each (a larger single record gets a batch of its own),
    one tenant per batch, each tenant's records in their order. Predictions travel as
    ``analytics``, ticks, signals and rows as ``trading``.

    Records of several tenants are gathered per tenant; when ``max_buffered`` records (default
    ``4 * batch_size``) are waiting, every open batch is emitted, which bounds memory."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    limit = max_buffered if max_buffered is not None else 4 * batch_size
    open_batches: dict[tuple[Kind, str], _Open] = {}
    buffered = 0
    for record in records:
        try:
            name, kind = _FIELDS[type(record)]
        except KeyError:
            raise TypeError(f"not an ingestion record: {type(record).__name__}") from None
        key = (kind, record.tenant_id)
        size = record.ByteSize() + _WIRE_OVERHEAD
        current = open_batches.get(key)
        if current is not None and current.size + size > max_batch_bytes:
            buffered -= current.count
            yield open_batches.pop(key).build(producer)
            current = None
        if current is None:
            current = open_batches[key] = _Open(kind)
        current.records.setdefault(name, []).append(record)
        current.count += 1
        current.size += size
        buffered += 1
        if current.count >= batch_size:
            buffered -= current.count
            yield open_batches.pop(key).build(producer)
        elif buffered >= limit:
            for pending in open_batches.values():
                yield pending.build(producer)
            open_batches.clear()
            buffered = 0
    for pending in open_batches.values():
        yield pending.build(producer)


# --- reports -----------------------------------------------------------------------------------


@dataclass(slots=True)
class TransportReport:
    """What one transport acknowledged (JetStream PubAck, Kafka acks=all) and what failed."""

    transport: str
    batches: int = 0
    records: int = 0
    failed_batches: int = 0
    failed_records: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT

    def add(self, other: TransportReport) -> None:
        self.batches += other.batches
        self.records += other.records
        self.failed_batches += other.failed_batches
        self.failed_records += other.failed_records
        room = MAX_ERRORS_KEPT - len(self.errors)
        self.errors.extend(other.errors[: max(room, 0)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "records": self.records,
            "failed_batches": self.failed_batches,
            "failed_records": self.failed_records,
            "errors": list(self.errors),
        }


@dataclass(slots=True)
class PublishReport:
    """One publish call (or several, :meth:`add`-ed): batches and records sent, per transport
    what was acknowledged and the errors."""

    batches: int = 0
    records: int = 0
    seconds: float = 0.0
    transports: dict[str, TransportReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every configured transport acknowledged every batch."""
        return all(t.failed_batches == 0 for t in self.transports.values())

    def add(self, other: PublishReport) -> None:
        self.batches += other.batches
        self.records += other.records
        self.seconds += other.seconds
        for name, report in other.transports.items():
            self.transports.setdefault(name, TransportReport(name)).add(report)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "transports": {name: t.to_dict() for name, t in self.transports.items()},
        }


class PublishError(DatabaseServiceError):
    """Every configured transport failed for a batch; ``report`` holds what was published before
    (and this batch's failures), ``errors`` this batch's error per transport."""

    status = grpc.StatusCode.UNAVAILABLE

    def __init__(
        self, message: str, *, report: PublishReport, errors: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message, code="publish_failed")
        self.report = report
        self.errors = dict(errors or {})


# --- the publisher -----------------------------------------------------------------------------


class MarketDataPublisher:
    """Publishes ``IngestBatch`` messages on NATS JetStream and Kafka at once.

    ``async with MarketDataPublisher(token, nats_url=..., kafka_bootstrap=...) as p:`` connects
    (at least one transport must be given). A transport that cannot connect is reported as an
    error of every batch and the other one is used; if none connects, ``PublishError``.
    ``token`` is a service token with the ``ingest`` scope, sent with every message (NATS header
    ``Authorization``, Kafka header ``authorization``). One batch is in flight at a time; both
    transports get it concurrently and the call returns when both answered.

    A transport that failed a batch (after ``timeout`` seconds; NATS is retried ``nats_retries``
    times, which JetStream de-duplicates by ``Nats-Msg-Id``) is skipped for ``cooldown``
    seconds, its batches counted as failed, so an outage of one does not slow the other down.
    """

    def __init__(
        self,
        token: str,
        *,
        nats_url: str | None = None,
        kafka_bootstrap: str | None = None,
        producer: str = "database-service-client",
        nats_subjects: Mapping[Kind, str] | None = None,
        kafka_topics: Mapping[Kind, str] | None = None,
        timeout: float = 10.0,
        nats_retries: int = 2,
        cooldown: float = 5.0,
        kafka_linger_ms: int = 1,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        nats_tls: ssl.SSLContext | None = None,
        kafka_tls: ssl.SSLContext | None = None,
    ) -> None:
        """``nats_tls``: the TLS context for NATS (a ``tls://`` URL without one uses the system
        trust store); ``kafka_tls``: with it, Kafka is spoken over TLS (security protocol SSL).
        ``ssl.create_default_context(cafile=...)`` and ``load_cert_chain`` make either."""
        if not token:
            raise ValueError("a service token is required")
        if not nats_url and not kafka_bootstrap:
            raise ValueError("give nats_url, kafka_bootstrap or both")
        self.token = token.removeprefix("Bearer ").strip()
        self.nats_url = nats_url or None
        self.kafka_bootstrap = kafka_bootstrap or None
        self.producer = producer
        self.nats_subjects: dict[Kind, str] = {**DEFAULT_NATS_SUBJECTS, **(nats_subjects or {})}
        self.kafka_topics: dict[Kind, str] = {**DEFAULT_KAFKA_TOPICS, **(kafka_topics or {})}
        for kind in (*self.nats_subjects, *self.kafka_topics):
            if kind not in get_args(Kind):
                raise ValueError(f"unknown kind {kind!r}: 'trading' or 'analytics'")
        self.timeout = timeout
        self.nats_retries = nats_retries
        self.cooldown = cooldown
        self.kafka_linger_ms = kafka_linger_ms
        self.max_batch_bytes = max_batch_bytes
        self.nats_tls = nats_tls
        self.kafka_tls = kafka_tls
        self._auth = f"Bearer {self.token}"
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kafka: Any = None  # aiokafka.AIOKafkaProducer (aiokafka has no type information)
        self._down: dict[str, str] = {}  # transport -> why it is not connected
        self._resting: dict[str, tuple[float, str]] = {}  # transport -> (skipped until, why)
        self._entered = False

    @property
    def transports(self) -> tuple[str, ...]:
        """The configured transports, connected or not."""
        configured = (("nats", self.nats_url), ("kafka", self.kafka_bootstrap))
        return tuple(name for name, where in configured if where)

    @property
    def connected(self) -> tuple[str, ...]:
        return tuple(t for t in self.transports if t not in self._down)

    async def __aenter__(self) -> MarketDataPublisher:
        if self._entered:
            raise RuntimeError("a MarketDataPublisher is entered once")
        self._entered = True
        try:
            connects = []
            if self.nats_url:
                connects.append(self._connect_nats(self.nats_url))
            if self.kafka_bootstrap:
                connects.append(self._connect_kafka(self.kafka_bootstrap))
            await asyncio.gather(*connects)
            if not self.connected:
                errors = "; ".join(f"{t}: {e}" for t, e in self._down.items())
                raise PublishError(
                    f"no transport could connect ({errors})",
                    report=PublishReport(),
                    errors=self._down,
                )
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    async def _connect_nats(self, url: str) -> None:
        from nats.aio.client import Client  # noqa: PLC0415 - optional (the ``publish`` extra)

        nc = Client()
        try:
            # Reconnects never stop (a publish fails while the server is away, and works again
            # once it is back); so the first connection gets a deadline of its own.
            await asyncio.wait_for(
                nc.connect(
                    url,
                    name=self.producer,
                    connect_timeout=max(1, round(self.timeout)),
                    reconnect_time_wait=1,
                    max_reconnect_attempts=-1,
                    error_cb=self._nats_error,
                    tls=self.nats_tls,
                ),
                self.timeout,
            )
        except Exception as exc:  # reported; the other transport may still work
            last = nc.last_error
            self._down["nats"] = _describe(exc if last is None or exc is last else last)
            log.warning("NATS %s: cannot connect: %s", url, self._down["nats"])
            with contextlib.suppress(Exception):
                await nc.close()
            return
        self._nc = nc
        self._js = nc.jetstream(timeout=self.timeout)
        self.max_batch_bytes = min(self.max_batch_bytes, nc.max_payload - 4096)

    async def _nats_error(self, exc: Exception) -> None:
        # nats-py's default logs every failed (re)connection attempt with a traceback.
        log.warning("NATS %s: %s", self.nats_url, _describe(exc))

    async def _connect_kafka(self, bootstrap: str) -> None:
        # aiokafka has no type information; unused-ignore: in case mypy is told to skip it.
        from aiokafka import (  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415
            AIOKafkaProducer,
        )

        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            **(
                {"security_protocol": "SSL", "ssl_context": self.kafka_tls}
                if self.kafka_tls is not None
                else {}
            ),
            client_id=self.producer,
            acks="all",
            enable_idempotence=True,
            linger_ms=self.kafka_linger_ms,
            compression_type=None,
            request_timeout_ms=int(self.timeout * 1000),
            max_request_size=max(1_048_576, self.max_batch_bytes + 65_536),
        )
        try:
            await asyncio.wait_for(producer.start(), self.timeout)
        except Exception as exc:  # reported; the other transport may still work
            self._down["kafka"] = _describe(exc)
            log.warning("Kafka %s: cannot connect: %s", bootstrap, self._down["kafka"])
            await producer.stop()
            return
        self._kafka = producer

    async def _close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        kafka, self._kafka = self._kafka, None
        closing = []
        if nc is not None:
            closing.append(nc.close())
        if kafka is not None:
            closing.append(kafka.stop())
        for result in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("closing a transport failed: %s", _describe(result))

    # --- publishing ----------------------------------------------------------------------------

    async def publish_ticks(
        self, ticks: Iterable[ingest_pb2.Tick], *, batch_size: int = 1000
    ) -> PublishReport:
        """Publish ticks in batches of ``batch_size`` (one tenant per batch)."""
        return await self.publish_records(ticks, batch_size=batch_size)

    async def publish_predictions(
        self, predictions: Iterable[ingest_pb2.Prediction], *, batch_size: int = 1000
    ) -> PublishReport:
        """Publish AI predictions in batches of ``batch_size`` (one tenant per batch)."""
        return await self.publish_records(predictions, batch_size=batch_size)

    async def publish_records(
        self, records: Iterable[Record], *, batch_size: int = 1000
    ) -> PublishReport:
        """Publish any mix of Tick, Prediction, TradingSignal and TenantRow, batched as
        :func:`iter_batches` does."""
        report = self._new_report()
        started = monotonic()
        try:
            for kind, batch in iter_batches(
                records,
                batch_size=batch_size,
                producer=self.producer,
                max_batch_bytes=self.max_batch_bytes,
            ):
                await self._publish(kind, batch, report)
        finally:
            report.seconds = monotonic() - started
        return report

    async def publish_batch(self, batch: ingest_pb2.IngestBatch, *, kind: Kind) -> PublishReport:
        """Publish one batch you built, as it is (``producer`` and ``published_at_unix_us`` are
        filled in on a copy when empty). On Kafka it is keyed by its first record's tenant."""
        if kind not in get_args(Kind):
            raise ValueError(f"unknown kind {kind!r}: 'trading' or 'analytics'")
        if batch_key(batch) is None:
            raise ValueError("the batch holds no records")
        if not batch.producer or not batch.published_at_unix_us:
            filled = ingest_pb2.IngestBatch()
            filled.CopyFrom(batch)
            filled.producer = batch.producer or self.producer
            batch = filled
        report = self._new_report()
        started = monotonic()
        try:
            await self._publish(kind, batch, report)
        finally:
            report.seconds = monotonic() - started
        return report

    def _new_report(self) -> PublishReport:
        if not self._entered:
            raise RuntimeError("use the publisher as 'async with MarketDataPublisher(...)'")
        return PublishReport(transports={t: TransportReport(t) for t in self.transports})

    async def _publish(
        self, kind: Kind, batch: ingest_pb2.IngestBatch, report: PublishReport
    ) -> None:
        if not batch.published_at_unix_us:
            batch.published_at_unix_us = time_ns() // 1000
        data = batch.SerializeToString()
        records = _record_count(batch)
        msg_id = batch_id(data)
        key = batch_key(batch)
        names = self.transports
        sends = [self._send(name, kind, data, msg_id, key) for name in names]
        results = await asyncio.gather(*sends, return_exceptions=True)
        report.batches += 1
        report.records += records
        failed: dict[str, str] = {}
        for name, result in zip(names, results, strict=True):
            transport = report.transports[name]
            if result is None:
                transport.batches += 1
                transport.records += records
                continue
            if not isinstance(result, Exception):  # CancelledError, KeyboardInterrupt, ...
                raise result
            failed[name] = _describe(result)
            transport.failed_batches += 1
            transport.failed_records += records
            if len(transport.errors) < MAX_ERRORS_KEPT:
                transport.errors.append(f"batch {msg_id[:12]}: {failed[name]}")
        if failed and len(failed) == len(names):
            errors = "; ".join(f"{t}: {e}" for t, e in failed.items())
            raise PublishError(
                f"batch {msg_id[:12]} ({records} records) failed on every transport: {errors}",
                report=report,
                errors=failed,
            )

    async def _send(
        self, name: str, kind: Kind, data: bytes, msg_id: str, key: bytes | None
    ) -> None:
        resting = self._resting.get(name)
        if resting is not None:
            until, why = resting
            if monotonic() < until:
                raise ConnectionError(f"skipped for {until - monotonic():.1f} s after: {why}")
        try:
            if name == "nats":
                await self._send_nats(kind, data, msg_id)
            else:
                await self._send_kafka(kind, data, key)
        except Exception as exc:
            if self.cooldown > 0:
                self._resting[name] = (monotonic() + self.cooldown, _describe(exc))
            raise
        self._resting.pop(name, None)

    async def _send_nats(self, kind: Kind, data: bytes, msg_id: str) -> None:
        if self._nc is None or self._js is None:
            raise ConnectionError(f"not connected ({self._down.get('nats', 'closed')})")
        subject = self.nats_subjects[kind]
        headers = {"Authorization": self._auth, "Nats-Msg-Id": msg_id}
        # The same Nats-Msg-Id makes a retry of a batch JetStream already stored a duplicate
        # it drops (PubAck.duplicate), so retrying a lost acknowledgement is safe.
        for attempt in range(self.nats_retries + 1):
            try:
                if not self._nc.is_connected:  # reconnecting: fail fast, not after `timeout`
                    raise ConnectionError("disconnected from the NATS server (reconnecting)")
                await self._js.publish(subject, data, headers=headers)
                return
            except Exception:
                if attempt == self.nats_retries:
                    raise
                await asyncio.sleep(0.2 * 2**attempt)

    async def _send_kafka(self, kind: Kind, data: bytes, key: bytes | None) -> None:
        if self._kafka is None:
            raise ConnectionError(f"not connected ({self._down.get('kafka', 'closed')})")
        # aiokafka retries by itself until request_timeout_ms; idempotence keeps retries single.
        await self._kafka.send_and_wait(
            self.kafka_topics[kind],
            data,
            key=key,
            headers=[("authorization", self._auth.encode())],
        )


def _describe(exc: BaseException) -> str:
    name, text = type(exc).__name__, str(exc)
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"
