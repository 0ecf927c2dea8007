"""A serving process's side of the process model: who it is, its snapshot for the others, and
what it reads of theirs and of the supervisor's.

The run directory (``<data_dir>/run``, emptied by the supervisor at each start) holds:

- ``supervisor.json``: the workers (index, pid, up, restarts), the supervisor's embedded
  PostgreSQL (why it is down, how often it was restarted); rewritten on every change and every
  second.
- ``worker-<index>.json``: one worker's snapshot, rewritten every second: its request window's
  live buckets and its tenant pools. A snapshot older than ``STALE_SECONDS`` (a worker that
  died or hangs) is left out of the instance's figures.
- ``metrics/``: prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``).

Files are replaced atomically (written beside, then renamed): a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ENV",
    "STALE_SECONDS",
    "PostgresView",
    "RunDirectory",
    "WorkerContext",
    "WorkerPeers",
    "bind_shared",
    "die_with_parent",
]

# The environment variable that makes ``database-service serve`` a worker of a supervisor.
ENV = "DATABASE_SERVICE_WORKER"
STALE_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerContext:
    index: int
    count: int
    run_dir: str
    parent: int  # the supervisor's pid

    @classmethod
    def from_env(cls) -> WorkerContext | None:
        value = os.environ.get(ENV)
        if not value:
            return None
        return cls(**json.loads(value))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @property
    def primary(self) -> bool:
        return self.index == 0


def die_with_parent(parent: int) -> None:
    """Let the kernel kill this process when the supervisor dies, however it dies (SIGKILL
    gives it no chance to stop its workers); exit now if it is already gone."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def bind_shared(host: str, port: int) -> socket.socket:
    """A socket bound (not yet listening) to ``host:port`` with SO_REUSEPORT, beside the other
    workers' (the kernel spreads connections over the listening ones)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class RunDirectory:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics"

    @property
    def supervisor_file(self) -> Path:
        return self.path / "supervisor.json"

    def worker_file(self, index: int) -> Path:
        return self.path / f"worker-{index}.json"

    def write(self, path: Path, data: dict[str, Any]) -> None:
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(temporary, path)

    def read(self, path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def supervisor(self) -> dict[str, Any]:
        return self.read(self.supervisor_file) or {}


class PostgresView:
    """The supervisor's embedded PostgreSQL as a worker sees it (``PostgresProbe``'s
    ``supervisor``): why it is down, how often it was restarted."""

    def __init__(self, run: RunDirectory) -> None:
        self._run = run

    def _state(self) -> dict[str, Any]:
        return self._run.supervisor().get("postgres") or {}

    @property
    def problem(self) -> str | None:
        problem = self._state().get("problem")
        return problem if isinstance(problem, str) else None

    @property
    def restarts(self) -> int:
        return int(self._state().get("restarts", 0))


class WorkerPeers:
    """The other workers, from their snapshots (``observability.window.Peers``); read at most
    every ``cache_seconds``."""

    def __init__(
        self, run: RunDirectory, context: WorkerContext, *, cache_seconds: float = 0.5
    ) -> None:
        self._run = run
        self._context = context
        self._cache_seconds = cache_seconds
        self._read_at = -1e9
        self._others: list[dict[str, Any]] = []
        self.own: dict[str, Any] = {}  # this worker's last snapshot (its request count)

    def _snapshots(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        if now - self._read_at < self._cache_seconds:
            return self._others
        others = []
        for index in range(self._context.count):
            if index == self._context.index:
                continue
            snapshot = self._run.read(self._run.worker_file(index))
            if snapshot is None or now - float(snapshot.get("written", 0)) > STALE_SECONDS:
                continue
            others.append(snapshot)
        self._others, self._read_at = others, now
        return others

    def windows(self) -> list[dict[str, Any]]:
        return [s["window"] for s in self._snapshots() if isinstance(s.get("window"), dict)]

    def pools(self) -> list[dict[str, Any]]:
        return [s["pools"] for s in self._snapshots() if isinstance(s.get("pools"), dict)]

    def system(self) -> list[dict[str, Any]]:
        return [s["system"] for s in self._snapshots() if isinstance(s.get("system"), dict)]

    def workers(self) -> dict[str, Any]:
        state = self._run.supervisor()
        requests = {int(s["index"]): s.get("requests_last_60s", 0) for s in self._snapshots()}
        requests[self._context.index] = self.own.get("requests_last_60s", 0)
        processes = []
        for worker in state.get("workers", []):
            index = int(worker.get("index", -1))
            processes.append({**worker, "requests_last_60s": requests.get(index)})
        return {
            "count": self._context.count,
            "answered_by": {"index": self._context.index, "pid": os.getpid()},
            "restarts": int(state.get("restarts", 0)),
            "supervisor_pid": self._context.parent,
            "processes": processes,
        }
