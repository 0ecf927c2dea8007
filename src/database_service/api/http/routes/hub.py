"""The Central Hub's endpoint of ours (it pushes tenant configuration updates) and the hub's
state for administrators (``hub.contract`` is the contract)."""

from typing import Any

from fastapi import APIRouter, Request

from database_service.api.http.deps import Authenticated, Core
from database_service.errors import InvalidRequest

router = APIRouter(tags=["central-hub"])


@router.post("/api/v1/hub/tenant-config")
async def tenant_config(request: Request, core: Core, principal: Authenticated) -> dict[str, Any]:
    """``{"updates": [{"tenant_id", "version", "limits"?, "status"?, "cache_rules"?}, …]}`` (or
    one update): each applied atomically, once per version; a platform administrator only."""
    try:
        payload = await request.json()
    except (ValueError, RecursionError):  # nested past the reader's recursion limit too
        raise InvalidRequest("the body must be JSON (nested at most a few hundred deep)") from None
    return await core.hub_admin.receive(principal, payload)


@router.get("/api/v1/hub")
async def hub_status(core: Core, principal: Authenticated) -> dict[str, Any]:
    """Registration and heartbeat state, and the configuration versions applied per tenant."""
    return await core.hub_admin.describe(principal)
