"""Cluster backups (the seed's ``POST /api/v1/maintenance/backup``): the platform
administrator's. A backup runs in the background; its record shows its progress."""

import datetime as dt
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from database_service.api.http.deps import Authenticated, Core, aware

router = APIRouter(tags=["admin"])


class RestoreRequest(BaseModel):
    into: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,100}$",
        description="a name: the cluster is restored into <backup directory>/restores/<name>"
        " (new or empty) on the service's machine",
    )
    to: dt.datetime | None = Field(
        default=None, description="the moment to recover to (default: as late as the WAL goes)"
    )
    backup_id: str | None = Field(default=None, description="default: the newest that fits")


@router.post("/api/v1/maintenance/backup", status_code=202)
async def start_backup(core: Core, principal: Authenticated) -> dict[str, Any]:
    """Take a base backup now (verified when it is done): poll its status for progress."""
    info = await core.backup_admin.start(principal)
    return {"backup": info.json(), "status": f"/api/v1/maintenance/backups/{info.id}"}


@router.get("/api/v1/maintenance/backups")
async def list_backups(core: Core, principal: Authenticated) -> dict[str, Any]:
    backups = await core.backup_admin.list(principal)
    return {"backups": [b.json() for b in backups], "archive": core.backup_admin.status()}


@router.get("/api/v1/maintenance/backups/{backup_id}")
async def backup_status(backup_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    return (await core.backup_admin.get(principal, backup_id)).json()


@router.post("/api/v1/maintenance/backups/{backup_id}/verify")
async def verify_backup(backup_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    """Check every file against the backup's manifest and its WAL: 409 ``backup_invalid``
    when they do not match."""
    return (await core.backup_admin.verify(principal, backup_id)).json()


@router.post("/api/v1/maintenance/restore")
async def restore_backup(
    request: RestoreRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """A new data directory, recovered to ``to`` when started: the running cluster is not
    touched."""
    target = aware(request.to) if request.to is not None else None
    plan = await core.backup_admin.restore(
        principal, request.into, target=target, backup_id=request.backup_id
    )
    return plan.json()
