"""PostgreSQL → ClickHouse replication on chDB (the real engine): every committed change of
trading_ticks, ai_predictions, candles_1m and each tenant's trading_history and trading_signals
arrives once, whoever wrote it — ingestion, the query API, bulk insert, an operator's own SQL —
including updates and deletes; a replicator that dies after ClickHouse took a batch and before
the queue forgot it (or between two tables of a batch) loses and doubles nothing; deleting a
tenant removes its ClickHouse data; the lag shows in health and metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import subprocess
import sys
import uuid
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from database_service.analytics.replicator import REPLICATOR_LOCK_KEY, Replicator, set_capture
from database_service.analytics.schema import SHARED_DATABASE, tenant_database
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.ingest import Inbound, Verdict
from database_service.query import TenantContext
from database_service.stores.clickhouse import ClickHouseStore
from database_service_client._proto import ingest_pb2
from tests.fix_clickhouse import drain
from tests.fix_service import cli_env

BIN = Path(sys.executable).parent / "database-service"

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)


def principal(tenant_id: str) -> Principal:
    return Principal("analytics-test", frozenset({tenant_id}), frozenset({Scope.READ, Scope.WRITE}))


async def new_tenant(app: Application, prefix: str = "ch") -> str:
    record = await app.tenants.create(f"{prefix}_{secrets.token_hex(4)}")
    return record.tenant_id


async def ingest_ticks(app: Application, tenant_id: str, n: int) -> None:
    name = f"ingest-{secrets.token_hex(4)}"
    await app.services.register(
        name, tenants=[tenant_id], scopes=(Scope.INGEST,), with_secret=False
    )
    token = app.tokens.issue(name, tenants=[tenant_id], scopes=(Scope.INGEST,), ttl_seconds=600)
    t0_us = int(T0.timestamp() * 1_000_000)
    ticks = [
        ingest_pb2.Tick(
            event_id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            user_id="u1",
            symbol="EURUSD",
            time_unix_us=t0_us + i * 250_000,  # 4 a second: several 1-minute candles
            bid=1.1 + i * 1e-5,
            ask=1.1002 + i * 1e-5,
            volume=i % 7 + 1,
            spread=0.2,
        )
        for i in range(n)
    ]
    payload = ingest_pb2.IngestBatch(ticks=ticks, producer="test").SerializeToString()
    verdicts = await app.ingest.process("nats", [Inbound(payload, "s", f"Bearer {token}")])
    assert verdicts == [Verdict.ACK]


async def write_every_way(app: Application, tenant_id: str) -> None:
    """Ticks by ingestion; trades by the query API and by bulk insert; predictions, more ticks,
    a signal, an update and a delete by the operator's own connection (psql's way)."""
    await ingest_ticks(app, tenant_id, 600)
    ctx = TenantContext(tenant_id)
    who = principal(tenant_id)
    await app.executor.execute(
        who,
        ctx,
        "INSERT INTO trading_history (symbol, side, volume, open_price, close_price, profit,"
        " opened_at, closed_at) SELECT 'EURUSD', 'buy', 1.5, 1.1, 1.2, g * 10.25,"
        " $1::timestamptz + g * interval '1 minute', $1::timestamptz + g * interval '2 minute'"
        " FROM generate_series(1, 40) g",
        [T0],
    )

    async def rows() -> Any:
        yield [
            ("GBPUSD", "sell", Decimal("2.00"), Decimal("1.3"), Decimal("1.25"), Decimal(i), T0)
            for i in range(25)
        ]

    inserted = await app.executor.bulk_insert(
        who,
        ctx,
        "trading_history",
        ["symbol", "side", "volume", "open_price", "close_price", "profit", "opened_at"],
        rows(),
    )
    assert inserted == 25
    schema = (await app.registry.get_active(tenant_id)).schema_name
    shared = app.settings.shared_schema
    async with app.owner_pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {shared}.ai_predictions (time, company_id, user_id, symbol,"
            " prediction_type, confidence, model_version, features, result)"
            " SELECT $1::timestamptz + g * interval '1 minute', $2, 'u1', 'EURUSD', 'direction',"
            " 0.75, 'v' || (g % 2), '{\"f\": 1}', jsonb_build_object('up', g % 3 = 0)"
            " FROM generate_series(1, 30) g",
            T0,
            tenant_id,
        )
        await conn.execute(
            f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask,"
            " volume, spread) SELECT $1::timestamptz + g * interval '1 second', $2, 'op',"
            " 'USDJPY', 150.1, 150.2, 5, 0.1 FROM generate_series(1, 70) g",
            T0,
            tenant_id,
        )
        await conn.execute(
            f"INSERT INTO {schema}.trading_signals (signal_id, symbol, action, confidence,"
            " payload, created_at) SELECT 's' || g, 'EURUSD', 'buy', 0.5, '{}', $1"
            " FROM generate_series(1, 12) g",
            T0,
        )
        await conn.execute(
            f"UPDATE {schema}.trading_history SET profit = -1 WHERE symbol = 'GBPUSD' AND profit < 5"
        )
        await conn.execute(f"DELETE FROM {schema}.trading_signals WHERE signal_id IN ('s1', 's2')")


async def ch_rows(app: Application, sql: str) -> list[list[Any]]:
    assert app.analytics is not None
    return (await app.analytics.analytics.store.query(sql)).rows


async def pg_rows(app: Application, tenant_id: str, sql: str) -> list[asyncpg.Record]:
    schema = (await app.registry.get_active(tenant_id)).schema_name
    shared = app.settings.shared_schema
    async with app.owner_pool.acquire() as conn:
        return await conn.fetch(sql.format(schema=schema, shared=shared), tenant_id)


async def assert_same(app: Application, tenant_id: str) -> None:
    """Every replicated table of the tenant: ClickHouse's view holds PostgreSQL's rows, and the
    raw table holds no row twice (no duplicate, not even one a merge would later remove)."""
    assert app.analytics is not None
    await app.analytics.analytics.provision(tenant_id)
    db = tenant_database(tenant_id)
    checks: Sequence[tuple[str, str, str]] = (
        (
            "trading_ticks",
            "SELECT count(*), sum(volume), sum(bid) FROM {shared}.trading_ticks WHERE company_id = $1",
            f"SELECT count(), sum(volume), sum(bid) FROM {db}.trading_ticks",
        ),
        (
            "ai_predictions",
            "SELECT count(*), sum(confidence), count(DISTINCT model_version)"
            " FROM {shared}.ai_predictions WHERE company_id = $1",
            f"SELECT count(), sum(confidence), uniqExact(model_version) FROM {db}.ai_predictions",
        ),
        (
            "candles_1m",
            "SELECT count(*), sum(volume), sum(close), sum(ticks)"
            " FROM {shared}.candles_1m WHERE company_id = $1",
            f"SELECT count(), sum(volume), sum(close), sum(ticks) FROM {db}.candles_1m",
        ),
        (
            "trading_history",
            "SELECT count(*), sum(profit), count(*) FILTER (WHERE profit = -1)"
            " FROM {schema}.trading_history WHERE $1::text IS NOT NULL",
            f"SELECT count(), sum(profit), countIf(profit = -1) FROM {db}.trading_history",
        ),
        (
            "trading_signals",
            "SELECT count(*), coalesce(string_agg(signal_id, ',' ORDER BY signal_id), ''), 0"
            " FROM {schema}.trading_signals WHERE $1::text IS NOT NULL",
            f"SELECT count(), arrayStringConcat(arraySort(groupArray(signal_id)), ','), 0"
            f" FROM {db}.trading_signals",
        ),
    )
    for table, pg_sql, ch_sql in checks:
        (expected,) = await pg_rows(app, tenant_id, pg_sql)
        (got,) = await ch_rows(app, ch_sql)
        assert [_norm(v) for v in got] == [_norm(v) for v in expected], table
    for table, key in (("trading_ticks", "_seq"), ("ai_predictions", "_seq")):
        (dupes,) = await ch_rows(
            app,
            f"SELECT count() - uniqExact({key}) FROM {SHARED_DATABASE}.{table}"
            f" WHERE company_id = '{tenant_id}'",
        )
        assert dupes == [0], table
    for table, key in (("trading_history", "trade_id"), ("trading_signals", "signal_id")):
        (dupes,) = await ch_rows(
            app,
            f"SELECT count() - uniqExact({key}, _version) FROM {SHARED_DATABASE}.{table}"
            f" WHERE company_id = '{tenant_id}'",
        )
        assert dupes == [0], table


async def assert_pre_aggregates_same(app: Application, tenant_id: str) -> None:
    """The ticks' pre-aggregates (the per-minute and per-quote projections), read alone
    (``force_optimize_projection``: ClickHouse refuses the query rather than read the rows),
    hold PostgreSQL's sums: nothing doubled."""
    assert app.analytics is not None
    store = app.analytics.analytics.store
    shared = f"{SHARED_DATABASE}.trading_ticks WHERE company_id = '{tenant_id}'"
    checks = (
        (
            "SELECT symbol, extract(epoch FROM date_trunc('minute', time))::bigint, sum(volume),"
            " count(*), sum((bid + ask) * volume) FROM {shared}.trading_ticks"
            " WHERE company_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
            "SELECT symbol, toUnixTimestamp(toStartOfMinute(time)) AS m, sum(volume), count(),"
            f" sum((bid + ask) * volume) FROM {shared} GROUP BY symbol, m ORDER BY symbol, m",
        ),
        (
            "SELECT symbol, bid, ask, sum(volume), count(*) FROM {shared}.trading_ticks"
            " WHERE company_id = $1 GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            f"SELECT symbol, bid, ask, sum(volume), count() FROM {shared}"
            " GROUP BY symbol, bid, ask ORDER BY symbol, bid, ask",
        ),
    )
    for pg_sql, ch_sql in checks:
        expected = [[_norm(v) for v in r] for r in await pg_rows(app, tenant_id, pg_sql)]
        got = await store.query(ch_sql, {"force_optimize_projection": 1})
        assert [[_norm(v) for v in r] for r in got.rows] == expected
        assert len(expected) > 1


def _norm(value: Any) -> Any:
    if value is None:
        return 0
    if isinstance(value, Decimal | float):
        return round(Decimal(str(value)), 6)
    return value


async def test_rows_written_every_way_arrive_once(ch: Application) -> None:
    tenant_id = await new_tenant(ch)
    await write_every_way(ch, tenant_id)
    assert await drain(ch) > 0
    await assert_same(ch, tenant_id)
    assert await drain(ch) == 0  # nothing left, nothing sent again
    await assert_same(ch, tenant_id)
    await assert_pre_aggregates_same(ch, tenant_id)


class _CrashAfter:
    """A store that dies (raises) after ``inserts`` inserts: a replicator killed mid-batch."""

    def __init__(self, store: ClickHouseStore, inserts: int) -> None:
        self._store = store
        self._left = inserts
        self.kind = store.kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def insert_json(self, table: str, lines: Sequence[str], dedup_token: str) -> None:
        if self._left == 0:
            raise RuntimeError("killed")
        self._left -= 1
        await self._store.insert_json(table, lines, dedup_token)


@pytest.mark.parametrize("where", ["after_clickhouse_took_all", "between_tables"])
async def test_a_replicator_killed_mid_batch_loses_and_doubles_nothing(
    ch: Application, where: str
) -> None:
    assert ch.analytics is not None
    await drain(ch)  # start from an empty queue: the batch below is this test's
    tenant_id = await new_tenant(ch)
    await write_every_way(ch, tenant_id)
    store = ch.analytics.analytics.store
    control = ch.settings.control_schema
    conn = await asyncpg.connect(ch.postgres_dsn)
    try:
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", REPLICATOR_LOCK_KEY)
        if where == "between_tables":
            doomed = Replicator(ch.postgres_dsn, _CrashAfter(store, 2), control_schema=control)
        else:
            doomed = Replicator(ch.postgres_dsn, store, control_schema=control)

            async def die() -> None:
                raise RuntimeError("killed")

            doomed.after_insert = die
        with pytest.raises(RuntimeError, match="killed"):
            await doomed.step(conn)
        # The batch is still queued and recorded in flight: nothing was forgotten.
        assert await conn.fetchval(f"SELECT count(*) FROM {control}.analytics_inflight") == 1
        queued = await conn.fetchval(f"SELECT count(*) FROM {control}.analytics_changes")
        assert queued > 0
        # The next replicator sends the same batch again; ClickHouse drops what it has.
        survivor = Replicator(ch.postgres_dsn, store, control_schema=control)
        assert await survivor.drain(conn) == queued
        assert survivor.status.replays == 1
        assert await conn.fetchval(f"SELECT count(*) FROM {control}.analytics_inflight") == 0
    finally:
        await conn.close()
    await assert_same(ch, tenant_id)
    await assert_pre_aggregates_same(ch, tenant_id)


async def test_deleting_a_tenant_removes_its_clickhouse_data(ch: Application) -> None:
    doomed, kept = await new_tenant(ch, "del"), await new_tenant(ch, "keep")
    await ingest_ticks(ch, doomed, 100)
    await ingest_ticks(ch, kept, 100)
    await drain(ch)
    await assert_same(ch, doomed)
    await ch.tenants.delete(doomed, confirm=True)
    await drain(ch)
    for table in ("trading_ticks", "candles_1m", "trading_history", "trading_signals"):
        (left,) = await ch_rows(
            ch,
            f"SELECT count() FROM {SHARED_DATABASE}.{table} WHERE company_id = '{doomed}'",
        )
        assert left == [0], table
    (databases,) = await ch_rows(
        ch, f"SELECT count() FROM system.databases WHERE name = '{tenant_database(doomed)}'"
    )
    assert databases == [0]
    await assert_same(ch, kept)


_DELETE_THEN_DIE = """
import asyncio, os, signal, sys

from database_service.app import Application
from database_service.config import Settings


async def main() -> None:
    async with Application(Settings(), start_nats=False, maintain_partitions=False) as app:
        drop = app.tenants._drop

        async def drop_then_die(record):
            await drop(record)  # committed
            os.kill(os.getpid(), signal.SIGKILL)  # before anything after the commit runs

        app.tenants._drop = drop_then_die
        await app.tenants.delete(sys.argv[1], confirm=True)


asyncio.run(main())
"""


async def test_a_crash_right_after_a_tenant_delete_commits_still_purges_clickhouse(
    ch: Application,
) -> None:
    """The purge is queued in the delete's own transaction: an instance killed (SIGKILL) the
    moment the delete committed — one without analytics, even — leaves the purge queued, and the
    replicator (here: the next one to run) removes the tenant's rows and its own tables."""
    assert ch.analytics is not None
    analytics = ch.analytics.analytics
    doomed, kept = await new_tenant(ch, "crash"), await new_tenant(ch, "keep")
    await ingest_ticks(ch, doomed, 50)
    await ingest_ticks(ch, kept, 50)
    await drain(ch)
    admin = Principal("analytics-test", frozenset({doomed}), frozenset(Scope))
    await analytics.query(
        admin, TenantContext(doomed), "CREATE TABLE own (a Int32) ENGINE = MergeTree ORDER BY a"
    )
    await analytics.insert(doomed, "INSERT INTO own (a) VALUES ($1)", [1], dedup_token="one")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DELETE_THEN_DIE,
        doomed,
        env=cli_env(ch.settings, DBSVC_CLICKHOUSE_ENABLED="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == -9, err.decode()[-2000:]
    async with ch.owner_pool.acquire() as conn:
        gone = await conn.fetchval(
            f"SELECT count(*) = 0 FROM {ch.settings.control_schema}.tenants WHERE tenant_id = $1",
            doomed,
        )
    assert gone  # the delete committed; nothing after it ran
    (before,) = await ch_rows(
        ch, f"SELECT count() FROM {SHARED_DATABASE}.trading_ticks WHERE company_id = '{doomed}'"
    )
    assert before == [50]  # still there: the purge is queued, not done
    await drain(ch)
    (left,) = await ch_rows(
        ch, f"SELECT count() FROM {SHARED_DATABASE}.trading_ticks WHERE company_id = '{doomed}'"
    )
    assert left == [0]
    (databases,) = await ch_rows(
        ch, f"SELECT count() FROM system.databases WHERE name = '{tenant_database(doomed)}'"
    )
    assert databases == [0]  # its own tables went with its database
    await assert_same(ch, kept)


async def test_ticks_and_predictions_follow_postgresqls_retention(ch: Application) -> None:
    """A TTL from DBSVC_TS_RETENTION_DAYS on ticks and predictions: rows past it are removed by
    ClickHouse's merges, newer ones stay; applying the same retention again changes nothing."""
    assert ch.analytics is not None
    analytics = ch.analytics.analytics
    tenant = await new_tenant(ch, "ttl")
    old, new = dt.datetime(2012, 1, 2, tzinfo=dt.UTC), dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    async with ch.owner_pool.acquire() as conn:
        for when in (old, new):
            await conn.execute(
                f"INSERT INTO {ch.settings.shared_schema}.trading_ticks (time, company_id,"
                " symbol, bid, ask, volume) VALUES ($1, $2, 'TTL', 1.1, 1.2, 1)",
                when,
                tenant,
            )
    await drain(ch)
    try:
        ran = await analytics.apply_retention(3650)  # ten years: only the 2012 tick is past it
        assert [s.split(" MODIFY TTL ")[0] for s in ran] == [
            f"ALTER TABLE {SHARED_DATABASE}.trading_ticks",
            f"ALTER TABLE {SHARED_DATABASE}.ai_predictions",
        ]
        assert await analytics.apply_retention(3650) == []  # in place: nothing to do
        await analytics.store.command(
            f"OPTIMIZE TABLE {SHARED_DATABASE}.trading_ticks FINAL SETTINGS mutations_sync = 2"
        )
        rows = await ch_rows(
            ch,
            f"SELECT toYear(time) FROM {SHARED_DATABASE}.trading_ticks"
            f" WHERE company_id = '{tenant}' ORDER BY time",
        )
        assert rows == [[2026]]
    finally:
        assert len(await analytics.apply_retention(36_500)) == 2  # the fixture's: no TTL
    assert await analytics.apply_retention(36_500) == []


async def test_replication_lag_shows_in_health_and_metrics(ch: Application) -> None:
    await drain(ch)
    tenant_id = await new_tenant(ch)
    await ingest_ticks(ch, tenant_id, 50)
    health = await ch.health.document(detailed=True)
    entry = health["dependencies"]["clickhouse"]
    assert entry["status"] == "healthy"
    assert entry["engine"] == "chdb" and entry["version"].startswith("26.")
    assert entry["replication"]["queued_changes"] > 0
    assert entry["replication"]["lag_seconds"] > 0
    assert health["database_details"]["clickhouse"]["replication"]["queued_changes"] > 0
    metrics = ch.metrics.render().decode()
    assert "dbsvc_analytics_replication_lag_seconds" in metrics
    await drain(ch)
    assert ch.analytics is not None
    entry = await ch.analytics.check()  # the probe itself: the document is cached for 1 s
    assert entry["replication"]["queued_changes"] == 0
    assert entry["replication"]["lag_seconds"] == 0


async def test_backfill_brings_older_rows_once_with_a_progress_bar(ch: Application) -> None:
    """Rows written while replication was off reach ClickHouse through ``database-service
    analytics backfill --tenant``; rows that were already there are not doubled."""
    tenant_id = await new_tenant(ch, "bf")
    await write_every_way(ch, tenant_id)
    await drain(ch)
    control, shared = ch.settings.control_schema, ch.settings.shared_schema
    async with ch.owner_pool.acquire() as conn:
        await set_capture(conn, control, False)
        try:
            await conn.execute(
                f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid,"
                " volume) SELECT $1::timestamptz + g * interval '1 ms', $2, 'old', 'OLD', 1.5, 1"
                " FROM generate_series(1, 500) g",
                T0,
                tenant_id,
            )
        finally:
            await set_capture(conn, control, True)
    result = await asyncio.to_thread(
        subprocess.run,
        [str(BIN), "analytics", "backfill", "--tenant", tenant_id],
        # The fixture's retention too: the command's own start applies DBSVC_TS_RETENTION_DAYS
        # to ClickHouse's ticks as a TTL, and the default would drop the later tests' ticks of
        # last month (the reports compare them with PostgreSQL).
        env=cli_env(
            ch.settings,
            DBSVC_CLICKHOUSE_ENABLED="true",
            DBSVC_TS_RETENTION_DAYS=str(ch.settings.ts_retention_days),
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "replicate [##############################]" in result.stderr  # the finished bar
    report = json.loads(result.stdout)
    assert report["tenants"] == [tenant_id] and report["rows"]["trading_ticks"] == 1170
    await drain(ch)  # whatever the command's own replicator left (nothing, normally)
    await assert_same(ch, tenant_id)


async def test_a_replayed_insert_does_not_double_the_tick_pre_aggregates(
    ch: Application,
) -> None:
    """The same block sent again with its deduplication token (a replay after a crash) adds
    nothing to the per-minute and per-quote pre-aggregates; a new token (new rows) does — the
    check can see a doubling."""
    assert ch.analytics is not None
    store = ch.analytics.analytics.store
    tenant_id = await new_tenant(ch, "pre")

    def block(first_seq: int) -> list[str]:
        return [
            json.dumps(
                {
                    "company_id": tenant_id,
                    "time": f"2026-11-25 12:{i // 20:02d}:{i % 20:02d}",
                    "symbol": "EURUSD",
                    "bid": "1.10010",
                    "ask": f"1.1003{i % 3}",
                    "volume": 1 + i % 4,
                    "_seq": first_seq + i,
                }
            )
            for i in range(100)
        ]

    table = f"{SHARED_DATABASE}.trading_ticks"
    per_minute = (
        f"SELECT toStartOfMinute(time) AS m, sum(volume), count(), sum((bid + ask) * volume)"
        f" FROM {table} WHERE company_id = '{tenant_id}' AND symbol = 'EURUSD'"
        " GROUP BY m ORDER BY m"
    )
    per_quote = (
        f"SELECT bid, ask, sum(volume), count() FROM {table}"
        f" WHERE company_id = '{tenant_id}' AND symbol = 'EURUSD' GROUP BY bid, ask ORDER BY ask"
    )
    only_projections = {"force_optimize_projection": 1}

    async def sums() -> list[list[list[Any]]]:
        return [(await store.query(q, only_projections)).rows for q in (per_minute, per_quote)]

    await store.insert_json(table, block(10_000_000), f"pre-{tenant_id}-1")
    once = await sums()
    assert [int(r[2]) for r in once[0]] == [20] * 5
    await store.insert_json(table, block(10_000_000), f"pre-{tenant_id}-1")  # the replay
    assert await sums() == once
    # New rows (other seqs: a merge keeps them) with the same values: doubled.
    await store.insert_json(table, block(20_000_000), f"pre-{tenant_id}-2")
    assert [int(r[2]) for r in (await sums())[0]] == [40] * 5
