"""Results as every store gives them and every front end sends them: store-neutral.

A store adapter (PostgreSQL today; ClickHouse, a vector or a graph store next) turns its own
results into these: columns with the store's own type name (shown to callers as it is) and a
``ValueKind`` that says how a front end encodes the values; rows as plain sequences of Python
values; a summary. Front ends pick encoders by ``ValueKind``, never by a store's type names.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from database_service_client.values import unpack_rows

__all__ = [
    "CacheInfo",
    "Column",
    "Event",
    "Header",
    "PackedRows",
    "QueryResult",
    "StatementKind",
    "Summary",
    "TransactionResult",
    "ValueKind",
    "approximate_bytes",
    "unpacked",
]

Rows = Sequence[Sequence[Any]]


class StatementKind(enum.StrEnum):
    """What a statement does, whatever the store: the scope it needs follows from it."""

    READ = "read"
    WRITE = "write"
    DDL = "ddl"


class ValueKind(enum.StrEnum):
    """How the values of a column travel."""

    INTEGER = "integer"
    FLOAT = "float"
    DECIMAL = "decimal"  # exact: Decimal, sent as text
    TEXT = "text"
    BOOLEAN = "boolean"
    BYTES = "bytes"
    TIMESTAMP = "timestamp"
    JSON = "json"  # dicts and lists, sent as JSON
    OTHER = "other"  # anything else: dates, uuids, arrays, ranges... by the value's own type


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_name: str  # the store's own name for the type, e.g. "numeric", "Decimal(18, 4)"
    kind: ValueKind = ValueKind.OTHER


@dataclass(slots=True)
class QueryResult:
    columns: list[Column]
    rows: Rows
    command: str
    row_count: int
    kind: StatementKind
    duration_ms: float
    store: str = "postgresql"
    # From the result cache: the answer as its front end encoded it (the fields above are
    # then empty), and what the cache did.
    payload: bytes | None = None
    cache: CacheInfo | None = None


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """What the result cache did for a read: ``hit``, ``miss`` (stored), ``bypass`` (not
    cacheable: ``code`` and ``reason`` say why), ``off`` (not asked) or ``stale`` (PostgreSQL
    unreachable: the last cached answer, ``age_ms`` old)."""

    status: str
    code: str | None = None
    reason: str | None = None
    age_ms: float | None = None
    stale: bool = False


@dataclass(frozen=True, slots=True)
class Header:
    columns: list[Column]
    kind: StatementKind


@dataclass(frozen=True, slots=True)
class Summary:
    row_count: int
    command: str
    duration_ms: float
    kind: StatementKind


@dataclass(slots=True)
class TransactionResult:
    results: list[QueryResult]
    duration_ms: float


@dataclass(frozen=True, slots=True)
class PackedRows:
    """Rows the store itself wrote in the packed form (``RowChunk.packed``: one JSON array of
    arrays; decimals as strings, timestamps in ISO 8601 with their offset), e.g. PostgreSQL's
    ``json_agg``: a front end that sends packed rows passes them on without a Python object
    per value; one that does not reads them with ``unpacked``."""

    data: bytes
    count: int


# What a streamed statement yields: a header, batches of rows (or packed rows), a summary.
Event = Header | Rows | PackedRows | Summary


def unpacked(rows: PackedRows, columns: Sequence[Column]) -> list[tuple[Any, ...]]:
    """Packed rows as Python values, by their columns' kinds: the client's reader, which defines
    the packed form, so there is one implementation of it."""
    return unpack_rows(rows.data, [c.kind.value for c in columns])


_FIXED_BYTES = 8  # a number, a boolean, a timestamp: about what it costs on any wire
_LENGTH_KINDS = frozenset({ValueKind.TEXT, ValueKind.BYTES})


def approximate_bytes(rows: Rows, columns: Sequence[Column]) -> int:
    """About how many bytes ``rows`` take on a wire: exact for text and bytes (the values that
    can be large), eight per fixed-size value, the text form's length for anything else.
    Column by column, so the common kinds cost a C-level ``map`` and no Python per value."""
    total = _FIXED_BYTES * len(columns) * len(rows)
    for index, column in enumerate(columns):
        values = filter(None, map(itemgetter(index), rows))
        if column.kind in _LENGTH_KINDS:
            total += sum(map(len, values))
        elif column.kind in (ValueKind.JSON, ValueKind.OTHER, ValueKind.DECIMAL):
            total += sum(len(str(v)) for v in values)
    return total
