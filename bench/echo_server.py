"""The floor of the gRPC stack: a trivial DatabaseService in its own process that answers every
``Query`` and ``ExecuteQuery`` with a canned response (the service's own bytes for the same
request, recorded by bench/grpc_query.py), so a client drives it exactly as it drives the service.

    python bench/echo_server.py PORT SMALL_RESPONSE_FILE LARGE_RESPONSE_FILE

A request whose SQL contains ``LIMIT 1000`` gets the large response, any other the small one.
Channel options as the service's (``api/grpc/server.py``); grpc.aio on the default event loop.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

SERVICE = "database_service.v1.DatabaseService"


async def serve(port: int, small: bytes, large: bytes) -> None:
    def pick(request: bytes) -> bytes:
        return large if b"LIMIT 1000" in request else small

    async def query(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return pick(request)

    async def execute_query(
        request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        yield pick(request)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Query": grpc.unary_unary_rpc_method_handler(query),
            "ExecuteQuery": grpc.unary_stream_rpc_method_handler(execute_query),
        },
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 16 * 1_048_576),
            ("grpc.max_send_message_length", 16 * 1_048_576),
            ("grpc.max_concurrent_streams", 256),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(
        serve(int(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes())
    )
