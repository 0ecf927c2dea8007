"""The compiled gRPC front (api/grpc/front.py, native/wire/src/front.rs): ``Query`` answered by
its servicer without grpcio, everything else relayed to grpcio behind it, and at the transport
what grpcio did: message limits, deadlines, cancellation, compression, metadata both ways."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from database_service.api.grpc import GrpcServer
from database_service.api.grpc.front import available
from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from database_service_client import MultiDatabaseClient as Client
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto import database_service_pb2_grpc as pb_grpc
from database_service_client.values import from_row

QUERY = "/database_service.v1.DatabaseService/Query"
KEY_VALUE = "/database_service.v1.DatabaseService/KeyValue"


@pytest.fixture
async def served(core: Application) -> AsyncIterator[GrpcServer]:
    assert available(), "dbsvc_wire is not built (make install builds it)"
    async with GrpcServer(core) as server:
        assert server.front is not None
        yield server


@pytest.fixture
async def tenant(new_tenant: object) -> TenantRecord:
    return await new_tenant("front")  # type: ignore[operator, no-any-return]


@pytest.fixture
async def metadata(core: Application, tenant: TenantRecord) -> tuple[tuple[str, str], ...]:
    name = f"front-{tenant.tenant_id}"
    scopes = [Scope.READ, Scope.WRITE]
    await core.services.register(name, tenants=[tenant.tenant_id], scopes=scopes, with_secret=False)
    token = core.tokens.issue(name, tenants=[tenant.tenant_id], scopes=scopes, ttl_seconds=600)
    return (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant.tenant_id))


@pytest.fixture
async def stub(served: GrpcServer) -> AsyncIterator[pb_grpc.DatabaseServiceStub]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}", options=options) as channel:
        yield pb_grpc.DatabaseServiceStub(channel)


def rows(result: pb.QueryResult) -> list[tuple[object, ...]]:
    return [from_row(row) for row in result.rows.rows]


async def role_activity(core: Application, tenant: TenantRecord) -> list[str]:
    found = await core.owner_pool.fetch(
        "SELECT query FROM pg_stat_activity WHERE usename = $1 AND state = 'active'",
        tenant.role_name,
    )
    return [r["query"] for r in found]


async def until_idle(core: Application, tenant: TenantRecord) -> None:
    """The tenant's statements end within 5 s. (A deadline through the front: test_grpc.py's
    ``test_deadline_cancels_the_statement_in_postgres``, which goes through it.)"""
    for _ in range(50):
        if not await role_activity(core, tenant):
            break
        await asyncio.sleep(0.1)
    assert await role_activity(core, tenant) == []


async def test_query_is_answered_by_the_front_and_every_other_method_relayed_to_grpcio(
    served: GrpcServer, stub: pb_grpc.DatabaseServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert served.front is not None
    _, fast, relayed = served.front.counts()
    result = await stub.Query(pb.QueryRequest(sql="SELECT 41 + 1 AS n"), metadata=metadata)
    assert rows(result) == [(42,)]
    streamed = [
        m
        async for m in stub.ExecuteQuery(
            pb.QueryRequest(sql="SELECT g FROM generate_series(1, 20000) g"), metadata=metadata
        )
    ]
    assert sum(len(m.rows.rows) for m in streamed) == 20000
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{served.port}")
    async with channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    _, fast_after, relayed_after = served.front.counts()
    assert (fast_after - fast, relayed_after - relayed) == (1, 2)


async def test_answers_of_many_calls_at_once_each_reach_their_own_caller(
    stub: pb_grpc.DatabaseServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    async def one(i: int) -> None:
        request = pb.QueryRequest(sql="SELECT $1::int * 2, pg_sleep(random() / 100)")
        request.params.add().int_value = i
        assert rows(await stub.Query(request, metadata=metadata))[0][0] == i * 2

    await asyncio.gather(*(one(i) for i in range(300)))


async def test_the_request_id_comes_back_as_trailing_metadata_on_success_and_on_error(
    stub: pb_grpc.DatabaseServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    call = stub.Query(
        pb.QueryRequest(sql="SELECT 1"), metadata=(*metadata, ("x-request-id", "req-front-1"))
    )
    await call
    assert ("x-request-id", "req-front-1") in tuple(await call.trailing_metadata())
    failing = stub.Query(
        pb.QueryRequest(sql="SELECT * FROM no_such_table"),
        metadata=(*metadata, ("x-request-id", "req-front-2"), ("trace-bin", b"\x00\xff")),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await failing
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing["x-request-id"] == "req-front-2"
    assert trailing["dbsvc-sqlstate"] == "42P01"
    details = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])  # binary trailer
    assert details.code == info.value.code().value[0]


async def test_every_outcome_is_the_one_grpcio_gives(
    core: Application, served: GrpcServer, metadata: tuple[tuple[str, str], ...]
) -> None:
    """The same calls, to the front and to grpcio serving the service itself: the same status,
    message, answer and trailing metadata (but the request id each made up)."""
    bad_token = (("authorization", "Bearer nope"), metadata[1])
    kv = pb.KeyValueRequest
    calls: list[tuple[str, bytes, tuple[tuple[str, str], ...]]] = [
        (QUERY, pb.QueryRequest(sql="SELECT 1 AS one").SerializeToString(), metadata),
        (QUERY, pb.QueryRequest(sql="SELECT * FROM no_such_table").SerializeToString(), metadata),
        (QUERY, pb.QueryRequest(sql="SELECT 1 +").SerializeToString(), metadata),
        (QUERY, pb.QueryRequest(sql="SELECT * FROM pg_authid").SerializeToString(), metadata),
        (QUERY, pb.QueryRequest(sql="SELECT 1").SerializeToString(), bad_token),
        (QUERY, pb.QueryRequest(sql="SELECT 1").SerializeToString(), metadata[:1]),  # no tenant
        (QUERY, b"\xff\xff\xff", metadata),
        (
            KEY_VALUE,
            kv(operation=pb.KEY_VALUE_OPERATION_GET, key=b"k").SerializeToString(),
            metadata,
        ),
        (KEY_VALUE, kv(key=b"k").SerializeToString(), metadata),  # no operation
        (KEY_VALUE, kv(operation=pb.KEY_VALUE_OPERATION_GET).SerializeToString(), bad_token),
        ("/database_service.v1.GraphService/GetVertex", b"\x0a\x03a/b", metadata),
        ("/database_service.v1.GraphService/GetVertex", b"\x0a\x01\xff", metadata),
        ("/database_service.v1.VectorService/ListCollections", b"", metadata),
    ]

    async def outcomes(port: int) -> list[tuple[object, ...]]:
        seen: list[tuple[object, ...]] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for path, request, md in calls:
                call = channel.unary_unary(path)(request, metadata=md)
                try:
                    answer = await call
                except grpc.aio.AioRpcError as exc:
                    code, details, answer = exc.code(), exc.details(), b""
                    trailing = exc.trailing_metadata()
                else:
                    code, details = grpc.StatusCode.OK, ""
                    trailing = await call.trailing_metadata()
                    if path == QUERY:
                        result = pb.QueryResult.FromString(answer)
                        result.summary.ClearField("duration_ms")  # the one thing that differs
                        answer = result.SerializeToString()
                kept = sorted((k, v) for k, v in tuple(trailing or ()) if k != "x-request-id")
                seen.append((path, code, details, answer, kept))
        return seen

    async with GrpcServer(core, front=False) as grpcio:
        assert grpcio.front is None
        assert grpcio.port != served.port
        through_front = await outcomes(served.port)
        assert through_front == await outcomes(grpcio.port)
    assert served.front is not None
    assert {code for _, code, *_ in through_front} >= {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
    }


async def test_a_request_over_the_message_limit_is_refused_before_it_runs(
    core: Application, stub: pb_grpc.DatabaseServiceStub, metadata: tuple[tuple[str, str], ...]
) -> None:
    limit = core.settings.grpc_max_message_bytes
    big = "SELECT 1 /*" + "x" * limit + "*/"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Query(pb.QueryRequest(sql=big), metadata=metadata)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (info.value.details() or "")
    # The connection is still good for the next call.
    assert rows(await stub.Query(pb.QueryRequest(sql="SELECT 2"), metadata=metadata)) == [(2,)]


async def test_bytes_that_are_not_a_request_are_invalid_argument(
    served: GrpcServer, metadata: tuple[tuple[str, str], ...]
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        raw = channel.unary_unary(QUERY)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff\xff", metadata=metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata() or ())["dbsvc-error-code"] == "invalid_request"


async def test_a_compressed_call_is_relayed_and_answered_as_any_other(
    served: GrpcServer, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert served.front is not None
    _, fast, relayed = served.front.counts()
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{served.port}", compression=grpc.Compression.Gzip
    ) as channel:
        stub = pb_grpc.DatabaseServiceStub(channel)
        result = await stub.Query(
            pb.QueryRequest(sql="SELECT repeat('ab', 500)"), metadata=metadata
        )
    assert rows(result) == [("ab" * 500,)]
    _, fast_after, relayed_after = served.front.counts()
    assert (fast_after - fast, relayed_after - relayed) == (0, 1)


async def test_an_unknown_method_is_unimplemented(served: GrpcServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        missing = channel.unary_unary("/database_service.v1.DatabaseService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await missing(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_client_that_cancels_ends_the_statement(
    core: Application,
    tenant: TenantRecord,
    stub: pb_grpc.DatabaseServiceStub,
    metadata: tuple[tuple[str, str], ...],
) -> None:
    call = stub.Query(pb.QueryRequest(sql="SELECT pg_sleep(30)"), metadata=metadata)
    for _ in range(50):
        if await role_activity(core, tenant):
            break
        await asyncio.sleep(0.1)
    assert await role_activity(core, tenant) != []
    call.cancel()
    await until_idle(core, tenant)
    assert rows(await stub.Query(pb.QueryRequest(sql="SELECT 3"), metadata=metadata)) == [(3,)]


async def test_a_peer_address_a_client_claims_is_not_believed(
    served: GrpcServer, caplog: pytest.LogCaptureFixture
) -> None:
    forged = (
        ("authorization", "Bearer not-a-token"),
        ("x-tenant-id", "acme"),
        ("x-dbsvc-peer", "ipv4:6.6.6.6:1"),
    )
    caplog.set_level(logging.INFO, logger="database_service.api.grpc.calls")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        stub = pb_grpc.DatabaseServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(pb.QueryRequest(sql="SELECT 1"), metadata=forged)  # the front's
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.ExecuteQuery(pb.QueryRequest(sql="SELECT 1"), metadata=forged):
                pass  # relayed to grpcio
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records if "authentication failed" in r.getMessage()]
    assert len(lines) == 2
    assert all("from ipv4:127.0.0.1:" in line and "6.6.6.6" not in line for line in lines)


async def test_shutdown_lets_a_call_in_flight_finish_and_refuses_new_connections(
    core: Application, tenant: TenantRecord, metadata: tuple[tuple[str, str], ...]
) -> None:
    server = GrpcServer(core)
    await server.__aenter__()
    token = metadata[0][1].removeprefix("Bearer ")
    async with Client(f"127.0.0.1:{server.port}", tenant.tenant_id, token, retries=0) as c:
        await c.fetch_all("SELECT 1")
        slow = asyncio.create_task(c.fetch_all("SELECT pg_sleep(0.5), 7"))
        for _ in range(50):
            if await role_activity(core, tenant):
                break
            await asyncio.sleep(0.02)
        await server.__aexit__(None, None, None)
        assert (await slow).rows[0][1] == 7
    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.close()


async def test_the_health_document_says_who_serves_the_port(
    core: Application, served: GrpcServer, stub: pb_grpc.DatabaseServiceStub, metadata: tuple
) -> None:
    await stub.Query(pb.QueryRequest(sql="SELECT 1"), metadata=metadata)
    # The document has the section of the first server of the process (here the session's).
    assert core.health.sections["grpc"]()["front"] == "compiled"
    section = served.health()
    assert (section["front"], section["port"]) == ("compiled", served.port)
    assert section["connections"] >= 1 and section["fast_calls"] >= 1
    async with GrpcServer(core, front=False) as grpcio:
        assert grpcio.health()["front"] == "grpcio"
        assert grpcio.health()["front_absent"] == "off (DBSVC_GRPC_FRONT=false)"
