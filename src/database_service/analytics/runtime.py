"""Analytics in a running service: the store the settings name, the use case, the replicator,
the health probe and the metrics — composed here so the composition root adds one call.

Off unless ``DBSVC_CLICKHOUSE_ENABLED`` (or ``DBSVC_CLICKHOUSE_URL``) is set: chDB's library
costs ~350 MB of memory in the process that opens it, and the triggers queue nothing while off.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from database_service.analytics.replicator import (
    Replicator,
    set_capture,
)
from database_service.analytics.service import Analytics, AnalyticsLimits
from database_service.config import Settings
from database_service.stores.clickhouse import ClickHouseStore
from database_service.tenancy.ids import quote_ident

__all__ = ["AnalyticsRuntime", "open_store"]

log = logging.getLogger(__name__)

QUEUE_COUNT_CAP = 1_000_000


def open_store(settings: Settings) -> ClickHouseStore:
    """The server when a URL is given, else chDB under ``<data_dir>/clickhouse``."""
    if settings.clickhouse_url is not None:
        from database_service.stores.clickhouse.server import (  # noqa: PLC0415 (only when used)
            ClickHouseServerStore,
        )

        return ClickHouseServerStore(settings.clickhouse_url.get_secret_value())
    from database_service.stores.clickhouse.host import ChdbProcessStore  # noqa: PLC0415

    # chDB runs in a host process of its own, shared by the serving processes (host.py says why).
    return ChdbProcessStore(settings.clickhouse_path or settings.data_dir / "clickhouse")


def limits_of(settings: Settings) -> AnalyticsLimits:
    return AnalyticsLimits(
        max_execution_seconds=settings.clickhouse_max_execution_seconds,
        max_memory_bytes=settings.clickhouse_max_memory_bytes,
        max_rows_to_read=settings.clickhouse_max_rows_to_read,
        max_result_bytes=settings.clickhouse_max_result_bytes,
        max_result_rows=settings.max_result_rows,
        tenant_max_tables=settings.clickhouse_tenant_max_tables,
        tenant_max_bytes=settings.clickhouse_tenant_max_bytes,
    )


@dataclass(eq=False)  # hashable by identity: it is a Prometheus collector
class AnalyticsRuntime:
    analytics: Analytics
    replicator: Replicator
    owner_pool: asyncpg.Pool
    control_schema: str
    # The queue as last read by the probe (queued: at most QUEUE_COUNT_CAP).
    queued: int = 0
    oldest_age_s: float = 0.0
    read_at: float = 0.0
    name: str = "clickhouse"
    _errors: list[str] = field(default_factory=list)

    async def enable_capture(self) -> None:
        async with self.owner_pool.acquire() as conn:
            await set_capture(conn, self.control_schema, True)

    async def tenant_deleted(self, tenant_id: str) -> None:
        """Forget the tenant's provisioned database. Its purge was queued in the delete's own
        transaction (``TenantManager.on_deleting``); the replicator runs it in its place in the
        change order."""
        self.analytics.forget(tenant_id)

    async def read_queue(self) -> None:
        c = quote_ident(self.control_schema)
        async with self.owner_pool.acquire() as conn:
            # Counted up to QUEUE_COUNT_CAP: a backlog of millions must not make health slow.
            # One row always: scalar subqueries.
            row = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM (SELECT 1 FROM {c}.analytics_changes"
                f" LIMIT {QUEUE_COUNT_CAP}) q) AS n,"
                " coalesce(extract(epoch FROM clock_timestamp() - (SELECT queued_at FROM"
                f" {c}.analytics_changes ORDER BY seq LIMIT 1)), 0)::float8 AS age"
            )
        assert row is not None
        self.queued, self.oldest_age_s, self.read_at = int(row["n"]), float(row["age"]), time.time()

    async def check(self) -> dict[str, Any]:
        """``dependencies.clickhouse`` (and, beyond ``status``, ``database_details.clickhouse``)."""
        try:
            document = await self.analytics.document()
        except Exception as exc:  # the store is down or refused: that is the health answer
            return {"status": "unhealthy", "error": str(exc)[:300]}
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            await self.read_queue()
        status = self.replicator.status
        lags = sorted(status.lags[-1000:])
        replication = {
            "state": status.state,
            "lag_seconds": round(self.oldest_age_s, 3),
            "queued_changes": self.queued,
            "batches": status.batches,
            "rows": status.rows,
            "replays": status.replays,
            "batch_lag_p50_s": round(lags[len(lags) // 2], 3) if lags else None,
            "batch_lag_p99_s": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 3)
            if lags
            else None,
            "last_error": status.last_error,
        }
        return {"status": "healthy", **document, "replication": replication}

    def collect(self) -> Iterator[Metric]:
        lag = GaugeMetricFamily(
            "dbsvc_analytics_replication_lag_seconds",
            "Age of the oldest change queued for ClickHouse (0: all replicated), as last read.",
        )
        lag.add_metric([], self.oldest_age_s)
        yield lag
        queued = GaugeMetricFamily(
            "dbsvc_analytics_queued_changes", "Changes queued for ClickHouse, as last read."
        )
        queued.add_metric([], self.queued)
        yield queued
        s = self.replicator.status
        for name, doc, value in (
            ("dbsvc_analytics_replicated_rows", "Changes stored in ClickHouse.", s.rows),
            ("dbsvc_analytics_replicated_batches", "Batches stored in ClickHouse.", s.batches),
            (
                "dbsvc_analytics_replayed_batches",
                "In-flight batches sent again after a crash (deduplicated by ClickHouse).",
                s.replays,
            ),
            (
                "dbsvc_analytics_queries",
                "Tenant SQL queries answered by ClickHouse.",
                self.analytics.queries,
            ),
            (
                "dbsvc_analytics_refused",
                "Tenant SQL refused by the guard or checks.",
                self.analytics.refused,
            ),
            (
                "dbsvc_analytics_tenant_inserts",
                "Rows inserted into tenants' own ClickHouse tables (Analytics.insert).",
                self.analytics.inserts,
            ),
            (
                "dbsvc_analytics_tenant_inserts_refused",
                "Inserts into tenants' own ClickHouse tables refused before they ran.",
                self.analytics.inserts_refused,
            ),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], value)
            yield counter
        up = GaugeMetricFamily(
            "dbsvc_analytics_replicator_active",
            "1 where this process holds the replication lock and replicates.",
        )
        up.add_metric([], 1.0 if s.state == "replicating" else 0.0)
        yield up


async def start_analytics(
    settings: Settings,
    store: ClickHouseStore,
    analytics: Analytics,
    *,
    dsn: str,
    owner_pool: asyncpg.Pool,
) -> AnalyticsRuntime:
    start = getattr(store, "start", None)
    if start is not None:
        await start()  # the chDB host process, started if none runs yet
    await analytics.start()
    replicator = Replicator(
        dsn,
        store,
        control_schema=settings.control_schema,
        batch_size=settings.clickhouse_replication_batch,
    )
    runtime = AnalyticsRuntime(analytics, replicator, owner_pool, settings.control_schema)
    await runtime.enable_capture()
    return runtime
