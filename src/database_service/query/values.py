"""Typed values across the JSON boundary: parameters in (coerced by the statement's parameter
types) and result values out (encoded so nothing exact is lost: numeric as string, timestamps in
ISO 8601, bytea as base64)."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import math
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from operator import itemgetter
from typing import Any, NamedTuple

import asyncpg

from database_service.errors import InvalidParameters
from database_service.moments import in_utc
from database_service.results import Column, ValueKind

__all__ = ["PgType", "coerce_params", "coerce_row", "coerce_rows", "encode_value"]

_INTS = {"int2", "int4", "int8", "oid"}
_FLOATS = {"float4", "float8"}
_TEXTS = {"text", "varchar", "bpchar", "name", "char", "citext", "xml"}


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("a boolean is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return int(value.strip())
    raise TypeError("expected an integer")


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return float(value)
    raise TypeError("expected a number")


def _numeric(value: Any) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise TypeError("a boolean is not a number")
    if isinstance(value, int | str):
        try:
            return Decimal(value)
        except InvalidOperation:
            raise ValueError("not a decimal number") from None
    if isinstance(value, float):
        return Decimal(repr(value))
    raise TypeError("expected a decimal number (send a string to keep it exact)")


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in {"true", "false", "t", "f"}:
        return value.lower() in {"true", "t"}
    raise TypeError("expected true or false")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise TypeError("expected a string")


def _datetime(value: Any) -> dt.datetime:
    return value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(_text(value))


def _timestamptz(value: Any) -> dt.datetime:
    parsed = _datetime(value)
    return in_utc(parsed) if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _timestamp(value: Any) -> dt.datetime:
    parsed = _datetime(value)
    return in_utc(parsed).replace(tzinfo=None) if parsed.tzinfo else parsed


def _interval(value: Any) -> dt.timedelta:
    return value if isinstance(value, dt.timedelta) else dt.timedelta(seconds=_float(value))


def _date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(_text(value))


def _time(value: Any) -> dt.time:
    return value if isinstance(value, dt.time) else dt.time.fromisoformat(_text(value))


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(_text(value))


def _bytea(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return base64.b64decode(_text(value), validate=True)


def _json(value: Any) -> Any:
    return value


_COERCE: dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(_INTS, _int),
    **dict.fromkeys(_FLOATS, _float),
    **dict.fromkeys(_TEXTS, _text),
    "numeric": _numeric,
    "bool": _bool,
    "timestamptz": _timestamptz,
    "timestamp": _timestamp,
    "date": _date,
    "time": _time,
    "interval": _interval,
    "uuid": _uuid,
    "json": _json,
    "jsonb": _json,
    "bytea": _bytea,
    "inet": lambda v: ipaddress.ip_interface(_text(v)),
    "cidr": lambda v: ipaddress.ip_network(_text(v)),
}


def _coercer(type_name: str, kind: str) -> Callable[[Any], Any]:
    if kind == "array":
        # asyncpg names array types "int4[]"; the catalog's own name is "_int4".
        element = _COERCE.get(type_name.removesuffix("[]").removeprefix("_"), _json)

        def array(value: Any) -> list[Any]:
            if not isinstance(value, list):
                raise TypeError("expected an array")
            return [None if v is None else element(v) for v in value]

        return array
    return _COERCE.get(type_name, _json)


class PgType(NamedTuple):
    """The two facts about a column type that coercion needs (asyncpg's Type has the same)."""

    name: str
    kind: str  # "scalar" or "array"


def coerce_row(
    values: Sequence[Any], types: Sequence[PgType], names: Sequence[str], row_number: int
) -> tuple[Any, ...]:
    """One row of a bulk load, coerced to its columns' types; errors name the row and column."""
    if len(values) != len(types):
        raise InvalidParameters(f"row {row_number}: {len(values)} values for {len(types)} columns")
    out: list[Any] = []
    for value, pg_type, name in zip(values, types, names, strict=True):
        if value is None:
            out.append(None)
            continue
        try:
            out.append(_coercer(pg_type.name, pg_type.kind)(value))
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidParameters(
                f"row {row_number}, column {name} ({pg_type.name}): {exc}; got {value!r:.60}"
            ) from None
    return tuple(out)


# Columns whose values need no conversion when they all have one of these types (None aside):
# asyncpg encodes them as they are. bool is its own type, so it never passes as an integer.
_AS_THEY_ARE: dict[str, frozenset[type]] = {
    **dict.fromkeys(_INTS, frozenset({int})),
    **dict.fromkeys(_FLOATS, frozenset({float, int})),
    **dict.fromkeys(_TEXTS, frozenset({str})),
    "bool": frozenset({bool}),
}
_NONE = type(None)


def coerce_rows(
    rows: Sequence[Sequence[Any]], types: Sequence[PgType], names: Sequence[str], first: int
) -> Sequence[Sequence[Any]]:
    """A batch of a bulk load, coerced: the same values and errors as ``coerce_row`` on each
    row (``first`` numbers the batch's first row), but a column whose values need no conversion
    is only looked at by C (``set(map(type, ...))``) and its rows pass as they are."""
    if not rows:
        return rows
    if set(map(len, rows)) != {len(types)}:
        return [coerce_row(r, types, names, first + i) for i, r in enumerate(rows)]
    convert: list[tuple[int, Callable[[Any], Any]]] = []
    for index, pg_type in enumerate(types):
        seen = set(map(type, map(itemgetter(index), rows)))
        seen.discard(_NONE)
        fine = _AS_THEY_ARE.get(pg_type.name) if pg_type.kind == "scalar" else None
        if fine is not None and seen <= fine:
            continue
        coercer = _coercer(pg_type.name, pg_type.kind)
        if coercer is not _json:
            convert.append((index, coercer))
    if not convert:
        return rows
    out: list[list[Any]] = []
    try:
        for row in rows:
            values = list(row)
            for index, coercer in convert:
                value = values[index]
                if value is not None:
                    values[index] = coercer(value)
            out.append(values)
    except (TypeError, ValueError, OverflowError):
        # The row-wise path names the first bad row and column.
        return [coerce_row(r, types, names, first + i) for i, r in enumerate(rows)]
    return out


def coerce_params(values: Sequence[Any], types: Sequence[asyncpg.types.Type]) -> list[Any]:
    """JSON-shaped parameters → the Python values asyncpg encodes for each parameter type."""
    if len(values) != len(types):
        raise InvalidParameters(
            f"the statement takes {len(types)} parameter(s), {len(values)} given"
        )
    out: list[Any] = []
    for index, (value, pg_type) in enumerate(zip(values, types, strict=True), start=1):
        if value is None:
            out.append(None)
            continue
        try:
            out.append(_coercer(pg_type.name, pg_type.kind)(value))
        except (TypeError, ValueError, OverflowError) as exc:
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise InvalidParameters(
                f"parameter ${index} ({pg_type.name}): {exc}; got {type(value).__name__} {shown}"
            ) from None
    return out


_KIND_OF = {
    **dict.fromkeys(("int2", "int4", "int8", "oid"), ValueKind.INTEGER),
    **dict.fromkeys(("float4", "float8"), ValueKind.FLOAT),
    "numeric": ValueKind.DECIMAL,
    **dict.fromkeys(("text", "varchar", "bpchar", "name", "char"), ValueKind.TEXT),
    "bool": ValueKind.BOOLEAN,
    "bytea": ValueKind.BYTES,
    **dict.fromkeys(("timestamptz", "timestamp"), ValueKind.TIMESTAMP),
    **dict.fromkeys(("json", "jsonb"), ValueKind.JSON),
}


def postgres_column(name: str, pg_type: Any) -> Column:
    """A result column of PostgreSQL's, store-neutral: its type name as PostgreSQL says it, and
    how its values travel (asyncpg decodes json/jsonb to dicts and lists: JSON, not arrays)."""
    type_name = pg_type.name
    kind = _KIND_OF.get(type_name, ValueKind.OTHER) if pg_type.kind == "scalar" else ValueKind.OTHER
    return Column(name, type_name, kind)


def encode_value(value: Any) -> Any:
    """A result value as JSON: exact where PostgreSQL is exact."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, list | dict) and _plain_json(value):
        # What asyncpg decoded from json/jsonb: JSON already, and possibly nested deeper than
        # a recursive copy could go (a tenant's jsonb, hundreds of levels).
        return value
    if isinstance(value, list | tuple):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode_value(v) for k, v in value.items()}
    if isinstance(value, asyncpg.Record):
        return {k: encode_value(v) for k, v in value.items()}
    if isinstance(value, asyncpg.Range):
        return {
            "lower": encode_value(value.lower),
            "upper": encode_value(value.upper),
            "lower_inc": value.lower_inc,
            "upper_inc": value.upper_inc,
            "empty": value.isempty,
        }
    return str(value)  # uuid, inet, bit strings, geometric types: their text form


def _plain_json(value: list[Any] | dict[Any, Any]) -> bool:
    """Whether ``value`` holds only what JSON writes as it is (text keys, finite numbers),
    checked without recursion."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, member in item.items():
                if not isinstance(key, str):
                    return False
                stack.append(member)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif not (item is None or isinstance(item, bool | int | str)):
            return False
    return True
