"""PostgreSQL protocol 3.0 messages as pure functions: no sockets, no state.

Only message headers are decoded on the data path: a message is a type byte and a length, and
its payload is forwarded untouched unless the SQL guard must read it (Query, Parse) or a
statement name must be rewritten (Parse, Bind, Describe, Close). Builders make the few messages
the port answers itself (authentication, parameter status, errors, ReadyForQuery).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "PROTOCOL_3_0",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "ProtocolViolation",
    "Startup",
    "authentication_ok",
    "authentication_sasl",
    "authentication_sasl_continue",
    "authentication_sasl_final",
    "backend_key_data",
    "bind_statement",
    "cstring",
    "error_response",
    "message",
    "notice_response",
    "parameter_status",
    "parse_error_fields",
    "parse_parse",
    "parse_startup",
    "query_text",
    "read_cstring",
    "ready_for_query",
    "replace_bind_statement",
    "replace_parse_name",
    "split_header",
    "startup_length",
]

PROTOCOL_3_0 = 196608  # 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")


class ProtocolViolation(Exception):
    """A message that breaks the protocol (SQLSTATE 08P01): the connection is closed after the
    error is sent, as PostgreSQL does."""

    sqlstate = "08P01"


@dataclass(frozen=True, slots=True)
class Startup:
    protocol: int
    parameters: dict[str, str]


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    key: int


def message(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + _INT32.pack(len(payload) + 4) + payload


def cstring(text: str) -> bytes:
    return text.encode() + b"\x00"


def split_header(header: bytes, max_length: int) -> tuple[bytes, int]:
    """A regular message's type byte and payload length, from its 5-byte header; a length
    below 4 or above ``max_length`` is a protocol violation (read no further)."""
    kind, length = _HEADER.unpack(header)
    if length < 4:
        raise ProtocolViolation(f"invalid message length {length}")
    if length > max_length:
        raise ProtocolViolation(
            f"message of {length} bytes exceeds the port's limit of {max_length} bytes"
        )
    return kind, length - 4


def startup_length(header: bytes, max_length: int = 10_000) -> int:
    """The payload length of a startup-phase packet (no type byte), from its 4-byte length.
    PostgreSQL caps startup packets at 10,000 bytes."""
    length = int.from_bytes(header[:4])
    if length < 8 or length > max_length:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    return length - 4


def parse_startup(payload: bytes) -> Startup | CancelRequest | int:
    """A startup packet's meaning: a Startup (protocol 3.0 and its parameters), a
    CancelRequest, or the request code of an SSLRequest/GSSENCRequest."""
    code = int.from_bytes(payload[:4])
    if code == CANCEL_REQUEST_CODE:
        if len(payload) != 12:
            raise ProtocolViolation("invalid CancelRequest length")
        pid, key = struct.unpack_from("!II", payload, 4)
        return CancelRequest(pid, key)
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if len(payload) != 4:
            raise ProtocolViolation("invalid SSLRequest length")
        return code
    if code >> 16 != 3:
        raise ProtocolViolation(
            f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: server supports 3.0"
        )
    parts = payload[4:].split(b"\x00")
    # name\0value\0 ... \0: an even number of strings, then the empty terminator.
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2 != 0:
        raise ProtocolViolation("invalid startup packet layout")
    try:
        strings = [p.decode() for p in parts[:-2]]
    except UnicodeDecodeError:
        raise ProtocolViolation("startup packet is not valid UTF-8") from None
    parameters = dict(zip(strings[::2], strings[1::2], strict=True))
    return Startup(code, parameters)


def read_cstring(payload: bytes, offset: int = 0) -> tuple[str, int]:
    """The NUL-terminated string at ``offset`` and the offset after its NUL."""
    end = payload.find(b"\x00", offset)
    if end < 0:
        raise ProtocolViolation("string without its terminating NUL")
    try:
        return payload[offset:end].decode(), end + 1
    except UnicodeDecodeError:
        raise ProtocolViolation("string is not valid UTF-8") from None


def query_text(payload: bytes) -> str:
    """The SQL text of a Query message."""
    text, end = read_cstring(payload)
    if end != len(payload):
        raise ProtocolViolation("Query message has bytes after its string")
    return text


def parse_parse(payload: bytes) -> tuple[str, str, bytes]:
    """A Parse message's statement name, query text and parameter types (raw, forwarded)."""
    name, offset = read_cstring(payload)
    query, offset = read_cstring(payload, offset)
    types = payload[offset:]
    if len(types) < 2:
        raise ProtocolViolation("Parse message without its parameter type count")
    (count,) = struct.unpack_from("!H", types)
    if len(types) != 2 + 4 * count:
        raise ProtocolViolation("Parse message's parameter types do not match their count")
    return name, query, types


def nul_in_text(kind: bytes, payload: bytes) -> bool:
    """Whether a Query or Parse that did not parse is well framed around SQL text holding a NUL
    (which the protocol cannot carry): bad input to refuse (invalid_text), not a broken
    stream to end."""
    if kind == b"Q":
        return payload.endswith(b"\x00") and b"\x00" in payload[:-1]
    start = payload.find(b"\x00") + 1
    for count in range(min(64, (len(payload) - start) // 4) + 1):
        trailer = 2 + 4 * count
        end = len(payload) - trailer - 1
        if end <= start or payload[end] != 0:
            continue
        if struct.unpack_from("!H", payload, end + 1)[0] == count:
            return b"\x00" in payload[start:end]
    return False


def replace_parse_name(name: str, query: str, types: bytes) -> bytes:
    """A Parse message for ``query`` under another statement name."""
    return message(b"P", cstring(name) + cstring(query) + types)


def bind_statement(payload: bytes) -> tuple[str, int]:
    """A Bind message's statement name and the offset where the portal and name end."""
    _, offset = read_cstring(payload)
    statement, end = read_cstring(payload, offset)
    return statement, end


def replace_bind_statement(payload: bytes, statement: str) -> bytes:
    """A Bind message naming ``statement`` instead (its portal, formats and values kept)."""
    portal_end = payload.index(b"\x00") + 1
    _, end = bind_statement(payload)
    return message(b"B", payload[:portal_end] + cstring(statement) + payload[end:])


def authentication_ok() -> bytes:
    return message(b"R", _INT32.pack(0))


def authentication_sasl(mechanisms: tuple[str, ...] = ("SCRAM-SHA-256",)) -> bytes:
    return message(b"R", _INT32.pack(10) + b"".join(cstring(m) for m in mechanisms) + b"\x00")


def authentication_sasl_continue(data: bytes) -> bytes:
    return message(b"R", _INT32.pack(11) + data)


def authentication_sasl_final(data: bytes) -> bytes:
    return message(b"R", _INT32.pack(12) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", struct.pack("!II", pid, key))


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery with the transaction status: I (idle), T (in a transaction), E (failed)."""
    return message(b"Z", status)


def _fields(severity: str, sqlstate: str, text: str, extra: Mapping[str, str]) -> bytes:
    body = b"S" + cstring(severity) + b"V" + cstring(severity)
    body += b"C" + cstring(sqlstate) + b"M" + cstring(text)
    for code, value in extra.items():
        body += code.encode() + cstring(value)
    return body + b"\x00"


def error_response(sqlstate: str, text: str, *, severity: str = "ERROR", **extra: str) -> bytes:
    """An ErrorResponse; ``extra`` by field code: D (detail), H (hint), P (position)."""
    return message(b"E", _fields(severity, sqlstate, text, extra))


def notice_response(sqlstate: str, text: str, **extra: str) -> bytes:
    return message(b"N", _fields("NOTICE", sqlstate, text, extra))


def parse_error_fields(payload: bytes) -> dict[str, str]:
    """An ErrorResponse/NoticeResponse payload's fields by code (C: SQLSTATE, M: message...)."""
    fields: dict[str, str] = {}
    offset = 0
    while offset < len(payload) and payload[offset] != 0:
        code = chr(payload[offset])
        value, offset = read_cstring(payload, offset + 1)
        fields[code] = value
    return fields
