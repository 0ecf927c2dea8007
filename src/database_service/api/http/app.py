"""The REST front end (seed: "Method 3: HTTP REST"): admin operations, health, metrics, and a
JSON query endpoint for curl users. Every route authenticates through the same Authenticator and
runs tenant SQL through the same QueryExecutor as the other front ends.

No ``from __future__ import annotations`` here: FastAPI must see the ``Annotated`` dependency
aliases defined inside ``create_http_app`` as objects, not as strings to resolve globally.
"""

import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, NoReturn

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope as AsgiScope

from database_service import __version__
from database_service.api.http.middleware import BodyLimit, InternalErrors, RequestMetrics
from database_service.api.http.schemas import (
    AdminTokenRequest,
    ErrorResponse,
    MigrationRequest,
    QueryRequest,
    QueryResponse,
    ServiceCreateRequest,
    TenantCreateRequest,
    TokenRequest,
    TokenResponse,
)
from database_service.app import Application
from database_service.auth import ALL_TENANTS, Principal, Scope, parse_scopes
from database_service.errors import (
    UNREACHABLE_ERRORS,
    DatabaseServiceError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    escaped_driver_error,
    http_status_of,
    unavailable,
)
from database_service.observability import AuditEvent
from database_service.observability.health import performance_document
from database_service.query import Header as ResultHeader
from database_service.query import Summary, TenantContext, encode_value
from database_service.tenancy import TenantLimits, quote_ident, validate_tenant_id
from database_service.timeseries.candles import (
    DEFAULT_ORIGIN,
    CandleQuery,
    candle_sql,
    last_tick_sql,
)

__all__ = ["create_http_app"]

log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429, 500, 503)
}
# Errors Starlette and FastAPI raise themselves (no route, wrong method, a body that does not
# parse), in the service's words.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_request",
}


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def create_http_app(core: Application) -> FastAPI:
    settings = core.settings
    api = FastAPI(
        title="Database Service",
        version=__version__,
        description="Multi-tenant database gateway: tenant isolation enforced by PostgreSQL.",
        responses=_ERRORS,
    )

    @api.exception_handler(DatabaseServiceError)
    async def service_error(request: Request, exc: DatabaseServiceError) -> JSONResponse:
        request.state.error_code = exc.error_code
        core.metrics.errors.labels(exc.error_code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
        return JSONResponse(
            {"error": exc.to_dict()}, status_code=http_status_of(exc), headers=headers
        )

    @api.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return await service_error(request, InvalidRequest(f"invalid request: {problems}"))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """No route, wrong method, a body that is not JSON in UTF-8: the documented shape."""
        status = exc.status_code
        code = _HTTP_CODES.get(status, "internal" if status >= 500 else "invalid_request")
        where = f"{request.method} {request.url.path}"
        message = {
            404: f"no such route: {where}",
            405: f"method not allowed: {where}",
            400: "invalid request: the body is not valid JSON in UTF-8",
        }.get(status, str(exc.detail))
        request.state.error_code = code
        core.metrics.errors.labels(code).inc()
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=exc.headers
        )

    async def internal_error(scope: AsgiScope, exc: Exception) -> None:
        """An exception nothing answered (a bug): log it with its traceback, count and audit it;
        ``InternalErrors`` then answers ``500 internal`` without its text."""
        route: Any = scope.get("route")
        operation = getattr(route, "path", None) or "unmatched"
        state = scope.get("state", {})
        method = scope.get("method", "?")
        log.error("%s %s: unexpected error", method, scope.get("path"), exc_info=exc)
        core.metrics.errors.labels("internal").inc()
        core.metrics.unhandled.labels("http", operation).inc()
        await core.audit.record(
            AuditEvent(
                service=state.get("service"),
                tenant_id=state.get("tenant_id"),
                action=f"{method} {operation}",
                outcome="error",
                code="internal",
                detail=type(exc).__name__,
            )
        )

    async def driver_error(request: Request, exc: Exception) -> JSONResponse:
        """Last resort: PostgreSQL unreachable on a path without its own translation is still a
        503 the caller can retry, not a 500. Anything else re-raised here stays a 500."""
        if not escaped_driver_error(exc):
            raise exc
        log.warning("%s: PostgreSQL error reached the last resort", request.url.path, exc_info=exc)
        return await service_error(request, unavailable(request.url.path, exc))

    for kind in UNREACHABLE_ERRORS:
        api.add_exception_handler(kind, driver_error)

    async def authenticated(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        try:
            principal = await core.authenticator.authenticate(authorization)
        except Unauthenticated as exc:
            await _audit_denial(None, None, request.url.path, exc)
            raise
        request.state.service = principal.service
        return principal

    async def _audit_denial(
        principal: Principal | None, tenant_id: str | None, action: str, exc: DatabaseServiceError
    ) -> None:
        await core.audit.denied(principal.service if principal else None, tenant_id, action, exc)

    async def require(
        principal: Principal, scope: Scope, action: str, tenant_id: str | None = None
    ) -> None:
        try:
            principal.require(scope, tenant_id)
        except PermissionDenied as exc:
            await _audit_denial(principal, tenant_id, action, exc)
            raise

    async def deny(
        principal: Principal, tenant_id: str | None, action: str, exc: DatabaseServiceError
    ) -> NoReturn:
        await _audit_denial(principal, tenant_id, action, exc)
        raise exc

    async def require_platform(principal: Principal, action: str, *scopes: Scope) -> None:
        """Operations spanning tenants: a platform principal (tenants ``*``) holding one of
        ``scopes`` (default ``admin``); a tenant's administrator is refused."""
        try:
            principal.require_platform(*(scopes or (Scope.ADMIN,)))
        except PermissionDenied as exc:
            await deny(principal, None, action, exc)

    def acting_for(request: Request, principal: Principal, tenant_id: str) -> None:
        """Count this request in the tenant's figures, once the caller may act for it."""
        if principal.can_act_for(tenant_id):
            request.state.tenant_id = tenant_id

    async def audit_ok(principal: Principal, action: str, tenant_id: str | None = None) -> None:
        await core.audit.record(
            AuditEvent(service=principal.service, tenant_id=tenant_id, action=action)
        )

    Authenticated = Annotated[Principal, Depends(authenticated)]

    # --- queries -------------------------------------------------------------------------

    @api.post("/api/v1/query", response_model=QueryResponse, tags=["query"])
    async def query(
        body: QueryRequest,
        request: Request,
        principal: Authenticated,
        x_tenant_id: Annotated[str | None, Header()] = None,
        x_user_id: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        """Run one SQL statement for a tenant, as that tenant's PostgreSQL role."""
        tenant_id = body.tenant_id or x_tenant_id
        if tenant_id is None:
            raise InvalidRequest("tenant_id is required (body field or X-Tenant-Id header)")
        if body.tenant_id and x_tenant_id and body.tenant_id != x_tenant_id:
            raise InvalidRequest("tenant_id in the body and X-Tenant-Id header differ")
        ctx = TenantContext(validate_tenant_id(tenant_id), body.user_id or x_user_id)
        acting_for(request, principal, ctx.tenant_id)
        result = await core.executor.execute(principal, ctx, body.sql, body.params)
        return JSONResponse(
            {
                "columns": [{"name": c.name, "type": c.type_name} for c in result.columns],
                "rows": [[encode_value(v) for v in row] for row in result.rows],
                "row_count": result.row_count,
                "command": result.command,
                "statement_class": result.kind.value,
                "duration_ms": round(result.duration_ms, 3),
            }
        )

    # --- time series ---------------------------------------------------------------------

    async def ndjson(
        request: Request, principal: Principal, tenant_id: str | None, sql: str, params: list[Any]
    ) -> StreamingResponse:
        """Rows as JSON lines, streamed from the cursor. The first event is awaited before the
        response starts, so authorization and SQL errors still get their status codes."""
        if tenant_id is None:
            raise InvalidRequest("the X-Tenant-Id header is required")
        ctx = TenantContext(validate_tenant_id(tenant_id))
        acting_for(request, principal, ctx.tenant_id)
        events = core.executor.stream(
            principal, ctx, sql, params, read_only=True, action="timeseries"
        )
        header = await anext(events)
        assert isinstance(header, ResultHeader)
        names = [c.name for c in header.columns]

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    if isinstance(event, Summary | ResultHeader):
                        continue
                    for row in event:
                        item = {n: encode_value(v) for n, v in zip(names, row, strict=True)}
                        yield json.dumps(item).encode() + b"\n"
            finally:
                # A client that goes away mid-stream: release the cursor and its connection now.
                await events.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @api.get("/api/v1/timeseries/ticks", tags=["timeseries"])
    async def ticks(
        request: Request,
        principal: Authenticated,
        symbol: str,
        start: dt.datetime,
        end: dt.datetime,
        limit: int = Query(default=0, ge=0),
        x_tenant_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """Raw ticks of a symbol in [start, end), as NDJSON."""
        sql = (
            "SELECT time, user_id, symbol, bid, ask, volume, spread FROM"
            f" {quote_ident(settings.shared_schema)}.trading_ticks"
            " WHERE symbol = $1 AND time >= $2 AND time < $3 ORDER BY time"
        )
        params: list[Any] = [symbol, _aware(start), _aware(end)]
        if limit:
            sql += " LIMIT $4"
            params.append(limit)
        return await ndjson(request, principal, x_tenant_id, sql, params)

    @api.get("/api/v1/timeseries/candles", tags=["timeseries"])
    async def candles(
        request: Request,
        principal: Authenticated,
        symbol: str,
        start: dt.datetime,
        end: dt.datetime,
        interval: int = Query(default=60, description="seconds, 1 to 86400"),
        timezone: str = "UTC",
        origin: dt.datetime = DEFAULT_ORIGIN,
        gap_fill: bool = False,
        source: str = "auto",
        x_tenant_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """OHLCV candles with VWAP and spread statistics, as NDJSON (see timeseries/candles.py)."""
        query = CandleQuery(
            symbol, _aware(start), _aware(end), dt.timedelta(seconds=interval), timezone,
            _aware(origin), gap_fill, source,
        )  # fmt: skip
        sql, params = candle_sql(settings.shared_schema, query)
        return await ndjson(request, principal, x_tenant_id, sql, params)

    @api.get("/api/v1/timeseries/last", tags=["timeseries"])
    async def last_tick(
        request: Request,
        principal: Authenticated,
        since: dt.datetime,
        x_tenant_id: Annotated[str | None, Header()] = None,
    ) -> StreamingResponse:
        """The latest tick of every symbol since ``since``, as NDJSON."""
        sql, params = last_tick_sql(settings.shared_schema, _aware(since))
        return await ndjson(request, principal, x_tenant_id, sql, params)

    # The shared partitions hold every tenant's rows, and their sizes and row estimates describe
    # every tenant's activity: listing and changing them is for the platform administrator.

    @api.get("/api/v1/admin/partitions", tags=["admin"])
    async def list_partitions(principal: Authenticated, table: str | None = None) -> dict[str, Any]:
        await require_platform(principal, "partitions.list")
        infos = await core.partitions.list(table)
        return {
            "partitions": [p.to_dict() for p in infos],
            "last_maintenance": core.partitions.last_run.isoformat()
            if core.partitions.last_run
            else None,
        }

    @api.post("/api/v1/admin/partitions/maintain", tags=["admin"])
    async def maintain_partitions(principal: Authenticated) -> dict[str, Any]:
        """Create partitions ahead and apply retention now (skipped if another instance is)."""
        await require_platform(principal, "partitions.maintain")
        report = await core.partitions.maintain()
        await audit_ok(principal, "partitions.maintain")
        return report.to_dict() if report else {"skipped": True}

    @api.post("/api/v1/admin/partitions/{table}/{name}/detach", tags=["admin"])
    async def detach_partition(table: str, name: str, principal: Authenticated) -> dict[str, Any]:
        await require_platform(principal, "partitions.detach")
        await core.partitions.detach(table, name)
        await audit_ok(principal, "partitions.detach")
        return {"table": table, "partition": name, "attached": False}

    @api.post("/api/v1/admin/partitions/{table}/{name}/attach", tags=["admin"])
    async def attach_partition(
        table: str, name: str, start: dt.datetime, principal: Authenticated
    ) -> dict[str, Any]:
        await require_platform(principal, "partitions.attach")
        await core.partitions.attach(table, name, _aware(start))
        await audit_ok(principal, "partitions.attach")
        return {"table": table, "partition": name, "attached": True}

    # --- tenants -------------------------------------------------------------------------

    @api.post("/api/v1/admin/schema/create", status_code=201, tags=["admin"])
    async def create_tenant_schema(
        body: TenantCreateRequest, principal: Authenticated
    ) -> dict[str, Any]:
        """Create a tenant: its schema from migrations, its role, and its RLS-guarded rows."""
        await require(principal, Scope.ADMIN, "tenant.create", body.tenant_id)
        defaults = core.tenants.default_limits
        limits = TenantLimits(
            body.connection_limit or defaults.connection_limit,
            body.statement_timeout_ms or defaults.statement_timeout_ms,
        )
        record = await core.tenants.create(body.tenant_id, limits)
        await audit_ok(principal, "tenant.create", record.tenant_id)
        return record.public_dict()

    @api.get("/api/v1/admin/tenants", tags=["admin"])
    async def list_tenants(principal: Authenticated) -> dict[str, Any]:
        await require(principal, Scope.ADMIN, "tenant.list")
        records = await core.registry.list()
        visible = [r for r in records if principal.can_act_for(r.tenant_id)]
        return {"tenants": [r.public_dict() for r in visible]}

    @api.get("/api/v1/admin/tenants/{tenant_id}", tags=["admin"])
    async def get_tenant(tenant_id: str, principal: Authenticated) -> dict[str, Any]:
        await require(principal, Scope.ADMIN, "tenant.get", tenant_id)
        return (await core.registry.get(tenant_id)).public_dict()

    async def change_status(principal: Principal, tenant_id: str, action: str) -> dict[str, Any]:
        await require(principal, Scope.ADMIN, f"tenant.{action}", tenant_id)
        change = core.tenants.suspend if action == "suspend" else core.tenants.resume
        record = await change(validate_tenant_id(tenant_id))
        await audit_ok(principal, f"tenant.{action}", tenant_id)
        return record.public_dict()

    @api.post("/api/v1/admin/tenants/{tenant_id}/suspend", tags=["admin"])
    async def suspend_tenant(tenant_id: str, principal: Authenticated) -> dict[str, Any]:
        """Refuse the tenant's logins, end its sessions and close its pool; data is kept."""
        return await change_status(principal, tenant_id, "suspend")

    @api.post("/api/v1/admin/tenants/{tenant_id}/resume", tags=["admin"])
    async def resume_tenant(tenant_id: str, principal: Authenticated) -> dict[str, Any]:
        return await change_status(principal, tenant_id, "resume")

    @api.delete("/api/v1/admin/tenants/{tenant_id}", tags=["admin"])
    async def delete_tenant(
        tenant_id: str, principal: Authenticated, confirm: bool = Query(default=False)
    ) -> dict[str, Any]:
        """Drop the tenant's schema, role and shared-table rows; needs ``?confirm=true``."""
        await require(principal, Scope.ADMIN, "tenant.delete", tenant_id)
        await core.tenants.delete(validate_tenant_id(tenant_id), confirm=confirm)
        await audit_ok(principal, "tenant.delete", tenant_id)
        return {"tenant_id": tenant_id, "deleted": True}

    @api.post("/api/v1/admin/migration", tags=["admin"])
    async def migrate(body: MigrationRequest, principal: Authenticated) -> JSONResponse:
        """Apply pending migrations to the control plane and every (or the named) tenant.
        200 when every tenant succeeded, 207 when some failed (see ``tenants[].error``).
        Every tenant (or none: the control plane only) needs the platform administrator; named
        tenants need admin over each, and the report names only them."""
        tenant_ids = list(dict.fromkeys(body.tenant_ids)) if body.tenant_ids else None
        if tenant_ids is None:
            await require_platform(principal, "migrate")
        else:
            for tenant_id in tenant_ids:
                await require(principal, Scope.ADMIN, "migrate", validate_tenant_id(tenant_id))
            for tenant_id in tenant_ids:
                await core.registry.get(tenant_id)
        async with core.owner_pool.acquire() as conn:
            report = await core.migrator.migrate(
                conn, tenant_ids=tenant_ids if tenant_ids is not None else body.tenant_ids
            )
        for result in report.tenants:
            core.registry.invalidate(result.tenant_id)
        audited: list[str | None] = list(tenant_ids) if tenant_ids is not None else [None]
        for audited_tenant in audited:
            await audit_ok(principal, "migrate", audited_tenant)
        return JSONResponse(report.to_dict(), status_code=207 if report.failed else 200)

    # --- service identities and tokens ---------------------------------------------------

    @api.post("/api/v1/admin/services", status_code=201, tags=["auth"])
    async def create_service(
        body: ServiceCreateRequest, principal: Authenticated
    ) -> dict[str, Any]:
        """Register a service identity; its client secret is returned once. A service gets only
        tenants and scopes its creator holds (``*`` only from the platform administrator)."""
        await require(principal, Scope.ADMIN, "service.create")
        try:
            scopes = parse_scopes(body.scopes)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not principal.covers(body.tenants, scopes):
            await deny(
                principal,
                None,
                "service.create",
                PermissionDenied("a service can be granted only tenants and scopes you hold"),
            )
        identity, secret = await core.services.register(
            body.service, tenants=body.tenants, scopes=scopes, with_secret=body.with_secret
        )
        await audit_ok(principal, "service.create")
        return {**identity.public_dict(), "secret": secret}

    @api.get("/api/v1/admin/services", tags=["auth"])
    async def list_services(principal: Authenticated) -> dict[str, Any]:
        """Services whose tenants are all within the caller's (every service for the platform)."""
        await require(principal, Scope.ADMIN, "service.list")
        visible = [s for s in await core.services.list() if principal.covers(s.tenants)]
        return {"services": [s.public_dict() for s in visible]}

    @api.post("/api/v1/auth/token", response_model=TokenResponse, tags=["auth"])
    async def token(body: TokenRequest, request: Request) -> TokenResponse:
        """Client-credentials exchange: a service's name and secret for a signed token."""
        try:
            identity = await core.services.check_secret(body.service, body.secret)
        except Unauthenticated as exc:
            await _audit_denial(None, None, "auth.token", exc)
            raise
        ttl = body.ttl_seconds or settings.token_default_ttl_seconds
        issued = core.tokens.issue(
            identity.name, tenants=identity.tenants, scopes=identity.scopes, ttl_seconds=ttl
        )
        return TokenResponse(access_token=issued, expires_in=ttl)

    @api.post("/api/v1/admin/tokens", response_model=TokenResponse, tags=["auth"])
    async def admin_token(body: AdminTokenRequest, principal: Authenticated) -> TokenResponse:
        """Issue a token for a registered service (like ``database-service token issue``).

        Only for a service whose tenants and scopes are within the caller's, and only with
        tenants and scopes both the caller and the service hold. Another tenant's service gets
        the same answer as a service that does not exist."""
        action = "token.issue"
        await require(principal, Scope.ADMIN, action)
        identity = await core.services.find(body.service)
        if identity is None or not principal.covers(identity.tenants):
            await deny(
                principal, None, action, NotFound(f"service {body.service!r} does not exist")
            )
        if not principal.covers(identity.tenants, identity.scopes):
            await deny(
                principal,
                None,
                action,
                PermissionDenied(
                    f"service {identity.name!r} holds scopes you do not hold: only the platform"
                    " administrator can issue its tokens"
                ),
            )
        try:
            scopes = parse_scopes(body.scopes) if body.scopes is not None else identity.scopes
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        tenants = frozenset(body.tenants) if body.tenants is not None else identity.tenants
        if not tenants:
            raise InvalidRequest("a token needs at least one tenant")
        for tenant_id in tenants - {ALL_TENANTS}:
            validate_tenant_id(tenant_id)
        if not (principal.covers(tenants, scopes) and identity.principal().covers(tenants, scopes)):
            await deny(
                principal,
                None,
                action,
                PermissionDenied(
                    "a token can carry only tenants and scopes both you and the service hold"
                ),
            )
        ttl = body.ttl_seconds or settings.token_default_ttl_seconds
        issued = core.tokens.issue(identity.name, tenants=tenants, scopes=scopes, ttl_seconds=ttl)
        await audit_ok(principal, action)
        return TokenResponse(access_token=issued, expires_in=ttl)

    @api.get("/api/v1/admin/audit", tags=["admin"])
    async def audit_log(
        principal: Authenticated,
        tenant_id: str | None = None,
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """The most recent audit events: of one tenant (admin over it), or of every tenant and
        of the service itself (the platform administrator)."""
        if tenant_id is None:
            await require_platform(principal, "audit.read")
        else:
            await require(principal, Scope.ADMIN, "audit.read", validate_tenant_id(tenant_id))
        await core.audit.flush()
        rows = await core.owner_pool.fetch(
            f'SELECT * FROM "{settings.control_schema}".audit_log'
            " WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY id DESC LIMIT $2",
            tenant_id,
            limit,
        )
        return {"events": [{k: encode_value(v) for k, v in r.items()} for r in rows]}

    # --- health and metrics --------------------------------------------------------------

    def sees_everything(principal: Principal | None) -> bool:
        return principal is not None and principal.is_platform_with(Scope.METRICS, Scope.ADMIN)

    @api.get("/api/v1/health", tags=["health"])
    async def health(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> JSONResponse:
        """Status, version and each dependency's status for anyone; the full document (figures,
        tenant counts, isolation details) for a platform principal holding metrics or admin.
        503 when unhealthy."""
        principal: Principal | None = None
        if authorization is not None:
            try:
                principal = await authenticated(request, authorization)
            except Unavailable:
                principal = None  # PostgreSQL is down: answer what anyone may see (a 503)
        document = await core.health.document(detailed=sees_everything(principal))
        status = 503 if document["status"] == "unhealthy" else 200
        return JSONResponse(document, status_code=status)

    @api.get("/metrics", tags=["health"], response_class=Response)
    async def metrics(principal: Authenticated) -> Response:
        """Prometheus text; needs a platform principal (tenants ``*``) holding metrics or admin:
        scrape with ``authorization: {credentials: <token>}``."""
        await require_platform(principal, "metrics", Scope.METRICS, Scope.ADMIN)
        return Response(core.metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/api/v1/metrics/performance", tags=["health"])
    async def performance(
        request: Request,
        principal: Authenticated,
        x_tenant_id: Annotated[str | None, Header()] = None,
    ) -> dict[str, Any]:
        """Request figures of the last minute and the pools. A platform principal holding
        metrics or admin sees the service's; anyone else sees the tenant named by X-Tenant-Id
        (required), which it must be allowed to act for, and nothing of other tenants."""
        if sees_everything(principal):
            return performance_document(core.window, core.pools, audit=core.audit)
        if x_tenant_id is None:
            raise InvalidRequest("the X-Tenant-Id header is required: figures are per tenant")
        tenant_id = validate_tenant_id(x_tenant_id)
        if not principal.can_act_for(tenant_id):
            await deny(
                principal,
                tenant_id,
                "metrics.performance",
                PermissionDenied(
                    f"service {principal.service!r} may not act for tenant {tenant_id!r}"
                ),
            )
        acting_for(request, principal, tenant_id)
        return performance_document(core.window, core.pools, tenant_id=tenant_id)

    api.add_middleware(InternalErrors, on_error=internal_error)
    api.add_middleware(RequestMetrics, metrics=core.metrics, window=core.window)
    api.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    return api
