"""Per-tenant export and restore as background jobs (``application.tenant_backups`` decides who
may): start an export, follow it, download its file; upload a file to restore.

The upload is streamed to a private file under the backup directory, not buffered (the body
limit of other routes does not apply; ``DBSVC_TENANT_RESTORE_MAX_BYTES`` does), and verified
(checksums, signature) before the job starts: a damaged file is a 400 ``backup_corrupt`` at once.
"""

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from database_service.api.http.deps import Authenticated, Core

router = APIRouter(tags=["admin"])


@router.post("/api/v1/admin/tenants/{tenant_id}/export", status_code=202)
async def start_export(tenant_id: str, core: Core, principal: Authenticated) -> dict[str, Any]:
    """Export the tenant (as its own role) to a signed file; needs ``admin`` and ``read`` for it.
    Answers the job at once: follow it at ``exports/{job_id}``, then download ``…/file``."""
    return await core.tenant_backups.start_export(principal, tenant_id)


@router.get("/api/v1/admin/tenants/{tenant_id}/exports/{job_id}")
async def export_job(
    tenant_id: str, job_id: str, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """The job's state (``running``, ``done``, ``failed`` with its error) and progress (rows and
    bytes done of the total)."""
    return await core.tenant_backups.job(principal, tenant_id, job_id, "export")


@router.get("/api/v1/admin/tenants/{tenant_id}/exports/{job_id}/file")
async def export_file(
    tenant_id: str, job_id: str, core: Core, principal: Authenticated
) -> FileResponse:
    path = await core.tenant_backups.export_file(principal, tenant_id, job_id)
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{tenant_id}-{job_id}.dbsvc-backup",
    )


@router.delete("/api/v1/admin/tenants/{tenant_id}/exports/{job_id}")
async def delete_export(
    tenant_id: str, job_id: str, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Remove the export's file (exports are kept until then)."""
    await core.tenant_backups.delete_export(principal, tenant_id, job_id)
    return {"id": job_id, "deleted": True}


@router.post("/api/v1/admin/tenants/{tenant_id}/restore", status_code=202)
async def start_restore(
    tenant_id: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    from_tenant: str | None = Query(
        default=None,
        description="the file's tenant, when it is not this one: its rows are re-keyed to this"
        " tenant (platform administrator only)",
    ),
    replace: bool = Query(default=False, description="replace what the tenant holds"),
) -> dict[str, Any]:
    """Restore an uploaded export (the request body, ``application/octet-stream``) into the
    tenant, created if it does not exist; needs ``admin`` and ``write`` for it. Follow the job
    at ``restores/{job_id}``."""
    return await core.tenant_backups.start_restore(
        principal,
        tenant_id,
        request.stream(),
        from_tenant=from_tenant,
        replace=replace,
        max_bytes=core.settings.tenant_restore_max_bytes,
    )


@router.get("/api/v1/admin/tenants/{tenant_id}/restores/{job_id}")
async def restore_job(
    tenant_id: str, job_id: str, core: Core, principal: Authenticated
) -> dict[str, Any]:
    return await core.tenant_backups.job(principal, tenant_id, job_id, "restore")
