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

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from database_service.app import Application

__all__ = [
    "ENV",
    "STALE_SECONDS",
    "PostgresView",
    "RunDirectory",
    "WorkerContext",
    "WorkerPeers",
    "WorkerSnapshots",
    "die_with_parent",
]

log = logging.getLogger(__name__)

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

    def pgwire(self) -> list[dict[str, Any]]:
        """Their PostgreSQL wire ports' admin views (every tenant's rows)."""
        return [s["pgwire"] for s in self._snapshots() if isinstance(s.get("pgwire"), dict)]

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


class WorkerSnapshots:
    """What this worker tells the others (and the supervisor): every second, its request
    window, its pools and its process figures, in its file of the run directory; the answering
    worker merges them into the instance's health document. Here, not in the front end: it reads
    the core's pools and loops, which front ends do not reach."""

    def __init__(self, core: Application, run: RunDirectory, context: WorkerContext) -> None:
        import psutil  # noqa: PLC0415 - a worker's only

        self._core = core
        self._run = run
        self._index = context.index
        self._peers = WorkerPeers(run, context)
        core.window.set_peers(self._peers)
        core.pgwire_peers.append(self._peers.pgwire)
        self._process = psutil.Process()
        self.ready = False  # serving on both ports

    def write(self) -> None:
        from database_service.observability.health import pools_snapshot  # noqa: PLC0415

        core = self._core
        core.metrics.refresh()
        window = core.window.export()
        data = {
            "index": self._index,
            "pid": os.getpid(),
            "ready": self.ready,
            "written": time.monotonic(),
            "requests_last_60s": sum(bucket[1] for bucket in window["all"]),
            "window": window,
            "pools": pools_snapshot(core.pools),
            "pgwire": self._pgwire(),
            "system": {
                "cpu_usage_percent": self._process.cpu_percent(None),
                "memory_usage_mb": round(self._process.memory_info().rss / 1_048_576, 1),
            },
        }
        self._peers.own = data
        self._run.write(self._run.worker_file(self._index), data)

    def _pgwire(self) -> dict[str, Any] | None:
        """This worker's wire port's admin view, every tenant's rows (None: no port)."""
        document: dict[str, Any] = {}
        for view in self._core.pgwire_views:
            for kind, rows in view(lambda _: True).items():
                document.setdefault(kind, []).extend(rows if isinstance(rows, list) else [])
        return document or None

    def start(self) -> asyncio.Task[None]:
        """Write every second from now on (a supervised loop of the core's)."""
        return self._core.loops.start("worker-snapshot", self._keep_writing)

    async def _keep_writing(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.write()
            except Exception:
                log.exception("worker %d: its snapshot could not be written", self._index)
