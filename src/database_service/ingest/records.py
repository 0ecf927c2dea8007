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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    "Seen",
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
_TIME = 1  # time_us, in both

# seen(kind): for one tenant, mappings event id -> time_us (None for rows) of records committed
# lately, of a kind: ticks, predictions or rows (signals and generic rows). ``TenantWork.discard``
Seen = Callable[[str], Sequence[Mapping[str, int | None]]]
_ABSENT = object()

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
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

    def discard(self, seen: Seen) -> int:
        """Drop the records ``seen`` holds as committed already; how many went.

        A tick or prediction is that record if its time is the one seen with its event id, a
        signal or row if its event id was seen: the keys the database's uniqueness holds to
        (besides the tenant, which ``seen`` is for). Copies arrive as whole messages, so a batch
        whose first and last records of each kind are unseen is passed as it is, without a
        lookup per record (the database still dedupes)."""
        kinds: list[tuple[dict[str, Any], Sequence[Mapping[str, int | None]], bool]] = [
            (self.ticks, seen("ticks"), True),
            (self.predictions, seen("predictions"), True),
        ]
        rows_seen = seen("rows")
        kinds += [(rows, rows_seen, False) for rows in self.rows.values()]
        if not any(
            _known(memory, key, records[key][_TIME] if timed else None)
            for records, memory, timed in kinds
            if records and memory
            for key in (next(iter(records)), next(reversed(records)))
        ):
            return 0
        before = self.size
        for memory in seen("ticks"):
            self.ticks = {k: v for k, v in self.ticks.items() if memory.get(k, _ABSENT) != v[_TIME]}
        for memory in seen("predictions"):
            self.predictions = {
                k: v for k, v in self.predictions.items() if memory.get(k, _ABSENT) != v[_TIME]
            }
        for memory in rows_seen:
            self.rows = {
                table: kept
                for table, rows in self.rows.items()
                if (kept := {k: v for k, v in rows.items() if k not in memory})
            }
        # Sources follow, so a later rejection of the rest never names a stored record.
        left = set(self.event_ids())
        self.sources = {k: v for k, v in self.sources.items() if k in left}
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


def _known(memory: Sequence[Mapping[str, int | None]], key: str, time_us: int | None) -> bool:
    return any(seen.get(key, _ABSENT) == time_us for seen in memory)


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
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply") from None


@functools.lru_cache(maxsize=4096)
def _tenant_ok(tenant_id: str) -> bool:
    return _TENANT.match(tenant_id) is not None  # a batch names few tenants: check each once


def _common(record: Any) -> str | None:
    """The reason a record cannot be attributed to a tenant and an event, or None.

    Event ids must be UUIDs in their canonical 36-character text; only the length is checked
    here (a regex per record cost a quarter of the decoding time): a 36-character non-UUID is
    refused by the driver when the batch is written, and isolated there."""
    if not _tenant_ok(record.tenant_id):
        return f"tenant_id {record.tenant_id[:60]!r} is not a tenant id"
    if len(record.event_id) != 36:
        return f"event_id {record.event_id[:60]!r} is not a UUID in canonical text form"
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
    # The hot path (profiled): each field is read once (a string field is a new object per
    # read), the tenant's work is looked up only when the tenant changes, and nothing is
    # checked beyond what attributes the record; types and ranges are PostgreSQL's to check (a
    # failing row is isolated by the writer).
    current: str | None = None
    work = TenantWork("")
    for t in ticks:
        event_id, tenant_id, symbol = t.event_id, t.tenant_id, t.symbol
        if tenant_id != current or len(event_id) != 36 or not symbol:
            problem = _common(t) or (None if symbol else "symbol is empty")
            if problem is not None:
                _reject(out, t, "invalid_record", problem)
                continue
            current, work = tenant_id, out.tenant(tenant_id)
        # An unset optional reads as 0: ask HasField (a lookup by name) only then.
        bid, ask, volume, spread = t.bid, t.ask, t.volume, t.spread
        work.ticks[event_id] = (
            event_id,
            t.time_unix_us,
            t.user_id,
            symbol,
            bid if bid or t.HasField("bid") else None,
            ask if ask or t.HasField("ask") else None,
            volume if volume or t.HasField("volume") else None,
            spread if spread or t.HasField("spread") else None,
        )
        work.sources[event_id] = t


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
