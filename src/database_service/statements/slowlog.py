"""The slow-query log: statements slower than their tenant's threshold, with their plans.

The request path only decides (``is_slow``: a dict lookup and a comparison) and hands the
statement over (``submit``: ``put_nowait`` on a bounded queue). One background task takes it
from there: it asks PostgreSQL for the plan — ``EXPLAIN (COSTS OFF)``, never ``ANALYZE``, so
nothing runs again — as the tenant's own login, from the tenant's own pool, in a READ ONLY
transaction under the tenant's statement limit, then stores the entry in the control plane
(``slow_queries``, control migration 0011) and trims the tenant's entries to the retention
bounds. When the queue is full the statement is dropped and counted, never waited for.

Plans are taken with ``COSTS OFF`` for the same reason the guard refuses ``EXPLAIN`` without
it: estimates come from table-wide statistics of the shared tables, every tenant's rows. DDL,
``EXPLAIN``, ``SHOW`` and the bulk paths (COPY) have no plan to show and are logged without
one. EXPLAIN of a write
without ANALYZE plans it and executes nothing (PostgreSQL skips the READ ONLY check for
EXPLAIN-only, so a write's plan is taken in the read-only transaction too; anything a plan-time
function tried to write would be refused).

Parameters are redacted (their count is kept) unless the tenant's settings keep them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import Counter

from database_service.errors import postgres_unreachable
from database_service.observability.metrics import Metrics
from database_service.postgres import TenantPools
from database_service.postgres.deadlines import Deadlines
from database_service.query.values import coerce_params, encode_value
from database_service.results import StatementKind
from database_service.sqlguard import Classification
from database_service.tenancy import TenantRecord, quote_ident
from database_service.tenancy.secrets import TenantLogins

__all__ = ["SlowQuery", "SlowQueryLog", "StatementSettings"]

log = logging.getLogger(__name__)

# Statements with no plan to show (EXPLAIN refuses them, or they are one already).
_NO_PLAN_TAGS = frozenset({"EXPLAIN", "SHOW", "BULK INSERT", "BULK UPDATE"})
_PLAN_CHARS = 20_000  # a plan longer than this is cut (a UNION of hundreds of branches)
# One task takes every tenant's plans: a tenant whose pool is exhausted (its slow statements
# hold every connection) must not hold up the others' for long.
_PLAN_TIMEOUT_S = 5.0
_PLAN_NAME = "_dbsvc_slow_plan"
# A string constant as EXPLAIN prints it ('it''s'::text): masked in a redacted entry's plan.
_STRING_CONSTANT = re.compile(r"'(?:[^']|'')*'")


@dataclass(frozen=True, slots=True)
class StatementSettings:
    """A tenant's slow-query settings; ``None`` fields take the service's defaults."""

    slow_query_ms: float | None = None
    keep_parameters: bool | None = None

    def to_dict(self, default_ms: float, default_keep: bool) -> dict[str, Any]:
        return {
            "slow_query_ms": self.slow_query_ms if self.slow_query_ms is not None else default_ms,
            "slow_query_ms_overridden": self.slow_query_ms is not None,
            "keep_parameters": (
                self.keep_parameters if self.keep_parameters is not None else default_keep
            ),
        }


@dataclass(slots=True)
class SlowQuery:
    """A slow statement on its way from the request path to the log."""

    tenant: TenantRecord
    verdict: Classification
    sql: str
    params: Sequence[Any]
    duration_ms: float
    rows: int
    at: dt.datetime


class SlowQueryLog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        pools: TenantPools,
        logins: TenantLogins,
        deadlines: Deadlines,
        metrics: Metrics,
        default_ms: float,
        keep_parameters: bool,
        queue_size: int,
        max_entries: int,
        max_age_seconds: float,
        refresh_s: float = 5.0,
    ) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.slow_queries"
        self._settings_table = f"{quote_ident(control_schema)}.statement_settings"
        self._pools = pools
        self._logins = logins
        self._deadlines = deadlines
        self.default_ms = default_ms
        self.default_keep = keep_parameters
        self._max_entries = max_entries
        self._max_age = dt.timedelta(seconds=max_age_seconds)
        self._refresh_s = refresh_s
        self._queue: asyncio.Queue[SlowQuery] = asyncio.Queue(maxsize=queue_size)
        self._settings: dict[str, StatementSettings] = {}
        # Per tenant, the threshold in force (only tenants that override it are held).
        self._thresholds: dict[str, float] = {}
        # Tenant-free labels: the statement class and what became of the plan.
        self._slow = Counter(
            "dbsvc_slow_queries",
            "Statements slower than their tenant's slow-query threshold, by statement class.",
            ["statement_class"],
            registry=metrics.registry,
        )
        self._logged = Counter(
            "dbsvc_slow_query_log",
            "Slow statements handed to the log, by outcome: logged (with a plan), no_plan (DDL,"
            " EXPLAIN, SHOW), plan_failed, dropped (queue full), failed (not stored).",
            ["outcome"],
            registry=metrics.registry,
        )
        self._slow_children = {k: self._slow.labels(k.value) for k in StatementKind}
        self.dropped = 0
        self._plans = 0

    # --- the request path ----------------------------------------------------------------

    def is_slow(self, tenant_id: str, duration_ms: float) -> bool:
        """O(1): a dict lookup and a comparison (the settings reload in the background)."""
        return duration_ms >= self._thresholds.get(tenant_id, self.default_ms)

    def submit(self, entry: SlowQuery) -> None:
        """Hand a slow statement to the background task; dropped (and counted) when it is
        behind, never waited for."""
        self._slow_children[entry.verdict.kind].inc()
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.dropped += 1
            self._logged.labels("dropped").inc()

    # --- the background task -------------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            entry = await self._queue.get()
            try:
                await self._log(entry)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._logged.labels("failed").inc()
                log.exception("tenant %s: a slow statement was not logged", entry.tenant.tenant_id)

    async def drain(self) -> None:
        """Log what is queued now (tests, and the CLI has no background task)."""
        while not self._queue.empty():
            await self._log(self._queue.get_nowait())

    async def _log(self, entry: SlowQuery) -> None:
        tenant_id = entry.tenant.tenant_id
        keep = self._settings.get(tenant_id, StatementSettings()).keep_parameters
        if keep is None:
            keep = self.default_keep
        plan: str | None = None
        plan_error: str | None = None
        verdict = entry.verdict
        if verdict.kind is StatementKind.DDL or verdict.tag in _NO_PLAN_TAGS:
            outcome = "no_plan"
        else:
            try:
                async with asyncio.timeout(_PLAN_TIMEOUT_S):
                    plan = await self._explain(entry, with_values=keep)
                outcome = "logged"
            except asyncio.CancelledError:
                raise
            except TimeoutError:
                plan_error = f"no plan within {_PLAN_TIMEOUT_S:.0f} s (the tenant's pool busy?)"
                outcome = "plan_failed"
            except Exception as exc:
                # The tables changed since, a parameter PostgreSQL cannot type alone…: the
                # entry is kept without its plan, and says why.
                plan_error = f"{type(exc).__name__}: {exc}"[:500]
                outcome = "plan_failed"
        params = json.dumps([encode_value(p) for p in entry.params], default=str) if keep else None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"INSERT INTO {self._table} (tenant_id, fingerprint, statement, statement_class,"
                " command, parameters, parameter_count, duration_ms, row_count, recorded_at,"
                " plan, plan_error) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10,"
                " $11, $12)",
                tenant_id,
                verdict.fingerprint,
                verdict.normalized,
                verdict.kind.value,
                verdict.tag,
                params,
                len(entry.params),
                entry.duration_ms,
                entry.rows,
                entry.at,
                plan,
                plan_error,
            )
            # Retention: the newest ``max_entries`` of the tenant, none older than the age bound.
            await conn.execute(
                f"DELETE FROM {self._table} WHERE tenant_id = $1 AND (recorded_at < $2 OR id <="
                f" (SELECT id FROM {self._table} WHERE tenant_id = $1"
                " ORDER BY id DESC OFFSET $3 LIMIT 1))",
                tenant_id,
                dt.datetime.now(dt.UTC) - self._max_age,
                self._max_entries,
            )
        self._logged.labels(outcome).inc()

    async def _explain(self, entry: SlowQuery, *, with_values: bool) -> str:
        """The plan, as the tenant's company login (the user-scoped login's context is the
        request's transaction; a plan does not depend on whose rows it would read).

        ``with_values`` (the tenant keeps its parameters): the plan for the statement's
        values, as PostgreSQL plans them (values appear in it). Otherwise the generic plan
        (``plan_cache_mode = force_generic_plan``, ``EXPLAIN EXECUTE`` with NULLs), where
        parameters stay ``$n``, and the string constants of the text are masked: a redacted
        entry holds no value the caller sent."""
        tenant = entry.tenant
        login = self._logins.login(tenant)
        seconds = tenant.limits.statement_timeout_ms / 1000
        # Off the OLTP pool: plans are background work.
        async with self._pools.acquire(login, "analytics") as conn:
            watch = self._deadlines.watch(
                conn, login.role, statement_seconds=seconds, total_seconds=seconds * 2
            )
            # A name of its own each time: one left behind (a deallocation that failed) never
            # stands in the way of the next plan on the same connection.
            self._plans += 1
            name = f"{_PLAN_NAME}_{self._plans}"
            prepared = False
            try:
                async with conn.transaction(readonly=True):
                    if with_values:
                        async with watch.statement():
                            stmt = await conn.prepare(f"EXPLAIN (COSTS OFF) {entry.sql}")
                        args = coerce_params(entry.params, stmt.get_parameters())
                        async with watch.statement():
                            rows = await stmt.fetch(*args)
                    else:
                        async with watch.statement():
                            described = await conn.prepare(entry.sql)  # its parameters
                            await conn.execute(
                                "SET LOCAL plan_cache_mode = force_generic_plan;"
                                f" PREPARE {name} AS {entry.sql}"
                            )
                            prepared = True
                            nulls = ", ".join(["NULL"] * len(described.get_parameters()))
                            rows = await conn.fetch(
                                f"EXPLAIN (COSTS OFF) EXECUTE {name}"
                                + (f"({nulls})" if nulls else "")
                            )
            finally:
                if prepared:  # not transactional: it would outlive the plan on the connection
                    with contextlib.suppress(Exception):
                        async with watch.statement():
                            await conn.execute(f"DEALLOCATE {name}")
                watch.close()
        plan = "\n".join(r[0] for r in rows)
        if not with_values:
            plan = _STRING_CONSTANT.sub("'?'", plan)
        return plan[:_PLAN_CHARS]

    # --- reading and settings ----------------------------------------------------------

    async def recent(
        self, tenant_id: str, limit: int, *, fingerprint: str | None = None, values: bool = True
    ) -> list[dict[str, Any]]:
        """The newest entries; ``values`` False: kept parameters are left out and the plans'
        string constants masked (a reader who may not read the tenant's data)."""
        rows = await self._pool.fetch(
            f"SELECT id, fingerprint, statement, statement_class, command, parameters,"
            f" parameter_count, duration_ms, row_count, recorded_at, plan, plan_error"
            f" FROM {self._table} WHERE tenant_id = $1 AND recorded_at >= $2"
            " AND ($3::text IS NULL OR fingerprint = $3) ORDER BY id DESC LIMIT $4",
            tenant_id,
            dt.datetime.now(dt.UTC) - self._max_age,
            fingerprint,
            limit,
        )
        entries = []
        for r in rows:
            entry = {k: encode_value(v) for k, v in r.items() if k != "parameters"}
            kept = r["parameters"] is not None and values
            entry["parameters"] = json.loads(r["parameters"]) if kept else "redacted"
            if not values and entry["plan"] is not None:
                entry["plan"] = _STRING_CONSTANT.sub("'?'", entry["plan"])
            entries.append(entry)
        return entries

    async def clear(self, tenant_id: str) -> int:
        status = await self._pool.execute(
            f"DELETE FROM {self._table} WHERE tenant_id = $1", tenant_id
        )
        return int(status.split()[-1])

    def settings(self, tenant_id: str) -> dict[str, Any]:
        current = self._settings.get(tenant_id, StatementSettings())
        return current.to_dict(self.default_ms, self.default_keep)

    async def own_settings(self, tenant_id: str) -> StatementSettings:
        """The tenant's overrides as stored now (another process may have changed them)."""
        await self.load()
        return self._settings.get(tenant_id, StatementSettings())

    async def set_settings(self, tenant_id: str, settings: StatementSettings) -> dict[str, Any]:
        await self._pool.execute(
            f"INSERT INTO {self._settings_table} (tenant_id, slow_query_ms, keep_parameters)"
            " VALUES ($1, $2, $3) ON CONFLICT (tenant_id) DO UPDATE SET"
            " slow_query_ms = EXCLUDED.slow_query_ms,"
            " keep_parameters = EXCLUDED.keep_parameters, updated_at = now()",
            tenant_id,
            settings.slow_query_ms,
            settings.keep_parameters,
        )
        await self.load()
        return self.settings(tenant_id)

    async def load(self) -> None:
        rows = await self._pool.fetch(
            f"SELECT tenant_id, slow_query_ms, keep_parameters FROM {self._settings_table}"
        )
        held = {
            r["tenant_id"]: StatementSettings(r["slow_query_ms"], r["keep_parameters"])
            for r in rows
        }
        self._settings = held
        self._thresholds = {
            tenant: s.slow_query_ms for tenant, s in held.items() if s.slow_query_ms is not None
        }

    async def reload_forever(self) -> None:
        """Read the settings again every ``refresh_s``: a change made through another process
        or instance takes effect within it (this process's own changes at once)."""
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.load()
            except Exception as exc:
                # PostgreSQL away (a lost or broken connection, a restart): keep what is held.
                if not (postgres_unreachable(exc) or isinstance(exc, asyncpg.PostgresError)):
                    raise
                log.debug("slow-query settings not reloaded: %s", exc)
