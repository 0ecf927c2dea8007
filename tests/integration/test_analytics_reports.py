"""The ready-made reports on ClickHouse (``POST /api/v1/analytics/reports/{name}``), each checked
against the same computation in PostgreSQL on the same rows; another tenant's rows never count;
bad parameters are refused with a stable code."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from database_service.analytics.reports import ReportParams, report_sql
from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from tests.fix_clickhouse import capturing, drain

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 11, 2, 9, tzinfo=dt.UTC)

PG = {
    "trading_performance": """
        SELECT (closed_at AT TIME ZONE 'UTC')::date AS day, symbol, sum(profit), count(*),
               round(count(*) FILTER (WHERE profit > 0)::numeric / count(*), 6), max(drawdown)
        FROM (
            SELECT closed_at, symbol, profit, max(cum) OVER w - cum AS drawdown
            FROM (
                SELECT closed_at, symbol, profit, trade_id,
                       sum(profit) OVER (PARTITION BY (closed_at AT TIME ZONE 'UTC')::date, symbol
                                         ORDER BY closed_at, trade_id) AS cum
                FROM {schema}.trading_history WHERE closed_at IS NOT NULL
            ) c
            WINDOW w AS (PARTITION BY (closed_at AT TIME ZONE 'UTC')::date, symbol
                         ORDER BY closed_at, trade_id)
        ) d GROUP BY 1, 2 ORDER BY 1, 2""",
    "market_trends": """
        SELECT date_bin('15 minutes', time, TIMESTAMPTZ 'epoch'),
               round(sum((bid + ask) * volume) / (2 * sum(volume)), 6), sum(volume), count(*),
               round(stddev_pop(bid::float8)::numeric, 6)
        FROM {shared}.trading_ticks
        WHERE company_id = $1 AND symbol = 'EURUSD' AND time >= $2 AND time < $3
        GROUP BY 1 ORDER BY 1""",
    "volume_profile": """
        SELECT round((bid + ask) / 2, 3), sum(volume), count(*)
        FROM {shared}.trading_ticks WHERE company_id = $1 AND symbol = 'EURUSD'
        GROUP BY 1 ORDER BY 1""",
}
_OUTCOME = """
    SELECT {keys}, {measures}
    FROM (
        SELECT e.*, CASE WHEN a.time <= e.event_time + interval '30 minutes' AND b.time >= a.time
                         THEN b.mid / a.mid - 1 END AS ret
        FROM ({events}) e
        LEFT JOIN LATERAL (
            SELECT time, (bid + ask)::float8 / 2 AS mid FROM {{shared}}.trading_ticks t
            WHERE t.company_id = $1 AND t.symbol = e.symbol AND t.time >= e.event_time
            ORDER BY time LIMIT 1) a ON true
        LEFT JOIN LATERAL (
            SELECT time, (bid + ask)::float8 / 2 AS mid FROM {{shared}}.trading_ticks t
            WHERE t.company_id = $1 AND t.symbol = e.symbol
              AND t.time <= e.event_time + interval '30 minutes'
            ORDER BY time DESC LIMIT 1) b ON true
    ) x GROUP BY 1, 2 ORDER BY 1, 2"""
_HITS = "count(*) FILTER (WHERE (action = 'buy' AND ret > 0) OR (action = 'sell' AND ret < 0))"
PG["signal_performance"] = _OUTCOME.format(
    keys="symbol, action",
    measures=f"count(*), count(ret), {_HITS}, round(({_HITS})::numeric / nullif(count(ret), 0), 6),"
    " round(avg(ret)::numeric, 6)",
    events="SELECT symbol, action, created_at AS event_time FROM {schema}.trading_signals"
    " WHERE action IN ('buy', 'sell') AND $1::text IS NOT NULL",
)
PG["prediction_accuracy"] = _OUTCOME.format(
    keys="model_version, (event_time AT TIME ZONE 'UTC')::date",
    measures=f"count(*), count(ret), {_HITS}, round(({_HITS})::numeric / nullif(count(ret), 0), 6),"
    " round(avg(confidence), 6)",
    events="SELECT symbol, prediction_type AS action, time AS event_time, model_version,"
    " confidence FROM {shared}.ai_predictions"
    " WHERE company_id = $1 AND prediction_type IN ('buy', 'sell')",
)
BODIES: dict[str, dict[str, Any]] = {
    "signal_performance": {"horizon_minutes": 30},
    "prediction_accuracy": {"horizon_minutes": 30},
    "trading_performance": {},
    "market_trends": {
        "symbol": "EURUSD",
        "start": "2026-11-02T09:00:00Z",
        "end": "2026-11-02T10:30:00+00:00",
        "interval_minutes": 15,
    },
    "volume_profile": {"symbol": "EURUSD"},
}


async def _fill(app: Application, tenant_id: str, salt: int) -> None:
    schema = (await app.registry.get_active(tenant_id)).schema_name
    shared = app.settings.shared_schema
    async with app.owner_pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask,"
            " volume, spread) SELECT $1::timestamptz + g * interval '1 second', $2, 'u',"
            " CASE WHEN g % 3 = 0 THEN 'GBPUSD' ELSE 'EURUSD' END,"
            " round((1.1 + sin(g / 300.0 + $3) / 100)::numeric, 5),"
            " round((1.1003 + sin(g / 300.0 + $3) / 100 + (g % 7) / 100000.0)::numeric, 5),"
            " 1 + (g + $3) % 11, 0.3 FROM generate_series(0, 7199) g",
            T0,
            tenant_id,
            salt,
        )
        await conn.execute(
            f"INSERT INTO {schema}.trading_history (symbol, side, volume, open_price,"
            " close_price, profit, opened_at, closed_at) SELECT"
            " CASE WHEN g % 2 = 0 THEN 'EURUSD' ELSE 'GBPUSD' END, 'buy', 1, 1.1, 1.1,"
            " round((sin(g * 1.7 + $2) * 250)::numeric, 2), $1::timestamptz,"
            " $1::timestamptz + (g % 3) * interval '1 day' + g * interval '7 minutes'"
            " FROM generate_series(1, 400) g",
            T0,
            salt,
        )
        # The drawdown's edges: a closed trade without a profit first in its day (left out, as
        # PostgreSQL's sum and max leave it), a day and symbol with no profit at all (no
        # drawdown: NULL), and trades closed at the same instant (ordered by trade_id).
        await conn.execute(
            f"INSERT INTO {schema}.trading_history (symbol, side, volume, open_price,"
            " close_price, profit, opened_at, closed_at) VALUES"
            " ('EURUSD', 'buy', 1, 1.1, 1.1, NULL, $1, $1),"
            " ('USDJPY', 'buy', 1, 1.1, 1.1, NULL, $1, $1 + interval '1 minute'),"
            " ('USDJPY', 'buy', 1, 1.1, 1.1, NULL, $1, $1 + interval '2 minutes'),"
            " ('GBPUSD', 'buy', 1, 1.1, 1.1, 90, $1, $1 + interval '1 day 1 second'),"
            " ('GBPUSD', 'buy', 1, 1.1, 1.1, -300, $1, $1 + interval '1 day 1 second'),"
            " ('GBPUSD', 'buy', 1, 1.1, 1.1, 120, $1, $1 + interval '1 day 1 second')",
            T0,
        )
        # Signals and predictions every 97 s across the ticks' two hours, and a few after them
        # (no tick at or after: not evaluated).
        await conn.execute(
            f"INSERT INTO {schema}.trading_signals (signal_id, symbol, action, confidence,"
            " created_at) SELECT 's' || g, CASE WHEN g % 3 = 0 THEN 'GBPUSD' ELSE 'EURUSD' END,"
            " (ARRAY['buy', 'sell', 'hold'])[1 + (g / 3 + $2) % 3], 0.5,"
            " $1::timestamptz + g * interval '97 seconds' + interval '0.5 seconds'"
            " FROM generate_series(0, 79) g",
            T0,
            salt,
        )
        await conn.execute(
            f"INSERT INTO {shared}.ai_predictions (time, company_id, user_id, symbol,"
            " prediction_type, confidence, model_version) SELECT"
            " $1::timestamptz + g * interval '89 seconds' + interval '0.25 seconds', $2, 'u',"
            " CASE WHEN g % 3 = 0 THEN 'GBPUSD' ELSE 'EURUSD' END,"
            " (ARRAY['buy', 'sell', 'hold'])[1 + (g * 7 + $3) % 3], round((0.5 + (g % 5) / 10.0)::numeric, 2),"
            " 'v' || (g % 2) FROM generate_series(0, 89) g",
            T0,
            tenant_id,
            salt,
        )
        # An open trade counts nowhere.
        await conn.execute(
            f"INSERT INTO {schema}.trading_history (symbol, side, volume, open_price, opened_at)"
            " VALUES ('EURUSD', 'sell', 1, 1.2, $1)",
            T0,
        )


@pytest.fixture(scope="module")
async def setup(
    ch_core: Application,
) -> AsyncIterator[tuple[Application, str, httpx.AsyncClient, str]]:

    async with capturing(ch_core) as app:
        tenant = (await app.tenants.create(f"rep_{secrets.token_hex(4)}")).tenant_id
        other = (await app.tenants.create(f"rpo_{secrets.token_hex(4)}")).tenant_id
        await _fill(app, tenant, 0)
        await _fill(app, other, 5)  # same symbols and times, other values: must not count
        await drain(app)
    name = f"rep-{secrets.token_hex(4)}"
    await app.services.register(name, tenants=[tenant], scopes=(Scope.READ,), with_secret=False)
    token = app.tokens.issue(name, tenants=[tenant], scopes=(Scope.READ,), ttl_seconds=600)
    transport = httpx.ASGITransport(app=create_http_app(app))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http,
        GrpcServer(app) as server,
    ):
        client = MultiDatabaseClient(
            f"127.0.0.1:{server.port}", {"company_id": tenant}, token, retries=0
        )
        yield app, tenant, http, token, client
        await client.close()


def _norm(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat()[:19]
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str) and len(value) >= 10 and value[4] == "-":
        return value[:19]
    if isinstance(value, str | int | float | Decimal) and not isinstance(value, bool):
        try:
            return Decimal(str(value)).normalize()  # decimals travel as text
        except ArithmeticError:
            return value  # a symbol
    return value


@pytest.mark.parametrize("front_end", ["rest", "grpc"])
@pytest.mark.parametrize("name", sorted(PG))
async def test_each_report_matches_postgresql_on_the_same_rows(
    setup: Any, name: str, front_end: str
) -> None:
    app, tenant, http, token, client = setup
    if front_end == "rest":
        response = await http.post(
            f"/api/v1/analytics/reports/{name}",
            json=BODIES[name],
            headers={"Authorization": f"Bearer {token}", "x-tenant-id": tenant},
        )
        assert response.status_code == 200, response.text
        document = response.json()
        assert document["store"] == "clickhouse"
        rows = document["rows"]
    else:
        body = dict(BODIES[name])
        for key in ("start", "end"):
            if key in body:
                body[key] = dt.datetime.fromisoformat(body[key])
        rows = (await client.analytics_report(name, **body)).rows
    got = [[_norm(v) for v in row] for row in rows]
    schema = (await app.registry.get_active(tenant)).schema_name
    sql = PG[name].format(schema=schema, shared=app.settings.shared_schema)
    async with app.owner_pool.acquire() as conn:
        if name == "market_trends":
            pg = await conn.fetch(sql, tenant, T0, T0 + dt.timedelta(minutes=90))
        elif name in ("volume_profile", "signal_performance", "prediction_accuracy"):
            pg = await conn.fetch(sql, tenant)
        else:
            pg = await conn.fetch(sql)
    expected = [[_norm(v) for v in row] for row in pg]
    assert len(got) >= 2
    assert got == expected


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("nope", {}),
        ("market_trends", {}),  # no symbol
        ("market_trends", {"symbol": "EUR'; DROP"}),
        ("market_trends", {"symbol": "EURUSD", "interval_minutes": 0}),
        ("market_trends", {"symbol": "EURUSD", "start": "2026-11-02T09:00:00"}),  # no zone
        ("volume_profile", {"symbol": "EURUSD", "price_decimals": 9}),
        ("trading_performance", {"start": "2026-11-03T00:00:00Z", "end": "2026-11-02T00:00:00Z"}),
    ],
)
async def test_bad_parameters_are_refused_and_run_nothing(
    setup: Any, name: str, body: dict[str, Any]
) -> None:
    _, tenant, http, token, _ = setup
    response = await http.post(
        f"/api/v1/analytics/reports/{name}",
        json=body,
        headers={"Authorization": f"Bearer {token}", "x-tenant-id": tenant},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_parameters"


async def test_the_seeds_multi_db_call_reads_clickhouse(setup: Any) -> None:
    """``execute_multi_db_operation``'s ``clickhouse`` part: a read on the tenant's tables; an
    INSERT the service would refuse (here: a literal value, no params) is refused by its
    validation before any store ran (it was the ClickHouse guard's ``sql_rejected`` when the
    client ran the part itself; inserts into the tenant's own tables:
    tests/integration/test_multidb_clickhouse.py)."""
    _, _, _, _, client = setup
    result = await client.execute_multi_db_operation(
        {"clickhouse": {"query": "SELECT count() FROM trading_signals"}}
    )
    assert [list(r) for r in result["clickhouse"].rows] == [[80]]
    with pytest.raises(DatabaseServiceError) as info:
        await client.execute_multi_db_operation(
            {"clickhouse": {"query": "INSERT INTO signal_analytics (a) VALUES (1)"}}
        )
    assert info.value.code == "invalid_request"
    assert "clickhouse part" in info.value.message


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("market_trends", ReportParams(symbol="EURUSD", interval_minutes=15)),
        (
            "market_trends",
            ReportParams(
                symbol="EURUSD",
                start=T0 + dt.timedelta(minutes=30),
                end=T0 + dt.timedelta(minutes=90),
                interval_minutes=7,
            ),
        ),
        ("volume_profile", ReportParams(symbol="EURUSD", price_decimals=4)),
    ],
)
async def test_market_reports_are_answered_from_the_tick_pre_aggregates(
    setup: Any, name: str, params: ReportParams
) -> None:
    """The report's SQL is one the ticks' projections answer (``force_optimize_projection``:
    ClickHouse refuses it rather than read the ticks), and the answer is the ticks' own (the
    same query with projections off)."""
    app, tenant, *_ = setup
    analytics = app.analytics.analytics
    sql = report_sql(name, tenant, params)
    pre = await analytics.store.query(sql, analytics.run_settings(force_optimize_projection=1))
    raw = await analytics.store.query(sql, analytics.run_settings(optimize_use_projections=0))
    assert pre.rows == raw.rows
    assert len(raw.rows) >= 2


async def test_a_bound_inside_a_minute_reads_the_ticks_and_counts_only_those_after_it(
    setup: Any,
) -> None:
    """A start that is not a whole minute cannot be answered per minute: the report reads the
    ticks, and counts none before the start (PostgreSQL agrees)."""
    app, tenant, *_ = setup
    start, end = T0 + dt.timedelta(minutes=30, seconds=20), T0 + dt.timedelta(minutes=45)
    result = await app.analytics.analytics.store.query(
        report_sql("market_trends", tenant, ReportParams("EURUSD", start, end, 60)),
        app.analytics.analytics.run_settings(),
    )
    async with app.owner_pool.acquire() as conn:
        expected = await conn.fetchval(
            f"SELECT count(*) FROM {app.settings.shared_schema}.trading_ticks WHERE"
            " company_id = $1 AND symbol = 'EURUSD' AND time >= $2 AND time < $3",
            tenant,
            start,
            end,
        )
    assert [int(r[3]) for r in result.rows] == [expected]
