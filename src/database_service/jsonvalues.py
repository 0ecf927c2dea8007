"""JSON values a caller sent, checked before the service writes them as JSON text itself, and
JSON answers written whatever a tenant's data holds.

Python's JSON reader (what FastAPI parses REST bodies with) accepts more than JSON: ``NaN``,
``Infinity``, integers of any size, lone surrogates in ``\\u`` escapes, nesting to the
interpreter's recursion limit. orjson, which the service writes JSON with (outbox entries,
gRPC answers), refuses integers past 64 bits, NaN (silently ``null``), surrogates and nesting
past 254 levels. ``json_problem`` finds any of these in a caller's value so it is refused as
bad input (``invalid_parameters`` / ``invalid_text``) before anything runs, instead of failing
half way or being changed silently; ``dumps`` writes an answer that holds a tenant's values
(which PostgreSQL's jsonb may nest deeper or make larger than orjson takes) with the standard
library when orjson cannot.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import orjson

from database_service.errors import InvalidParameters, InvalidText, ResultTooLarge

__all__ = ["MAX_JSON_DEPTH", "check_json", "dumps", "json_problem"]

# Deep enough for any document a store keeps; shallow enough that every JSON writer on the
# way (orjson: 254 levels, with the envelope an outbox entry or an answer adds) takes it.
MAX_JSON_DEPTH = 128
# What orjson writes: signed 64-bit down, unsigned 64-bit up (a ClickHouse UInt64 fits).
_INT64 = (-(2**63), 2**64 - 1)


def json_problem(value: Any, *, max_depth: int = MAX_JSON_DEPTH) -> tuple[str, bool] | None:
    """What makes ``value`` not plain JSON the service can write back (reason, and whether it is
    a text problem), or None. Walked without recursion: the depth is the caller's."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, int):
            if not _INT64[0] <= item <= _INT64[1]:
                return "an integer past 64 bits (send it as a string)", False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "a number that is not finite (NaN or infinity is not JSON)", False
        elif isinstance(item, str):
            if not _utf8(item):
                return "text that is not valid Unicode (a lone surrogate)", True
        elif isinstance(item, dict | list):
            if depth > max_depth:
                return f"JSON nested deeper than {max_depth} levels", False
            if isinstance(item, dict):
                for key, member in item.items():
                    stack.append((key, depth))
                    stack.append((member, depth + 1))
            else:
                stack.extend((member, depth + 1) for member in item)
    return None


def check_json(value: Any, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Refuse ``value`` (named ``what`` in the error) unless it is plain JSON."""
    problem = json_problem(value, max_depth=max_depth)
    if problem is not None:
        reason, text = problem
        raise (InvalidText if text else InvalidParameters)(f"{what}: {reason}")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@functools.lru_cache(maxsize=8)
def _stdlib(default: Callable[[Any], Any]) -> Callable[[Any], str]:
    return json.JSONEncoder(
        ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"), default=default
    ).encode


def dumps(value: Any, *, default: Callable[[Any], Any] = str) -> bytes:
    """``value`` as JSON: orjson, or the standard library for what orjson refuses (an integer
    beyond 64 bits, nesting past 254 levels), non-finite numbers as ``null`` as orjson writes
    them; ``default`` turns what neither writes natively into what they do. Only an answer
    nested past the interpreter's recursion limit cannot be written: ``result_too_large``, a
    clear error rather than a server error."""
    try:
        return orjson.dumps(value, default=default)
    except orjson.JSONEncodeError:
        pass
    try:
        return _stdlib(default)(_finite(value)).encode("utf-8", "surrogatepass")
    except RecursionError:
        raise ResultTooLarge(
            "the answer is nested too deeply to write as JSON: ask for less of it"
        ) from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
