"""Time-series queries as SQL with bind parameters, run as the tenant through the query core.

Candles (OHLCV) of a symbol over [start, end) at any interval from 1 second to 1 day:

* buckets are ``date_bin(interval, time AT TIME ZONE tz, origin AT TIME ZONE tz)`` taken back to
  ``tz`` — the time zone and the origin are explicit parameters (defaults: UTC, 2000-01-01), so
  daily candles can close at a market's local midnight;
* the price of a tick is its mid, ``(bid + ask) / 2`` (or the side present); open and close are the
  first and last price by time, volume the sum, VWAP ``sum(price * volume) / sum(volume)``, and the
  spread statistics are over ``ask - bid``;
* when the interval is a whole number of minutes and start, end and origin fall on minute
  boundaries, candles are aggregated from the 1-minute rollup (``candles_1m``) instead of the raw
  ticks — the same numbers, from 60x fewer rows and more;
* with ``gap_fill``, every bucket of the range appears: an empty one repeats the previous close as
  open, high, low and close with volume 0 (buckets before the first tick stay empty: null prices).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from database_service.errors import InvalidParameters
from database_service.moments import utc_moment
from database_service.results import Column, ValueKind
from database_service.tenancy.ids import quote_ident

__all__ = [
    "CANDLE_COLUMNS",
    "NUMERIC_COLUMNS",
    "CandleQuery",
    "candle_sql",
    "last_tick_sql",
    "packed_parts_sql",
    "packed_sql",
    "parse_interval",
    "uses_rollup",
]

DEFAULT_ORIGIN = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
MIN_INTERVAL = dt.timedelta(seconds=1)
MAX_INTERVAL = dt.timedelta(days=1)
MINUTE = dt.timedelta(minutes=1)


# Longer than any interval a person writes (``1w2d3h4m5s``, ``P1DT2H``): the parser's work is
# bounded by this, not by what a caller sends.
_MAX_INTERVAL_TEXT = 64
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_COMPACT = re.compile(r"(?:(\d+)\s*([smhdw]))", re.IGNORECASE)
_ISO = re.compile(
    r"P(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?(?:T(?:(?P<h>\d+)H)?(?:(?P<m>\d+)M)?(?:(?P<s>\d+)S)?)?",
    re.IGNORECASE,
)


def parse_interval(text: str | int) -> dt.timedelta:
    """A candle interval as people write it: seconds (``60``), units (``30s``, ``1m``, ``15m``,
    ``1h``, ``4h``, ``1d``, ``1h30m``) or ISO 8601 (``PT1M``, ``PT1H``, ``P1D``)."""
    # Whatever the text, what comes out is checked against MIN/MAX_INTERVAL by ``validate``;
    # here only that it converts: ``str.isdigit`` accepts digits ``int`` refuses (``²``),
    # ``int`` refuses more than 4,300 digits, and ``timedelta`` overflows past 999,999,999
    # days. Each was a 500.
    try:
        if isinstance(text, int):
            return dt.timedelta(seconds=text)
        value = text.strip()
        if len(value) > _MAX_INTERVAL_TEXT:
            raise ValueError("too long")
        if value.isascii() and value.isdigit():
            return dt.timedelta(seconds=int(value))
        iso = _ISO.fullmatch(value)
        if iso and value.upper() not in {"P", "PT"}:
            parts = {k: int(v) for k, v in iso.groupdict().items() if v}
            return dt.timedelta(
                weeks=parts.get("w", 0),
                days=parts.get("d", 0),
                hours=parts.get("h", 0),
                minutes=parts.get("m", 0),
                seconds=parts.get("s", 0),
            )
        if value and _COMPACT.sub("", value).strip() == "":
            seconds = sum(int(n) * _UNITS[u.lower()] for n, u in _COMPACT.findall(value))
            return dt.timedelta(seconds=seconds)
    except (ValueError, OverflowError):
        pass
    raise InvalidParameters(
        f"interval {str(text)[:_MAX_INTERVAL_TEXT]!r} is not understood: use seconds (60),"
        " units (30s, 1m, 1h, 1d) or ISO 8601 (PT1M, PT1H, P1D)"
    )


@dataclass(frozen=True, slots=True)
class CandleQuery:
    symbol: str
    start: dt.datetime
    end: dt.datetime
    interval: dt.timedelta
    timezone: str = "UTC"
    origin: dt.datetime = DEFAULT_ORIGIN
    gap_fill: bool = False
    source: str = "auto"  # auto | rollup | raw

    def validate(self) -> CandleQuery:
        if not self.symbol:
            raise InvalidParameters("symbol is required")
        if not MIN_INTERVAL <= self.interval <= MAX_INTERVAL:
            raise InvalidParameters("interval must be between 1 second and 1 day")
        if self.interval.microseconds:
            raise InvalidParameters("interval must be a whole number of seconds")
        if self.start.tzinfo is None or self.end.tzinfo is None or self.origin.tzinfo is None:
            raise InvalidParameters("start, end and origin need a time zone offset")
        for name in ("start", "end", "origin"):
            utc_moment(getattr(self, name), name)
        if self.end <= self.start:
            raise InvalidParameters("end must be after start")
        if (self.end - self.start) / self.interval > 100_000:
            raise InvalidParameters("at most 100,000 buckets per request; widen the interval")
        try:
            # OSError: a name longer than a file name may be (ZoneInfo reads a file by it).
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise InvalidParameters(f"unknown time zone {self.timezone[:64]!r}") from None
        if self.source not in {"auto", "rollup", "raw"}:
            raise InvalidParameters("source must be auto, rollup or raw")
        if self.source == "rollup" and not _rollup_aligned(self):
            raise InvalidParameters(
                "the 1-minute rollup needs an interval of whole minutes and minute-aligned"
                " start, end and origin"
            )
        return self

    def buckets(self) -> int:
        """How many candles the range can hold at most (a bucket cut by the origin counts)."""
        return math.ceil((self.end - self.start) / self.interval) + 1


def _on_minute(moment: dt.datetime) -> bool:
    return moment.second == 0 and moment.microsecond == 0


def _rollup_aligned(q: CandleQuery) -> bool:
    return (
        q.interval % MINUTE == dt.timedelta(0)
        and _on_minute(q.start)
        and _on_minute(q.end)
        and _on_minute(q.origin)
    )


def uses_rollup(q: CandleQuery) -> bool:
    return q.source == "rollup" or (q.source == "auto" and _rollup_aligned(q))


_COLUMNS = "bucket, open, high, low, close, volume, ticks, vwap, spread_avg, spread_min, spread_max"
# The numeric columns of a candle, read as text: the service only passes them on, and asyncpg
# building a Decimal for each of them (and a front end turning it back into text) was most of
# a day of 1-minute candles' time. ``numeric_as_text`` retypes them in the header.
NUMERIC_COLUMNS = ("open", "high", "low", "close", "vwap", "spread_avg", "spread_min", "spread_max")
# The columns every candle query returns, as the streamed path's header says them (numeric
# columns retyped by ``numeric_as_text``); a test holds the two paths to the same header.
CANDLE_COLUMNS = [
    Column("bucket", "timestamptz", ValueKind.TIMESTAMP),
    *(Column(n, "numeric", ValueKind.DECIMAL) for n in ("open", "high", "low", "close")),
    Column("volume", "int8", ValueKind.INTEGER),
    Column("ticks", "int8", ValueKind.INTEGER),
    *(
        Column(n, "numeric", ValueKind.DECIMAL)
        for n in ("vwap", "spread_avg", "spread_min", "spread_max")
    ),
]
_OUTPUT = ", ".join(
    f"{name}::text AS {name}" if name in NUMERIC_COLUMNS else name for name in _COLUMNS.split(", ")
)


def candle_sql(shared: str, q: CandleQuery) -> tuple[str, list[Any]]:
    """The candles query and its parameters ($1 symbol, $2 start, $3 end, $4 interval, $5 tz,
    $6 origin)."""
    q.validate()
    schema = quote_ident(shared)
    bucket = (
        "date_bin($4::interval, {col} AT TIME ZONE $5, $6::timestamptz AT TIME ZONE $5)"
        " AT TIME ZONE $5"
    )
    if uses_rollup(q) and q.interval == MINUTE:
        # The rollup's own buckets: no re-aggregation (any time zone's offset is whole minutes).
        inner = _minute_rollup(schema, "$2", "$3")
    elif uses_rollup(q):
        inner = f"""
            SELECT {bucket.format(col="bucket")} AS bucket,
                   (array_agg(open ORDER BY bucket))[1] AS open, max(high) AS high,
                   min(low) AS low, (array_agg(close ORDER BY bucket DESC))[1] AS close,
                   sum(volume)::bigint AS volume, sum(ticks)::bigint AS ticks,
                   sum(price_volume) / nullif(sum(volume), 0) AS vwap,
                   sum(spread_sum) / nullif(sum(spread_n), 0) AS spread_avg,
                   min(spread_min) AS spread_min, max(spread_max) AS spread_max
            FROM {schema}.candles_1m
            WHERE symbol = $1 AND bucket >= $2 AND bucket < $3
            GROUP BY 1"""
    else:
        inner = f"""
            SELECT {bucket.format(col="t.time")} AS bucket,
                   (array_agg(p.price ORDER BY t.time))[1] AS open, max(p.price) AS high,
                   min(p.price) AS low, (array_agg(p.price ORDER BY t.time DESC))[1] AS close,
                   coalesce(sum(t.volume), 0)::bigint AS volume, count(*)::bigint AS ticks,
                   sum(p.price * t.volume) / nullif(sum(t.volume), 0) AS vwap,
                   avg(t.ask - t.bid) AS spread_avg, min(t.ask - t.bid) AS spread_min,
                   max(t.ask - t.bid) AS spread_max
            FROM {schema}.trading_ticks t
            CROSS JOIN LATERAL (SELECT {schema}.tick_price(t.bid, t.ask) AS price) p
            WHERE t.symbol = $1 AND t.time >= $2 AND t.time < $3 AND p.price IS NOT NULL
            GROUP BY 1"""
    params: list[Any] = [q.symbol, q.start, q.end, q.interval, q.timezone, q.origin]
    if not q.gap_fill:
        return f"SELECT {_OUTPUT} FROM ({inner}) c ORDER BY bucket", params
    # Every bucket of the range; an empty one carries the previous close forward.
    series = (
        "SELECT generate_series("
        f"{bucket.format(col='$2::timestamptz')} AT TIME ZONE $5,"
        " ($3::timestamptz - interval '1 microsecond') AT TIME ZONE $5, $4::interval)"
        " AT TIME ZONE $5 AS bucket"
    )
    sql = f"""
        WITH c AS ({inner}),
        s AS ({series}),
        j AS (SELECT s.bucket, c.open, c.high, c.low, c.close, c.volume, c.ticks, c.vwap,
                     c.spread_avg, c.spread_min, c.spread_max,
                     count(c.close) OVER (ORDER BY s.bucket) AS run
              FROM s LEFT JOIN c ON c.bucket = s.bucket),
        f AS (SELECT *, first_value(close) OVER (PARTITION BY run ORDER BY bucket) AS carried
              FROM j)
        SELECT {_OUTPUT} FROM (
            SELECT bucket,
                   coalesce(open, carried) AS open, coalesce(high, carried) AS high,
                   coalesce(low, carried) AS low, coalesce(close, carried) AS close,
                   coalesce(volume, 0)::bigint AS volume, coalesce(ticks, 0)::bigint AS ticks,
                   vwap, spread_avg, spread_min, spread_max
            FROM f) g
        ORDER BY bucket"""
    return sql, params


def _minute_rollup(schema: str, lower: str, upper: str) -> str:
    """The rollup's own 1-minute candles of symbol $1 in [lower, upper)."""
    return f"""
            SELECT bucket, open, high, low, close, volume, ticks::bigint AS ticks,
                   price_volume / nullif(volume, 0) AS vwap,
                   spread_sum / nullif(spread_n, 0) AS spread_avg, spread_min, spread_max
            FROM {schema}.candles_1m
            WHERE symbol = $1 AND bucket >= {lower} AND bucket < {upper}
              -- unused here, but every parameter must have a type
              AND $4::interval IS NOT NULL AND $5::text IS NOT NULL
              AND $6::timestamptz IS NOT NULL"""


def _packed_value(name: str) -> str:
    """One column of a candle as JSON text: the bucket as ``to_json`` writes a timestamp (ISO
    8601 with its offset), integers as numbers, the numeric columns (already text, see
    ``_OUTPUT``) as strings, null as null."""
    if name == "bucket":
        return "to_json(bucket)::text"
    if name in NUMERIC_COLUMNS:
        return f"coalesce('\"' || {name} || '\"', 'null')"
    return f"coalesce({name}::text, 'null')"


# A candle as a JSON array, by concatenation: json_build_array looked up how to write each of
# its 11 arguments on every row, most of PostgreSQL's time for a day of 1-minute candles.
# Numeric text never needs JSON escaping (digits, sign, point, NaN, Infinity).
_PACKED_ROW = " || ',' || ".join(_packed_value(n) for n in _COLUMNS.split(", "))


def packed_sql(candles: str) -> str:
    """A candle query (``candle_sql``) as one row: the candle count and the candles as a JSON
    array of arrays in the packed form (numeric columns are already text there, so decimals
    are JSON strings; timestamps are ISO 8601 with their offset)."""
    return (
        f"SELECT count(*), coalesce('[' || string_agg('[' || {_PACKED_ROW} || ']', ','"
        f" ORDER BY bucket) || ']', '[]') FROM ({candles}) p"
    )


# 1-minute candles from the rollup come in parts of this many minutes when there are more.
PART_MINUTES = 360


def packed_parts_sql(shared: str, q: CandleQuery) -> tuple[str, list[Any]] | None:
    """1-minute candles from the rollup in parts of ``PART_MINUTES``, a row per part (its
    candle count and its candles packed as ``packed_sql`` writes them), oldest part first; None
    for any other query, or for a range of one part.

    PostgreSQL makes each part only when the one before it has been fetched (a nested loop over
    the parts, read by cursor a row at a time): the caller decodes one part while the next is
    made, instead of everything waiting for the whole range."""
    q.validate()
    if not (uses_rollup(q) and q.interval == MINUTE and not q.gap_fill):
        return None
    step = dt.timedelta(minutes=PART_MINUTES)
    if q.end - q.start <= step:
        return None
    lows = []
    low = q.start
    while low < q.end:
        lows.append(low)
        low += step
    highs = [*lows[1:], q.end]
    schema = quote_ident(shared)
    inner = _minute_rollup(
        schema, "greatest($2::timestamptz, part.lo)", "least($3::timestamptz, part.hi)"
    )
    sql = f"""
        SELECT c.n, c.packed
        FROM unnest($7::timestamptz[], $8::timestamptz[]) AS part(lo, hi)
        CROSS JOIN LATERAL (
            SELECT count(*) AS n,
                   coalesce('[' || string_agg('[' || {_PACKED_ROW} || ']', ',' ORDER BY bucket)
                            || ']', '[]') AS packed
            FROM (SELECT {_OUTPUT} FROM ({inner}) r) p
        ) c"""
    params: list[Any] = [q.symbol, q.start, q.end, q.interval, q.timezone, q.origin, lows, highs]
    return sql, params


def last_tick_sql(shared: str, since: dt.datetime) -> tuple[str, list[Any]]:
    """The latest tick of every symbol since ``since`` (bounded, so partitions are pruned)."""
    schema = quote_ident(shared)
    sql = (
        "SELECT DISTINCT ON (symbol) symbol, time, bid, ask, volume, spread"
        f" FROM {schema}.trading_ticks WHERE time >= $1 ORDER BY symbol, time DESC"
    )
    return sql, [since]
