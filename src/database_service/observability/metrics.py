"""Prometheus metrics, in a registry owned by the application (no module-level globals).

With several serving processes (``DBSVC_WORKERS``), the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for its workers before they import prometheus_client: counters and
histograms then live in files of that directory, one per process, and ``render`` (in whichever
worker answers ``/metrics``) adds every process's up, the workers that died included (a counter
never goes back). Collectors that read live state at scrape time (pool sizes, partitions) cannot
be read across processes: in that mode each worker copies their readings into multiprocess
gauges (``refresh``, every second and before each scrape), summed over live workers
(``livesum``: connections, pools, caps) or their maximum (``livemax``: figures only the
primary worker has, like partition counts).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.registry import Collector

from database_service.observability.gcpauses import GcPauses

__all__ = ["Metrics", "multiprocess_dir", "observe_all"]

# Live readings that only one worker holds (the primary maintains partitions) or that must not
# be added up; every other live reading is summed over the live workers.
_LIVE_MAX = (
    "dbsvc_partitions",
    "dbsvc_rollup_lag_seconds",
    "dbsvc_multidb_outbox_pending",
    "dbsvc_multidb_outbox_oldest_pending_seconds",
)


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when this process is a worker."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        self._live: list[Collector] = []
        self._settles: list[Callable[[], None]] = []  # before_render's
        self._gauges: dict[str, tuple[Gauge, tuple[str, ...]]] = {}
        self._reported: dict[str, set[tuple[str, ...]]] = {}
        self._request_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "dbsvc_requests",
            "Requests handled, by front end, operation and outcome code ('ok' on success).",
            ["front_end", "operation", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "dbsvc_request_duration_seconds",
            "Request latency, by front end and operation.",
            ["front_end", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.gc_pauses = Histogram(
            "dbsvc_gc_pause_seconds",
            "Pauses of Python's cyclic garbage collector in this process (every call in flight"
            " waits for one), by generation (2: a full collection).",
            ["generation"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        # Installed by the application (``gc.callbacks`` are the process's); flushed into
        # ``gc_pauses`` before each scrape and refresh, never from the collector's callback.
        self.gc = GcPauses(self.gc_pauses)
        self.errors = Counter(
            "dbsvc_errors", "Errors returned to callers, by stable code.", ["code"],
            registry=self.registry,
        )  # fmt: skip
        self.statements = Counter(
            "dbsvc_statements", "Statements executed for tenants, by store and class.",
            ["store", "kind"],
            registry=self.registry,
        )  # fmt: skip
        self.unhandled = Counter(
            "dbsvc_unhandled_errors",
            "Unexpected exceptions answered as 'internal' (bugs), by front end and operation.",
            ["front_end", "operation"],
            registry=self.registry,
        )
        self.denials = Counter(
            "dbsvc_denials", "Requests refused before reaching PostgreSQL, by code.", ["code"],
            registry=self.registry,
        )  # fmt: skip
        self.loop_restarts = Counter(
            "dbsvc_background_loop_restarts",
            "Background loops restarted after failing, by loop.",
            ["loop"],
            registry=self.registry,
        )
        self.session_limits = Counter(
            "dbsvc_session_limits_exceeded",
            "Tenant sessions the service canceled at their time limit (statement, transaction).",
            ["limit"],
            registry=self.registry,
        )
        self.pool_events = Counter(
            "dbsvc_pool_events", "Tenant pool lifecycle events.", ["event"],
            registry=self.registry,
        )  # fmt: skip
        self.audit_dropped = Counter(
            "dbsvc_audit_write_failures", "Audit batches that could not be written.",
            registry=self.registry,
        )  # fmt: skip

        self.maintenance_runs = Counter(
            "dbsvc_partition_maintenance_runs",
            "Partition maintenance rounds, ran or skipped (another instance held the lock).",
            ["outcome"],
            registry=self.registry,
        )
        self.maintenance_seconds = Histogram(
            "dbsvc_partition_maintenance_duration_seconds",
            "Duration of partition maintenance rounds.",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
            registry=self.registry,
        )
        self.maintenance_lock_timeouts = Counter(
            "dbsvc_partition_maintenance_lock_timeouts",
            "Partition changes given up because a shared table stayed locked through every"
            " lock_timeout retry (left for the next round, or refused), by table and action.",
            ["table", "action"],
            registry=self.registry,
        )

        self.ingest_messages = Counter(
            "dbsvc_ingest_messages", "Transport messages processed, by transport.",
            ["transport"], registry=self.registry,
        )  # fmt: skip
        self.ingest_records = Counter(
            "dbsvc_ingest_records",
            "Ingested records by transport and outcome (stored, duplicate, dead_letter).",
            ["transport", "outcome"],
            registry=self.registry,
        )
        self.ingest_dead_letters = Counter(
            "dbsvc_ingest_dead_letters", "Dead letters written, by transport and code.",
            ["transport", "code"], registry=self.registry,
        )  # fmt: skip
        self.ingest_errors = Counter(
            "dbsvc_ingest_errors",
            "Transient ingestion failures (retried), by transport and code.",
            ["transport", "code"],
            registry=self.registry,
        )
        self.ingest_batch_records = Histogram(
            "dbsvc_ingest_batch_records", "Records per processed batch, by transport.",
            ["transport"], buckets=(1, 10, 100, 1_000, 10_000, 100_000),
            registry=self.registry,
        )  # fmt: skip
        self.ingest_batch_seconds = Histogram(
            "dbsvc_ingest_batch_duration_seconds",
            "Time from pull to commit of a batch, by transport.",
            ["transport"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

        self.cache_requests = Counter(
            "dbsvc_cache_requests",
            "Reads that asked for the result cache, by what it did (hit, miss, bypass, off,"
            " stale).",
            ["status"],
            registry=self.registry,
        )
        self.cache_replays = Counter(
            "dbsvc_cache_replays",
            "Cache hits answered again from L1 once every check of the read that cached them"
            " still held, without running those checks' coroutines (query.replays); counted"
            " among the hits as well.",
            registry=self.registry,
        )
        self.cache_invalidations = Counter(
            "dbsvc_cache_invalidations",
            "Invalidations applied, by source (write: through this process; notification:"
            " PostgreSQL's; broadcast: another instance's, through Redis).",
            ["source"],
            registry=self.registry,
        )
        self.cache_invalidate_seconds = Histogram(
            "dbsvc_cache_invalidate_duration_seconds",
            "Time an own committed write spends invalidating before it is acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cache_invalidation_lag_seconds = Histogram(
            "dbsvc_cache_invalidation_lag_seconds",
            "From a write's commit elsewhere to its invalidation here (Redis broadcasts and"
            " PostgreSQL notifications).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _children(self, key: tuple[str, str, str]) -> tuple[Counter, Histogram]:
        """The labelled children of a (transport, operation, code), kept: ``labels()`` takes a
        lock and builds a key on every call (the label sets are bounded: operations, codes)."""
        children = self._request_children.get(key)
        if children is None:
            transport, operation, code = key
            children = (
                self.requests.labels(transport, operation, code),
                self.request_seconds.labels(transport, operation),
            )
            self._request_children[key] = children
        return children

    def request_done(self, transport: str, operation: str, code: str, seconds: float) -> None:
        """Count and time one request."""
        counter, seconds_histogram = self._children((transport, operation, code))
        counter.inc()
        seconds_histogram.observe(seconds)

    def requests_done(self, done: Iterable[tuple[str, str, str, float]]) -> None:
        """Count and time requests (transport, operation, code, seconds) together: one
        increment per counter and histogram bucket they touch instead of one per request (in
        multiprocess mode each is a locked write to a shared file; per request, ~8% of a PK
        lookup's throughput at concurrency 32, 2026-12-05)."""
        counts: dict[tuple[str, str, str], list[float]] = {}
        for transport, operation, code, seconds in done:
            key = (transport, operation, code)
            durations = counts.get(key)
            if durations is None:
                counts[key] = [seconds]
            else:
                durations.append(seconds)
        for key, durations in counts.items():
            counter, seconds_histogram = self._children(key)
            counter.inc(len(durations))
            observe_all(seconds_histogram, durations)

    def register(self, collector: Collector) -> None:
        """Add a collector that reads live state (pool sizes, tenants) at scrape time."""
        if self.multiprocess:
            self._live.append(collector)
            self.refresh()
        else:
            self.registry.register(collector)

    def refresh(self) -> None:
        """Multiprocess mode: copy the live collectors' readings into this worker's gauges.

        A label set a collector no longer reports (a pool that closed) is set to 0: gauges of
        this mode cannot drop a label set."""
        self.gc.flush()
        for collector in self._live:
            for family in collector.collect():
                seen: set[tuple[str, ...]] = set()
                for sample in family.samples:
                    names = tuple(sorted(sample.labels))
                    gauge = self._gauge(sample.name, family.documentation, names)
                    if gauge is None:
                        continue
                    values = tuple(sample.labels[n] for n in names)
                    seen.add(values)
                    (gauge.labels(*values) if names else gauge).set(sample.value)
                stale = self._reported.get(family.name, set()) - seen
                for values in stale:
                    entry = self._gauges.get(family.name)
                    if entry is not None and entry[1]:
                        entry[0].labels(*values).set(0)
                self._reported[family.name] = seen

    def _gauge(self, name: str, documentation: str, labels: Iterable[str]) -> Gauge | None:
        names = tuple(labels)
        entry = self._gauges.get(name)
        if entry is None:
            gauge = Gauge(
                name,
                documentation,
                names,
                registry=None,
                multiprocess_mode="livemax" if name in _LIVE_MAX else "livesum",
            )
            entry = self._gauges[name] = (gauge, names)
        return entry[0] if entry[1] == names else None

    def before_render(self, settle: Callable[[], None]) -> None:
        """``settle`` records what its owner holds back (``RequestWindow.later``) before the
        figures are rendered."""
        self._settles.append(settle)

    def render(self) -> bytes:
        for settle in self._settles:
            settle()
        if not self.multiprocess:
            self.gc.flush()
            return generate_latest(self.registry)
        from prometheus_client import multiprocess  # noqa: PLC0415

        self.refresh()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def observe_all(histogram: Histogram, values: list[float]) -> None:
    """``histogram.observe`` of each of ``values`` (a labelled child, or one without labels),
    as one increment of its sum and of each bucket they fall in. This reads the histogram's
    buckets (``_upper_bounds``, ``_buckets``, ``_sum``: prometheus_client keeps no public way
    to add several observations); a version without them gets one ``observe`` each
    (tests/unit/test_metrics.py renders both ways and compares)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    per_bucket = [0] * len(bounds)
    for value in values:
        # observe's bucket: the first whose bound is >= the value (the last is +Inf).
        per_bucket[bisect.bisect_left(bounds, value)] += 1
    total.inc(sum(values))
    for bucket, count in zip(buckets, per_bucket, strict=True):
        if count:
            bucket.inc(count)
