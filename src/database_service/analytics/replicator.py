"""PostgreSQL → ClickHouse, exactly once.

Triggers queue every committed change of a replicated table in ``analytics_changes`` (control
migration 0015). One replicator per cluster (``pg_try_advisory_lock`` on a connection of its own;
other instances wait as ``standby``) drains the queue in seq order, in batches:

1. pick the batch (the oldest queued seqs) and record it in ``analytics_inflight`` — committed
   before ClickHouse sees anything;
2. insert it into ClickHouse, one block per table and segment, each with the
   ``insert_deduplication_token`` ``<batch>-<segment>-<table>``;
3. delete the batch's seqs from the queue and the in-flight record, in one transaction.

A crash between 1 and 3 leaves the in-flight record: the next replicator (this one restarted,
or another instance that takes the lock) sends exactly the same seqs again, read from the queue in
the same order, as the same blocks with the same tokens, and ClickHouse drops the replay. A crash
before 1 or after 3 loses nothing and repeats nothing. So each committed change is stored in
ClickHouse once.

A backfill queues a ``P`` marker ahead of its snapshot (analytics/backfill.py), handled alike.
A tenant deletion queues an ``X`` marker (``queue_tenant_deletion``): in its place in the order,
the replicator purges the tenant's rows and drops its database of views, so no change of the
tenant queued before it can arrive after the purge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from database_service.analytics.schema import REPLICATED, SHARED_DATABASE, tenant_database
from database_service.stores.clickhouse import ClickHouseStore
from database_service.stores.clickhouse.server import tenant_drop_ddl
from database_service.tenancy.ids import quote_ident

__all__ = ["ReplicationStatus", "Replicator", "queue_tenant_deletion", "set_capture"]

log = logging.getLogger(__name__)

REPLICATOR_LOCK_KEY = 0x64627363_68726570  # pg_try_advisory_lock: one replicator per cluster


async def set_capture(conn: Any, control_schema: str, enabled: bool) -> None:
    """Turn the triggers' queueing on (the service starts with analytics) or off."""
    await conn.execute(
        f"UPDATE {quote_ident(control_schema)}.analytics_replication"
        " SET enabled = $1, changed_at = now() WHERE enabled IS DISTINCT FROM $1",
        enabled,
    )


async def queue_tenant_deletion(conn: Any, control_schema: str, tenant_id: str) -> None:
    """Queue the purge of ``tenant_id``'s ClickHouse data, on the connection (and in the
    transaction) that deletes the tenant. Queued whether capture is on or not: ClickHouse may
    hold the tenant's rows from a time it was, and one row per deleted tenant costs nothing."""
    await conn.execute(
        f"INSERT INTO {quote_ident(control_schema)}.analytics_changes"
        " (source, company_id, op, row) VALUES ('', $1, 'X', '{}')",
        tenant_id,
    )


@dataclass(slots=True)
class ReplicationStatus:
    state: str = "starting"  # starting | standby | replicating | error
    batches: int = 0
    rows: int = 0
    replays: int = 0  # in-flight batches sent again after a crash
    last_error: str | None = None
    last_batch_at: float | None = None
    # Seconds from a change's commit (queued_at) to ClickHouse accepting it, per batch (the
    # oldest change of the batch): the bench reads percentiles of these.
    lags: list[float] = field(default_factory=list)


class Replicator:
    def __init__(
        self,
        dsn: str,
        store: ClickHouseStore,
        *,
        control_schema: str,
        batch_size: int = 20_000,
        idle_seconds: float = 0.2,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._control = quote_ident(control_schema)
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self._on_batch = on_batch
        self.status = ReplicationStatus()
        # Test hook: called after ClickHouse accepted a batch and before the queue forgets it
        # (where a crash must be harmless).
        self.after_insert: Callable[[], Any] | None = None

    async def run_forever(self) -> None:
        while True:
            conn = await asyncpg.connect(
                self._dsn, server_settings={"application_name": "dbsvc-analytics-replicator"}
            )
            try:
                while not await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1)", REPLICATOR_LOCK_KEY
                ):
                    self.status.state = "standby"
                    await asyncio.sleep(2)
                self.status.state = "replicating"
                while True:
                    try:
                        moved = await self.step(conn)
                    except asyncpg.PostgresConnectionError:
                        raise
                    except Exception as exc:  # ClickHouse refused or failed: retry the batch
                        self.status.state = "error"
                        self.status.last_error = str(exc)[:500]
                        log.warning("analytics replication: %s; retrying", self.status.last_error)
                        await asyncio.sleep(1.0)
                        continue
                    self.status.state = "replicating"
                    if moved == 0:
                        await asyncio.sleep(self.idle_seconds)
            finally:
                await conn.close()

    async def drain(self, conn: Any) -> int:
        """Replicate until the queue is empty (tests, backfill). Returns the rows moved."""
        total = 0
        while (moved := await self.step(conn)) > 0:
            total += moved
        return total

    async def step(self, conn: Any) -> int:
        """One batch: pick (or re-pick) it, insert it, forget it. Returns the changes moved."""
        c = self._control
        inflight = await conn.fetchrow(f"SELECT batch_id, seqs FROM {c}.analytics_inflight")
        if inflight is not None:
            batch_id, seqs = int(inflight["batch_id"]), list(inflight["seqs"])
            self.status.replays += 1
        else:
            seqs = [
                int(r[0])
                for r in await conn.fetch(
                    f"SELECT seq FROM {c}.analytics_changes ORDER BY seq LIMIT $1",
                    self.batch_size,
                )
            ]
            if not seqs:
                return 0
            batch_id = seqs[0]
            await conn.execute(
                f"INSERT INTO {c}.analytics_inflight (batch_id, seqs) VALUES ($1, $2)",
                batch_id,
                seqs,
            )
        # The JSON lines are built by PostgreSQL from the stored jsonb: numerics keep their exact
        # text (ClickHouse reads them into Decimal exactly), and no Python float is involved.
        rows = await conn.fetch(
            "SELECT seq, source, op::text AS op, company_id,"
            " extract(epoch FROM queued_at)::float8 AS queued,"
            " (row || jsonb_build_object('company_id', company_id, '_seq', seq,"
            " '_version', seq, '_deleted', CASE op WHEN 'D' THEN 1 ELSE 0 END))::text AS line"
            f" FROM {c}.analytics_changes WHERE seq = ANY($1::bigint[]) ORDER BY seq",
            seqs,
        )
        await self._apply(batch_id, rows)
        if self.after_insert is not None:
            await self.after_insert()
        async with conn.transaction():
            await conn.execute(
                f"DELETE FROM {c}.analytics_changes WHERE seq = ANY($1::bigint[])", seqs
            )
            await conn.execute(f"DELETE FROM {c}.analytics_inflight WHERE batch_id = $1", batch_id)
        now = time.time()
        if rows:
            lag = max(0.0, now - min(float(r["queued"]) for r in rows))
            self.status.lags.append(lag)
            del self.status.lags[:-10_000]
            if self._on_batch is not None:
                self._on_batch(len(rows), lag)
        self.status.batches += 1
        self.status.rows += len(rows)
        self.status.last_batch_at = now
        return len(seqs)

    async def _apply(self, batch_id: int, rows: Sequence[Any]) -> None:
        segment = 0
        pending: dict[str, list[str]] = {}

        async def flush() -> None:
            for table, lines in pending.items():
                await self._store.insert_json(
                    f"{SHARED_DATABASE}.{table}", lines, f"{batch_id}-{segment}-{table}"
                )
            pending.clear()

        for row in rows:
            if row["op"] in ("X", "P"):  # the tenant deleted, or a backfill's snapshot next
                await flush()
                segment += 1
                await purge_tenant(self._store, row["company_id"])
                continue
            if row["source"] not in REPLICATED:
                continue  # a table a newer version replicates: nothing to do here
            pending.setdefault(row["source"], []).append(row["line"])
        await flush()


async def purge_tenant(store: ClickHouseStore, tenant_id: str) -> None:
    """Remove everything of ``tenant_id`` from ClickHouse (idempotent)."""
    database = tenant_database(tenant_id)  # validates the id before it is written into SQL
    for name in REPLICATED:
        await store.command(
            f"ALTER TABLE {SHARED_DATABASE}.{name} DELETE WHERE company_id = '{tenant_id}'"
            " SETTINGS mutations_sync = 2"
        )
    await store.command(f"DROP DATABASE IF EXISTS {database}")
    if store.kind == "server":  # its user, settings profile and row policies
        for statement in tenant_drop_ddl(
            tenant_id, shared_tables=list(REPLICATED), shared_database=SHARED_DATABASE
        ):
            await store.command(statement)
