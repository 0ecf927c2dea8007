"""The load generator behind ``database-service ingest-load``: random-walk ticks of one tenant,
published the way producers publish (``MarketDataPublisher``), with a progress bar on stderr.

Event ids are ``event_id_for(tenant, seed, i)`` and tick ``i`` is timed ``i`` milliseconds after
00:00 UTC of the day, so a rerun with the same seed on the same day publishes the same events
again (same ids and times: the service's unique key), and the service stores nothing twice."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from database_service_client import MarketDataPublisher
    from database_service_client._proto.ingest_pb2 import Tick

__all__ = ["ProgressBar", "RandomWalk", "generate_ticks", "publish_load"]

_SYMBOLS = (
    ("EURUSD", 1.0850), ("GBPUSD", 1.2650), ("USDJPY", 151.20), ("AUDUSD", 0.6550),
    ("USDCHF", 0.8850), ("USDCAD", 1.3550), ("NZDUSD", 0.6050), ("EURGBP", 0.8580),
    ("EURJPY", 164.10), ("XAUUSD", 2350.0),
)  # fmt: skip


class RandomWalk:
    """Bid/ask per symbol, a random walk of the mid with a symbol's own spread; deterministic for
    a seed (not for security: S311)."""

    def __init__(self, seed: int, symbols: int) -> None:
        self._rng = random.Random(seed)  # noqa: S311
        names = [name for name, _ in _SYMBOLS][:symbols]
        names += [f"SYM{i:03d}" for i in range(len(names), symbols)]
        mids = [price for _, price in _SYMBOLS][:symbols]
        mids += [round(self._rng.uniform(10, 500), 2) for _ in range(len(mids), symbols)]
        self.symbols = names
        self._mid = mids
        # A pip: 0.01 for prices quoted to 2-3 decimals (JPY, gold, ...), else 0.0001.
        self._pip = [0.01 if mid > 20 else 0.0001 for mid in mids]
        self._half_spread = [p * self._rng.uniform(0.4, 1.5) for p in self._pip]

    def next(self, i: int) -> tuple[str, float, float, float, int]:
        """(symbol, bid, ask, spread in pips, volume) of symbol ``i``'s next tick."""
        random_ = self._rng.random
        mid = self._mid[i] = self._mid[i] * math.exp(self._rng.gauss(0.0, 0.00005))
        half = self._half_spread[i] * (0.8 + 0.4 * random_())
        bid, ask = round(mid - half, 5), round(mid + half, 5)
        volume = int(random_() * 100) + 1  # randint is 6x slower
        return self.symbols[i], bid, ask, round((ask - bid) / self._pip[i], 2), volume


class ProgressBar:
    """``[#####.....]  40% 40000/100000 ticks 35000/s`` on stderr, redrawn at most 10 times/s."""

    def __init__(self, total: int, *, width: int = 30) -> None:
        self.total = total
        self.width = width
        self.started = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        filled = self.width * done // self.total
        rate = done / max(now - self.started, 1e-9)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {100 * done // self.total:3d}% "
            f"{done}/{self.total} ticks {rate:,.0f}/s "
        )
        sys.stderr.flush()

    def finish(self, done: int) -> None:
        self.update(done, force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()


def generate_ticks(
    walk: RandomWalk, *, tenant: str, seed: int, first: int, count: int, start_us: int
) -> list[Tick]:
    from database_service_client import event_id_for, tick  # noqa: PLC0415

    out = []
    symbols = len(walk.symbols)
    for i in range(first, first + count):
        symbol, bid, ask, spread, volume = walk.next(i % symbols)
        out.append(
            tick(
                tenant, symbol, start_us + i * 1000, bid=bid, ask=ask, volume=volume,
                spread=spread, user_id="load", event_id=event_id_for(tenant, seed, i),
            )
        )  # fmt: skip
    return out


async def publish_load(
    publisher: MarketDataPublisher,
    *,
    tenant: str,
    ticks: int,
    batch: int,
    symbols: int,
    seed: int,
    rate: float = 0.0,
) -> tuple[dict[str, Any], bool]:
    """Publish ``ticks`` generated ticks in batches of ``batch`` (``rate``: ticks/s, 0 for as
    fast as the transports acknowledge); returns the summary and whether everything was acked."""
    from database_service_client import PublishError, PublishReport  # noqa: PLC0415

    walk = RandomWalk(seed, symbols)
    day_us = 86_400_000_000
    start_us = time.time_ns() // 1000 // day_us * day_us  # 00:00 UTC today; then 1 tick/ms
    total = PublishReport()
    bar = ProgressBar(ticks)
    failure: str | None = None
    started = bar.started = time.monotonic()
    sent = 0
    while sent < ticks:
        count = min(batch, ticks - sent)
        records = generate_ticks(
            walk, tenant=tenant, seed=seed, first=sent, count=count, start_us=start_us
        )
        try:
            total.add(await publisher.publish_ticks(records, batch_size=batch))
        except PublishError as exc:
            total.add(exc.report)
            failure = str(exc)
            break
        sent += count
        bar.update(sent)
        if rate > 0:  # hold the average at rate
            ahead = started + sent / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
    seconds = time.monotonic() - started
    bar.finish(sent)
    summary: dict[str, Any] = {
        "tenant": tenant,
        "seed": seed,
        "ticks": total.records,
        "batches": total.batches,
        "seconds": round(seconds, 3),
        "ticks_per_second": round(total.records / seconds) if seconds > 0 else None,
        "transports": {
            name: {
                "acked_batches": t.batches,
                "acked_ticks": t.records,
                "failed_batches": t.failed_batches,
                "errors": t.errors,
            }
            for name, t in total.transports.items()
        },
    }
    if failure is not None:
        summary["failed"] = failure
    return summary, total.ok and failure is None
