"""Wire decoding for ingestion: pure functions, testable without sockets.

``decode`` turns one transport message (an ``IngestBatch``) into work grouped by tenant, and the
records that cannot be stored at all (no event id, no tenant, no symbol…) into ``Rejected``
entries for the dead-letter table. Tuples are built in the staging tables' column order so the
writer hands them straight to binary COPY.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError, Message

from database_service_client._proto import ingest_pb2

__all__ = [
    "PREDICTION_COLUMNS",
    "TICK_COLUMNS",
    "BadPayload",
    "Decoded",
    "Rejected",
    "TenantWork",
    "decode",
    "single_record_batch",
]

# The staging tables' columns (tenant migration 0002_ingest_staging.sql), in tuple order.
TICK_COLUMNS = ("event_id", "time_us", "user_id", "symbol", "bid", "ask", "volume", "spread")
PREDICTION_COLUMNS = (
    "event_id", "time_us", "user_id", "symbol", "prediction_type", "confidence",
    "model_version", "features", "result",
)  # fmt: skip

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}$")
_TENANT = re.compile(r"^[a-z][a-z0-9_]{1,40}$")
_TABLE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")  # no leading _: the service's own tables
_COLUMN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class BadPayload(Exception):
    """The message is not an IngestBatch; it goes to the dead letters whole."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record (or a whole message) that will not be stored, and why."""

    code: str
    reason: str
    payload: bytes  # the record as a one-record IngestBatch, or the raw message
    tenant_id: str | None = None
    event_id: str | None = None


@dataclass(slots=True)
class TenantWork:
    """One tenant's records of a batch, deduplicated by event id within the batch."""

    tenant_id: str
    ticks: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    predictions: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    # table -> event id -> row (a JSON object of column -> value)
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # event id -> the record, kept to dead-letter exactly what failed
    sources: dict[str, Message] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.ticks) + len(self.predictions) + sum(len(r) for r in self.rows.values())

    def event_ids(self) -> list[str]:
        return [*self.ticks, *self.predictions, *(k for rows in self.rows.values() for k in rows)]

    def discard(self, known: Callable[[str], bool]) -> int:
        """Drop the records whose event id is ``known`` (already committed); how many went."""
        before = self.size
        self.ticks = {k: v for k, v in self.ticks.items() if not known(k)}
        self.predictions = {k: v for k, v in self.predictions.items() if not known(k)}
        self.rows = {
            table: kept
            for table, rows in self.rows.items()
            if (kept := {k: v for k, v in rows.items() if not known(k)})
        }
        return before - self.size

    def merge(self, other: TenantWork) -> None:
        self.ticks.update(other.ticks)
        self.predictions.update(other.predictions)
        for table, rows in other.rows.items():
            self.rows.setdefault(table, {}).update(rows)
        self.sources.update(other.sources)


@dataclass(slots=True)
class Decoded:
    work: dict[str, TenantWork] = field(default_factory=dict)
    rejected: list[Rejected] = field(default_factory=list)
    records: int = 0

    def tenant(self, tenant_id: str) -> TenantWork:
        work = self.work.get(tenant_id)
        if work is None:
            work = self.work[tenant_id] = TenantWork(tenant_id)
        return work

    def merge(self, other: Decoded) -> None:
        for tenant_id, work in other.work.items():
            self.tenant(tenant_id).merge(work)
        self.rejected.extend(other.rejected)
        self.records += other.records


def single_record_batch(record: Message) -> bytes:
    """A record as a one-record IngestBatch: what a dead letter keeps so that it can be replayed."""
    batch = ingest_pb2.IngestBatch()
    if isinstance(record, ingest_pb2.Tick):
        batch.ticks.append(record)
    elif isinstance(record, ingest_pb2.Prediction):
        batch.predictions.append(record)
    elif isinstance(record, ingest_pb2.TradingSignal):
        batch.signals.append(record)
    elif isinstance(record, ingest_pb2.TenantRow):
        batch.rows.append(record)
    return batch.SerializeToString()


def _iso(unix_us: int) -> str:
    return (_EPOCH + dt.timedelta(microseconds=unix_us)).isoformat()


def _json(text: str, what: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not JSON: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _tenant_ok(tenant_id: str) -> bool:
    return _TENANT.match(tenant_id) is not None  # a batch names few tenants: check each once


def _common(record: Any) -> str | None:
    """The reason a record cannot be attributed to a tenant and an event, or None."""
    if not _tenant_ok(record.tenant_id):
        return f"tenant_id {record.tenant_id[:60]!r} is not a tenant id"
    if not _UUID.match(record.event_id):
        return f"event_id {record.event_id[:60]!r} is not a UUID"
    return None


def decode(payload: bytes) -> Decoded:
    """Decode one message; raises BadPayload if it is not an IngestBatch at all."""
    batch = ingest_pb2.IngestBatch()
    try:
        batch.ParseFromString(payload)
    except DecodeError as exc:
        raise BadPayload(f"not a database_service.v1.IngestBatch: {exc}") from None
    out = Decoded()
    out.records = len(batch.ticks) + len(batch.predictions) + len(batch.signals) + len(batch.rows)
    if out.records == 0:
        raise BadPayload("the message holds no records (is it an IngestBatch?)")
    _ticks(batch.ticks, out)
    _predictions(batch.predictions, out)
    _signals(batch.signals, out)
    _rows(batch.rows, out)
    return out


def _reject(out: Decoded, record: Any, code: str, reason: str) -> None:
    out.rejected.append(
        Rejected(
            code,
            reason,
            single_record_batch(record),
            tenant_id=record.tenant_id or None,
            event_id=record.event_id or None,
        )
    )


def _ticks(ticks: Iterable[ingest_pb2.Tick], out: Decoded) -> None:
    # The hot path: one tuple per tick, no per-field validation beyond what attributes the
    # record; types and ranges are PostgreSQL's to check (a failing row is isolated by the writer).
    for t in ticks:
        problem = _common(t) or (None if t.symbol else "symbol is empty")
        if problem is not None:
            _reject(out, t, "invalid_record", problem)
            continue
        work = out.tenant(t.tenant_id)
        work.ticks[t.event_id] = (
            t.event_id,
            t.time_unix_us,
            t.user_id,
            t.symbol,
            t.bid if t.HasField("bid") else None,
            t.ask if t.HasField("ask") else None,
            t.volume if t.HasField("volume") else None,
            t.spread if t.HasField("spread") else None,
        )
        work.sources[t.event_id] = t


def _predictions(predictions: Iterable[ingest_pb2.Prediction], out: Decoded) -> None:
    for p in predictions:
        problem = _common(p) or (None if p.symbol else "symbol is empty")
        if problem is None and not p.prediction_type:
            problem = "prediction_type is empty"
        if problem is not None:
            _reject(out, p, "invalid_record", problem)
            continue
        work = out.tenant(p.tenant_id)
        # JSON stays text: PostgreSQL parses it once, in the merge (a bad one is isolated there).
        work.predictions[p.event_id] = (
            p.event_id, p.time_unix_us, p.user_id, p.symbol, p.prediction_type, p.confidence,
            p.model_version or None, p.features_json or None, p.result_json or None,
        )  # fmt: skip
        work.sources[p.event_id] = p


def _signals(signals: Iterable[ingest_pb2.TradingSignal], out: Decoded) -> None:
    for s in signals:
        problem = _common(s) or (None if s.signal_id else "signal_id is empty")
        try:
            payload = _json(s.payload_json, "payload_json")
        except ValueError as exc:
            problem = problem or str(exc)
        if problem is not None:
            _reject(out, s, "invalid_record", problem)
            continue
        row: dict[str, Any] = {
            "signal_id": s.signal_id,
            "user_id": s.user_id or None,
            "symbol": s.symbol,
            "action": s.action,
            "confidence": s.confidence if s.HasField("confidence") else None,
            "payload": payload,
        }
        if s.created_at_unix_us:
            row["created_at"] = _iso(s.created_at_unix_us)
        work = out.tenant(s.tenant_id)
        work.rows.setdefault("trading_signals", {})[s.event_id] = row
        work.sources[s.event_id] = s


def _rows(rows: Iterable[ingest_pb2.TenantRow], out: Decoded) -> None:
    for r in rows:
        problem = _common(r)
        if problem is None and not _TABLE.match(r.table):
            problem = f"table {r.table[:80]!r} is not an unqualified table name of the tenant"
        row: Any = None
        if problem is None:
            try:
                row = _json(r.row_json, "row_json")
            except ValueError as exc:
                problem = str(exc)
        if problem is None and (not isinstance(row, dict) or not row):
            problem = "row_json must be a non-empty JSON object of column -> value"
        if problem is None and not all(isinstance(k, str) and _COLUMN.match(k) for k in row):
            problem = "row_json has a key that is not a column name"
        if problem is not None:
            _reject(out, r, "invalid_record", problem)
            continue
        work = out.tenant(r.tenant_id)
        work.rows.setdefault(r.table, {})[r.event_id] = row
        work.sources[r.event_id] = r
