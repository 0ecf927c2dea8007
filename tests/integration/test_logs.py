"""Structured logs through the real front ends: every line of a request carries its id (the
caller's X-Request-Id, or a new one, sent back either way), its tenant and service; a failed
authentication is logged with its reason and never with the token."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
from collections.abc import Iterator

import grpc
import httpx
import jwt
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.observability.logs import make_handler
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.fix_service import TenantFactory, TokenFactory

QUERY = "/api/v1/query"
EXECUTOR = "database_service.query.executor"
MIDDLEWARE = "database_service.api.http.middleware"


class Captured:
    """What the service's handler (JSON, redacted) wrote during a test."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[dict[str, str]]:
        return [json.loads(line) for line in self.text.splitlines()]

    def of_request(self, request_id: str, logger: str) -> list[dict[str, str]]:
        return [
            line
            for line in self.lines()
            if line.get("request_id") == request_id and line["logger"] == logger
        ]


@pytest.fixture
def logged() -> Iterator[Captured]:
    captured = Captured()
    handler = make_handler("json", captured.stream)
    root, service = logging.getLogger(), logging.getLogger("database_service")
    level = service.level
    root.addHandler(handler)
    service.setLevel(logging.INFO)  # as `serve` runs: the service's INFO lines shown
    yield captured
    root.removeHandler(handler)
    service.setLevel(level)


def request_id() -> str:
    return f"req-{secrets.token_hex(6)}"


async def forged_token(core: Application, service_headers: TokenFactory) -> str:
    """A token like a real one (same claims, audience, issuer) signed with another key."""
    headers = await service_headers(["*"], (Scope.READ,))
    real = headers["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(real, options={"verify_signature": False})
    return jwt.encode(claims, "not-the-service-key-" + "w" * 32, algorithm="HS256")


# --- gRPC -------------------------------------------------------------------------------------


async def test_a_grpc_call_logs_with_its_request_id_and_tenant_and_returns_the_id(
    logged: Captured,
    grpc_target: str,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = (await new_tenant("logs")).tenant_id
    token = (await service_headers([tenant]))["Authorization"]
    ok_id, failed_id = request_id(), request_id()
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = DatabaseServiceStub(channel)

        def metadata(rid: str) -> tuple[tuple[str, str], ...]:
            return (("authorization", token), ("x-tenant-id", tenant), ("x-request-id", rid))

        call = stub.Query(pb.QueryRequest(sql="SELECT 1"), metadata=metadata(ok_id), timeout=30)
        await call
        assert dict(await call.trailing_metadata())["x-request-id"] == ok_id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Query(
                pb.QueryRequest(sql="SELECT 1/0"), metadata=metadata(failed_id), timeout=30
            )
    trailing = dict(info.value.trailing_metadata() or ())
    assert trailing["x-request-id"] == failed_id  # with the error's own trailing metadata
    assert trailing["dbsvc-error-code"] == "data_exception"
    [line] = logged.of_request(failed_id, EXECUTOR)  # the query core's line about the error
    assert line["tenant"] == tenant and line["service"].startswith("svc-")
    assert line["message"].endswith("error: data_exception")


async def test_a_grpc_call_without_a_sane_request_id_gets_a_new_one(
    grpc_target: str, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    tenant = (await new_tenant("logs")).tenant_id
    token = (await service_headers([tenant]))["Authorization"]
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = DatabaseServiceStub(channel)
        for sent in (None, "x" * 129, "not sane"):
            metadata = [("authorization", token), ("x-tenant-id", tenant)]
            if sent is not None:
                metadata.append(("x-request-id", sent))
            call = stub.Query(pb.QueryRequest(sql="SELECT 1"), metadata=metadata, timeout=30)
            await call
            returned = dict(await call.trailing_metadata())["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", returned), sent


async def test_a_failed_grpc_authentication_never_logs_the_token(
    logged: Captured, grpc_target: str, core: Application, service_headers: TokenFactory
) -> None:
    forged = await forged_token(core, service_headers)
    rid = request_id()
    metadata = (
        ("authorization", f"Bearer {forged}"),
        ("x-tenant-id", "acme"),
        ("x-request-id", rid),
    )
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await DatabaseServiceStub(channel).Query(
                pb.QueryRequest(sql="SELECT 1"), metadata=metadata, timeout=30
            )
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert dict(info.value.trailing_metadata() or ())["x-request-id"] == rid
    [line] = logged.of_request(rid, "database_service.api.grpc.calls")
    assert line["level"] == "INFO"
    assert line["message"].startswith("authentication failed (grpc.Query from ")
    assert line["message"].endswith("invalid token: Signature verification failed")
    assert forged not in logged.text and forged.rsplit(".", 1)[1] not in logged.text


# --- HTTP -------------------------------------------------------------------------------------


async def test_a_failed_authentication_never_logs_the_token(
    logged: Captured, http: httpx.AsyncClient, core: Application, service_headers: TokenFactory
) -> None:
    forged = await forged_token(core, service_headers)
    rid = request_id()
    response = await http.post(
        QUERY,
        json={"sql": "SELECT 1", "tenant_id": "acme"},
        headers={"Authorization": f"Bearer {forged}", "X-Request-Id": rid},
    )
    assert response.status_code == 401
    assert response.headers["x-request-id"] == rid
    [line] = logged.of_request(rid, MIDDLEWARE)
    assert line["level"] == "INFO"
    assert line["message"].startswith("authentication failed (POST /api/v1/query from ")
    assert line["message"].endswith("invalid token: Signature verification failed")
    assert forged not in logged.text and forged.rsplit(".", 1)[1] not in logged.text


async def test_a_missing_token_is_logged_with_its_reason(
    logged: Captured, http: httpx.AsyncClient
) -> None:
    rid = request_id()
    response = await http.post(
        QUERY, json={"sql": "SELECT 1", "tenant_id": "acme"}, headers={"X-Request-Id": rid}
    )
    assert response.status_code == 401
    [line] = logged.of_request(rid, MIDDLEWARE)
    assert line["message"].endswith("missing credentials: send 'Authorization: Bearer <token>'")


async def test_an_http_request_gets_its_request_id_back(http: httpx.AsyncClient) -> None:
    rid = request_id()
    sent = await http.get("/api/v1/health", headers={"X-Request-Id": rid})
    assert sent.headers["x-request-id"] == rid
    for headers in ({}, {"X-Request-Id": "x" * 129}, {"X-Request-Id": 'a", "level": "ERROR'}):
        answered = await http.get("/api/v1/health", headers=headers)
        assert re.fullmatch(r"[0-9a-f]{32}", answered.headers["x-request-id"]), headers


async def test_http_lines_carry_the_request_id_tenant_and_service(
    logged: Captured,
    http: httpx.AsyncClient,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = (await new_tenant("logs")).tenant_id
    headers = await service_headers([tenant])
    rid = request_id()
    response = await http.post(
        QUERY,
        json={"sql": "SELECT 1/0", "tenant_id": tenant},
        headers={**headers, "X-Request-Id": rid},
    )
    assert response.status_code == 400 and response.headers["x-request-id"] == rid
    [line] = logged.of_request(rid, EXECUTOR)
    assert line["tenant"] == tenant and line["service"].startswith("svc-")
    assert line["message"].endswith("error: data_exception")
    assert headers["Authorization"].removeprefix("Bearer ") not in logged.text
