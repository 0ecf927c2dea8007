"""ASGI middleware: request size limit, and request metrics for every route."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from database_service.observability import Metrics, RequestWindow

__all__ = ["BodyLimit", "RequestMetrics"]


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413 before the application parses anything."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = (
            f"request body exceeds the limit of {self.max_bytes} bytes (DBSVC_MAX_REQUEST_BYTES)"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_error(send, 413, "payload_too_large", message)
                return
        # Buffer up to the limit (bodies are small by construction), then replay to the app.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            incoming = await receive()
            if incoming["type"] == "http.disconnect":
                return
            chunk = incoming.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, 413, "payload_too_large", message)
                return
            chunks.append(chunk)
            more = incoming.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics, window: RequestWindow) -> None:
        self.app = app
        self.metrics = metrics
        self.window = window

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            elapsed = time.perf_counter() - started
            route: Any = scope.get("route")
            operation = getattr(route, "path", None) or "unmatched"
            code = scope.get("state", {}).get("error_code") or (
                "ok" if status < 400 else str(status)
            )
            self.metrics.requests.labels("http", operation, code).inc()
            self.metrics.request_seconds.labels("http", operation).observe(elapsed)
            if operation not in {"/metrics", "/api/v1/health"}:
                self.window.record(elapsed, status < 500)  # 4xx are the caller's errors
