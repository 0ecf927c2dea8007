"""Tenant administration: create, list, read, suspend, resume, delete, migrate."""

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from database_service.api.http.deps import Authenticated, Core
from database_service.api.http.schemas import (
    CacheRulesRequest,
    MigrationRequest,
    TenantCreateRequest,
)

router = APIRouter(tags=["admin"])


@router.post("/api/v1/admin/schema/create", status_code=201)
async def create_tenant_schema(
    body: TenantCreateRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Create a tenant: its schema from migrations, its roles, and its RLS-guarded rows."""
    record = await core.tenant_admin.create(
        principal,
        body.tenant_id,
        connection_limit=body.connection_limit,
        statement_timeout_ms=body.statement_timeout_ms,
    )
    return record.public_dict()


@router.get("/api/v1/admin/tenants")
async def list_tenants(core: Core, principal: Authenticated) -> dict[str, Any]:
    return {"tenants": [r.public_dict() for r in await core.tenant_admin.list(principal)]}


@router.get("/api/v1/admin/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    return (await core.tenant_admin.get(principal, tenant_id)).public_dict()


@router.get("/api/v1/admin/tenants/{tenant_id}/cache-rules")
async def get_cache_rules(tenant_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    """The tenant's result cache rules: table name -> TTL (ms)."""
    return {"rules": await core.tenant_admin.cache_rules(principal, tenant_id)}


@router.put("/api/v1/admin/tenants/{tenant_id}/cache-rules")
async def set_cache_rules(
    tenant_id: str, body: CacheRulesRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Replace the tenant's result cache rules, e.g. ``{"rules": {"positions": 2000}}``: a read
    of only ruled tables is cached for the smallest of their TTLs without the caller asking
    (it still has to be safe to cache)."""
    rules = await core.tenant_admin.set_cache_rules(
        principal, tenant_id, body.rules, max_ttl_ms=core.settings.cache_max_ttl_ms
    )
    return {"rules": rules}


@router.post("/api/v1/admin/tenants/{tenant_id}/suspend")
async def suspend_tenant(tenant_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    """Refuse the tenant's logins, end its sessions and close its pools; data is kept."""
    return (await core.tenant_admin.suspend(principal, tenant_id)).public_dict()


@router.post("/api/v1/admin/tenants/{tenant_id}/resume")
async def resume_tenant(tenant_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    return (await core.tenant_admin.resume(principal, tenant_id)).public_dict()


@router.delete("/api/v1/admin/tenants/{tenant_id}")
async def delete_tenant(
    tenant_id: str, core: Core, principal: Authenticated, confirm: bool = Query(default=False)
) -> dict[str, Any]:
    """Drop the tenant's schema, roles and shared-table rows; needs ``?confirm=true``."""
    await core.tenant_admin.delete(principal, tenant_id, confirm=confirm)
    return {"tenant_id": tenant_id, "deleted": True}


@router.post("/api/v1/admin/migration")
async def migrate(body: MigrationRequest, core: Core, principal: Authenticated) -> JSONResponse:
    """Apply pending migrations to the control plane and every (or the named) tenant.
    200 when every tenant succeeded, 207 when some failed (see ``tenants[].error``). Every
    tenant needs the platform administrator; named tenants need admin over each."""
    report = await core.tenant_admin.migrate(principal, body.tenant_ids)
    return JSONResponse(report.to_dict(), status_code=207 if report.failed else 200)
