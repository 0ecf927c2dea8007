"""Partition maintenance: create ahead, drop past retention, list, detach and attach.

``maintain`` takes a session-level ``pg_try_advisory_lock``: with several service instances,
exactly one runs maintenance at a time and the others skip that round. A record whose partition
does not exist yet lands in the DEFAULT partition (the insert never fails); creating a range that
the default partition already holds rows for moves those rows into the new partition in the same
transaction (DETACH default, CREATE, move, ATTACH). Retention drops whole partitions, and deletes
expired rows from the default partition and expired 1-minute candles.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from database_service.errors import NotFound
from database_service.observability.metrics import Metrics
from database_service.postgres import Connection
from database_service.tenancy.ids import quote_ident
from database_service.timeseries.layout import (
    SeriesSpec,
    aligned_ranges,
    floor_time,
    partition_ddl,
    partition_name,
)

__all__ = ["MaintenanceReport", "PartitionInfo", "PartitionManager"]

log = logging.getLogger(__name__)

MAINTENANCE_LOCK_KEY = 0x6462737674736D  # 'dbsvtsm'


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    parent: str
    name: str
    bound: str
    rows_estimate: int
    bytes: int

    def to_dict(self) -> dict[str, object]:
        return {
            "parent": self.parent,
            "name": self.name,
            "bound": self.bound,
            "rows_estimate": self.rows_estimate,
            "bytes": self.bytes,
        }


@dataclass(slots=True)
class MaintenanceReport:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    moved_from_default: int = 0
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "created": self.created,
            "dropped": self.dropped,
            "moved_from_default": self.moved_from_default,
            "duration_ms": round(self.duration_ms, 2),
        }


class PartitionManager:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        schema: str,
        specs: Sequence[SeriesSpec],
        metrics: Metrics,
    ) -> None:
        self._pool = pool
        self.schema = schema
        self.specs = {s.table: s for s in specs}
        self._metrics = metrics
        self.last_run: dt.datetime | None = None
        self.partitions: dict[str, int] = {}  # per table, as of the last round (for metrics)
        self.rollup_lag_seconds: float | None = None

    async def maintain(self, now: dt.datetime | None = None) -> MaintenanceReport | None:
        """One maintenance round; None when another instance holds the maintenance lock."""
        now = now or dt.datetime.now(dt.UTC)
        started = time.perf_counter()
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_KEY):
                self._metrics.maintenance_runs.labels("skipped").inc()
                return None
            try:
                report = MaintenanceReport()
                for spec in self.specs.values():
                    await self._create_ahead(conn, spec, now, report)
                    await self._retention(conn, spec, now, report)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
        report.duration_ms = (time.perf_counter() - started) * 1000
        self.last_run = now
        self.partitions = await self.count()
        self.rollup_lag_seconds = await self.rollup_lag(now)
        self._metrics.maintenance_runs.labels("ran").inc()
        self._metrics.maintenance_seconds.observe(report.duration_ms / 1000)
        if report.created or report.dropped:
            log.info(
                "partitions: created %d, dropped %d, moved %d rows from default (%.0f ms)",
                len(report.created), len(report.dropped), report.moved_from_default,
                report.duration_ms,
            )  # fmt: skip
        return report

    async def run_forever(self, every: float) -> None:
        while True:
            try:
                await self.maintain()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.error("partition maintenance failed: %s", exc)
            await asyncio.sleep(every)

    def _qualified(self, name: str) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(name)}"

    async def _existing(self, conn: Connection, table: str) -> set[str]:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
            " WHERE n.nspname = $1 AND p.relname = $2",
            self.schema,
            table,
        )
        return {r["relname"] for r in rows}

    async def create_range(
        self, conn: Connection, spec: SeriesSpec, start: dt.datetime, end: dt.datetime
    ) -> int:
        """Create one range partition; rows for it waiting in DEFAULT move in. Returns moved."""
        parent = self._qualified(spec.table)
        default = self._qualified(f"{spec.table}_default")
        async with conn.transaction():
            waiting = await conn.fetchval(
                f"SELECT count(*) FROM {default} WHERE time >= $1 AND time < $2", start, end
            )
            if waiting:
                await conn.execute(f"ALTER TABLE {parent} DETACH PARTITION {default}")
            for statement in partition_ddl(self.schema, spec, start, end):
                await conn.execute(statement)
            if waiting:
                await conn.execute(
                    f"WITH moved AS (DELETE FROM {default} WHERE time >= $1 AND time < $2"
                    f" RETURNING *) INSERT INTO {parent} SELECT * FROM moved",
                    start,
                    end,
                )
                await conn.execute(f"ALTER TABLE {parent} ATTACH PARTITION {default} DEFAULT")
        return int(waiting)

    async def _create_ahead(
        self, conn: Connection, spec: SeriesSpec, now: dt.datetime, report: MaintenanceReport
    ) -> None:
        existing = await self._existing(conn, spec.table)
        earliest = now - spec.behind
        if spec.retention is not None:  # never create what retention would drop at once
            earliest = max(earliest, floor_time(now - spec.retention, spec.interval))
        for start, end in aligned_ranges(spec, earliest, now + spec.ahead):
            name = partition_name(spec.table, start)
            if name in existing:
                continue
            report.moved_from_default += await self.create_range(conn, spec, start, end)
            report.created.append(name)

    async def _retention(
        self, conn: Connection, spec: SeriesSpec, now: dt.datetime, report: MaintenanceReport
    ) -> None:
        if spec.retention is None:
            return
        cutoff = floor_time(now - spec.retention, spec.interval)
        for info in await self.list(spec.table):
            start = _range_start(info.bound)
            if start is None or start + spec.interval > cutoff:
                continue  # still holds rows inside the retention period (or is the default)
            await conn.execute(f"DROP TABLE {self._qualified(info.name)}")
            report.dropped.append(info.name)
        default = self._qualified(f"{spec.table}_default")
        await conn.execute(f"DELETE FROM {default} WHERE time < $1", cutoff)
        if spec.table == "trading_ticks":
            await conn.execute(
                f"DELETE FROM {self._qualified('candles_1m')} WHERE bucket < $1", cutoff
            )

    async def list(
        self, table: str | None = None, schemas: Sequence[str] | None = None
    ) -> list[PartitionInfo]:
        """Partitions (first level) of partitioned tables, with sizes and row estimates."""
        rows = await self._pool.fetch(
            "SELECT pn.nspname || '.' || p.relname AS parent, c.relname AS name,"
            " coalesce(pg_get_expr(c.relpartbound, c.oid), '') AS bound,"
            " greatest(c.reltuples, 0)::bigint AS rows_estimate,"
            " pg_total_relation_size(c.oid) AS bytes"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent"
            " JOIN pg_namespace pn ON pn.oid = p.relnamespace"
            " WHERE p.relkind = 'p' AND NOT p.relispartition AND pn.nspname = ANY($1)"
            " AND ($2::text IS NULL OR p.relname = $2) ORDER BY parent, name",
            list(schemas or [self.schema]),
            table,
        )
        return [PartitionInfo(**dict(r)) for r in rows]

    async def detach(self, table: str, name: str) -> None:
        async with self._pool.acquire() as conn:
            await conn.execute(
                f"ALTER TABLE {self._qualified(self._spec(table).table)}"
                f" DETACH PARTITION {self._qualified(name)}"
            )

    async def attach(self, table: str, name: str, start: dt.datetime) -> None:
        spec = self._spec(table)
        start = floor_time(start, spec.interval)
        async with self._pool.acquire() as conn:
            end = start + spec.interval
            await conn.execute(
                f"ALTER TABLE {self._qualified(spec.table)}"
                f" ATTACH PARTITION {self._qualified(name)}"
                f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )

    def _spec(self, table: str) -> SeriesSpec:
        try:
            return self.specs[table]
        except KeyError:
            known = ", ".join(self.specs)
            raise NotFound(f"{table!r} is not a time-series table ({known})") from None

    async def rollup_lag(self, now: dt.datetime) -> float:
        """How far the 1-minute candles trail the newest tick of the last hour, in seconds.

        The triggers roll up inside the writing transaction, so this is 0 unless they were
        disabled or failed; a growing value means candles are missing."""
        lag = await self._pool.fetchval(
            "SELECT greatest(0, extract(epoch FROM"
            f" (SELECT max(time) FROM {self._qualified('trading_ticks')}"
            "  WHERE time >= $1::timestamptz - interval '1 hour' AND time <= $1::timestamptz)"
            f" - (SELECT max(bucket) + interval '1 minute' FROM {self._qualified('candles_1m')}"
            "  WHERE bucket >= $1::timestamptz - interval '61 minutes'"
            "    AND bucket <= $1::timestamptz)))",
            now,
        )
        return float(lag or 0)

    async def count(self) -> dict[str, int]:
        return {t: len(await self.list(t)) for t in self.specs}


def _range_start(bound: str) -> dt.datetime | None:
    # "FOR VALUES FROM ('2024-01-01 00:00:00+00') TO ('...')"; DEFAULT has no start.
    if "FROM ('" not in bound:
        return None
    text = bound.split("FROM ('", 1)[1].split("')", 1)[0]
    with contextlib.suppress(ValueError):
        return dt.datetime.fromisoformat(text)
    return None
