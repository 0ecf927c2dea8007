"""Statement statistics and the slow-query log of a tenant.

The tenant is the ``X-Tenant-Id`` header or the ``tenant_id`` query parameter. A tenant's own
services read its figures; a platform principal holding ``metrics`` or ``admin`` reads any
tenant's; resets need ``admin`` over the tenant; the slow-query settings a platform
administrator (``statements.service`` says why)."""

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from database_service.api.http.deps import Authenticated, Core, acting_for
from database_service.auth import Principal
from database_service.errors import InvalidRequest

router = APIRouter(tags=["statements"])


class StatementSettingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slow_query_ms: float | None = Field(
        default=None,
        ge=0,
        le=86_400_000,
        description="The tenant's slow-query threshold in ms (null: DBSVC_SLOW_QUERY_MS)",
    )
    keep_parameters: bool | None = Field(
        default=None,
        description="Keep slow statements' parameters (null: DBSVC_SLOW_QUERY_KEEP_PARAMETERS)",
    )


def _tenant(request: Request, principal: Principal, header: str | None, query: str | None) -> str:
    tenant_id = header or query
    if tenant_id is None:
        raise InvalidRequest(
            "a tenant is required (the X-Tenant-Id header or tenant_id): figures are per tenant"
        )
    acting_for(request, principal, tenant_id)
    return tenant_id


@router.get("/api/v1/statements")
async def top_statements(
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
    tenant_id: str | None = None,
    limit: int = Query(default=20, ge=1, le=1000),
    order: str = Query(default="total_ms"),
) -> dict[str, Any]:
    """The tenant's statements by fingerprint, top ``limit`` by ``order`` (total_ms, calls,
    mean_ms, p99_ms, rows, errors), with pg_stat_statements' figures beside ours where
    PostgreSQL has the extension."""
    tenant = _tenant(request, principal, x_tenant_id, tenant_id)
    return await core.statement_admin.top(principal, tenant, limit=limit, order=order)


@router.post("/api/v1/statements/reset")
async def reset_statements(
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
    tenant_id: str | None = None,
) -> dict[str, Any]:
    """Forget the tenant's statement figures (admin over the tenant)."""
    tenant = _tenant(request, principal, x_tenant_id, tenant_id)
    return await core.statement_admin.reset(principal, tenant)


@router.get("/api/v1/slow-queries")
async def slow_queries(
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
    tenant_id: str | None = None,
    limit: int = Query(default=50, ge=1, le=1000),
    fingerprint: str | None = Query(default=None, max_length=64),
) -> dict[str, Any]:
    """The tenant's slow statements, newest first, with their plans."""
    tenant = _tenant(request, principal, x_tenant_id, tenant_id)
    return await core.statement_admin.slow_queries(
        principal, tenant, limit=limit, fingerprint=fingerprint
    )


@router.delete("/api/v1/slow-queries")
async def clear_slow_queries(
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
    tenant_id: str | None = None,
) -> dict[str, Any]:
    """Empty the tenant's slow-query log (admin over the tenant)."""
    tenant = _tenant(request, principal, x_tenant_id, tenant_id)
    return await core.statement_admin.clear_slow_queries(principal, tenant)


@router.get("/api/v1/admin/tenants/{tenant_id}/statement-settings", tags=["admin"])
async def statement_settings(
    tenant_id: str, core: Core, principal: Authenticated
) -> dict[str, Any]:
    return await core.statement_admin.settings(principal, tenant_id)


@router.put("/api/v1/admin/tenants/{tenant_id}/statement-settings", tags=["admin"])
async def set_statement_settings(
    tenant_id: str, body: StatementSettingsRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Override the tenant's slow-query threshold and parameter keeping (a platform
    administrator), e.g. ``{"slow_query_ms": 250}``; a field sent as null goes back to the
    service's default, a field not sent stays as it is."""
    # Only the fields sent change: ``{"keep_parameters": true}`` keeps the threshold.
    changes = body.model_dump(include=body.model_fields_set)
    return await core.statement_admin.set_settings(principal, tenant_id, changes)


class CreateIndexRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: str = Field(max_length=63, description="A table of the tenant's own schema")
    columns: list[str] = Field(min_length=1, max_length=8, description="Its columns, in order")


@router.get("/api/v1/index-advice")
async def index_advice(
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
    tenant_id: str | None = None,
) -> dict[str, Any]:
    """Indexes that would serve the tenant's slow statements, each with the expected gain
    from a hypothetical index where PostgreSQL has hypopg. Advice never creates anything."""
    tenant = _tenant(request, principal, x_tenant_id, tenant_id)
    return await core.statement_admin.index_advice(principal, tenant)


@router.post("/api/v1/admin/tenants/{tenant_id}/indexes", tags=["admin"], status_code=202)
async def create_index(
    tenant_id: str, body: CreateIndexRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Build an index on one of the tenant's tables with ``CREATE INDEX CONCURRENTLY`` (an
    administrator over the tenant); follow it at ``…/indexes/{index}``."""
    return await core.statement_admin.create_index(principal, tenant_id, body.table, body.columns)


@router.get("/api/v1/admin/tenants/{tenant_id}/indexes/{index}", tags=["admin"])
async def index_status(
    tenant_id: str, index: str, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """An index of the tenant's: building (with PostgreSQL's progress), ready or invalid."""
    return await core.statement_admin.index_status(principal, tenant_id, index)
