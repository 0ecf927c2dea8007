"""Candles from a day of ticks: a naive GROUP BY on the raw table vs. the service (rollups).

Loads >= 5,000,000 ticks for one day across tenants and symbols through the partitioned table
(the 1-minute rollup is maintained by the insert statements themselves), then times 1-minute and
1-hour candles for one symbol of one tenant: a GROUP BY over the raw ticks (as the owner, filtered
to that company) and MultiDatabaseClient.candles (gRPC, from the rollup). Medians of 7 runs.

    .venv/bin/python bench/candles.py [--ticks 5000000]

The last line is one JSON object of the figures (``{"bench": "candles", ...}``, printed by
``harness.reporting``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from harness import reporting, running_service  # bench/ is on sys.path when run as a script

from database_service.timeseries.layout import SeriesSpec, aligned_ranges, partition_ddl
from database_service_client import MultiDatabaseClient

RUNS = 7
TENANTS = 5
SYMBOLS = [f"SYM{i:02d}" for i in range(10)]
DAY = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
NAIVE = """
SELECT date_bin($2::interval, time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
       (array_agg(price ORDER BY time))[1], max(price), min(price),
       (array_agg(price ORDER BY time DESC))[1], sum(volume), count(*)
FROM (SELECT *, trim_scale(coalesce((bid + ask) / 2, bid, ask)) AS price
      FROM shared.trading_ticks
      WHERE company_id = $1 AND symbol = 'SYM03' AND time >= $3 AND time < $4) t
GROUP BY 1 ORDER BY 1
"""


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    runs = []
    result = None
    for _ in range(RUNS):
        started = time.perf_counter()
        result = await call()
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs), result


async def main(ticks: int, figures: dict[str, Any]) -> None:
    async with running_service(
        DBSVC_TS_RETENTION_DAYS="36500",  # keep the benchmark's past day
        DBSVC_TS_CREATE_AHEAD_HOURS="1",
    ) as service:
        # (schema, token) per tenant; ticks are keyed by the tenant id, not by its opaque schema.
        tenants = {f"co{i}": await service.tenant(f"co{i}", ["read"]) for i in range(TENANTS)}
        owner = await asyncpg.connect(service.dsn)
        # The day's partitions (maintenance creates them around "now"; this day is in the past).
        spec = SeriesSpec("trading_ticks", dt.timedelta(hours=1), 4)
        for start, end in aligned_ranges(spec, DAY, DAY + dt.timedelta(days=1)):
            for statement in partition_ddl("shared", spec, start, end):
                await owner.execute(statement)
        per_hour = ticks // 24
        series = TENANTS * len(SYMBOLS)
        print(
            f"loading {per_hour * 24:,} ticks ({series} series) into partitioned trading_ticks ...",
            flush=True,
        )
        started = time.perf_counter()
        for hour in range(24):
            await owner.execute(
                """
                INSERT INTO shared.trading_ticks (time, company_id, user_id, symbol, bid, ask, volume)
                SELECT $1::timestamptz + (g * 3600.0 / $2) * interval '1 second',
                       'co' || (g % $3), 'u', 'SYM' || lpad(((g / $3) % $4)::text, 2, '0'),
                       round(1 + random()::numeric / 10, 5), round(1.0002 + random()::numeric / 10, 5),
                       (random() * 100)::int
                FROM generate_series(0, $2 - 1) g
                """,
                DAY + dt.timedelta(hours=hour),
                per_hour,
                TENANTS,
                len(SYMBOLS),
            )
        load_s = time.perf_counter() - started
        rollups = await owner.fetchval("SELECT count(*) FROM shared.candles_1m")
        print(
            f"loaded in {load_s:.1f} s ({per_hour * 24 / load_s:,.0f} ticks/s incl. rollups); {rollups:,} 1-minute candles"
        )
        # Settled before anything is timed, as pgbench vacuums before its runs: the load leaves
        # every partition due for autovacuum, which would otherwise run (a core of this machine's
        # two) during the measurements, of one side more than the other.
        started = time.perf_counter()
        await owner.execute("VACUUM (ANALYZE) shared.trading_ticks, shared.candles_1m")
        print(f"vacuumed and analysed in {time.perf_counter() - started:.1f} s")
        client = MultiDatabaseClient(service.grpc, "co2", tenants["co2"][1], timeout=300)
        end = DAY + dt.timedelta(days=1)
        print(f"candles for one symbol of one tenant over the day (median of {RUNS})")
        figures |= {"ticks": per_hour * 24, "rollup_rows": rollups}
        for label, key, interval in (
            ("1-minute", "minute", dt.timedelta(minutes=1)),
            ("1-hour", "hour", dt.timedelta(hours=1)),
        ):
            naive_ms, naive_rows = await timed(
                lambda interval=interval: owner.fetch(NAIVE, "co2", interval, DAY, end)
            )
            ours_ms, ours = await timed(
                lambda interval=interval: client.candles("SYM03", DAY, end, interval)
            )
            raw_ms, _ = await timed(
                lambda interval=interval: client.candles("SYM03", DAY, end, interval, source="raw")
            )
            assert len(ours.rows) == len(naive_rows)
            assert [r[1:7] for r in ours.rows] == [tuple(r)[1:7] for r in naive_rows]
            print(
                f"  {label:<9} naive GROUP BY {naive_ms:8.1f} ms   service (rollup) {ours_ms:7.1f} ms"
                f"   ratio {naive_ms / ours_ms:5.1f}x   (service, raw path: {raw_ms:.1f} ms)"
            )
            figures |= {
                f"{key}_naive_ms": naive_ms,
                f"{key}_ms": ours_ms,
                f"{key}_raw_path_ms": raw_ms,
                f"{key}_ratio": naive_ms / ours_ms,
            }
        await client.close()
        await owner.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=5_000_000)
    # Its last line, printed by harness.reporting on exit (and on interruption):
    # {"bench": "candles", ...the figures below}
    with reporting("candles") as figures:
        asyncio.run(main(parser.parse_args().ticks, figures))
