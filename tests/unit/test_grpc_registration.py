"""How methods are put on the gRPC server: generic handlers only (see ``server.GenericOnly``)."""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from database_service.api.grpc.server import GenericOnly


class RecordingServer:
    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service_name: str, handlers: Any) -> None:
        self.registered.append(service_name)


class Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_generated_registrations_keep_their_generic_handlers_only() -> None:
    server = RecordingServer()
    generic = GenericOnly(server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), generic)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionServicer(()), generic)
    assert server.registered == []
    methods = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    for method in methods:
        assert any(h.service(Details(method)) is not None for h in server.generic), method
