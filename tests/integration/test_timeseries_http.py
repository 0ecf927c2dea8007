"""The time-series REST endpoints (NDJSON) and the admin partition endpoints."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import httpx

from database_service.app import Application
from database_service.auth import Scope
from tests.fix_service import TenantFactory, TokenFactory

AT = dt.datetime(2024, 6, 3, 9, 0, tzinfo=dt.UTC)


def lines(response: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in response.text.splitlines() if line]


async def test_candles_ticks_and_last_tick_stream_as_ndjson(
    http: httpx.AsyncClient,
    core: Application,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = await new_tenant("rest_ts")
    headers = await service_headers(
        [tenant.tenant_id], (Scope.READ,), **{"X-Tenant-Id": tenant.tenant_id}
    )
    async with core.owner_pool.acquire() as conn:
        await conn.copy_records_to_table(
            "trading_ticks",
            schema_name=core.settings.shared_schema,
            columns=["time", "company_id", "user_id", "symbol", "bid", "ask", "volume"],
            records=[
                (
                    AT + dt.timedelta(seconds=s),
                    tenant.tenant_id,
                    "u",
                    "EURUSD",
                    Decimal("1.1"),
                    Decimal("1.3"),
                    2,
                )
                for s in (5, 65, 70)
            ],
        )
    params = {
        "symbol": "EURUSD",
        "start": AT.isoformat(),
        "end": (AT + dt.timedelta(minutes=3)).isoformat(),
    }
    candles = await http.get(
        "/api/v1/timeseries/candles",
        params={**params, "interval": 60, "gap_fill": "true"},
        headers=headers,
    )
    assert candles.status_code == 200, candles.text
    assert candles.headers["content-type"] == "application/x-ndjson"
    body = lines(candles)
    assert [(c["volume"], c["close"]) for c in body] == [(2, "1.2"), (4, "1.2"), (0, "1.2")]
    ticks = await http.get(
        "/api/v1/timeseries/ticks", params={**params, "limit": 2}, headers=headers
    )
    assert [t["volume"] for t in lines(ticks)] == [2, 2]
    last = await http.get(
        "/api/v1/timeseries/last", params={"since": AT.isoformat()}, headers=headers
    )
    assert [t["symbol"] for t in lines(last)] == ["EURUSD"]


async def test_errors_come_before_the_stream(
    http: httpx.AsyncClient, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    tenant = await new_tenant("rest_ts_err")
    headers = await service_headers(
        [tenant.tenant_id], (Scope.READ,), **{"X-Tenant-Id": tenant.tenant_id}
    )
    bad = await http.get(
        "/api/v1/timeseries/candles",
        params={"symbol": "X", "start": AT.isoformat(), "end": AT.isoformat(), "interval": 60},
        headers=headers,
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_parameters"
    other = await http.get(
        "/api/v1/timeseries/last",
        params={"since": AT.isoformat()},
        headers={**headers, "X-Tenant-Id": "someone_else"},
    )
    assert other.status_code == 403


async def test_admin_partition_endpoints(
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    listed = await http.get(
        "/api/v1/admin/partitions", params={"table": "trading_ticks"}, headers=admin_headers
    )
    assert listed.status_code == 200
    names = [p["name"] for p in listed.json()["partitions"]]
    assert "trading_ticks_default" in names and len(names) > 10
    maintained = await http.post("/api/v1/admin/partitions/maintain", headers=admin_headers)
    assert maintained.status_code == 200 and "created" in maintained.json()
    target = next(n for n in names if n != "trading_ticks_default")
    start = dt.datetime.strptime(target.rsplit("_p", 1)[1], "%Y%m%d_%H%M").replace(tzinfo=dt.UTC)
    detached = await http.post(
        f"/api/v1/admin/partitions/trading_ticks/{target}/detach", headers=admin_headers
    )
    assert detached.status_code == 200
    attached = await http.post(
        f"/api/v1/admin/partitions/trading_ticks/{target}/attach",
        params={"start": start.isoformat()},
        headers=admin_headers,
    )
    assert attached.status_code == 200, attached.text
    tenant = await new_tenant("part_admin")
    tenant_admin = await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    refused = await http.post("/api/v1/admin/partitions/maintain", headers=tenant_admin)
    assert refused.status_code == 403
    events = (await http.get("/api/v1/admin/audit", headers=admin_headers)).json()["events"]
    assert {"partitions.detach", "partitions.attach", "partitions.maintain"} <= {
        e["action"] for e in events
    }


async def test_candle_intervals_are_read_as_people_write_them(
    http: httpx.AsyncClient,
    core: Application,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = await new_tenant("rest_iv")
    headers = await service_headers(
        [tenant.tenant_id], (Scope.READ,), **{"X-Tenant-Id": tenant.tenant_id}
    )
    await core.owner_pool.execute(
        f"INSERT INTO {core.settings.shared_schema}.trading_ticks"
        " (time, company_id, user_id, symbol, bid, ask, volume)"
        " SELECT $1::timestamptz + g * interval '20 seconds', $2, 'u', 'IVL', 1.1, 1.3, 1"
        " FROM generate_series(0, 20) g",
        AT,
        tenant.tenant_id,
    )
    params = {
        "symbol": "IVL",
        "start": AT.isoformat(),
        "end": (AT + dt.timedelta(hours=1)).isoformat(),
    }

    async def volumes(interval: str) -> list[int]:
        response = await http.get(
            "/api/v1/timeseries/candles", params={**params, "interval": interval}, headers=headers
        )
        assert response.status_code == 200, (interval, response.text)
        return [c["volume"] for c in lines(response)]

    minute = await volumes("60")
    assert minute == [3] * 7
    for written in ("1m", "PT1M", "60s"):
        assert await volumes(written) == minute
    for written in ("1h", "PT1H", "3600"):
        assert await volumes(written) == [21]
    bad = await http.get(
        "/api/v1/timeseries/candles", params={**params, "interval": "a minute"}, headers=headers
    )
    assert bad.status_code == 400 and "not understood" in bad.json()["error"]["message"]
