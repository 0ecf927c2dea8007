"""Parameters by position or by name, as one list for the wire.

PostgreSQL numbers its parameters (``$1``, ``$2``). A sequence binds in that order. A mapping
binds by name: the statement writes ``:name`` (or ``$name``) where a value goes, and each name
becomes the ``$n`` of its first appearance (a name used twice is one parameter). Anything else —
a set, a string, a mapping with a statement that names no parameter, a name the mapping lacks or
a key the statement never uses — is refused with a clear error before anything is sent, so a
dict can never be bound by its keys.

The scan knows PostgreSQL's lexical rules: nothing inside string constants (``'...'``,
``E'...'``, dollar-quoted bodies), quoted identifiers or comments is a parameter, and a cast
(``::type``) is not one either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["bind"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def bind(sql: str, params: Sequence[Any] | Mapping[str, Any] | None) -> tuple[str, list[Any]]:
    """The statement and its parameters in wire order."""
    if params is None:
        return sql, []
    if isinstance(params, Mapping):
        return _by_name(sql, params)
    if isinstance(params, str | bytes | bytearray) or not isinstance(params, Sequence):
        raise TypeError(
            "params must be a sequence (bound to $1, $2, ... in order) or a mapping (bound to"
            f" :name placeholders), not {type(params).__name__}"
        )
    return sql, list(params)


def _by_name(sql: str, params: Mapping[str, Any]) -> tuple[str, list[Any]]:
    order: dict[str, int] = {}
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":  # line comment
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end])
            i = end
        elif c == "/" and nxt == "*":  # block comment (they nest in PostgreSQL)
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(sql[i:j])
            i = j
        elif c == "'" or (c in "eE" and nxt == "'" and not _in_word(sql, i)):
            start = i
            escapes = c != "'"
            i = i + 2 if escapes else i + 1
            while i < n:
                escaped = escapes and sql[i] == "\\"
                doubled = sql[i] == "'" and i + 1 < n and sql[i + 1] == "'"
                if escaped or doubled:
                    i += 2
                elif sql[i] == "'":
                    i += 1
                    break
                else:
                    i += 1
            out.append(sql[start:i])
        elif c == '"':
            end = i + 1
            while True:
                end = sql.find('"', end)
                if end < 0:
                    end = n
                    break
                if sql.startswith('""', end):
                    end += 2
                    continue
                end += 1
                break
            out.append(sql[i:end])
            i = end
        elif (
            c == "$"
            and (name := _NAME.match(sql, i + 1))
            and not sql.startswith("$", name.end())
            and not _in_word(sql, i)
        ):
            # $name (not $tag$, which opens a dollar-quoted body): bound by name as :name is.
            key = name.group(0)
            if key not in params:
                raise KeyError(f"the statement names ${key}, which params does not hold")
            number = order.setdefault(key, len(order) + 1)
            out.append(f"${number}")
            i = name.end()
        elif c == "$" and (tag := _DOLLAR_TAG.match(sql, i)) and not _in_word(sql, i):
            close = sql.find(tag.group(0), tag.end())
            end = n if close < 0 else close + len(tag.group(0))
            out.append(sql[i:end])
            i = end
        elif c == ":" and nxt == ":":  # a cast
            out.append("::")
            i += 2
        elif c == ":" and (name := _NAME.match(sql, i + 1)) and not _in_word(sql, i):
            key = name.group(0)
            if key not in params:
                raise KeyError(f"the statement names :{key}, which params does not hold")
            number = order.setdefault(key, len(order) + 1)
            out.append(f"${number}")
            i = name.end()
        else:
            out.append(c)
            i += 1
    if not order and params:
        raise ValueError(
            "params is a mapping, but the statement names no :name placeholder to bind it to"
            " (with positional $1, $2 ... pass a list)"
        )
    unused = sorted(set(params) - set(order))
    if unused:
        raise ValueError(f"params holds {', '.join(unused)}, which the statement does not name")
    return "".join(out), [params[key] for key in order]


def _in_word(sql: str, i: int) -> bool:
    """Whether the character at ``i`` continues an identifier or number (``a:b`` in an array
    slice ``x[1:n]`` is not a parameter either: a digit or letter right before the colon)."""
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$")
