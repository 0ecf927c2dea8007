"""Prometheus metrics, in a registry owned by the application (no module-level globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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

    def register(self, collector: Collector) -> None:
        """Add a collector that reads live state (pool sizes, tenants) at scrape time."""
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
