"""The ClickHouse side of analytics: the replicated tables and each tenant's database of views.

Replicated tables live in one internal database (``SHARED_DATABASE``), all MergeTree family,
partitioned by month and ordered by tenant first, then symbol and time where the table has them,
so a tenant's per-symbol time scan reads one contiguous key range.

Exactly once, and exact reads:

- Every insert carries an ``insert_deduplication_token`` named after the replicated batch; the
  tables keep a window of recent tokens (``non_replicated_deduplication_window``), so a batch sent
  again after a crash is dropped by ClickHouse before it is stored. Duplicates never get in, and
  a plain scan is exact.
- The ``ReplacingMergeTree`` key is the row's identity (the queue's seq for the append-only ticks
  and predictions; the PostgreSQL primary key for candles, trades and signals), a second net that
  background merges apply.
- Trades, signals and candles change in place in PostgreSQL: each change arrives as a new version
  (``_version`` = the change's queue seq; a delete as ``_deleted = 1``). Their tenant views read
  them with ``FINAL`` (``ReplacingMergeTree(_version, _deleted)``: the newest version per key,
  none when it is a delete), so they are exact whether or not merges have run; the append-only
  ticks and predictions are read as they are (no duplicate gets in).

The ticks carry two aggregate projections (``PER_MINUTE``, ``PER_PRICE``): per-minute and
per-quote pre-aggregates that the market reports read instead of every tick, as deduplicated as
the rows they summarise (see ``PER_MINUTE``'s comment).

A tenant's database (``tenant_database``) holds only views filtered to its ``company_id``: tenant
SQL names nothing else (the guard's rule on the embedded chDB; grants and row policies on a
server).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "REPLICATED",
    "RETAINED",
    "SHARED_DATABASE",
    "Replicated",
    "projection_upgrade_ddl",
    "shared_ddl",
    "tenant_database",
    "tenant_view_ddl",
]

SHARED_DATABASE = "dbsvc_analytics"
_TENANT_ID = re.compile(r"^[a-z][a-z0-9_]{1,40}$")
_DEDUP = "non_replicated_deduplication_window = 10000"
# ReplacingMergeTree with projections: ClickHouse refuses them unless told what a merge that
# drops a row does to them; 'rebuild' recomputes them from the merged rows.
_PROJECTION_MERGES = "deduplicate_merge_projection_mode = 'rebuild'"


@dataclass(frozen=True, slots=True)
class Replicated:
    name: str  # the same in PostgreSQL, in SHARED_DATABASE and in a tenant's database
    columns: tuple[tuple[str, str], ...]  # the replicated columns (PostgreSQL names)
    key: tuple[str, ...]  # the row's identity within a tenant (empty: the queue seq)
    order_by: tuple[str, ...]
    partition_by: str
    versioned: bool  # changes in place: versions and deletes, read as the newest version
    # Aggregate projections (name, SELECT … GROUP BY …): pre-aggregates ClickHouse keeps inside
    # each part and uses by itself for a query its keys and aggregates answer.
    projections: tuple[tuple[str, str], ...] = ()


_TS = "DateTime64(6, 'UTC')"

# The ticks' pre-aggregates, as aggregate projections of the ticks table (not materialized views
# into tables of their own): a projection is built in the same part as the rows it summarises,
# when the part is written, so
# - it is exactly as deduplicated as the rows: a replayed batch whose insert deduplication token
#   ClickHouse has seen stores no part, hence no projection either (a materialized view would be
#   skipped too, but only while the token is in the window; here there is nothing to keep apart);
# - merges rebuild it from the merged rows (``deduplicate_merge_projection_mode = 'rebuild'``),
#   so ReplacingMergeTree's second net, the TTL of the retention and a tenant's purge (a
#   mutation) apply to it as to the rows;
# - a query reads it only when its keys and aggregates are computable from the projection's
#   (``toStartOfMinute(time)`` for time, ``bid``/``ask`` for prices), else the rows: the answer is
#   the same either way, and a part without the projection (written before it existed) is read
#   as rows. The reports (``analytics/reports.py``) are written in that form: buckets of whole
#   minutes as ``toStartOfInterval(toStartOfMinute(time), …)``.
# Per tenant, symbol and minute: VWAP, volume, tick count, bid volatility and range.
PER_MINUTE = (
    "SELECT company_id, symbol, toStartOfMinute(time), sum((bid + ask) * volume), sum(volume),"
    " count(), stddevPop(toFloat64(bid)), min(bid), max(bid)"
    " GROUP BY company_id, symbol, toStartOfMinute(time)"
)
# Per tenant, symbol and quote (bid, ask): the volume profile at any rounding of the mid price.
PER_PRICE = (
    "SELECT company_id, symbol, bid, ask, sum(volume), count()"
    " GROUP BY company_id, symbol, bid, ask"
)

REPLICATED: dict[str, Replicated] = {
    r.name: r
    for r in (
        Replicated(
            "trading_ticks",
            (
                ("time", _TS),
                ("user_id", "Nullable(String)"),
                ("symbol", "LowCardinality(String)"),
                ("bid", "Nullable(Decimal(10, 5))"),
                ("ask", "Nullable(Decimal(10, 5))"),
                ("volume", "Nullable(Int64)"),
                ("spread", "Nullable(Decimal(6, 2))"),
                ("event_id", "Nullable(String)"),
            ),
            key=(),
            order_by=("company_id", "symbol", "time", "_seq"),
            partition_by="toYYYYMM(time)",
            versioned=False,
            projections=(
                ("per_minute", PER_MINUTE),
                ("per_price", PER_PRICE),
            ),
        ),
        Replicated(
            "ai_predictions",
            (
                ("time", _TS),
                ("user_id", "Nullable(String)"),
                ("symbol", "LowCardinality(String)"),
                ("prediction_type", "LowCardinality(String)"),
                ("confidence", "Decimal(3, 2)"),
                ("model_version", "Nullable(String)"),
                ("features", "Nullable(String)"),
                ("result", "Nullable(String)"),
                ("event_id", "Nullable(String)"),
            ),
            key=(),
            order_by=("company_id", "symbol", "time", "_seq"),
            partition_by="toYYYYMM(time)",
            versioned=False,
        ),
        Replicated(
            "candles_1m",
            (
                ("symbol", "LowCardinality(String)"),
                ("bucket", _TS),
                ("open", "Decimal(38, 10)"),
                ("high", "Decimal(38, 10)"),
                ("low", "Decimal(38, 10)"),
                ("close", "Decimal(38, 10)"),
                ("volume", "Int64"),
                ("ticks", "Int64"),
                ("price_volume", "Decimal(38, 10)"),
                ("spread_sum", "Decimal(38, 10)"),
                ("spread_min", "Nullable(Decimal(38, 10))"),
                ("spread_max", "Nullable(Decimal(38, 10))"),
                ("spread_n", "Int64"),
                ("open_time", _TS),
                ("close_time", _TS),
            ),
            key=("symbol", "bucket"),
            order_by=("company_id", "symbol", "bucket"),
            partition_by="toYYYYMM(bucket)",
            versioned=True,
        ),
        Replicated(
            "trading_history",
            (
                ("trade_id", "Int64"),
                ("account_id", "Nullable(Int64)"),
                ("user_id", "Nullable(String)"),
                ("symbol", "LowCardinality(String)"),
                ("side", "LowCardinality(String)"),
                ("volume", "Decimal(12, 2)"),
                ("open_price", "Decimal(15, 5)"),
                ("close_price", "Nullable(Decimal(15, 5))"),
                ("profit", "Nullable(Decimal(15, 2))"),
                ("opened_at", _TS),
                ("closed_at", f"Nullable({_TS})"),
            ),
            key=("trade_id",),
            # The identity is the key: an update that moves a trade to another symbol or time
            # must still replace it.
            order_by=("company_id", "trade_id"),
            partition_by="toYYYYMM(opened_at)",
            versioned=True,
        ),
        Replicated(
            "trading_signals",
            (
                ("signal_id", "String"),
                ("user_id", "Nullable(String)"),
                ("symbol", "LowCardinality(String)"),
                ("action", "LowCardinality(String)"),
                ("confidence", "Nullable(Decimal(3, 2))"),
                ("payload", "Nullable(String)"),
                ("created_at", _TS),
            ),
            key=("signal_id",),
            order_by=("company_id", "signal_id"),
            partition_by="toYYYYMM(created_at)",
            versioned=True,
        ),
    )
}


def tenant_database(tenant_id: str) -> str:
    if not _TENANT_ID.fullmatch(tenant_id):
        raise ValueError(f"bad tenant id {tenant_id!r}")
    return f"tenant_{tenant_id}"


def shared_ddl() -> list[str]:
    statements = [f"CREATE DATABASE IF NOT EXISTS {SHARED_DATABASE}"]
    for r in REPLICATED.values():
        cols = ["company_id LowCardinality(String)"]
        cols += [f"`{name}` {kind}" for name, kind in r.columns]
        if r.versioned:
            cols += ["_version UInt64", "_deleted UInt8"]
            engine = "ReplacingMergeTree(_version, _deleted)"
        else:
            cols += ["_seq UInt64"]
            engine = "ReplacingMergeTree"
        cols += [f"PROJECTION {name} ({select})" for name, select in r.projections]
        settings = _DEDUP + (f", {_PROJECTION_MERGES}" if r.projections else "")
        statements.append(
            f"CREATE TABLE IF NOT EXISTS {SHARED_DATABASE}.{r.name} ({', '.join(cols)}) "
            f"ENGINE = {engine} PARTITION BY {r.partition_by} "
            f"ORDER BY ({', '.join(r.order_by)}) SETTINGS {settings}"
        )
    return statements


def projection_upgrade_ddl(table: str, existing: str) -> list[str]:
    """For a table created before its projections (``existing``: its ``CREATE TABLE`` text): the
    statements that add the missing ones and build them for the parts already stored
    (``MATERIALIZE PROJECTION``, a background mutation: reads stay exact meanwhile, as parts
    without the projection are read as rows)."""
    r = REPLICATED[table]
    missing = [(n, q) for n, q in r.projections if f"PROJECTION {n} " not in existing]
    if not missing:
        return []
    target = f"{SHARED_DATABASE}.{table}"
    statements = [f"ALTER TABLE {target} MODIFY SETTING {_PROJECTION_MERGES}"]
    for name, select in missing:
        statements.append(f"ALTER TABLE {target} ADD PROJECTION IF NOT EXISTS {name} ({select})")
        statements.append(f"ALTER TABLE {target} MATERIALIZE PROJECTION {name}")
    return statements


def tenant_view_ddl(tenant_id: str, *, definer: bool = False) -> list[str]:
    """The tenant's database and one view per replicated table, filtered to its rows.

    ``definer`` (a ClickHouse server): the views run with their creator's rights (``SQL
    SECURITY DEFINER``), so the tenant's user needs a grant on its views only."""
    db = tenant_database(tenant_id)
    literal = f"'{tenant_id}'"  # a validated id: letters, digits and '_' only
    statements = [f"CREATE DATABASE IF NOT EXISTS {db}"]
    for r in REPLICATED.values():
        names = ", ".join(f"`{name}`" for name, _ in r.columns)
        source = f"{SHARED_DATABASE}.{r.name}"
        if r.versioned:
            # FINAL: ReplacingMergeTree(_version, _deleted) keeps the newest version of each
            # key (the sorting key: company_id and the row's identity) and drops it when that
            # version is a delete. The tenant's key range is already in key order, so the
            # engine merges versions as it reads them; the LIMIT 1 BY this replaced sorted the
            # tenant's rows on every read (~5x slower on 200,000 trades, measured here). The
            # filter on _deleted applies after FINAL (a condition on a column outside the key
            # is not moved before it): redundant, kept to say what the view shows.
            body = (
                f"SELECT {names} FROM {source} FINAL WHERE company_id = {literal} AND _deleted = 0"
            )
        else:
            body = f"SELECT {names} FROM {source} WHERE company_id = {literal}"
        security = " DEFINER = CURRENT_USER SQL SECURITY DEFINER" if definer else ""
        # OR REPLACE: a tenant provisioned by an older version gets the current definition
        # (provisioning runs once per tenant and process).
        statements.append(f"CREATE OR REPLACE VIEW {db}.{r.name}{security} AS {body}")
    return statements


# The append-only tables PostgreSQL keeps for DBSVC_TS_RETENTION_DAYS (it drops their old
# partitions); ClickHouse follows with a TTL on the same column.
RETAINED = {"trading_ticks": "time", "ai_predictions": "time"}
# A TTL is a DateTime (up to 2106): a retention longer than this means "keep everything".
MAX_TTL_DAYS = 20_000


def retention_ttl(table: str, days: float) -> str | None:
    """The TTL clause for ``table`` under a retention of ``days`` (None: no TTL)."""
    if days >= MAX_TTL_DAYS:
        return None
    seconds = max(1, int(days * 86_400))
    return f"toDateTime({RETAINED[table]}) + toIntervalSecond({seconds})"
