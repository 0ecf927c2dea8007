"""``POST /api/v1/query``: one statement for a tenant, run as that tenant's role."""

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from database_service.api.http.deps import Authenticated, Core, tenant_context
from database_service.api.http.schemas import QueryRequest, QueryResponse
from database_service.query import encode_value

router = APIRouter(tags=["query"])


@router.post("/api/v1/query", response_model=QueryResponse)
async def query(
    body: QueryRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: Annotated[str | None, Header()] = None,
    x_user_id: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Run one SQL statement for a tenant, as that tenant's PostgreSQL role."""
    ctx = tenant_context(
        request, principal, body.tenant_id, body.user_id or x_user_id, header=x_tenant_id
    )
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
