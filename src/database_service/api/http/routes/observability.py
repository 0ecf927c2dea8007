"""Health, Prometheus metrics, performance figures and the audit trail."""

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from database_service.api.http.deps import Authenticated, Core, OptionalPrincipal, acting_for

router = APIRouter()


@router.get("/api/v1/health", tags=["health"])
@router.get("/health", tags=["health"])  # the seed's path
async def health(core: Core, principal: OptionalPrincipal) -> JSONResponse:
    """Status, version and each dependency's status for anyone; the full document (figures,
    tenant counts, isolation details) for a platform principal holding metrics or admin.
    503 when unhealthy."""
    document = await core.observability.health(principal)
    return JSONResponse(document, status_code=503 if document["status"] == "unhealthy" else 200)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(core: Core, principal: Authenticated) -> Response:
    """Prometheus text; needs a platform principal (tenants ``*``) holding metrics or admin:
    scrape with ``authorization: {credentials: <token>}``."""
    text = await core.observability.prometheus(principal)
    return Response(text, media_type="text/plain; version=0.0.4")


@router.get("/api/v1/metrics/performance", tags=["health"])
async def performance(
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
) -> dict[str, Any]:
    """Request figures of the last minute and the pools. A platform principal holding metrics
    or admin sees the service's; anyone else sees the tenant named by X-Tenant-Id (required),
    which it must be allowed to act for, and nothing of other tenants."""
    document = await core.observability.performance(principal, x_tenant_id)
    if "tenant_id" in document:
        acting_for(request, principal, document["tenant_id"])
    return document


@router.get("/api/v1/admin/pgwire", tags=["admin"])
async def pgwire_view(
    core: Core, principal: Authenticated, tenant_id: str | None = None
) -> dict[str, Any]:
    """The PostgreSQL wire port's pools, clients, servers and stats (PgBouncer's SHOW), of this
    worker: of one tenant (admin over it), or of every tenant (the platform administrator)."""
    return await core.observability.pgwire(principal, tenant_id)


@router.get("/api/v1/admin/audit", tags=["admin"])
async def audit_log(
    core: Core,
    principal: Authenticated,
    tenant_id: str | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
) -> dict[str, Any]:
    """The most recent audit events: of one tenant (admin over it), or of every tenant and of
    the service itself (the platform administrator)."""
    return {"events": await core.observability.audit_events(principal, tenant_id, limit)}
