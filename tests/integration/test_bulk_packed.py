"""Bulk rows packed as one JSON array (``BulkInsertRequest.packed``) against a real PostgreSQL:
the same rows and the same errors as Row/Value messages, at a fraction of the cost."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal
from typing import Any

import grpc
import orjson
import pytest

from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from database_service_client import InvalidArgument
from database_service_client import MultiDatabaseClient as Client
from database_service_client._proto import database_service_pb2 as pb
from database_service_client.values import pack_rows, to_row
from tests.fix_service import ClientFactory, TenantFactory

ALL = (Scope.READ, Scope.WRITE, Scope.ADMIN)
COLUMNS = ["i", "f", "n", "b", "ts", "tsn", "d", "u", "j", "a", "t"]
TABLE = """CREATE TABLE typed (
    i int8, f float8, n numeric, b bool, ts timestamptz, tsn timestamp, d date, u uuid,
    j jsonb, a int4[], t text)"""
MOMENT = dt.datetime(2026, 3, 4, 5, 6, 7, 891234, tzinfo=dt.UTC)
ROWS: list[tuple[Any, ...]] = [
    (1, 1.5, Decimal("12.345678901234567890"), True, MOMENT, MOMENT.replace(tzinfo=None),
     dt.date(2026, 1, 2), uuid.UUID(int=7), {"k": [1, "x"]}, [1, None, 3], "plain"),
    (2, math.nan, Decimal("-0.1"), False, MOMENT.replace(tzinfo=None), MOMENT, "2026-01-03",
     str(uuid.UUID(int=8)), [1, 2], [], "ünïcødé \t\n\\ \"quoted\""),
    (3, math.inf, 7, None, "2026-03-04T05:06:07+02:00", "2026-03-04T05:06:07", None, None,
     None, None, ""),
    (4, -math.inf, "1e-3", True, None, None, None, None, "a string", [2**31 - 1], None),
    (5, 3, None, False, None, None, None, None, 0, None, "x" * 10_000),
]  # fmt: skip


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("packed")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> Client:
    client = await client_for(tenant, ALL)
    await client.fetch_all(TABLE)
    return client


async def stream(*messages: pb.BulkInsertRequest) -> AsyncIterator[pb.BulkInsertRequest]:
    for message in messages:
        yield message


async def raw_insert(client: Client, *messages: pb.BulkInsertRequest) -> pb.BulkInsertResponse:
    first = pb.BulkInsertRequest(table="typed", columns=COLUMNS)
    response: pb.BulkInsertResponse = await client.stub.BulkInsert(
        stream(first, *messages), metadata=client._metadata()
    )
    return response


async def contents(client: Client) -> list[tuple[Any, ...]]:
    # Text forms compare every type exactly, NaN included.
    cols = ", ".join(f"{c}::text" for c in COLUMNS)
    return (await client.fetch_all(f"SELECT {cols} FROM typed ORDER BY i")).rows


def test_pack_rows_writes_one_json_array_with_non_finite_floats_as_strings() -> None:
    packed = pack_rows([(1, math.nan, Decimal("1.10")), (None, -math.inf, math.inf)])
    assert packed is not None
    assert orjson.loads(packed) == [[1, "NaN", "1.10"], [None, "-Infinity", "Infinity"]]


@pytest.mark.parametrize("value", [b"\x00bytes", 2**64, object()])
def test_pack_rows_leaves_to_values_what_json_cannot_carry(value: object) -> None:
    assert pack_rows([("a", value)]) is None


async def test_packed_and_value_rows_store_the_same(client: Client) -> None:
    assert await client.bulk_insert("typed", COLUMNS, ROWS) == len(ROWS)
    packed = await contents(client)
    await client.fetch_all("TRUNCATE typed")
    response = await raw_insert(client, pb.BulkInsertRequest(rows=[to_row(r) for r in ROWS]))
    assert response.rows_written == response.rows_sent == len(ROWS)
    assert await contents(client) == packed
    assert packed[1][1] == "NaN" and packed[2][1] == "Infinity" and packed[3][1] == "-Infinity"
    assert packed[0][2] == "12.345678901234567890"  # exact, not through a float


async def test_mixed_batches_of_packed_and_values_are_one_load(client: Client) -> None:
    rows = [
        (i, float(i), None, None, None, None, None, None, None, None, f"r{i}") for i in range(9)
    ]
    with_bytes = [*rows, (9, 9.0, None, None, None, None, None, None, None, None, "last")]
    written = await client.bulk_insert("typed", COLUMNS, with_bytes, batch_size=4)
    assert written == 10
    # A batch JSON cannot carry goes as Values, in the same stream and transaction.
    await client.fetch_all("CREATE TABLE blobs (k int, v bytea)")
    blobs = [(1, "text-free"), (2, b"\x00\xff")]
    with pytest.raises(InvalidArgument, match="row 1, column v"):  # bytea wants bytes or base64
        await client.bulk_insert("blobs", ["k", "v"], blobs, batch_size=1)
    assert (await client.fetch_all("SELECT count(*) FROM blobs")).rows == [(0,)]
    await client.bulk_insert("blobs", ["k", "v"], [(1, "AP8="), (2, b"\x00\xff")], batch_size=1)
    stored = await client.fetch_all("SELECT v FROM blobs ORDER BY k")
    assert stored.rows == [(b"\x00\xff",), (b"\x00\xff",)]


@pytest.mark.parametrize(
    ("packed", "message"),
    [
        (b"[[1, 2.0", "not JSON"),
        (b'{"i": 1}', "array of arrays"),
        (b"[1, 2]", "array of arrays"),
        (b'[[1], {"i": 2}]', "array of arrays"),
        (b"[[1, 2]]", "row 1: 2 values for 11 columns"),
        (b'[[1,1,1,true,null,null,null,null,null,null,"a"],["x",1,1,true,null,null,null,null,null,null,"b"]]', "row 2, column i"),
        (b'[[1,"1.5x",null,null,null,null,null,null,null,null,null]]', "row 1, column f"),
        (b'[[1,1,null,"maybe",null,null,null,null,null,null,null]]', "row 1, column b"),
        (b'[[1,1,null,null,"yesterday",null,null,null,null,null,null]]', "row 1, column ts"),
        (b'[[1,1,null,null,null,null,null,null,null,null,5]]', "row 1, column t"),
        (b'[[true,1,null,null,null,null,null,null,null,null,null]]', "row 1, column i"),
    ],
)  # fmt: skip
async def test_bad_packed_rows_are_refused_and_write_nothing(
    client: Client, packed: bytes, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_insert(client, pb.BulkInsertRequest(packed=packed))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or ""), info.value.details()
    assert await contents(client) == []


async def test_a_bad_row_is_numbered_within_the_whole_load(client: Client) -> None:
    rows = list(_rows(10))
    rows[9] = (9, "nine", *rows[9][2:])
    with pytest.raises(InvalidArgument, match="row 10, column f"):
        await client.bulk_insert("typed", COLUMNS, rows, batch_size=4)
    assert await contents(client) == []


async def test_a_message_with_rows_and_packed_rows_is_refused(client: Client) -> None:
    both = pb.BulkInsertRequest(rows=[to_row(ROWS[0])], packed=pack_rows([ROWS[1]]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_insert(client, both)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "not both" in (info.value.details() or "")
    assert await contents(client) == []


async def test_bulk_update_takes_packed_rows(client: Client) -> None:
    await client.bulk_insert("typed", COLUMNS, ROWS)
    updated = await client.bulk_update(
        "typed", ["i"], ["n", "t"], [(1, Decimal("0.5"), "one"), (5, "2.5", "five"), (99, 1, "-")]
    )
    assert updated == 2
    rows = (await client.fetch_all("SELECT i, n::text, t FROM typed WHERE i IN (1, 5)")).rows
    assert sorted(rows) == [(1, "0.5", "one"), (5, "2.5", "five")]


def _rows(count: int) -> Sequence[tuple[Any, ...]]:
    return [(i, i / 3, None, i % 2 == 0, MOMENT, None, None, None, None, None, f"t{i}")
            for i in range(count)]  # fmt: skip


async def test_a_large_packed_load_is_one_transaction(client: Client) -> None:
    assert await client.bulk_insert("typed", COLUMNS, _rows(20_000), batch_size=5000) == 20_000
    total = await client.fetch_all(
        "SELECT count(*), sum(i), bool_and(ts = $1) FROM typed", [MOMENT]
    )
    assert total.rows == [(20_000, sum(range(20_000)), True)]
