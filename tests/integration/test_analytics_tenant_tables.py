"""A tenant's own ClickHouse tables on chDB (the real engine): created with a guarded ``CREATE
TABLE`` through the analytics query API, written with ``Analytics.insert`` (placeholders bound as
data, an insert-deduplication token so a retried insert is stored once), read with the guarded
SELECT beside the replicated tables, dropped; the service's limits on their count and size; and
the same through the REST and gRPC front ends."""

from __future__ import annotations

import datetime as dt
import secrets
from decimal import Decimal
from typing import Any

import httpx
import pytest

from database_service.analytics.schema import tenant_database
from database_service.analytics.service import Analytics, AnalyticsLimits
from database_service.analytics.tables import DEDUP_WINDOW
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import (
    Conflict,
    InvalidParameters,
    PermissionDenied,
    ResourceExhausted,
    SqlRejected,
)
from database_service.query import TenantContext

pytestmark = pytest.mark.integration

SIGNALS = (
    "CREATE TABLE signal_analytics (signal_id String, symbol LowCardinality(String),"
    " action LowCardinality(String), confidence Decimal(5, 2), created_at DateTime64(6, 'UTC'),"
    " payload String DEFAULT '') ENGINE = MergeTree ORDER BY (symbol, created_at)"
)
INSERT = (
    "INSERT INTO signal_analytics (signal_id, symbol, action, confidence, created_at, payload)"
    " VALUES (:signal_id, :symbol, :action, :confidence, :created_at, :payload)"
)


def admin(tenant_id: str) -> Principal:
    return Principal(
        "tables-test", frozenset({tenant_id}), frozenset({Scope.READ, Scope.WRITE, Scope.ADMIN})
    )


def analytics_of(app: Application) -> Analytics:
    assert app.analytics is not None
    return app.analytics.analytics


async def new_tenant(app: Application) -> str:
    return (await app.tenants.create(f"tt_{secrets.token_hex(4)}")).tenant_id


async def run(app: Application, tenant_id: str, sql: str) -> list[list[Any]]:
    result = await analytics_of(app).query(admin(tenant_id), TenantContext(tenant_id), sql)
    return [list(r) for r in result.rows]


def signal(n: int, **changes: Any) -> dict[str, Any]:
    record = {
        "signal_id": f"sig-{n}",
        "symbol": "EURUSD",
        "action": "buy",
        "confidence": Decimal("0.87"),
        "created_at": dt.datetime(2026, 12, 3, 9, n % 60, tzinfo=dt.UTC),
        "payload": '{"why": "test"}',
        "user_id": "ignored: not named by the INSERT",
    }
    record.update(changes)
    return record


async def test_tenant_creates_writes_reads_and_drops_its_own_table(ch_core: Application) -> None:
    tenant = await new_tenant(ch_core)
    analytics = analytics_of(ch_core)
    result = await analytics.query(admin(tenant), TenantContext(tenant), SIGNALS)
    assert (result.command, result.store) == ("CREATE TABLE", "clickhouse")
    assert await analytics.own_tables(tenant) == {"signal_analytics": 0}
    # The service set the deduplication window on the table it created.
    (create,) = await ch_core_rows(
        ch_core,
        tenant,
        "SELECT create_table_query FROM system.tables WHERE name = 'signal_analytics'",
    )
    assert f"non_replicated_deduplication_window = {DEDUP_WINDOW}" in create[0]

    assert await analytics.insert(tenant, INSERT, signal(1), dedup_token="sig-1") == 1
    # $n placeholders with a list, and %(name)s with a mapping.
    await analytics.insert(
        tenant,
        "INSERT INTO signal_analytics (signal_id, symbol, action, confidence, created_at)"
        " VALUES ($1, $2, $3, $4, $5)",
        ["sig-2", "GBPUSD", "sell", "0.5", "2026-12-03T09:02:00+00:00"],
        dedup_token="sig-2",
    )
    await analytics.insert(
        tenant,
        f"INSERT INTO {tenant_database(tenant)}.signal_analytics (signal_id, symbol, action,"
        " confidence, created_at) VALUES (%(signal_id)s, %(symbol)s, %(action)s,"
        " %(confidence)s, %(created_at)s)",
        signal(3, symbol="USDJPY"),
        dedup_token="sig-3",
    )
    rows = await run(
        ch_core,
        tenant,
        "SELECT signal_id, symbol, action, confidence, created_at, payload"
        " FROM signal_analytics ORDER BY signal_id",
    )
    assert rows == [
        ["sig-1", "EURUSD", "buy", Decimal("0.87"), dt.datetime(2026, 12, 3, 9, 1, tzinfo=dt.UTC),
         '{"why": "test"}'],
        ["sig-2", "GBPUSD", "sell", Decimal("0.50"), dt.datetime(2026, 12, 3, 9, 2, tzinfo=dt.UTC),
         ""],
        ["sig-3", "USDJPY", "buy", Decimal("0.87"), dt.datetime(2026, 12, 3, 9, 3, tzinfo=dt.UTC),
         ""],
    ]  # fmt: skip
    # Its own table joins the replicated ones in one query.
    assert await run(
        ch_core,
        tenant,
        "SELECT count() FROM signal_analytics AS s LEFT JOIN trading_signals AS t"
        " ON s.signal_id = t.signal_id",
    ) == [[3]]

    result = await analytics.query(
        admin(tenant), TenantContext(tenant), "DROP TABLE signal_analytics"
    )
    assert result.command == "DROP TABLE"
    assert await analytics.own_tables(tenant) == {}
    with pytest.raises(SqlRejected, match="unknown table signal_analytics"):
        await run(ch_core, tenant, "SELECT count() FROM signal_analytics")
    # IF EXISTS on a table that is gone is a no-op, as in ClickHouse.
    await run(ch_core, tenant, "DROP TABLE IF EXISTS signal_analytics")


async def ch_core_rows(app: Application, tenant_id: str, where: str) -> list[list[Any]]:
    """The service's own view of ``system.tables`` for the tenant's database (not tenant SQL)."""
    sql = where.replace("WHERE ", f"WHERE database = '{tenant_database(tenant_id)}' AND ", 1)
    return (await analytics_of(app).store.query(sql)).rows


async def test_every_insert_is_audited(ch_core: Application) -> None:
    tenant = await new_tenant(ch_core)
    analytics = analytics_of(ch_core)
    await run(ch_core, tenant, SIGNALS)
    await analytics.insert(tenant, INSERT, signal(1), dedup_token="a-1", caller="signals-svc")
    with pytest.raises(SqlRejected):
        await analytics.insert(
            tenant, "INSERT INTO trading_ticks (symbol) VALUES ($1)", ["x"], dedup_token="a-2"
        )
    await ch_core.audit.flush()
    rows = await ch_core.owner_pool.fetch(
        f"SELECT service, statement_class, outcome, code, detail FROM"
        f" {ch_core.settings.control_schema}.audit_log WHERE tenant_id = $1"
        # By the time each was recorded: a flush may write the later event before the batch
        # the writer was gathering, so ids need not follow the order.
        " AND statement_class = 'write' ORDER BY at, id",
        tenant,
    )
    assert [tuple(r) for r in rows] == [
        ("signals-svc", "write", "ok", None, "store=clickhouse INSERT INTO signal_analytics"),
        (
            "analytics.insert",
            "write",
            "denied",
            "sql_rejected",
            "store=clickhouse INSERT INTO trading_ticks (symbol) VALUES ($1)",
        ),
    ]


async def test_a_retried_insert_is_stored_once(ch_core: Application) -> None:
    tenant = await new_tenant(ch_core)
    analytics = analytics_of(ch_core)
    await run(ch_core, tenant, SIGNALS)
    for _ in range(3):  # the outbox retrying the same entry
        await analytics.insert(tenant, INSERT, signal(7), dedup_token="outbox-7")
    # The same token with other values: still the one insert (the token is the identity).
    await analytics.insert(tenant, INSERT, signal(7, action="sell"), dedup_token="outbox-7")
    await analytics.insert(tenant, INSERT, signal(8), dedup_token="outbox-8")
    assert await run(
        ch_core, tenant, "SELECT signal_id, action FROM signal_analytics ORDER BY signal_id"
    ) == [["sig-7", "buy"], ["sig-8", "buy"]]


async def test_values_are_bound_as_data_never_as_sql(ch_core: Application) -> None:
    tenant = await new_tenant(ch_core)
    analytics = analytics_of(ch_core)
    await run(ch_core, tenant, SIGNALS)
    hostile = "x'); DROP TABLE signal_analytics; --\\' \" {p:String} $1 :name"
    await analytics.insert(
        tenant,
        INSERT,
        signal(9, signal_id=hostile, payload={"nested": ["a", 1, None]},
               created_at=dt.datetime(2026, 12, 3, 11, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))),
        dedup_token="t-9",
    )  # fmt: skip
    rows = await run(ch_core, tenant, "SELECT signal_id, payload, created_at FROM signal_analytics")
    assert rows == [
        [hostile, '{"nested":["a",1,null]}', dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC)]
    ]


async def test_bad_inserts_are_clear_errors_that_change_nothing(ch_core: Application) -> None:
    tenant = await new_tenant(ch_core)
    analytics = analytics_of(ch_core)
    await run(ch_core, tenant, SIGNALS)
    cases: list[tuple[str, Any, type[Exception], str]] = [
        (INSERT, ["a", "b"], InvalidParameters, "named placeholders"),
        (INSERT, {"signal_id": "x"}, InvalidParameters, "no value for parameter"),
        (
            "INSERT INTO signal_analytics (signal_id) VALUES ($2)",
            ["only one"],
            InvalidParameters,
            r"uses \$2 but 1 parameter",
        ),
        ("INSERT INTO signal_analytics (nope) VALUES ($1)", ["x"], SqlRejected, "unknown column"),
        ("INSERT INTO signal_analytics (signal_id) VALUES ('x')", [], SqlRejected, "placeholders"),
        ("INSERT INTO signal_analytics (signal_id, symbol) VALUES ($1)", ["x"], SqlRejected,
         "2 column"),
        ("INSERT INTO signal_analytics VALUES ($1)", ["x"], SqlRejected, "name the columns"),
        ("INSERT INTO missing (a) VALUES ($1)", ["x"], SqlRejected, "not one of this tenant"),
        ("INSERT INTO signal_analytics (confidence) VALUES ($1)", [float("nan")],
         InvalidParameters, "NaN"),
    ]  # fmt: skip
    for sql, params, error, message in cases:
        with pytest.raises(error, match=message):
            await analytics.insert(tenant, sql, params, dedup_token=secrets.token_hex(4))
    with pytest.raises(InvalidParameters, match="dedup_token"):
        await analytics.insert(tenant, INSERT, signal(1), dedup_token="")
    # A value ClickHouse cannot read into the column: its error, a client error.
    with pytest.raises(Exception) as info:
        await analytics.insert(
            tenant, INSERT, signal(1, confidence="not a number"), dedup_token="bad-value"
        )
    assert getattr(info.value, "error_code", None) == "analytics_query_error"
    assert await run(ch_core, tenant, "SELECT count() FROM signal_analytics") == [[0]]


async def test_table_statements_need_admin_and_respect_the_limits(ch_core: Application) -> None:
    tenant = await new_tenant(ch_core)
    analytics = analytics_of(ch_core)
    reader = Principal("reader", frozenset({tenant}), frozenset({Scope.READ, Scope.WRITE}))
    with pytest.raises(PermissionDenied):
        await analytics.query(reader, TenantContext(tenant), SIGNALS)
    await run(ch_core, tenant, SIGNALS)
    with pytest.raises(Conflict):
        await run(ch_core, tenant, SIGNALS)
    await run(ch_core, tenant, SIGNALS.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    saved = analytics.limits
    analytics.limits = AnalyticsLimits(tenant_max_tables=2, tenant_max_bytes=1)
    try:
        await run(ch_core, tenant, "CREATE TABLE second (a Int32) ENGINE = MergeTree ORDER BY a")
        with pytest.raises(ResourceExhausted, match="2 ClickHouse tables"):
            await run(ch_core, tenant, "CREATE TABLE third (a Int32) ENGINE = MergeTree ORDER BY a")
        await analytics.insert(tenant, INSERT, signal(1), dedup_token="fills")  # 0 bytes before
        with pytest.raises(ResourceExhausted, match="bytes"):
            await analytics.insert(tenant, INSERT, signal(2), dedup_token="over")
    finally:
        analytics.limits = saved
    assert await run(ch_core, tenant, "SELECT count() FROM signal_analytics") == [[1]]


async def test_tables_through_rest(ch_core: Application) -> None:
    """The query API's front end: CREATE TABLE with an admin token, then a SELECT of it."""
    tenant = await new_tenant(ch_core)
    name = f"tables-{secrets.token_hex(4)}"
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    await ch_core.services.register(name, tenants=[tenant], scopes=scopes, with_secret=False)
    token = ch_core.tokens.issue(name, tenants=[tenant], scopes=scopes, ttl_seconds=600)
    transport = httpx.ASGITransport(app=create_http_app(ch_core))
    async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:

        async def post(sql: str) -> httpx.Response:
            return await http.post(
                "/api/v1/analytics/query",
                json={"sql": sql, "engine": "clickhouse"},
                headers={"Authorization": f"Bearer {token}", "x-tenant-id": tenant},
            )

        response = await post(SIGNALS)
        assert response.status_code == 200, response.text
        assert response.json()["command"] == "CREATE TABLE"
        await analytics_of(ch_core).insert(tenant, INSERT, signal(4), dedup_token="r-4")
        response = await post("SELECT signal_id FROM signal_analytics")
        assert response.json()["rows"] == [["sig-4"]]
        response = await post("CREATE TABLE x (a Int32) ENGINE = File(CSV)")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "sql_rejected"
