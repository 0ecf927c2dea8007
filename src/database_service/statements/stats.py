"""Statement statistics per tenant, kept by the service itself (any PostgreSQL, with or without
``pg_stat_statements``).

Statements are grouped by pg_query's fingerprint, which the SQL guard computes once per text
with its cached classification: ``WHERE id = 1`` and ``WHERE id = 2`` are one entry. Recording
is synchronous and O(1): a dict lookup, a move to the end of an LRU and a few additions into a
fixed histogram — no await, no I/O, no parsing, nothing kept per call. A tenant keeps at most
``max_fingerprints`` entries; the least recently used one is folded into the tenant's ``other``
entry, so totals stay whole while memory stays bounded.

Quantiles come from a fixed log-scale histogram (the upper bound of the bin holding the rank,
clamped to the smallest and largest duration seen, as ``observability.window`` does).

Several serving processes: each keeps its own figures and exports them per tenant (a JSON
document, ``export_tenant``); ``merge_exports`` adds documents up entry by entry (calls, sums
and histogram bins add; quantiles are read from the merged bins, never averaged).
``statements.shared`` writes each process's exports to the run directory, so any worker — and
the CLI — answers for the whole instance.
"""

from __future__ import annotations

import bisect
import math
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from database_service.sqlguard import Classification

__all__ = ["OTHER", "StatementFigures", "StatementStats", "merge_exports"]

# Upper bounds of the duration bins, in milliseconds (about x1.6 apart, 10 µs to 10 min); one
# more bin holds everything slower. p99 is within one bin's width of the truth.
_BOUNDS: tuple[float, ...] = tuple(round(0.01 * 1.6**i, 4) for i in range(31))
_BINS = len(_BOUNDS) + 1
# The entry that statements pushed out of a tenant's table add up in.
OTHER = "other"


class _Entry:
    __slots__ = (
        "bins",
        "cache_hits",
        "calls",
        "errors",
        "kind",
        "max_ms",
        "min_ms",
        "rows",
        "tag",
        "text",
        "total_ms",
        "updated",
    )

    def __init__(self, kind: str, tag: str, text: str) -> None:
        self.kind = kind
        self.tag = tag
        self.text = text
        self.calls = 0
        self.errors = 0
        self.cache_hits = 0
        self.rows = 0
        self.total_ms = 0.0
        self.min_ms = math.inf
        self.max_ms = 0.0
        self.bins = array("q", bytes(8 * _BINS))
        self.updated = 0.0

    def add(self, other: _Entry) -> None:
        self.calls += other.calls
        self.errors += other.errors
        self.cache_hits += other.cache_hits
        self.rows += other.rows
        self.total_ms += other.total_ms
        self.min_ms = min(self.min_ms, other.min_ms)
        self.max_ms = max(self.max_ms, other.max_ms)
        for i, count in enumerate(other.bins):
            self.bins[i] += count
        self.updated = max(self.updated, other.updated)

    def export(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tag": self.tag,
            "text": self.text,
            "calls": self.calls,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "rows": self.rows,
            "total_ms": self.total_ms,
            "min_ms": None if self.min_ms == math.inf else self.min_ms,
            "max_ms": self.max_ms,
            "bins": list(self.bins),
            "updated": self.updated,
        }

    @classmethod
    def imported(cls, document: dict[str, Any]) -> _Entry:
        entry = cls(str(document["kind"]), str(document["tag"]), str(document["text"]))
        entry.calls = int(document["calls"])
        entry.errors = int(document["errors"])
        entry.cache_hits = int(document["cache_hits"])
        entry.rows = int(document["rows"])
        entry.total_ms = float(document["total_ms"])
        low = document.get("min_ms")
        entry.min_ms = math.inf if low is None else float(low)
        entry.max_ms = float(document["max_ms"])
        bins = [int(b) for b in document["bins"]]
        if len(bins) == _BINS:
            entry.bins = array("q", bins)
        entry.updated = float(document.get("updated", 0.0))
        return entry

    def quantile(self, q: float) -> float:
        """The upper bound of the bin holding rank ``q``, clamped to the durations seen."""
        timed = sum(self.bins)
        if timed == 0:
            return 0.0
        rank = max(1, math.ceil(q * timed))
        seen = 0
        for i, count in enumerate(self.bins):
            seen += count
            if seen >= rank:
                bound = _BOUNDS[i] if i < len(_BOUNDS) else self.max_ms
                return min(max(bound, self.min_ms), self.max_ms)
        return self.max_ms


@dataclass(frozen=True, slots=True)
class StatementFigures:
    """One fingerprint's figures, as the endpoints show them."""

    fingerprint: str
    statement: str
    statement_class: str
    command: str
    calls: int
    errors: int
    rows: int
    cache_hits: int
    total_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p99_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "statement": self.statement,
            "statement_class": self.statement_class,
            "command": self.command,
            "calls": self.calls,
            "errors": self.errors,
            "rows": self.rows,
            "cache_hits": self.cache_hits,
            "total_ms": round(self.total_ms, 3),
            "mean_ms": round(self.mean_ms, 3),
            "min_ms": round(self.min_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
        }


def _figures(fingerprint: str, entry: _Entry) -> StatementFigures:
    timed = sum(entry.bins)
    return StatementFigures(
        fingerprint=fingerprint,
        statement=entry.text,
        statement_class=entry.kind,
        command=entry.tag,
        calls=entry.calls,
        errors=entry.errors,
        rows=entry.rows,
        cache_hits=entry.cache_hits,
        total_ms=entry.total_ms,
        mean_ms=entry.total_ms / timed if timed else 0.0,
        min_ms=0.0 if entry.min_ms == math.inf else entry.min_ms,
        max_ms=entry.max_ms,
        p50_ms=entry.quantile(0.5),
        p99_ms=entry.quantile(0.99),
    )


class StatementStats:
    """Every tenant's statement figures in this process, in bounded memory."""

    def __init__(self, *, max_fingerprints: int = 500) -> None:
        self._max = max_fingerprints
        self._tenants: dict[str, OrderedDict[str, _Entry]] = {}
        self.since = time.time()  # when the figures began (start, or the last full reset)
        self._resets: dict[str, float] = {}
        # Tenants whose figures changed since ``changed()`` was last asked (what to share).
        self._changed: set[str] = set()
        self._settles: list[Callable[[], None]] = []  # before_read's

    def before_read(self, settle: Callable[[], None]) -> None:
        """``settle`` records the statements its caller holds back to record them together
        (``QueryExecutor.book``): called before the figures are read, shared or reset."""
        self._settles.append(settle)

    def _settle(self) -> None:
        for settle in self._settles:
            settle()

    def record(
        self,
        tenant_id: str,
        verdict: Classification,
        duration_ms: float,
        rows: int,
        *,
        error: bool = False,
        cache_hit: bool = False,
    ) -> None:
        """One statement's outcome (the hot path: O(1), no I/O)."""
        entry = self._entry(tenant_id, verdict)
        entry.calls += 1
        entry.updated = time.time()
        if error:
            # A failed statement's time is not the statement's cost: counted, not timed.
            entry.errors += 1
            return
        if cache_hit:
            entry.cache_hits += 1
        entry.rows += rows
        entry.total_ms += duration_ms
        # Comparisons, not min()/max(): two function calls fewer on the request path.
        if duration_ms < entry.min_ms:  # noqa: PLR1730
            entry.min_ms = duration_ms
        if duration_ms > entry.max_ms:  # noqa: PLR1730
            entry.max_ms = duration_ms
        entry.bins[bisect.bisect_left(_BOUNDS, duration_ms)] += 1

    def record_many(
        self, tenant_id: str, verdict: Classification, micros: Sequence[int], rows: int
    ) -> None:
        """Statements of one verdict that all completed, with their times in microseconds and
        their rows together (the wire port's relay books them a group at a time)."""
        if not micros:
            return
        entry = self._entry(tenant_id, verdict)
        entry.calls += len(micros)
        entry.updated = time.time()
        entry.rows += rows
        bins = entry.bins
        total = 0.0
        for us in micros:
            ms = us / 1000
            total += ms
            bins[bisect.bisect_left(_BOUNDS, ms)] += 1
        entry.total_ms += total
        entry.min_ms = min(entry.min_ms, min(micros) / 1000)
        entry.max_ms = max(entry.max_ms, max(micros) / 1000)

    def _entry(self, tenant_id: str, verdict: Classification) -> _Entry:
        table = self._tenants.get(tenant_id)
        if table is None:
            table = self._tenants[tenant_id] = OrderedDict()
        self._changed.add(tenant_id)
        key = verdict.fingerprint or OTHER
        entry = table.get(key)
        if entry is None:
            entry = _Entry(verdict.kind.value, verdict.tag, verdict.normalized)
            table[key] = entry
            while len(table) > self._max:  # twice at most: the first makes ``other``
                self._evict(table)
        else:
            table.move_to_end(key)
        return entry

    def _evict(self, table: OrderedDict[str, _Entry]) -> None:
        for key in table:
            if key != OTHER:
                break
        else:
            return
        evicted = table.pop(key)
        other = table.get(OTHER)
        if other is None:
            other = table[OTHER] = _Entry("other", "", "(statements evicted from the table)")
            table.move_to_end(OTHER, last=False)  # the next eviction looks past it at once
        other.add(evicted)

    def reset(self, tenant_id: str | None = None) -> None:
        """Forget one tenant's figures, or everyone's."""
        self._settle()
        now = time.time()
        if tenant_id is None:
            self._changed.update(self._tenants)
            self._tenants.clear()
            self._resets.clear()
            self.since = now
        else:
            self._tenants.pop(tenant_id, None)
            self._resets[tenant_id] = now
            self._changed.add(tenant_id)

    def forget(self, tenant_id: str) -> None:
        """A deleted tenant's figures go with it."""
        self._tenants.pop(tenant_id, None)
        self._resets.pop(tenant_id, None)
        self._changed.add(tenant_id)

    def changed(self) -> set[str]:
        """The tenants whose figures changed since the last call."""
        self._settle()
        changed, self._changed = self._changed, set()
        return changed

    def reset_at(self, tenant_id: str) -> float:
        return self._resets.get(tenant_id, self.since)

    def export(self) -> dict[str, Any]:
        """This process's figures as plain values (``merge_exports`` adds such documents)."""
        self._settle()
        return {
            "since": self.since,
            "resets": dict(self._resets),
            "tenants": {
                tenant: {key: entry.export() for key, entry in table.items()}
                for tenant, table in self._tenants.items()
            },
        }

    def top(
        self,
        tenant_id: str,
        limit: int,
        *,
        order: str = "total_ms",
        peers: Iterable[dict[str, Any]] = (),
    ) -> list[StatementFigures]:
        """The tenant's statements by ``order`` (descending), this process's figures merged
        with ``peers`` (other processes' exports)."""
        merged = merge_exports([self.export_tenant(tenant_id), *peers], tenant_id)
        figures = [_figures(key, entry) for key, entry in merged.items()]
        figures.sort(key=lambda f: getattr(f, order), reverse=True)
        return figures[:limit]

    def export_tenant(self, tenant_id: str) -> dict[str, Any]:
        self._settle()
        table: dict[str, _Entry] = self._tenants.get(tenant_id) or {}
        return {
            "since": self.since,
            "resets": {tenant_id: self._resets[tenant_id]} if tenant_id in self._resets else {},
            "tenants": {tenant_id: {key: entry.export() for key, entry in table.items()}},
        }


def merge_exports(documents: Iterable[dict[str, Any]], tenant_id: str) -> dict[str, _Entry]:
    """One tenant's entries from several processes' exports, added up. An export's entries
    older than a reset another process saw are left out (a reset anywhere resets everywhere
    once the others have seen it, or their figures age out)."""
    documents = list(documents)
    # Explicit resets only: a process's start ("since") says nothing of the others' figures.
    reset = max((float(d.get("resets", {}).get(tenant_id, 0.0)) for d in documents), default=0.0)
    merged: dict[str, _Entry] = {}
    for document in documents:
        table = document.get("tenants", {}).get(tenant_id)
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            entry = _Entry.imported(value)
            if entry.updated < reset:
                continue
            kept = merged.get(key)
            if kept is None:
                merged[key] = entry
            else:
                kept.add(entry)
    return merged
