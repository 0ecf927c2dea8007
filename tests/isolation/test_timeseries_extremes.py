"""Tenant A sending the time-series paths parameters at the edges of what they accept: intervals
written with digits Python reads but cannot convert (``²``), too many digits, units that
overflow a ``timedelta``; times at year 1 or 9999 with an offset that takes them out of range
once converted to UTC; gRPC timestamps and intervals at the ends of their integer fields; time
zone names PostgreSQL does not know; and huge ranges. Each is a caller's error: a clear
``invalid_parameters`` (HTTP 400 / gRPC INVALID_ARGUMENT), never a 500 or UNKNOWN, and the
service goes on answering (B's candles request afterwards is served).

Through REST ``GET /api/v1/timeseries/{candles,ticks,last}`` and gRPC ``GetTimeSeriesData``.
"""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_START = "2026-01-01T00:00:00+00:00"
_END = "2026-01-02T00:00:00+00:00"

# Intervals REST accepts as text: each must be refused as invalid_parameters.
BAD_INTERVALS = [
    "²",  # str.isdigit() says yes, int() says no
    "1²",
    "٣٠",  # Arabic-Indic digits: int() reads 30, so this one is fine as long as it is not a 500
    "9" * 5000,  # more digits than int() converts
    "9" * 30,  # seconds beyond timedelta
    "99999999999999999999d",
    "99999999999w",
    "P99999999999999999999D",
    "PT99999999999999999999S",
    "0",
    "-60",
    "1.5",
    "",
    "   ",
    "1m" * 10_000,
]

# (start, end) pairs that parse as datetimes but are out of range in UTC or for PostgreSQL.
BAD_RANGES = [
    ("0001-01-01T00:00:00+05:00", "0001-01-02T00:00:00+05:00"),
    ("9999-12-31T20:00:00-05:00", "9999-12-31T23:00:00-05:00"),
    ("0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59+00:00"),
    ("9999-12-31T22:00:00+00:00", "9999-12-31T23:59:59+00:00"),
]

BAD_ZONES = ["Factory", "posixrules", "../../etc/passwd", "UTC\x00", "x" * 10_000, "EST5EDT,M3"]


def _outcome_is_a_callers_error(response: httpx.Response) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code != 200:
        # invalid_parameters from the service, or PostgreSQL's own data_exception (22xxx) for
        # a range it cannot compute: either is a stable code.
        error = response.json()["error"]
        assert error["code"] in {"invalid_parameters", "invalid_request"} or (
            error.get("sqlstate", "").startswith("22")
        ), error


async def _get(
    http: httpx.AsyncClient, tenants: Tenants, path: str, **params: Any
) -> httpx.Response:
    return await http.get(
        f"/api/v1/timeseries/{path}",
        params=params,
        headers={**tenants.a_headers, "X-Tenant-Id": tenants.a.tenant_id},
    )


async def _b_is_still_served(http: httpx.AsyncClient, tenants: Tenants) -> None:
    response = await http.get(
        "/api/v1/timeseries/candles",
        params={"symbol": "EURUSD", "start": _START, "end": _END, "interval": "1h"},
        headers={**tenants.b_headers, "X-Tenant-Id": tenants.b.tenant_id},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("interval", BAD_INTERVALS, ids=range(len(BAD_INTERVALS)))
async def test_an_interval_python_cannot_convert_is_refused_clearly(
    http: httpx.AsyncClient, tenants: Tenants, interval: str
) -> None:
    response = await _get(
        http, tenants, "candles", symbol="EURUSD", start=_START, end=_END, interval=interval
    )
    _outcome_is_a_callers_error(response)
    await _b_is_still_served(http, tenants)


@pytest.mark.parametrize("path", ["candles", "ticks"])
@pytest.mark.parametrize(("start", "end"), BAD_RANGES, ids=range(len(BAD_RANGES)))
async def test_times_at_the_ends_of_the_calendar_are_refused_clearly(
    http: httpx.AsyncClient, tenants: Tenants, path: str, start: str, end: str
) -> None:
    response = await _get(http, tenants, path, symbol="EURUSD", start=start, end=end, interval="1d")
    _outcome_is_a_callers_error(response)
    await _b_is_still_served(http, tenants)


@pytest.mark.parametrize(
    "origin", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:00:00-05:00", "0001-01-01T00:00:00Z"]
)
async def test_an_origin_at_the_ends_of_the_calendar_is_refused_clearly(
    http: httpx.AsyncClient, tenants: Tenants, origin: str
) -> None:
    response = await _get(
        http, tenants, "candles", symbol="EURUSD", start=_START, end=_END, interval="1s",
        origin=origin, gap_fill="true",
    )  # fmt: skip
    _outcome_is_a_callers_error(response)


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+05:00", "9999-12-31T20:00:00-05:00"])
async def test_last_tick_since_the_ends_of_the_calendar_is_refused_clearly(
    http: httpx.AsyncClient, tenants: Tenants, since: str
) -> None:
    _outcome_is_a_callers_error(await _get(http, tenants, "last", since=since))


@pytest.mark.parametrize("zone", BAD_ZONES, ids=range(len(BAD_ZONES)))
async def test_a_time_zone_postgresql_does_not_know_is_refused_clearly(
    http: httpx.AsyncClient, tenants: Tenants, zone: str
) -> None:
    response = await _get(
        http, tenants, "candles", symbol="EURUSD", start=_START, end=_END, interval="1h",
        timezone=zone,
    )  # fmt: skip
    _outcome_is_a_callers_error(response)


def _stamp(seconds: int, nanos: int = 0) -> Timestamp:
    return Timestamp(seconds=seconds, nanos=nanos)


GRPC_REQUESTS = {
    "start_beyond_year_9999": {"start": _stamp(2**62), "end": _stamp(2**62 + 60)},
    "start_before_year_1": {"start": _stamp(-(2**62)), "end": _stamp(0)},
    "negative_nanos": {"start": _stamp(0, -5), "end": _stamp(60)},
    "nanos_past_a_second": {"start": _stamp(0, 2_000_000_000), "end": _stamp(60)},
    "largest_interval": {"interval_seconds": 2**32 - 1},
    "origin_beyond_year_9999": {"origin": _stamp(2**62)},
    "zone_with_nul": {"timezone": "UTC\x00"},
}


@pytest.mark.parametrize("kind", ["candles", "raw", "last"])
@pytest.mark.parametrize("case", sorted(GRPC_REQUESTS))
async def test_grpc_timestamps_and_intervals_at_their_limits_are_invalid_argument(
    grpc_target: str, tenants: Tenants, kind: str, case: str
) -> None:
    fields: dict[str, Any] = {
        "symbol": "EURUSD",
        "start": _stamp(1_767_225_600),
        "end": _stamp(1_767_312_000),
        "kind": {
            "candles": pb.TIME_SERIES_KIND_CANDLES,
            "raw": pb.TIME_SERIES_KIND_RAW,
            "last": pb.TIME_SERIES_KIND_LAST_TICK,
        }[kind],
    }
    fields.update(GRPC_REQUESTS[case])
    token = tenants.a_headers["Authorization"]
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        call = DatabaseServiceStub(channel).GetTimeSeriesData(
            pb.TimeSeriesRequest(**fields),
            metadata=(("authorization", token), ("x-tenant-id", tenants.a.tenant_id)),
            timeout=60,
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.OUT_OF_RANGE,
            }, f"{exc.code()}: {exc.details()}"


SQL_TIMES = [
    ("SELECT $1::timestamptz", "0001-01-01T00:00:00+05:00"),
    ("SELECT $1::timestamptz", "9999-12-31T23:00:00-05:00"),
    ("SELECT $1::timestamp", "0001-01-01T00:00:00+05:00"),
    ("SELECT $1::timestamp", "9999-12-31T23:00:00-05:00"),
    ("SELECT $1::interval", 1e300),
    ("SELECT $1::interval", -1e300),
]


@pytest.mark.parametrize(("sql", "value"), SQL_TIMES, ids=range(len(SQL_TIMES)))
async def test_a_time_parameter_out_of_range_in_utc_is_invalid_parameters(
    front_end: FrontEnd, sql: str, value: Any
) -> None:
    outcome = await front_end.run(sql, value)
    assert outcome.refused, outcome
    assert outcome.code in {"invalid_parameters", "data_exception"}, outcome
