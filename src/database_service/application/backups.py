"""Cluster backups (``backup.cluster``) for the platform administrator: take one now (a job with
progress), list, verify, restore to a moment into a new directory; and the schedule.

A base backup holds every tenant's rows: every operation here is the platform administrator's,
audited. A restore never touches the running cluster: it prepares a new data directory on this
machine, which an operator then starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import re
from typing import Any

from database_service.application.access import Access
from database_service.auth import Principal
from database_service.backup.cluster import BackupInfo, ClusterBackups, RestorePlan, WalReceiver
from database_service.errors import Conflict, FailedPrecondition, InvalidParameters

__all__ = ["ClusterBackupAdmin"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class ClusterBackupAdmin:
    def __init__(
        self,
        access: Access,
        backups: ClusterBackups | None,
        receiver: WalReceiver | None = None,
        *,
        interval_hours: float = 24.0,
        keep: int = 7,
    ) -> None:
        self._access = access
        self._backups = backups
        self.receiver = receiver
        self._interval_s = interval_hours * 3600
        self._keep = keep
        self._job: asyncio.Task[BackupInfo] | None = None
        self._running: BackupInfo | None = None

    def _enabled(self) -> ClusterBackups:
        if self._backups is None:
            raise FailedPrecondition(
                "cluster backups are off: set DBSVC_BACKUP_DIR (the serving instance then"
                " archives WAL there and takes scheduled base backups)"
            )
        return self._backups

    def status(self) -> dict[str, Any]:
        """For health: off, or the archive's state and the newest backup."""
        if self._backups is None:
            return {"status": "not_configured"}
        backups = self._backups.list_backups()
        done = [b for b in backups if b.state == "done"]
        newest = done[-1] if done else None
        return {
            "status": "ok" if newest is not None and newest.verified else "no_verified_backup",
            "directory": str(self._backups.root),
            "backups": len(done),
            "newest": newest.json() if newest else None,
            "running": self._running.json() if self._running else None,
            "wal_archive": self.receiver.status() if self.receiver else {"state": "off"},
        }

    async def list(self, principal: Principal) -> list[BackupInfo]:
        await self._access.require_platform(principal, "backups.list")
        return self._enabled().list_backups()

    async def get(self, principal: Principal, backup_id: str) -> BackupInfo:
        await self._access.require_platform(principal, "backups.get")
        backups = self._enabled()
        running = self._running
        if running is not None and running.id == backup_id:
            return running  # with its live progress
        return backups.get(backup_id)

    async def start(self, principal: Principal) -> BackupInfo:
        """Start a base backup in the background: its record (poll ``get`` for progress)."""
        await self._access.require_platform(principal, "backups.create")
        info = self._begin(self._enabled())
        await self._access.done(principal, "backups.create", None, info.id)
        return info

    def _begin(self, backups: ClusterBackups) -> BackupInfo:
        if self._job is not None and not self._job.done():
            assert self._running is not None
            raise Conflict(f"backup {self._running.id} is still running")
        backup_id = backups.new_id()
        info = BackupInfo(id=backup_id, started_at=dt.datetime.now(dt.UTC).isoformat())
        self._running = info

        def progress(done: int, total: int) -> None:
            info.progress = {"done_bytes": done, "total_bytes": total}

        async def job() -> BackupInfo:
            try:
                return await backups.create(backup_id=backup_id, progress=progress)
            except Exception as exc:
                info.state, info.error = "failed", str(exc)[:1000]
                log.error("base backup %s failed: %s", backup_id, exc)
                raise
            finally:
                self._running = None

        self._job = asyncio.create_task(job(), name=f"backup-{backup_id}")
        self._job.add_done_callback(lambda t: t.cancelled() or t.exception())
        return info

    async def verify(self, principal: Principal, backup_id: str) -> BackupInfo:
        await self._access.require_platform(principal, "backups.verify")
        info = await self._enabled().verify(backup_id)
        await self._access.done(principal, "backups.verify", None, backup_id)
        return info

    async def restore(
        self,
        principal: Principal,
        into: str,
        *,
        target: dt.datetime | None = None,
        backup_id: str | None = None,
    ) -> RestorePlan:
        """Into ``<backup directory>/restores/<into>`` (a name: a caller over the network picks
        no path on this machine; the CLI may restore anywhere)."""
        await self._access.require_platform(principal, "backups.restore")
        if not _NAME.fullmatch(into) or into in (".", ".."):
            raise InvalidParameters("into: 1-100 letters, digits and _ . - (a directory name)")
        backups = self._enabled()
        directory = backups.root / "restores" / into
        plan = await backups.restore(directory, target=target, backup_id=backup_id)
        await self._access.done(
            principal, "backups.restore", None, f"{plan.backup_id} → {directory}"
        )
        return plan

    async def run_schedule(self) -> None:
        """Take a base backup when the newest is older than the interval, then prune to the
        newest ``keep`` (and the WAL they need). Checked every minute."""
        backups = self._enabled()
        while True:
            done = [b for b in backups.list_backups() if b.state == "done" and b.finished_at]
            newest = dt.datetime.fromisoformat(str(done[-1].finished_at)) if done else None
            age = (dt.datetime.now(dt.UTC) - newest).total_seconds() if newest else None
            due = self._interval_s > 0 and (age is None or age >= self._interval_s)
            if due and (self._job is None or self._job.done()):
                self._begin(backups)
                assert self._job is not None
                with contextlib.suppress(Exception):  # logged by the job; tried next round
                    await self._job
                pruned = backups.prune(self._keep)
                if pruned:
                    log.info("backups pruned: %s", ", ".join(pruned))
            await asyncio.sleep(60)
