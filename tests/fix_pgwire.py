"""The PostgreSQL wire port on the session's service, and services to log in to it with."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from database_service.app import Application
from database_service.auth import Scope
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
