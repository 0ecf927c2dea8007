"""The seed's multi-store example with its ``clickhouse`` part (``INSERT INTO signal_analytics``)
on the real engine (embedded chDB): the insert goes through the outbox to ``Analytics.insert``
with the entry id as ClickHouse's insert deduplication token, so applying the entry again stores
nothing more; an insert ClickHouse would refuse is refused before anything runs."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest

from database_service.api.grpc import GrpcServer
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service_client import DatabaseServiceError, MultiDatabaseClient

pytestmark = pytest.mark.integration

SIGNALS = (
    "CREATE TABLE signal_analytics (signal_id String, symbol LowCardinality(String),"
    " action LowCardinality(String), confidence Decimal(5, 2), created_at DateTime64(6, 'UTC'))"
    " ENGINE = MergeTree ORDER BY (symbol, created_at)"
)


def admin(tenant_id: str) -> Principal:
    return Principal("mdb-ch", frozenset({tenant_id}), frozenset(Scope))


@pytest.fixture
async def setup(ch_core: Application) -> AsyncIterator[tuple[Application, MultiDatabaseClient]]:
    tenant_id = f"mdbch_{secrets.token_hex(4)}"
    await ch_core.tenants.create(tenant_id)
    assert ch_core.analytics is not None
    await ch_core.analytics.analytics.query(admin(tenant_id), TenantContext(tenant_id), SIGNALS)
    name = f"svc-{tenant_id}"
    scopes = [Scope.READ, Scope.WRITE]
    await ch_core.services.register(name, tenants=[tenant_id], scopes=scopes, with_secret=False)
    token = ch_core.tokens.issue(name, tenants=[tenant_id], scopes=scopes, ttl_seconds=600)
    async with (
        GrpcServer(ch_core) as server,
        MultiDatabaseClient(f"127.0.0.1:{server.port}", tenant_id, token, retries=0) as client,
    ):
        yield ch_core, client


async def count(core: Application, tenant_id: str) -> int:
    assert core.analytics is not None
    result = await core.analytics.analytics.query(
        admin(tenant_id), TenantContext(tenant_id), "SELECT count() FROM signal_analytics"
    )
    return int(result.rows[0][0])


async def test_the_seeds_example_writes_clickhouse_exactly_once(
    setup: tuple[Application, MultiDatabaseClient],
) -> None:
    core, client = setup
    tid = client.tenant_id
    signal = {
        "signal_id": "sig-ch",
        "symbol": "EURUSD",
        "action": "buy",
        "confidence": Decimal("0.87"),
        "created_at": dt.datetime(2026, 12, 3, 9, 30, tzinfo=dt.UTC),
    }
    result = await client.execute_multi_db_operation(
        {
            "postgresql": {
                "query": "INSERT INTO trading_signals (signal_id, symbol, action)"
                " VALUES (:signal_id, :symbol, :action)",
                "params": {k: signal[k] for k in ("signal_id", "symbol", "action")},
                "company_id": tid,
            },
            "dragonflydb": {
                "operation": "set",
                "key": f"signal:{tid}:sig-ch",
                "value": {"signal_id": "sig-ch"},
                "ttl": 300,
            },
            "clickhouse": {
                "query": "INSERT INTO signal_analytics (signal_id, symbol, action, confidence,"
                " created_at) VALUES (:signal_id, :symbol, :action, :confidence, :created_at)",
                "params": signal,
            },
        }
    )
    assert {n: o.status for n, o in result.outcomes.items()} == dict.fromkeys(
        ("postgresql", "dragonflydb", "clickhouse"), "applied"
    )
    assert result["clickhouse"] == 1
    assert await count(core, tid) == 1
    assert core.analytics is not None
    rows = await core.analytics.analytics.query(
        admin(tid), TenantContext(tid), "SELECT signal_id, confidence FROM signal_analytics"
    )
    assert [list(r) for r in rows.rows] == [["sig-ch", Decimal("0.87")]]
    # Applied again (a crash after ClickHouse acknowledged, before the mark): stored once.
    entry = result.outcomes["clickhouse"].entry_id
    table = f"{core.settings.control_schema}.multidb_outbox"
    await core.owner_pool.execute(f"UPDATE {table} SET status = 'pending' WHERE id = $1", entry)
    assert (await core.multidb_outbox.apply(entry)).status == "applied"
    assert await count(core, tid) == 1


@pytest.mark.parametrize(
    ("query", "params", "code"),
    [
        ("INSERT INTO signal_analytics (signal_id) VALUES ('literal')", [], "sql_rejected"),
        ("INSERT INTO signal_analytics (signal_id) VALUES ($1)", None, "invalid_request"),
        ("INSERT INTO trading_signals (signal_id) VALUES ($1)", ["x"], "sql_rejected"),
        ("INSERT INTO nowhere (signal_id) VALUES ($1)", ["x"], "sql_rejected"),
        ("INSERT INTO other_db.signal_analytics (signal_id) VALUES ($1)", ["x"], "sql_rejected"),
        (
            "INSERT INTO signal_analytics (signal_id) VALUES (:id)",
            {"other": 1},
            "invalid_parameters",
        ),
        ("DROP TABLE signal_analytics", None, "not_supported"),
    ],
)
async def test_a_clickhouse_write_it_would_refuse_runs_nothing(
    setup: tuple[Application, MultiDatabaseClient],
    query: str,
    params: object,
    code: str,
) -> None:
    core, client = setup
    part: dict[str, object] = {"query": query}
    if params is not None:
        part["params"] = params
    with pytest.raises(DatabaseServiceError) as info:
        await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('never', 'n@x', 'pro')"},
                "clickhouse": part,
            }
        )
    assert info.value.code == code, info.value
    assert "clickhouse part" in info.value.message
    users = await client.fetch_all("SELECT count(*) FROM users")
    assert users.rows == [(0,)]
    assert await count(core, client.tenant_id) == 0
