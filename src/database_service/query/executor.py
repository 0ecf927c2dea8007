"""The query execution core every front end shares.

For a request (principal, tenant, optional user, SQL, parameters) the executor checks, in order:
the principal may act for the tenant; the tenant exists and is active; the SQL guard accepts the
statement; the principal's scopes allow its class (read → ``read``, write → ``write``, DDL →
``admin``). Then it runs the statement on a connection logged in as the tenant's own role. A user
id, or a principal without the ``write`` scope, puts the statement in a transaction: the user id is
set with ``set_config(..., true)`` (transaction-local), and without ``write`` the transaction is
READ ONLY, so PostgreSQL itself refuses writes hidden in functions.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from database_service.auth import Principal, Scope
from database_service.errors import DatabaseServiceError, InvalidParameters, ResourceExhausted
from database_service.observability.audit import AuditEvent, AuditLog
from database_service.observability.metrics import Metrics
from database_service.postgres import Connection, TenantLogin, TenantPools
from database_service.query.boundary import postgres_errors, prepare_cached
from database_service.query.values import coerce_params
from database_service.sqlguard import Classification, SqlGuard, StatementKind
from database_service.tenancy import SecretBox, TenantRecord, TenantRegistry

__all__ = ["Column", "QueryExecutor", "QueryResult", "TenantContext"]

log = logging.getLogger(__name__)

_USER_ID = re.compile(r"^[A-Za-z0-9_.@:+-]{1,50}$")
_REQUIRED_SCOPE = {
    StatementKind.READ: Scope.READ,
    StatementKind.WRITE: Scope.WRITE,
    StatementKind.DDL: Scope.ADMIN,
}


@dataclass(frozen=True, slots=True)
class TenantContext:
    tenant_id: str
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_name: str


@dataclass(slots=True)
class QueryResult:
    columns: list[Column]
    rows: list[asyncpg.Record]
    command: str
    row_count: int
    kind: StatementKind
    duration_ms: float


def _row_count(status: str, fetched: int) -> int:
    """Rows affected from the command tag ("INSERT 0 3", "UPDATE 2"), else rows returned."""
    parts = status.split()
    if (
        parts
        and parts[0] in {"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"}
        and parts[-1].isdigit()
    ):
        return int(parts[-1])
    return fetched


class QueryExecutor:
    def __init__(
        self,
        *,
        pools: TenantPools,
        registry: TenantRegistry,
        secret_box: SecretBox,
        guard: SqlGuard,
        audit: AuditLog,
        metrics: Metrics,
        shared_schema: str,
        max_params: int,
        max_result_rows: int,
    ) -> None:
        self._pools = pools
        self._registry = registry
        self._box = secret_box
        self._guard = guard
        self._audit = audit
        self._metrics = metrics
        self._shared = (shared_schema,)
        self._max_params = max_params
        self._max_rows = max_result_rows
        self._logins: dict[str, tuple[str, TenantLogin]] = {}

    def _login(self, tenant: TenantRecord) -> TenantLogin:
        # Decrypting on every request would cost ~50 µs; cache by the sealed secret's value.
        cached = self._logins.get(tenant.tenant_id)
        if cached is not None and cached[0] == tenant.role_secret:
            return cached[1]
        login = TenantLogin(tenant.tenant_id, tenant.role_name, self._box.open(tenant.role_secret))
        self._logins[tenant.tenant_id] = (tenant.role_secret, login)
        return login

    async def authorize(
        self, principal: Principal, ctx: TenantContext, sql: str
    ) -> tuple[TenantRecord, Classification]:
        """Every check that happens before PostgreSQL sees the statement."""
        if not principal.can_act_for(ctx.tenant_id):
            principal.require(Scope.READ, ctx.tenant_id)  # raises PermissionDenied
        if ctx.user_id is not None and not _USER_ID.fullmatch(ctx.user_id):
            raise InvalidParameters(
                "user_id must be 1-50 characters of letters, digits and _ . @ : + -"
            )
        tenant = await self._registry.get_active(ctx.tenant_id)
        verdict = self._guard.classify(
            sql, own_schema=tenant.schema_name, shared_schemas=self._shared
        )
        principal.require(_REQUIRED_SCOPE[verdict.kind], ctx.tenant_id)
        return tenant, verdict

    async def execute(
        self,
        principal: Principal,
        ctx: TenantContext,
        sql: str,
        params: Sequence[Any] = (),
        *,
        action: str = "query",
    ) -> QueryResult:
        started = time.perf_counter()
        verdict: Classification | None = None
        try:
            if len(params) > self._max_params:
                raise InvalidParameters(
                    f"{len(params)} parameters exceed the limit of {self._max_params}"
                )
            tenant, verdict = await self.authorize(principal, ctx, sql)
            result = await self._run(tenant, ctx, verdict, sql, params, principal)
        except DatabaseServiceError as exc:
            outcome = "error" if verdict is not None else "denied"
            if outcome == "denied":
                self._metrics.denials.labels(exc.error_code).inc()
            await self._audit.record(
                AuditEvent(
                    service=principal.service,
                    tenant_id=ctx.tenant_id,
                    action=action,
                    statement_class=verdict.kind.value if verdict else None,
                    outcome=outcome,
                    code=exc.error_code,
                    detail=exc.message[:500],
                )
            )
            log.info(
                "tenant %s: %s by %s %s: %s",
                ctx.tenant_id,
                action,
                principal.service,
                outcome,
                exc.error_code,
            )
            raise
        result.duration_ms = (time.perf_counter() - started) * 1000
        self._metrics.statements.labels(verdict.kind.value).inc()
        await self._audit.record(
            AuditEvent(
                service=principal.service,
                tenant_id=ctx.tenant_id,
                action=action,
                statement_class=verdict.kind.value,
                outcome="ok",
                code=result.command,
            )
        )
        return result

    async def _run(
        self,
        tenant: TenantRecord,
        ctx: TenantContext,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
        principal: Principal,
    ) -> QueryResult:
        readonly = not principal.has_scope(Scope.WRITE)
        in_transaction = ctx.user_id is not None or readonly
        with postgres_errors(ctx.tenant_id):
            async with self._pools.acquire(self._login(tenant)) as conn:
                if in_transaction:
                    async with conn.transaction(readonly=readonly):
                        if ctx.user_id is not None:
                            await conn.execute(
                                "SELECT set_config('dbsvc.user_id', $1, true)", ctx.user_id
                            )
                        return await self._statement(conn, verdict, sql, params)
                return await self._statement(conn, verdict, sql, params)

    async def _statement(
        self,
        conn: Connection,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
    ) -> QueryResult:
        stmt = await prepare_cached(conn, sql)
        args = coerce_params(params, stmt.get_parameters())
        columns = [Column(a.name, a.type.name) for a in stmt.get_attributes()]
        # The JSON front end returns whole results; the row cap bounds what one request may
        # ask for (streaming without a cap is the gRPC front end's job).
        rows = await stmt.fetch(*args)
        if len(rows) > self._max_rows:
            raise ResourceExhausted(
                f"the result has more than {self._max_rows} rows; add a LIMIT or use the "
                "streaming gRPC API"
            )
        status = stmt.get_statusmsg() or ""
        return QueryResult(
            columns=columns,
            rows=rows,
            command=status,
            row_count=_row_count(status, len(rows)),
            kind=verdict.kind,
            duration_ms=0.0,
        )
