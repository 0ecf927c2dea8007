"""Ready-made reports on ClickHouse (the seed's "Kategori B"), typed: a name and checked
parameters, never SQL from the caller. Each is the service's own SQL over the tenant's views
(``tenant_<id>.*``), with values written as ClickHouse literals by this module, so it needs no
guard; it runs with the same per-query limits as tenant SQL.

- ``trading_performance``: per closing day and symbol — P&L, trades, win rate, maximum drawdown
  of the cumulative P&L within the day (trades in closing order; ``MAX_DRAWDOWN`` says how).
- ``market_trends``: per interval of one symbol — VWAP (mid price weighted by volume), volume,
  ticks, and volatility (population standard deviation of the bid).
- ``volume_profile``: volume per mid price rounded to ``price_decimals`` decimals, for one
  symbol.
- ``signal_performance``: per symbol and action, how buy and sell signals turned out: the mid
  price of the first tick at or after the signal against the last tick within
  ``horizon_minutes`` after it (a buy hits when it rose, a sell when it fell); signals, evaluated
  (a tick in the window), hits, hit rate, mean return.
- ``prediction_accuracy``: the same outcome for ``buy``/``sell`` AI predictions, per model
  version and day: predictions, evaluated, correct, accuracy, mean confidence.

``market_trends`` and ``volume_profile`` are written so that the ticks' aggregate projections
(``schema.PER_MINUTE``, ``schema.PER_PRICE``) answer them: ClickHouse then reads one row per
minute (or per quote) instead of every tick. ``volume_profile`` with a time range, and
``market_trends`` with a bound that is not a whole minute, read the ticks: same answer, slower.

``tests/integration/test_analytics_reports.py`` checks each against the same computation in
PostgreSQL on the same rows.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from database_service.analytics.schema import tenant_database
from database_service.errors import InvalidParameters

__all__ = ["REPORTS", "ReportParams", "report_sql"]

REPORTS = (
    "trading_performance",
    "market_trends",
    "volume_profile",
    "signal_performance",
    "prediction_accuracy",
)
_SYMBOL = re.compile(r"^[A-Za-z0-9._/-]{1,20}$")
# The maximum drawdown of a group's cumulative P&L, trades in closing order (closed_at, then
# trade_id): max over j of (max_{i<=j} cum_i - cum_j). Its drawdown obeys dd_j = max(0,
# dd_{j-1} - profit_j) with dd_1 = 0, which is arrayCumSumNonNegative of the negated profits
# after the first: one pass over each group's sorted profits instead of two window functions
# over the tenant's trades (3x faster on 200,000 trades here). NULL profits are left out as
# PostgreSQL's sum and max leave them out (a group with none has no drawdown: NULL). The sort
# key packs closed_at (microseconds) and trade_id into one UInt128, cheaper to sort than a
# tuple (measured: 43 vs 51 ms). The profits go through the arrays as Int64 cents (profit is
# Decimal(15, 2): exact, and sums up to 9.2e16 in the currency fit), cheaper to collect, sort and
# add than Decimals (measured on 200,000 trades: 33 vs 52 ms); the result is a Decimal(38, 2)
# again.
_SIGN = 1 << 63  # Int64 to UInt64 in the same order: two's complement, sign bit flipped
_ORDER_KEY = (
    f"bitOr(bitShiftLeft(toUInt128(bitXor(toUInt64(toUnixTimestamp64Micro(closed_at)), {_SIGN})),"
    f" 64), toUInt128(bitXor(toUInt64(trade_id), {_SIGN})))"
)
MAX_DRAWDOWN = (
    "if(count(profit) = 0, NULL, toDecimal128(arrayMax(arrayCumSumNonNegative(arrayMap(p -> -p,"
    " arrayPopFront(arraySort((p, k) -> k, groupArray(toInt64(profit * 100)),"
    f" groupArrayIf({_ORDER_KEY}, profit IS NOT NULL)))))), 0) * toDecimal32('0.01', 2))"
)
# Time buckets of whole minutes, written so that the ticks' per-minute projection
# (``schema.PER_MINUTE``) answers them: the bucket of a tick's minute is the bucket of the tick
# (intervals of whole minutes start on whole minutes).
MINUTE = "toStartOfMinute(time)"


@dataclass(frozen=True, slots=True)
class ReportParams:
    symbol: str | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    interval_minutes: int = 60
    price_decimals: int = 3
    horizon_minutes: int = 60

    def check(self, name: str) -> None:
        if name not in REPORTS:
            raise InvalidParameters(f"unknown report {name[:40]!r}: one of {', '.join(REPORTS)}")
        if self.symbol is not None and not _SYMBOL.fullmatch(self.symbol):
            raise InvalidParameters("symbol: 1-20 letters, digits, '.', '_', '/' or '-'")
        if name in ("market_trends", "volume_profile") and self.symbol is None:
            raise InvalidParameters(f"{name} needs a symbol")
        for label, value in (("start", self.start), ("end", self.end)):
            if value is not None and value.tzinfo is None:
                raise InvalidParameters(f"{label} needs a time zone (e.g. 2026-11-02T00:00:00Z)")
        if self.start and self.end and self.start >= self.end:
            raise InvalidParameters("start must be before end")
        if not 1 <= self.interval_minutes <= 10_080:
            raise InvalidParameters("interval_minutes: 1 to 10080 (a week)")
        if not 0 <= self.price_decimals <= 6:
            raise InvalidParameters("price_decimals: 0 to 6")
        if not 1 <= self.horizon_minutes <= 10_080:
            raise InvalidParameters("horizon_minutes: 1 to 10080 (a week)")


def _time(value: dt.datetime) -> str:
    utc = value.astimezone(dt.UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
    return f"toDateTime64('{utc}', 6, 'UTC')"  # isoformat of a datetime: digits, '-', ':', '.'


def _range(column: str, params: ReportParams, minute: str | None = None) -> str:
    """The filter for [start, end) on ``column``; with ``minute`` (the column's minute), a bound
    of a whole minute filters the minute instead: the same rows (t >= m iff its minute >= m, and
    t < m iff its minute < m, for a whole minute m), in a form the per-minute projection takes."""
    parts = []
    for value, op in ((params.start, ">="), (params.end, "<")):
        if value is None:
            continue
        utc = value.astimezone(dt.UTC)
        whole = utc.second == 0 and utc.microsecond == 0
        parts.append(f"{minute if minute and whole else column} {op} {_time(value)}")
    return " AND ".join(parts) or "1"


def report_sql(name: str, tenant_id: str, params: ReportParams) -> str:
    """The report's ClickHouse SQL for the tenant (``params`` checked first)."""
    params.check(name)
    db = tenant_database(tenant_id)
    symbol = f"'{params.symbol}'" if params.symbol else None  # checked: no quote or backslash
    if name == "trading_performance":
        symbol_filter = f" AND symbol = {symbol}" if symbol else ""
        return f"""
            SELECT toDate(closed_at) AS day, symbol, sum(profit) AS pnl, count() AS trades,
                   round(countIf(profit > 0) / count(), 6) AS win_rate,
                   {MAX_DRAWDOWN} AS max_drawdown
            FROM {db}.trading_history
            WHERE closed_at IS NOT NULL AND {_range("closed_at", params)}{symbol_filter}
            GROUP BY day, symbol ORDER BY day, symbol"""
    if name == "market_trends":
        return f"""
            SELECT toStartOfInterval({MINUTE}, toIntervalMinute({params.interval_minutes}))
                       AS bucket,
                   round(toFloat64(sum((bid + ask) * volume)) / (2 * sum(volume)), 6) AS vwap,
                   sum(volume) AS total_volume, count() AS ticks,
                   round(stddevPop(toFloat64(bid)), 6) AS volatility
            FROM {db}.trading_ticks
            WHERE symbol = {symbol} AND {_range("time", params, MINUTE)}
            GROUP BY bucket ORDER BY bucket"""
    if name in ("signal_performance", "prediction_accuracy"):
        return _outcomes(name, db, symbol, params)
    return f"""
        SELECT round((bid + ask) / 2, {params.price_decimals}) AS price,
               sum(volume) AS total_volume, count() AS ticks
        FROM {db}.trading_ticks
        WHERE symbol = {symbol} AND {_range("time", params)}
        GROUP BY price ORDER BY price"""


def _outcomes(name: str, db: str, symbol: str | None, params: ReportParams) -> str:
    """Signals or predictions joined to the first tick at or after them and the last tick within
    the horizon (ASOF joins on the tenant's ticks of the same symbol; run with ``join_use_nulls``
    so that no tick is NULL, not a zero)."""
    if name == "signal_performance":
        events = (
            f"SELECT symbol, action, created_at AS event_time FROM {db}.trading_signals"
            f" WHERE action IN ('buy', 'sell') AND {_range('created_at', params)}"
        )
        keys, extra = "symbol, action", ""
    else:
        events = (
            "SELECT symbol, prediction_type AS action, time AS event_time, model_version,"
            f" confidence FROM {db}.ai_predictions"
            f" WHERE prediction_type IN ('buy', 'sell') AND {_range('time', params)}"
        )
        keys, extra = "model_version, toDate(event_time) AS day", ", e.model_version, e.confidence"
    if symbol is not None:
        events += f" AND symbol = {symbol}"
    ticks = f"SELECT symbol, time, toFloat64(bid + ask) / 2 AS mid FROM {db}.trading_ticks"
    joined = f"""
        SELECT e.symbol AS symbol, e.action AS action, e.event_time AS event_time{extra},
               if(a.time <= e.horizon_end AND b.time >= a.time, b.mid / a.mid - 1, NULL) AS ret
        FROM (SELECT *, event_time + toIntervalMinute({params.horizon_minutes}) AS horizon_end
              FROM ({events})) AS e
        ASOF LEFT JOIN ({ticks}) AS a ON e.symbol = a.symbol AND a.time >= e.event_time
        ASOF LEFT JOIN ({ticks}) AS b ON e.symbol = b.symbol AND b.time <= e.horizon_end"""
    hits = "countIf((action = 'buy' AND ret > 0) OR (action = 'sell' AND ret < 0))"
    if name == "signal_performance":
        measures = (
            f"count() AS signals, count(ret) AS evaluated, {hits} AS hits,"
            " round(hits / nullIf(evaluated, 0), 6) AS hit_rate,"
            " round(avg(ret), 6) AS mean_return"
        )
        order = "symbol, action"
    else:
        measures = (
            f"count() AS predictions, count(ret) AS evaluated, {hits} AS correct,"
            " round(correct / nullIf(evaluated, 0), 6) AS accuracy,"
            " round(avg(confidence), 6) AS mean_confidence"
        )
        order = "model_version, day"
    return (
        f"SELECT {keys}, {measures} FROM ({joined}) GROUP BY {order.replace(' AS day', '')}"
        f" ORDER BY {order}"
    )
