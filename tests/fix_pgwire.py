"""The PostgreSQL wire port on the session's service, and services to log in to it with."""

from __future__ import annotations

import asyncio
import secrets
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire import codec
from database_service.pgwire.scram import ScramClient
from database_service.pgwire.server import PgWireServer


@dataclass(frozen=True)
class PortLogin:
    """What a PostgreSQL client needs to reach one tenant as one service."""

    host: str
    port: int
    service: str
    secret: str
    tenant_id: str

    @property
    def dsn(self) -> str:
        return (
            f"postgresql://{self.service}:{self.secret}@{self.host}:{self.port}/{self.tenant_id}"
            "?sslmode=disable"
        )


@pytest.fixture(scope="session")
async def pgwire(core: Application) -> AsyncIterator[PgWireServer]:
    server = PgWireServer(core, host="127.0.0.1", port=0, max_per_tenant=4)
    await server.start()
    yield server
    await server.close()


@dataclass(frozen=True)
class TlsPort:
    """The port with the service's certificate (a dev CA's), and a client context trusting it."""

    server: PgWireServer
    client_context: ssl.SSLContext

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="session")
async def pgwire_tls(
    core: Application, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TlsPort]:
    from database_service.tls import CertificateFiles, make_dev_certificates
    from database_service.tls.servers import http_ssl_context

    certs = make_dev_certificates(tmp_path_factory.mktemp("pgwire-tls"))
    files = CertificateFiles(certs.server_cert, certs.server_key)
    server = PgWireServer(
        core, host="127.0.0.1", port=0, ssl_context=http_ssl_context(files), max_per_tenant=4
    )
    await server.start()
    yield TlsPort(server, ssl.create_default_context(cafile=str(certs.ca_cert)))
    await server.close()


PortLoginFactory = Callable[..., Awaitable[PortLogin]]


@pytest.fixture(scope="session")
def port_login(core: Application, pgwire: PgWireServer) -> PortLoginFactory:
    """A new service with a secret for ``tenants`` and ``scopes``, logging in for ``tenant``."""

    async def make(
        tenant_id: str,
        scopes: tuple[Scope, ...] = (Scope.READ, Scope.WRITE, Scope.ADMIN),
        tenants: list[str] | None = None,
    ) -> PortLogin:
        name = f"pg-{secrets.token_hex(4)}"
        _, secret = await core.services.register(
            name, tenants=tenants or [tenant_id], scopes=scopes
        )
        assert secret is not None
        return PortLogin("127.0.0.1", pgwire.port, name, secret, tenant_id)

    return make


class RawClient:
    """A PostgreSQL client at the byte level, to send what no driver would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.backend_key: tuple[int, int] = (0, 0)

    @classmethod
    async def open(cls, pgwire: PgWireServer) -> RawClient:
        return cls(*await asyncio.open_connection("127.0.0.1", pgwire.port))

    @classmethod
    async def logged_in(cls, pgwire: PgWireServer, login: PortLogin) -> RawClient:
        """A client past its login (ReadyForQuery seen)."""
        client = await cls.open(pgwire)
        seen = await client.login(login)
        assert seen[-1][:1] == b"Z", seen
        return client

    async def startup(self, user: str, database: str) -> None:
        body = struct.pack("!I", codec.PROTOCOL_3_0)
        body += codec.cstring("user") + codec.cstring(user)
        body += codec.cstring("database") + codec.cstring(database) + b"\x00"
        self.writer.write(struct.pack("!I", len(body) + 4) + body)

    async def login(self, login: PortLogin, *, password: str | None = None) -> list[bytes]:
        """Log in; the messages up to ReadyForQuery, or up to the ErrorResponse that ended it."""
        await self.startup(login.service, login.tenant_id)
        kind, payload = await self.read()
        if kind == b"E":
            return [kind + payload]
        assert kind == b"R" and payload[:4] == struct.pack("!I", 10), (kind, payload)
        scram = ScramClient(login.secret if password is None else password)
        first = scram.first().encode()
        self.send(b"p", codec.cstring("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first)
        kind, payload = await self.read()
        if kind == b"E":
            return [kind + payload]
        self.send(b"p", scram.final(payload[4:].decode()).encode())
        seen = []
        while True:
            kind, payload = await self.read()
            seen.append(kind + payload)
            if kind == b"K":
                self.backend_key = struct.unpack("!II", payload)
            if kind in b"ZE":
                return seen

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        self.writer.write(codec.message(kind, payload))

    async def read(self) -> tuple[bytes, bytes]:
        header = await asyncio.wait_for(self.reader.readexactly(5), 10)
        length = struct.unpack("!I", header[1:])[0] - 4
        return header[:1], await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def until_ready(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            kind, payload = await self.read()
            out.append((kind, payload))
            if kind == b"Z":
                return out

    async def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(b"Q", codec.cstring(sql))
        return await self.until_ready()

    def close(self) -> None:
        self.writer.close()


def sqlstates(messages: list[tuple[bytes, bytes]]) -> list[str]:
    return [codec.parse_error_fields(p)["C"] for k, p in messages if k == b"E"]
