"""Tenant A against tenant B through the time-series paths: raw ticks, candles from rollups and
from raw ticks, last tick, REST NDJSON, and the rollup table itself. B has ticks (and therefore
1-minute candles) for the symbol A asks about; A sees none of them."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client import InvalidArgument, MultiDatabaseClient
from tests.fix_service import ClientFactory
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture
async def as_a(client_for: ClientFactory, tenants: Tenants) -> MultiDatabaseClient:
    return await client_for(tenants.a, (Scope.READ, Scope.WRITE, Scope.ADMIN))


def window() -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    return now - dt.timedelta(days=2), now + dt.timedelta(minutes=1)


async def test_victim_has_candles_to_steal(core: Application, tenants: Tenants) -> None:
    count = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.shared}.candles_1m WHERE company_id = $1",
        tenants.b.tenant_id,
    )
    assert count >= 1  # the victim's seeded tick was rolled up


@pytest.mark.parametrize("source", ["rollup", "raw"])
async def test_candles_never_include_b(as_a: MultiDatabaseClient, source: str) -> None:
    start, end = window()
    result = await as_a.candles("EURUSD", start, end, dt.timedelta(hours=1), source=source)
    assert result.rows == []


async def test_raw_ticks_never_include_b(as_a: MultiDatabaseClient) -> None:
    start, end = window()
    assert (await as_a.time_series("EURUSD", start, end)).rows == []


async def test_last_tick_never_includes_b(as_a: MultiDatabaseClient) -> None:
    start, _ = window()
    assert (await as_a.last_ticks(start)).rows == []


async def test_rollup_table_is_filtered_and_read_only(
    as_a: MultiDatabaseClient, tenants: Tenants
) -> None:
    rows = await as_a.fetch_all("SELECT DISTINCT company_id FROM candles_1m")
    assert all(r[0] == tenants.a.tenant_id for r in rows.rows)
    for sql in (
        "DELETE FROM candles_1m",
        "UPDATE candles_1m SET close = 0",
        f"INSERT INTO candles_1m (company_id, symbol, bucket, open, high, low, close, volume, ticks,"
        f" price_volume, spread_sum, spread_n) VALUES ('{tenants.b.tenant_id}', 'EURUSD', now(),"
        " 1, 1, 1, 1, 1, 1, 1, 0, 0)",
    ):
        with pytest.raises(Exception) as info:
            await as_a.fetch_all(sql)
        assert getattr(info.value, "sqlstate", None) == "42501", sql


async def test_recompute_function_is_not_callable_by_tenants(
    as_a: MultiDatabaseClient, tenants: Tenants
) -> None:
    with pytest.raises(Exception) as info:
        await as_a.fetch_all(
            f"SELECT {tenants.shared}.recompute_candles_1m(ARRAY[$1], ARRAY['EURUSD'], ARRAY[now()], now(), now())",
            [tenants.b.tenant_id],
        )
    assert getattr(info.value, "sqlstate", None) == "42501"


async def test_time_series_for_b_by_header_is_refused(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    start, end = window()
    params = {
        "symbol": "EURUSD",
        "start": start.isoformat(),
        "end": end.isoformat(),
        "interval": 3600,
    }
    for path in ("/api/v1/timeseries/candles", "/api/v1/timeseries/ticks"):
        response = await http.get(
            path, params=params, headers={**tenants.a_headers, "X-Tenant-Id": tenants.b.tenant_id}
        )
        assert response.status_code == 403


async def a_candles_over_rest(
    http: httpx.AsyncClient, tenants: Tenants, *, interval_s: int
) -> httpx.Response:
    """A's EURUSD candles over the test window, asked over REST as A."""
    start, end = window()
    return await http.get(
        "/api/v1/timeseries/candles",
        params={
            "symbol": "EURUSD",
            "start": start.isoformat(),
            "end": end.isoformat(),
            "interval": interval_s,
        },
        headers={**tenants.a_headers, "X-Tenant-Id": tenants.a.tenant_id},
    )


async def test_rest_candles_of_a_show_nothing_of_b(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await a_candles_over_rest(http, tenants, interval_s=3600)
    assert response.status_code == 200 and response.text == ""


async def test_partition_changes_need_admin_over_every_tenant(as_a: MultiDatabaseClient) -> None:
    from database_service_client import PermissionDenied

    for action in ("maintain", "detach"):
        with pytest.raises(PermissionDenied):
            await as_a.partitions("trading_ticks", action=action, partition="trading_ticks_default")


async def test_candle_sql_cannot_be_injected_through_the_time_zone(
    as_a: MultiDatabaseClient,
) -> None:
    start, end = window()
    with pytest.raises(InvalidArgument):
        await as_a.candles(
            "EURUSD", start, end, dt.timedelta(hours=1), timezone="UTC'; DELETE FROM users; --"
        )


@pytest.mark.parametrize("front_end", ["grpc", "rest"])
async def test_minute_candles_in_parts_never_include_b(
    as_a: MultiDatabaseClient, http: httpx.AsyncClient, tenants: Tenants, front_end: str
) -> None:
    """Two days of 1-minute candles come in parts (packed_parts_sql); B's minute is in one."""
    start, end = window()
    if front_end == "grpc":
        result = await as_a.candles("EURUSD", start, end, dt.timedelta(minutes=1))
        assert result.rows == [] and result.row_count == 0
        return
    response = await a_candles_over_rest(http, tenants, interval_s=60)
    assert response.status_code == 200 and response.text == ""
