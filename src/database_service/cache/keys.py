"""Cache keys that cannot cross tenants or users, and the Redis key layout.

A result key is a SHA-256 over an unambiguous encoding of everything that decides which rows
PostgreSQL returns: the tenant, the user id row-level security sees (``None`` — the company-wide
login — is not ``""``), a schema version the caller may bump when a tenant's DDL changes what
a statement means, the statement's canonical text and the typed parameters. Every field is
length-prefixed and every parameter carries a type tag, so ``1``, ``"1"``, ``1.0``, ``True``,
``Decimal("1")`` and ``b"1"`` are all different keys and no concatenation of fields can equal
another. A key is always matched whole (a digest), never by prefix.

The statement's canonical text is PostgreSQL's parse tree deparsed (pglast): whitespace, case of
keywords and comments do not matter, constants do. ``pglast.parser.fingerprint`` is not used: it
ignores constants (``select 1`` and ``select 2`` share a fingerprint). Canonicalising costs
about 30 µs for a short statement, so it is cached per statement text (bounded LRU).

Redis keys live under ``dbsvc:{<tenant>}:`` — the braces are Redis Cluster's hash tag, so a
tenant's keys share one slot (its Lua scripts may touch several of them). Tenant ids match
``^[a-z][a-z0-9_]{1,40}$`` (``tenancy.ids``): no ``{``, ``}`` or ``:``, so the text between the
first ``{`` and the first ``}`` is exactly the tenant id, whatever follows. A caller's key-value
key is appended verbatim after the fixed ``}:kv:`` — the mapping ``(tenant, key) → bytes`` is
injective, and no key a caller chooses can name another tenant's key, a result entry or the
bookkeeping (they never follow ``:kv:``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

from pglast.parser import ParseError, deparse_protobuf, parse_sql_protobuf

from database_service.errors import InvalidParameters
from database_service.tenancy.ids import validate_tenant_id
from database_service.textmemo import short_text_cache

__all__ = [
    "MAX_KV_KEY_BYTES",
    "UncacheableParameter",
    "canonical_statement",
    "generations_key",
    "kv_key",
    "result_key",
    "tenant_prefix",
]

MAX_KV_KEY_BYTES = 1024
_RESULT_KEY_VERSION = b"dbsvc-result-key-v1"
_CANONICAL_CACHE_SIZE = 4096


class UncacheableParameter(TypeError):
    """A parameter of a type the key encoding does not know: run the statement uncached
    (an unknown type has no encoding we could prove unambiguous)."""


@short_text_cache(maxsize=_CANONICAL_CACHE_SIZE)
def canonical_statement(sql: str) -> str:
    """The statement as PostgreSQL's parser sees it, deparsed: one text per parse tree.

    A text pglast cannot parse or deparse (the guard has normally refused it already) is kept
    verbatim behind a marker no deparsed text starts with, so it can only ever equal itself."""
    try:
        return deparse_protobuf(parse_sql_protobuf(sql))
    except (ParseError, Exception):  # deparse raises its own errors for odd trees
        return "\x00raw\x00" + sql


def _field(out: bytearray, tag: bytes, data: bytes) -> None:
    """One field: a one-byte type tag, the length (8 bytes, big-endian), the bytes."""
    out += tag
    out += struct.pack(">Q", len(data))
    out += data


def _text(value: str) -> bytes:
    # surrogatepass: a lone surrogate (refused later by the guard) must not crash key building.
    return value.encode("utf-8", "surrogatepass")


def _encode(out: bytearray, value: object) -> None:
    # bool before int (bool is an int), datetime before date (datetime is a date).
    if value is None:
        _field(out, b"N", b"")
    elif isinstance(value, bool):
        _field(out, b"B", b"1" if value else b"0")
    elif isinstance(value, int):
        _field(out, b"I", str(value).encode())
    elif isinstance(value, float):
        _field(out, b"F", value.hex().encode())  # exact; -0.0, inf and nan distinct
    elif isinstance(value, Decimal):
        _field(out, b"D", str(value).encode())  # 1.0 and 1.00 differ (PostgreSQL shows both)
    elif isinstance(value, str):
        _field(out, b"S", _text(value))
    elif isinstance(value, bytes | bytearray | memoryview):
        _field(out, b"Y", bytes(value))
    elif isinstance(value, dt.datetime):
        _field(out, b"T", value.isoformat().encode())  # naive and aware differ (the offset)
    elif isinstance(value, dt.date):
        _field(out, b"d", value.isoformat().encode())
    elif isinstance(value, dt.time):
        _field(out, b"t", value.isoformat().encode())
    elif isinstance(value, dt.timedelta):
        _field(out, b"V", f"{value.days},{value.seconds},{value.microseconds}".encode())
    elif isinstance(value, uuid.UUID):
        _field(out, b"U", value.bytes)
    elif isinstance(
        value,
        ipaddress.IPv4Address
        | ipaddress.IPv6Address
        | ipaddress.IPv4Network
        | ipaddress.IPv6Network
        | ipaddress.IPv4Interface
        | ipaddress.IPv6Interface,
    ):
        _field(out, b"A", f"{type(value).__name__}:{value}".encode())
    elif isinstance(value, list | tuple):
        # Lists and tuples both bind as arrays; told apart anyway (a distinction costs a miss,
        # a confusion could cost a wrong answer).
        _field(out, b"L" if isinstance(value, list) else b"P", str(len(value)).encode())
        for item in value:
            _encode(out, item)
    elif isinstance(value, Mapping):
        # Insertion order kept: a json (not jsonb) value shows its keys in the order given.
        _field(out, b"M", str(len(value)).encode())
        for key, item in value.items():
            _encode(out, key)
            _encode(out, item)
    else:
        raise UncacheableParameter(f"no cache key encoding for a {type(value).__name__}")


def result_key(
    tenant_id: str,
    user_id: str | None,
    statement: str,
    params: Sequence[object],
    *,
    schema_version: str = "",
) -> str:
    """The cache key of a statement's result for one tenant and one user (hex SHA-256).

    Raises ``UncacheableParameter`` for a parameter type with no encoding."""
    out = bytearray()
    _field(out, b"K", _RESULT_KEY_VERSION)
    _field(out, b"S", _text(tenant_id))
    _encode(out, user_id)
    _field(out, b"S", _text(schema_version))
    _field(out, b"S", _text(canonical_statement(statement)))
    _field(out, b"L", str(len(params)).encode())
    for value in params:
        _encode(out, value)
    return hashlib.sha256(out).hexdigest()


def tenant_prefix(tenant_id: str) -> bytes:
    """``dbsvc:{<tenant>}:`` — every Redis key of the tenant starts with it."""
    return b"dbsvc:{" + validate_tenant_id(tenant_id).encode() + b"}:"


def generations_key(tenant_id: str) -> bytes:
    """The Redis hash of the tenant's relation generations."""
    return tenant_prefix(tenant_id) + b"gen"


def kv_key(tenant_id: str, key: bytes | str) -> bytes:
    """The Redis key of a caller's key-value key: ``dbsvc:{<tenant>}:kv:<key verbatim>``.

    Any bytes are allowed in the key (separators, glob characters, braces, NUL): it is never
    parsed, only appended after the tenant's fixed prefix. Empty keys and keys over
    ``MAX_KV_KEY_BYTES`` are refused (``invalid_parameters``)."""
    raw = _text(key) if isinstance(key, str) else bytes(key)
    if not raw:
        raise InvalidParameters("a key must not be empty")
    if len(raw) > MAX_KV_KEY_BYTES:
        raise InvalidParameters(
            f"a key may have at most {MAX_KV_KEY_BYTES} bytes (this one has {len(raw)})"
        )
    return tenant_prefix(tenant_id) + b"kv:" + raw


def kv_keys(tenant_id: str, keys: Iterable[bytes | str]) -> list[bytes]:
    return [kv_key(tenant_id, key) for key in keys]
