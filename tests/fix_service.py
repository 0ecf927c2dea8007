"""The service core and its HTTP front end on the session's PostgreSQL, plus tenants and
service tokens to test with."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.tenancy import TenantLimits, TenantRecord
from database_service_client import MultiDatabaseClient
from tests.fix_pg import PgCluster

ADMIN_TOKEN = "test-admin-token-" + "x" * 24
MASTER_KEY = "test-master-key-" + "k" * 32


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``database-service`` command beside the test's service: the same
    PostgreSQL, names and secrets."""
    assert settings.postgres_url is not None
    return {
        **os.environ,
        "DBSVC_POSTGRES_URL": settings.postgres_url.get_secret_value(),
        "DBSVC_DATA_DIR": str(settings.data_dir),
        "DBSVC_TENANT_ROLE_PREFIX": settings.tenant_role_prefix,
        "DBSVC_TENANT_GROUP_ROLE": settings.tenant_group_role,
        "DBSVC_MASTER_KEY": MASTER_KEY,
        "DBSVC_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
        "DBSVC_NATS_EMBEDDED": "false",
        # Tests read the CLI's lines through a pipe, where "auto" would pick JSON.
        "DBSVC_LOG_FORMAT": "text",
        **extra,
    }


def make_settings(cluster: PgCluster, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "postgres_url": cluster.dsn,
        "data_dir": data_dir,
        "tenant_role_prefix": cluster.role_prefix,
        "tenant_group_role": cluster.group_role,
        "master_key": MASTER_KEY,
        "bootstrap_admin_token": ADMIN_TOKEN,
        "nats_embedded": False,
        "pool_idle_seconds": 30.0,
        "max_sql_bytes": 64 * 1024,
        "max_request_bytes": 256 * 1024,
        "max_result_rows": 5000,
        "grpc_port": 0,
        "grpc_shutdown_grace_seconds": 1.0,
    }
    values.update(overrides)
    return Settings.load(**values)


@pytest.fixture(scope="session")
def settings(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(pg_cluster, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
async def core(settings: Settings) -> AsyncIterator[Application]:
    async with Application(settings, start_nats=False) as app:
        yield app


@pytest.fixture(scope="session")
async def http(core: Application) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_http_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as client:
        yield client


@pytest.fixture(scope="session")
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="session")
async def grpc_target(core: Application) -> AsyncIterator[str]:
    """The gRPC port as ``serve`` has it: the compiled front, grpcio behind it."""
    async with GrpcServer(core) as server:
        assert server.front is not None, "dbsvc_wire is not built (make install builds it)"
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
async def grpcio_target(core: Application) -> AsyncIterator[str]:
    """The gRPC port served by grpcio itself (as with TLS or tracing on)."""
    async with GrpcServer(core, front=False) as server:
        yield f"127.0.0.1:{server.port}"


ClientFactory = Callable[..., Awaitable[MultiDatabaseClient]]


@pytest.fixture
async def client_for(core: Application, grpc_target: str) -> AsyncIterator[ClientFactory]:
    """A MultiDatabaseClient for a tenant, with a token for a new service holding ``scopes``."""
    clients: list[MultiDatabaseClient] = []

    async def make(
        tenant: TenantRecord | str,
        scopes: tuple[Scope, ...] = (Scope.READ, Scope.WRITE),
        *,
        user_id: str | None = None,
        token_tenants: list[str] | None = None,
        **options: Any,
    ) -> MultiDatabaseClient:
        tenant_id = tenant if isinstance(tenant, str) else tenant.tenant_id
        name = f"grpc-{secrets.token_hex(4)}"
        allowed = token_tenants or [tenant_id]
        await core.services.register(name, tenants=allowed, scopes=scopes, with_secret=False)
        token = core.tokens.issue(name, tenants=allowed, scopes=scopes, ttl_seconds=600)
        context = {"company_id": tenant_id, **({"user_id": user_id} if user_id else {})}
        client = MultiDatabaseClient(grpc_target, context, token, **options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


TenantFactory = Callable[..., Awaitable[TenantRecord]]


@pytest.fixture
def new_tenant(core: Application) -> TenantFactory:
    """Create a tenant with a unique id (prefix it for readability)."""

    async def create(prefix: str = "t", limits: TenantLimits | None = None) -> TenantRecord:
        return await core.tenants.create(f"{prefix}_{secrets.token_hex(4)}", limits)

    return create


TokenFactory = Callable[..., Awaitable[dict[str, str]]]


@pytest.fixture
def service_headers(core: Application) -> TokenFactory:
    """Headers for a freshly registered service acting for ``tenants`` with ``scopes``."""

    async def make(
        tenants: list[str], scopes: tuple[Scope, ...] = (Scope.READ, Scope.WRITE), **extra: str
    ) -> dict[str, str]:
        name = f"svc-{secrets.token_hex(4)}"
        await core.services.register(name, tenants=tenants, scopes=scopes, with_secret=False)
        token = core.tokens.issue(name, tenants=tenants, scopes=scopes, ttl_seconds=600)
        return {"Authorization": f"Bearer {token}", **extra}

    return make
