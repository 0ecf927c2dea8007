"""Partitioned time-series tables on real PostgreSQL: created ahead, late and far-future records
never fail, retention drops only expired partitions, one instance maintains at a time, queries
prune partitions."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import AsyncIterator

import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.query import TenantContext
from database_service.tenancy import TenantRecord
from database_service.timeseries import PartitionManager, SeriesSpec
from database_service.timeseries.layout import floor_time, partition_name
from database_service.timeseries.partitions import MAINTENANCE_LOCK_KEY
from tests.fix_service import TenantFactory

HOUR = dt.timedelta(hours=1)


@pytest.fixture
async def scratch(core: Application) -> AsyncIterator[tuple[PartitionManager, str]]:
    """A private partitioned table in the shared schema, maintained by its own manager."""
    table = f"ts_scratch_{secrets.token_hex(3)}"
    schema = core.settings.shared_schema
    await core.owner_pool.execute(
        f"CREATE TABLE {schema}.{table} (time timestamptz NOT NULL, company_id text NOT NULL,"
        f" v int) PARTITION BY RANGE (time);"
        f" CREATE TABLE {schema}.{table}_default PARTITION OF {schema}.{table} DEFAULT"
    )
    spec = SeriesSpec(
        table, HOUR, 2, dt.timedelta(hours=24), dt.timedelta(hours=2), dt.timedelta(hours=2)
    )
    manager = PartitionManager(core.owner_pool, schema=schema, specs=[spec], metrics=core.metrics)
    yield manager, f"{schema}.{table}"
    await core.owner_pool.execute(f"DROP TABLE {schema}.{table}")


async def test_startup_created_partitions_around_now(core: Application) -> None:
    now = dt.datetime.now(dt.UTC)
    names = {p.name for p in await core.partitions.list("trading_ticks")}
    current = partition_name("trading_ticks", floor_time(now, HOUR))
    ahead = partition_name("trading_ticks", floor_time(now + dt.timedelta(hours=12), HOUR))
    assert {current, ahead, "trading_ticks_default"} <= names
    subs = await core.owner_pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = ($1 || '.' || $2)::regclass ORDER BY 1",
        core.settings.shared_schema,
        current,
    )
    assert [r["relname"] for r in subs] == [f"{current}_h{i}" for i in range(4)]
    predictions = {p.name for p in await core.partitions.list("ai_predictions")}
    assert partition_name("ai_predictions", floor_time(now, dt.timedelta(hours=6))) in predictions


async def test_late_and_far_future_ticks_never_fail(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("late")
    shared = core.settings.shared_schema
    for moment in (
        "1999-01-01T00:00:00Z",
        "2999-01-01T00:00:00Z",
        dt.datetime.now(dt.UTC).isoformat(),
    ):
        await core.owner_pool.execute(
            f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask, volume)"
            " VALUES ($1::text::timestamptz, $2, 'u', 'EURUSD', 1, 1.1, 1)",
            moment,
            tenant.tenant_id,
        )
    where = await core.owner_pool.fetch(
        f"SELECT tableoid::regclass::text AS part FROM {shared}.trading_ticks WHERE company_id = $1"
        " ORDER BY time",
        tenant.tenant_id,
    )
    parts = [r["part"] for r in where]
    assert parts[0].endswith("trading_ticks_default") and parts[2].endswith("trading_ticks_default")
    assert (
        "_p" in parts[1] and "_h" in parts[1]
    )  # now: its hour's partition, a company sub-partition


async def test_creating_a_range_moves_its_rows_out_of_default(
    core: Application, scratch: tuple[PartitionManager, str]
) -> None:
    manager, table = scratch
    spec = manager.specs[table.split(".")[1]]
    future = dt.datetime(2990, 5, 5, 10, 30, tzinfo=dt.UTC)
    await core.owner_pool.execute(f"INSERT INTO {table} VALUES ($1, 'acme', 1)", future)
    assert (
        await core.owner_pool.fetchval(f"SELECT tableoid::regclass::text FROM {table}")
    ).endswith("_default")
    async with core.owner_pool.acquire() as conn:
        moved = await manager.create_range(
            conn, spec, floor_time(future, HOUR), floor_time(future, HOUR) + HOUR
        )
    assert moved == 1
    part = await core.owner_pool.fetchval(f"SELECT tableoid::regclass::text FROM {table}")
    assert partition_name(spec.table, floor_time(future, HOUR)) in part


async def test_retention_drops_only_expired_partitions(
    core: Application, scratch: tuple[PartitionManager, str]
) -> None:
    manager, table = scratch
    now = dt.datetime.now(dt.UTC)
    # Rounds 30 h and 10 h ago created the partitions of their time; then rows arrived.
    old = await manager.maintain(now - dt.timedelta(hours=30))
    assert old is not None and old.created and not old.dropped
    assert (await manager.maintain(now - dt.timedelta(hours=10))) is not None
    for age in (30, 10, 0):
        await core.owner_pool.execute(
            f"INSERT INTO {table} VALUES ($1, 'acme', $2)", now - dt.timedelta(hours=age), age
        )
    await core.owner_pool.execute(
        f"INSERT INTO {table} VALUES ($1, 'acme', 999)", now - dt.timedelta(days=40)
    )
    latest = await manager.maintain(now)
    assert latest is not None
    cutoff = floor_time(now - dt.timedelta(hours=24), HOUR)
    # Exactly the partitions wholly before the cutoff went: those of the round 30 h ago.
    assert set(latest.dropped) == {n for n in old.created if _start_of(n) + HOUR <= cutoff}
    assert latest.dropped
    kept = sorted(r["v"] for r in await core.owner_pool.fetch(f"SELECT v FROM {table}"))
    assert kept == [0, 10]  # the 30 h old row and the 40-day-old row in default are gone


def _start_of(name: str) -> dt.datetime:
    stamp = name.rsplit("_p", 1)[1]
    return dt.datetime.strptime(stamp, "%Y%m%d_%H%M").replace(tzinfo=dt.UTC)


async def test_maintenance_runs_in_one_instance_at_a_time(
    core: Application, scratch: tuple[PartitionManager, str]
) -> None:
    manager, _ = scratch
    other_instance = PartitionManager(
        core.owner_pool,
        schema=manager.schema,
        specs=list(manager.specs.values()),
        metrics=core.metrics,
    )
    async with core.owner_pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", MAINTENANCE_LOCK_KEY)
        try:
            assert await manager.maintain() is None
            assert await other_instance.maintain() is None
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)
    assert await other_instance.maintain() is not None
    metrics = core.metrics.render().decode()
    assert 'dbsvc_partition_maintenance_runs_total{outcome="skipped"}' in metrics


async def test_time_range_queries_prune_partitions(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant: TenantRecord = await new_tenant("prune")
    await core.services.register(
        "prune-svc", tenants=[tenant.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    principal = await core.authenticator.authenticate(
        "Bearer "
        + core.tokens.issue(
            "prune-svc", tenants=[tenant.tenant_id], scopes=[Scope.READ], ttl_seconds=60
        )
    )
    now = floor_time(dt.datetime.now(dt.UTC), HOUR)
    result = await core.executor.execute(
        principal,
        TenantContext(tenant.tenant_id),
        "EXPLAIN SELECT * FROM trading_ticks WHERE time >= $1 AND time < $2",
        [now.isoformat(), (now + HOUR).isoformat()],
    )
    plan = "\n".join(row[0] for row in result.rows)
    scanned = {
        line.split(" on ")[1].split()[0]
        for line in plan.splitlines()
        if " on trading_ticks_p" in line
    }
    total = len(await core.partitions.list("trading_ticks"))
    assert scanned and all(
        name.startswith(partition_name("trading_ticks", now)) for name in scanned
    ), plan
    assert total > 10


async def test_rollup_lag_is_zero_while_candles_keep_up_and_grows_when_they_do_not(
    core: Application, scratch: tuple[PartitionManager, str]
) -> None:
    # A moment no other test writes near (the DEFAULT partition takes it).
    at = dt.datetime(2031, 1, 1, 12, tzinfo=dt.UTC)
    shared = core.settings.shared_schema
    tenant = await core.tenants.create(f"lag_{secrets.token_hex(3)}")
    insert = (
        f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask)"
        " VALUES ($1, $2, 'u', 'LAG', 1.0, 1.1)"
    )
    try:
        await core.owner_pool.execute(insert, at - dt.timedelta(minutes=5), tenant.tenant_id)
        await core.owner_pool.execute(insert, at - dt.timedelta(seconds=1), tenant.tenant_id)
        assert await core.partitions.rollup_lag(at) == 0
        # The newest minute's candle goes missing: the candles now trail by ~4 minutes.
        await core.owner_pool.execute(
            f"DELETE FROM {shared}.candles_1m WHERE company_id = $1 AND bucket > $2",
            tenant.tenant_id,
            at - dt.timedelta(minutes=2),
        )
        assert 230 < await core.partitions.rollup_lag(at) < 241
        await core.partitions.maintain()
        assert "dbsvc_rollup_lag_seconds" in core.metrics.render().decode()
    finally:
        await core.owner_pool.execute(
            f"DELETE FROM {shared}.trading_ticks WHERE company_id = $1", tenant.tenant_id
        )
