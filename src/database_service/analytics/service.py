"""Tenant SQL on ClickHouse: the use case behind ``ExecuteAnalyticsQuery`` (gRPC), ``POST
/api/v1/analytics/query`` (REST) and the client's analytics call when ClickHouse is enabled.

The caller needs ``read`` for its tenant, the tenant must be active; the SQL passes the guard
(``analytics.guard``: SELECT only, the tenant's tables only, no table functions, no settings of
its own) and runs with the service's per-query limits (time, memory, rows read, result bytes and
rows). Every call is audited as ``analytics`` with the store ``clickhouse``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from database_service.analytics.guard import AnalyticsGuard, FunctionCatalog
from database_service.analytics.replicator import purge_tenant
from database_service.analytics.reports import REPORTS, ReportParams, report_sql
from database_service.analytics.schema import (
    REPLICATED,
    RETAINED,
    SHARED_DATABASE,
    projection_upgrade_ddl,
    retention_ttl,
    shared_ddl,
    tenant_database,
    tenant_view_ddl,
)
from database_service.analytics.tables import (
    MERGE_TREE_ENGINES,
    TableGuard,
    is_table_ddl,
    row_json,
)
from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.errors import (
    Conflict,
    DatabaseServiceError,
    FailedPrecondition,
    InvalidParameters,
    InvalidRequest,
    ResourceExhausted,
    ResultTooLarge,
    SqlRejected,
    Unavailable,
)
from database_service.observability.audit import AuditEvent, AuditLog
from database_service.query import TenantContext
from database_service.results import (
    Column,
    Event,
    Header,
    QueryResult,
    StatementKind,
    Summary,
    ValueKind,
)
from database_service.stores.clickhouse import ClickHouseError, ClickHouseStore
from database_service.stores.clickhouse.server import (
    password_sha256_hex,
    service_policy_ddl,
    tenant_access_ddl,
    tenant_password,
    tenant_user,
)
from database_service.tenancy import TenantRegistry

__all__ = ["ENGINES", "Analytics", "AnalyticsLimits", "AnalyticsQueryError", "choose_engine"]

EMPTY_DATABASE = "dbsvc_empty"  # the session's default: one-part names outside a CTE find nothing
_UNKNOWN_DATABASE = 81
_OWN_NAMES_TTL_S = 5.0
_LIMIT_CODES = {
    159: ("time limit", ResourceExhausted),  # TIMEOUT_EXCEEDED
    241: ("memory limit", ResourceExhausted),  # MEMORY_LIMIT_EXCEEDED
    158: ("rows-read limit", ResourceExhausted),  # TOO_MANY_ROWS
    307: ("bytes-read limit", ResourceExhausted),  # TOO_MANY_BYTES
    396: ("result limit", ResultTooLarge),  # TOO_MANY_ROWS_OR_BYTES
}


class AnalyticsQueryError(InvalidRequest):
    """ClickHouse refused the (allowed) query: an unknown column, a type mismatch, …"""

    code = "analytics_query_error"


@dataclass(frozen=True, slots=True)
class AnalyticsLimits:
    max_execution_seconds: float = 10.0
    max_memory_bytes: int = 1 << 30
    max_rows_to_read: int = 200_000_000
    max_result_bytes: int = 64 << 20
    max_result_rows: int = 100_000
    tenant_max_tables: int = 50  # a tenant's own (writable) tables
    tenant_max_bytes: int = 1 << 30  # on disk, over its own tables

    def limit_settings(self) -> dict[str, Any]:
        """The limits: appended to every statement on chDB; on a server, pinned (``CONST``) in
        the tenant user's settings profile instead, where the tenant cannot change them."""
        return {
            "max_execution_time": self.max_execution_seconds,
            "max_memory_usage": self.max_memory_bytes,
            "max_rows_to_read": self.max_rows_to_read,
            "max_result_bytes": self.max_result_bytes,
            "max_result_rows": self.max_result_rows,
            "result_overflow_mode": "throw",
            "read_overflow_mode": "throw",
        }

    def query_settings(self) -> dict[str, Any]:
        """How the service runs a statement (not limits)."""
        return {"session_timezone": "UTC"}

    def settings(self) -> dict[str, Any]:
        return {**self.limit_settings(), **self.query_settings()}


def _unwrap(type_name: str) -> str:
    for wrapper in ("Nullable(", "LowCardinality("):
        while type_name.startswith(wrapper):
            type_name = type_name[len(wrapper) : -1]
    return type_name


def _kind(type_name: str) -> ValueKind:
    t = _unwrap(type_name)
    if t.startswith(("Int", "UInt")):
        return ValueKind.INTEGER
    if t.startswith(("Float", "BFloat")):
        return ValueKind.FLOAT
    if t.startswith("Decimal"):
        return ValueKind.DECIMAL
    if t.startswith(("String", "FixedString", "Enum", "UUID", "IPv")):
        return ValueKind.TEXT
    if t == "Bool":
        return ValueKind.BOOLEAN
    if t.startswith("DateTime"):
        return ValueKind.TIMESTAMP
    if t.startswith(("Array", "Tuple", "Map", "JSON")):
        return ValueKind.JSON
    return ValueKind.OTHER


def _converter(type_name: str) -> Any:
    t = _unwrap(type_name)
    if t.startswith("DateTime"):
        # session_timezone = UTC: every DateTime is printed in UTC.
        return lambda v: dt.datetime.fromisoformat(v).replace(tzinfo=dt.UTC)
    if t.startswith("Date"):
        return dt.date.fromisoformat
    if t.startswith("Decimal"):
        return lambda v: v if isinstance(v, Decimal) else Decimal(str(v))
    if t.startswith(("Float", "BFloat")):
        return float
    return None


class Analytics:
    def __init__(
        self,
        store: ClickHouseStore,
        *,
        access: Access,
        registry: TenantRegistry,
        audit: AuditLog,
        limits: AnalyticsLimits | None = None,
        tenant_key: bytes | None = None,
        retention_days: float | None = None,
    ) -> None:
        self.store = store
        self._retention_days = retention_days
        # On a ClickHouse server: the key tenants' ClickHouse passwords derive from (from the
        # master key); tenant SQL then runs as the tenant's own user (``runner``).
        self._tenant_key = tenant_key
        self._runners: dict[str, ClickHouseStore] = {}
        self._access = access
        self._registry = registry
        self._audit = audit
        self.limits = limits or AnalyticsLimits()
        self._guard: AnalyticsGuard | None = None
        self._provisioned: set[str] = set()
        # The tenant's own table names, as this process last read them (monotonic time): a
        # SELECT does not pay a catalog query; a name it does not know is looked up again.
        self._own_names: dict[str, tuple[float, frozenset[str]]] = {}
        self._provision_lock = asyncio.Lock()
        self.queries = 0
        self.refused = 0
        self.inserts = 0
        self.inserts_refused = 0

    async def start(self) -> None:
        """The shared tables, the empty default database, and the guard's function list."""
        for statement in shared_ddl():
            await self.store.command(statement)
        for table in (name for name, r in REPLICATED.items() if r.projections):
            # Tables created by a version without the projections get them (CREATE TABLE IF
            # NOT EXISTS left them as they were).
            existing = await self.store.query(
                "SELECT create_table_query FROM system.tables"
                f" WHERE database = '{SHARED_DATABASE}' AND name = '{table}'"
            )
            for statement in projection_upgrade_ddl(table, str(existing.rows[0][0])):
                await self.store.command(statement)
        await self.store.command(f"CREATE DATABASE IF NOT EXISTS {EMPTY_DATABASE}")
        if self.store.kind == "server":
            # Tenants' row policies on the shared tables would hide their rows from a user no
            # policy names: the service's own user (which replicates and defines the views).
            service_user = str(getattr(self.store, "username", "default"))
            for statement in service_policy_ddl(
                service_user, shared_database=SHARED_DATABASE, shared_tables=list(REPLICATED)
            ):
                await self.store.command(statement)
        if self.store.kind == "chdb":
            # One-part table names the guard leaves alone (a CTE's, out of its scope) resolve in
            # the session's default database: an empty one. The guard refuses USE, so it stays.
            await self.store.command(f"USE {EMPTY_DATABASE}")
        self._guard = AnalyticsGuard(self.store, await FunctionCatalog.load(self.store))
        if self._retention_days is not None:
            await self.apply_retention(self._retention_days)

    async def apply_retention(self, days: float) -> list[str]:
        """Give ticks and predictions PostgreSQL's retention as a TTL (rows past it are removed
        by ClickHouse's merges); the statements run, none when the TTL is already in place (a
        changed TTL is applied to existing parts by a background mutation, once)."""
        ran = []
        for table in RETAINED:
            ttl = retention_ttl(table, days)
            current = await self.store.query(
                f"SELECT engine_full FROM system.tables WHERE database = '{SHARED_DATABASE}'"
                f" AND name = '{table}'"
            )
            engine = str(current.rows[0][0]) if current.rows else ""
            has_ttl = " TTL " in engine
            if ttl is None and has_ttl:
                statement = f"ALTER TABLE {SHARED_DATABASE}.{table} REMOVE TTL"
            elif ttl is not None and f"TTL {ttl}" not in engine:
                statement = f"ALTER TABLE {SHARED_DATABASE}.{table} MODIFY TTL {ttl}"
            else:
                continue
            await self.store.command(statement)
            ran.append(statement)
        return ran

    @property
    def guard(self) -> AnalyticsGuard:
        if self._guard is None:
            raise Unavailable("analytics is starting")
        return self._guard

    async def provision(self, tenant_id: str) -> None:
        """The tenant's database of views (idempotent; once per process unless dropped)."""
        if tenant_id in self._provisioned:
            return
        async with self._provision_lock:
            server = self.store.kind == "server"
            statements = tenant_view_ddl(tenant_id, definer=server)
            if server:
                statements = statements[:1] + self.access_ddl(tenant_id) + statements[1:]
            for statement in statements:
                await self.store.command(statement)
            self._provisioned.add(tenant_id)

    def access_ddl(self, tenant_id: str) -> list[str]:
        """On a server: the tenant's own user, its grants, limits and row policies."""
        return tenant_access_ddl(
            tenant_id,
            database=tenant_database(tenant_id),
            shared_database=SHARED_DATABASE,
            shared_tables=list(REPLICATED),
            password_sha256_hex=password_sha256_hex(self._password(tenant_id)),
            limits=self.limits.limit_settings(),
            engines=sorted(MERGE_TREE_ENGINES),
        )

    def _password(self, tenant_id: str) -> str:
        if self._tenant_key is None:
            raise Unavailable("ClickHouse server: no key for tenants' passwords")
        return tenant_password(self._tenant_key, tenant_id)

    def runner(self, tenant_id: str) -> ClickHouseStore:
        """The connection tenant SQL runs on: on a server, the tenant's own user (the server
        enforces its grants, row policies and pinned limits; the guard is a first layer); on
        chDB, which has no users, the one store (the guard is the wall)."""
        if self.store.kind != "server":
            return self.store
        runner = self._runners.get(tenant_id)
        if runner is None:
            as_user = getattr(self.store, "as_user", None)
            if as_user is None:
                raise Unavailable("this ClickHouse store cannot log in as a tenant")
            runner = as_user(tenant_user(tenant_id), self._password(tenant_id))
            self._runners[tenant_id] = runner
        return runner

    def run_settings(self, **extra: Any) -> dict[str, Any]:
        """What a tenant statement is sent with: on a server its user's profile holds the
        limits (pinned: sending them again would be refused), on chDB they go with it."""
        base = (
            self.limits.query_settings() if self.store.kind == "server" else self.limits.settings()
        )
        return {**base, **extra}

    def forget(self, tenant_id: str) -> None:
        self._provisioned.discard(tenant_id)
        self._own_names.pop(tenant_id, None)
        self._runners.pop(tenant_id, None)

    async def _table_names(self, tenant_id: str, *, fresh: bool = False) -> frozenset[str]:
        """The tables tenant SQL may name: the replicated ones and the tenant's own."""
        cached = self._own_names.get(tenant_id)
        if cached is None or fresh or time.monotonic() - cached[0] > _OWN_NAMES_TTL_S:
            own = frozenset(await self.own_tables(tenant_id))
            cached = (time.monotonic(), own)
            self._own_names[tenant_id] = cached
        return frozenset(REPLICATED) | cached[1]

    async def own_tables(self, tenant_id: str) -> dict[str, int]:
        """The tenant's own (writable) tables and their bytes on disk."""
        database = tenant_database(tenant_id)  # validated: written into the SQL below
        result = await self.store.query(
            "SELECT t.name, sum(p.bytes_on_disk) FROM system.tables AS t"
            " LEFT JOIN (SELECT table, bytes_on_disk FROM system.parts"
            f" WHERE database = '{database}' AND active) AS p ON p.table = t.name"
            f" WHERE t.database = '{database}' AND t.engine LIKE '%MergeTree' GROUP BY t.name",
            {"join_use_nulls": 1},
        )
        return {str(r[0]): int(r[1] or 0) for r in result.rows}

    async def query(
        self, principal: Principal, ctx: TenantContext, sql: str, params: Sequence[Any] = ()
    ) -> QueryResult:
        """Run one read for the caller's tenant, or a ``CREATE TABLE``/``DROP TABLE`` of its own
        tables (``analytics.tables``); the whole result."""
        if is_table_ddl(sql):
            return await self._table_ddl(principal, ctx, sql, params)
        tenant_id = ctx.tenant_id
        action = "analytics"
        await self._access.require(principal, Scope.READ, action, tenant_id)
        started = time.perf_counter()
        try:
            if params:
                raise InvalidParameters(
                    "ClickHouse analytics SQL takes no parameters: write literals (or set"
                    " engine 'postgresql' for the PostgreSQL path with $1 parameters)"
                )
            await self._registry.get_active(tenant_id)
            database = tenant_database(tenant_id)
            await self.provision(tenant_id)
            tables = await self._table_names(tenant_id)
            try:
                checked = await self.guard.check(sql, database=database, tables=tables)
            except SqlRejected as exc:
                # A table created a moment ago, by another process: look once more.
                if "unknown table" not in str(exc):
                    raise
                fresh = await self._table_names(tenant_id, fresh=True)
                if fresh == tables:
                    raise
                checked = await self.guard.check(sql, database=database, tables=fresh)
        except DatabaseServiceError as exc:
            self.refused += 1
            await self._access.deny(principal, tenant_id, action, exc)
        try:
            await self.provision(tenant_id)
            try:
                result = await self.runner(tenant_id).query(checked.sql, self.run_settings())
            except ClickHouseError as exc:
                if exc.code != _UNKNOWN_DATABASE:
                    raise
                self.forget(tenant_id)  # dropped by a purge, or by another process
                await self.provision(tenant_id)
                result = await self.runner(tenant_id).query(checked.sql, self.run_settings())
        except ClickHouseError as exc:
            error = _mapped(exc)
            await self._record(principal, tenant_id, "error", error.error_code)
            raise error from None
        except DatabaseServiceError as exc:
            await self._record(principal, tenant_id, "error", exc.error_code)
            raise
        self.queries += 1
        await self._record(principal, tenant_id, "ok", None, f"tables={','.join(checked.tables)}")
        return self._result(result, started)

    async def _table_ddl(
        self, principal: Principal, ctx: TenantContext, sql: str, params: Sequence[Any]
    ) -> QueryResult:
        """``CREATE TABLE``/``DROP TABLE`` in the tenant's own database (``admin``, as DDL is on
        PostgreSQL)."""
        tenant_id = ctx.tenant_id
        action = "analytics.ddl"
        await self._access.require(principal, Scope.ADMIN, action, tenant_id)
        started = time.perf_counter()
        tables = TableGuard(self.guard)
        try:
            if params:
                raise InvalidParameters("CREATE TABLE and DROP TABLE take no parameters")
            await self._registry.get_active(tenant_id)
            database = tenant_database(tenant_id)
            await self.provision(tenant_id)
            async with self._provision_lock:  # one table statement of this process at a time
                own = await self.own_tables(tenant_id)
                if sql.lstrip()[:4].upper() == "DROP":
                    drop = await tables.check_drop(sql, database=database, own=own)
                    command, table = "DROP TABLE", drop.table
                    statement = f"DROP TABLE IF EXISTS {database}.`{drop.table}` SYNC"
                else:
                    create = await tables.check_create(
                        sql, database=database, reserved=REPLICATED.keys()
                    )
                    command, table = "CREATE TABLE", create.table
                    if create.table in own:
                        if not create.if_not_exists:
                            raise Conflict(f"table {create.table} exists")
                    elif len(own) >= self.limits.tenant_max_tables:
                        raise ResourceExhausted(
                            f"this tenant has {len(own)} ClickHouse tables, the limit"
                            " (DBSVC_CLICKHOUSE_TENANT_MAX_TABLES)"
                        )
                    statement = create.sql
        except DatabaseServiceError as exc:
            self.refused += 1
            await self._access.deny(principal, tenant_id, action, exc)
        try:
            await self.runner(tenant_id).command(statement)
        except ClickHouseError as exc:
            error = _mapped(exc)
            await self._record(principal, tenant_id, "error", error.error_code, cls="ddl")
            raise error from None
        finally:
            self._own_names.pop(tenant_id, None)
        await self._record(principal, tenant_id, "ok", None, f"{command} {table}", cls="ddl")
        return QueryResult(
            columns=[],
            rows=[],
            command=command,
            row_count=0,
            kind=StatementKind.DDL,
            duration_ms=(time.perf_counter() - started) * 1000,
            store="clickhouse",
        )

    async def insert(
        self,
        tenant_id: str,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any],
        *,
        dedup_token: str,
        caller: str = "analytics.insert",
    ) -> int:
        """Insert one row into one of the tenant's own ClickHouse tables; the rows inserted (1).

        ``sql``: ``INSERT INTO table (col, …) VALUES (…)`` with a placeholder per value — ``$1``,
        ``$2`` … with a list of ``params``, or ``:name`` / ``%(name)s`` with a mapping (keys the
        statement does not name are ignored, so a whole record can be passed). The values are
        sent as data (one JSONEachRow line), never as SQL text. ``dedup_token`` is ClickHouse's
        ``insert_deduplication_token``: the same token again (a retry, a replayed outbox entry)
        stores nothing more, within the table's last ``DEDUP_WINDOW`` inserts.

        The caller has authorized the write (a ``write`` scope for the tenant, as checked when
        the request was accepted, e.g. by the multi-store outbox); the tenant must be active.
        Every call is audited (action ``analytics``, class ``write``) under ``caller``: the
        service the write was accepted from, when the caller knows it.
        """
        try:
            if not dedup_token or len(dedup_token) > 200:
                raise InvalidParameters("dedup_token: 1 to 200 characters")
            await self._registry.get_active(tenant_id)
            database = tenant_database(tenant_id)
            checked = await TableGuard(self.guard).check_insert(sql, database=database)
            row = checked.row(params)
            await self.provision(tenant_id)
            own = await self.own_tables(tenant_id)
            if checked.table not in own:
                if checked.table in REPLICATED:
                    raise SqlRejected(
                        f"{checked.table} is replicated from PostgreSQL and read-only here:"
                        " write it in PostgreSQL"
                    )
                raise SqlRejected(
                    f"{checked.table} is not one of this tenant's own ClickHouse tables"
                    f" ({', '.join(sorted(own)) or 'none: CREATE TABLE first'})"
                )
            used = sum(own.values())
            if used >= self.limits.tenant_max_bytes:
                raise ResourceExhausted(
                    f"this tenant's ClickHouse tables hold {used} bytes, the limit"
                    f" (DBSVC_CLICKHOUSE_TENANT_MAX_BYTES) is {self.limits.tenant_max_bytes}"
                )
            known = await self.store.query(
                f"SELECT name FROM system.columns WHERE database = '{database}'"
                f" AND table = {_string(checked.table)}"
            )
            columns = {str(r[0]) for r in known.rows}
            unknown = [c for c in checked.columns if c not in columns]
            if unknown:
                raise SqlRejected(f"unknown column(s) of {checked.table}: {', '.join(unknown)}")
            line = row_json(row)
        except DatabaseServiceError as exc:
            self.inserts_refused += 1
            await self._audit_insert(caller, tenant_id, "denied", exc.error_code, sql)
            raise
        try:
            await self.runner(tenant_id).insert_json(
                f"{database}.`{checked.table}`", [line], dedup_token
            )
        except ClickHouseError as exc:
            error = _mapped(exc)
            await self._audit_insert(caller, tenant_id, "error", error.error_code, sql)
            raise error from None
        self.inserts += 1
        await self._audit_insert(caller, tenant_id, "ok", None, f"INSERT INTO {checked.table}")
        return 1

    async def _audit_insert(
        self, caller: str, tenant_id: str, outcome: str, code: str | None, what: str
    ) -> None:
        await self._audit.record(
            AuditEvent(
                service=caller,
                tenant_id=tenant_id,
                action="analytics",
                statement_class="write",
                outcome=outcome,
                code=code,
                detail=f"store=clickhouse {what[:200]}",
            )
        )

    def _result(self, result: Any, started: float) -> QueryResult:
        columns = [
            Column(n, t, _kind(t)) for n, t in zip(result.columns, result.types, strict=True)
        ]
        converters = [_converter(t) for t in result.types]
        rows = [
            tuple(
                c(v) if c is not None and v is not None else v
                for v, c in zip(row, converters, strict=True)
            )
            for row in result.rows
        ]
        return QueryResult(
            columns=columns,
            rows=rows,
            command="SELECT",
            row_count=len(rows),
            kind=StatementKind.READ,
            duration_ms=(time.perf_counter() - started) * 1000,
            store="clickhouse",
        )

    async def report(
        self, principal: Principal, ctx: TenantContext, name: str, params: ReportParams
    ) -> QueryResult:
        """One ready-made report (``analytics.reports``) for the caller's tenant."""
        tenant_id = ctx.tenant_id
        action = f"analytics.report.{name}" if name in REPORTS else "analytics.report"
        await self._access.require(principal, Scope.READ, action, tenant_id)
        started = time.perf_counter()
        try:
            await self._registry.get_active(tenant_id)
            sql = report_sql(name, tenant_id, params)
        except DatabaseServiceError as exc:
            await self._access.deny(principal, tenant_id, action, exc)
        try:
            await self.provision(tenant_id)
            # join_use_nulls: an outcome without a tick is NULL, not zero (reports.py).
            result = await self.runner(tenant_id).query(sql, self.run_settings(join_use_nulls=1))
        except ClickHouseError as exc:
            if exc.code == _UNKNOWN_DATABASE:
                self.forget(tenant_id)  # dropped by a purge: provisioned again next time
            error = _mapped(exc)
            await self._record(principal, tenant_id, "error", error.error_code)
            raise error from None
        self.queries += 1
        await self._record(principal, tenant_id, "ok", None, f"report={name}")
        return self._result(result, started)

    async def stream(
        self,
        principal: Principal,
        ctx: TenantContext,
        sql: str,
        params: Sequence[Any] = (),
        *,
        batch_rows: int = 500,
    ) -> AsyncGenerator[Event, None]:
        """``query`` as the events the front ends' result encoders take."""
        result = await self.query(principal, ctx, sql, params)
        yield Header(result.columns, StatementKind.READ)
        rows = list(result.rows)
        for i in range(0, len(rows), batch_rows):
            yield rows[i : i + batch_rows]
        yield Summary(result.row_count, "SELECT", result.duration_ms, StatementKind.READ)

    async def purge(self, tenant_id: str) -> None:
        await purge_tenant(self.store, tenant_id)
        self.forget(tenant_id)

    async def _record(
        self,
        principal: Principal,
        tenant_id: str,
        outcome: str,
        code: str | None,
        detail: str | None = None,
        *,
        cls: str = "read",
    ) -> None:
        await self._audit.record(
            AuditEvent(
                service=principal.service,
                tenant_id=tenant_id,
                action="analytics",
                statement_class=cls,
                outcome=outcome,
                code=code,
                detail=f"store=clickhouse {detail}" if detail else "store=clickhouse",
            )
        )

    async def document(self) -> dict[str, Any]:
        """``database_details.clickhouse`` of the health document."""
        started = time.perf_counter()
        version = await self.store.version()
        rows = await self.store.query(
            "SELECT table, sum(rows), sum(bytes_on_disk) FROM system.parts"
            f" WHERE database = '{SHARED_DATABASE}' AND active GROUP BY table"
        )
        return {
            "engine": "chdb" if self.store.kind == "chdb" else "clickhouse-server",
            "version": version,
            "response_time_ms": round((time.perf_counter() - started) * 1000, 2),
            "tables": {
                str(r[0]): {"rows": int(r[1]), "bytes_on_disk": int(r[2])} for r in rows.rows
            },
            "queries": self.queries,
            "refused": self.refused,
            "tenant_inserts": self.inserts,
            "tenant_inserts_refused": self.inserts_refused,
        }


def _string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _mapped(exc: ClickHouseError) -> DatabaseServiceError:
    message = str(exc).split("DB::Exception: ", 1)[-1][:500]
    if exc.code in _LIMIT_CODES:
        what, cls = _LIMIT_CODES[exc.code]
        return cls(f"analytics query stopped at the service's {what}: {message}")
    if exc.code is None:
        return Unavailable(f"ClickHouse failed: {message}")
    return AnalyticsQueryError(message)


ENGINES = ("", "clickhouse", "postgresql")


def choose_engine(requested: str, analytics: Analytics | None) -> str:
    """Which store answers an analytics query: ``requested`` ("" chooses ClickHouse where it is
    enabled, else PostgreSQL, so callers written before ClickHouse keep working until a
    deployment turns it on, and can keep PostgreSQL by asking for it)."""
    if requested not in ENGINES:
        raise InvalidParameters(
            f"unknown analytics engine {requested[:40]!r}: use 'clickhouse' or 'postgresql'"
        )
    if requested == "clickhouse" and analytics is None:
        raise FailedPrecondition(
            "ClickHouse analytics is not enabled on this service (DBSVC_CLICKHOUSE_ENABLED)"
        )
    if requested:
        return requested
    return "clickhouse" if analytics is not None else "postgresql"
