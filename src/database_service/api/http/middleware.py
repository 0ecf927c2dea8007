"""ASGI middleware: request size limit, request metrics and the request context for every route,
and the last resort for exceptions no handler answered."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from database_service.observability import Metrics, RequestWindow
from database_service.observability.logs import REQUEST_ID_HEADER, bind, request_id_from, unbind

__all__ = ["BodyLimit", "InternalErrors", "RequestMetrics"]

log = logging.getLogger(__name__)

_REQUEST_ID = REQUEST_ID_HEADER.encode()


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


# Routes that take a large body as a stream (and bound it themselves).
STREAMED_UPLOAD = re.compile(r"/api/v1/admin/tenants/[^/]+/restore")


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413 before the application parses anything."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or STREAMED_UPLOAD.fullmatch(scope.get("path", "")):
            # A tenant restore's upload is streamed to disk by its route, under its own limit.
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
        await self.app(scope, replaying(b"".join(chunks), receive), send)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app ``body`` (already read) as one message, then defers to
    the real one (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class InternalErrors:
    """The last resort, inside the metrics middleware: an exception no handler answered becomes
    the documented ``500 {"error": {"code": "internal", ...}}`` (its text stays in the log), after
    ``on_error`` has logged, counted and audited it. Starlette's own last resort would answer
    plain text and re-raise into the server."""

    def __init__(
        self, app: ASGIApp, on_error: Callable[[Scope, Exception], Awaitable[None]]
    ) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            scope.setdefault("state", {})["error_code"] = "internal"
            await self.on_error(scope, exc)
            if started:  # too late for an error response: let the server close the stream
                raise
            await _send_error(send, 500, "internal", "internal error: the service logged it")


class _HttpRequest:
    """One request for the logs (``logs.RequestInfo``): its id, and the tenant and service as the
    routes record them in the request's state (``request.state``: the tenant once the caller
    may act for it, the service once it is authenticated)."""

    __slots__ = ("_state", "request_id")

    def __init__(self, request_id: str, state: MutableMapping[str, Any]) -> None:
        self.request_id = request_id
        self._state = state

    @property
    def tenant(self) -> str | None:
        tenant: str | None = self._state.get("tenant_id")
        return tenant

    @property
    def service(self) -> str | None:
        service: str | None = self._state.get("service")
        return service


def _incoming_request_id(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID:
            return bytes(value)
    return None


class RequestMetrics:
    """Counts and times every request, and makes it a request for the logs: its id is the
    caller's ``X-Request-Id`` when sane, else a new one, and goes back as ``X-Request-Id``;
    every line logged while the request runs carries it (and its tenant and service once the
    routes know them). A refused authentication (401) is logged, one line with the reason the
    caller was given; never the credentials. The outermost middleware of ours, so a body the
    size limit refuses (413) is counted and answered with its id too."""

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
        request_id = request_id_from(_incoming_request_id(scope))
        echoed = request_id.encode()
        token = bind(_HttpRequest(request_id, scope.setdefault("state", {})))
        refusal: list[bytes] = []  # a 401's body, for the reason

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (_REQUEST_ID, echoed)]
            elif status == 401 and message["type"] == "http.response.body":
                refusal.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, capture)
            if status == 401:
                _log_refusal(scope, b"".join(refusal))
        finally:
            unbind(token)
            elapsed = time.perf_counter() - started
            route: Any = scope.get("route")
            operation = getattr(route, "path", None) or "unmatched"
            code = scope.get("state", {}).get("error_code") or (
                "ok" if status < 400 else str(status)
            )
            self.metrics.request_done("http", operation, code, elapsed)
            if operation not in {"/metrics", "/api/v1/health", "/health"}:
                # 4xx are the caller's errors. The tenant is set by the route once it has
                # checked that the caller may act for it, so nobody adds to another's figures.
                tenant = scope.get("state", {}).get("tenant_id")
                self.window.record(elapsed, status < 500, tenant)


def _log_refusal(scope: Scope, body: bytes) -> None:
    """Log a refused authentication with the reason its response gives (the routes' errors say
    ``{"error": {"code": ..., "message": ...}}``; no message of the authenticator's holds the
    token it was given)."""
    try:
        reason = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        reason = "unauthenticated"
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "unknown"
    log.info(
        "authentication failed (%s %s from %s): %s",
        scope.get("method"),
        scope.get("path"),
        peer,
        reason,
    )
