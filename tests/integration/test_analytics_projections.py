"""A ClickHouse ticks table created before the pre-aggregates (projections) existed gets them:
the upgrade statements the service runs at start add them and build them for the parts already
stored, on chDB (the real engine, in a host process of this test's own)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from database_service.analytics.schema import (
    SHARED_DATABASE,
    projection_upgrade_ddl,
    shared_ddl,
)
from database_service.stores.clickhouse import ClickHouseError
from database_service.stores.clickhouse.host import ChdbProcessStore

pytestmark = pytest.mark.integration

TICKS = f"{SHARED_DATABASE}.trading_ticks"
PER_MINUTE = (
    f"SELECT toStartOfMinute(time) AS m, sum(volume), count() FROM {TICKS}"
    " WHERE company_id = 'acme' AND symbol = 'EURUSD' GROUP BY m ORDER BY m"
)


async def test_a_ticks_table_from_before_the_projections_gets_them_with_its_old_rows(
    tmp_path: Path,
) -> None:
    store = ChdbProcessStore(tmp_path, idle_exit=1.0)
    try:
        ddl = next(sql for sql in shared_ddl() if f"{TICKS} " in sql)
        before = ddl[: ddl.index(", PROJECTION")] + ddl[ddl.index(") ENGINE") :]
        before = before.replace(", deduplicate_merge_projection_mode = 'rebuild'", "")
        await store.command(shared_ddl()[0])
        await store.command(before)
        await store.command(
            f"INSERT INTO {TICKS} (company_id, time, symbol, bid, ask, volume, _seq)"
            " SELECT 'acme', toDateTime64('2026-11-02 09:00:00', 6, 'UTC') + number,"
            " 'EURUSD', 1.1, 1.1002, 2, number FROM numbers(180)"
        )
        with pytest.raises(ClickHouseError):  # no projection yet
            await store.query(PER_MINUTE, {"force_optimize_projection": 1})
        existing = await store.query(
            "SELECT create_table_query FROM system.tables"
            f" WHERE database = '{SHARED_DATABASE}' AND name = 'trading_ticks'"
        )
        for statement in projection_upgrade_ddl("trading_ticks", str(existing.rows[0][0])):
            await store.command(statement)
        for _ in range(100):  # MATERIALIZE PROJECTION is a background mutation
            done = await store.query(
                f"SELECT count() FROM system.mutations WHERE database = '{SHARED_DATABASE}'"
                " AND NOT is_done"
            )
            if int(done.rows[0][0]) == 0:
                break
            await asyncio.sleep(0.1)
        rows = (await store.query(PER_MINUTE, {"force_optimize_projection": 1})).rows
        assert [[int(v) for v in r[1:]] for r in rows] == [[120, 60]] * 3
        again = await store.query(
            "SELECT create_table_query FROM system.tables"
            f" WHERE database = '{SHARED_DATABASE}' AND name = 'trading_ticks'"
        )
        assert projection_upgrade_ddl("trading_ticks", str(again.rows[0][0])) == []
    finally:
        await store.close()
