"""Tenant A against tenant B (and against the host) through ClickHouse analytics SQL, on chDB —
the engine with no access control of its own, where the analytics guard on ClickHouse's parse
tree is the wall — through both front ends: gRPC ``ExecuteAnalyticsQuery`` (the client's
``analytics_query``) and REST ``POST /api/v1/analytics/query``.

B's rows (ticks, trades, signals, predictions, candles) carry a secret; every attack — table
functions, ``system.*`` and ``information_schema``, dictionaries, ``SETTINGS`` (outside and
inside subqueries), ``INTO OUTFILE``, ``FORMAT``, comments and quoting, multi-statements,
statements other than SELECT, B's database and the internal ones by every spelling, unions,
subqueries, joins, ``IN`` and CTEs that reach them, ``currentDatabase()`` and other functions
that read outside their arguments — is refused with a stable code (never a server error), and
no answer carries B's secret. A reads its own rows, only them, within the service's limits."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from database_service.analytics.service import AnalyticsLimits
from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from tests.fix_clickhouse import capturing, drain

pytestmark = pytest.mark.integration

SECRET = f"SECRET{secrets.token_hex(6).upper()}"


@dataclass
class Outcome:
    ok: bool
    rows: list[list[Any]] = field(default_factory=list)
    code: str | None = None
    status: str = "OK"
    message: str = ""

    @property
    def server_error(self) -> bool:
        return self.status in {"INTERNAL", "UNKNOWN", "DATA_LOSS"} or (
            self.status.startswith("5") and self.status != "503"
        )


@dataclass
class World:
    app: Application
    a: str
    b: str
    http: httpx.AsyncClient
    target: str
    token_a: str


async def _token(app: Application, tenant_id: str) -> str:
    name = f"ch-{secrets.token_hex(4)}"
    # Every scope: table statements (CREATE/DROP) need admin, and the attacks must meet the
    # guard, not a missing scope.
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    await app.services.register(name, tenants=[tenant_id], scopes=scopes, with_secret=False)
    return app.tokens.issue(name, tenants=[tenant_id], scopes=scopes, ttl_seconds=3600)


@pytest.fixture(scope="module")
async def world(ch_core: Application) -> AsyncIterator[World]:
    app = ch_core
    a = (await app.tenants.create(f"cha_{secrets.token_hex(4)}")).tenant_id
    b = (await app.tenants.create(f"chb_{secrets.token_hex(4)}")).tenant_id
    shared = app.settings.shared_schema
    async with capturing(app), app.owner_pool.acquire() as conn:
        for tenant, symbol in ((a, "OWNSYM"), (b, SECRET)):
            schema = (await app.registry.get_active(tenant)).schema_name
            await conn.execute(
                f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask,"
                " volume, spread) SELECT now() - g * interval '1 second', $1, 'u', $2, 1.1, 1.2,"
                " g, 0.1 FROM generate_series(1, 50) g",
                tenant,
                symbol[:20],
            )
            await conn.execute(
                f"INSERT INTO {shared}.ai_predictions (time, company_id, user_id, symbol,"
                " prediction_type, confidence, model_version) VALUES (now(), $1, 'u', $2, $2,"
                " 0.5, 'v1')",
                tenant,
                symbol[:20],
            )
            await conn.execute(
                f"INSERT INTO {schema}.trading_history (symbol, side, volume, open_price)"
                " VALUES ($1, 'buy', 1, 1)",
                symbol[:20],
            )
            await conn.execute(
                f"INSERT INTO {schema}.trading_signals (signal_id, symbol, action, payload)"
                " VALUES ($1::text, $2, 'buy', jsonb_build_object('s', $1::text))",
                symbol,
                symbol[:20],
            )
        await drain(app)
    async with GrpcServer(app) as server:
        transport = httpx.ASGITransport(app=create_http_app(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            yield World(app, a, b, http, f"127.0.0.1:{server.port}", await _token(app, a))


@pytest.fixture(params=["grpc", "rest"], scope="module")
async def run(request: pytest.FixtureRequest, world: World) -> AsyncIterator[Any]:
    client = MultiDatabaseClient(
        world.target, {"company_id": world.a}, world.token_a, timeout=60, retries=0
    )

    async def go(sql: str) -> Outcome:
        if request.param == "rest":
            response = await world.http.post(
                "/api/v1/analytics/query",
                json={"sql": sql, "engine": "clickhouse", "tenant_id": world.a},
                headers={"Authorization": f"Bearer {world.token_a}"},
            )
            document = response.json()
            if response.status_code == 200:
                outcome = Outcome(True, rows=document["rows"], status="200")
            else:
                error = document.get("error", {})
                outcome = Outcome(
                    False,
                    code=error.get("code"),
                    status=str(response.status_code),
                    message=error.get("message", ""),
                )
        else:
            try:
                result = await client.analytics_query(sql, engine="clickhouse").fetch_all()
                outcome = Outcome(True, rows=[list(r) for r in result.rows])
            except DatabaseServiceError as exc:
                outcome = Outcome(False, code=exc.code, status=exc.status.name, message=exc.message)
        assert SECRET not in repr(outcome), f"tenant B's data leaked: {sql!r} → {outcome}"
        return outcome

    yield go
    await client.close()


def _b(world: World, sql: str) -> str:
    return sql.replace("{B}", f"tenant_{world.b}").replace("{b}", world.b)


TABLE_FUNCTIONS = [
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    "SELECT * FROM file('{B}/*', 'Native')",
    "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')",
    "SELECT * FROM remote('127.0.0.1', system.one)",
    "SELECT * FROM remoteSecure('127.0.0.1', {B}.trading_ticks)",
    "SELECT * FROM cluster('default', system.one)",
    "SELECT * FROM clusterAllReplicas('default', system.one)",
    "SELECT * FROM s3('http://127.0.0.1:1/b/k.csv', 'CSV', 'a String')",
    "SELECT * FROM postgresql('127.0.0.1:5432', 'db', 't', 'u', 'p')",
    "SELECT * FROM mysql('127.0.0.1:3306', 'db', 't', 'u', 'p')",
    "SELECT * FROM sqlite('/etc/passwd', 't')",
    "SELECT * FROM merge('{B}', '.*')",
    "SELECT * FROM merge(REGEXP('tenant_.*'), '.*')",
    "SELECT * FROM merge('dbsvc_analytics', '.*')",
    "SELECT * FROM executable('cat /etc/passwd', 'LineAsString', 'x String')",
    "SELECT * FROM numbers(10)",
    "SELECT * FROM generateRandom('a String')",
    "SELECT * FROM input('a String')",
    "SELECT * FROM view(SELECT * FROM {B}.trading_ticks)",
    "SELECT * FROM dictionary('d')",
    "SELECT * FROM format(CSV, 'a String', 'x')",
    "SELECT * FROM values('a String', 'x')",
    "SELECT * FROM loop({B}.trading_ticks)",
    "SELECT * FROM mergeTreeIndex('dbsvc_analytics', 'trading_ticks')",
    # The ticks' pre-aggregates (projections) hold every tenant's sums.
    "SELECT * FROM mergeTreeProjection('dbsvc_analytics', 'trading_ticks', 'per_minute')",
    "SELECT * FROM mergeTreeProjection('dbsvc_analytics', 'trading_ticks', 'per_price')",
    "SELECT * FROM trading_ticks WHERE symbol IN (SELECT * FROM file('/etc/hostname', 'LineAsString'))",
    "SELECT * FROM trading_ticks JOIN url('http://127.0.0.1:1/', 'CSV', 'symbol String') USING symbol",
]
SYSTEM = [
    "SELECT * FROM system.tables",
    "SELECT * FROM system.databases",
    "SELECT * FROM system.query_log",
    "SELECT * FROM system.parts",
    "SELECT * FROM system.one",
    "SELECT * FROM `system`.`tables`",
    'SELECT * FROM "system"."columns"',
    "SELECT * FROM INFORMATION_SCHEMA.TABLES",
    "SELECT * FROM information_schema.columns",
    "SELECT (SELECT count() FROM system.tables)",
    "SELECT * FROM trading_ticks WHERE symbol IN system.tables",
]
OTHER_TENANTS = [
    "SELECT * FROM {B}.trading_ticks",
    "SELECT * FROM `{B}`.`trading_signals`",
    'SELECT * FROM "{B}"."trading_history"',
    "SELECT * FROM `\\x74enant_{b}`.trading_ticks",
    "SELECT * FROM dbsvc_analytics.trading_ticks",
    "SELECT * FROM dbsvc_analytics.trading_signals WHERE company_id = '{b}'",
    "SELECT * FROM default.trading_ticks",
    "SELECT * FROM dbsvc_empty.trading_ticks",
    "SELECT * FROM trading_ticks UNION ALL SELECT * FROM {B}.trading_ticks",
    "SELECT symbol FROM trading_ticks INTERSECT SELECT symbol FROM {B}.trading_ticks",
    "SELECT * FROM (SELECT * FROM {B}.trading_ticks)",
    "SELECT (SELECT any(symbol) FROM {B}.trading_ticks)",
    "SELECT * FROM trading_ticks WHERE symbol IN (SELECT symbol FROM {B}.trading_ticks)",
    "SELECT * FROM trading_ticks WHERE symbol IN {B}.trading_ticks",
    "SELECT * FROM trading_ticks AS t JOIN {B}.trading_ticks AS u ON t.symbol != u.symbol",
    "WITH x AS (SELECT * FROM {B}.trading_ticks) SELECT * FROM x",
    "WITH {B} AS (SELECT 1) SELECT * FROM {B}.trading_ticks",
    "WITH (SELECT any(symbol) FROM {B}.trading_ticks) AS s SELECT s",
    "SELECT * FROM trading_ticks WHERE EXISTS (SELECT 1 FROM {B}.trading_signals)",
    "SELECT * FROM (WITH t AS (SELECT 1) SELECT * FROM t), t",  # t out of its CTE's scope
]
FUNCTIONS = [
    "SELECT currentDatabase()",
    "SELECT * FROM merge(currentDatabase(), '.*')",
    "SELECT database()",
    "SELECT file('/etc/hostname')",
    "SELECT dictGet('d', 'a', toUInt64(1))",
    "SELECT dictGetOrDefault('d', 'a', toUInt64(1), 'x')",
    "SELECT dictHas('d', toUInt64(1))",
    "SELECT joinGet('{B}.trading_ticks', 'symbol', 1)",
    "SELECT getSetting('max_execution_time')",
    "SELECT hasColumnInTable('{B}', 'trading_ticks', 'symbol')",
    "SELECT hostName()",
    "SELECT currentUser()",
    "SELECT getMacro('x')",
    "SELECT sleepEachRow(1) FROM trading_ticks",
    "SELECT filesystemAvailable()",
    "SELECT catboostEvaluate('/etc/passwd', 1)",
]
SETTINGS_AND_OUTPUT = [
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT * FROM trading_ticks SETTINGS max_execution_time = 100000",
    "SELECT * FROM (SELECT * FROM trading_ticks SETTINGS max_rows_to_read = 0)",
    "SELECT * FROM trading_ticks FORMAT Native",
    "SELECT * FROM trading_ticks INTO OUTFILE '/tmp/x.csv'",
    "SELECT * FROM trading_ticks INTO OUTFILE '/tmp/x.csv' FORMAT CSV",
    "SET readonly = 0",
    "SET max_rows_to_read = 0",
]
STATEMENTS = [
    "SELECT 1; SELECT * FROM {B}.trading_ticks",
    "SELECT 1; DROP DATABASE {B}",
    "SELECT 1 -- ok\n; SELECT * FROM system.tables",
    "SELECT 1 /* ; */; SELECT 2",
    "INSERT INTO trading_ticks SELECT * FROM {B}.trading_ticks",
    "INSERT INTO {B}.trading_ticks (symbol) VALUES ('x')",
    "ALTER TABLE dbsvc_analytics.trading_ticks DELETE WHERE 1",
    "DROP DATABASE {B}",
    "DROP TABLE trading_ticks",
    "TRUNCATE TABLE dbsvc_analytics.trading_ticks",
    "CREATE TABLE x ENGINE = File(CSV, '/etc/passwd') AS SELECT 1",
    "CREATE VIEW x AS SELECT * FROM {B}.trading_ticks",
    "USE {B}",
    "SHOW TABLES FROM {B}",
    "SHOW DATABASES",
    "DESCRIBE TABLE {B}.trading_ticks",
    "EXISTS TABLE {B}.trading_ticks",
    "EXPLAIN SELECT * FROM {B}.trading_ticks",
    "SYSTEM DROP DNS CACHE",
    "KILL QUERY WHERE 1",
    "OPTIMIZE TABLE dbsvc_analytics.trading_ticks FINAL",
    "DETACH DATABASE {B}",
    "GRANT SELECT ON *.* TO default",
    "",
    "   ",
    "-- only a comment",
    "SELEKT 1",
]


@pytest.mark.parametrize(
    "sql", TABLE_FUNCTIONS + SYSTEM + OTHER_TENANTS + FUNCTIONS + SETTINGS_AND_OUTPUT + STATEMENTS
)
async def test_every_attack_is_refused_with_a_stable_code(world: World, run: Any, sql: str) -> None:
    outcome = await run(_b(world, sql))
    assert not outcome.ok, f"{sql!r} ran: {outcome.rows}"
    assert not outcome.server_error, outcome
    assert outcome.code in {
        "sql_rejected",
        "sql_syntax_error",
        "analytics_query_error",  # the CTE out of its scope: ClickHouse finds no table t
    }, outcome


async def test_a_reads_its_own_rows_and_only_them(world: World, run: Any) -> None:
    for table in ("trading_ticks", "ai_predictions", "trading_history", "trading_signals"):
        outcome = await run(f"SELECT DISTINCT symbol FROM {table}")
        assert outcome.ok, outcome
        assert [r[0] for r in outcome.rows] == ["OWNSYM"], table
    outcome = await run(
        "WITH s AS (SELECT symbol, count() AS n FROM trading_ticks GROUP BY symbol)"
        f" SELECT symbol, n FROM s UNION ALL SELECT symbol, count() FROM tenant_{world.a}"
        ".trading_ticks GROUP BY symbol"
    )
    assert outcome.ok and [list(r) for r in outcome.rows] == [["OWNSYM", 50], ["OWNSYM", 50]]
    # Answered from the ticks' pre-aggregates (projections over every tenant's ticks): A's only.
    for sql in (
        "SELECT symbol, sum(n) FROM (SELECT symbol, toStartOfMinute(time) AS m, count() AS n"
        " FROM trading_ticks GROUP BY symbol, m) GROUP BY symbol",
        "SELECT symbol, sum(n) FROM (SELECT symbol, bid, ask, count() AS n FROM trading_ticks"
        " GROUP BY symbol, bid, ask) GROUP BY symbol",
    ):
        outcome = await run(sql)
        assert outcome.ok and [list(r) for r in outcome.rows] == [["OWNSYM", 50]], outcome
    # Comments, quoting and harmless text that looks like an attack are only text.
    outcome = await run(
        "SELECT count() /* ; SELECT * FROM system.tables */ FROM `trading_ticks`"
        " WHERE symbol != 'system.tables; DROP' -- ; SETTINGS readonly = 0"
    )
    assert outcome.ok and outcome.rows == [[50]]


async def test_the_services_limits_stop_a_query(world: World, run: Any) -> None:
    assert world.app.analytics is not None
    analytics = world.app.analytics.analytics
    saved = analytics.limits
    analytics.limits = AnalyticsLimits(max_rows_to_read=10)
    try:
        outcome = await run("SELECT count() FROM trading_ticks WHERE volume > 1")
    finally:
        analytics.limits = saved
    assert not outcome.ok and outcome.code == "resource_exhausted", outcome


async def test_clickhouse_off_or_unknown_engine_is_a_clear_error(
    core: Application, grpc_target: str, world: World
) -> None:
    """A service without ClickHouse refuses ``engine: clickhouse`` (failed_precondition); an
    unknown engine is invalid; neither runs anything."""
    tenant = (await core.tenants.create(f"choff_{secrets.token_hex(4)}")).tenant_id
    token = await _token(core, tenant)
    client = MultiDatabaseClient(grpc_target, {"company_id": tenant}, token, retries=0)
    try:
        with pytest.raises(DatabaseServiceError) as info:
            await client.analytics_query("SELECT 1", engine="clickhouse").fetch_all()
        assert info.value.code == "failed_precondition"
        assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(DatabaseServiceError) as info:
            await client.analytics_query("SELECT 1", engine="duckdb").fetch_all()
        assert info.value.code == "invalid_parameters"
        # The PostgreSQL path is still there by default where ClickHouse is off.
        result = await client.analytics_query("SELECT $1::int + 1", [41]).fetch_all()
        assert [list(r) for r in result.rows] == [[42]]
    finally:
        await client.close()


# Costly but allowed-looking reads: each stopped by the service's limits or the parser, with a
# clear code, never a server error, and the next query still answers.
EXPENSIVE = [
    "SELECT " + "(" * 5000 + "1" + ")" * 5000,
    "SELECT 1 WHERE 1 IN (" + ",".join(str(i) for i in range(20000)) + ")",
    "SELECT length(repeat('x', 2000000000))",
    "SELECT count() FROM trading_ticks AS a, trading_ticks AS b, trading_ticks AS c,"
    " trading_ticks AS d, trading_ticks AS e",
    "SELECT arrayMap(x -> x, range(200000000))",
    "SELECT sum(number) FROM (SELECT arrayJoin(range(100000000)) AS number)",
    "SELECT '" + "\\u0000" + "'",
    "SELECT toDecimal256('1e500', 0)",
]


@pytest.mark.parametrize("sql", EXPENSIVE, ids=[f"expensive{i}" for i in range(len(EXPENSIVE))])
async def test_expensive_reads_end_with_a_clear_code(world: World, run: Any, sql: str) -> None:
    outcome = await run(sql)
    assert not outcome.server_error, outcome
    if not outcome.ok:
        assert outcome.code not in {None, "internal"}, outcome
    after = await run("SELECT count() FROM trading_ticks")
    assert after.ok and after.rows == [[50]], after
