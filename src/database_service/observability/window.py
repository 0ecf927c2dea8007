"""Request figures over the last minute, service-wide and per tenant, in fixed memory.

Each series (the service's, and one per tenant seen in the window) is a ring of one-second
buckets; a bucket holds the count, the errors, the sum, minimum and maximum of the durations and a
small fixed latency histogram. Recording is O(1) and keeps nothing per request; a summary merges
at most ``seconds`` buckets (O(buckets * histogram bins)) instead of sorting samples. Percentiles
are read from the histogram: the upper bound of the bin holding the rank, clamped to the smallest
and largest duration seen, so a window of equal durations reports them exactly.

A tenant's series disappears once it has been idle for a whole window, and at most
``max_tenants`` tenants are tracked at once (the service-wide series counts every request).

With several serving processes, each worker ``export``s its live buckets (a small JSON
document, written to the run directory every second) and ``set_peers`` gives a window the
other workers' exports: a summary then merges their buckets with its own, so counts,
throughput and percentiles (from the merged histograms, never averages of percentiles) cover
the whole instance. Seconds are ``time.monotonic()``'s, which every process on the machine
shares.
"""

from __future__ import annotations

import bisect
import math
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from database_service.loops import RunningLoop

# Requests' bookkeeping waits at most this long to be done together (RequestWindow.later).
_LATER_S = 0.01

T = TypeVar("T")

__all__ = ["Peers", "RequestWindow", "WindowSummary"]

# Upper bounds of the latency bins, in seconds; one more bin holds everything slower.
_BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.04,
    0.06, 0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BINS = len(_BOUNDS) + 1


@dataclass(frozen=True, slots=True)
class WindowSummary:
    requests: int
    throughput_rps: float
    response_time_ms: float
    p50_ms: float
    p99_ms: float
    error_rate_percent: float


_EMPTY = WindowSummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)


class Peers(Protocol):
    """The other serving processes of this instance, as their last snapshots say."""

    def windows(self) -> list[dict[str, Any]]:
        """Their ``RequestWindow.export()``s."""
        ...

    def pools(self) -> list[dict[str, Any]]:
        """Their tenant pools: ``{"open", "global_max", "tenants": {id: {size, idle, in_use,
        max}}}`` each."""
        ...

    def system(self) -> list[dict[str, Any]]:
        """Their processes' ``cpu_usage_percent`` and ``memory_usage_mb``."""
        ...

    def workers(self) -> dict[str, Any]:
        """The health document's ``workers`` section."""
        ...


class _Series:
    """A ring of one-second buckets; slot ``s % slots`` holds second ``s`` when
    ``stamps[slot] == s``, anything else is stale and reset on the next write."""

    __slots__ = ("counts", "errors", "hist", "last", "maxima", "minima", "stamps", "sums")

    def __init__(self, slots: int) -> None:
        self.stamps = [-1] * slots
        self.counts = [0] * slots
        self.errors = [0] * slots
        self.sums = [0.0] * slots
        self.minima = [math.inf] * slots
        self.maxima = [0.0] * slots
        self.hist = array("I", bytes(4 * slots * _BINS))
        self.last = -1  # the last second written

    def record(self, second: int, duration: float, ok: bool) -> None:
        slots = len(self.stamps)
        slot = second % slots
        if self.stamps[slot] != second:
            self.stamps[slot] = second
            self.counts[slot] = self.errors[slot] = 0
            self.sums[slot] = self.maxima[slot] = 0.0
            self.minima[slot] = math.inf
            base = slot * _BINS
            for i in range(base, base + _BINS):
                self.hist[i] = 0
        self.counts[slot] += 1
        if not ok:
            self.errors[slot] += 1
        self.sums[slot] += duration
        self.minima[slot] = min(self.minima[slot], duration)
        self.maxima[slot] = max(self.maxima[slot], duration)
        self.hist[slot * _BINS + bisect.bisect_left(_BOUNDS, duration)] += 1
        self.last = second

    def buckets(self, second: int) -> list[_Bucket]:
        """The live buckets as of ``second``: (second, count, errors, sum, min, max, {bin: n})."""
        slots = len(self.stamps)
        oldest = second - slots
        live: list[_Bucket] = []
        for slot, stamp in enumerate(self.stamps):
            if not oldest < stamp <= second or not self.counts[slot]:
                continue
            base = slot * _BINS
            bins = {i: self.hist[base + i] for i in range(_BINS) if self.hist[base + i]}
            live.append(
                (stamp, self.counts[slot], self.errors[slot], self.sums[slot],
                 self.minima[slot], self.maxima[slot], bins)
            )  # fmt: skip
        return live


# One second of one series: (second, count, errors, sum, min, max, {bin index: count}).
_Bucket = tuple[int, int, int, float, float, float, dict[int, int]]


def _summarize(
    buckets: Iterable[Sequence[Any]], second: int, slots: int, span: float
) -> WindowSummary:
    oldest = second - slots
    count = errors = 0
    total, low, high = 0.0, math.inf, 0.0
    merged = [0] * _BINS
    for stamp, n, bad, added, least, most, bins in buckets:
        if not oldest < stamp <= second or not n:
            continue
        count += n
        errors += bad
        total += added
        low = min(low, least)
        high = max(high, most)
        for i, k in bins.items():
            merged[int(i)] += k
    if not count:
        return _EMPTY

    def percentile(q: float) -> float:
        rank = min(count, int(q * count) + 1)  # 1-based rank of the sample at quantile q
        seen = 0
        for i, n in enumerate(merged):
            seen += n
            if seen >= rank:
                upper = _BOUNDS[i] if i < len(_BOUNDS) else high
                return max(low, min(upper, high)) * 1000
        return high * 1000  # not reached: the bins add up to count

    return WindowSummary(
        requests=count,
        throughput_rps=round(count / span, 3),
        response_time_ms=round(total / count * 1000, 3),
        p50_ms=round(percentile(0.5), 3),
        p99_ms=round(percentile(0.99), 3),
        error_rate_percent=round(100 * errors / count, 3),
    )


class RequestWindow:
    def __init__(
        self,
        seconds: int = 60,
        *,
        max_tenants: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if seconds < 1:
            raise ValueError("the window needs at least one second")
        self.seconds = int(seconds)
        self._max_tenants = max_tenants
        self._clock = clock
        self._started = clock()
        self._all = _Series(self.seconds)
        self._tenants: dict[str, _Series] = {}
        self._pruned = -1
        self.peers: Peers | None = None
        self._later: dict[Callable[[list[Any]], None], list[Any]] = {}
        self._running_loop = RunningLoop()

    def later(self, record: Callable[[list[T]], None], item: T) -> None:
        """``item``, a request's bookkeeping once it is answered, given to ``record`` with the
        others of the next ``_LATER_S``: one callback for them all, not one each (measured
        2026-12-05, ``bench/query_cpu.py``: with the audit's, ~3% of a PK lookup's CPU at
        concurrency 32), and ``record`` can count them together (the metrics: one increment
        per counter and bucket, not one per request). Done before any of the figures is read
        (``settle``)."""
        later = self._later
        items = later.get(record)
        if items is not None:
            items.append(item)
            return
        if not later:
            self._running_loop().call_later(_LATER_S, self.settle)
        later[record] = [item]

    def settle(self) -> None:
        """Run the bookkeeping ``later`` holds (before figures are read: this window's, and
        the metrics', which call it before rendering)."""
        later, self._later = self._later, {}
        for record, items in later.items():
            record(items)

    def set_peers(self, peers: Peers) -> None:
        """The other workers: their figures are merged into every summary from now on."""
        self.peers = peers

    def export(self) -> dict[str, Any]:
        """This process's live buckets, service-wide and per tenant (JSON-ready)."""
        self.settle()
        second = int(self._clock())
        return {
            "started": self._started,
            "all": self._all.buckets(second),
            "tenants": {t: b for t, s in self._tenants.items() if (b := s.buckets(second))},
        }

    def record(self, duration_s: float, ok: bool, tenant_id: str | None = None) -> None:
        """One request that took ``duration_s`` (``ok``: not a server-side error), for the
        service and, when known, for the tenant it acted for."""
        second = int(self._clock())
        self._all.record(second, duration_s, ok)
        if second != self._pruned:
            self._prune(second)
        if tenant_id is None:
            return
        series = self._tenants.get(tenant_id)
        if series is None:
            if len(self._tenants) >= self._max_tenants:
                return
            series = self._tenants[tenant_id] = _Series(self.seconds)
        series.record(second, duration_s, ok)

    def _prune(self, second: int) -> None:
        """Drop tenants idle for a whole window (at most once a second)."""
        self._pruned = second
        horizon = second - self.seconds
        for tenant_id in [t for t, s in self._tenants.items() if s.last <= horizon]:
            del self._tenants[tenant_id]

    def summary(self, tenant_id: str | None = None) -> WindowSummary:
        """The service's figures, or with ``tenant_id`` that tenant's only."""
        self.settle()
        now = self._clock()
        second = int(now)
        series = self._all if tenant_id is None else self._tenants.get(tenant_id)
        buckets: list[Sequence[Any]] = list(series.buckets(second)) if series else []
        started = self._started
        for peer in self.peers.windows() if self.peers is not None else []:
            started = min(started, float(peer.get("started", started)))
            theirs = (
                peer.get("all") if tenant_id is None else peer.get("tenants", {}).get(tenant_id)
            )
            buckets.extend(theirs or [])
        span = min(float(self.seconds), max(now - started, 1e-3))
        return _summarize(buckets, second, self.seconds, span)

    @property
    def tenants_tracked(self) -> int:
        return len(self._tenants)
