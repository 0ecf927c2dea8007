"""Tenant lifecycle: create, suspend, resume, delete. Each is one transaction: all or nothing.

A tenant ``abc`` is a row in the control plane, a schema ``tenant_abc`` built by the tenant
migrations, and a login role (``<prefix>abc``) that can reach only that schema and, through RLS,
its own rows of the shared tables. The role's password is random, stored sealed, and sent to
PostgreSQL only as a SCRAM verifier.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import asyncpg

from database_service.errors import (
    ConfirmationRequired,
    Conflict,
    InvalidRequest,
    TenantExists,
)
from database_service.tenancy.ids import TenantNames, quote_ident
from database_service.tenancy.migrations import Migrator
from database_service.tenancy.registry import TenantLimits, TenantRecord, TenantRegistry
from database_service.tenancy.secrets import SecretBox, new_role_password, scram_sha256_verifier

__all__ = ["TenantManager"]

log = logging.getLogger(__name__)

TenantListener = Callable[[str], Awaitable[None]]


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class TenantManager:
    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: TenantRegistry,
        migrator: Migrator,
        secret_box: SecretBox,
        *,
        control_schema: str,
        shared_schema: str,
        group_role: str,
        role_prefix: str,
        default_limits: TenantLimits,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._migrator = migrator
        self._box = secret_box
        self._control = quote_ident(control_schema)
        self._shared_schema = shared_schema
        self._group = quote_ident(group_role)
        self._role_prefix = role_prefix
        self.default_limits = default_limits
        self._listeners: list[TenantListener] = []

    def on_change(self, listener: TenantListener) -> None:
        """Call ``listener(tenant_id)`` after a tenant is suspended, resumed or deleted."""
        self._listeners.append(listener)

    async def _changed(self, tenant_id: str) -> None:
        self._registry.invalidate(tenant_id)
        for listener in self._listeners:
            await listener(tenant_id)

    def names(self, tenant_id: str) -> TenantNames:
        return TenantNames.of(tenant_id, self._role_prefix)

    async def create(self, tenant_id: str, limits: TenantLimits | None = None) -> TenantRecord:
        names = self.names(tenant_id)
        limits = limits or self.default_limits
        if limits.connection_limit < 1 or limits.statement_timeout_ms < 100:
            raise InvalidRequest("connection_limit must be ≥ 1 and statement_timeout_ms ≥ 100")
        password = new_role_password()
        role, schema = quote_ident(names.role), quote_ident(names.schema)
        async with self._pool.acquire() as conn:
            server_version = conn.get_server_version().major
            try:
                async with conn.transaction():
                    await conn.execute(
                        f"INSERT INTO {self._control}.tenants (tenant_id, role_name, schema_name,"
                        " role_secret, connection_limit, statement_timeout_ms)"
                        " VALUES ($1, $2, $3, $4, $5, $6)",
                        names.tenant_id,
                        names.role,
                        names.schema,
                        self._box.seal(password),
                        limits.connection_limit,
                        limits.statement_timeout_ms,
                    )
                    await conn.execute(
                        f"CREATE ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT"
                        " NOREPLICATION NOBYPASSRLS"
                        f" CONNECTION LIMIT {int(limits.connection_limit)}"
                        f" PASSWORD {_literal(scram_sha256_verifier(password))}"
                    )
                    # From PostgreSQL 16 the membership can carry privileges without letting the
                    # tenant SET ROLE to the group (harmless anyway: policies key on session_user).
                    set_false = " WITH INHERIT TRUE, SET FALSE" if server_version >= 16 else ""
                    await conn.execute(f"GRANT {self._group} TO {role}{set_false}")
                    timeout = int(limits.statement_timeout_ms)
                    await conn.execute(f"ALTER ROLE {role} SET statement_timeout = {timeout}")
                    await conn.execute(
                        f"ALTER ROLE {role} SET idle_in_transaction_session_timeout = {timeout * 2}"
                    )
                    await conn.execute(
                        f"ALTER ROLE {role} SET search_path = {schema}, "
                        f"{quote_ident(self._shared_schema)}"
                    )
                    await conn.execute(f"CREATE SCHEMA {schema}")
                    await conn.execute(f"REVOKE ALL ON SCHEMA {schema} FROM PUBLIC")
                    await conn.execute(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
                    for grant in (
                        "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON TABLES",
                        "USAGE, SELECT, UPDATE ON SEQUENCES",
                        "EXECUTE ON FUNCTIONS",
                        "USAGE ON TYPES",
                    ):
                        await conn.execute(
                            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT {grant} TO {role}"
                        )
                    for migration in self._migrator.tenant_migrations:
                        await self._migrator.apply_tenant_migration(conn, names, migration)
            except asyncpg.UniqueViolationError:
                raise TenantExists(f"tenant {tenant_id!r} already exists") from None
            except asyncpg.DuplicateObjectError:
                raise Conflict(
                    f"role {names.role!r} already exists in the PostgreSQL cluster but is not a "
                    "tenant of this service; choose another id or DBSVC_TENANT_ROLE_PREFIX"
                ) from None
            except asyncpg.DuplicateSchemaError:
                raise Conflict(
                    f"schema {names.schema!r} already exists but is not a tenant of this service"
                ) from None
        log.info("tenant %s: created (role %s, schema %s)", tenant_id, names.role, names.schema)
        self._registry.invalidate(tenant_id)
        return await self._registry.get(tenant_id)

    async def _set_status(self, tenant_id: str, status: str) -> TenantRecord:
        record = await self._registry.get(tenant_id)
        role = quote_ident(record.role_name)
        login = "LOGIN" if status == "active" else "NOLOGIN"
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE {self._control}.tenants SET status = $2, updated_at = now()"
                " WHERE tenant_id = $1",
                tenant_id,
                status,
            )
            await conn.execute(f"ALTER ROLE {role} {login}")
        if status != "active":
            await self._terminate_sessions(record.role_name)
        await self._changed(tenant_id)
        log.info("tenant %s: %s", tenant_id, status)
        return await self._registry.get(tenant_id)

    async def suspend(self, tenant_id: str) -> TenantRecord:
        return await self._set_status(tenant_id, "suspended")

    async def resume(self, tenant_id: str) -> TenantRecord:
        return await self._set_status(tenant_id, "active")

    async def _terminate_sessions(self, role_name: str) -> None:
        await self._pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = $1 AND datname = current_database()",
            role_name,
        )

    async def delete(self, tenant_id: str, *, confirm: bool) -> None:
        """Drop the tenant's role and schema and its rows of every shared table."""
        record = await self._registry.get(tenant_id)
        if not confirm:
            raise ConfirmationRequired(
                f"deleting tenant {tenant_id!r} drops its schema, role and shared-table rows; "
                "repeat with confirm=true"
            )
        role, schema = quote_ident(record.role_name), quote_ident(record.schema_name)
        await self._changed(tenant_id)  # close our pool first so no session holds the role
        async with self._pool.acquire() as conn:
            await conn.execute(f"ALTER ROLE {role} NOLOGIN")
            await self._terminate_sessions(record.role_name)
            async with conn.transaction():
                # Every shared table with a company_id column, so tables added later are covered.
                tables = await conn.fetch(
                    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " JOIN pg_attribute a ON a.attrelid = c.oid"
                    " WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND a.attname = 'company_id'"
                    " AND NOT a.attisdropped AND NOT c.relispartition",
                    self._shared_schema,
                )
                for table in tables:
                    await conn.execute(
                        f"DELETE FROM {quote_ident(self._shared_schema)}."
                        f"{quote_ident(table['relname'])} WHERE company_id = $1",
                        tenant_id,
                    )
                await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                await conn.execute(f"DROP OWNED BY {role}")
                await conn.execute(
                    f"DELETE FROM {self._control}.tenants WHERE tenant_id = $1", tenant_id
                )
                await conn.execute(f"DROP ROLE {role}")
        self._registry.invalidate(tenant_id)
        log.info("tenant %s: deleted", tenant_id)
