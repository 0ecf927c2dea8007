"""Every gRPC method of every service, swept with bad input as tenant A (every scope for
itself), the requests built from the messages' descriptors, so a field or method added later
is swept too: each field in turn set to an extreme of its type (text with NUL, 100,000
characters, tenant B's id, JSON that is not, JSON nested thousands deep or holding NaN; the
64-bit limits and -1 for integers; NaN, infinities and 1e308 for doubles; an unknown enum
number; 10,000 elements for repeated fields), alone and on top of a plausible request.

What must hold for every call: a status other than INTERNAL/UNKNOWN/DATA_LOSS (a clear code),
and tenant B's secret in no answer. Calls that name B by ``x-tenant-id`` are refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as gdesc
from google.protobuf import message as gmessage
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.message_factory import GetMessageClass

from database_service.app import Application
from database_service.auth import Scope
from database_service_client._proto import (
    analytics_pb2,
    database_service_pb2,
    graph_pb2,
    multidb_pb2,
    vector_pb2,
)
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.usefixtures("unchanged_victim"), pytest.mark.pgvector]

_SERVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
# Long or lifecycle-changing for the platform; A's token is refused before anything runs, but
# a plausible request may still start work: these run with bad input only.
_SKIP = {"HealthCheck"}

_TEXTS = [
    "a\x00b",
    "x" * 100_000,
    "{B}",
    "{not json",
    "[" * 3000 + "]" * 3000,
    '{"n": NaN}',
    '{"n": 100000000000000000000000000000}',
    "../..",
    "*",
]
_INTS = [-1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]
_UINTS = [2**32 - 1, 2**64 - 1]
_DOUBLES = [math.nan, math.inf, -math.inf, 1e308, -1.0]


def _services() -> list[gdesc.ServiceDescriptor]:
    modules = (database_service_pb2, graph_pb2, vector_pb2, multidb_pb2, analytics_pb2)
    return [s for m in modules for s in m.DESCRIPTOR.services_by_name.values()]


METHODS = [
    (service.full_name, method.name, method)
    for service in _services()
    for method in service.methods
    if method.name not in _SKIP
]


def _repeated(field: gdesc.FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)  # newer protobuf; older: the label
    return bool(repeated) if repeated is not None else field.label == F.LABEL_REPEATED


def _values(field: gdesc.FieldDescriptor, b: str) -> list[Any]:
    if field.type == F.TYPE_STRING:
        return [t.replace("{B}", b) for t in _TEXTS]
    if field.type == F.TYPE_BYTES:
        return [b"\xff\xfe\x00", b"x" * 100_000, b"[" * 3000]
    if field.type in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return [-1, 2**31 - 1, -(2**31)]
    if field.type in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return _INTS
    if field.type in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return [0, 2**32 - 1]
    if field.type in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return [0, *_UINTS]
    if field.type in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return _DOUBLES
    if field.type == F.TYPE_ENUM:
        return [999, -1]
    if field.type == F.TYPE_BOOL:
        return [True]
    return []


def _plausible(descriptor: gdesc.Descriptor, a: str) -> dict[str, Any]:
    """A request most methods would take: every string field a word, ids and names of A's."""
    values: dict[str, Any] = {}
    for field in descriptor.fields:
        if _repeated(field) or field.type == F.TYPE_MESSAGE:
            continue
        if field.type == F.TYPE_STRING:
            values[field.name] = {
                "sql": "SELECT 1",
                "query": "SELECT 1",
                "tenant_id": a,
                "company_id": a,
                "start": "v/a",
                "end": "v/b",
                "id": "v/a",
                "name": "Probe",
                "collection": "v",
            }.get(field.name, "x")
    return values


def _requests(method: gdesc.MethodDescriptor, a: str, b: str) -> Iterator[gmessage.Message]:
    cls = GetMessageClass(method.input_type)
    base = _plausible(method.input_type, a)
    for field, start in itertools.product(method.input_type.fields, ({}, base)):
        for value in _values(field, b):
            msg = cls(**{k: v for k, v in start.items() if k != field.name})
            try:
                if _repeated(field):
                    getattr(msg, field.name).extend([value] * 10_000)
                else:
                    setattr(msg, field.name, value)
            except (ValueError, TypeError):
                continue  # not representable in this field (the client library refuses it)
            yield msg


def _serialize(message: gmessage.Message) -> bytes:
    return message.SerializeToString()


@pytest.mark.parametrize(
    ("service", "name", "method"),
    METHODS,
    ids=[f"{s.rsplit('.', 1)[-1]}.{n}" for s, n, _ in METHODS],
)
async def test_bad_input_to_every_grpc_method_gets_a_clear_status(
    core: Application,
    grpc_target: str,
    tenants: Tenants,
    service: str,
    name: str,
    method: gdesc.MethodDescriptor,
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    token = await service_token(core, [a], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    path = f"/{service}/{name}"
    failures: list[str] = []
    async with grpc.aio.insecure_channel(
        grpc_target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        for tenant, request in itertools.chain(
            (("A", r) for r in _requests(method, a, b)),
            (("B", r) for r in itertools.islice(_requests(method, a, b), 3)),
        ):
            metadata = (
                ("authorization", f"Bearer {token}"),
                ("x-tenant-id", a if tenant == "A" else b),
            )
            try:
                if method.client_streaming:
                    call: Any = channel.stream_unary(
                        path, request_serializer=_serialize, response_deserializer=bytes
                    ) if not method.server_streaming else channel.stream_stream(
                        path, request_serializer=_serialize, response_deserializer=bytes
                    )  # fmt: skip
                    answer = call(iter([request]), metadata=metadata, timeout=30)
                elif method.server_streaming:
                    call = channel.unary_stream(
                        path, request_serializer=_serialize, response_deserializer=bytes
                    )
                    answer = call(request, metadata=metadata, timeout=30)
                else:
                    call = channel.unary_unary(
                        path, request_serializer=_serialize, response_deserializer=bytes
                    )
                    answer = call(request, metadata=metadata, timeout=30)
                if method.server_streaming:
                    chunks = [chunk async for chunk in answer]
                else:
                    chunks = [await answer]
                body = b"".join(chunks)
                assert SECRET.encode() not in body, f"victim data leaked: {path}"
                if tenant == "B":
                    failures.append(f"answered for B: {path} {str(request)[:120]!r}")
            except grpc.aio.AioRpcError as exc:
                assert SECRET not in (exc.details() or ""), f"victim data leaked: {path}"
                if exc.code() in _SERVER:
                    failures.append(
                        f"{exc.code().name} {path} {str(request)[:160]!r}: {exc.details()}"
                    )
    assert not failures, "\n".join(failures[:15])
