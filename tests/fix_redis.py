"""Redis for the tests: ``DBSVC_TEST_REDIS_URL`` (``make test`` starts one with
``scripts/redis.sh``), or a private redis-server from PATH started for the session.

Without either, the Redis suites skip with the reason, except under CI (``CI=true``), where a
missing redis-server fails the run: CI must test the cache against a real server.
``RedisServer`` is also what a test uses to stop and restart a server of its own (the
Redis-down tests)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis

from database_service.supervisor import free_port

# The database the per-test fixture flushes: not 0, so a developer's own data in a Redis given
# by DBSVC_TEST_REDIS_URL is never touched.
TEST_DB = 11


class RedisServer:
    """A private redis-server (no persistence) that can be stopped and restarted on its port."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (scripts/redis.sh install)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir),
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(self.data_dir / "server.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"redis-server exited (see {self.data_dir / 'server.log'})")
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _missing(reason: str) -> NoReturn:
    """No Redis to test against: under CI (``CI=true``) the run fails, since CI must test the
    cache against a real server; elsewhere the Redis suites skip, saying how to get one."""
    reason += " (bash scripts/redis.sh install)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " — CI must run the cache suites against a real Redis")
    pytest.skip(reason)


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The URL of a Redis for the session (database 0 of the server)."""
    url = os.environ.get("DBSVC_TEST_REDIS_URL")
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        _missing("no DBSVC_TEST_REDIS_URL and no redis-server on PATH")
    with tempfile.TemporaryDirectory(prefix="dbsvc-test-redis-") as tmp:
        server = RedisServer(Path(tmp))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
async def redis_db_url(redis_url: str) -> AsyncIterator[str]:
    """A flushed database of the session's Redis for one test (``TEST_DB``)."""
    url = with_db(redis_url, TEST_DB)
    client = aioredis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    yield url


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, which the test may stop and start again."""
    if shutil.which("redis-server") is None:
        _missing("no redis-server on PATH")
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)
