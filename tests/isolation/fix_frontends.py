"""Every front end that runs tenant SQL, behind one interface, so an attack is written once and
run through each: REST ``POST /api/v1/query``, gRPC ``Query`` (unary, what the client's
``fetch_all`` calls), gRPC ``ExecuteQuery`` (streamed) and gRPC ``ExecuteTransaction`` (the
PostgreSQL wire port joins here when it exists).

``front_end`` is parametrised over all of them; ``FrontEnd.run`` sends one statement as tenant A
(optionally with a user id, or as another tenant's token) and returns an ``Outcome`` with the
same fields whichever way it went, so assertions compare stable codes and SQLSTATEs, not
transport details. Every outcome is checked for the victim's secret before it is returned.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from tests.isolation.fix_attack import SECRET, Tenants

FRONT_ENDS = ("rest", "grpc_query", "grpc_stream", "grpc_transaction")
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
    ) -> None:
        self.name = name
        self._http = http
        self._target = grpc_target
        self._tenant_id = tenant_id
        self._token = token
        self._clients: dict[tuple[str, str | None, str], MultiDatabaseClient] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

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
            if self.name == "grpc_query":
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
    tenants: Tenants,
) -> AsyncIterator[FrontEnd]:
    """Tenant A (read, write and admin over itself only) through each front end in turn."""
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    door = FrontEnd(
        request.param,
        http=http,
        grpc_target=grpc_target,
        tenant_id=tenants.a.tenant_id,
        token=token,
    )
    yield door
    await door.close()
