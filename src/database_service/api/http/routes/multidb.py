"""``POST /api/v1/multi-db``: one operation across the stores for the caller's tenant (the
seed's ``execute_multi_db_operation``), and the administration of its outbox:
``GET /api/v1/multi-db/outbox`` (a tenant's entries; ``status`` pending, applied or failed) and
``POST /api/v1/multi-db/outbox/retry`` (failed entries pending again, and tried now) — a
platform administrator or the tenant's administrator.

The tenant is the X-Tenant-Id header or ``tenant_id`` in the body (both must agree when both are
given). Semantics and part shapes: ``application.multidb`` and ``multidb.parts``."""

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from database_service.api.http.answers import json_answer
from database_service.api.http.deps import Authenticated, Core, tenant_context

router = APIRouter(tags=["multi-db"])

TenantHeader = Annotated[str | None, Header(alias="x-tenant-id")]


class MultiDbBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operation: dict[str, Any] = Field(
        description='Store name → part: {"postgresql": {"query", "params"}, "dragonflydb": {...},'
        ' "clickhouse": {...}, "vector": {...}, "graph": {...}}'
    )
    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")


class RetryBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")
    ids: list[StrictInt] | None = Field(default=None, description="Absent: every failed entry")


@router.post("/api/v1/multi-db")
async def execute(
    body: MultiDbBody,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> Response:
    """The PostgreSQL part in one transaction with the outbox entries of the other stores'
    writes; those applied after the commit; reads directly. Per part: ``applied``, ``pending``
    or ``failed`` (with ``reason``)."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    answer = await core.multidb.execute(principal, ctx, body.operation)
    return json_answer(answer)


@router.get("/api/v1/multi-db/outbox")
async def outbox_entries(
    request: Request,
    core: Core,
    principal: Authenticated,
    tenant_id: Annotated[str | None, Query()] = None,
    status: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query()] = 100,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, tenant_id, header=x_tenant_id)
    entries = await core.multidb.entries(principal, ctx.tenant_id, status=status, limit=limit)
    return {"tenant_id": ctx.tenant_id, "entries": entries}


@router.post("/api/v1/multi-db/outbox/retry")
async def outbox_retry(
    body: RetryBody,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    return await core.multidb.retry(principal, ctx.tenant_id, body.ids)
