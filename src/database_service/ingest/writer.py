"""Idempotent writes of one tenant's records, logged in as the tenant's own role.

Ticks and predictions go by binary COPY into the tenant's unlogged staging tables and are merged
into the shared tables in the same transaction with ``ON CONFLICT DO NOTHING`` against the unique
event-id indexes (control migration 0003), so a record seen twice is stored once. Signals and
generic rows go to the tenant's own tables, guarded by the ``_ingest_events`` primary key.
Because the session is the tenant's role, row-level security decides whose rows these are:
a record can only ever become a row of its own tenant.

Errors are sorted in two: those about the session rather than the records (PostgreSQL down,
out of connections, a deadlock, the role's login refused) are raised for the caller to retry the
whole batch (the pipeline bounds those retries per tenant); those about records (a value
PostgreSQL refuses) are narrowed down by halving the failing unit until the bad records stand
alone, and those are returned as rejected while every other record is stored.

A record without a user id (protobuf's default, '') is stored with user_id NULL: the company's,
which the user-level row policy shows to every user of the company.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    QueryError,
    ResourceExhausted,
    Unavailable,
)
from database_service.ingest.records import PREDICTION_COLUMNS, TICK_COLUMNS, TenantWork
from database_service.postgres import Connection, TenantLogin, TenantPools
from database_service.postgres.deadlines import Deadlines
from database_service.query.boundary import postgres_errors
from database_service.tenancy import quote_ident

__all__ = ["IngestWriter", "StoreResult", "is_transient"]

log = logging.getLogger(__name__)

# SQLSTATE classes about the session, not the records, worth another try of the whole batch:
# connection (08), resources (53), operator intervention (57), transaction rollback (40:
# serialization, deadlock), object in use (55), system error (58), authorization (28: a role
# mid-suspension; the tenant check sorts it out on the next round). Only PostgreSQL being
# unreachable is retried without end; the rest a few times (``IngestPipeline``), since a wrong
# password or a database being dropped does not pass.
_TRANSIENT_CLASSES = frozenset({"08", "28", "40", "53", "55", "57", "58"})
# ...but not a statement canceled at the tenant's time limit (57014): the same unit would run
# as long again (a tenant's trigger on its own table can loop); it is rejected at once.
_NOT_TRANSIENT = frozenset({"57014"})
# Errors about the statement, not a row: every record of the unit would fail the same way (and
# halving a unit that runs into the time limit would only run into it again and again).
_STATEMENT_ERRORS = frozenset({"42P01", "42703", "3F000", "42883", "42804", "57014"})
# Transactions one part may spend isolating bad records by halving (a few bad records among
# thousands take 2·k·log2(n); a batch of only bad ones would take 2·n): past it, a failing unit
# is rejected whole.
_ISOLATION_TRANSACTIONS = 128


def is_transient(exc: DatabaseServiceError) -> bool:
    """Whether ``exc`` is about the session rather than the records: the whole batch may pass
    on another try, and halving it would not find a bad record."""
    if isinstance(exc, Unavailable | ResourceExhausted):
        return True
    return (
        isinstance(exc, QueryError)
        and exc.sqlstate is not None
        and exc.sqlstate not in _NOT_TRANSIENT
        and exc.sqlstate[:2] in _TRANSIENT_CLASSES
    )


@dataclass(slots=True)
class StoreResult:
    stored: int = 0  # rows written
    duplicates: int = 0  # offered, but already there
    rejected: list[tuple[str, DatabaseServiceError]] = field(default_factory=list)  # event id

    def merge(self, other: StoreResult) -> None:
        self.stored += other.stored
        self.duplicates += other.duplicates
        self.rejected.extend(other.rejected)

    def add(self, offered: int, written: int) -> None:
        self.stored += written
        self.duplicates += offered - written


@dataclass(frozen=True, slots=True)
class _Unit:
    kind: str  # ticks, predictions, rows
    table: str | None  # for rows
    keys: Sequence[str]  # event ids
    values: Sequence[Any]  # tuples (ticks, predictions) or row dicts


def _split(units: list[_Unit], parallel: int, min_part: int) -> list[list[_Unit]]:
    """Cut the units into at most ``parallel`` parts of at least ``min_part`` records each."""
    total = sum(len(u.keys) for u in units)
    count = max(1, min(parallel, total // max(1, min_part)))
    if count == 1:
        return [units]
    size = -(-total // count)  # ceil
    parts: list[list[_Unit]] = [[] for _ in range(count)]
    index = filled = 0
    for unit in units:
        start = 0
        while start < len(unit.keys):
            take = min(len(unit.keys) - start, size - filled)
            end = start + take
            parts[index].append(
                _Unit(unit.kind, unit.table, unit.keys[start:end], unit.values[start:end])
            )
            start, filled = end, filled + take
            if filled == size and index < count - 1:
                index, filled = index + 1, 0
    return [p for p in parts if p]


def _inserted(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1]) if status.startswith("INSERT") else 0


class IngestWriter:
    """Writes as the tenant, under the tenant's time limit enforced from outside the session
    (``deadlines``): a tenant's trigger on its own table cannot hold ingestion up for others."""

    def __init__(
        self,
        pools: TenantPools,
        *,
        shared_schema: str,
        deadlines: Deadlines | None = None,
        parallel: int = 2,
        min_part: int = 5000,
    ) -> None:
        self._pools = pools
        self._shared = quote_ident(shared_schema)
        self._deadlines = deadlines
        self._parallel = parallel
        self._min_part = min_part

    async def store(
        self, login: TenantLogin, schema: str, work: TenantWork, *, limit_seconds: float = 30.0
    ) -> StoreResult:
        """Store a tenant's records. Raises only transient errors (retry the whole call).

        A large batch is cut into ``parallel`` parts written as concurrent transactions on the
        tenant's pool: one PostgreSQL backend is the bottleneck of a single transaction (the
        service mostly waits), and the parts touch different keys (only candles on the boundary
        minute wait for each other). Each part is all or nothing; the batch need not be, since
        a retry finds the committed parts stored."""
        units = [
            _Unit("ticks", None, list(work.ticks), list(work.ticks.values())),
            _Unit("predictions", None, list(work.predictions), list(work.predictions.values())),
            *(
                _Unit("rows", table, list(rows), list(rows.values()))
                for table, rows in sorted(work.rows.items())
            ),
        ]
        units = [u for u in units if u.keys]
        parts = _split(units, self._parallel, self._min_part)
        results = await asyncio.gather(
            *(self._part(login, schema, p, limit_seconds) for p in parts)
        )
        result = results[0]
        for other in results[1:]:
            result.merge(other)
        return result

    async def _part(
        self, login: TenantLogin, schema: str, units: list[_Unit], limit: float
    ) -> StoreResult:
        result = StoreResult()
        try:
            # The common case: the whole part in one transaction.
            written = await self._transaction(login, schema, units, limit)
        except DatabaseServiceError as exc:
            if is_transient(exc):
                raise
            if len(units) == 1 and exc.sqlstate in _STATEMENT_ERRORS:
                # The unit would fail the same way again: no second try (at the time limit,
                # that would be a second wait).
                result.rejected.extend((key, exc) for key in units[0].keys)
                return result
            log.info("tenant %s: batch refused (%s); isolating bad records", login.tenant_id, exc)
        else:
            for unit, count in zip(units, written, strict=True):
                result.add(len(unit.keys), count)
            return result
        budget = [_ISOLATION_TRANSACTIONS]
        for unit in units:
            await self._isolate(login, schema, unit, result, limit, budget)
        return result

    async def _isolate(
        self,
        login: TenantLogin,
        schema: str,
        unit: _Unit,
        result: StoreResult,
        limit: float,
        budget: list[int],
    ) -> None:
        budget[0] -= 1
        try:
            (written,) = await self._transaction(login, schema, [unit], limit)
        except DatabaseServiceError as exc:
            if is_transient(exc):
                raise
            if len(unit.keys) == 1 or (exc.sqlstate in _STATEMENT_ERRORS) or budget[0] <= 0:
                # Past the budget the failing unit is rejected whole (dead-lettered, so it can
                # be replayed): narrowing a batch of nothing but bad records costs two
                # transactions per record, and the round every tenant's records are in waits.
                result.rejected.extend((key, exc) for key in unit.keys)
                return
            half = len(unit.keys) // 2
            for keys, values in (
                (unit.keys[:half], unit.values[:half]),
                (unit.keys[half:], unit.values[half:]),
            ):
                await self._isolate(
                    login, schema, _Unit(unit.kind, unit.table, keys, values), result, limit,
                    budget,
                )  # fmt: skip
            return
        result.add(len(unit.keys), written)

    async def _transaction(
        self, login: TenantLogin, schema: str, units: Sequence[_Unit], limit: float
    ) -> list[int]:
        try:
            with postgres_errors(login.tenant_id):
                async with self._pools.acquire(login, "bulk") as conn:
                    if self._deadlines is None:
                        async with conn.transaction():
                            return [await self._unit(conn, schema, unit) for unit in units]
                    # The whole transaction under the tenant's limit; past it the connection is
                    # closed (not rolled back over a statement that may still run).
                    watch = self._deadlines.watch(
                        conn, login.role, statement_seconds=limit, total_seconds=limit
                    )
                    tx = conn.transaction()
                    try:
                        async with watch.statement():
                            await tx.start()
                            written = [await self._unit(conn, schema, unit) for unit in units]
                            await tx.commit()
                        return written
                    except BaseException:
                        if watch.expired is None and not conn.is_closed():
                            with contextlib.suppress(Exception):
                                await tx.rollback()
                        raise
                    finally:
                        watch.close()
        except (ValueError, TypeError, OverflowError) as exc:  # a value asyncpg cannot encode
            raise InvalidParameters(f"a record has a value of the wrong type: {exc}") from exc

    async def _unit(self, conn: Connection, schema: str, unit: _Unit) -> int:
        q_schema = quote_ident(schema)
        if unit.kind == "ticks":
            await conn.copy_records_to_table(
                "_ingest_ticks", schema_name=schema, columns=TICK_COLUMNS, records=unit.values
            )
            status = await conn.execute(
                f"WITH b AS (DELETE FROM {q_schema}._ingest_ticks WHERE batch = txid_current()"
                " RETURNING *)"
                f" INSERT INTO {self._shared}.trading_ticks"
                " (event_id, time, user_id, symbol, bid, ask, volume, spread)"
                " SELECT event_id, timestamptz 'epoch' + time_us * interval '1 microsecond',"
                " nullif(user_id, ''), symbol, bid, ask, volume, spread FROM b"
                # One key order for every writer: concurrent merges of overlapping batches
                # (another instance, the other transport) wait on each other, never deadlock.
                " ORDER BY event_id ON CONFLICT DO NOTHING"
            )
            return _inserted(status)
        if unit.kind == "predictions":
            await conn.copy_records_to_table(
                "_ingest_predictions",
                schema_name=schema,
                columns=PREDICTION_COLUMNS,
                records=unit.values,
            )
            status = await conn.execute(
                f"WITH b AS (DELETE FROM {q_schema}._ingest_predictions"
                " WHERE batch = txid_current() RETURNING *)"
                f" INSERT INTO {self._shared}.ai_predictions (event_id, time, user_id, symbol,"
                " prediction_type, confidence, model_version, features, result)"
                " SELECT event_id, timestamptz 'epoch' + time_us * interval '1 microsecond',"
                " nullif(user_id, ''), symbol, prediction_type, confidence, model_version,"
                " features::jsonb, result::jsonb"
                " FROM b ORDER BY event_id ON CONFLICT DO NOTHING"
            )
            return _inserted(status)
        assert unit.table is not None
        # Columns named in any row of the batch; the ones no row names keep their defaults.
        columns = sorted({column for row in unit.values for column in row})
        target = f"{q_schema}.{quote_ident(unit.table)}"
        names = ", ".join(quote_ident(c) for c in columns)
        picked = ", ".join(f"r.{quote_ident(c)}" for c in columns)
        status = await conn.execute(
            f"WITH fresh AS (INSERT INTO {q_schema}._ingest_events (event_id)"
            " SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id)"
            f" INSERT INTO {target} ({names}) SELECT {picked}"
            " FROM unnest($1::uuid[], $2::jsonb[]) AS d(event_id, doc)"
            " JOIN fresh USING (event_id),"
            f" LATERAL jsonb_populate_record(NULL::{target}, d.doc) AS r",
            list(unit.keys),
            list(unit.values),
        )
        return _inserted(status)
