"""The gRPC server: DatabaseService, the standard health service and reflection, with message
size limits, a cap on concurrent streams, keepalive and a graceful drain on shutdown.

DatabaseService is registered from its descriptor with *tolerant* request deserializers: bytes
that do not decode become ``Undecodable``, which the servicer answers INVALID_ARGUMENT (a raising
deserializer would end the call INTERNAL before any of our code runs)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from database_service.api.grpc.analytics import (
    SERVICE_NAME as ANALYTICS_SERVICE_NAME,
)
from database_service.api.grpc.analytics import (
    AnalyticsReportsService,
    add_analytics_servicer,
)
from database_service.api.grpc.calls import tolerant
from database_service.api.grpc.database_service import DatabaseService
from database_service.api.grpc.front import FrontMethod, NativeFront, listening_sockets
from database_service.api.grpc.front import available as front_available
from database_service.api.grpc.graph_service import GraphService
from database_service.api.grpc.multidb import MULTIDB_SERVICE, MultiDatabaseService
from database_service.api.grpc.vectors import VECTOR_SERVICE, VectorServicer
from database_service.app import Application
from database_service.supervisor import PortInUse
from database_service.supervisor.shield import run_to_completion
from database_service.tls import CertificateFiles, grpc_server_credentials
from database_service_client._proto import database_service_pb2, graph_pb2, multidb_pb2, vector_pb2

__all__ = ["GrpcServer", "add_servicer"]

log = logging.getLogger(__name__)

_SERVICE = database_service_pb2.DESCRIPTOR.services_by_name["DatabaseService"]
SERVICE_NAME = _SERVICE.full_name
GRAPH_SERVICE_NAME = graph_pb2.DESCRIPTOR.services_by_name["GraphService"].full_name

_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    servicer: Any, server: grpc.aio.Server, module: Any = database_service_pb2, name: str = ""
) -> dict[str, Any]:
    """Like the generated ``add_DatabaseServiceServicer_to_server``, every method of the service
    descriptor, but each request deserializer returns ``Undecodable`` instead of raising.
    ``module``/``name``: another protocol service (``graph_pb2``, ``GraphService``). Returns the
    handlers by path (``/package.Service/Method``)."""
    service = module.DESCRIPTOR.services_by_name[name] if name else _SERVICE
    handlers: dict[str, Any] = {}
    for method in service.methods:
        request = getattr(module, method.input_type.name)
        response = getattr(module, method.output_type.name)
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=tolerant(request.FromString, method.input_type.full_name),
            response_serializer=_encoded(response.SerializeToString),
        )
    full_name = service.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))
    return {f"/{full_name}/{method}": handler for method, handler in handlers.items()}


class GenericOnly:
    """A server for the generated ``add_*Servicer_to_server`` functions (health, reflection)
    that takes their generic handlers and drops their *registered* ones, as ``add_servicer``
    does for ours.

    grpc's aio server keeps one pending request per registered method and, for every call it
    accepts, waits on all of them at once (``asyncio.wait``: a done callback added to and
    removed from each). With the ~70 methods of our services that was about 6% of the
    service's CPU on a PK lookup at 32 concurrent calls (py-spy with ``--gil``). With generic
    handlers only, one request is pending; a method is then found by a dict lookup per service,
    ours first."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        """Dropped: each of these methods is also in the generic handlers added with it."""


def _encoded(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that also takes a response already encoded (``bytes``): a cached
    answer is sent as stored rather than parsed to be serialized again."""

    def encoded(response: Any) -> bytes:
        return response if response.__class__ is bytes else serialize(response)

    return encoded


class GrpcServer:
    """``async with GrpcServer(core) as server: server.port``; exit drains in-flight calls.

    ``reuse_port``: the workers of one ``serve`` listen on the same port (SO_REUSEPORT; the
    kernel spreads connections over them, and lets only processes of the same user join).
    ``front``: the compiled front on the port (default: ``grpc_front``); it stands aside for TLS
    and tracing, and when ``dbsvc_wire`` is not built."""

    def __init__(
        self,
        core: Application,
        *,
        reuse_port: bool = False,
        tls: CertificateFiles | None = None,
        front: bool | None = None,
    ) -> None:
        self.core = core
        self._use_front = core.settings.grpc_front if front is None else front
        self._reuse_port = reuse_port
        self._tls = tls
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._front: NativeFront | None = None
        self._front_absent = ""
        self._backend_dir: str | None = None
        self._health = health.aio.HealthServicer()

    @property
    def front(self) -> NativeFront | None:
        """The compiled front serving the port, when it does."""
        return self._front

    async def __aenter__(self) -> GrpcServer:
        s = self.core.settings
        # Traces (a server span per call, the caller's traceparent continued); none when off.
        interceptors = self.core.tracing.grpc_interceptors()
        self._front_absent = ""
        if not self._use_front:
            self._front_absent = "off (DBSVC_GRPC_FRONT=false)"
        elif not front_available():
            self._front_absent = "dbsvc_wire is not installed"
        elif self._tls is not None:
            self._front_absent = "TLS: grpcio terminates it"
        elif interceptors:
            self._front_absent = "tracing: grpcio's interceptors make the spans"
        use_front = not self._front_absent
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", s.grpc_max_message_bytes),
                ("grpc.max_send_message_length", s.grpc_max_message_bytes),
                ("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams),
                ("grpc.keepalive_time_ms", s.grpc_keepalive_seconds * 1000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                # grpc sets SO_REUSEPORT by default: a second process (another instance, any
                # program) could then listen on our port too and silently take half the calls.
                # Only the workers of one serve share it (the supervisor checked it was free).
                ("grpc.so_reuseport", 1 if self._reuse_port else 0),
            ],
        )
        ours = {
            **add_servicer(
                DatabaseService(self.core, default_chunk_bytes=s.grpc_chunk_bytes), server
            ),
            **add_servicer(GraphService(self.core), server, graph_pb2, "GraphService"),
            **add_servicer(VectorServicer(self.core), server, vector_pb2, "VectorService"),
            **add_servicer(MultiDatabaseService(self.core), server, multidb_pb2, "MultiDatabase"),
        }
        add_analytics_servicer(AnalyticsReportsService(self.core), server)
        generic = GenericOnly(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, generic)
        # reflection.enable_server_reflection's own registration, with its aio servicer (it
        # picks that one only for a grpc.aio.Server, which GenericOnly is not).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ReflectionServicer(
                (
                    SERVICE_NAME,
                    GRAPH_SERVICE_NAME,
                    VECTOR_SERVICE,
                    MULTIDB_SERVICE,
                    ANALYTICS_SERVICE_NAME,
                    health.SERVICE_NAME,
                    reflection.SERVICE_NAME,
                )
            ),
            generic,
        )
        address = f"{s.grpc_host}:{s.grpc_port}"
        if use_front:
            await self._start_front(server, ours)
            return self
        try:
            if self._tls is not None:
                self.port = server.add_secure_port(address, grpc_server_credentials(self._tls))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:  # grpc >= 1.60 raises where older versions returned 0
            self.port = 0
        if not self.port:
            raise PortInUse(
                "gRPC",
                s.grpc_host,
                s.grpc_port,
                "DBSVC_GRPC_PORT",
                OSError(errno.EADDRINUSE, "address in use"),
            )
        self._server = server  # from here on, exit stops it (also when start-up is cancelled)
        try:
            await server.start()
            self.core.observability.report("grpc", self.health)
            for name in ("", SERVICE_NAME):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.__aexit__()
            raise
        log.info(
            "gRPC listening on %s:%d (%s)",
            s.grpc_host,
            self.port,
            "plaintext" if self._tls is None else "TLS",
        )
        return self

    def health(self) -> dict[str, object]:
        """The health document's ``grpc`` section: who serves the port, and the front's counts."""
        section: dict[str, object] = {
            "status": "ok" if self._server is not None else "down",
            "port": self.port,
            "front": "compiled" if self._front is not None else "grpcio",
        }
        if self._front is not None:
            connections, fast, relayed = self._front.counts()
            section.update(connections=connections, fast_calls=fast, relayed_calls=relayed)
        else:
            section["front_absent"] = self._front_absent
        return section

    async def _start_front(self, server: grpc.aio.Server, ours: dict[str, Any]) -> None:
        """The compiled front on the public port, grpcio on a Unix socket of a private directory
        behind it. The front hands the unary methods of our services (``ours``, by path) to
        their servicers itself; streams, health and reflection go through grpcio."""
        s = self.core.settings
        try:
            sockets = listening_sockets(s.grpc_host, s.grpc_port, reuse_port=self._reuse_port)
        except OSError as exc:
            raise PortInUse("gRPC", s.grpc_host, s.grpc_port, "DBSVC_GRPC_PORT", exc) from exc
        self.port = sockets[0].getsockname()[1]
        self._server = server
        try:
            self._backend_dir = tempfile.mkdtemp(prefix="dbsvc-grpc-")  # 0700: ours alone
            backend = os.path.join(self._backend_dir, "grpc.sock")
            server.add_insecure_port(f"unix:{backend}")
            await server.start()
            methods: dict[str, FrontMethod] = {
                path: (h.unary_unary, h.request_deserializer, h.response_serializer)
                for path, h in ours.items()
                if not h.request_streaming and not h.response_streaming
            }
            self._front = NativeFront(
                sockets,
                methods,
                backend,
                max_message_bytes=s.grpc_max_message_bytes,
                max_concurrent_streams=s.grpc_max_concurrent_streams,
                keepalive_seconds=s.grpc_keepalive_seconds,
            )
            sockets = []
            self.core.observability.report("grpc", self.health)
            for name in ("", SERVICE_NAME):
                await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            for sock in sockets:
                sock.close()
            await self.__aexit__()
            raise
        log.info("gRPC listening on %s:%d (plaintext, compiled front)", s.grpc_host, self.port)

    async def __aexit__(self, *exc: object) -> None:
        self.core.observability.unreport("grpc", self.health)
        server, self._server = self._server, None
        if server is None:
            return
        # Tell health checkers first, then stop taking calls and let in-flight ones finish.
        await self._health.enter_graceful_shutdown()
        grace = self.core.settings.grpc_shutdown_grace_seconds
        front, self._front = self._front, None
        if front is not None:
            started = asyncio.get_running_loop().time()
            await run_to_completion(front.drain(grace))
            grace = max(0.0, grace - (asyncio.get_running_loop().time() - started))
        try:
            await run_to_completion(server.stop(grace))
        finally:
            if front is not None:
                front.close()
            if self._backend_dir is not None:
                shutil.rmtree(self._backend_dir, ignore_errors=True)
                self._backend_dir = None
        log.info("gRPC stopped")
