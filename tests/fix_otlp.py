"""An OTLP/gRPC trace receiver for the tests, on the official protobufs: what a collector would
receive from the service, gathered in memory.

``otlp_receiver.endpoint`` goes in ``otel_exporter_otlp_endpoint``; ``await
otlp_receiver.wait_for(lambda spans: ...)`` waits until the spans received so far satisfy a
condition (the service exports in batches, from a thread of its own)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
CONSUMER = trace_pb2.Span.SPAN_KIND_CONSUMER
INTERNAL = trace_pb2.Span.SPAN_KIND_INTERNAL
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class Received:
    """One exported span, with ids in hex as in a ``traceparent``."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]  # (trace id, span id)
    status_code: int
    status_message: str
    scope: str
    resource: dict[str, Any] = field(repr=False)

    def texts(self) -> list[str]:
        """Everything this span says in words (to look for what must not be there)."""
        found = [self.name, self.status_message]
        for attributes in [self.attributes, *(a for _, a in self.events)]:
            found += [f"{k}={v!r}" for k, v in attributes.items()]
        return found


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.requests = 0
        self.port = 0
        self._arrived = asyncio.Condition()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def Export(  # the protocol names it
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = [
            Received(
                name=span.name,
                kind=span.kind,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                attributes=_attributes(span.attributes),
                events=[(e.name, _attributes(e.attributes)) for e in span.events],
                links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                status_code=span.status.code,
                status_message=span.status.message,
                scope=scoped.scope.name,
                resource=_attributes(resource.resource.attributes),
            )
            for resource in request.resource_spans
            for scoped in resource.scope_spans
            for span in scoped.spans
        ]
        async with self._arrived:
            self.requests += 1
            self.spans.extend(received)
            self._arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list[Received]:
        return [s for s in self.spans if s.trace_id == trace_id]

    async def wait_for(
        self, done: Callable[[list[Received]], bool], timeout: float = 15.0
    ) -> list[Received]:
        """The spans received, once ``done`` holds for them."""
        deadline = time.monotonic() + timeout
        async with self._arrived:
            while not done(self.spans):
                left = deadline - time.monotonic()
                assert left > 0, f"spans received: {[(s.name, s.trace_id) for s in self.spans]}"
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    continue  # the assertion above says what came
            return list(self.spans)

    async def wait_for_trace(
        self, trace_id: str, done: Callable[[list[Received]], bool], timeout: float = 15.0
    ) -> list[Received]:
        """The spans of one trace, once ``done`` holds for them."""
        await self.wait_for(lambda spans: done(self.trace(trace_id)), timeout)
        return self.trace(trace_id)


@pytest.fixture(scope="module")
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    receiver.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver
    finally:
        await server.stop(0)
