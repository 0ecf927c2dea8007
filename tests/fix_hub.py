"""A small Central Hub that follows the contract (``database_service.hub.contract``): it keeps
registrations and heartbeats, hands queued configuration updates out in heartbeat answers,
answers 404 for an instance it does not know, and can be stopped and started again on the same
port (forgetting its registrations, as a restarted hub would)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


class Hub:
    def __init__(self, token: str) -> None:
        self.token = token
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.unauthorized = 0
        self.known: set[str] = set()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _app(self) -> FastAPI:
        app = FastAPI()

        def authorized(request: Request) -> bool:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                self.unauthorized += 1
                return False
            return True

        @app.post("/api/v1/instances")
        async def register(request: Request) -> JSONResponse:
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            document = await request.json()
            self.registrations.append(document)
            self.known.add(document["instance_id"])
            return JSONResponse({"registered": True}, status_code=201)

        @app.post("/api/v1/instances/{instance_id}/heartbeat")
        async def heartbeat(instance_id: str, request: Request) -> JSONResponse:
            if not authorized(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            if instance_id not in self.known:
                return JSONResponse({"error": "unknown instance"}, status_code=404)
            self.heartbeats.append(await request.json())
            updates, self.pending = self.pending, []
            return JSONResponse({"updates": updates})

        return app

    async def start(self) -> None:
        config = uvicorn.Config(
            self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(500):  # uvicorn offers no event for "listening"
            if self._server.started:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("the test hub did not start")

    async def stop(self) -> None:
        """Down, and forgetting every registration (a restarted hub)."""
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server = self._task = None
        self.known.clear()


@pytest.fixture
async def hub() -> AsyncIterator[Hub]:
    running = Hub(token="hub-token-" + "h" * 20)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()
