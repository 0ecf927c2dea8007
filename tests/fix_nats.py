"""NATS for the tests: a private nats-server (JetStream on) per test, on a free port.

``DBSVC_TEST_NATS_URL`` is not offered on purpose: ingestion tests stop and restart the server
under the service, which only a server of the test's own can allow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from database_service.supervisor import EmbeddedNats, free_port


class NatsServer:
    """A nats-server that a test can stop and start again (same port, same JetStream store)."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.port = free_port()
        self._server: EmbeddedNats | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = EmbeddedNats(self.store_dir, port=self.port)
        await self._server.__aenter__()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.__aexit__(None, None, None)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
