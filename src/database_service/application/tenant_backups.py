"""Per-tenant export and restore (``backup.tenant``): who may, and the background jobs REST runs
them as.

Who may:

- **export** a tenant: ``admin`` *and* ``read`` for that tenant. A tenant's own administrating
  service (holding both) may export its own tenant: the file holds nothing its ``read`` scope
  does not already show it. The bootstrap token, which never reads tenant data, may not.
- **restore** a file into the tenant it was exported from: ``admin`` and ``write`` for it.
- **restore into another tenant id** (rows re-keyed to it): the platform administrator only,
  explicitly (``into``). A tenant cannot move its data into, or over, another tenant: the file's
  tenant id is covered by its signature, and the target needs its own rights.

Jobs (REST) run in the process that accepted them; their state is a small JSON file under the
backup directory, so any serving process can answer for it. A job of a tenant the caller may not
administer is answered like one that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.backup.archive import private_file
from database_service.backup.tenant import (
    BackupProgress,
    ProgressCallback,
    RestoreReport,
    TenantBackups,
)
from database_service.errors import (
    DatabaseServiceError,
    FailedPrecondition,
    InvalidParameters,
    NotFound,
    PayloadTooLarge,
    ResourceExhausted,
)
from database_service.tenancy import validate_tenant_id

__all__ = ["TenantBackupAdmin"]

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[0-9a-f]{16}")
SUFFIX = ".dbsvc-backup"
# Each export file is a copy of the tenant's whole data on the service's disk, shared by every
# tenant (and, embedded, by PostgreSQL): a tenant keeps at most this many, and runs one export
# and one restore at a time in every process sharing the backup directory (a lock file per
# tenant and kind), so its administrator cannot fill the disk or the tenant's connections with
# jobs.
MAX_KEPT_EXPORTS = 5


class TenantBackupAdmin:
    def __init__(self, access: Access, backups: TenantBackups) -> None:
        self._access = access
        self._backups = backups
        self._dir = backups.directory
        self._tasks: set[asyncio.Task[None]] = set()
        # (kind, tenant) of this process's jobs -> the open lock file that claims it for every
        # process sharing the directory (the kernel releases it if the process dies)
        self._running: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------ authorization

    async def _may_export(self, principal: Principal, tenant_id: str) -> None:
        await self._access.require(principal, Scope.ADMIN, "tenant.export", tenant_id)
        await self._access.require(principal, Scope.READ, "tenant.export", tenant_id)

    async def _may_restore(self, principal: Principal, source: str, target: str) -> None:
        if target != source:
            await self._access.require_platform(principal, "tenant.restore", tenant_id=target)
        await self._access.require(principal, Scope.ADMIN, "tenant.restore", target)
        await self._access.require(principal, Scope.WRITE, "tenant.restore", target)

    # ------------------------------------------------------------ direct (CLI)

    async def export(
        self,
        principal: Principal,
        tenant_id: str,
        path: Path,
        *,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        tenant_id = validate_tenant_id(tenant_id)
        await self._may_export(principal, tenant_id)
        manifest = await self._backups.export(tenant_id, path, progress=progress)
        await self._access.done(
            principal, "tenant.export", tenant_id, f"{manifest['totals']['rows']} rows"
        )
        return manifest

    async def restore(
        self,
        principal: Principal,
        path: Path,
        *,
        into: str | None = None,
        replace: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreReport:
        # Opened in a thread: the zip's directory and manifest are the caller's bytes.
        with await asyncio.to_thread(self._backups.open, path) as archive:  # signed tenant id
            source = archive.manifest["tenant_id"]
        target = validate_tenant_id(into) if into is not None else source
        await self._may_restore(principal, source, target)
        report = await self._backups.restore(path, into=into, replace=replace, progress=progress)
        await self._access.done(
            principal, "tenant.restore", target, f"from {source}: {report.rows} rows"
        )
        return report

    # ------------------------------------------------------------ jobs (REST)

    def _job_file(self, job_id: str) -> Path:
        return self._dir / "jobs" / f"{job_id}.json"

    def _write_job(self, job: dict[str, Any]) -> None:
        path = self._job_file(job["id"])
        partial = path.with_name(path.name + ".partial")
        with private_file(partial) as handle:
            handle.write(json.dumps(job).encode())
        os.replace(partial, path)

    def _read_job(self, job_id: str) -> dict[str, Any] | None:
        if not _JOB_ID.fullmatch(job_id):
            return None
        try:
            job: dict[str, Any] = json.loads(self._job_file(job_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        return job

    def _claim(self, kind: str, tenant_id: str) -> None:
        """One job of a kind at a time per tenant, in every serving process (workers share the
        backup directory): an exclusive lock on ``locks/<kind>-<tenant>.lock``, held while the
        job runs, released when it ends (``_release``) or its process dies."""
        busy = ResourceExhausted(
            f"a {kind} of tenant {tenant_id!r} is already running: wait for it to finish"
        )
        if (kind, tenant_id) in self._running:
            raise busy
        locks = self._dir / "locks"
        locks.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(locks / f"{kind}-{tenant_id}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise busy from None
        self._running[(kind, tenant_id)] = fd

    def _release(self, kind: str, tenant_id: str) -> None:
        fd = self._running.pop((kind, tenant_id), None)
        if fd is not None:
            os.close(fd)  # the lock goes with it

    def _kept_exports(self, tenant_id: str) -> list[str]:
        """The tenant's finished exports whose files are still kept (a small scan of job files,
        run in a thread)."""
        kept = []
        for path in (self._dir / "jobs").glob("*.json"):
            job = self._read_job(path.stem)
            if (
                job is not None
                and job["tenant_id"] == tenant_id
                and job["kind"] == "export"
                and job["state"] == "done"
                and (self._dir / "exports" / f"{job['id']}{SUFFIX}").exists()
            ):
                kept.append(job["id"])
        return kept

    def _run(self, job: dict[str, Any], work: Any) -> None:
        """Run ``work(progress)`` in the background, keeping the job file up to date."""
        last = 0.0

        def progress(step: BackupProgress) -> None:
            nonlocal last
            job.update(
                phase=step.phase,
                rows_done=step.rows_done,
                rows_total=step.rows_total,
                bytes_done=step.bytes_done,
                bytes_total=step.bytes_total,
            )
            now = time.monotonic()
            if now - last >= 0.5:  # the file is for people and pollers, not every chunk
                last = now
                self._write_job(job)

        async def run() -> None:
            try:
                result = await work(progress)
                job.update(state="done", result=result)
            except DatabaseServiceError as exc:
                job.update(state="failed", error=exc.to_dict())
            except Exception as exc:
                log.exception("tenant backup job %s failed", job["id"])
                job.update(state="failed", error={"code": "internal", "message": str(exc)})
            finally:
                self._release(job["kind"], job["tenant_id"])
                job["finished_at"] = time.time()
                self._write_job(job)
                upload = job.get("upload")
                if upload:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(upload)  # a directory entry: no thread for it

        self._write_job(job)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _new_job(self, kind: str, principal: Principal, tenant_id: str) -> dict[str, Any]:
        return {
            "id": secrets.token_hex(8),
            "kind": kind,
            "tenant_id": tenant_id,
            "service": principal.service,
            "state": "running",
            "phase": "queued",
            "rows_done": 0,
            "rows_total": 0,
            "bytes_done": 0,
            "bytes_total": 0,
            "started_at": time.time(),
        }

    async def start_export(self, principal: Principal, tenant_id: str) -> dict[str, Any]:
        tenant_id = validate_tenant_id(tenant_id)
        await self._may_export(principal, tenant_id)
        kept = await asyncio.to_thread(self._kept_exports, tenant_id)
        if len(kept) >= MAX_KEPT_EXPORTS:
            raise ResourceExhausted(
                f"tenant {tenant_id!r} keeps {len(kept)} exports, the most it may: delete one"
                " (DELETE …/exports/{job_id}) before exporting again"
            )
        self._claim("export", tenant_id)
        job = self._new_job("export", principal, tenant_id)
        path = self._dir / "exports" / f"{job['id']}{SUFFIX}"
        job["file"] = str(path)

        async def work(progress: ProgressCallback) -> dict[str, Any]:
            manifest = await self._backups.export(tenant_id, path, progress=progress)
            await self._access.done(
                principal, "tenant.export", tenant_id, f"{manifest['totals']['rows']} rows"
            )
            return {"rows": manifest["totals"]["rows"], "bytes": path.stat().st_size}

        self._run(job, work)
        return _public(job)

    async def job(
        self, principal: Principal, tenant_id: str, job_id: str, kind: str | None = None
    ) -> dict[str, Any]:
        """A job of ``tenant_id``: the same answer for a job of another tenant as for none."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.backup_job", tenant_id)
        job = self._read_job(job_id)
        if job is None or job["tenant_id"] != tenant_id or kind not in (None, job["kind"]):
            await self._access.deny(
                principal,
                tenant_id,
                "tenant.backup_job",
                NotFound(f"no backup job {job_id!r} for tenant {tenant_id!r}"),
            )
        return _public(job)

    async def export_file(self, principal: Principal, tenant_id: str, job_id: str) -> Path:
        """The finished export's file, for its download."""
        job = await self.job(principal, tenant_id, job_id, "export")
        await self._may_export(principal, tenant_id)
        if job["kind"] != "export" or job["state"] != "done":
            raise NotFound(f"backup job {job_id!r} has no finished export (state {job['state']})")
        path = self._dir / "exports" / f"{job_id}{SUFFIX}"
        if not path.exists():
            raise NotFound(f"the file of backup job {job_id!r} is gone")
        await self._access.done(principal, "tenant.export.download", tenant_id, job_id)
        return path

    async def delete_export(self, principal: Principal, tenant_id: str, job_id: str) -> None:
        """Remove a finished export's file (it holds the tenant's whole data)."""
        job = await self.job(principal, tenant_id, job_id, "export")
        await self._may_export(principal, tenant_id)
        if job["state"] == "running":
            raise FailedPrecondition(f"backup job {job_id!r} is still running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dir / "exports" / f"{job_id}{SUFFIX}")
        full = self._read_job(job_id) or job
        self._write_job({**full, "state": "deleted"})
        await self._access.done(principal, "tenant.export.delete", tenant_id, job_id)

    async def start_restore(
        self,
        principal: Principal,
        tenant_id: str,
        body: AsyncIterator[bytes],
        *,
        from_tenant: str | None = None,
        replace: bool = False,
        max_bytes: int,
    ) -> dict[str, Any]:
        """Restore an uploaded file into ``tenant_id``. A file of another tenant is restored
        only when ``from_tenant`` names it (the explicit re-keying, platform only)."""
        tenant_id = validate_tenant_id(tenant_id)
        # Refused before a byte is stored when the caller could not restore into the target.
        await self._access.require(principal, Scope.ADMIN, "tenant.restore", tenant_id)
        await self._access.require(principal, Scope.WRITE, "tenant.restore", tenant_id)
        self._claim("restore", tenant_id)  # before a byte of the upload is stored
        job = self._new_job("restore", principal, tenant_id)
        upload = self._dir / "uploads" / f"{job['id']}{SUFFIX}"
        size = 0
        try:
            with private_file(upload) as handle:
                async for chunk in body:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(
                            f"the upload is over {max_bytes} bytes (DBSVC_TENANT_RESTORE_MAX_BYTES)"
                        )
                    handle.write(chunk)
            # Opened (directory, manifest) and hashed in a thread: an uploaded file is any
            # bytes a tenant administrator chose, and parsing a zip of many entries took the
            # event loop for every tenant.
            with await asyncio.to_thread(self._backups.open, upload) as archive:
                # A damaged file is refused now, not in the job.
                await asyncio.to_thread(archive.verify)
                source = archive.manifest["tenant_id"]
            if source not in (tenant_id, from_tenant):
                raise InvalidParameters(
                    f"the file is an export of tenant {source!r}, not {tenant_id!r}: to restore"
                    f" it into {tenant_id!r} (rows re-keyed), pass from_tenant={source!r}"
                    " (platform administrator only)"
                )
            await self._may_restore(principal, source, tenant_id)
        except BaseException:
            self._release("restore", tenant_id)
            with contextlib.suppress(FileNotFoundError):
                upload.unlink()
            raise
        job["upload"] = str(upload)
        into = tenant_id if tenant_id != source else None

        async def work(progress: ProgressCallback) -> dict[str, Any]:
            report = await self._backups.restore(
                upload, into=into, replace=replace, progress=progress
            )
            await self._access.done(
                principal, "tenant.restore", tenant_id, f"from {source}: {report.rows} rows"
            )
            return report.to_dict()

        self._run(job, work)
        return _public(job)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    """What a caller sees of a job (no paths)."""
    return {k: v for k, v in job.items() if k not in ("file", "upload")}
