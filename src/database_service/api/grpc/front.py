"""The gRPC port's compiled front (``dbsvc_wire.Front``, native/wire/src/front.rs): Python's side.

The front owns the public port and speaks HTTP/2 on a thread of its own. A call to one of the
*fast* methods (the unary methods of our services; ``DatabaseService/Query`` is the query path)
reaches Python as its metadata, request bytes,
peer and deadline, through an eventfd this loop watches; it runs the servicer's own method, the
same one grpcio would call, with a ``FrontContext`` standing in for grpcio's, and answers with the
response bytes or the status it aborted with. Every other call is relayed by the front to
grpcio's server on a private Unix socket (``backend``), so every method keeps grpcio's handling.

Why: at one call at a time grpcio's asyncio server costs about as much latency as our whole
handler of a cached read, and at 32 concurrent calls more CPU per PK lookup than the echo's
server in total (see README, "The gRPC front"). Nothing a caller may do changes: the servicer
authenticates, checks and records a fast call as it does any other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import grpc

__all__ = ["FrontContext", "FrontMethod", "NativeFront", "available", "listening_sockets"]

log = logging.getLogger(__name__)

try:
    import dbsvc_wire
except ImportError:  # not built: grpcio serves the port itself
    dbsvc_wire = None  # type: ignore[assignment]

# The header the front adds to a relayed call: the client's address (one a client sends is
# dropped by the front), for ``peer_of`` in calls.py.
PEER_HEADER = "x-dbsvc-peer"

# (handler(request, context) -> awaitable response, request deserializer, response serializer)
FrontMethod = tuple[Callable[..., Any], Callable[[bytes], Any], Callable[[Any], bytes]]


_UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
_INTERNAL = grpc.StatusCode.INTERNAL.value[0]


def available() -> bool:
    return dbsvc_wire is not None


class FrontContext:
    """What the servicers use of ``grpc.aio.ServicerContext``, for a call the front handed over."""

    __slots__ = ("_deadline", "_metadata", "_peer", "code", "details", "trailing")

    def __init__(self, metadata: tuple[tuple[str, Any], ...], peer: str, timeout: float) -> None:
        self._metadata = metadata
        self._peer = peer
        self._deadline = time.monotonic() + timeout if timeout >= 0 else None
        self.trailing: tuple[tuple[str, Any], ...] = ()
        self.code = grpc.StatusCode.OK
        self.details = ""

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # the front serves plaintext only (TLS: grpcio has the port)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, Any]]) -> None:
        self.trailing = tuple(metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self.trailing

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Iterable[tuple[str, Any]] = (),
    ) -> NoReturn:
        """As grpcio's: ends the call with ``code``, by raising ``AbortError``."""
        self.code = code
        self.details = details
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()


def listening_sockets(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Listening sockets on ``host:port`` as grpcio would bind them (every address of the name,
    one port for all of them when ``port`` is 0). Raises OSError (EADDRINUSE...)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and len(infos) == 1:
                # "::" alone: both families, as grpcio's dual-stack listener.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            bound = (address[0], port, *address[2:]) if sockets[1:] else address
            sock.bind(bound)
            port = sock.getsockname()[1]
            sock.listen(4096)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class NativeFront:
    """The front serving ``sockets``; ``methods``: the fast methods by path; ``backend``: the
    Unix socket path of grpcio's server for everything else."""

    def __init__(
        self,
        sockets: list[socket.socket],
        methods: dict[str, FrontMethod],
        backend: str,
        *,
        max_message_bytes: int,
        max_concurrent_streams: int,
        keepalive_seconds: float,
    ) -> None:
        assert dbsvc_wire is not None
        self._loop = asyncio.get_running_loop()
        self._methods = list(methods.values())
        self._running: dict[int, asyncio.Task[None]] = {}
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds = [sock.detach() for sock in sockets]
        try:
            self._front = dbsvc_wire.Front(
                fds,
                self._eventfd,
                list(methods),
                backend,
                max_message_bytes,
                max_message_bytes,
                max_concurrent_streams,
                int(keepalive_seconds * 1000),
            )
        except BaseException:
            # The sockets are the front's once passed (it closes those it took); closing them
            # here too could close a descriptor reused meanwhile.
            os.close(self._eventfd)
            raise
        self._answer = self._front.answer
        self._loop.add_reader(self._eventfd, self._ready)

    def counts(self) -> tuple[int, int, int]:
        """(open connections, fast calls, relayed calls) so far."""
        result: tuple[int, int, int] = self._front.counts()
        return result

    def _ready(self) -> None:
        # Read the eventfd before taking the queue: a call queued after the take wakes us again.
        with contextlib.suppress(BlockingIOError):
            os.read(self._eventfd, 8)
        calls, cancelled = self._front.take()
        running = self._running
        for call_id in cancelled:  # deadline passed, or the client reset the stream
            task = running.pop(call_id, None)
            if task is not None:
                task.cancel()
        create_task = self._loop.create_task
        for call_id, method, metadata, message, peer, timeout in calls:
            handler, deserialize, serialize = self._methods[method]
            context = FrontContext(metadata, peer, timeout)
            running[call_id] = create_task(
                self._call(call_id, handler, deserialize(message), context, serialize)
            )

    async def _call(
        self,
        call_id: int,
        handler: Callable[..., Any],
        request: Any,
        context: FrontContext,
        serialize: Callable[[Any], bytes],
    ) -> None:
        try:
            try:
                response = await handler(request, context)
                payload = serialize(response)
            except grpc.aio.AbortError:
                code = context.code.value[0]
                self._send(call_id, code, context.details, None, context.trailing)
            except asyncio.CancelledError:
                return  # the front answered (deadline) or the client is gone
            except Exception as exc:  # as grpcio answers a handler that raised
                log.error("gRPC front: unexpected error in a call", exc_info=exc)
                self._send(call_id, _UNKNOWN, f"Unexpected {exc!r}", None, ())
            else:
                self._send(call_id, 0, "", payload, context.trailing)
        finally:
            self._running.pop(call_id, None)

    def _send(
        self,
        call_id: int,
        code: int,
        details: str,
        payload: bytes | None,
        trailing: tuple[tuple[str, Any], ...],
    ) -> None:
        try:
            self._answer(call_id, code, details, payload, trailing)
        except Exception as exc:  # trailing metadata that is not str or bytes: a bug of ours
            log.error("gRPC front: an answer could not be sent", exc_info=exc)
            self._answer(call_id, _INTERNAL, "the service could not send its answer", None, ())

    async def drain(self, grace: float) -> None:
        """Stop taking connections (GOAWAY on each), then wait up to ``grace`` seconds for the
        calls in flight and the clients' connections to end."""
        self._front.stop()
        deadline = time.monotonic() + grace
        # Polled: the connections end on the front's thread, which never calls into Python.
        while time.monotonic() < deadline and (self._running or self._front.counts()[0]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    def close(self) -> None:
        """Drop what is left: calls still running are cancelled, connections closed."""
        for task in list(self._running.values()):
            task.cancel()
        self._loop.remove_reader(self._eventfd)
        self._front.close()
        os.close(self._eventfd)
