"""``database-service analytics backfill [--tenant ID]``: bring rows that predate replication
(written while ClickHouse analytics was off) into ClickHouse, exactly once.

Per tenant, in one transaction: the replicated tables are locked in SHARE mode (writers of them
wait, readers do not; every writer that started earlier has committed, and its change is queued
with a lower seq), a purge marker is queued, then every row of the tenant as a change. The
replicator meets them in seq order: whatever it had stored of the tenant is removed, then the
snapshot is stored, then the changes committed after the lock. Nothing is doubled (the purge)
and nothing is lost (the lock puts each row either in the snapshot or after it, never in
between). The lock holds the tenant's writers — on the shared tables, every tenant's writers —
for as long as the tenant's rows take to queue (about a second per 100,000 rows here): meant for
the step of turning analytics on, or for a tenant at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from database_service.analytics.replicator import set_capture
from database_service.backup.tenant import BackupProgress
from database_service.tenancy import TenantRegistry
from database_service.tenancy.ids import quote_ident

__all__ = ["BackfillReport", "backfill"]

_SHARED = ("trading_ticks", "ai_predictions", "candles_1m")
_OWN = ("trading_history", "trading_signals")


@dataclass
class BackfillReport:
    tenants: list[str]
    rows: dict[str, int]
    seconds: float


async def backfill(
    pool: asyncpg.Pool,
    registry: TenantRegistry,
    *,
    control_schema: str,
    shared_schema: str,
    tenants: Sequence[str] | None = None,
    progress: Callable[[BackupProgress], None] | None = None,
    wait_replicated: Callable[[], asyncio.Future[None]] | None = None,
) -> BackfillReport:
    started = time.monotonic()
    records = (
        [await registry.get_active(t) for t in tenants]
        if tenants
        else [r for r in await registry.list() if r.active]
    )
    c, s = quote_ident(control_schema), quote_ident(shared_schema)
    rows: dict[str, int] = {}
    async with pool.acquire() as conn:
        await set_capture(conn, control_schema, True)  # from now on every change is queued
        totals: dict[str, int] = {}
        for record in records:
            schema = quote_ident(record.schema_name)
            for table in _SHARED:
                totals[table] = totals.get(table, 0) + int(
                    await conn.fetchval(
                        f"SELECT count(*) FROM {s}.{table} WHERE company_id = $1", record.tenant_id
                    )
                )
            for table in _OWN:
                totals[table] = totals.get(table, 0) + int(
                    await conn.fetchval(f"SELECT count(*) FROM {schema}.{table}")
                )
        total = sum(totals.values())
        done = 0
        for record in records:
            schema = quote_ident(record.schema_name)
            tenant_id = record.tenant_id
            async with conn.transaction():
                await conn.execute(
                    f"LOCK TABLE {', '.join(f'{s}.{t}' for t in _SHARED)},"
                    f" {', '.join(f'{schema}.{t}' for t in _OWN)} IN SHARE MODE"
                )
                await conn.execute(
                    f"INSERT INTO {c}.analytics_changes (source, company_id, op, row)"
                    " VALUES ('', $1, 'P', '{}')",
                    tenant_id,
                )
                for table in (*_SHARED, *_OWN):
                    source = f"{s}.{table}" if table in _SHARED else f"{schema}.{table}"
                    where = (
                        "WHERE t.company_id = $1"
                        if table in _SHARED
                        else "WHERE $1::text IS NOT NULL"
                    )
                    status = await conn.execute(
                        f"INSERT INTO {c}.analytics_changes (source, company_id, op, row)"
                        f" SELECT '{table}', $1, 'U', to_jsonb(t) FROM {source} t {where}",
                        tenant_id,
                    )
                    moved = int(status.rsplit(" ", 1)[-1])
                    rows[table] = rows.get(table, 0) + moved
                    done += moved
                    if progress is not None:
                        progress(
                            BackupProgress("queue", f"{tenant_id}.{table}", done, max(total, done))
                        )
    if wait_replicated is not None:
        await wait_replicated()
    return BackfillReport([r.tenant_id for r in records], rows, time.monotonic() - started)
