"""The one place where asyncpg's exceptions and private API meet the rest of the service."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from types import TracebackType
from typing import Any, cast

import asyncpg
from asyncpg.exceptions._base import DataError as ClientDataError
from asyncpg.prepared_stmt import PreparedStatement

from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    QueryError,
    StatementOutdated,
    Unavailable,
    postgres_unreachable,
    unavailable,
)
from database_service.postgres import Connection, TenantConnection
from database_service.query.values import postgres_column
from database_service.results import Column

__all__ = [
    "StatementShapes",
    "cached_statement",
    "fetch_first",
    "postgres_errors",
    "prepare_cached",
]


def postgres_errors(tenant_id: str) -> _PostgresErrors:
    """Translate driver errors into the service's error tree (``raise Ours(...) from exc``)."""
    return _PostgresErrors(tenant_id)


class _PostgresErrors:
    """``postgres_errors``' context manager: a class, not a generator-based one, as it wraps
    every request."""

    __slots__ = ("_tenant_id",)

    def __init__(self, tenant_id: str) -> None:
        self._tenant_id = tenant_id

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, DatabaseServiceError):
            return
        translated = translated_postgres_error(self._tenant_id, exc)
        if translated is not None:
            raise translated from exc


def translated_postgres_error(tenant_id: str, exc: Exception) -> DatabaseServiceError | None:
    """The service's error for a driver error (None: not one to translate)."""
    # Unreachable first: a dropped connection is also a PostgresError (class 08, 57P01).
    if postgres_unreachable(exc):
        return unavailable(f"tenant {tenant_id!r}", exc)
    # A kept statement whose tables changed ("cached plan must not change result type"),
    # refused at Bind, before anything ran: the query core retries it once.
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        return StatementOutdated(
            "the tables this statement uses changed since it was prepared; retry",
            sqlstate=exc.sqlstate,
        )
    # A composite type changed under a result being decoded (asyncpg has reloaded its
    # types by now). The statement ran: not retried here, the caller decides.
    if isinstance(exc, asyncpg.OutdatedSchemaCacheError):
        return Unavailable(
            "a type in this result changed while it was read; retry", sqlstate="0A000"
        )
    if isinstance(exc, asyncpg.PostgresError):
        position = getattr(exc, "position", None)
        return QueryError(
            exc.args[0] if exc.args else str(exc),
            sqlstate=exc.sqlstate,
            position=int(position) if position else None,
            detail=getattr(exc, "detail", None),
            hint=getattr(exc, "hint", None),
        )
    if isinstance(exc, ClientDataError):
        # Client side: a parameter did not encode (``asyncpg.DataError`` is another class,
        # SQLSTATE 22, handled above).
        return InvalidParameters(str(exc))
    return None


async def prepare_cached(conn: Connection, sql: str, schema_generation: int) -> PreparedStatement:
    """A prepared statement from the connection's statement cache: its parameter and result
    types without a round trip when the statement ran on this connection before.

    asyncpg's private API, used here alone (``_prepare``, and ``_drop_local_statement_cache``
    through ``TenantConnection.follow_schema``). The public ways cost more or do not work:
    ``Connection.prepare`` sends Parse and Describe every time (a round trip: the query core's
    median went from 0.66-0.79 ms to 0.90-0.97 ms in bench/query_core.py), a
    ``PreparedStatement`` from it is unusable once its connection goes back to the pool, and
    ``reload_schema_state`` empties every connection's cache of the pool while others may be
    preparing from theirs (asyncpg then hands out a closed statement).
    ``tests/unit/test_boundary.py`` fails if an asyncpg upgrade changes these calls.

    A kept statement can outlive its tables' shape (``ALTER TABLE``). The query core moves
    ``schema_generation`` on after DDL it runs, and each connection drops what it kept from
    before when next used; DDL elsewhere (a migration, another instance) makes PostgreSQL
    refuse the statement at Bind, before it runs (``StatementOutdated``): the query core moves
    the generation on and retries once.
    """
    cast(TenantConnection, conn).follow_schema(schema_generation)
    stmt: PreparedStatement = await conn._prepare(sql, use_cache=True)  # type: ignore[union-attr]
    return stmt


_Shape = tuple[Sequence[asyncpg.types.Type], tuple[Column, ...]]  # parameter types, columns


class StatementShapes:
    """What a kept statement takes and returns, worked out once per statement rather than per
    execution: asyncpg's ``get_parameters()`` and ``get_attributes()`` build new tuples from
    the statement's descriptions on every call, and the result columns are made from them.

    Keyed by the statement's state (asyncpg's private ``PreparedStatement._state``, the object
    a connection keeps per statement text until it drops it): a statement prepared again after
    DDL has a new state, so a new shape. Bounded (LRU); the entries hold their states, so a key
    is never a dropped state's reused identity."""

    def __init__(self, max_entries: int = 2048) -> None:
        self._max = max_entries
        self._shapes: OrderedDict[object, _Shape] = OrderedDict()

    def of(self, stmt: PreparedStatement) -> _Shape:
        """The statement's parameter types and its result columns."""
        state = stmt._state  # type: ignore[attr-defined]
        shapes = self._shapes
        known = shapes.get(state)
        if known is not None:
            shapes.move_to_end(state)
            return known
        columns = tuple(postgres_column(a.name, a.type) for a in stmt.get_attributes())
        known = (stmt.get_parameters(), columns)
        shapes[state] = known
        if len(shapes) > self._max:
            shapes.popitem(last=False)
        return known


def cached_statement(
    conn: Connection, sql: str, schema_generation: int
) -> PreparedStatement | None:
    """The connection's kept statement for ``sql``, without awaiting anything, or None when it
    must be prepared (``prepare_cached``). The hot path's usual case: no round trip, so no
    statement limit to arm for it. The same private cache ``_prepare(use_cache=True)`` reads
    (keyed by text, record class and codec flag)."""
    tenant_conn = cast(TenantConnection, conn)
    tenant_conn.follow_schema(schema_generation)
    raw: Any = getattr(conn, "_con", conn)  # a pool's proxy holds the connection
    key = (sql, raw._protocol.get_record_class(), False)
    state = raw._stmt_cache.get(key)
    return None if state is None else PreparedStatement(raw, sql, state)


async def fetch_first(
    stmt: PreparedStatement, args: Sequence[Any], limit: int
) -> tuple[list[asyncpg.Record], str, bool]:
    """At most ``limit`` rows of a prepared statement in one round trip (Bind, Execute with a
    row limit, Sync), its command tag, and whether that was all of them.

    asyncpg's private protocol call, the one its ``Cursor`` makes: the public API reads a
    result whole (``fetch``) or through a cursor, which needs a transaction (BEGIN and COMMIT
    are two more round trips). Outside a transaction the portal ends with the Sync, so a result
    that was not complete must be read again; the query core does that only for statements that
    a second run does not change (``Classification.repeatable``)."""
    protocol = stmt._connection._protocol  # type: ignore[attr-defined]
    rows, status, completed = await protocol.bind_execute(
        stmt._state,  # type: ignore[attr-defined]
        args,
        "",
        limit,
        True,
        None,
    )
    tag = status.decode() if isinstance(status, bytes | bytearray) else str(status or "")
    return rows, tag, bool(completed)
