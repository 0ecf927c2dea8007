"""Tenant A against tenant B, the replicated tables and the host through its own writable
ClickHouse tables, on chDB (no access control of its own: the table guard on ClickHouse's parse
tree is the wall): ``CREATE TABLE``/``DROP TABLE`` through both front ends of the analytics
query API (REST and gRPC, with a token holding every scope for A), and ``Analytics.insert``.

Every attack — engines and table functions that reach outside the table (files, URLs, S3,
other databases, other tables, dictionaries, buffers, joins, sets, …), ``AS SELECT`` and ``AS``
another table, views, materialized views, dictionaries, B's database and the internal ones,
expressions that read outside (``dictGet``, ``file``, subqueries), settings of its own, inserts
into B's tables, the replicated tables and views, ``INSERT … SELECT``, literal values — is
refused with a stable code, and afterwards B's table still holds exactly its secret row, A owns
only the table it made, and no table with an outside engine exists anywhere."""

from __future__ import annotations

import functools
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from database_service.analytics.schema import SHARED_DATABASE, tenant_database
from database_service.analytics.service import Analytics
from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import DatabaseServiceError as ServiceError
from database_service.query import TenantContext
from database_service_client import DatabaseServiceError, MultiDatabaseClient

pytestmark = pytest.mark.integration

SECRET = f"SECRET{secrets.token_hex(6).upper()}"
TABLE = "(a String) ENGINE = MergeTree ORDER BY a"


@dataclass
class World:
    app: Application
    analytics: Analytics
    a: str
    b: str
    http: httpx.AsyncClient
    client: MultiDatabaseClient
    token_a: str


def _admin(tenant_id: str) -> Principal:
    return Principal(
        "tables-attack", frozenset({tenant_id}), frozenset({Scope.READ, Scope.WRITE, Scope.ADMIN})
    )


@pytest.fixture(scope="module")
async def world(ch_core: Application) -> AsyncIterator[World]:
    app = ch_core
    assert app.analytics is not None
    analytics = app.analytics.analytics
    a = (await app.tenants.create(f"tta_{secrets.token_hex(4)}")).tenant_id
    b = (await app.tenants.create(f"ttb_{secrets.token_hex(4)}")).tenant_id
    for tenant in (a, b):
        await analytics.query(_admin(tenant), TenantContext(tenant), f"CREATE TABLE own {TABLE}")
    await analytics.insert(b, "INSERT INTO own (a) VALUES ($1)", [SECRET], dedup_token="b-1")
    name = f"tta-{secrets.token_hex(4)}"
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    await app.services.register(name, tenants=[a], scopes=scopes, with_secret=False)
    token = app.tokens.issue(name, tenants=[a], scopes=scopes, ttl_seconds=3600)
    async with GrpcServer(app) as server:
        transport = httpx.ASGITransport(app=create_http_app(app))
        client = MultiDatabaseClient(
            f"127.0.0.1:{server.port}", {"company_id": a}, token, timeout=60, retries=0
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            yield World(app, analytics, a, b, http, client, token)
        await client.close()


def _b(world: World, sql: str) -> str:
    return (
        sql.replace("{B}", tenant_database(world.b))
        .replace("{A}", tenant_database(world.a))
        .replace("{b}", world.b)
    )


CREATE = [
    # Engines that reach outside the table.
    "CREATE TABLE x (a String) ENGINE = File(CSV)",
    "CREATE TABLE x (a String) ENGINE = File(LineAsString, '/etc/passwd')",
    "CREATE TABLE x (a String) ENGINE = URL('http://127.0.0.1:1/', CSV)",
    "CREATE TABLE x (a String) ENGINE = S3('http://127.0.0.1:1/b/k.csv', 'CSV')",
    "CREATE TABLE x (a String) ENGINE = PostgreSQL('127.0.0.1:5432', 'db', 't', 'u', 'p')",
    "CREATE TABLE x (a String) ENGINE = MySQL('127.0.0.1:3306', 'db', 't', 'u', 'p')",
    "CREATE TABLE x (a String) ENGINE = SQLite('/etc/passwd', 't')",
    "CREATE TABLE x (a String) ENGINE = Distributed('default', '{B}', 'own')",
    "CREATE TABLE x (a String) ENGINE = Merge('{B}', '.*')",
    "CREATE TABLE x (a String) ENGINE = Merge(REGEXP('tenant_.*'), '.*')",
    "CREATE TABLE x (symbol String) ENGINE = Merge('dbsvc_analytics', 'trading_ticks')",
    "CREATE TABLE x (a String) ENGINE = Dictionary(d)",
    "CREATE TABLE x (a String) ENGINE = Buffer('{B}', 'own', 1, 10, 100, 1, 10, 1, 10)",
    "CREATE TABLE x (a String) ENGINE = Buffer('{A}', 'own', 1, 10, 100, 1, 10, 1, 10)",
    "CREATE TABLE x (a String) ENGINE = Join(ANY, LEFT, a)",
    "CREATE TABLE x (a String) ENGINE = Set",
    "CREATE TABLE x (a String) ENGINE = Memory",
    "CREATE TABLE x (a String) ENGINE = Log",
    "CREATE TABLE x (a String) ENGINE = Null",
    "CREATE TABLE x (a String) ENGINE = Executable('cat /etc/passwd', LineAsString)",
    "CREATE TABLE x (a String) ENGINE = ReplicatedMergeTree('/clickhouse/x', 'r') ORDER BY a",
    "CREATE TABLE x (a String) ENGINE = SharedMergeTree ORDER BY a",
    "CREATE TABLE x (a String) ENGINE = KeeperMap('/x') PRIMARY KEY a",
    "CREATE TABLE x (a String) ENGINE = GenerateRandom",
    "CREATE TABLE x (a String)",  # the default engine is the server's choice, not a MergeTree
    # Copies of other data.
    "CREATE TABLE x ENGINE = MergeTree ORDER BY a AS SELECT a FROM {B}.own",
    "CREATE TABLE x ENGINE = MergeTree ORDER BY tuple() AS SELECT * FROM dbsvc_analytics.trading_ticks",
    "CREATE TABLE x ENGINE = MergeTree ORDER BY a AS SELECT 'x' AS a",
    "CREATE TABLE x (a String) ENGINE = MergeTree ORDER BY a AS SELECT a FROM own",
    "CREATE TABLE x AS {B}.own",
    "CREATE TABLE x AS own",
    "CREATE TABLE x AS dbsvc_analytics.trading_ticks",
    "CREATE TABLE x AS file('/etc/passwd', 'LineAsString')",
    "CREATE TABLE x AS url('http://127.0.0.1:1/', 'CSV', 'a String')",
    "CREATE TABLE x CLONE AS {B}.own",
    "CREATE TABLE x EMPTY AS SELECT * FROM {B}.own",
    # Other kinds of object, other places.
    f"CREATE TABLE {{B}}.x {TABLE}",
    f"CREATE TABLE dbsvc_analytics.x {TABLE}",
    f"CREATE TABLE default.x {TABLE}",
    f"CREATE TABLE system.x {TABLE}",
    f"CREATE TABLE `{{B}}`.`x` {TABLE}",
    f"CREATE TABLE trading_ticks {TABLE}",
    f"CREATE OR REPLACE TABLE own {TABLE}",
    f"REPLACE TABLE own {TABLE}",
    f"CREATE TEMPORARY TABLE x {TABLE}",
    f"CREATE TABLE x ON CLUSTER default {TABLE}",
    f"CREATE TABLE x UUID '00000000-0000-0000-0000-000000000001' {TABLE}",
    "CREATE VIEW x AS SELECT * FROM {B}.own",
    "CREATE MATERIALIZED VIEW x ENGINE = MergeTree ORDER BY a AS SELECT a FROM {B}.own",
    "CREATE MATERIALIZED VIEW x TO own AS SELECT symbol AS a FROM dbsvc_analytics.trading_ticks",
    "CREATE LIVE VIEW x AS SELECT * FROM {B}.own",
    "CREATE DICTIONARY d (a String) PRIMARY KEY a SOURCE(CLICKHOUSE(TABLE 'own' DB '{B}'))"
    " LAYOUT(FLAT()) LIFETIME(0)",
    "CREATE DATABASE x",
    "CREATE USER x",
    "CREATE FUNCTION f AS (x) -> x",
    "CREATE ROW POLICY p ON {B}.own USING 1 TO ALL",
    # Expressions that read outside their arguments, settings of its own.
    "CREATE TABLE x (a String DEFAULT dictGet('d', 'a', 1)) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a String DEFAULT (SELECT any(a) FROM {B}.own)) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a String MATERIALIZED file('/etc/passwd')) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a String DEFAULT joinGet('{B}.own', 'a', 1)) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a String DEFAULT hostName()) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a String, CONSTRAINT c CHECK a IN (SELECT a FROM {B}.own))"
    " ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a String) ENGINE = MergeTree ORDER BY a IN {B}.own",
    f"CREATE TABLE x {TABLE} SETTINGS non_replicated_deduplication_window = 0",
    f"CREATE TABLE x {TABLE} SETTINGS storage_policy = 'other', disk = 'x'",
    "CREATE TABLE x (a String) ENGINE = MergeTree ORDER BY a SETTINGS disk = disk(type = local,"
    " path = '/tmp/x/')",
    f"CREATE TABLE x {TABLE} TTL now() + 1 TO DISK 'x'",
    f"CREATE TABLE x {TABLE} TTL now() + 1 TO VOLUME 'x'",
    "CREATE TABLE x (a String, PROJECTION p (SELECT a ORDER BY a)) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (a Object('json')) ENGINE = MergeTree ORDER BY tuple()",
    f"CREATE TABLE x {TABLE}; DROP TABLE own",
    f"CREATE TABLE x {TABLE} FORMAT Native",
    f"CREATE TABLE x {TABLE} INTO OUTFILE '/tmp/x'",
    "CREATE TABLE `x y` (a String) ENGINE = MergeTree ORDER BY a",
    "CREATE TABLE x (`a;b` String) ENGINE = MergeTree ORDER BY a",
]
READ = [  # B's own tables through the guarded SELECT
    "SELECT * FROM {B}.own",
    "SELECT * FROM own UNION ALL SELECT * FROM {B}.own",
    "SELECT * FROM own WHERE a IN (SELECT a FROM {B}.own)",
    "SELECT * FROM own AS x JOIN {B}.own AS y ON x.a != y.a",
    "WITH own AS (SELECT * FROM {B}.own) SELECT * FROM own",
]
DROP = [
    "DROP TABLE {B}.own",
    "DROP TABLE `{B}`.own",
    "DROP TABLE trading_ticks",
    "DROP TABLE {A}.trading_signals",
    "DROP TABLE dbsvc_analytics.trading_ticks",
    "DROP TABLE IF EXISTS dbsvc_analytics.trading_ticks",
    "DROP TABLE own, {B}.own",
    "DROP VIEW trading_ticks",
    "DROP DICTIONARY d",
    "DROP DATABASE {A}",
    "DROP DATABASE {B}",
    "DROP DATABASE dbsvc_analytics",
    "DROP ALL TABLES FROM {B}",
    "DROP TABLES {B}.own",
    "DROP USER default",
    "DROP TABLE own; DROP TABLE {B}.own",
    "DROP TEMPORARY TABLE own",
    "DROP TABLE nothing_here",
]
INSERT = [
    ("INSERT INTO {B}.own (a) VALUES ($1)", ["x"]),
    ("INSERT INTO `{B}`.`own` (a) VALUES ($1)", ["x"]),
    ('INSERT INTO "{B}"."own" (a) VALUES ($1)', ["x"]),
    ("INSERT INTO trading_ticks (symbol) VALUES ($1)", ["x"]),
    ("INSERT INTO trading_signals (signal_id) VALUES ($1)", ["x"]),
    ("INSERT INTO {A}.trading_history (symbol) VALUES ($1)", ["x"]),
    ("INSERT INTO dbsvc_analytics.trading_ticks (company_id, symbol) VALUES ($1, $2)", ["{b}", "x"]),
    ("INSERT INTO default.own (a) VALUES ($1)", ["x"]),
    ("INSERT INTO system.query_log (query) VALUES ($1)", ["x"]),
    ("INSERT INTO FUNCTION file('/tmp/x.csv', 'CSV', 'a String') (a) VALUES ($1)", ["x"]),
    ("INSERT INTO TABLE FUNCTION url('http://127.0.0.1:1/', 'CSV', 'a String') (a) VALUES ($1)", ["x"]),
    ("INSERT INTO FUNCTION remote('127.0.0.1', '{B}', 'own') (a) VALUES ($1)", ["x"]),
    ("INSERT INTO own (a) SELECT a FROM {B}.own", []),
    ("INSERT INTO own SELECT * FROM {B}.own", []),
    ("INSERT INTO own (a) VALUES ((SELECT any(a) FROM {B}.own))", []),
    ("INSERT INTO own (a) VALUES ($1), ($1)", ["x"]),
    ("INSERT INTO own (a) VALUES ('literal')", []),
    ("INSERT INTO own (a) VALUES (file('/etc/passwd'))", []),
    ("INSERT INTO own (a) SETTINGS insert_deduplicate = 0 VALUES ($1)", ["x"]),
    ("INSERT INTO own (a) FORMAT JSONEachRow {\"a\": \"x\"}", []),
    ("INSERT INTO own (a) VALUES ($1); DROP TABLE own", ["x"]),
    ("INSERT INTO own (a) VALUES ($1) ; INSERT INTO {B}.own (a) VALUES ($1)", ["x"]),
    ("INSERT INTO own (a, {B}.own.a) VALUES ($1, $2)", ["x", "y"]),
    ("SELECT * FROM {B}.own", []),
    ("DROP TABLE own", []),
    ("", []),
]  # fmt: skip


async def _ddl(world: World, front: str, sql: str) -> tuple[bool, str | None, str]:
    if front == "rest":
        response = await world.http.post(
            "/api/v1/analytics/query",
            json={"sql": sql, "engine": "clickhouse", "tenant_id": world.a},
            headers={"Authorization": f"Bearer {world.token_a}"},
        )
        body = response.json()
        assert response.status_code < 500, body
        error = body.get("error") or {}
        return response.status_code == 200, error.get("code"), response.text
    try:
        await world.client.analytics_query(sql, engine="clickhouse").fetch_all()
    except DatabaseServiceError as exc:
        assert exc.status not in {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}, exc
        return False, exc.code, exc.message
    return True, None, ""


@pytest.mark.parametrize("front", ["rest", "grpc"])
@pytest.mark.parametrize("sql", CREATE + DROP + READ)
async def test_every_table_statement_attack_is_refused(world: World, front: str, sql: str) -> None:
    ok, code, text = await _ddl(world, front, _b(world, sql))
    assert not ok, f"{sql!r} ran"
    assert SECRET not in text
    # ClickHouse's own refusal (a name it cannot parse) is a client error too.
    assert code in {"sql_rejected", "sql_syntax_error", "conflict"}, (sql, code, text)


@pytest.mark.parametrize(("sql", "params"), INSERT)
async def test_every_insert_attack_is_refused(world: World, sql: str, params: Any) -> None:
    if isinstance(params, dict):
        params = {k: _b(world, v) for k, v in params.items()}
    else:
        params = [_b(world, p) for p in params]
    with pytest.raises(ServiceError) as info:
        await world.analytics.insert(
            world.a, _b(world, sql), params, dedup_token=secrets.token_hex(6)
        )
    assert info.value.error_code in {"sql_rejected", "sql_syntax_error", "invalid_parameters"}, (
        sql,
        info.value,
    )


async def test_a_value_that_looks_like_sql_is_stored_as_text(world: World) -> None:
    text = "x' || (SELECT any(a) FROM {B}.own) || '"
    await world.analytics.insert(
        world.a, "INSERT INTO own (a) VALUES (:a)", {"a": _b(world, text)}, dedup_token="looks"
    )
    result = await world.analytics.query(
        _admin(world.a), TenantContext(world.a), "SELECT a FROM own"
    )
    assert [list(r) for r in result.rows] == [[_b(world, text)]]


@pytest.fixture(scope="module", autouse=True)
async def nothing_changed(world: World) -> AsyncIterator[None]:
    """After every attack: B holds exactly its row, A only the table it made, and no table
    outside the MergeTree family exists in a tenant's or the shared database."""
    yield
    store = world.analytics.store
    rows = (await store.query(f"SELECT a FROM {tenant_database(world.b)}.own")).rows
    assert rows == [[SECRET]]
    for tenant in (world.a, world.b):
        assert set(await world.analytics.own_tables(tenant)) == {"own"}
    engines = await store.query(
        "SELECT database, name, engine FROM system.tables WHERE (database LIKE 'tenant\\\\_%'"
        f" OR database = '{SHARED_DATABASE}') AND engine NOT LIKE '%MergeTree' AND engine != 'View'"
    )
    assert engines.rows == []
    ticks = await store.query(
        f"SELECT count() FROM {SHARED_DATABASE}.trading_ticks WHERE company_id = '{world.b}'"
    )
    assert ticks.rows == [[0]]


# Values a caller may send for a row (REST and gRPC read JSON leniently: NaN, infinities,
# integers past 64 bits, lone surrogates); each is stored as the column's type takes it, or
# refused with a stable code, never a server error.
VALUES = {
    "nan": float("nan"),
    "infinity": float("inf"),
    "big_int": 10**30,
    "huge_int": 10**4000,  # (past 4,300 digits no JSON reader makes an int)
    "nested": {"a": [1, {"b": None}]},
    "deep": functools.reduce(lambda inner, _: [inner], range(300), 1),
    "lone_surrogate": "\ud800",
    "nul": "a\x00b",
    "bool": True,
    "null": None,
    "large_text": "x" * 2_000_000,
}


@pytest.mark.parametrize("value", sorted(VALUES))
async def test_every_insert_value_is_stored_or_refused_cleanly(world: World, value: str) -> None:
    try:
        await world.analytics.insert(
            world.a, "INSERT INTO own (a) VALUES ($1)", [VALUES[value]], dedup_token=value
        )
    except ServiceError as exc:
        assert exc.error_code != "internal" and exc.http_status < 500, (value, exc)
