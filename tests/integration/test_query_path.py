"""The query path's fast lanes keep every promise of the slow ones: a small read in one round trip,
a larger one read again by cursor (never a statement that writes), results bounded by bytes and
refused having changed nothing, the unary ``Query`` call and packed rows exact for every type."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from decimal import Decimal

import grpc
import pytest
from asyncpg.transaction import Transaction

from database_service.app import Application
from database_service.auth import Scope
from database_service.postgres import TenantConnection
from database_service.query import executor as executor_module
from database_service.tenancy import TenantRecord
from database_service_client import MultiDatabaseClient
from database_service_client._proto import database_service_pb2 as pb
from tests.fix_service import ClientFactory, TenantFactory

FIRST = executor_module._FIRST_ROWS


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("qpath")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> MultiDatabaseClient:
    # admin: the tests create their own tables, sequences and functions.
    return await client_for(tenant, (Scope.READ, Scope.WRITE, Scope.ADMIN))


@pytest.fixture
def begins(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The transactions asyncpg begins from now on (the gRPC server runs in this process)."""
    started: list[str] = []
    original = Transaction.start

    async def start(self: Transaction) -> None:
        started.append("BEGIN")
        await original(self)

    monkeypatch.setattr(Transaction, "start", start)
    return started


@pytest.fixture
def resets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The resets tenant connections' releases sent. A release that needs none asks and gets
    "", which is not recorded: a connection kept from an earlier request is given back that way
    once it has been kept a second (``TenantPools._expire_kept``), whenever that falls."""
    sent: list[str] = []
    original = TenantConnection.get_reset_query

    def get_reset_query(self: TenantConnection) -> str:
        query = original(self)
        if query:
            sent.append(query)
        return query

    monkeypatch.setattr(TenantConnection, "get_reset_query", get_reset_query)
    return sent


async def test_a_small_repeatable_read_releases_without_a_reset_round_trip(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord, resets: list[str]
) -> None:
    await client.fetch_all("SELECT g FROM generate_series(1, 3) AS g")
    await core.pools.drain()
    # Kept for the tenant's next request: no reset sent.
    assert resets == []
    kept = [e.ready for e in core.pools._entries.values() if e.tenant_id == tenant.tenant_id]
    assert sum(map(len, kept)) == 1


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE IF NOT EXISTS reset_probe (n int)",
        "INSERT INTO reset_probe VALUES (1)",
        "SELECT nextval('reset_seq')",  # a read that is not repeatable
        "SELECT g FROM generate_series(1, 3000) AS g",  # past the first rows: a cursor
    ],
)
async def test_every_other_session_is_reset_on_release(
    core: Application, client: MultiDatabaseClient, resets: list[str], sql: str
) -> None:
    await client.fetch_all("CREATE TABLE IF NOT EXISTS reset_probe (n int)")
    await client.fetch_all("CREATE SEQUENCE IF NOT EXISTS reset_seq")
    await core.pools.drain()
    resets.clear()
    await client.fetch_all(sql)
    await core.pools.drain()
    assert resets == ["CLOSE ALL;\nUNLISTEN *;\nRESET ALL;"]


async def test_a_read_only_callers_session_is_reset_on_release(
    core: Application, client_for: ClientFactory, tenant: TenantRecord, resets: list[str]
) -> None:
    reader = await client_for(tenant, (Scope.READ,))
    await reader.fetch_all("SELECT 1")
    await core.pools.drain()
    assert resets == ["CLOSE ALL;\nUNLISTEN *;\nRESET ALL;"]


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_a_small_read_outside_a_transaction_takes_no_begin(
    client: MultiDatabaseClient, begins: list[str], how: str
) -> None:
    sql = "SELECT g FROM generate_series(1, 3) AS g"
    if how == "unary":
        rows = (await client.fetch_all(sql)).rows
    else:
        rows = [row async for row in client.execute_query(sql)]
    assert [r[0] for r in rows] == [1, 2, 3]
    assert begins == []
    # A larger one is read by cursor, which needs a transaction.
    await client.fetch_all("SELECT g FROM generate_series(1, $1::int) AS g", [FIRST + 1])
    assert begins == ["BEGIN"]


async def test_a_read_only_caller_still_runs_in_a_read_only_transaction(
    client_for: ClientFactory, tenant: TenantRecord, begins: list[str]
) -> None:
    reader = await client_for(tenant, (Scope.READ,))
    assert (await reader.fetch_all("SELECT 1")).rows == [(1,)]
    assert begins == ["BEGIN"]
    # Inside it, a small read still takes one round trip (no cursor): one BEGIN per request.
    small = await reader.fetch_all("SELECT g FROM generate_series(1, 3) g")
    assert small.rows == [(1,), (2,), (3,)]
    assert begins == ["BEGIN", "BEGIN"]


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_a_read_larger_than_the_first_rows_comes_back_whole(
    client: MultiDatabaseClient, how: str
) -> None:
    n = FIRST * 2 + 7
    sql = "SELECT g, md5(g::text) FROM generate_series(1, $1::int) AS g"
    if how == "unary":
        rows = (await client.fetch_all(sql, [n])).rows
    else:
        rows = [row async for row in client.execute_query(sql, [n])]
    assert [r[0] for r in rows] == list(range(1, n + 1))


@pytest.mark.parametrize("how", ["unary", "stream"])
async def test_a_large_read_that_advances_a_sequence_runs_once(
    client: MultiDatabaseClient, how: str
) -> None:
    """Not repeatable (nextval writes): never read a first time outside a transaction and then
    again by cursor, which would advance the sequence twice."""
    await client.fetch_all("CREATE SEQUENCE once_seq")
    n = FIRST + 10
    sql = "SELECT nextval('once_seq') FROM generate_series(1, $1::int)"
    if how == "unary":
        rows = (await client.fetch_all(sql, [n])).rows
    else:
        rows = [row async for row in client.execute_query(sql, [n])]
    assert [r[0] for r in rows] == list(range(1, n + 1))
    after = await client.fetch_all("SELECT last_value FROM once_seq")
    assert after.rows == [(n,)]


async def test_a_large_read_calling_a_function_of_the_tenant_runs_once(
    client: MultiDatabaseClient,
) -> None:
    await client.fetch_all("CREATE TABLE calls (n int)")
    await client.fetch_all(
        "CREATE FUNCTION counted(i int) RETURNS int LANGUAGE sql VOLATILE"
        " AS 'INSERT INTO calls VALUES (i) RETURNING i'"
    )
    n = FIRST + 3
    rows = (await client.fetch_all("SELECT counted(g) FROM generate_series(1, $1) g", [n])).rows
    assert len(rows) == n
    assert (await client.fetch_all("SELECT count(*) FROM calls")).rows == [(n,)]


async def test_a_result_past_the_byte_limit_is_refused_by_query_and_streamed_by_fetch_all(
    core: Application,
    client: MultiDatabaseClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(core.executor, "_max_bytes", 200_000)
    sql = "SELECT g, repeat('x', 1000) FROM generate_series(1, 1000) AS g"  # ~1 MB
    call = client.stub.Query(pb.QueryRequest(sql=sql), metadata=client._metadata())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing.get("dbsvc-error-code") == "result_too_large"
    # The client falls back to the stream, which has no whole-result limit.
    rows = (await client.fetch_all(sql)).rows
    assert len(rows) == 1000 and rows[-1][1] == "x" * 1000


async def test_a_write_returning_more_than_the_limit_changes_nothing(
    core: Application,
    client_for: ClientFactory,
    tenant: TenantRecord,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = await client_for(tenant, (Scope.READ, Scope.WRITE, Scope.ADMIN))
    await client.fetch_all("CREATE TABLE wide (n int, pad text)")
    monkeypatch.setattr(core.executor, "_max_bytes", 100_000)
    request = pb.QueryRequest(
        sql="INSERT INTO wide SELECT g, repeat('y', 1000) FROM generate_series(1, 500) g"
        " RETURNING n, pad"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.Query(request, metadata=client._metadata())
    assert dict(info.value.trailing_metadata() or ()).get("dbsvc-error-code") == (
        "result_too_large"
    )
    assert (await client.fetch_all("SELECT count(*) FROM wide")).rows == [(0,)]


async def test_packed_rows_carry_every_type_exactly(client: MultiDatabaseClient) -> None:
    at = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    one = uuid.UUID("12345678-1234-5678-1234-567812345678")
    sql = (
        "SELECT 9007199254740993::int8 AS big, 1.5::float8 AS f, 'NaN'::numeric AS dn,"
        " 12345678901234567890.123456789::numeric AS d, 'tekst ✓'::text AS t,"
        " '\\x00ff10'::bytea AS b, true AS yes, $1::timestamptz AS at,"
        " '2024-05-06 07:08:09'::timestamp AS naive, '{\"k\": [1, null]}'::jsonb AS doc,"
        " $2::uuid AS id, '2024-02-29'::date AS day, ARRAY[1, 2] AS arr, NULL::text AS nothing"
    )
    expected = (
        9007199254740993,
        1.5,
        Decimal("NaN"),
        Decimal("12345678901234567890.123456789"),
        "tekst ✓",
        b"\x00\xff\x10",
        True,
        at,
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
        {"k": [1, None]},
        str(one),
        "2024-02-29",
        [1, 2],
        None,
    )
    unary = (await client.fetch_all(sql, [at, str(one)])).rows
    streamed = [row async for row in client.execute_query(sql, [at, str(one)])]
    for rows in (unary, streamed):
        (row,) = rows
        assert row[2].is_nan()
        assert row[:2] == expected[:2] and row[3:] == expected[3:]


async def test_non_finite_floats_survive_both_paths(client: MultiDatabaseClient) -> None:
    sql = "SELECT x FROM unnest(ARRAY['NaN', 'Infinity', '-Infinity', '0']::float8[]) AS x"
    for rows in (
        (await client.fetch_all(sql)).rows,
        [row async for row in client.execute_query(sql)],
    ):
        values = [r[0] for r in rows]
        assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf, 0.0]


async def test_statements_answered_are_audited_and_counted_as_one_at_a_time(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    """Their bookkeeping is done together every few milliseconds (``QueryExecutor.book``):
    each still gets its own audit row, with its class, its command and its time."""
    control = core.settings.control_schema
    before = core.metrics.registry.get_sample_value(
        "dbsvc_statements_total", {"store": "postgresql", "kind": "read"}
    )
    started = dt.datetime.now(dt.UTC)
    for _ in range(3):  # the second and third skip the checks: checked before
        await client.fetch_all("SELECT g FROM generate_series(1, 2) AS g")
    await client.fetch_all("SELECT g FROM generate_series(1, $1::int) AS g", [3])
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        "SELECT at, service, action, statement_class, outcome, code, detail"
        f" FROM \"{control}\".audit_log WHERE tenant_id = $1 AND action = 'query' ORDER BY id",
        tenant.tenant_id,
    )
    assert [(r["statement_class"], r["outcome"], r["code"], r["detail"]) for r in rows] == [
        ("read", "ok", "SELECT 2", None)
    ] * 3 + [("read", "ok", "SELECT 3", None)]
    assert all(r["service"] == rows[0]["service"] and r["at"] >= started for r in rows)
    after = core.metrics.registry.get_sample_value(
        "dbsvc_statements_total", {"store": "postgresql", "kind": "read"}
    )
    assert (after or 0) - (before or 0) == 4
