"""Result rows to protobuf, chunked by size, with one encoder per column chosen once.

Encoders write straight into the row's repeated field (``values.add(...)``) instead of building
Value objects to copy in; ints, text and timestamps, most of what comes back, take a direct path.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any, TypeVar

from database_service.results import Column as ResultColumn
from database_service.results import Event, Header, Summary, ValueKind
from database_service_client._proto.database_service_pb2 import (
    Column,
    ResultHeader,
    ResultSummary,
    RowChunk,
    Value,
)
from database_service_client.values import to_value

__all__ = ["Encoder", "chunk_rows", "columns_message", "encoders_for", "result_messages"]

T = TypeVar("T")

Add = Callable[..., Value]
Encoder = Callable[[Add, Any], object]
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NAIVE_EPOCH = dt.datetime(1970, 1, 1)


def _field(name: str) -> Encoder:
    def encode(add: Add, value: Any) -> object:
        return add(null_value=True) if value is None else add(**{name: value})

    return encode


def _timestamp(add: Add, value: Any) -> object:
    if value is None:
        return add(null_value=True)
    if not isinstance(value, dt.datetime):  # infinity comes back as a date-less sentinel
        return add(string_value=str(value))
    delta = value - (_EPOCH if value.tzinfo else _NAIVE_EPOCH)
    stamp = add().timestamp_value
    stamp.seconds = delta.days * 86_400 + delta.seconds
    stamp.nanos = delta.microseconds * 1000
    return stamp


def _integer(add: Add, value: Any) -> object:
    if value is None:
        return add(null_value=True)
    if -(2**63) <= value < 2**63:
        return add(int_value=value)
    return add(decimal_value=str(value))  # UInt64, Int128…: exact, as a decimal


def _decimal(add: Add, value: Any) -> object:
    if value is None:
        return add(null_value=True)
    return add(decimal_value=str(value)) if isinstance(value, Decimal) else add(double_value=value)


def _json(add: Add, value: Any) -> object:
    return add(null_value=True) if value is None else add(json_value=json.dumps(value))


def _generic(add: Add, value: Any) -> object:
    target = add()
    target.CopyFrom(to_value(value))
    return target


# By how a column's values travel (results.ValueKind), whatever store they come from.
_BY_KIND: dict[ValueKind, Encoder] = {
    ValueKind.INTEGER: _integer,
    ValueKind.TEXT: _field("string_value"),
    ValueKind.FLOAT: _field("double_value"),
    ValueKind.BOOLEAN: _field("bool_value"),
    ValueKind.BYTES: _field("bytes_value"),
    ValueKind.DECIMAL: _decimal,
    ValueKind.TIMESTAMP: _timestamp,
    # dicts and lists, which the generic path would take for arrays
    ValueKind.JSON: _json,
}


def encoders_for(columns: Sequence[ResultColumn]) -> list[Encoder]:
    return [_BY_KIND.get(c.kind, _generic) for c in columns]


def columns_message(columns: Sequence[ResultColumn]) -> list[Column]:
    return [Column(name=c.name, type=c.type_name) for c in columns]


def chunk_rows(
    records: Sequence[Sequence[Any]], encoders: Sequence[Encoder], max_bytes: int
) -> Iterator[RowChunk]:
    """RowChunks of about max_bytes (a single larger row makes its own chunk)."""
    chunk = RowChunk()
    size = 0
    for record in records:
        row = chunk.rows.add()
        add = row.values.add
        for encode, value in zip(encoders, record, strict=True):
            encode(add, value)
        size += row.ByteSize()
        if size >= max_bytes:
            yield chunk
            chunk = RowChunk()
            size = 0
    if size:
        yield chunk


def result_messages(
    events: AsyncIterator[Event],
    message: Callable[..., T],
    max_chunk_bytes: int,
) -> AsyncGenerator[T, None]:
    """Streamed result events as messages of about ``max_chunk_bytes``: the header rides with
    the first rows and the summary with the last, so a small result is a single message."""

    async def messages() -> AsyncGenerator[T, None]:
        encoders: list[Encoder] = []
        header: ResultHeader | None = None
        pending: RowChunk | None = None
        async for event in events:
            if isinstance(event, Header):
                encoders = encoders_for(event.columns)
                header = ResultHeader(columns=columns_message(event.columns))
            elif isinstance(event, Summary):
                summary = ResultSummary(
                    row_count=event.row_count,
                    command=event.command,
                    duration_ms=event.duration_ms,
                    statement_class=event.kind.value,
                )
                yield message(header=header, rows=pending, summary=summary)
            else:
                for chunk in chunk_rows(event, encoders, max_chunk_bytes):
                    if pending is not None:
                        yield message(header=header, rows=pending)
                        header = None
                    pending = chunk

    return messages()
