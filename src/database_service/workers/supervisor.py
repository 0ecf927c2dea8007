"""The supervisor's side: start the serving processes, replace one that dies, stop them all.

``WorkerSet.start`` starts the primary worker (index 0: it migrates every tenant, runs the
ingestion consumers and partition maintenance) and, once it serves, the others; a worker that
ends during start-up fails the start (its own message says why). ``run`` then watches them until
``request_stop``: a worker that ends is logged, counted and started again (at once if it had
run for a while, otherwise after a growing delay, up to 30 s, so a worker that cannot start does
not spin). ``stop`` sends SIGTERM to every worker (each drains its calls) and waits; one still
there after the grace period is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from database_service.supervisor.ports import StartupError
from database_service.workers.runtime import ENV, RunDirectory, WorkerContext

__all__ = ["WorkerSet"]

log = logging.getLogger(__name__)

_QUICK_EXIT_SECONDS = 10.0  # a worker that ends sooner is restarted after a delay
_MAX_BACKOFF = 30.0
_POLL = 0.1


@dataclass
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    started_at: str = ""
    ready: bool = False
    restarts: int = 0
    backoff: float = 0.0
    restart_at: float | None = None
    last_exit: str | None = None
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def document(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "primary": self.index == 0,
            "up": self.ready and self.process is not None and self.process.poll() is None,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit,
        }


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


class WorkerSet:
    def __init__(
        self,
        count: int,
        run: RunDirectory,
        *,
        env: Callable[[int], dict[str, str]],
        command: list[str],
        grace_seconds: float,
        postgres: Any = None,
        nats_embedded: bool = False,
    ) -> None:
        self.count = count
        self._run = run
        self._env = env
        self._command = command
        self._grace = grace_seconds
        self._postgres = postgres  # the embedded PostgreSQL: its problem and restarts, for health
        self._nats_embedded = nats_embedded
        self._slots = [_Slot(i) for i in range(count)]
        self._stopping = asyncio.Event()
        self.restarts = 0

    # -- state ---------------------------------------------------------------------------------

    def pids(self) -> list[int | None]:
        return [slot.pid for slot in self._slots]

    def write_state(self) -> None:
        postgres = None
        if self._postgres is not None:
            postgres = {"problem": self._postgres.problem, "restarts": self._postgres.restarts}
        try:
            self._run.write(
                self._run.supervisor_file,
                {
                    "pid": os.getpid(),
                    "count": self.count,
                    "restarts": self.restarts,
                    "workers": [slot.document() for slot in self._slots],
                    "postgres": postgres,
                    "nats_embedded": self._nats_embedded,
                },
            )
        except OSError as exc:  # health goes stale; serving goes on
            log.warning("the workers' state could not be written to %s: %s", self._run.path, exc)

    # -- start ---------------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        context = WorkerContext(slot.index, self.count, str(self._run.path), os.getpid())
        with contextlib.suppress(FileNotFoundError):
            self._run.worker_file(slot.index).unlink()
        # A process group of its own: Ctrl-C reaches the supervisor only, which stops the
        # workers in order (they would otherwise each get it too).
        slot.process = subprocess.Popen(
            self._command, env={**self._env(slot.index), ENV: context.to_env()}, process_group=0
        )
        slot.started = time.monotonic()
        slot.started_at = dt.datetime.now(dt.UTC).isoformat()
        slot.ready = False
        slot.restart_at = None
        slot.pids.append(slot.process.pid)
        log.info("worker %d started (pid %d)", slot.index, slot.process.pid)
        self.write_state()

    def _is_ready(self, slot: _Slot) -> bool:
        if slot.ready:
            return True
        snapshot = self._run.read(self._run.worker_file(slot.index))
        if snapshot is not None and snapshot.get("pid") == slot.pid and snapshot.get("ready"):
            slot.ready = True
            log.info("worker %d serving (pid %s)", slot.index, slot.pid)
            self.write_state()
        return slot.ready

    def _has_started(self, slot: _Slot) -> bool:
        """Its core runs (for the primary: the control plane and the tenants are migrated)."""
        snapshot = self._run.read(self._run.worker_file(slot.index))
        return snapshot is not None and snapshot.get("pid") == slot.pid

    async def _wait_ready(self, slots: list[_Slot], *, started_only: bool = False) -> None:
        ready = self._has_started if started_only else self._is_ready
        while not all(ready(slot) for slot in slots):
            for slot in slots:
                assert slot.process is not None
                code = slot.process.poll()
                if code is not None:
                    raise StartupError(
                        f"worker {slot.index} (pid {slot.process.pid}) ended during start-up "
                        f"({_describe_exit(code)}); its messages above say why"
                    )
            await asyncio.sleep(_POLL)

    async def start(self) -> None:
        """The primary first (it migrates the tenants), then, once its core runs, the others;
        returns when all serve."""
        self.write_state()
        self._spawn(self._slots[0])
        await self._wait_ready(self._slots[:1], started_only=True)
        for slot in self._slots[1:]:
            self._spawn(slot)
        await self._wait_ready(self._slots)

    # -- watch ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Watch the workers until ``request_stop``; replace those that end."""
        last_state = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            for slot in self._slots:
                try:
                    self._check(slot, now)
                except OSError as exc:  # e.g. fork refused: try again later
                    slot.backoff = min(max(slot.backoff * 2, 1.0), _MAX_BACKOFF)
                    slot.restart_at = now + slot.backoff
                    log.error("worker %d could not be started (%s); retrying", slot.index, exc)
            if now - last_state >= 1.0:
                self.write_state()  # the embedded PostgreSQL's state, for the workers' health
                last_state = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _POLL)

    def _check(self, slot: _Slot, now: float) -> None:
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                self._spawn(slot)
            return
        assert slot.process is not None
        self._is_ready(slot)
        code = slot.process.poll()
        if code is None:
            return
        from prometheus_client import multiprocess  # noqa: PLC0415

        # Its live gauges (pools) go; its counters stay in the instance's totals.
        multiprocess.mark_process_dead(slot.process.pid, str(self._run.metrics))  # type: ignore[no-untyped-call]
        with contextlib.suppress(FileNotFoundError):
            self._run.worker_file(slot.index).unlink()
        lived = now - slot.started
        slot.backoff = (
            0.0 if lived >= _QUICK_EXIT_SECONDS else min(max(slot.backoff * 2, 1.0), _MAX_BACKOFF)
        )
        slot.restarts += 1
        self.restarts += 1
        slot.last_exit = _describe_exit(code)
        slot.ready = False
        slot.restart_at = now + slot.backoff
        log.error(
            "worker %d (pid %d) ended (%s) after %.1f s; starting a new one%s (restart %d)",
            slot.index,
            slot.process.pid,
            slot.last_exit,
            lived,
            f" in {slot.backoff:.0f} s" if slot.backoff else "",
            slot.restarts,
        )
        self.write_state()

    # -- stop ----------------------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM to every worker, then wait: each drains its calls and stops; one still there
        after the grace period (and 15 s more for its own stop) is killed."""
        self._stopping.set()
        running = [s.process for s in self._slots if s.process and s.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace + 15.0
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:  # noqa: ASYNC110 - no event to await
            await asyncio.sleep(_POLL)
        for process in running:
            if process.poll() is None:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        with contextlib.suppress(OSError):
            self.write_state()


def worker_command(verbose: int) -> list[str]:
    """How the supervisor starts a worker: this interpreter, the same command line."""
    return [sys.executable, "-m", "database_service.cli", *(["-v"] * verbose), "serve"]
