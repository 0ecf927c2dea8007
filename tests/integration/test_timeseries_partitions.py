"""Partitioned time-series tables on real PostgreSQL: created ahead, late and far-future records
never fail, retention drops only expired partitions, one instance maintains at a time, queries
prune partitions; maintenance asks for its locks with a short lock_timeout, retries, and leaves a
busy table whole for the next round."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.errors import FailedPrecondition
from database_service.query import TenantContext
from database_service.tenancy import TenantRecord
from database_service.timeseries import MaintenanceReport, PartitionManager, SeriesSpec
from database_service.timeseries.layout import floor_time, partition_ddl, partition_name
from database_service.timeseries.partitions import MAINTENANCE_LOCK_KEY, TableBusy
from tests.fix_pg import PgCluster
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
        "EXPLAIN (COSTS OFF) SELECT * FROM trading_ticks WHERE time >= $1 AND time < $2",
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


async def test_moving_ticks_out_of_default_leaves_their_candles_as_they_were(
    core: Application,
) -> None:
    """Moved rows go straight into the new partition: the parent's candle trigger does not see
    them a second time (re-inserting them through the parent used to double their volume)."""
    shared = core.settings.shared_schema
    spec = core.partitions.specs["trading_ticks"]
    at = dt.datetime(2990, 6, 1, 10, 30, tzinfo=dt.UTC)
    start = floor_time(at, HOUR)
    name = partition_name("trading_ticks", start)
    company = f"mv_{secrets.token_hex(3)}"
    await core.owner_pool.execute(
        f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask, volume)"
        " VALUES ($1, $2, 'u', 'MOVE', 1.0, 1.2, 5)",
        at,
        company,
    )
    candle = f"SELECT volume, ticks FROM {shared}.candles_1m WHERE company_id = $1"
    try:
        assert await _candle(core, candle, company) == (5, 1)
        async with core.owner_pool.acquire() as conn:
            assert await core.partitions.create_range(conn, spec, start, start + HOUR) == 1
        where = await core.owner_pool.fetchval(
            f"SELECT tableoid::regclass::text FROM {shared}.trading_ticks WHERE company_id = $1",
            company,
        )
        assert name in where
        assert await _candle(core, candle, company) == (5, 1)
    finally:
        await core.owner_pool.execute(
            f"DELETE FROM {shared}.trading_ticks WHERE company_id = $1", company
        )
        if name in {p.name for p in await core.partitions.list("trading_ticks")}:
            await core.owner_pool.execute(
                f"ALTER TABLE {shared}.trading_ticks DETACH PARTITION {shared}.{name};"
                f" DROP TABLE {shared}.{name}"
            )


async def _candle(core: Application, sql: str, company: str) -> tuple[Any, ...]:
    row = await core.owner_pool.fetchrow(sql, company)
    assert row is not None
    return tuple(row)


# --- locks: maintenance never makes tenants wait ----------------------------------------------


def _variant(core: Application, manager: PartitionManager, **locking: Any) -> PartitionManager:
    """The same tables, maintained with other lock settings."""
    return PartitionManager(
        core.owner_pool,
        schema=manager.schema,
        specs=list(manager.specs.values()),
        metrics=core.metrics,
        **locking,
    )


@pytest.fixture
async def blocker(pg_cluster: PgCluster) -> AsyncIterator[asyncpg.Connection]:
    """Another session, standing for a tenant with a long transaction."""
    conn = await asyncpg.connect(pg_cluster.dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def _hold(conn: asyncpg.Connection, sql: str) -> None:
    """Open a transaction that has run ``sql`` and keeps its locks."""
    await conn.execute("BEGIN")
    await conn.fetch(sql)


async def _release_after(conn: asyncpg.Connection, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await conn.execute("ROLLBACK")


async def _relations(core: Application, table: str) -> set[str]:
    schema, name = table.split(".")
    rows = await core.owner_pool.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = $1::regnamespace"
        " AND starts_with(relname, $2) AND relkind IN ('r', 'p')",
        schema,
        name,
    )
    return {r["relname"] for r in rows}


def _lock_timeouts(core: Application, table: str, action: str) -> float:
    value = core.metrics.registry.get_sample_value(
        "dbsvc_partition_maintenance_lock_timeouts_total", {"table": table, "action": action}
    )
    return value or 0.0


async def test_locks_taken_on_the_parent_and_the_default_partition(
    core: Application, scratch: tuple[PartitionManager, str]
) -> None:
    """What PostgreSQL locks in each way of adding and removing a range (the module docstring's
    table): CREATE … PARTITION OF and DETACH lock the parent exclusively, a standalone table
    only reads it, ATTACH takes SHARE UPDATE EXCLUSIVE on the parent (readers and writers go on)
    but ACCESS EXCLUSIVE on DEFAULT, which it scans."""
    manager, table = scratch
    spec = manager.specs[table.split(".")[1]]
    default = f"{table}_default"
    start = dt.datetime(2991, 1, 1, tzinfo=dt.UTC)
    name = partition_name(spec.table, start)
    standalone = manager._standalone_ddl(spec, start)
    attach = (
        f"ALTER TABLE {table} ATTACH PARTITION {manager.schema}.{name}"
        f" FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + HOUR).isoformat()}')"
    )
    report = await manager.maintain()
    assert report is not None and report.created
    existing = f"{manager.schema}.{report.created[0]}"

    async def locks(statements: list[str]) -> tuple[set[str], set[str]]:
        async with core.owner_pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                for statement in statements:
                    await conn.execute(statement)
                rows = await core.owner_pool.fetch(
                    "SELECT l.relation::regclass::text AS rel, l.mode FROM pg_locks l"
                    " WHERE l.pid = $1 AND l.relation = ANY($2::text[]::regclass[])",
                    conn.get_server_pid(),
                    [table, default],
                )
            finally:
                await transaction.rollback()
        on = {table: set[str](), default: set[str]()}
        for row in rows:
            on[row["rel"]].add(row["mode"])
        return on[table], on[default]

    exclusive = {"AccessExclusiveLock"}
    assert await locks(partition_ddl(manager.schema, spec, start, start + HOUR)) == (
        exclusive,
        exclusive,
    )
    assert await locks(standalone) == ({"AccessShareLock"}, set())
    assert await locks([*standalone, attach]) == (
        {"AccessShareLock", "ShareUpdateExclusiveLock"},
        exclusive,
    )
    parent, on_default = await locks([f"ALTER TABLE {table} DETACH PARTITION {existing}"])
    assert "AccessExclusiveLock" in parent and on_default == exclusive


async def test_attach_waits_only_for_readers_of_the_default_partition(
    core: Application, scratch: tuple[PartitionManager, str], blocker: asyncpg.Connection
) -> None:
    """A reader pruned to one range does not hold up ATTACH; a reader of the whole table holds
    DEFAULT too, so ATTACH gives up after lock_timeout and leaves nothing behind."""
    manager, table = scratch
    spec = manager.specs[table.split(".")[1]]
    quick = _variant(core, manager, lock_timeout_ms=30, lock_retries=0)
    now = floor_time(dt.datetime.now(dt.UTC), HOUR)
    assert await quick.maintain(now) is not None
    far = dt.datetime(2992, 1, 1, tzinfo=dt.UTC)
    pruned = f"SELECT count(*) FROM {table} WHERE time >= '{now.isoformat()}'" + (
        f" AND time < '{(now + HOUR).isoformat()}'"
    )
    await _hold(blocker, pruned)
    async with core.owner_pool.acquire() as conn:
        assert await quick.create_range(conn, spec, far, far + HOUR) == 0
    await blocker.execute("ROLLBACK")
    relations = await _relations(core, table)
    await _hold(blocker, f"SELECT count(*) FROM {table}")
    async with core.owner_pool.acquire() as conn:
        with pytest.raises(TableBusy):
            await quick.create_range(conn, spec, far + HOUR, far + 2 * HOUR)
    await blocker.execute("ROLLBACK")
    assert await _relations(core, table) == relations  # no standalone table left over


async def test_a_busy_table_is_retried_until_its_lock_comes_free(
    core: Application, scratch: tuple[PartitionManager, str], blocker: asyncpg.Connection
) -> None:
    manager, table = scratch
    patient = _variant(core, manager, lock_timeout_ms=30, lock_retries=8, lock_backoff_seconds=0.05)
    await _hold(blocker, f"SELECT count(*) FROM {table}")
    release = asyncio.create_task(_release_after(blocker, 0.4))
    started = time.perf_counter()
    report = await patient.maintain()
    elapsed = time.perf_counter() - started
    await release
    assert report is not None and report.created and not report.busy, report
    assert elapsed >= 0.4  # it could only succeed once the blocker had gone
    assert {p.name for p in await manager.list()} >= set(report.created)


async def test_a_table_still_busy_is_reported_and_left_whole_for_the_next_round(
    core: Application, scratch: tuple[PartitionManager, str], blocker: asyncpg.Connection
) -> None:
    manager, table = scratch
    name = table.split(".")[1]
    hasty = _variant(core, manager, lock_timeout_ms=20, lock_retries=2, lock_backoff_seconds=0.01)
    now = dt.datetime.now(dt.UTC)
    await core.owner_pool.execute(f"INSERT INTO {table} VALUES ($1, 'acme', 7)", now)
    relations = await _relations(core, table)
    timeouts = _lock_timeouts(core, name, "create")
    await _hold(blocker, f"SELECT count(*) FROM {table}")
    try:
        busy = await hasty.maintain(now)
    finally:
        await blocker.execute("ROLLBACK")
    assert busy is not None and not busy.created and busy.moved_from_default == 0
    first = partition_name(name, floor_time(now - dt.timedelta(hours=2), HOUR))
    assert busy.busy[0] == first and partition_name(name, floor_time(now, HOUR)) in busy.busy
    assert busy.to_dict()["busy"] == busy.busy
    assert _lock_timeouts(core, name, "create") == timeouts + 1  # once, not per range
    # Nothing half done: no standalone table left, the waiting row still in DEFAULT, once.
    assert await _relations(core, table) == relations
    rows = await core.owner_pool.fetch(f"SELECT tableoid::regclass::text AS part FROM {table}")
    assert [r["part"] for r in rows] == [f"{table}_default"]

    again = await hasty.maintain(now)
    assert isinstance(again, MaintenanceReport)
    assert again.created == busy.busy and not again.busy and again.moved_from_default == 1
    part = await core.owner_pool.fetchval(f"SELECT tableoid::regclass::text FROM {table}")
    assert partition_name(name, floor_time(now, HOUR)) in part


async def test_run_forever_survives_any_exception(
    core: Application, scratch: tuple[PartitionManager, str], caplog: pytest.LogCaptureFixture
) -> None:
    manager, _ = scratch
    real = manager.maintain
    calls = 0
    fourth_round = asyncio.Event()

    async def flaky(now: dt.datetime | None = None) -> MaintenanceReport | None:
        nonlocal calls
        calls += 1
        if calls >= 4:
            fourth_round.set()
        if calls == 1:
            raise RuntimeError("boom: not a database error")
        if calls == 2:
            raise KeyError("unexpected")
        return await real(now)

    manager.maintain = flaky  # type: ignore[method-assign]
    failed = core.metrics.registry.get_sample_value(
        "dbsvc_partition_maintenance_runs_total", {"outcome": "failed"}
    )
    caplog.set_level(logging.ERROR, logger="database_service.timeseries.partitions")
    task = asyncio.create_task(manager.run_forever(0.01))
    await asyncio.wait_for(fourth_round.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager.last_run is not None  # the rounds after the failures ran
    after = core.metrics.registry.get_sample_value(
        "dbsvc_partition_maintenance_runs_total", {"outcome": "failed"}
    )
    assert (after or 0) - (failed or 0) == 2
    logged = [r for r in caplog.records if "maintenance failed" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info for r in logged)
    assert "boom" in caplog.text and "Traceback" in caplog.text


async def test_detach_and_attach_of_a_busy_table_fail_with_nothing_changed(
    core: Application, scratch: tuple[PartitionManager, str], blocker: asyncpg.Connection
) -> None:
    manager, table = scratch
    name = table.split(".")[1]
    hasty = _variant(core, manager, lock_timeout_ms=20, lock_retries=1, lock_backoff_seconds=0.01)
    report = await hasty.maintain()
    assert report is not None and report.created
    partition = report.created[0]
    start = _start_of(partition)

    async def attached() -> bool:
        return partition in {p.name for p in await manager.list(name)}

    timeouts = _lock_timeouts(core, name, "detach")
    await _hold(blocker, f"SELECT count(*) FROM {table}")
    try:
        with pytest.raises(FailedPrecondition, match=r"shared table .* is busy.*; retry") as info:
            await hasty.detach(name, partition)
    finally:
        await blocker.execute("ROLLBACK")
    assert info.value.sqlstate == "55P03" and info.value.code == "failed_precondition"
    assert await attached()
    assert _lock_timeouts(core, name, "detach") == timeouts + 1
    await hasty.detach(name, partition)
    assert not await attached()

    await _hold(blocker, f"SELECT count(*) FROM {table}")
    try:
        with pytest.raises(FailedPrecondition, match="is busy"):
            await hasty.attach(name, partition, start)
    finally:
        await blocker.execute("ROLLBACK")
    assert not await attached()
    await hasty.attach(name, partition, start)
    assert await attached()


async def test_busy_detach_through_rest_is_a_409_to_retry(
    core: Application,
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    blocker: asyncpg.Connection,
) -> None:
    shared = core.settings.shared_schema
    interval = core.partitions.specs["ai_predictions"].interval
    start = floor_time(dt.datetime.now(dt.UTC), interval)
    partition = partition_name("ai_predictions", start)
    await _hold(blocker, f"SELECT count(*) FROM {shared}.ai_predictions")
    try:
        response = await http.post(
            f"/api/v1/admin/partitions/ai_predictions/{partition}/detach", headers=admin_headers
        )
    finally:
        await blocker.execute("ROLLBACK")
        if partition not in {p.name for p in await core.partitions.list("ai_predictions")}:
            await core.partitions.attach("ai_predictions", partition, start)  # put it back
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "failed_precondition" and error["sqlstate"] == "55P03"
    assert "is busy" in error["message"] and "retry" in error["message"]
