"""Versioned migrations for the control plane and for every tenant schema.

Files are ``NNNN_name.sql`` in ``control/`` and ``tenant/`` beside this module. ``{{name}}``
placeholders are filled from validated settings and tenant names (never from request data).
``Migrator.migrate`` runs under a PostgreSQL advisory lock so that one instance migrates at a
time; control-plane migrations go first, then each tenant in its own transaction, so a failure in
one tenant leaves the others migrated and is reported.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import asyncpg

from database_service.postgres.pools import Connection
from database_service.tenancy.ids import TenantNames, quote_ident, quote_literal

__all__ = [
    "Migration",
    "MigrationProgress",
    "MigrationReport",
    "Migrator",
    "TenantMigrationResult",
    "load_migrations",
    "render",
]

log = logging.getLogger(__name__)

# pg_advisory_lock key for "one migrator at a time" (any constant; this is 'dbsvcmig' in hex).
MIGRATION_LOCK_KEY = 0x646273766D6967
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


# What PostgreSQL grants every role by default and a tenant must not have, taken away at the
# database level (only a superuser may change the catalog's privileges; without one, the SQL
# guard is the only layer for these, and health says so). Idempotent; runs at every start.
# - Advisory locks are shared by the whole database: a tenant holding the service's lock keys
#   could stall migrations and maintenance.
# - Functions that plan and run SQL given as text.
# - Sizes of any relation, and statistics and activity views: figures about every tenant.
# set_config stays (drivers call it: asyncpg turns JIT off for type introspection; the guard
# refuses it in tenant SQL, and no limit relies on a session setting), and so does txid_current
# (ingestion's staging tables key batches on it, as the tenant).
_HARDENING = """
DO $$
DECLARE f regprocedure; v text;
BEGIN
    FOR f IN SELECT p.oid::regprocedure FROM pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::regnamespace AND (
                   p.proname ~ '^pg_(try_)?advisory'
                OR p.proname IN ('ts_stat', 'pg_relation_size',
                                 'pg_total_relation_size', 'pg_table_size', 'pg_indexes_size',
                                 'pg_database_size', 'pg_tablespace_size', 'pg_current_snapshot',
                                 'txid_current_snapshot')
                OR p.proname ~ '_to_xml'
                OR (p.proname = 'ts_rewrite' AND p.pronargs = 2)) LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f);
    END LOOP;
    FOR v IN SELECT c.relname FROM pg_class c
             WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relkind = 'v'
               AND (c.relname ~ '^pg_stat(io)?_' OR c.relname IN ('pg_locks',
                    'pg_prepared_xacts', 'pg_stats_ext', 'pg_stats_ext_exprs')) LOOP
        EXECUTE format('REVOKE SELECT ON pg_catalog.%I FROM PUBLIC', v);
    END LOOP;
END $$
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(source: str | Path) -> list[Migration]:
    """Migrations from ``control``/``tenant`` (packaged) or from a directory path."""
    if isinstance(source, Path):
        entries = [(p.name, p.read_text()) for p in source.iterdir() if p.is_file()]
    else:
        folder = resources.files(__package__).joinpath(source)
        entries = [(p.name, p.read_text()) for p in folder.iterdir() if p.is_file()]
    found: list[Migration] = []
    for name, text in entries:
        match = _FILE.match(name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), text))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {source}: {versions}")
    return found


def render(sql: str, names: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in names:
            raise KeyError(f"migration placeholder {{{{{key}}}}} has no value")
        return names[key]

    return _PLACEHOLDER.sub(replace, sql)


@dataclass(slots=True)
class TenantMigrationResult:
    tenant_id: str
    applied: list[int] = field(default_factory=list)
    error: str | None = None
    sqlstate: str | None = None
    failed_version: int | None = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class MigrationReport:
    control_applied: list[int] = field(default_factory=list)
    tenants: list[TenantMigrationResult] = field(default_factory=list)

    @property
    def failed(self) -> list[TenantMigrationResult]:
        return [t for t in self.tenants if not t.ok]

    def to_dict(self) -> dict[str, object]:
        return {
            "control_applied": self.control_applied,
            "tenants": [
                {
                    "tenant_id": t.tenant_id,
                    "status": "ok" if t.ok else "failed",
                    "applied": t.applied,
                    "error": t.error,
                    "sqlstate": t.sqlstate,
                    "failed_version": t.failed_version,
                    "duration_ms": round(t.duration_ms, 2),
                }
                for t in self.tenants
            ],
            "failed": len(self.failed),
        }


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    done: int
    total: int
    result: TenantMigrationResult


ProgressCallback = Callable[[MigrationProgress], None]


class Migrator:
    """Applies control-plane and tenant migrations; owns no connections (callers pass them)."""

    def __init__(
        self,
        *,
        control_schema: str,
        shared_schema: str,
        group_role: str,
        role_prefix: str,
        control_migrations: Sequence[Migration] | None = None,
        tenant_migrations: Sequence[Migration] | None = None,
    ) -> None:
        self.control_schema = control_schema
        self.shared_schema = shared_schema
        self.group_role = group_role
        self.role_prefix = role_prefix
        self.control_migrations = list(
            control_migrations if control_migrations is not None else load_migrations("control")
        )
        self.tenant_migrations = list(
            tenant_migrations if tenant_migrations is not None else load_migrations("tenant")
        )

    @property
    def latest_tenant_version(self) -> int:
        return self.tenant_migrations[-1].version if self.tenant_migrations else 0

    def _names(self, tenant: TenantNames | None = None) -> dict[str, str]:
        names = {
            "control": quote_ident(self.control_schema),
            "shared": quote_ident(self.shared_schema),
            "group": quote_ident(self.group_role),
        }
        if tenant is not None:
            names["schema"] = quote_ident(tenant.schema)
            names["role"] = quote_ident(tenant.role)
            names["tenant"] = quote_literal(tenant.tenant_id)
        return names

    async def tenant_names(self, conn: Connection, tenant_id: str) -> TenantNames:
        """A tenant's names as the control plane records them (they are not derivable)."""
        row = await conn.fetchrow(
            f"SELECT tenant_id, schema_name, role_name, user_role_name"
            f" FROM {quote_ident(self.control_schema)}.tenants WHERE tenant_id = $1",
            tenant_id,
        )
        if row is None:
            raise KeyError(tenant_id)
        return TenantNames(
            row["tenant_id"], row["schema_name"], row["role_name"], row["user_role_name"] or ""
        )

    async def migrate(
        self,
        conn: Connection,
        *,
        tenant_ids: Iterable[str] | None = None,
        progress: ProgressCallback | None = None,
    ) -> MigrationReport:
        """Bring the control plane and every (or the named) tenant to the latest version."""
        report = MigrationReport()
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            report.control_applied = await self.migrate_control(conn)
            if tenant_ids is None:
                rows = await conn.fetch(
                    f"SELECT tenant_id FROM {quote_ident(self.control_schema)}.tenants "
                    "ORDER BY tenant_id"
                )
                tenant_ids = [r["tenant_id"] for r in rows]
            ids = list(tenant_ids)
            for done, tenant_id in enumerate(ids, start=1):
                result = await self._migrate_one_tenant(conn, tenant_id)
                report.tenants.append(result)
                if progress is not None:
                    progress(MigrationProgress(done, len(ids), result))
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        return report

    async def migrate_control(self, conn: Connection) -> list[int]:
        """Bootstrap (idempotent) and pending control-plane migrations; caller holds the lock."""
        control = quote_ident(self.control_schema)
        await self._bootstrap(conn)
        applied = {
            r["version"]
            for r in await conn.fetch(f"SELECT version FROM {control}.schema_migrations")
        }
        done: list[int] = []
        for migration in self.control_migrations:
            if migration.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(render(migration.sql, self._names()))
                await conn.execute(
                    f"INSERT INTO {control}.schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version,
                    migration.name,
                )
            log.info("control plane: applied migration %04d_%s", migration.version, migration.name)
            done.append(migration.version)
        return done

    async def _bootstrap(self, conn: Connection) -> None:
        control = quote_ident(self.control_schema)
        group = self.group_role
        database = await conn.fetchval("SELECT current_database()")
        is_superuser = await conn.fetchval(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        )
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {control}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(self.shared_schema)}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {control}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", group):
            # Another instance may create it between our check and our CREATE.
            with contextlib.suppress(asyncpg.DuplicateObjectError):
                await conn.execute(f"CREATE ROLE {quote_ident(group)} NOLOGIN")
        # Tenants reach this database only through the group's CONNECT; nobody gets TEMP, so
        # no temporary object can outlive a request on a pooled connection.
        await conn.execute(f"REVOKE ALL ON DATABASE {quote_ident(database)} FROM PUBLIC")
        await conn.execute(
            f"GRANT CONNECT ON DATABASE {quote_ident(database)} TO {quote_ident(group)}"
        )
        await conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        if is_superuser:
            await conn.execute(_HARDENING)

    async def _migrate_one_tenant(self, conn: Connection, tenant_id: str) -> TenantMigrationResult:
        started = time.perf_counter()
        result = TenantMigrationResult(tenant_id)
        control = quote_ident(self.control_schema)
        try:
            async with conn.transaction():
                names = await self.tenant_names(conn, tenant_id)
                applied = {
                    r["version"]
                    for r in await conn.fetch(
                        f"SELECT version FROM {control}.tenant_migrations WHERE tenant_id = $1",
                        tenant_id,
                    )
                }
                pending = [m for m in self.tenant_migrations if m.version not in applied]
                for migration in pending:
                    result.failed_version = migration.version
                    await self.apply_tenant_migration(conn, names, migration)
                    result.applied.append(migration.version)
                result.failed_version = None
        except asyncpg.PostgresError as exc:
            result.applied = []
            result.error = str(exc)
            result.sqlstate = exc.sqlstate
            log.warning(
                "tenant %s: migration %s failed (%s): %s",
                tenant_id,
                result.failed_version,
                exc.sqlstate,
                exc,
            )
        result.duration_ms = (time.perf_counter() - started) * 1000
        return result

    async def apply_tenant_migration(
        self, conn: Connection, names: TenantNames, migration: Migration
    ) -> None:
        """Apply one migration inside the caller's transaction."""
        control = quote_ident(self.control_schema)
        await conn.execute(f"SET LOCAL search_path = {quote_ident(names.schema)}")
        await conn.execute(render(migration.sql, self._names(names)))
        await conn.execute(
            f"INSERT INTO {control}.tenant_migrations (tenant_id, version, name)"
            " VALUES ($1, $2, $3)",
            names.tenant_id,
            migration.version,
            migration.name,
        )
