"""Tenant A attacks tenant B through every gRPC RPC, by metadata and by field.

A's token names only A. Naming B in ``x-tenant-id`` is refused before anything runs; naming B's
schema or rows in SQL, bulk targets or forged columns is refused by the guard or by PostgreSQL;
every read returns only A's rows. B's data is compared with a snapshot after each attack.
"""

from __future__ import annotations

import datetime as dt

import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client import (
    DatabaseServiceError,
    InvalidArgument,
    MultiDatabaseClient,
    PermissionDenied,
)
from tests.fix_service import ClientFactory
from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

ALL = (Scope.READ, Scope.WRITE, Scope.ADMIN)


@pytest.fixture
async def as_a_naming_b(client_for: ClientFactory, tenants: Tenants) -> MultiDatabaseClient:
    """A's token (only tenant A), but x-tenant-id says B."""
    client = await client_for(tenants.a, ALL)
    client.tenant_id = tenants.b.tenant_id
    return client


@pytest.fixture
async def as_a(client_for: ClientFactory, tenants: Tenants) -> MultiDatabaseClient:
    return await client_for(tenants.a, ALL)


@pytest.fixture(params=["packed", "values"])
async def as_a_bulk(
    request: pytest.FixtureRequest, as_a: MultiDatabaseClient, monkeypatch: pytest.MonkeyPatch
) -> MultiDatabaseClient:
    """A, sending bulk rows packed (one JSON array per batch) or as Value messages."""
    if request.param == "values":
        monkeypatch.setattr("database_service_client.client.pack_rows", lambda rows: None)
    return as_a


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


CALLS_NAMING_B = {
    "ExecuteQuery": lambda c: c.fetch_all("SELECT * FROM users"),
    "ExecuteAnalyticsQuery": lambda c: c.analytics_query("SELECT * FROM users").fetch_all(),
    "GetTimeSeriesData": lambda c: c.time_series("EURUSD", now() - dt.timedelta(days=1), now()),
    "ExecuteTransaction": lambda c: c.transaction(["SELECT * FROM users"]),
    "BulkInsert": lambda c: c.bulk_insert(
        "users", ["user_id", "email", "subscription_tier"], [("x", "x@x", "pro")]
    ),
    "BulkUpdate": lambda c: c.bulk_update("users", ["user_id"], ["email"], [("b-user", "pwned@x")]),
    "ManagePartitions": lambda c: c.partitions(),
}


@pytest.mark.parametrize("call", CALLS_NAMING_B.values(), ids=CALLS_NAMING_B.keys())
async def test_token_for_a_cannot_name_b_in_metadata(
    as_a_naming_b: MultiDatabaseClient, call
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PermissionDenied) as info:
        await call(as_a_naming_b)
    assert SECRET not in str(info.value)


async def test_create_tenant_schema_for_any_tenant_needs_admin_over_it(
    as_a: MultiDatabaseClient,
) -> None:
    with pytest.raises(PermissionDenied):
        await as_a.create_tenant_schema("hijacked_tenant")


SQL_ATTACKS = {
    "ExecuteQuery": lambda c, t: c.fetch_all(f"SELECT * FROM {t.b.schema_name}.users"),
    "ExecuteAnalyticsQuery": lambda c, t: c.analytics_query(
        f"SELECT * FROM {t.b.schema_name}.users"
    ).fetch_all(),
    "ExecuteTransaction": lambda c, t: c.transaction(
        ["SELECT 1", f"DELETE FROM {t.b.schema_name}.users"]
    ),
    "ExecuteQuery set role": lambda c, t: c.fetch_all(f"SET ROLE {t.b.role_name}"),
    "ExecuteTransaction set_config": lambda c, t: c.transaction(
        ["SELECT set_config('dbsvc.user_id', 'b-user', true)"]
    ),
}


@pytest.mark.parametrize("call", SQL_ATTACKS.values(), ids=SQL_ATTACKS.keys())
async def test_sql_naming_b_is_refused_on_every_query_rpc(
    as_a: MultiDatabaseClient, tenants: Tenants, call
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as info:
        await call(as_a, tenants)
    assert info.value.code == "sql_rejected"


async def test_bulk_insert_into_b_schema_is_refused(
    as_a_bulk: MultiDatabaseClient, tenants: Tenants
) -> None:
    with pytest.raises(PermissionDenied):
        await as_a_bulk.bulk_insert(
            f"{tenants.b.schema_name}.users",
            ["user_id", "email", "subscription_tier"],
            [("x", "x@x", "pro")],
        )


async def test_bulk_update_of_b_schema_is_refused(
    as_a_bulk: MultiDatabaseClient, tenants: Tenants
) -> None:
    with pytest.raises(PermissionDenied):
        await as_a_bulk.bulk_update(
            f"{tenants.b.schema_name}.users", ["user_id"], ["email"], [("b-user", "pwned@x")]
        )


async def test_bulk_insert_with_forged_company_id_is_refused_by_rls(
    as_a_bulk: MultiDatabaseClient, tenants: Tenants
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await as_a_bulk.bulk_insert(
            "market_data", ["company_id", "symbol"], [(tenants.b.tenant_id, "X")]
        )
    assert info.value.sqlstate == "42501"


async def test_bulk_update_cannot_move_rows_to_b(
    as_a_bulk: MultiDatabaseClient, tenants: Tenants
) -> None:
    with pytest.raises(PermissionDenied) as info:
        await as_a_bulk.bulk_update(
            "market_data", ["symbol"], ["company_id"], [("USDJPY", tenants.b.tenant_id)]
        )
    assert info.value.sqlstate == "42501"


async def test_bulk_update_keyed_on_b_rows_touches_nothing(as_a_bulk: MultiDatabaseClient) -> None:
    # B's market_data row has symbol EURUSD; A keys its update on it and must update 0 rows.
    assert (
        await as_a_bulk.bulk_update("market_data", ["symbol"], ["user_id"], [("EURUSD", "pwned")])
        == 0
    )


async def test_bulk_targets_cannot_be_quoted_tricks(
    as_a_bulk: MultiDatabaseClient, tenants: Tenants
) -> None:
    for table in (
        f'"{tenants.b.schema_name}".users',
        f"{tenants.b.schema_name}.users;--",
        "dbsvc_control.tenants",
    ):
        with pytest.raises(DatabaseServiceError):
            await as_a_bulk.bulk_insert(table, ["user_id"], [("x",)])


async def test_time_series_returns_only_a_ticks(
    as_a: MultiDatabaseClient, core: Application, tenants: Tenants
) -> None:
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.trading_ticks (time, company_id, user_id, symbol, volume)"
        " VALUES (now() - interval '1 minute', $1, 'a-user', 'EURUSD', 1)",
        tenants.a.tenant_id,
    )
    result = await as_a.time_series(
        "EURUSD", now() - dt.timedelta(days=1), now() + dt.timedelta(minutes=1)
    )
    assert [r[1] for r in result.rows] == ["a-user"]  # B's tick (user b-user) is not there


async def test_partitions_show_nothing_of_b(
    as_a: MultiDatabaseClient, core: Application, tenants: Tenants
) -> None:
    await core.owner_pool.execute(
        f"CREATE TABLE IF NOT EXISTS {tenants.b.schema_name}.b_parts (at date NOT NULL) PARTITION BY RANGE (at)"
    )
    await core.owner_pool.execute(
        f"CREATE TABLE IF NOT EXISTS {tenants.b.schema_name}.b_parts_2024 PARTITION OF"
        f" {tenants.b.schema_name}.b_parts FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    )
    parents = {p["parent"] for p in await as_a.partitions()}
    assert not any(p.startswith(tenants.b.schema_name) for p in parents)


async def test_user_id_metadata_cannot_widen_to_b(
    client_for: ClientFactory, tenants: Tenants
) -> None:
    client = await client_for(tenants.a, ALL, user_id="b-user")
    result = await client.fetch_all("SELECT DISTINCT company_id FROM market_data")
    assert all(row[0] == tenants.a.tenant_id for row in result.rows)
