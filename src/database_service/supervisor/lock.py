"""Who may use a data directory, and who may stop what runs on it.

- ``InstanceLock``: one *serving* instance per data directory. An exclusive ``flock`` on
  ``<data_dir>/instance.lock``, taken before anything starts and held for the life of the
  process (the kernel drops it when the process ends, however it ends); the file says which
  process holds it and where it listens, so a second ``serve`` can name the running one.
  Administrative commands do not take it: they share the embedded PostgreSQL with the server.
- ``UsageLock``: every process using the embedded PostgreSQL of a data directory holds a
  *shared* ``flock`` on ``<pgdata>.lock`` while it does. A process stops the server on exit only
  when it can then take the lock *exclusively* — no other process is using it — so nobody ever
  stops a PostgreSQL under another process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["AlreadyRunning", "InstanceLock", "UsageLock"]


class AlreadyRunning(RuntimeError):
    """Another process serves this data directory; the message names it."""

    def __init__(self, data_dir: Path, holder: dict[str, Any]) -> None:
        self.data_dir = data_dir
        self.holder = holder
        pid = holder.get("pid")
        who = f"PID {pid}" if pid else "another process"
        endpoints = holder.get("endpoints") or {}
        where = ", ".join(f"{name} {value}" for name, value in endpoints.items() if value)
        state = holder.get("state")
        message = (
            f"Database Service is already running on data directory {data_dir} ({who}"
            + (f", {state}" if state and state != "running" else "")
            + (f", since {holder['started_at']}" if holder.get("started_at") else "")
            + ")"
            + (f": {where}" if where else "")
            + ". Use that instance, stop it first"
            + (f" (kill -TERM {pid})" if pid else "")
            + ", or give this one another DBSVC_DATA_DIR."
        )
        super().__init__(message)


class InstanceLock:
    """``lock = InstanceLock(data_dir); lock.acquire()`` (raises ``AlreadyRunning``), then
    ``lock.describe(...)`` as endpoints become known; ``release()`` (or process exit) frees it.

    The file is never replaced or removed, only rewritten in place: the lock is on its inode."""

    FILE = "instance.lock"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / self.FILE
        self._fd: int | None = None
        self._info: dict[str, Any] = {}

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, **endpoints: str | None) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(fd)
            os.close(fd)
            raise AlreadyRunning(self.data_dir, holder) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._info = {
            "pid": os.getpid(),
            "state": "starting",
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "endpoints": dict(endpoints),
        }
        self._write()

    def describe(self, *, state: str | None = None, **endpoints: str | None) -> None:
        """Record the state and the endpoints (merged with those given before)."""
        if self._fd is None:
            return
        if state is not None:
            self._info["state"] = state
        self._info["endpoints"] = {**self._info.get("endpoints", {}), **endpoints}
        self._write()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale PID for the next reader
        os.close(fd)  # closing the only descriptor drops the lock

    def __enter__(self) -> InstanceLock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _write(self) -> None:
        assert self._fd is not None
        data = (json.dumps(self._info, indent=2) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)


def _read_json(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        value = json.loads(raw.decode() or "{}")
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class UsageLock:
    """A shared ``flock`` held while a process uses a server; ``last_user()`` tells whether this
    process is now alone with it (then, and only then, may it stop the server)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire_shared(self) -> None:
        """Blocks while another process holds it exclusively (it is stopping the server)."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def last_user(self) -> bool:
        """Try to turn the shared lock into an exclusive one without waiting. True: no other
        process uses the server, and none can start using it until ``release()``."""
        if self._fd is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
