"""StreamQuery: a bidirectional stream where the client pulls result chunks and can cancel.

The statement advances a sequence for every row it produces, so how far the server's cursor got
is visible from another connection while the client reads (or does not).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from database_service_client import InvalidArgument
from database_service_client import MultiDatabaseClient as Client
from database_service_client._proto import database_service_pb2 as pb
from tests.fix_service import ClientFactory, TenantFactory

ROWS = 100_000
COUNTED = "SELECT g, nextval('produced') FROM generate_series(1, $1::int) g"


@pytest.fixture
async def tenant(new_tenant: TenantFactory, core: Application) -> TenantRecord:
    record = await new_tenant("stream")
    await core.owner_pool.execute(f"CREATE SEQUENCE {record.schema_name}.produced")
    await core.owner_pool.execute(
        f"GRANT USAGE, SELECT ON SEQUENCE {record.schema_name}.produced TO {record.role_name}"
    )
    return record


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> Client:
    return await client_for(tenant, (Scope.READ, Scope.WRITE))


async def produced(core: Application, tenant: TenantRecord) -> int:
    value = await core.owner_pool.fetchval(
        f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {tenant.schema_name}.produced"
    )
    return int(value)


async def test_the_whole_result_arrives_in_pulled_chunks(client: Client) -> None:
    stream = client.stream_query(
        "SELECT g, 'row ' || g FROM generate_series(1, $1::int) g", [20_000], max_chunk_bytes=4096
    )
    rows = [row async for row in stream]
    assert rows == [(g, f"row {g}") for g in range(1, 20_001)]
    assert stream.summary is not None and stream.summary.row_count == 20_000
    assert stream.messages > 20  # many small messages, each asked for
    assert [c.name for c in stream.columns] == ["g", "?column?"]


async def test_a_reader_that_stops_reading_holds_the_server_back(
    client: Client, core: Application, tenant: TenantRecord
) -> None:
    stream = client.stream_query(COUNTED, [ROWS], window=2, max_chunk_bytes=2048)
    rows = aiter(stream)
    first = await anext(rows)
    assert first[0] == 1
    await asyncio.sleep(0.5)  # the reader pauses: the cursor must not run ahead
    paused = await produced(core, tenant)
    print(f"\nrows produced while the reader paused: {paused} of {ROWS}")
    assert paused < ROWS // 10
    rest = [row async for row in rows]
    assert len(rest) == ROWS - 1
    assert await produced(core, tenant) == ROWS


async def test_cancel_mid_result_stops_the_statement_and_frees_the_connection(
    client: Client, core: Application, tenant: TenantRecord
) -> None:
    stream = client.stream_query(COUNTED, [ROWS], window=2, max_chunk_bytes=2048)
    async for row in stream:
        if row[0] == 10:
            break  # leaving the loop cancels
    for _ in range(50):
        pool = core.pools.stats().get(tenant.tenant_id)
        if pool is None or pool.in_use == 0:
            break
        await asyncio.sleep(0.05)
    assert pool is None or pool.in_use == 0
    stopped = await produced(core, tenant)
    await asyncio.sleep(0.3)
    assert await produced(core, tenant) == stopped < ROWS


async def test_the_first_message_must_be_the_query(client: Client) -> None:
    async def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamQueryRequest(pull=3)

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _message in client.stub.StreamQuery(requests(), metadata=client._metadata()):
            pass
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_errors_arrive_as_the_clients_exceptions(client: Client) -> None:
    with pytest.raises(InvalidArgument):
        async for _row in client.stream_query("SELEC 1"):
            pass
