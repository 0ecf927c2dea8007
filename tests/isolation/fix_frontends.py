"""Every front end that runs tenant SQL, behind one interface, so an attack is written once and
run through each: REST ``POST /api/v1/query``, gRPC ``Query`` (unary, what the client's
``fetch_all`` calls), gRPC ``ExecuteQuery`` (streamed), gRPC ``ExecuteTransaction`` and the
PostgreSQL wire port (asyncpg logging in with SCRAM as a service holding tenant A, the user id
as the ``dbsvc.user_id`` startup parameter; with another token, as user ``token`` over TLS).

``front_end`` is parametrised over all of them; ``FrontEnd.run`` sends one statement as tenant A
(optionally with a user id, or as another tenant's token) and returns an ``Outcome`` with the
same fields whichever way it went, so assertions compare stable codes and SQLSTATEs, not
transport details. Every outcome is checked for the victim's secret before it is returned.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.errors import DatabaseServiceError as ServiceError
from database_service.errors import QueryError
from database_service.pgwire.server import CODE_PREFIX, TOKEN_USER
from database_service.query.values import coerce_params
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from tests.fix_pgwire import PortLogin, PortLoginFactory, TlsPort
from tests.isolation.fix_attack import SECRET, Tenants

# grpc_query goes through the compiled gRPC front (api/grpc/front.py), grpc_stream and
# grpc_transaction through it to grpcio; grpcio_query is grpcio serving the port itself (as it
# does with TLS or tracing on).
FRONT_ENDS = ("rest", "grpc_query", "grpcio_query", "grpc_stream", "grpc_transaction", "pgwire")
# What a caller sent wrong, in either transport's words; anything else failing is the server's.
_SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}


@dataclass
class Outcome:
    front_end: str
    ok: bool
    rows: list[list[Any]] = field(default_factory=list)
    code: str | None = None  # the service's stable error code
    sqlstate: str | None = None
    message: str = ""
    status: str = "OK"  # gRPC status name, or the HTTP status as text

    @property
    def server_error(self) -> bool:
        return self.status in _SERVER_ERRORS or (
            self.status.startswith("5") and self.status != "503"
        )

    @property
    def refused(self) -> bool:
        return not self.ok and not self.server_error

    def values(self) -> set[Any]:
        return {value for row in self.rows for value in row}


class FrontEnd:
    """Tenant A's door to the service through one front end."""

    def __init__(
        self,
        name: str,
        *,
        http: httpx.AsyncClient,
        grpc_target: str,
        tenant_id: str,
        token: str,
        port: PortLogin | None = None,
        tls_port: TlsPort | None = None,
        port_login: PortLoginFactory | None = None,
    ) -> None:
        self.name = name
        self._http = http
        self._target = grpc_target
        self._tenant_id = tenant_id
        self._token = token
        self._port = port
        self._tls_port = tls_port
        self._port_login = port_login
        self._clients: dict[tuple[str, str | None, str], MultiDatabaseClient] = {}
        self._connections: dict[tuple[str, str | None, str], asyncpg.Connection] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        for conn in self._connections.values():
            await conn.close()

    async def for_tenant(
        self, core: Application, tenant_id: str, scopes: Sequence[Scope]
    ) -> FrontEnd:
        """The same front end, as a new service holding ``tenant_id`` with ``scopes``."""
        token = await service_token(core, [tenant_id], scopes)
        port = None
        if self._port_login is not None and self.name == "pgwire":
            port = await self._port_login(tenant_id, tuple(scopes))
        return FrontEnd(
            self.name,
            http=self._http,
            grpc_target=self._target,
            tenant_id=tenant_id,
            token=token,
            port=port,
            tls_port=self._tls_port,
            port_login=self._port_login,
        )

    def _client(self, tenant_id: str, user_id: str | None, token: str) -> MultiDatabaseClient:
        key = (tenant_id, user_id, token)
        if key not in self._clients:
            context = {"company_id": tenant_id, **({"user_id": user_id} if user_id else {})}
            self._clients[key] = MultiDatabaseClient(
                self._target, context, token, timeout=60, retries=0
            )
        return self._clients[key]

    async def run(
        self,
        sql: str,
        *params: Any,
        user_id: str | None = None,
        tenant_id: str | None = None,
        token: str | None = None,
    ) -> Outcome:
        tenant_id = tenant_id or self._tenant_id
        token = token or self._token
        if self.name == "rest":
            outcome = await self._rest(sql, params, user_id, tenant_id, token)
        elif self.name == "pgwire":
            outcome = await self._pgwire(sql, params, user_id, tenant_id, token)
        else:
            outcome = await self._grpc(sql, params, user_id, tenant_id, token)
        assert SECRET not in repr(outcome), f"victim data leaked through {self.name}: {outcome}"
        return outcome

    async def _rest(
        self, sql: str, params: Sequence[Any], user_id: str | None, tenant_id: str, token: str
    ) -> Outcome:
        body: dict[str, Any] = {"sql": sql, "params": list(params), "tenant_id": tenant_id}
        if user_id is not None:
            body["user_id"] = user_id
        response = await self._http.post(
            "/api/v1/query", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        status = str(response.status_code)
        try:
            document = response.json()
        except ValueError:
            return Outcome(self.name, False, message=response.text, status=status)
        if response.status_code == 200:
            return Outcome(self.name, True, rows=document["rows"], status=status)
        error = document.get("error", {})
        return Outcome(
            self.name,
            False,
            code=error.get("code"),
            sqlstate=error.get("sqlstate"),
            message=error.get("message", response.text),
            status=status,
        )

    async def _grpc(
        self, sql: str, params: Sequence[Any], user_id: str | None, tenant_id: str, token: str
    ) -> Outcome:
        client = self._client(tenant_id, user_id, token)
        try:
            if self.name in ("grpc_query", "grpcio_query"):
                rows = [list(r) for r in (await client.fetch_all(sql, list(params))).rows]
            elif self.name == "grpc_stream":
                rows = [list(r) async for r in client.execute_query(sql, list(params))]
            else:
                results = await client.transaction([(sql, list(params))])
                rows = [list(r) for r in results[-1].rows]
        except DatabaseServiceError as exc:
            return Outcome(
                self.name,
                False,
                code=exc.code,
                sqlstate=exc.sqlstate,
                message=exc.message,
                status=exc.status.name,
            )
        return Outcome(self.name, True, rows=rows)

    async def _connection(
        self, tenant_id: str, user_id: str | None, token: str
    ) -> asyncpg.Connection:
        """One connection per (tenant, user id, credentials): tenant A's service by SCRAM, or
        any other token as the password of user ``token`` over TLS."""
        key = (tenant_id, user_id, token)
        conn = self._connections.get(key)
        if conn is not None and not conn.is_closed():
            return conn
        assert self._port is not None and self._tls_port is not None
        settings = {"dbsvc.user_id": user_id} if user_id is not None else {}
        if token == self._token:
            conn = await asyncpg.connect(
                host=self._port.host, port=self._port.port, user=self._port.service,
                password=self._port.secret, database=tenant_id, ssl=False,
                server_settings=settings, statement_cache_size=0,
            )  # fmt: skip
        else:
            conn = await asyncpg.connect(
                host=self._port.host, port=self._tls_port.port, user=TOKEN_USER, password=token,
                database=tenant_id, ssl=self._tls_port.client_context,
                server_settings=settings, statement_cache_size=0,
            )  # fmt: skip
        self._connections[key] = conn
        return conn

    async def _pgwire(
        self, sql: str, params: Sequence[Any], user_id: str | None, tenant_id: str, token: str
    ) -> Outcome:
        """The statement prepared by asyncpg (extended protocol), its JSON-shaped parameters
        coerced to the statement's types as the query core does."""
        try:
            conn = await self._connection(tenant_id, user_id, token)
            # The connection's user id again (a statement before may have changed it: the port
            # keeps SET dbsvc.user_id per client and answers it itself).
            await conn.execute(
                f"SET dbsvc.user_id = '{user_id}'" if user_id else "RESET dbsvc.user_id"
            )
            stmt = await conn.prepare(sql)
            args = coerce_params(list(params), stmt.get_parameters())
            records = await stmt.fetch(*args)
        except asyncpg.PostgresError as exc:
            return _port_outcome(self.name, exc)
        except ServiceError as exc:  # the parameters did not coerce, as the query core says
            return Outcome(self.name, False, code=exc.error_code, message=exc.message, status="400")
        except (asyncpg.InterfaceError, asyncpg.exceptions.DataError, ValueError) as exc:
            return Outcome(
                self.name, False, code="invalid_parameters", message=str(exc), status="400"
            )
        return Outcome(self.name, True, rows=[list(r.values()) for r in records])


def _port_outcome(name: str, exc: asyncpg.PostgresError) -> Outcome:
    """The port's ErrorResponse as an Outcome: the stable code from the routine field when the
    port refused (``dbsvc:<code>``), else the SQLSTATE's as the service maps it."""
    sqlstate = exc.sqlstate
    routine = getattr(exc, "server_source_function", None) or ""
    mapped = QueryError("", sqlstate=sqlstate)
    if routine.startswith(CODE_PREFIX):
        code = routine.removeprefix(CODE_PREFIX)
        status = _HTTP_STATUS.get(code, mapped.status)
    else:
        code, status = mapped.error_code, mapped.status
    # The HTTP status the REST front end gives the same code, so assertions on the kind of
    # failure (caller's fault or the server's) read the same for every front end.
    return Outcome(name, False, code=code, sqlstate=sqlstate, message=str(exc), status=str(status))


def _error_classes(base: type[ServiceError]) -> Iterator[type[ServiceError]]:
    yield base
    for sub in base.__subclasses__():
        yield from _error_classes(sub)


_HTTP_STATUS = {
    cls.code: cls.http_status for cls in _error_classes(ServiceError) if cls is not QueryError
}


async def service_token(
    core: Application, tenants: list[str], scopes: Sequence[Scope], *, ttl: int = 3600
) -> str:
    """A token for a freshly registered service holding ``tenants`` and ``scopes``."""
    name = f"fe-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=tenants, scopes=scopes, with_secret=False)
    return core.tokens.issue(name, tenants=tenants, scopes=scopes, ttl_seconds=ttl)


@pytest.fixture(params=FRONT_ENDS)
async def front_end(
    request: pytest.FixtureRequest,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    grpcio_target: str,
    tenants: Tenants,
    port_login: PortLoginFactory,
    pgwire_tls: TlsPort,
) -> AsyncIterator[FrontEnd]:
    """Tenant A (read, write and admin over itself only) through each front end in turn."""
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    token = await service_token(core, [tenants.a.tenant_id], scopes)
    port = await port_login(tenants.a.tenant_id, scopes) if request.param == "pgwire" else None
    door = FrontEnd(
        request.param,
        http=http,
        grpc_target=grpcio_target if request.param == "grpcio_query" else grpc_target,
        tenant_id=tenants.a.tenant_id,
        token=token,
        port=port,
        tls_port=pgwire_tls,
        port_login=port_login,
    )
    yield door
    await door.close()
