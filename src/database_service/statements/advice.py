"""Index advice for a tenant (the seed's AutoIndexAdvisor): from its slow statements to the
indexes that would serve them, checked with hypothetical indexes where PostgreSQL has hypopg.

How a suggestion is made:
1. The tenant's slow-query log, grouped by fingerprint (calls, total time, the newest text).
2. Each text's predicates (``statements.predicates``): equality columns, then one range or sort
   column, per table.
3. Only the tenant's own tables (its schema): an index on a shared table would be every
   tenant's cost, the platform's decision. Columns must exist; a suggestion already served by
   the leading columns of a valid index is dropped. The table's scan statistics
   (``pg_stat_user_tables``) come with it.
4. Where ``hypopg`` is installed, each suggestion is tried: the statement's generic plan cost
   (``plan_cache_mode = force_generic_plan``, parameters NULL) without and with a hypothetical
   index, and whether the plan uses it. A suggestion the planner would not use is reported as
   rejected, not advised.

Everything runs as the tenant's own login, off the OLTP pool, in a READ ONLY transaction: the
plans with costs are of the tenant's own tables only (the guard refuses costs to tenants
because estimates of shared tables are every tenant's statistics), and a tenant's function in a
statement is planned with the tenant's rights, never the service's.

Nothing is ever created by advice. ``create_index`` (an explicit administrator call) builds one
with ``CREATE INDEX CONCURRENTLY`` as the tenant's login, in the background; its progress is
read from ``pg_stat_progress_create_index`` by whichever process is asked (the catalog, not
this process's memory, says how it stands).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from database_service.errors import InvalidParameters, NotFound
from database_service.postgres import TenantPools
from database_service.postgres.deadlines import Deadlines
from database_service.postgres.pools import Connection
from database_service.statements.predicates import candidates
from database_service.tenancy import TenantRecord, quote_ident
from database_service.tenancy.secrets import TenantLogins

__all__ = ["IndexAdvisor", "Suggestion", "covered", "index_name"]

log = logging.getLogger(__name__)

_FINGERPRINTS = 50  # the slowest fingerprints looked at
_TRIALS = 3  # statements tried per suggestion with hypopg
_MAX_SUGGESTIONS = 20
_ADVICE_TIMEOUT_S = 30.0
_BUILD_TIMEOUT_S = 3600.0
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


@dataclass(slots=True)
class Suggestion:
    table: str
    columns: tuple[str, ...]
    reason: str
    fingerprints: list[str] = field(default_factory=list)
    slow_calls: int = 0
    slow_total_ms: float = 0.0
    statements: list[str] = field(default_factory=list)

    def ddl(self, schema: str) -> str:
        cols = ", ".join(quote_ident(c) for c in self.columns)
        name = index_name(self.table, self.columns)
        return (
            f"CREATE INDEX CONCURRENTLY {quote_ident(name)} ON"
            f" {quote_ident(schema)}.{quote_ident(self.table)} ({cols})"
        )


def index_name(table: str, columns: Sequence[str]) -> str:
    """``<table>_<cols>_dbsvc_idx``, cut to PostgreSQL's 63 bytes with a digest when long (the
    same table and columns always give the same name, so a second request finds the first)."""
    name = f"{table}_{'_'.join(columns)}_dbsvc_idx"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name.encode()[:44].decode(errors='ignore')}_{digest}_dbsvc_idx"


def covered(columns: Sequence[str], existing: Sequence[Sequence[str]]) -> str | None:
    """The existing index (its column list) whose leading columns already serve ``columns``:
    the same leading columns, with the equality part in any order."""
    n = len(columns)
    for index in existing:
        lead = list(index[:n])
        if lead == list(columns):
            return ",".join(index)
        # equality columns (all but the last) in another order serve the same lookups
        if n > 1 and set(lead[: n - 1]) == set(columns[: n - 1]) and lead[n - 1 :] == [columns[-1]]:
            return ",".join(index)
    return None


class IndexAdvisor:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        group_role: str,
        pools: TenantPools,
        logins: TenantLogins,
        deadlines: Deadlines,
    ) -> None:
        self._pool = pool  # the service's own (owner) pool: the slow log, the catalog
        self._slow = f"{quote_ident(control_schema)}.slow_queries"
        self._hypopg_schema = f"{control_schema}_hypopg"
        self._group = group_role
        self._pools = pools
        self._logins = logins
        self._deadlines = deadlines
        self._builds: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failed: dict[tuple[str, str], str] = {}
        self._hypopg_checked = False
        self.builds_started = 0

    # --- advice --------------------------------------------------------------------------

    async def advise(self, tenant: TenantRecord) -> dict[str, Any]:
        slow = await self._pool.fetch(
            "SELECT fingerprint, count(*)::int AS calls, sum(duration_ms) AS total_ms,"
            " (array_agg(statement ORDER BY id DESC))[1] AS statement"
            f" FROM {self._slow} WHERE tenant_id = $1 AND statement_class <> 'ddl'"
            " GROUP BY fingerprint ORDER BY sum(duration_ms) DESC LIMIT $2",
            tenant.tenant_id,
            _FINGERPRINTS,
        )
        merged: dict[tuple[str, tuple[str, ...]], Suggestion] = {}
        skipped: list[dict[str, Any]] = []
        for row in slow:
            for c in candidates(row["statement"]):
                if c.schema is not None and c.schema != tenant.schema_name:
                    skipped.append(
                        {
                            "table": f"{c.schema}.{c.table}",
                            "reason": "not one of the tenant's own tables",
                        }
                    )
                    continue
                s = merged.setdefault(
                    (c.table, c.columns), Suggestion(c.table, c.columns, c.reason)
                )
                s.fingerprints.append(row["fingerprint"])
                s.slow_calls += row["calls"]
                s.slow_total_ms += row["total_ms"]
                if len(s.statements) < _TRIALS:
                    s.statements.append(row["statement"])
        await self._ensure_hypopg()
        tables = await self._tables(tenant, {t for t, _ in merged})
        login = self._logins.login(tenant)
        async with (
            asyncio.timeout(_ADVICE_TIMEOUT_S),
            self._pools.acquire(login, "analytics") as conn,
            conn.transaction(readonly=True),
        ):
            hypopg = await self._hypopg(conn)
            advised: list[dict[str, Any]] = []
            rejected: list[dict[str, Any]] = []
            ordered = sorted(merged.values(), key=lambda s: -s.slow_total_ms)
            for s in ordered[:_MAX_SUGGESTIONS]:
                table = tables.get(s.table)
                if table is None:
                    skipped.append(
                        {"table": s.table, "reason": "not one of the tenant's own tables"}
                    )
                    continue
                missing = [c for c in s.columns if c not in table["columns"]]
                if missing:
                    skipped.append({"table": s.table, "reason": f"no column {', '.join(missing)}"})
                    continue
                served_by = covered(s.columns, table["indexes"])
                entry = {
                    "table": f"{tenant.schema_name}.{s.table}",
                    "columns": list(s.columns),
                    "reason": s.reason,
                    "index_name": index_name(s.table, s.columns),
                    "ddl": s.ddl(tenant.schema_name),
                    "fingerprints": s.fingerprints,
                    "slow_calls": s.slow_calls,
                    "slow_total_ms": round(s.slow_total_ms, 3),
                    "table_stats": table["stats"],
                }
                if served_by is not None:
                    skipped.append(
                        {
                            "table": entry["table"],
                            "columns": entry["columns"],
                            "reason": f"already served by an index on ({served_by})",
                        }
                    )
                    continue
                if hypopg["installed"]:
                    check = await self._try(conn, hypopg["schema"], tenant, s)
                    entry["hypothetical"] = check
                    if not check["used"]:
                        rejected.append(entry)
                        continue
                    entry["expected_gain"] = check["gain"]
                    entry["expected_saving_ms"] = round(s.slow_total_ms * check["gain"], 3)
                else:
                    entry["hypothetical"] = {"checked": False, "reason": hypopg["reason"]}
                advised.append(entry)
        advised.sort(key=lambda e: -float(e.get("expected_saving_ms", e["slow_total_ms"])))
        return {
            "tenant_id": tenant.tenant_id,
            "slow_fingerprints": len(slow),
            "hypopg": {k: v for k, v in hypopg.items() if k != "schema"},
            "suggestions": advised,
            "rejected": rejected,
            "skipped": skipped,
        }

    async def _tables(self, tenant: TenantRecord, names: set[str]) -> dict[str, dict[str, Any]]:
        """The tenant's tables among ``names``: columns, valid indexes' column lists, scan
        statistics. Read by the service's own login: the tenants' roles may not read the
        statistics views (they are every tenant's), and only the tenant's schema is asked."""
        rows = await self._pool.fetch(
            "SELECT c.oid, c.relname, s.seq_scan, s.seq_tup_read, s.idx_scan, s.n_live_tup,"
            " array(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid"
            "  AND a.attnum > 0 AND NOT a.attisdropped) AS columns,"
            " array(SELECT array_to_string(array(SELECT a.attname::text"
            "   FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)"
            "   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            "   ORDER BY k.ord), ',')"
            "  FROM pg_index i WHERE i.indrelid = c.oid AND i.indisvalid) AS indexes"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid"
            " WHERE n.nspname = $1 AND c.relname = ANY($2::text[]) AND c.relkind IN ('r', 'p')",
            tenant.schema_name,
            sorted(names),
        )
        return {
            r["relname"]: {
                "columns": set(r["columns"]),
                "indexes": [i.split(",") for i in r["indexes"] if i],
                "stats": {
                    "live_rows": r["n_live_tup"],
                    "seq_scans": r["seq_scan"],
                    "seq_rows_read": r["seq_tup_read"],
                    "index_scans": r["idx_scan"],
                },
            }
            for r in rows
        }

    async def _ensure_hypopg(self) -> None:
        """Create hypopg in a schema of its own, usable by the tenants' roles, where the server
        has it and the service may (once per process; a DBA can do the same by hand)."""
        if self._hypopg_checked:
            return
        self._hypopg_checked = True
        schema = quote_ident(self._hypopg_schema)
        try:
            async with self._pool.acquire() as conn:
                available = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg')"
                )
                created = await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hypopg')"
                )
                if available and not created:
                    async with conn.transaction():
                        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                        await conn.execute(f"CREATE EXTENSION IF NOT EXISTS hypopg SCHEMA {schema}")
                        await conn.execute(
                            f"GRANT USAGE ON SCHEMA {schema} TO {quote_ident(self._group)}"
                        )
        except asyncpg.PostgresError as exc:  # not allowed: advice goes on without it
            log.info("hypopg not created: %s", exc)

    async def _hypopg(self, conn: Connection) -> dict[str, Any]:
        row = await conn.fetchrow(
            "SELECT n.nspname, e.extversion, has_schema_privilege(n.oid, 'USAGE') AS usable"
            " FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'hypopg'"
        )
        if row is not None and row["usable"]:
            return {"installed": True, "version": row["extversion"], "schema": row["nspname"]}
        available = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg')"
        )
        reason = (
            "hypopg is not installed on this PostgreSQL (suggestions are not confirmed)"
            if not available
            else "hypopg is installed on the server but not created for the tenants"
            " (CREATE EXTENSION hypopg, with USAGE on its schema for the tenants' group role)"
        )
        return {"installed": False, "reason": reason}

    async def _try(
        self, conn: Connection, schema: str, tenant: TenantRecord, s: Suggestion
    ) -> dict[str, Any]:
        """The suggestion's statements planned without and with it, as a hypothetical index."""
        hyp = quote_ident(schema)
        cols = ", ".join(quote_ident(c) for c in s.columns)
        ddl = f"CREATE INDEX ON {quote_ident(tenant.schema_name)}.{quote_ident(s.table)} ({cols})"
        trials = []
        for n, sql in enumerate(s.statements):
            with contextlib.suppress(asyncpg.PostgresError):
                async with conn.transaction():  # a savepoint: a statement that fails to plan
                    before = await _generic_plan(conn, sql, f"_dbsvc_advice_{n}")
                    made = await conn.fetchrow(
                        f"SELECT indexrelid, indexname FROM {hyp}.hypopg_create_index($1)", ddl
                    )
                    assert made is not None  # the function returns its index, or raises
                    try:
                        after = await _generic_plan(conn, sql, f"_dbsvc_advice_{n}")
                    finally:
                        await conn.execute(f"SELECT {hyp}.hypopg_drop_index($1)", made[0])
                    trials.append(
                        {
                            "cost_before": before["Total Cost"],
                            "cost_after": after["Total Cost"],
                            "used": made["indexname"] in json.dumps(after),
                        }
                    )
        if not trials:
            return {"checked": False, "used": False, "reason": "no statement could be planned"}
        before = sum(t["cost_before"] for t in trials)
        after = sum(t["cost_after"] if t["used"] else t["cost_before"] for t in trials)
        used = any(t["used"] for t in trials) and after < before
        return {
            "checked": True,
            "used": used,
            "cost_before": round(before, 2),
            "cost_after": round(after, 2),
            "gain": round(1 - after / before, 4) if before > 0 else 0.0,
            "statements_tried": len(trials),
        }

    # --- building one ---------------------------------------------------------------------

    async def create_index(
        self, tenant: TenantRecord, table: str, columns: Sequence[str]
    ) -> dict[str, Any]:
        """Start ``CREATE INDEX CONCURRENTLY`` on the tenant's ``table`` (``columns`` in order)
        as the tenant's login; returns at once with the index's name (``index_status`` follows
        it)."""
        if not isinstance(table, str) or not _IDENTIFIER.match(table):
            raise InvalidParameters("table must be a plain identifier of the tenant's schema")
        if not columns or len(columns) > 8 or len(set(columns)) != len(columns):
            raise InvalidParameters("columns must be 1 to 8 distinct column names")
        if not all(isinstance(c, str) and _IDENTIFIER.match(c) for c in columns):
            raise InvalidParameters("columns must be plain identifiers")
        tables = await self._tables(tenant, {table})
        found = tables.get(table)
        if found is None:
            raise NotFound(f"the tenant has no table {table!r}")
        missing = [c for c in columns if c not in found["columns"]]
        if missing:
            raise InvalidParameters(f"table {table!r} has no column {', '.join(missing)}")
        name = index_name(table, columns)
        key = (tenant.tenant_id, name)
        running = self._builds.get(key)
        if running is None or running.done():
            self._failed.pop(key, None)
            ddl = (
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {quote_ident(name)} ON"
                f" {quote_ident(tenant.schema_name)}.{quote_ident(table)}"
                f" ({', '.join(quote_ident(c) for c in columns)})"
            )
            task = asyncio.create_task(self._build(tenant, key, ddl), name=f"index-{name}")
            self._builds[key] = task
            self.builds_started += 1
        return {"tenant_id": tenant.tenant_id, "index": name, "state": "building", "ddl": ddl}

    async def _build(self, tenant: TenantRecord, key: tuple[str, str], ddl: str) -> None:
        login = self._logins.login(tenant)
        try:
            # The bulk pool: a long build must not hold one of the tenant's OLTP connections.
            async with self._pools.acquire(login, "bulk") as conn:
                watch = self._deadlines.watch(
                    conn,
                    login.role,
                    statement_seconds=_BUILD_TIMEOUT_S,
                    total_seconds=_BUILD_TIMEOUT_S,
                )
                try:
                    # CONCURRENTLY runs outside a transaction block; the tenant's own statement
                    # limit is meant for its requests, not an administrator's build.
                    await conn.execute(f"SET statement_timeout = {int(_BUILD_TIMEOUT_S * 1000)}")
                    async with watch.statement():
                        await conn.execute(ddl)
                finally:
                    watch.close()
        except Exception as exc:
            self._failed[key] = f"{type(exc).__name__}: {exc}"[:500]
            log.warning("tenant %s: index %s not built: %s", key[0], key[1], exc)

    async def index_status(self, tenant: TenantRecord, name: str) -> dict[str, Any]:
        if not _IDENTIFIER.match(name):
            raise InvalidParameters("index must be a plain identifier")
        row = await self._pool.fetchrow(
            "SELECT c.oid, i.indisvalid, i.indisready, t.relname AS table_name,"
            " p.phase, p.blocks_done, p.blocks_total, p.tuples_done, p.tuples_total"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t ON t.oid = i.indrelid"
            " LEFT JOIN pg_stat_progress_create_index p ON p.index_relid = c.oid"
            " WHERE n.nspname = $1 AND c.relname = $2",
            tenant.schema_name,
            name,
        )
        key = (tenant.tenant_id, name)
        task = self._builds.get(key)
        building_here = task is not None and not task.done()
        out: dict[str, Any] = {"tenant_id": tenant.tenant_id, "index": name}
        if row is None:
            out["state"] = "building" if building_here else "absent"
        elif row["phase"] is not None or building_here:
            out["state"] = "building"
        else:
            out["state"] = "ready" if row["indisvalid"] else "invalid"
        if row is not None:
            out["table"] = row["table_name"]
            if row["phase"] is not None:
                out["progress"] = {
                    "phase": row["phase"],
                    "blocks_done": row["blocks_done"],
                    "blocks_total": row["blocks_total"],
                    "tuples_done": row["tuples_done"],
                    "tuples_total": row["tuples_total"],
                }
        if key in self._failed:
            out["error"] = self._failed[key]
            if out["state"] == "absent":
                out["state"] = "failed"
        if out["state"] == "absent":
            raise NotFound(f"no index {name!r} in the tenant's schema")
        return out

    async def aclose(self) -> None:
        for task in self._builds.values():
            task.cancel()
        for task in self._builds.values():
            with contextlib.suppress(BaseException):
                await task


async def _generic_plan(conn: Connection, sql: str, name: str) -> dict[str, Any]:
    """The plan PostgreSQL would cache for ``sql`` whatever its parameters: prepared afresh
    each time, since a hypothetical index invalidates no cached plan."""
    described = await conn.prepare(sql)
    await conn.execute(f"SET LOCAL plan_cache_mode = force_generic_plan; PREPARE {name} AS {sql}")
    try:
        nulls = ", ".join(["NULL"] * len(described.get_parameters()))
        document = await conn.fetchval(
            f"EXPLAIN (FORMAT JSON) EXECUTE {name}" + (f"({nulls})" if nulls else "")
        )
    finally:
        await conn.execute(f"DEALLOCATE {name}")
    return _plan(document)


def _plan(document: str | list[Any]) -> dict[str, Any]:
    parsed = json.loads(document) if isinstance(document, str) else document
    plan: dict[str, Any] = parsed[0]["Plan"]
    return plan
