"""Result rows to protobuf, chunked by size, with one encoder per column chosen once.

Two encodings. Values: a ``Value`` message per value; encoders write straight into the row's
repeated field (``values.add(...)``) instead of building Value objects to copy in. Packed (when
the request asks for ``ROW_ENCODING_PACKED``): a chunk's rows as one JSON array of arrays made by
orjson in C, which a reader decodes in one call too: a Value per value costs about a microsecond
on each side in Python, which made the client's decoding alone slower than the query. A chunk
that cannot be packed faithfully (a non-finite float, an integer past 64 bits) goes as Values.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import math
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from operator import itemgetter
from typing import Any, TypeVar

import orjson

from database_service.errors import InvalidParameters, ResultTooLarge
from database_service.results import Column as ResultColumn
from database_service.results import (
    Event,
    Header,
    PackedRows,
    QueryResult,
    Summary,
    ValueKind,
    unpacked,
)
from database_service_client._proto.database_service_pb2 import (
    Column,
    ResultHeader,
    ResultSummary,
    RowChunk,
    Value,
)
from database_service_client.values import to_value

__all__ = [
    "Encoder",
    "add_rows",
    "chunk_rows",
    "columns_message",
    "encoded_result",
    "encoders_for",
    "hit_tail",
    "pack_rows",
    "packed_chunks",
    "result_message",
    "result_messages",
    "summary_tail",
    "unpack_bulk",
]

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
    """Exact as text (a Decimal, or a numeric the SQL read as text); a float as a double."""
    if value is None:
        return add(null_value=True)
    return add(double_value=value) if isinstance(value, float) else add(decimal_value=str(value))


def _json(add: Add, value: Any) -> object:
    if value is None:
        return add(null_value=True)
    try:
        return add(json_value=json.dumps(value))
    except RecursionError:
        # A tenant's jsonb nested nearly as deep as the reader takes: a clear error.
        raise ResultTooLarge("a json value in the result is nested too deeply to write") from None


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
    return [Column(name=c.name, type=c.type_name, kind=c.kind.value) for c in columns]


def _packed_value(value: Any) -> Any:
    """orjson's ``default``: what it does not encode itself (a decimal, bytes...)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(value).decode()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)  # ranges, intervals' odd forms, addresses...


_PACK_OPTIONS = orjson.OPT_NAIVE_UTC  # UUIDs, dates and aware datetimes orjson writes itself


def pack_rows(records: Sequence[Sequence[Any]], columns: Sequence[ResultColumn]) -> bytes | None:
    """The records as one JSON array of arrays, or None when they cannot go packed."""
    for index, column in enumerate(columns):
        # Decimals travel as strings (NaN included); floats as JSON numbers, which have no NaN
        # or infinity. A sum that is not finite means one of those (or an overflow: then
        # Values, which is still right). Zeros and NULLs are skipped; all of it in C.
        if column.kind is ValueKind.FLOAT and not math.isfinite(
            sum(filter(None, map(itemgetter(index), records)))
        ):
            return None
    try:
        # Rows as tuples (an asyncpg Record is not one), in C.
        rows = list(map(tuple, records))
        return orjson.dumps(rows, default=_packed_value, option=_PACK_OPTIONS)
    except orjson.JSONEncodeError:  # an integer beyond 64 bits
        return None


def packed_chunks(
    records: Sequence[Sequence[Any]],
    columns: Sequence[ResultColumn],
    encoders: Sequence[Encoder],
    max_bytes: int,
) -> Iterator[RowChunk]:
    """RowChunks of about max_bytes, packed where they can be."""
    if not records:
        return
    packed = pack_rows(records, columns)
    if packed is None:
        yield from chunk_rows(records, encoders, max_bytes)
    elif len(packed) <= max_bytes or len(records) == 1:
        yield RowChunk(packed=packed)
    else:
        half = len(records) // 2
        yield from packed_chunks(records[:half], columns, encoders, max_bytes)
        yield from packed_chunks(records[half:], columns, encoders, max_bytes)


def add_rows(target: Any, records: Sequence[Sequence[Any]], encoders: Sequence[Encoder]) -> None:
    """Every record into ``target``: a RowChunk, or any message with ``repeated Row rows``."""
    add_row = target.rows.add
    for record in records:
        add = add_row().values.add
        for encode, value in zip(encoders, record, strict=True):
            encode(add, value)


def result_message(result: QueryResult, message: Callable[..., T], *, packed: bool = False) -> T:
    """A whole result as one message: header, rows and summary."""
    data = pack_rows(result.rows, result.columns) if packed and result.rows else None
    if data is not None:
        chunk = RowChunk(packed=data)
    else:
        chunk = RowChunk()
        add_rows(chunk, result.rows, encoders_for(result.columns))
    return message(
        header=ResultHeader(columns=columns_message(result.columns)),
        rows=chunk,
        summary=ResultSummary(
            row_count=result.row_count,
            command=result.command,
            duration_ms=result.duration_ms,
            statement_class=result.kind.value,
        ),
    )


_DOUBLE = struct.Struct("<d")


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _text(tag: bytes, text: str) -> bytes:
    data = text.encode()
    return tag + _varint(len(data)) + data


def summary_tail(
    duration_ms: float, cache: str, cache_age_ms: float, stale: bool, cache_reason: str
) -> bytes:
    """Bytes to append to an encoded ``QueryResult`` (a cached answer, stored as sent) that set
    its summary's duration and cache fields: a message field that occurs twice is merged, and a
    scalar's last occurrence wins (the protobuf encoding's rules), so the stored rows are sent
    as they are instead of parsed and encoded again per hit. Every field is written, defaults
    too: a default left out would not replace the stored value."""
    summary = b"".join(
        (
            b"\x19" + _DOUBLE.pack(duration_ms),  # 3: duration_ms, fixed64
            _text(b"\x2a", cache),  # 5: cache
            b"\x31" + _DOUBLE.pack(cache_age_ms),  # 6: cache_age_ms
            b"\x38\x01" if stale else b"\x38\x00",  # 7: stale, varint
            _text(b"\x42", cache_reason),  # 8: cache_reason
        )
    )
    return b"\x1a" + _varint(len(summary)) + summary  # QueryResult.summary = 3


# summary_tail(duration_ms, "hit", age_ms, False, ""), in one pack: a hit's tail is always
# laid out alike (the field tags and lengths between the two doubles are constants).
_HIT_TAIL = struct.Struct("<3sd6sd4s")
_HIT_HEAD = b"\x1a\x1b\x19"  # summary, 27 bytes; duration_ms
_HIT_MIDDLE = b"\x2a\x03hit\x31"  # cache = "hit"; cache_age_ms
_HIT_END = b"\x38\x00\x42\x00"  # stale = false; cache_reason = ""


def hit_tail(duration_ms: float, cache_age_ms: float) -> bytes:
    """``summary_tail`` of a fresh hit (the result cache's usual answer), cheaper."""
    return _HIT_TAIL.pack(_HIT_HEAD, duration_ms, _HIT_MIDDLE, cache_age_ms, _HIT_END)


@functools.lru_cache(maxsize=1024)
def _header_field(columns: tuple[ResultColumn, ...]) -> bytes:
    """``QueryResult.header`` (field 1), encoded: the same for every result of a statement."""
    header = ResultHeader(columns=columns_message(columns)).SerializeToString()
    return b"\x0a" + _varint(len(header)) + header


def encoded_result(result: QueryResult) -> bytes | None:
    """``result_message(result, QueryResult, packed=True)``, already encoded, or None when its
    rows cannot go packed (then that message, with Values). The header's bytes are kept per
    column list and the rest is written directly: building the message (a Column message per
    column, three nested messages copied into it) and serializing it cost about as much as
    the rest of a one-row answer's encoding. A parse of these bytes equals that message."""
    if result.rows:
        data = pack_rows(result.rows, result.columns)
        if data is None:
            return None
        chunk = b"\x12" + _varint(len(data)) + data  # RowChunk.packed = 2
    else:
        chunk = b""
    summary = b"".join(
        (
            b"\x08" + _varint(result.row_count) if result.row_count else b"",  # 1: row_count
            _text(b"\x12", result.command) if result.command else b"",  # 2: command
            b"\x19" + _DOUBLE.pack(result.duration_ms) if result.duration_ms else b"",  # 3
            _text(b"\x22", result.kind.value),  # 4: statement_class
        )
    )
    return b"".join(
        (
            _header_field(tuple(result.columns)),
            b"\x12" + _varint(len(chunk)) + chunk,  # QueryResult.rows = 2 (present, maybe empty)
            b"\x1a" + _varint(len(summary)) + summary,  # QueryResult.summary = 3
        )
    )


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
    *,
    packed: bool = False,
) -> AsyncGenerator[T, None]:
    """Streamed result events as messages of about ``max_chunk_bytes``: the header rides with
    the first rows and the summary with the last, so a small result is a single message."""

    async def messages() -> AsyncGenerator[T, None]:
        encoders: list[Encoder] = []
        columns: list[ResultColumn] = []
        header: ResultHeader | None = None
        pending: RowChunk | None = None
        async for event in events:
            if isinstance(event, Header):
                columns = event.columns
                encoders = encoders_for(columns)
                header = ResultHeader(columns=columns_message(columns))
            elif isinstance(event, Summary):
                summary = ResultSummary(
                    row_count=event.row_count,
                    command=event.command,
                    duration_ms=event.duration_ms,
                    statement_class=event.kind.value,
                )
                yield message(header=header, rows=pending, summary=summary)
            else:
                chunks: Iterable[RowChunk]
                if isinstance(event, PackedRows):
                    # Already packed by the store: passed on as it is, or read for Values.
                    chunks = (
                        [RowChunk(packed=event.data)]
                        if packed
                        else chunk_rows(unpacked(event, columns), encoders, max_chunk_bytes)
                    )
                elif packed:
                    chunks = packed_chunks(event, columns, encoders, max_chunk_bytes)
                else:
                    chunks = chunk_rows(event, encoders, max_chunk_bytes)
                for chunk in chunks:
                    if pending is not None:
                        yield message(header=header, rows=pending)
                        header = None
                    pending = chunk

    return messages()


def unpack_bulk(packed: bytes) -> list[Any]:
    """The rows of a packed bulk message (``BulkInsertRequest.packed``): one JSON array of
    arrays, read in C. Their values are checked against the columns' types later, a column at a
    time (``coerce_rows``)."""
    try:
        rows = orjson.loads(packed)
    except orjson.JSONDecodeError as exc:
        raise InvalidParameters(f"packed rows are not JSON: {exc}") from None
    if not isinstance(rows, list) or not set(map(type, rows)) <= {list}:
        raise InvalidParameters("packed rows must be a JSON array of arrays")
    return rows
