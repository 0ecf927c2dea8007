"""Typed values on the wire: ``Value`` messages to and from Python, as pure functions.

Python → Value: None, bool, int, float, str, bytes, Decimal (exact, as decimal_value), datetime
(timestamp; naive means UTC), date/time/timedelta/UUID (their text form), dict (json_value), list
or tuple (array_value). Value → Python is the inverse, with json_value parsed and timestamps as
aware UTC datetimes.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gc
import json
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from operator import attrgetter
from typing import Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from database_service_client._proto.database_service_pb2 import Array, Row, Value

__all__ = [
    "from_row",
    "from_value",
    "pack_rows",
    "timestamp_to_datetime",
    "to_row",
    "to_value",
    "unpack_rows",
]


def _timestamp(value: dt.datetime) -> Timestamp:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(dt.UTC))
    return stamp


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def to_value(value: Any) -> Value:
    if value is None:
        return Value(null_value=True)
    if isinstance(value, bool):
        return Value(bool_value=value)
    if isinstance(value, int):
        # Beyond int64 (ClickHouse's UInt64, Int128, PostgreSQL numerics read as int): exact,
        # as a decimal.
        if _INT64_MIN <= value <= _INT64_MAX:
            return Value(int_value=value)
        return Value(decimal_value=str(value))
    if isinstance(value, float):
        return Value(double_value=value)
    if isinstance(value, str):
        return Value(string_value=value)
    if isinstance(value, bytes | bytearray | memoryview):
        return Value(bytes_value=bytes(value))
    if isinstance(value, Decimal):
        return Value(decimal_value=str(value))
    if isinstance(value, dt.datetime):
        return Value(timestamp_value=_timestamp(value))
    if isinstance(value, dt.date | dt.time):
        return Value(string_value=value.isoformat())
    if isinstance(value, dt.timedelta):
        return Value(double_value=value.total_seconds())
    if isinstance(value, uuid.UUID):
        return Value(string_value=str(value))
    if isinstance(value, dict):
        return Value(json_value=json.dumps(value, default=str))
    if isinstance(value, list | tuple):
        return Value(array_value=Array(values=[to_value(v) for v in value]))
    return Value(string_value=str(value))


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def timestamp_to_datetime(stamp: Timestamp) -> dt.datetime:
    # ~10x faster than Timestamp.ToDatetime, which validates and rounds on every call.
    return _EPOCH + dt.timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


_DECODERS: dict[str, Callable[[Value], Any]] = {
    "null_value": lambda v: None,
    "bool_value": attrgetter("bool_value"),
    "int_value": attrgetter("int_value"),
    "double_value": attrgetter("double_value"),
    "string_value": attrgetter("string_value"),
    "bytes_value": attrgetter("bytes_value"),
    "timestamp_value": lambda v: timestamp_to_datetime(v.timestamp_value),
    "decimal_value": lambda v: Decimal(v.decimal_value),
    "json_value": lambda v: json.loads(v.json_value),
    "array_value": lambda v: [from_value(x) for x in v.array_value.values],
}


def from_value(value: Value) -> Any:
    kind = value.WhichOneof("kind")
    return None if kind is None else _DECODERS[kind](value)


def to_row(values: Iterable[Any]) -> Row:
    return Row(values=[to_value(v) for v in values])


def from_row(row: Row) -> tuple[Any, ...]:
    return tuple(map(from_value, row.values))


def _timestamp_text(text: str) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _decimal_text(value: Any) -> Any:
    return Decimal(value) if isinstance(value, str) else value


# Packed rows (RowChunk.packed) by column kind: what JSON does not carry as the value itself.
# Per kind: the converter for one value (None, numbers and odd forms included), and the C
# function a column of nothing but strings can be mapped with in one call.
_UNPACK: dict[str, tuple[Callable[[Any], Any], Callable[[str], Any]]] = {
    "timestamp": (_timestamp_text, dt.datetime.fromisoformat),
    "decimal": (_decimal_text, Decimal),
    "bytes": (base64.b64decode, base64.b64decode),
}
_STRINGS = {str}
_TZINFO = attrgetter("tzinfo")


def _converted(values: tuple[Any, ...], kind: str) -> Iterable[Any]:
    one, whole = _UNPACK[kind]
    if set(map(type, values)) <= _STRINGS:
        try:
            converted = list(map(whole, values))
        except ValueError:
            pass
        else:
            # The server writes timestamps with their offset; one without is UTC.
            if kind != "timestamp" or None not in map(_TZINFO, converted):  # in C
                return converted
    return [None if v is None else one(v) for v in values]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector held off while a chunk is decoded: its thousands of new
    lists, tuples and values (none in a cycle) otherwise set off collections that walk the
    whole heap of the caller's process — a day of 1-minute candles decoded 0.4 ms faster at the
    median and 1 ms on average with it paused. Collections resume, as they were, after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def unpack_rows(packed: bytes, kinds: Sequence[str]) -> list[tuple[Any, ...]]:
    """Rows from a packed chunk: one JSON decode (in C), then only the columns whose values JSON
    does not carry as themselves (timestamps, decimals, bytes) are converted, a column at a
    time."""
    with _collector_paused():
        return _unpacked(packed, kinds)


def _unpacked(packed: bytes, kinds: Sequence[str]) -> list[tuple[Any, ...]]:
    rows: list[list[Any]] = orjson.loads(packed)
    convert = [i for i, k in enumerate(kinds) if k in _UNPACK]
    if not convert or not rows:
        return list(map(tuple, rows))
    columns: list[Iterable[Any]] = list(zip(*rows, strict=True))
    for index in convert:
        columns[index] = _converted(columns[index], kinds[index])  # type: ignore[arg-type]
    return list(zip(*columns, strict=True))


def _packed_default(value: Any) -> Any:
    """What orjson does not write itself, as the Value form would carry it; anything else (bytes,
    an unknown type) makes the batch go as Values."""
    if isinstance(value, Decimal):
        return str(value)  # exact; the server reads it by the column's type
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    raise TypeError(type(value).__name__)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def pack_rows(rows: Sequence[Sequence[Any]]) -> bytes | None:
    """Rows for a bulk load as one JSON array of arrays (``BulkInsertRequest.packed``), in C,
    or None when they are not all JSON's to carry (bytes, integers past 64 bits): then Values.

    JSON has no NaN or infinity and orjson writes them as null; only when a null appears is
    the batch searched for them, and they go as the strings the server reads back."""
    try:
        packed = orjson.dumps(rows, default=_packed_default)
        if b"null" in packed and any(
            isinstance(v, float) and not math.isfinite(v) for row in rows for v in row
        ):
            packed = orjson.dumps(
                [[_finite(v) for v in row] for row in rows], default=_packed_default
            )
    except orjson.JSONEncodeError:
        return None
    return packed
