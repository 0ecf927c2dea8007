"""Partitions of the shared time-series tables: the platform administrator's (their sizes
and row estimates describe every tenant's rows)."""

import datetime as dt
from typing import Any

from fastapi import APIRouter

from database_service.api.http.deps import Authenticated, Core, aware

router = APIRouter(tags=["admin"])


@router.get("/api/v1/admin/partitions")
async def list_partitions(
    core: Core, principal: Authenticated, table: str | None = None
) -> dict[str, Any]:
    infos = await core.partition_admin.list(principal, table)
    last = core.partition_admin.last_maintenance
    return {
        "partitions": [p.to_dict() for p in infos],
        "last_maintenance": last.isoformat() if last else None,
    }


@router.post("/api/v1/admin/partitions/maintain")
async def maintain_partitions(core: Core, principal: Authenticated) -> dict[str, Any]:
    """Create partitions ahead and apply retention now (skipped if another instance is)."""
    report = await core.partition_admin.maintain(principal)
    return report.to_dict() if report else {"skipped": True}


@router.post("/api/v1/admin/partitions/{table}/{name}/detach")
async def detach_partition(
    table: str, name: str, core: Core, principal: Authenticated
) -> dict[str, Any]:
    await core.partition_admin.detach(principal, table, name)
    return {"table": table, "partition": name, "attached": False}


@router.post("/api/v1/admin/partitions/{table}/{name}/attach")
async def attach_partition(
    table: str, name: str, start: dt.datetime, core: Core, principal: Authenticated
) -> dict[str, Any]:
    await core.partition_admin.attach(principal, table, name, aware(start))
    return {"table": table, "partition": name, "attached": True}
