"""A raw PostgreSQL server connection logged in as a tenant's own role.

The port forwards bytes between its clients and these connections, so it cannot use asyncpg
(which owns its socket's protocol state). This is the minimum: connect (TCP or Unix socket, from
the service's DSN), log in with SCRAM-SHA-256 (cleartext if the server asks), keep the
server's parameters and its BackendKeyData (for cancel requests), and read messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from database_service.pgwire import codec
from database_service.pgwire.scram import ScramClient, ScramError

__all__ = ["MAX_PREPARED_BYTES", "BackendError", "PgAddress", "ServerConnection", "send_cancel"]

# Named statements' text a client may keep, and a server connection may hold prepared (54000
# past either): each is kept by the port (the client's Parse, to prepare it again on another
# server connection) and by PostgreSQL for the connection's life, and a client preparing
# distinct statements without end grew both without bound — the port worker's memory and a
# backend's, which every tenant shares. A server connection past half of it is closed when
# given back, not lent again.
MAX_PREPARED_BYTES = 32 * 1_048_576

_READ_CHUNK = 65536


class BackendError(Exception):
    """PostgreSQL refused the login or the connection broke; ``fields`` is its ErrorResponse."""

    def __init__(self, text: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.fields = fields or {"C": "08006", "M": text}


@dataclass(frozen=True, slots=True)
class PgAddress:
    """Where PostgreSQL listens and which database the tenants live in (from the DSN)."""

    host: str
    port: int
    database: str

    @classmethod
    def from_dsn(cls, dsn: str) -> PgAddress:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
        host = query.get("host", [parts.hostname or "localhost"])[0]
        port = int(query.get("port", [str(parts.port or 5432)])[0])
        database = unquote(parts.path.lstrip("/")) or "postgres"
        return cls(host, port, database)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.host.startswith("/"):
            return await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}")
        return await asyncio.open_connection(self.host, self.port)


@dataclass(eq=False)
class ServerConnection:
    """One logged-in server connection and what the port knows of its session."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int = 0
    key: int = 0
    parameters: dict[str, str] = field(default_factory=dict)
    # Session settings as the port last set them (ParameterStatus keeps the reported ones).
    applied: dict[str, str] = field(default_factory=dict)
    # Server-side names of the statements prepared on this connection (see server.py).
    prepared: set[str] = field(default_factory=set)
    # Who last parsed the unnamed statement here, and what: a client's Bind of "" after its
    # connection changed re-parses it.
    unnamed: tuple[int, bytes] | None = None
    # Cancel requests for this backend on their way to PostgreSQL: a connection given back
    # meanwhile is closed, not lent (the cancel would reach the next client's statement).
    cancelling: int = 0
    # The text of the named statements prepared here (each stays for the connection's life,
    # in the backend's memory): bounded by the port (``MAX_PREPARED_BYTES``).
    prepared_bytes: int = 0
    status: bytes = b"I"
    broken: bool = False
    # When it was opened and last went idle in its pool (time.monotonic), for the pool's
    # idle and age limits and the admin view.
    opened: float = field(default_factory=time.monotonic)
    idle_since: float = field(default_factory=time.monotonic)
    _buffer: bytearray = field(default_factory=bytearray)
    # Messages for the server not written yet: a client's Bind, Execute and Sync go out in one
    # write (one system call, one wake-up of the backend) when the port next waits for the
    # server, instead of one each.
    _out: bytearray = field(default_factory=bytearray)

    @classmethod
    async def connect(
        cls, address: PgAddress, role: str, password: str, settings: dict[str, str]
    ) -> ServerConnection:
        reader, writer = await address.open()
        conn = cls(reader, writer)
        try:
            await conn._login(address.database, role, password, settings)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _login(
        self, database: str, role: str, password: str, settings: dict[str, str]
    ) -> None:
        params = {"user": role, "database": database, **settings}
        body = struct.pack("!I", codec.PROTOCOL_3_0)
        body += b"".join(codec.cstring(k) + codec.cstring(v) for k, v in params.items()) + b"\x00"
        self.send(struct.pack("!I", len(body) + 4) + body)
        scram: ScramClient | None = None
        while True:
            kind, payload = await self.read_message()
            if kind == b"R":
                (code,) = struct.unpack_from("!I", payload)
                if code == 0:
                    continue
                if code == 10:
                    scram = ScramClient(password)
                    first = scram.first().encode()
                    self.send(
                        codec.message(
                            b"p",
                            codec.cstring("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first,
                        )
                    )
                elif code == 11 and scram is not None:
                    self.send(codec.message(b"p", scram.final(payload[4:].decode()).encode()))
                elif code == 12 and scram is not None:
                    try:
                        scram.verify(payload[4:].decode())
                    except ScramError as exc:
                        raise BackendError(f"PostgreSQL's SCRAM signature: {exc}") from None
                elif code == 3:
                    self.send(codec.message(b"p", codec.cstring(password)))
                else:
                    raise BackendError(f"unsupported authentication request {code}")
                await self.drain()
            elif kind == b"S":
                name, offset = codec.read_cstring(payload)
                value, _ = codec.read_cstring(payload, offset)
                self.parameters[name] = value
            elif kind == b"K":
                self.pid, self.key = struct.unpack_from("!II", payload)
            elif kind == b"E":
                fields = codec.parse_error_fields(payload)
                raise BackendError(fields.get("M", "login refused"), fields)
            elif kind == b"Z":
                self.status = payload[:1]
                self.applied = dict(self.parameters)
                return

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the server: written by ``flush``, at the latest before the port
        reads the server's answers (``read_message``, ``read_messages``, ``drain``)."""
        self._out += data

    def flush(self) -> None:
        if self._out:
            self.writer.write(bytes(self._out))
            self._out.clear()

    async def drain(self) -> None:
        self.flush()
        await self.writer.drain()

    async def read_message(self) -> tuple[bytes, bytes]:
        """One whole message (type byte, payload), for the login and the port's own queries."""
        self.flush()
        while True:
            if len(self._buffer) >= 5:
                kind, length = codec.split_header(bytes(self._buffer[:5]), 1 << 30)
                if len(self._buffer) >= 5 + length:
                    payload = bytes(self._buffer[5 : 5 + length])
                    del self._buffer[: 5 + length]
                    return kind, payload
            data = await self.reader.read(_READ_CHUNK)
            if not data:
                self.broken = True
                raise BackendError("PostgreSQL closed the connection")
            self._buffer += data

    async def read_messages(self) -> list[tuple[bytes, bytes]]:
        """Every whole message the server has sent so far (at least one), each as its type
        byte and its raw bytes (header included), to forward untouched."""
        self.flush()
        out: list[tuple[bytes, bytes]] = []
        while not out:
            buffer = self._buffer
            offset, size = 0, len(buffer)
            while size - offset >= 5:
                length = int.from_bytes(buffer[offset + 1 : offset + 5])
                if length < 4:
                    raise BackendError("PostgreSQL sent an invalid message length")
                end = offset + 1 + length
                if end > size:
                    break
                out.append((bytes(buffer[offset : offset + 1]), bytes(buffer[offset:end])))
                offset = end
            del buffer[:offset]
            if out:
                return out
            data = await self.reader.read(_READ_CHUNK)
            if not data:
                self.broken = True
                raise BackendError("PostgreSQL closed the connection")
            buffer += data
        return out

    async def simple(self, sql: str) -> dict[str, str] | None:
        """Run the port's own SQL (simple protocol) and read to ReadyForQuery: the first error's
        fields, or None. A simple Query drops the server's unnamed statement."""
        self.send(codec.message(b"Q", codec.cstring(sql)))
        self.unnamed = None
        error: dict[str, str] | None = None
        while True:
            kind, payload = await self.read_message()
            if kind == b"E" and error is None:
                error = codec.parse_error_fields(payload)
            elif kind == b"S":
                name, offset = codec.read_cstring(payload)
                self.applied[name] = codec.read_cstring(payload, offset)[0]
            elif kind == b"Z":
                self.status = payload[:1]
                return error

    async def begin_with(
        self, begin: str, sql: str, params: tuple[bytes, ...]
    ) -> dict[str, str] | None:
        """``begin`` (simple protocol), then ``sql`` with text parameters (extended protocol,
        so the values never appear in a statement's text), pipelined in one round trip: the
        first error's fields, or None. The server's unnamed statement is the port's afterwards."""
        values = b"".join(struct.pack("!i", len(p)) + p for p in params)
        self.send(
            codec.message(b"Q", codec.cstring(begin))
            + codec.message(b"P", b"\x00" + codec.cstring(sql) + b"\x00\x00")
            + codec.message(
                b"B", b"\x00\x00\x00\x00" + struct.pack("!H", len(params)) + values + b"\x00\x00"
            )
            + codec.message(b"E", b"\x00\x00\x00\x00\x00")
            + codec.message(b"S")
        )
        self.unnamed = None
        error: dict[str, str] | None = None
        ready = 0
        while ready < 2:
            kind, payload = await self.read_message()
            if kind == b"E" and error is None:
                error = codec.parse_error_fields(payload)
            elif kind == b"S":
                name, offset = codec.read_cstring(payload)
                self.applied[name] = codec.read_cstring(payload, offset)[0]
            elif kind == b"Z":
                self.status = payload[:1]
                ready += 1
        return error

    def close(self) -> None:
        self.broken = True
        self._out.clear()
        with contextlib.suppress(Exception):
            self.writer.write(codec.message(b"X"))
        with contextlib.suppress(Exception):
            self.writer.close()


async def send_cancel(address: PgAddress, pid: int, key: int) -> None:
    """Ask PostgreSQL to cancel what backend ``pid`` runs (a connection of its own, no login)."""
    reader, writer = await address.open()
    try:
        writer.write(struct.pack("!IIII", 16, codec.CANCEL_REQUEST_CODE, pid, key))
        await writer.drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(reader.read(1), 5)  # the server closes when done
    finally:
        writer.close()
