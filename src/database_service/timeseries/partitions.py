"""Partition maintenance: create ahead, drop past retention, list, detach and attach — without
ever making a tenant wait.

``maintain`` takes a session-level ``pg_try_advisory_lock``: with several service instances,
exactly one runs maintenance at a time and the others skip that round. A record whose partition
does not exist yet lands in the DEFAULT partition (the insert never fails); retention drops whole
partitions, and deletes expired rows from the DEFAULT partition and expired 1-minute candles.

Locks. Tenants read and write the shared parents all the time, and a tenant may keep a
transaction open for as long as its timeouts allow; PostgreSQL queues lock requests in order, so a
statement waiting for a strong lock makes every later reader wait behind it. What PostgreSQL 18
takes (observed in ``pg_locks``, ``test_timeseries_partitions.py::test_locks_taken``):

==========================================  ===========================  =====================
statement                                   parent                       DEFAULT partition
==========================================  ===========================  =====================
``CREATE TABLE … PARTITION OF parent``      ACCESS EXCLUSIVE             ACCESS EXCLUSIVE
``CREATE TABLE x (LIKE parent …)``          ACCESS SHARE                 —
``ALTER TABLE parent ATTACH PARTITION x``   SHARE UPDATE EXCLUSIVE       ACCESS EXCLUSIVE
``ALTER TABLE parent DETACH PARTITION p``   ACCESS EXCLUSIVE             ACCESS EXCLUSIVE
``DROP TABLE p`` (p attached)               ACCESS EXCLUSIVE             ACCESS EXCLUSIVE
``DELETE FROM default …``                   —                            ROW EXCLUSIVE
==========================================  ===========================  =====================

So a new range is built as a standalone table first (``LIKE parent INCLUDING ALL``, and for
ticks hash-partitioned by company into its children, as ``layout.partition_ddl`` would), rows of
that range waiting in DEFAULT are moved into it directly (ROW EXCLUSIVE on DEFAULT only; the
parent's candle trigger does not see them again), and then it is attached. ATTACH leaves the
parent readable and writable (SHARE UPDATE EXCLUSIVE), but it still needs ACCESS EXCLUSIVE on the
DEFAULT partition, which it scans under that lock to prove no row there belongs to the new range
(measured: about 90 ms per million rows in DEFAULT, 1-2 ms when it holds only the usual stray
late/far-future rows). A reader whose plan prunes DEFAULT away (a literal time range) neither
blocks ATTACH nor waits for it; every other read of the parent (tenant A's long ``SELECT … FROM
trading_ticks``) holds ACCESS SHARE on DEFAULT, so it blocks the ATTACH, and while ATTACH waits,
later readers of DEFAULT queue behind it. A CHECK constraint on DEFAULT excluding the new range
would skip the scan, but adding and dropping it takes ACCESS EXCLUSIVE on DEFAULT twice more, for
a scan that is normally a millisecond. ``DETACH … CONCURRENTLY`` would avoid the parent's ACCESS
EXCLUSIVE for retention, but PostgreSQL refuses it when a DEFAULT partition exists. No lock-free
path exists here, so:

* every statement that locks a shared parent or its DEFAULT partition runs in its own
  transaction with ``SET LOCAL lock_timeout`` (``lock_timeout_ms``, 100 ms by default): a tenant
  waits behind maintenance at most that long (plus the DEFAULT scan, above);
* ``lock_not_available`` is retried with doubling backoff ``lock_retries`` times, the tenants
  running freely in between; still busy, the item is given up for this round (logged once,
  counted in ``dbsvc_partition_maintenance_lock_timeouts``, listed in ``MaintenanceReport.busy``)
  together with the rest of that table's partition changes (they need the same locks), and the
  next round tries again. The admin ``detach``/``attach`` raise ``FailedPrecondition`` instead;
* each item (one range created with its rows moved, one partition detached and dropped) is one
  transaction, so a timeout rolls it back whole: nothing is ever half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg

from database_service.errors import FailedPrecondition, NotFound, postgres_unreachable
from database_service.observability.metrics import Metrics
from database_service.observability.notices import Notices
from database_service.postgres import Connection
from database_service.tenancy.ids import quote_ident
from database_service.timeseries.layout import (
    SeriesSpec,
    aligned_ranges,
    floor_time,
    partition_name,
)

__all__ = ["MaintenanceReport", "PartitionInfo", "PartitionManager", "TableBusy"]

log = logging.getLogger(__name__)

MAINTENANCE_LOCK_KEY = 0x6462737674736D  # 'dbsvtsm'
MAX_BACKOFF_SECONDS = 1.0

T = TypeVar("T")


class TableBusy(Exception):
    """A lock on a shared table was not available within ``lock_timeout``, after every retry.

    Nothing was changed (the attempt's transaction was rolled back)."""

    def __init__(self, table: str, what: str, attempts: int, lock_timeout_ms: int) -> None:
        super().__init__(
            f"shared table {table} is busy: {what} gave up after {attempts} attempts"
            f" (lock_timeout {lock_timeout_ms} ms)"
        )
        self.table = table
        self.what = what


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
    busy: list[str] = field(default_factory=list)  # left for the next round: the table was busy
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "created": self.created,
            "dropped": self.dropped,
            "moved_from_default": self.moved_from_default,
            "busy": self.busy,
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
        lock_timeout_ms: int = 100,
        lock_retries: int = 5,
        lock_backoff_seconds: float = 0.05,
    ) -> None:
        self._pool = pool
        self.schema = schema
        self.specs = {s.table: s for s in specs}
        self._metrics = metrics
        self._notices = Notices(log)
        self.lock_timeout_ms = int(lock_timeout_ms)
        self.lock_retries = max(0, int(lock_retries))
        self.lock_backoff_seconds = lock_backoff_seconds
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
                    busy = await self._create_ahead(conn, spec, now, report)
                    await self._retention(conn, spec, now, report, busy=busy)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
        report.duration_ms = (time.perf_counter() - started) * 1000
        self.last_run = now
        self.partitions = await self.count()
        self.rollup_lag_seconds = await self.rollup_lag(now)
        self._metrics.maintenance_runs.labels("ran").inc()
        self._metrics.maintenance_seconds.observe(report.duration_ms / 1000)
        if report.created or report.dropped or report.busy:
            log.info(
                "partitions: created %d, dropped %d, moved %d rows from default,"
                " %d left for the next round (busy) (%.0f ms)",
                len(report.created), len(report.dropped), report.moved_from_default,
                len(report.busy), report.duration_ms,
            )  # fmt: skip
        return report

    async def run_forever(self, every: float) -> None:
        """Maintain every ``every`` seconds until cancelled; a failed round is logged, counted
        and followed by the next one."""
        while True:
            try:
                await self.maintain()
            except Exception as exc:
                self._metrics.maintenance_runs.labels("failed").inc()
                if postgres_unreachable(exc):  # one line per outage, not a traceback a round
                    self._notices.once(
                        "unreachable",
                        "partition maintenance: PostgreSQL is unreachable (%s); it resumes when"
                        " PostgreSQL is back",
                        exc,
                    )
                else:
                    log.exception("partition maintenance failed; next round in %.0f s", every)
            await asyncio.sleep(every)

    def _qualified(self, name: str) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(name)}"

    async def _locked(
        self,
        conn: Connection,
        table: str,
        action: str,
        what: str,
        work: Callable[[], Awaitable[T]],
        retry_on: tuple[type[Exception], ...] = (),
    ) -> T:
        """Run ``work`` in its own transaction under a short ``lock_timeout``; retry with backoff
        while a lock is not available (or ``retry_on`` is raised). Still busy: ``TableBusy``."""
        retryable: tuple[type[Exception], ...] = (
            asyncpg.exceptions.LockNotAvailableError,
            *retry_on,
        )
        delay = self.lock_backoff_seconds
        attempts = self.lock_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {self.lock_timeout_ms}")
                    return await work()
            except retryable as exc:
                if attempt == attempts:
                    self._metrics.maintenance_lock_timeouts.labels(table, action).inc()
                    raise TableBusy(
                        self._qualified(table), what, attempts, self.lock_timeout_ms
                    ) from exc
                log.debug("partitions: %s: %s; retrying in %.2f s", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _existing(self, conn: Connection, table: str) -> set[str]:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
            " WHERE n.nspname = $1 AND p.relname = $2",
            self.schema,
            table,
        )
        return {r["relname"] for r in rows}

    async def _columns(self, conn: Connection, table: str) -> str:
        names = await conn.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
            self._qualified(table),
        )
        return ", ".join(quote_ident(r["attname"]) for r in names)

    def _standalone_ddl(self, spec: SeriesSpec, start: dt.datetime) -> list[str]:
        """The new range as a table of its own (for ticks, hash-partitioned by company into its
        children): the same tree as ``layout.partition_ddl``, without locking the parent."""
        name = partition_name(spec.table, start)
        table = self._qualified(name)
        like = f"(LIKE {self._qualified(spec.table)} INCLUDING ALL)"
        if not spec.hash_partitions:
            return [f"CREATE TABLE {table} {like}"]
        statements = [f"CREATE TABLE {table} {like} PARTITION BY HASH (company_id)"]
        for remainder in range(spec.hash_partitions):
            statements.append(
                f"CREATE TABLE {self._qualified(f'{name}_h{remainder}')} PARTITION OF {table}"
                f" FOR VALUES WITH (MODULUS {spec.hash_partitions}, REMAINDER {remainder})"
            )
        return statements

    async def create_range(
        self, conn: Connection, spec: SeriesSpec, start: dt.datetime, end: dt.datetime
    ) -> int:
        """Create one range partition; rows for it waiting in DEFAULT move in. Returns moved.

        One transaction: the standalone tree, the rows moved into it, ATTACH. Raises
        ``TableBusy`` when the locks stayed unavailable (nothing is left behind)."""
        name = partition_name(spec.table, start)
        parent = self._qualified(spec.table)
        default = self._qualified(f"{spec.table}_default")
        bounds = f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"

        async def work() -> int:
            for statement in self._standalone_ddl(spec, start):
                await conn.execute(statement)
            moved = 0
            waiting = await conn.fetchval(
                f"SELECT count(*) FROM {default} WHERE time >= $1 AND time < $2", start, end
            )
            if waiting:
                columns = await self._columns(conn, spec.table)
                status = await conn.execute(
                    f"WITH moved AS (DELETE FROM {default} WHERE time >= $1 AND time < $2"
                    f" RETURNING {columns}) INSERT INTO {self._qualified(name)} ({columns})"
                    f" SELECT {columns} FROM moved",
                    start,
                    end,
                )
                moved = int(status.rsplit(" ", 1)[1])
            await conn.execute(
                f"ALTER TABLE {parent} ATTACH PARTITION {self._qualified(name)} {bounds}"
            )
            return moved

        # A row arriving in DEFAULT for this range between the move and ATTACH fails the ATTACH's
        # scan (check_violation); the next attempt moves it too.
        return await self._locked(
            conn, spec.table, "create", f"creating {name}", work,
            retry_on=(asyncpg.exceptions.CheckViolationError,),
        )  # fmt: skip

    def _busy(self, report: MaintenanceReport, error: TableBusy, left: Sequence[str]) -> None:
        log.warning("partitions: %s; %d change(s) left for the next round", error, len(left))
        report.busy.extend(left)

    async def _create_ahead(
        self, conn: Connection, spec: SeriesSpec, now: dt.datetime, report: MaintenanceReport
    ) -> bool:
        """Create the missing ranges, oldest first; True when the table was busy."""
        existing = await self._existing(conn, spec.table)
        earliest = now - spec.behind
        if spec.retention is not None:  # never create what retention would drop at once
            earliest = max(earliest, floor_time(now - spec.retention, spec.interval))
        missing = [
            (start, end)
            for start, end in aligned_ranges(spec, earliest, now + spec.ahead)
            if partition_name(spec.table, start) not in existing
        ]
        for index, (start, end) in enumerate(missing):
            try:
                report.moved_from_default += await self.create_range(conn, spec, start, end)
            except TableBusy as exc:
                self._busy(report, exc, [partition_name(spec.table, s) for s, _ in missing[index:]])
                return True
            report.created.append(partition_name(spec.table, start))
        return False

    async def _retention(
        self,
        conn: Connection,
        spec: SeriesSpec,
        now: dt.datetime,
        report: MaintenanceReport,
        *,
        busy: bool = False,
    ) -> None:
        if spec.retention is None:
            return
        cutoff = floor_time(now - spec.retention, spec.interval)
        parent = self._qualified(spec.table)
        expired = [
            info.name
            # On the round's own connection: a second one from the pool while this one is held
            # deadlocked with anyone else holding the other and waiting for one more.
            for info in await self.list(spec.table, conn=conn)
            # still holds rows inside the retention period (or is the default): kept
            if (start := _range_start(info.bound)) is not None and start + spec.interval <= cutoff
        ]
        if busy:  # this round already found the table busy: the drops wait for the next one
            report.busy.extend(expired)
            expired = []
        for index, name in enumerate(expired):
            table = self._qualified(name)

            async def drop(table: str = table) -> None:
                await conn.execute(f"ALTER TABLE {parent} DETACH PARTITION {table}")
                await conn.execute(f"DROP TABLE {table}")

            try:
                await self._locked(conn, spec.table, "drop", f"dropping {name}", drop)
            except TableBusy as exc:
                self._busy(report, exc, expired[index:])
                break
            report.dropped.append(name)
        default = self._qualified(f"{spec.table}_default")
        # ROW EXCLUSIVE only (readers and writers go on), but row locks can still make it wait.
        expiring = [(f"DELETE FROM {default} WHERE time < $1", f"{spec.table}_default")]
        if spec.table == "trading_ticks":
            expiring.append(
                (f"DELETE FROM {self._qualified('candles_1m')} WHERE bucket < $1", "candles_1m")
            )
        for sql, target in expiring:

            async def delete(sql: str = sql) -> None:
                await conn.execute(sql, cutoff)

            try:
                await self._locked(conn, spec.table, "expire", f"expiring rows of {target}", delete)
            except TableBusy as exc:
                self._busy(report, exc, [f"{target} (expired rows)"])

    async def list(
        self,
        table: str | None = None,
        schemas: Sequence[str] | None = None,
        *,
        conn: Connection | None = None,
    ) -> list[PartitionInfo]:
        """Partitions (first level) of partitioned tables, with sizes and row estimates (on
        ``conn`` when given, else on a connection of the pool)."""
        rows = await (conn or self._pool).fetch(
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
        """Detach a partition (it stays as a table of its own). ``FailedPrecondition`` when the
        table stays busy (a tenant's transaction holds it) through the retries."""
        spec = self._spec(table)
        statement = (
            f"ALTER TABLE {self._qualified(spec.table)} DETACH PARTITION {self._qualified(name)}"
        )
        await self._admin_change(spec, "detach", f"detaching {name}", statement)

    async def attach(self, table: str, name: str, start: dt.datetime) -> None:
        """Attach a table as the range starting at ``start`` (floored to the interval)."""
        spec = self._spec(table)
        start = floor_time(start, spec.interval)
        end = start + spec.interval
        statement = (
            f"ALTER TABLE {self._qualified(spec.table)} ATTACH PARTITION {self._qualified(name)}"
            f" FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
        )
        await self._admin_change(spec, "attach", f"attaching {name}", statement)

    async def _admin_change(self, spec: SeriesSpec, action: str, what: str, sql: str) -> None:
        async with self._pool.acquire() as conn:

            async def work() -> None:
                await conn.execute(sql)

            try:
                await self._locked(conn, spec.table, action, what, work)
            except TableBusy as exc:
                log.warning("partitions: %s", exc)
                raise FailedPrecondition(
                    f"shared table {self._qualified(spec.table)} is busy ({what} waited"
                    f" {self.lock_timeout_ms} ms for its lock, {self.lock_retries + 1} times,"
                    " behind other transactions); retry",
                    sqlstate="55P03",
                ) from exc

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
