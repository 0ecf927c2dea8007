"""Tenant lifecycle: create, suspend, resume, delete. Each is all or nothing (delete: a committed
``deleting`` mark that refuses logins, then one transaction, undone on failure; see ``delete``).

A tenant ``abc`` is a row in the control plane, a schema built by the tenant migrations, and two
login roles that can reach only that schema and, through RLS, their company's rows of the shared
tables: one for company-wide requests, and one (a member of the first) for requests on behalf of
a user, whose user-level rows it sees only through a user id the service signs per transaction
(control migration 0004). Schema and role names are opaque (``t_<random>``,
``<prefix><random>``): the catalog, which PostgreSQL shows every role, names no customer. The
roles' password is random, stored sealed, and sent to PostgreSQL only as SCRAM verifiers.

``upgrade`` brings tenants created before that to the same shape (opaque names, the user role),
idempotently, at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from database_service.errors import (
    ConfirmationRequired,
    Conflict,
    DatabaseServiceError,
    FailedPrecondition,
    InvalidRequest,
    TenantExists,
    postgres_unreachable,
    unavailable,
)
from database_service.postgres import Connection
from database_service.tenancy.configuration import TenantConfig
from database_service.tenancy.ids import (
    LEGACY_SCHEMA_PREFIX,
    USER_ROLE_SUFFIX,
    TenantNames,
    quote_ident,
)
from database_service.tenancy.migrations import MIGRATION_LOCK_KEY, Migrator
from database_service.tenancy.registry import TenantLimits, TenantRecord, TenantRegistry
from database_service.tenancy.secrets import SecretBox, new_role_password, scram_sha256_verifier

__all__ = ["TenantManager"]

log = logging.getLogger(__name__)

TenantListener = Callable[[str], Awaitable[None]]
# Runs inside the transaction that deletes a tenant: what it writes commits with the delete.
DeletionHook = Callable[[Connection, str], Awaitable[None]]


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# Objects a tenant creates are its own: PostgreSQL's defaults would let every role execute its
# functions and use its types (and list them in information_schema).
_PRIVATE_BY_DEFAULT = (
    "REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC",
    "REVOKE USAGE ON TYPES FROM PUBLIC",
)


def _deletion_failure(tenant_id: str, exc: Exception, outcome: str) -> DatabaseServiceError | None:
    """What a failed delete tells its caller, with what became of the tenant (None: not an
    error of PostgreSQL's or ours, to be raised as it is)."""
    if isinstance(exc, DatabaseServiceError):
        exc.message = f"{exc.message}; {outcome}"
        exc.args = (exc.message,)
        return exc
    if postgres_unreachable(exc):
        failure = unavailable(f"deleting tenant {tenant_id!r}", exc)
        failure.message = f"{failure.message}; {outcome}"
        return failure
    if isinstance(exc, asyncpg.PostgresError):
        return FailedPrecondition(
            f"tenant {tenant_id!r} could not be deleted: {exc}; {outcome}",
            sqlstate=exc.sqlstate,
            detail=getattr(exc, "detail", None),
        )
    return None


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
        delete_lock_timeout_ms: int = 30_000,
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
        self._delete_lock_timeout_ms = delete_lock_timeout_ms
        self._listeners: list[TenantListener] = []
        self._deleted_listeners: list[TenantListener] = []
        self._deletion_hooks: list[DeletionHook] = []

    def on_deleting(self, hook: DeletionHook) -> None:
        """Call ``hook(conn, tenant_id)`` inside the transaction that deletes a tenant, so what
        it queues (the purge of the tenant's ClickHouse data) commits, or not, with the delete:
        a crash right after the commit cannot lose it."""
        self._deletion_hooks.append(hook)

    def on_deleted(self, listener: TenantListener) -> None:
        """Call ``listener(tenant_id)`` once a tenant is deleted (what lives outside
        PostgreSQL — key-value keys in Redis — goes with it)."""
        self._deleted_listeners.append(listener)

    def on_change(self, listener: TenantListener) -> None:
        """Call ``listener(tenant_id)`` after a tenant is suspended, resumed or deleted."""
        self._listeners.append(listener)

    async def _changed(self, tenant_id: str) -> None:
        self._registry.invalidate(tenant_id)
        for listener in self._listeners:
            await listener(tenant_id)

    async def create(self, tenant_id: str, limits: TenantLimits | None = None) -> TenantRecord:
        names = TenantNames.new(tenant_id, self._role_prefix)
        limits = limits or self.default_limits
        if limits.connection_limit < 1 or limits.statement_timeout_ms < 100:
            raise InvalidRequest("connection_limit must be ≥ 1 and statement_timeout_ms ≥ 100")
        password = new_role_password()
        role, schema = quote_ident(names.role), quote_ident(names.schema)
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    if await conn.fetchval(
                        f"SELECT 1 FROM {self._control}.tenants WHERE tenant_id = $1", tenant_id
                    ):
                        raise TenantExists(f"tenant {tenant_id!r} already exists")
                    await conn.execute(
                        f"INSERT INTO {self._control}.tenants (tenant_id, role_name, schema_name,"
                        " user_role_name, role_secret, connection_limit, statement_timeout_ms)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        names.tenant_id,
                        names.role,
                        names.schema,
                        names.user_role,
                        self._box.seal(password),
                        limits.connection_limit,
                        limits.statement_timeout_ms,
                    )
                    await self._create_role(conn, names.role, password, limits, names.schema)
                    await self._create_user_role(conn, names, password, limits)
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
            except (asyncpg.DuplicateObjectError, asyncpg.DuplicateSchemaError):
                # 64 random bits: a collision is a cluster shared with something else.
                raise Conflict(
                    f"the names drawn for tenant {tenant_id!r} exist in the PostgreSQL cluster"
                    " already; retry"
                ) from None
        log.info("tenant %s: created (role %s, schema %s)", tenant_id, names.role, names.schema)
        self._registry.invalidate(tenant_id)
        return await self._registry.get(tenant_id)

    async def _create_role(
        self, conn: Connection, role: str, password: str, limits: TenantLimits, schema: str
    ) -> None:
        """A tenant login role: no privilege of its own beyond the group's and its schema's."""
        q_role = quote_ident(role)
        await conn.execute(
            f"CREATE ROLE {q_role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT"
            " NOREPLICATION NOBYPASSRLS"
            f" CONNECTION LIMIT {int(limits.connection_limit)}"
            f" PASSWORD {_literal(scram_sha256_verifier(password))}"
        )
        # From PostgreSQL 16 the membership can carry privileges without letting the tenant SET
        # ROLE to the group (harmless anyway: policies key on session_user).
        set_false = " WITH INHERIT TRUE, SET FALSE" if conn.get_server_version().major >= 16 else ""
        await conn.execute(f"GRANT {self._group} TO {q_role}{set_false}")
        await self._role_settings(conn, role, limits, schema)
        for revoke in _PRIVATE_BY_DEFAULT:
            # Needs a superuser (or membership in the role); without one, objects the tenant
            # creates keep PostgreSQL's defaults, which no other tenant can use anyway (no
            # USAGE on the schema), but information_schema would list them.
            with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(f"ALTER DEFAULT PRIVILEGES FOR ROLE {q_role} {revoke}")

    async def _role_settings(
        self, conn: Connection, role: str, limits: TenantLimits, schema: str
    ) -> None:
        # Defence in depth only: a session can change its own settings. The service enforces
        # the tenant's time limits from outside the session (postgres.deadlines).
        q_role = quote_ident(role)
        timeout = int(limits.statement_timeout_ms)
        await conn.execute(f"ALTER ROLE {q_role} SET statement_timeout = {timeout}")
        await conn.execute(
            f"ALTER ROLE {q_role} SET idle_in_transaction_session_timeout = {timeout * 2}"
        )
        await conn.execute(
            f"ALTER ROLE {q_role} SET search_path = {quote_ident(schema)}, "
            f"{quote_ident(self._shared_schema)}"
        )

    async def _create_user_role(
        self, conn: Connection, names: TenantNames, password: str, limits: TenantLimits
    ) -> None:
        """The user-scoped login: a member of the company role (its privileges, its objects),
        told apart by ``session_user`` in control.session_user_scope()."""
        await self._create_role(conn, names.user_role, password, limits, names.schema)
        set_false = " WITH INHERIT TRUE, SET FALSE" if conn.get_server_version().major >= 16 else ""
        await conn.execute(
            f"GRANT {quote_ident(names.role)} TO {quote_ident(names.user_role)}{set_false}"
        )

    async def _set_status(self, tenant_id: str, status: str) -> TenantRecord:
        record = await self._registry.get(tenant_id)
        await self._apply_status(record, status)
        log.info("tenant %s: %s", tenant_id, status)
        return await self._registry.get(tenant_id)

    async def _apply_status(self, record: TenantRecord, status: str) -> None:
        """The status and the roles' LOGIN in one transaction; then our pools close and, when
        logins are now refused, the tenant's sessions are ended."""
        login = "LOGIN" if status == "active" else "NOLOGIN"
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE {self._control}.tenants SET status = $2, updated_at = now()"
                " WHERE tenant_id = $1",
                record.tenant_id,
                status,
            )
            for role in record.roles:
                await conn.execute(f"ALTER ROLE {quote_ident(role)} {login}")
        await self._changed(record.tenant_id)  # our pools close before their sessions are ended
        if status != "active":
            await self._terminate_sessions(record.roles)

    async def suspend(self, tenant_id: str) -> TenantRecord:
        return await self._set_status(tenant_id, "suspended")

    async def resume(self, tenant_id: str) -> TenantRecord:
        return await self._set_status(tenant_id, "active")

    async def configure(self, config: TenantConfig) -> str:
        """Apply one configuration version in one transaction — its limits (the roles'
        connection limit and settings), its status (the roles' LOGIN) and its cache rules —
        and record the version; ``unchanged`` (nothing done) when this version or a newer one
        was applied already, ``applied`` otherwise. Pools close afterwards, as on suspend."""
        record = await self._registry.get(config.tenant_id)
        async with self._pool.acquire() as conn, conn.transaction():
            # The version first: a concurrent apply of the same version waits on this row,
            # then finds it applied.
            newer = await conn.fetchval(
                f"INSERT INTO {self._control}.hub_config (tenant_id, version, payload)"
                " VALUES ($1, $2, $3::jsonb) ON CONFLICT (tenant_id) DO UPDATE SET"
                " version = EXCLUDED.version, payload = EXCLUDED.payload, applied_at = now()"
                f" WHERE {self._control}.hub_config.version < EXCLUDED.version RETURNING version",
                config.tenant_id,
                config.version,
                json.dumps(config.source),
            )
            if newer is None:
                return "unchanged"
            status = await conn.fetchval(
                f"SELECT status FROM {self._control}.tenants WHERE tenant_id = $1 FOR UPDATE",
                config.tenant_id,
            )
            if status not in ("active", "suspended"):
                raise Conflict(f"tenant {config.tenant_id!r} is {status}: not configurable")
            if config.limits is not None:
                limits = config.limits
                await conn.execute(
                    f"UPDATE {self._control}.tenants SET connection_limit = $2,"
                    " statement_timeout_ms = $3, updated_at = now() WHERE tenant_id = $1",
                    config.tenant_id,
                    limits.connection_limit,
                    limits.statement_timeout_ms,
                )
                for role in record.roles:
                    await conn.execute(
                        f"ALTER ROLE {quote_ident(role)}"
                        f" CONNECTION LIMIT {int(limits.connection_limit)}"
                    )
                    await self._role_settings(conn, role, limits, record.schema_name)
            suspended = False
            if config.status is not None and config.status != status:
                await conn.execute(
                    f"UPDATE {self._control}.tenants SET status = $2, updated_at = now()"
                    " WHERE tenant_id = $1",
                    config.tenant_id,
                    config.status,
                )
                login = "LOGIN" if config.status == "active" else "NOLOGIN"
                for role in record.roles:
                    await conn.execute(f"ALTER ROLE {quote_ident(role)} {login}")
                suspended = config.status != "active"
            if config.cache_rules is not None:
                await conn.execute(
                    f"DELETE FROM {self._control}.cache_rules WHERE tenant_id = $1",
                    config.tenant_id,
                )
                await conn.executemany(
                    f"INSERT INTO {self._control}.cache_rules (tenant_id, relation, ttl_ms)"
                    " VALUES ($1, $2, $3)",
                    [(config.tenant_id, r, ttl) for r, ttl in config.cache_rules.items()],
                )
        await self._changed(config.tenant_id)
        if suspended:
            await self._terminate_sessions(record.roles)
        log.info("tenant %s: configuration version %d applied", config.tenant_id, config.version)
        return "applied"

    async def _terminate_sessions(self, roles: tuple[str, ...]) -> None:
        await self._pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE usename = ANY($1::text[]) AND datname = current_database()",
            list(roles),
        )

    async def delete(self, tenant_id: str, *, confirm: bool) -> None:
        """Drop the tenant's roles and schema and its rows of every shared table: all or nothing.

        First the tenant is marked ``deleting`` with its logins refused (one transaction,
        committed so that no new session starts), our pools close and its sessions are ended;
        then one transaction drops everything. If that fails, the tenant is put back as it was
        (status and logins) and the error says why. Should even that fail (PostgreSQL gone), the
        tenant stays ``deleting`` — refused like a suspended one, nothing of it dropped — and
        the delete can be repeated from there (or the tenant resumed)."""
        record = await self._registry.get(tenant_id)
        if not confirm:
            raise ConfirmationRequired(
                f"deleting tenant {tenant_id!r} drops its schema, role and shared-table rows; "
                "repeat with confirm=true"
            )
        previous = record.status
        await self._apply_status(record, "deleting")
        try:
            await self._drop(record)
        except Exception as exc:
            try:
                await self._restore(record, previous)
            except Exception as again:
                log.error(
                    "tenant %s: delete failed (%s) and the tenant could not be put back (%s);"
                    " it stays 'deleting': repeat the delete",
                    tenant_id,
                    exc,
                    again,
                )
                outcome = "the tenant is left 'deleting': repeat the delete"
            else:
                log.warning("tenant %s: delete failed, nothing dropped: %s", tenant_id, exc)
                outcome = (
                    f"nothing was dropped and the tenant is {previous} again"
                    if previous != "deleting"
                    else "nothing was dropped; the tenant stays 'deleting': repeat the delete"
                )
            failure = _deletion_failure(tenant_id, exc, outcome)
            if failure is None:
                raise  # a bug: the front end reports it as an internal error
            raise failure from exc
        self._registry.invalidate(tenant_id)
        log.info("tenant %s: deleted", tenant_id)
        for listener in self._deleted_listeners:
            try:
                await listener(tenant_id)
            except Exception:  # the tenant is gone whatever a listener fails to clean up
                log.exception("tenant %s: cleaning up after the delete failed", tenant_id)

    async def _drop(self, record: TenantRecord) -> None:
        schema = quote_ident(record.schema_name)
        async with self._pool.acquire() as conn, conn.transaction():
            # Never wait without end behind a lock: fail, put the tenant back, let them retry.
            await conn.execute(f"SET LOCAL lock_timeout = {int(self._delete_lock_timeout_ms)}")
            status = await conn.fetchval(
                f"SELECT status FROM {self._control}.tenants WHERE tenant_id = $1 FOR UPDATE",
                record.tenant_id,
            )
            if status != "deleting":  # resumed, or deleted, by someone else meanwhile
                raise FailedPrecondition(
                    f"tenant {record.tenant_id!r} changed while being deleted (now"
                    f" {status or 'gone'})"
                )
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
                    record.tenant_id,
                )
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            roles = ", ".join(quote_ident(r) for r in record.roles)
            await conn.execute(f"DROP OWNED BY {roles}")
            await conn.execute(
                f"DELETE FROM {self._control}.tenants WHERE tenant_id = $1", record.tenant_id
            )
            for hook in self._deletion_hooks:
                await hook(conn, record.tenant_id)
            for role in reversed(record.roles):  # the user role is a member of the other
                await conn.execute(f"DROP ROLE {quote_ident(role)}")

    async def _restore(self, record: TenantRecord, status: str) -> None:
        """Undo the start of a failed delete: the status it had and, if active, its logins."""
        login = "LOGIN" if status == "active" else "NOLOGIN"
        async with self._pool.acquire() as conn, conn.transaction():
            restored = await conn.execute(
                f"UPDATE {self._control}.tenants SET status = $2, updated_at = now()"
                " WHERE tenant_id = $1 AND status = 'deleting'",
                record.tenant_id,
                status,
            )
            if restored.endswith(" 1"):
                for role in record.roles:
                    await conn.execute(f"ALTER ROLE {quote_ident(role)} {login}")
        await self._changed(record.tenant_id)

    async def upgrade(self) -> list[str]:
        """Give tenants created before opaque names and user-scoped logins both; idempotent.

        Runs at start under the migration lock, before any tenant pool exists here. Another
        instance still running the old version keeps working: its next registry read (within
        its cache TTL) finds the new names."""
        upgraded: list[str] = []
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
            try:
                rows = await conn.fetch(
                    f"SELECT tenant_id, schema_name, role_name, user_role_name, role_secret,"
                    f" connection_limit, statement_timeout_ms FROM {self._control}.tenants"
                    " WHERE user_role_name IS NULL OR schema_name = $1 || tenant_id"
                    " ORDER BY tenant_id",
                    LEGACY_SCHEMA_PREFIX,
                )
                for row in rows:
                    async with conn.transaction():
                        await self._upgrade_one(conn, row)
                    upgraded.append(row["tenant_id"])
                    self._registry.invalidate(row["tenant_id"])
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        if upgraded:
            log.info("tenants upgraded to opaque names and user-scoped logins: %d", len(upgraded))
        return upgraded

    async def _upgrade_one(self, conn: Connection, row: asyncpg.Record) -> None:
        tenant_id = row["tenant_id"]
        fresh = TenantNames.new(tenant_id, self._role_prefix)
        limits = TenantLimits(row["connection_limit"], row["statement_timeout_ms"])
        schema, role = row["schema_name"], row["role_name"]
        if schema == LEGACY_SCHEMA_PREFIX + tenant_id:
            await conn.execute(
                f"ALTER SCHEMA {quote_ident(schema)} RENAME TO {quote_ident(fresh.schema)}"
            )
            await conn.execute(
                f"ALTER ROLE {quote_ident(role)} RENAME TO {quote_ident(fresh.role)}"
            )
            schema, role = fresh.schema, fresh.role
            await self._role_settings(conn, role, limits, schema)
        user_role = row["user_role_name"]
        if user_role is None:
            user_role = role + USER_ROLE_SUFFIX
            names = TenantNames(tenant_id, schema, role, user_role)
            await self._create_user_role(conn, names, self._box.open(row["role_secret"]), limits)
        await conn.execute(
            f"UPDATE {self._control}.tenants SET schema_name = $2, role_name = $3,"
            " user_role_name = $4, updated_at = now() WHERE tenant_id = $1",
            tenant_id,
            schema,
            role,
            user_role,
        )
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            async with conn.transaction():
                await conn.execute(
                    f"REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA {quote_ident(schema)} FROM PUBLIC"
                )
