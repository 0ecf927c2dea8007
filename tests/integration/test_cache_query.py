"""The result cache on the query path (L1 and PostgreSQL's notifications, as ``make run`` has
them): a read asked to be cached is answered from the cache until a write invalidates what it
read — whichever path wrote it: a statement, a transaction, a bulk load, or a write straight
into PostgreSQL — and a read that cannot be cached safely says why."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.query.caching import TableKey
from database_service.tenancy import TenantRecord
from database_service_client import MultiDatabaseClient
from tests.fix_service import ClientFactory, TenantFactory, TokenFactory

TTL = dt.timedelta(seconds=30)


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("cache")


@pytest.fixture
async def client(
    client_for: ClientFactory, tenant: TenantRecord
) -> AsyncIterator[MultiDatabaseClient]:
    c = await client_for(tenant, (Scope.READ, Scope.WRITE, Scope.ADMIN))
    await c.fetch_all("CREATE TABLE holdings (id int PRIMARY KEY, qty int)")
    await c.fetch_all("INSERT INTO holdings VALUES (1, 10), (2, 20)")
    yield c


async def warm(client: MultiDatabaseClient) -> None:
    """Read row 1 until it is a hit: PostgreSQL's notifications of the fixture's writes arrive
    a moment after them, and invalidate (once more) what the writes already did."""
    for _ in range(100):
        if (await qty(client))[1] == "hit":
            return
        await asyncio.sleep(0.02)
    raise AssertionError("row 1 never became a hit")


async def qty(client: MultiDatabaseClient) -> tuple[int | None, str]:
    result = await client.fetch_all("SELECT qty FROM holdings WHERE id = $1", [1], cache=TTL)
    return (result.rows[0][0] if result.rows else None), result.cache


async def test_a_cached_read_is_a_miss_then_a_hit(client: MultiDatabaseClient) -> None:
    assert await qty(client) == (10, "miss")
    await warm(client)
    assert await qty(client) == (10, "hit")


async def test_a_read_without_the_option_is_not_cached(client: MultiDatabaseClient) -> None:
    result = await client.fetch_all("SELECT qty FROM holdings WHERE id = 1")
    assert result.cache == ""


@pytest.mark.parametrize(
    "write",
    [
        "UPDATE holdings SET qty = 11 WHERE id = 1",
        "DELETE FROM holdings WHERE id = 1",
        "UPDATE holdings SET qty = qty + 1 WHERE qty > 0",  # rows not named by key
        "UPDATE holdings SET id = 7 WHERE id = 2",  # a key changed: any key
        "INSERT INTO holdings VALUES (2, 5) ON CONFLICT (id) DO UPDATE SET qty = 1",
        "INSERT INTO holdings SELECT 3, 30",
        "WITH u AS (UPDATE holdings SET qty = qty WHERE id = 2 RETURNING 1) SELECT count(*) FROM u",
        "DELETE FROM holdings",
    ],
)
async def test_a_write_through_the_service_invalidates_at_once(
    client: MultiDatabaseClient, write: str
) -> None:
    await warm(client)
    await client.fetch_all(write)
    assert (await qty(client))[1] == "miss"


@pytest.mark.parametrize(
    "write",
    [
        "UPDATE holdings SET qty = 21 WHERE id = 2",
        "DELETE FROM holdings WHERE id = 2",
        "INSERT INTO holdings (id, qty) VALUES (3, 30), ($1, 40)",
        "INSERT INTO holdings (id, qty) VALUES (2, 5) ON CONFLICT (id) DO UPDATE SET qty = 1",
    ],
)
async def test_a_keyed_write_leaves_other_keys_cached(
    client: MultiDatabaseClient, write: str
) -> None:
    await warm(client)
    await client.fetch_all(write, [4] if "$1" in write else [])
    assert await qty(client) == (10, "hit")
    # A read that is not by key depends on every row.
    total = "SELECT sum(qty) FROM holdings"
    first = await client.fetch_all(total, cache=TTL)
    await client.fetch_all("UPDATE holdings SET qty = qty WHERE id = 2")
    again = await client.fetch_all(total, cache=TTL)
    assert (first.cache, again.cache) == ("miss", "miss")


async def test_a_write_straight_into_postgres_invalidates_only_its_keys(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    await warm(client)
    owner = await asyncpg.connect(core.endpoints.postgres_dsn)
    try:
        await owner.execute(f"UPDATE {tenant.schema_name}.holdings SET qty = 98 WHERE id = 2")
        await asyncio.sleep(0.3)  # the notification has been applied by now
        assert await qty(client) == (10, "hit")
        await owner.execute(f"TRUNCATE {tenant.schema_name}.holdings")
        for _ in range(100):
            result = await client.fetch_all(
                "SELECT qty FROM holdings WHERE id = $1", [1], cache=TTL
            )
            if not result.rows:
                break
            await asyncio.sleep(0.02)
        assert result.rows == []
    finally:
        await owner.close()


async def test_a_transaction_invalidates_what_it_wrote(client: MultiDatabaseClient) -> None:
    await warm(client)
    await client.transaction(["UPDATE holdings SET qty = 12 WHERE id = 1", "SELECT 1"])
    assert await qty(client) == (12, "miss")


async def test_a_bulk_insert_invalidates_its_table(client: MultiDatabaseClient) -> None:
    count = "SELECT count(*) FROM holdings"
    assert (await client.fetch_all(count, cache=TTL)).rows == [(2,)]
    await client.bulk_insert("holdings", ["id", "qty"], [(10, 1), (11, 2)])
    result = await client.fetch_all(count, cache=TTL)
    assert (result.rows, result.cache) == ([(4,)], "miss")


async def test_a_write_straight_into_postgres_invalidates_within_moments(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    await warm(client)
    dsn = core.endpoints.postgres_dsn
    owner = await asyncpg.connect(dsn)
    try:  # an operator's psql
        await owner.execute(f"UPDATE {tenant.schema_name}.holdings SET qty = 99 WHERE id = 1")
    finally:
        await owner.close()
    for _ in range(100):
        value, _ = await qty(client)
        if value == 99:
            break
        await asyncio.sleep(0.02)
    assert value == 99


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("SELECT now(), qty FROM holdings", "volatile_function"),
        ("SELECT random()", "volatile_function"),
        ("SELECT qty FROM holdings FOR UPDATE", None),  # a write by classification
        ("SELECT * FROM pg_class LIMIT 1", None),  # refused by the SQL guard first
    ],
)
async def test_a_read_that_cannot_be_cached_says_why(
    client: MultiDatabaseClient, sql: str, code: str | None
) -> None:
    try:
        result = await client.fetch_all(sql, cache=TTL)
    except Exception:  # the guard's refusal: nothing cached either
        assert code is None
        return
    if code is None:
        assert result.cache in ("", "bypass")
    else:
        assert result.cache == "bypass"
        assert result.cache_reason


async def test_the_rest_front_end_caches_and_says_so(
    http: httpx.AsyncClient,
    service_headers: TokenFactory,
    client: MultiDatabaseClient,
    tenant: TenantRecord,
) -> None:
    await warm(client)
    headers = await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE))
    body = {
        "sql": "SELECT qty FROM holdings WHERE id = $1",
        "params": [2],
        "tenant_id": tenant.tenant_id,
        "cache_ttl_ms": 30_000,
    }
    first = await http.post("/api/v1/query", json=body, headers=headers)
    second = await http.post("/api/v1/query", json=body, headers=headers)
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["cache"]["status"] == "miss"
    assert second.json()["cache"]["status"] == "hit"
    assert second.headers["x-cache"] == "hit"
    assert second.json()["rows"] == first.json()["rows"] == [[20]]


async def test_a_stampede_runs_the_query_once(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    # Slow (a tenth of a second or so) but cacheable: immutable functions only.
    slow = "(SELECT sum(x) FROM unnest(array_fill(1, ARRAY[2000000])) x)"
    sql = f"SELECT qty, {slow} FROM holdings WHERE id = 1 AND {secrets.randbits(16)} > 0"
    before = core.result_cache.local.stats.loads
    results = await asyncio.gather(*(client.fetch_all(sql, cache=TTL) for _ in range(10)))
    assert {r.rows[0][0] for r in results} == {10}
    assert core.result_cache.local.stats.loads - before == 1


async def test_a_tenants_rules_cache_reads_of_ruled_tables_without_asking(
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    client: MultiDatabaseClient,
    tenant: TenantRecord,
) -> None:
    await warm(client)
    path = f"/api/v1/admin/tenants/{tenant.tenant_id}/cache-rules"
    put = await http.put(path, json={"rules": {"holdings": 2000}}, headers=admin_headers)
    assert put.status_code == 200, put.text
    assert (await http.get(path, headers=admin_headers)).json() == {"rules": {"holdings": 2000}}
    read = "SELECT qty FROM holdings WHERE id = 2"
    assert (await client.fetch_all(read)).cache == "miss"
    assert (await client.fetch_all(read)).cache == "hit"
    # A read of a table without a rule is not cached by them.
    other = await client.fetch_all("SELECT count(*) FROM positions")
    assert other.cache in ("", "off")
    bad = await http.put(path, json={"rules": {"x; drop": 5}}, headers=admin_headers)
    assert bad.status_code == 400, bad.text
    cleared = await http.put(path, json={"rules": {}}, headers=admin_headers)
    assert cleared.json() == {"rules": {}}
    assert (await client.fetch_all(read)).cache in ("", "off")


def _table_keys(core: Application, tenant: TenantRecord) -> dict[str, TableKey]:
    """The holdings table's kept primary key(s), by schema generation."""
    caching = core.executor._caching
    assert caching is not None
    return {
        f"{generation}": kept
        for (schema, table, generation), kept in caching._keys.items()
        if schema == tenant.schema_name and table == "holdings"
    }


async def test_a_point_reads_plan_outlives_its_table_key_read_again_unchanged(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    """When a table's primary key is read again and is the same (every ``_KEYS_TTL_S``), the
    plans made from it stay valid: a hot key is not planned again because the table key's time
    came, nor does a key read less often than that go the whole way every time."""
    await warm(client)
    replays = core.metrics.cache_replays._value.get()
    [kept] = _table_keys(core, tenant).values()
    kept.until = 0.0  # its time has come
    assert (await qty(client))[1] == "hit"  # the whole way: the key read again, unchanged
    [again] = _table_keys(core, tenant).values()
    assert again is kept and kept.until > 0  # the same key, trusted again
    assert await qty(client) == (10, "hit")
    core.executor.book()
    assert core.metrics.cache_replays._value.get() > replays  # replayed with the same plan


async def test_a_primary_key_changed_outside_the_service_replaces_the_plans(
    core: Application, client: MultiDatabaseClient, tenant: TenantRecord
) -> None:
    """DDL outside the service that changes a table's primary key is seen when the key is read
    again: the plans made from the old key are no longer used, and a write by the new key's
    rows invalidates the read (as a relation: ``id`` alone no longer names a row)."""
    await warm(client)
    [kept] = _table_keys(core, tenant).values()
    owner = await asyncpg.connect(core.endpoints.postgres_dsn)
    try:
        table = f"{tenant.schema_name}.holdings"
        await owner.execute(f"ALTER TABLE {table} DROP CONSTRAINT holdings_pkey")
        await owner.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id, qty)")
    finally:
        await owner.close()
    kept.until = 0.0
    await qty(client)
    [again] = _table_keys(core, tenant).values()
    assert again is not kept and again.key != kept.key
    assert kept.until == 0.0  # the old key's plans stay expired
    await warm(client)
    await client.fetch_all("UPDATE holdings SET qty = 12 WHERE id = 1 AND qty = 10")
    assert await qty(client) == (12, "miss")
