"""Candles through the service equal a naive GROUP BY over the raw ticks, for random data with
late arrivals and many random intervals, time zones and origins; gap filling; last tick; VWAP."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest

from database_service.app import Application
from database_service.application.timeseries import TimeSeries
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from database_service_client import InvalidArgument, MultiDatabaseClient
from database_service_client._proto import database_service_pb2 as pb
from database_service_client.values import from_row
from tests.fix_service import ClientFactory, TenantFactory, TokenFactory

BASE = dt.datetime(2024, 3, 30, 20, 0, tzinfo=dt.UTC)  # spans the London DST change on 31 March
COLUMNS = ["time", "company_id", "user_id", "symbol", "bid", "ask", "volume"]

NAIVE = """
SELECT date_bin($4::interval, time AT TIME ZONE $5, $6::timestamptz AT TIME ZONE $5) AT TIME ZONE $5 AS bucket,
       (array_agg(price ORDER BY time))[1], max(price), min(price),
       (array_agg(price ORDER BY time DESC))[1], coalesce(sum(volume), 0), count(*),
       sum(price * volume) / nullif(sum(volume), 0), avg(ask - bid), min(ask - bid), max(ask - bid)
FROM (SELECT *, trim_scale(coalesce((bid + ask) / 2, bid, ask)) AS price FROM {shared}.trading_ticks
      WHERE company_id = $7 AND symbol = $1 AND time >= $2 AND time < $3) t
WHERE price IS NOT NULL
GROUP BY 1 ORDER BY 1
"""


def random_ticks(
    rng: random.Random, company: str, n: int, span: dt.timedelta
) -> list[tuple[Any, ...]]:
    seconds = rng.sample(range(int(span.total_seconds()) * 1000), n)  # unique milliseconds
    ticks = []
    for ms in seconds:
        bid = Decimal(rng.randint(10_000, 12_000)) / 10_000
        ask = bid + Decimal(rng.randint(1, 30)) / 100_000
        if rng.random() < 0.05:
            ask = None  # a one-sided tick: its price is the bid
        ticks.append(
            (
                BASE + dt.timedelta(milliseconds=ms),
                company,
                "u1",
                rng.choice(["EURUSD", "GBPUSD"]),
                bid,
                ask,
                rng.randint(0, 50),
            )
        )
    return ticks


async def load(core: Application, ticks: list[tuple[Any, ...]]) -> None:
    async with core.owner_pool.acquire() as conn:
        await conn.copy_records_to_table(
            "trading_ticks", schema_name=core.settings.shared_schema, columns=COLUMNS, records=ticks
        )


@pytest.fixture(scope="module")
async def loaded(core: Application) -> TenantRecord:
    tenant = await core.tenants.create("candles_prop")
    rng = random.Random(20241124)
    span = dt.timedelta(hours=8)
    ticks = random_ticks(rng, tenant.tenant_id, 6000, span)
    first, late = ticks[:4500], ticks[4500:]
    for i in range(0, len(first), 1500):  # several statements, so the trigger sees several batches
        await load(core, first[i : i + 1500])
    await load(core, late)  # late arrivals: minutes already rolled up are recomputed
    return tenant


@pytest.fixture
async def client(loaded: TenantRecord, client_for: ClientFactory) -> MultiDatabaseClient:
    return await client_for(loaded, (Scope.READ,))


async def naive(core: Application, tenant: TenantRecord, args: list[Any]) -> list[tuple[Any, ...]]:
    rows = await core.owner_pool.fetch(
        NAIVE.format(shared=core.settings.shared_schema), *args, tenant.tenant_id
    )
    return [tuple(r) for r in rows]


def random_query(rng: random.Random) -> dict[str, Any]:
    interval = dt.timedelta(seconds=rng.choice([1, 5, 7, 60, 90, 300, 900, 3600, 5400, 86400]))
    aligned = rng.random() < 0.6
    start = (
        BASE
        + dt.timedelta(minutes=rng.randint(0, 300))
        + (dt.timedelta() if aligned else dt.timedelta(seconds=rng.randint(1, 59)))
    )
    end = start + dt.timedelta(minutes=rng.randint(1, 240))
    if not aligned and rng.random() < 0.5:
        end += dt.timedelta(seconds=rng.randint(1, 59))
    origin = (
        dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
        + dt.timedelta(minutes=rng.randint(0, 59))
        + (dt.timedelta() if rng.random() < 0.7 else dt.timedelta(seconds=13))
    )
    return {
        "symbol": rng.choice(["EURUSD", "GBPUSD"]),
        "start": start,
        "end": end,
        "interval": interval,
        "timezone": rng.choice(["UTC", "Europe/London", "Asia/Kolkata", "America/New_York"]),
        "origin": origin,
    }


@pytest.mark.parametrize("seed", range(40))
async def test_candles_equal_a_naive_group_by(
    client: MultiDatabaseClient, core: Application, loaded: TenantRecord, seed: int
) -> None:
    q = random_query(random.Random(seed))
    result = await client.candles(**q)
    expected = await naive(
        core, loaded, [q["symbol"], q["start"], q["end"], q["interval"], q["timezone"], q["origin"]]
    )
    assert result.rows == expected, q
    assert [c.name for c in result.columns][:6] == [
        "bucket",
        "open",
        "high",
        "low",
        "close",
        "volume",
    ]


async def test_rollup_and_raw_agree_for_minute_intervals(client: MultiDatabaseClient) -> None:
    for interval in (1, 5, 60, 240):
        args = ("EURUSD", BASE, BASE + dt.timedelta(hours=6), dt.timedelta(minutes=interval))
        rollup = await client.candles(*args, source="rollup")
        raw = await client.candles(*args, source="raw")
        assert rollup.rows == raw.rows and rollup.rows


async def test_late_ticks_correct_their_rolled_up_minutes(
    core: Application, client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("late_candle")
    client = await client_for(tenant, (Scope.READ,))
    minute = dt.timedelta(minutes=1)
    at = BASE.replace(hour=10)
    await load(
        core,
        [
            (
                at + dt.timedelta(seconds=30),
                tenant.tenant_id,
                "u",
                "X",
                Decimal("1.0"),
                Decimal("1.0"),
                1,
            )
        ],
    )
    before = await client.candles("X", at, at + minute, minute, source="rollup")
    assert before.rows[0][1:5] == (Decimal("1.0"),) * 4
    # An earlier tick arrives later: it is the minute's open now, and the new low.
    await load(
        core,
        [
            (
                at + dt.timedelta(seconds=5),
                tenant.tenant_id,
                "u",
                "X",
                Decimal("0.5"),
                Decimal("0.5"),
                3,
            )
        ],
    )
    after = await client.candles("X", at, at + minute, minute, source="rollup")
    assert after.rows[0][1:7] == (
        Decimal("0.5"),
        Decimal("1.0"),
        Decimal("0.5"),
        Decimal("1.0"),
        4,
        2,
    )


async def test_gap_filling_carries_the_previous_close(
    core: Application, client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("gaps")
    client = await client_for(tenant, (Scope.READ,))
    minute = dt.timedelta(minutes=1)
    at = BASE.replace(hour=12)
    await load(core, [
        (at + dt.timedelta(minutes=1, seconds=10), tenant.tenant_id, "u", "G", Decimal("2.0"), None, 5),
        (at + dt.timedelta(minutes=1, seconds=20), tenant.tenant_id, "u", "G", Decimal("2.5"), None, 5),
        (at + dt.timedelta(minutes=4, seconds=1), tenant.tenant_id, "u", "G", Decimal("3.0"), None, 1),
    ])  # fmt: skip
    filled = await client.candles("G", at, at + 5 * minute, minute, gap_fill=True)
    rows = [(r[0] - at, r[1], r[4], r[5]) for r in filled.rows]
    assert rows == [
        (dt.timedelta(0), None, None, 0),  # before the first tick: nothing to carry
        (minute, Decimal("2.0"), Decimal("2.5"), 10),
        (2 * minute, Decimal("2.5"), Decimal("2.5"), 0),  # carried
        (3 * minute, Decimal("2.5"), Decimal("2.5"), 0),
        (4 * minute, Decimal("3.0"), Decimal("3.0"), 1),
    ]
    plain = await client.candles("G", at, at + 5 * minute, minute)
    assert len(plain.rows) == 2


async def test_vwap_and_spread_statistics(
    core: Application, client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("vwap")
    client = await client_for(tenant, (Scope.READ,))
    at = BASE.replace(hour=14)
    await load(core, [
        (at + dt.timedelta(seconds=1), tenant.tenant_id, "u", "V", Decimal("1.0"), Decimal("1.2"), 1),
        (at + dt.timedelta(seconds=2), tenant.tenant_id, "u", "V", Decimal("2.0"), Decimal("2.4"), 3),
    ])  # fmt: skip
    (row,) = (await client.candles("V", at, at + dt.timedelta(hours=1), dt.timedelta(hours=1))).rows
    prices = (Decimal("1.1"), Decimal("2.2"))
    assert row[7] == (prices[0] * 1 + prices[1] * 3) / 4  # vwap
    assert (row[8], row[9], row[10]) == (Decimal("0.3"), Decimal("0.2"), Decimal("0.4"))


async def test_last_tick_per_symbol(
    core: Application, client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("last")
    client = await client_for(tenant, (Scope.READ,))
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    await load(core, [
        (now - dt.timedelta(seconds=30), tenant.tenant_id, "u", "A", Decimal("1"), None, 1),
        (now - dt.timedelta(seconds=10), tenant.tenant_id, "u", "A", Decimal("2"), None, 1),
        (now - dt.timedelta(seconds=20), tenant.tenant_id, "u", "B", Decimal("3"), None, 1),
    ])  # fmt: skip
    last = await client.last_ticks(now - dt.timedelta(minutes=5))
    assert [(r[0], r[2]) for r in last.rows] == [("A", Decimal("2")), ("B", Decimal("3"))]


@pytest.mark.parametrize(
    ("interval", "span", "extra"),
    [
        (dt.timedelta(seconds=1), dt.timedelta(days=2), {}),  # 172,800 buckets: over the limit
        (dt.timedelta(days=2), dt.timedelta(days=3), {}),  # longer than a day
        (dt.timedelta(minutes=1), dt.timedelta(hours=1), {"timezone": "Mars/Olympus"}),
        (
            dt.timedelta(minutes=1),
            dt.timedelta(hours=1),
            {"source": "rollup", "origin": dt.datetime(2000, 1, 1, 0, 0, 7, tzinfo=dt.UTC)},
        ),
    ],
)
async def test_bad_candle_requests_are_refused(
    client: MultiDatabaseClient, interval: dt.timedelta, span: dt.timedelta, extra: dict[str, Any]
) -> None:
    with pytest.raises(InvalidArgument):
        await client.candles("EURUSD", BASE, BASE + span, interval, **extra)


async def test_deleting_and_updating_ticks_correct_their_minutes(
    core: Application, client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("edit_candle")
    client = await client_for(tenant, (Scope.READ,))
    shared = core.settings.shared_schema
    minute = dt.timedelta(minutes=1)
    at = BASE.replace(hour=16)
    await load(core, [
        (at + dt.timedelta(seconds=10), tenant.tenant_id, "u", "E", Decimal("1.0"), None, 1),
        (at + dt.timedelta(seconds=20), tenant.tenant_id, "u", "E", Decimal("2.0"), None, 1),
        (at + dt.timedelta(minutes=1, seconds=5), tenant.tenant_id, "u", "E", Decimal("3.0"), None, 1),
    ])  # fmt: skip
    await core.owner_pool.execute(
        f"DELETE FROM {shared}.trading_ticks WHERE company_id = $1 AND bid = 2.0", tenant.tenant_id
    )
    after_delete = await client.candles("E", at, at + 2 * minute, minute, source="rollup")
    assert [(r[1], r[4], r[6]) for r in after_delete.rows] == [
        (Decimal("1.0"), Decimal("1.0"), 1),
        (Decimal("3.0"), Decimal("3.0"), 1),
    ]
    # Moving a tick to another minute updates both minutes; emptying a minute removes its candle.
    await core.owner_pool.execute(
        f"UPDATE {shared}.trading_ticks SET time = time + interval '1 minute'"
        " WHERE company_id = $1 AND bid = 1.0",
        tenant.tenant_id,
    )
    after_update = await client.candles("E", at, at + 2 * minute, minute, source="rollup")
    assert [(r[0] - at, r[1], r[4], r[6]) for r in after_update.rows] == [
        (minute, Decimal("3.0"), Decimal("1.0"), 2),
    ]
    raw = await client.candles("E", at, at + 2 * minute, minute, source="raw")
    assert raw.rows == after_update.rows


SHAPES = {
    "1-minute rollup": {"interval": dt.timedelta(minutes=1)},
    "1-hour rollup": {"interval": dt.timedelta(hours=1)},
    "raw, 7 s": {"interval": dt.timedelta(seconds=7), "source": "raw"},
    "gap-filled, London": {
        "interval": dt.timedelta(minutes=5),
        "gap_fill": True,
        "timezone": "Europe/London",
    },
    "empty": {"interval": dt.timedelta(minutes=1), "symbol": "NOPE"},
    "1-minute rollup in parts": {
        "interval": dt.timedelta(minutes=1),
        "start": BASE + dt.timedelta(minutes=7),
        "end": BASE + dt.timedelta(hours=8, minutes=1),
    },
    "1-minute rollup in parts, empty": {
        "interval": dt.timedelta(minutes=1),
        "symbol": "NOPE",
        "end": BASE + dt.timedelta(hours=12),
    },
}


async def every_way(
    client: MultiDatabaseClient, http: httpx.AsyncClient, headers: dict[str, str], shape: dict
) -> tuple[Any, ...]:
    """One candle query through gRPC packed, gRPC Values and REST NDJSON."""
    query = {"symbol": "EURUSD", "start": BASE, "end": BASE + dt.timedelta(hours=6), **shape}
    packed = await client.candles(**query)
    request = pb.TimeSeriesRequest(
        kind=pb.TIME_SERIES_KIND_CANDLES,
        symbol=query["symbol"],
        interval_seconds=int(query["interval"].total_seconds()),
        timezone=query.get("timezone", "UTC"),
        gap_fill=query.get("gap_fill", False),
        source=query.get("source", "auto"),
    )
    request.start.FromDatetime(query["start"])
    request.end.FromDatetime(query["end"])
    messages = [
        m async for m in client.stub.GetTimeSeriesData(request, metadata=client._metadata())
    ]
    values = [from_row(r) for m in messages for r in m.rows.rows]
    header = [(c.name, c.type, c.kind) for c in messages[0].header.columns]
    params = {
        "symbol": query["symbol"],
        "start": query["start"].isoformat(),
        "end": query["end"].isoformat(),
        "interval": str(int(query["interval"].total_seconds())),
        "timezone": query.get("timezone", "UTC"),
        "gap_fill": str(query.get("gap_fill", False)).lower(),
        "source": query.get("source", "auto"),
    }
    rest = await http.get("/api/v1/timeseries/candles", params=params, headers=headers)
    assert rest.status_code == 200, rest.text
    summary = messages[-1].summary
    return (
        [(c.name, c.type) for c in packed.columns],
        header,
        packed.rows,
        values,
        rest.text,
        (packed.row_count, summary.row_count, summary.command),
    )


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
async def test_candles_packed_by_postgres_equal_the_streamed_ones(
    client: MultiDatabaseClient,
    loaded: TenantRecord,
    http: httpx.AsyncClient,
    service_headers: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
    shape: dict,
) -> None:
    headers = await service_headers(
        [loaded.tenant_id], (Scope.READ,), **{"X-Tenant-Id": loaded.tenant_id}
    )
    packed = await every_way(client, http, headers, shape)
    monkeypatch.setattr("database_service.application.timeseries.PACKED_CANDLES_MAX", 0)
    streamed = await every_way(client, http, headers, shape)
    assert packed == streamed
    assert packed[2] == packed[3]  # packed and Values encodings carry the same values
    if shape.get("symbol") != "NOPE":
        assert packed[2] and isinstance(packed[2][0][1], Decimal)
    else:
        assert packed[2] == [] and packed[5][0] == 0


def minute_candles_request(span: dt.timedelta) -> pb.TimeSeriesRequest:
    """1-minute EURUSD candles over [BASE, BASE + span), packed."""
    request = pb.TimeSeriesRequest(
        kind=pb.TIME_SERIES_KIND_CANDLES,
        symbol="EURUSD",
        interval_seconds=60,
        row_encoding=pb.ROW_ENCODING_PACKED,
    )
    request.start.FromDatetime(BASE)
    request.end.FromDatetime(BASE + span)
    return request


async def test_short_ranges_come_packed_by_postgres(
    client: MultiDatabaseClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = minute_candles_request(dt.timedelta(hours=6))

    async def packed() -> bytes:
        call = client.stub.GetTimeSeriesData(request, metadata=client._metadata())
        return b"".join([m.rows.packed async for m in call])

    by_postgres = 0
    packed_by_postgres = TimeSeries._packed

    def counted(self: TimeSeries, *args: Any) -> Any:
        nonlocal by_postgres
        by_postgres += 1
        return packed_by_postgres(self, *args)

    monkeypatch.setattr(TimeSeries, "_packed", counted)
    from_postgres = await packed()
    assert by_postgres == 1
    monkeypatch.setattr("database_service.application.timeseries.PACKED_CANDLES_MAX", 0)
    from_service = await packed()
    assert by_postgres == 1  # encoded by the service
    assert orjson.loads(from_postgres) == orjson.loads(from_service)


async def test_a_long_range_of_minute_candles_arrives_part_by_part(
    client: MultiDatabaseClient,
) -> None:
    request = minute_candles_request(dt.timedelta(hours=8))
    call = client.stub.GetTimeSeriesData(request, metadata=client._metadata())
    parts = [orjson.loads(m.rows.packed) async for m in call if m.rows.packed]
    assert len(parts) == 2  # [0 h, 6 h) and [6 h, 8 h)
    buckets = [dt.datetime.fromisoformat(row[0]) for part in parts for row in part]
    assert buckets == sorted(set(buckets))
    assert buckets[0] < BASE + dt.timedelta(hours=6) <= buckets[-1]
    whole = await client.candles("EURUSD", BASE, BASE + dt.timedelta(hours=8), source="raw")
    assert [r[0] for r in whole.rows] == buckets
