"""The one place where asyncpg's exceptions and private API meet the rest of the service."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg
from asyncpg.exceptions._base import DataError as ClientDataError
from asyncpg.prepared_stmt import PreparedStatement

from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    QueryError,
    postgres_unreachable,
    unavailable,
)
from database_service.postgres import Connection

__all__ = ["postgres_errors", "prepare_cached"]


@contextlib.contextmanager
def postgres_errors(tenant_id: str) -> Iterator[None]:
    """Translate driver errors into the service's error tree (``raise Ours(...) from exc``)."""
    try:
        yield
    except DatabaseServiceError:
        raise
    except Exception as exc:
        # Unreachable first: a dropped connection is also a PostgresError (class 08, 57P01).
        if postgres_unreachable(exc):
            raise unavailable(f"tenant {tenant_id!r}", exc) from exc
        if isinstance(exc, asyncpg.PostgresError):
            position = getattr(exc, "position", None)
            raise QueryError(
                exc.args[0] if exc.args else str(exc),
                sqlstate=exc.sqlstate,
                position=int(position) if position else None,
                detail=getattr(exc, "detail", None),
                hint=getattr(exc, "hint", None),
            ) from exc
        if isinstance(exc, ClientDataError):
            # Client side: a parameter did not encode (``asyncpg.DataError`` is another class,
            # SQLSTATE 22, handled above).
            raise InvalidParameters(str(exc)) from exc
        raise


async def prepare_cached(conn: Connection, sql: str) -> PreparedStatement:
    """A prepared statement from the connection's statement cache.

    ``Connection.prepare`` always sends a new Parse; the cached path (what ``fetch`` uses) saves
    a round trip on repeated statements and still exposes parameter and column types.
    """
    stmt: PreparedStatement = await conn._prepare(sql, use_cache=True)  # type: ignore[union-attr]
    return stmt
