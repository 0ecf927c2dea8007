"""Requests the service cannot decode, routes that do not exist, and bugs inside the service: each
ends in the documented error shape with a stable code (never a framework's default body, never
gRPC UNKNOWN), and the undecodable and the unexpected are audited.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from database_service_client import InternalError, MultiDatabaseClient
from database_service_client._proto import database_service_pb2 as pb
from tests.fix_service import ADMIN_TOKEN, ClientFactory, TenantFactory

SERVICE = "/database_service.v1.DatabaseService"
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string in each request below): invalid UTF-8


def internal_errors(core: Application) -> float:
    value = core.metrics.registry.get_sample_value("dbsvc_errors_total", {"code": "internal"})
    return value or 0.0


async def audit_since(
    http: httpx.AsyncClient, since: dt.datetime, **match: str
) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    events = (
        await http.get("/api/v1/admin/audit", params={"limit": 1000}, headers=headers)
    ).json()["events"]
    return [
        e
        for e in events
        if dt.datetime.fromisoformat(e["at"]) >= since and all(e[k] == v for k, v in match.items())
    ]


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("errs")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> MultiDatabaseClient:
    return await client_for(tenant, (Scope.READ, Scope.WRITE), retries=0)


# --- REST ----------------------------------------------------------------------------------


async def test_unknown_route_answers_the_documented_error_shape(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/v1/no-such-thing")
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == "not_found"
    assert body["error"]["message"]


async def test_wrong_method_answers_method_not_allowed(http: httpx.AsyncClient) -> None:
    response = await http.delete("/api/v1/query")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize(
    "body",
    [b'{"sql": "SELECT \xff"}', b"\xff\xfe\x00", b'{"sql": ', b"[1, 2"],
    ids=["invalid UTF-8 in a string", "not UTF-8 at all", "truncated JSON", "not an object"],
)
async def test_undecodable_body_is_invalid_request(
    http: httpx.AsyncClient, admin_headers: dict[str, str], body: bytes
) -> None:
    response = await http.post(
        "/api/v1/query",
        content=body,
        headers={**admin_headers, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_request"


async def test_unexpected_exception_is_a_json_500_logged_counted_and_audited(
    http: httpx.AsyncClient,
    core: Application,
    admin_headers: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise RuntimeError("kaboom: internal detail")

    monkeypatch.setattr(core.registry, "list", broken)
    since, before = dt.datetime.now(dt.UTC), internal_errors(core)
    with caplog.at_level(logging.ERROR):
        response = await http.get("/api/v1/admin/tenants", headers=admin_headers)
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal"
    assert "kaboom" not in response.text
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)
    assert internal_errors(core) == before + 1
    events = await audit_since(http, since, outcome="error", code="internal")
    assert any("/api/v1/admin/tenants" in e["action"] for e in events)


# --- gRPC ----------------------------------------------------------------------------------


def raw_requests(*messages: bytes) -> Iterator[bytes]:
    yield from messages


BULK_FIRST = pb.BulkInsertRequest(
    table="users",
    columns=["user_id", "email", "subscription_tier"],
    rows=[pb.Row(values=[pb.Value(string_value=v) for v in ("u1", "u1@x", "pro")])],
).SerializeToString()

UNDECODABLE = {
    "ExecuteQuery": ("unary_stream", BAD_UTF8),
    "ExecuteQuery garbage": ("unary_stream", b"\x0a\xff\xff\xff\xff\x0f"),
    "ExecuteTransaction": ("unary_unary", b"\x0a\x04" + BAD_UTF8),
    "CreateTenantSchema": ("unary_unary", BAD_UTF8),
    "ManagePartitions": ("unary_unary", BAD_UTF8),
    "BulkInsert first message": ("stream_unary", [BAD_UTF8]),
    "BulkInsert later message": ("stream_unary", [BULK_FIRST, BAD_UTF8]),
    "BulkUpdate": ("stream_unary", [BAD_UTF8]),
}


@pytest.mark.parametrize(("kind", "payload"), UNDECODABLE.values(), ids=UNDECODABLE.keys())
async def test_undecodable_request_is_invalid_argument_and_audited(
    grpc_target: str,
    http: httpx.AsyncClient,
    client: MultiDatabaseClient,
    core: Application,
    tenant: TenantRecord,
    request: pytest.FixtureRequest,
    kind: str,
    payload: Any,
) -> None:
    method = request.node.callspec.id.split(" ")[0]
    since = dt.datetime.now(dt.UTC)
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        call_type = getattr(channel, kind)
        rpc = call_type(f"{SERVICE}/{method}", request_serializer=lambda b: b)
        metadata = client._metadata()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            if kind == "unary_stream":
                async for _ in rpc(payload, metadata=metadata, timeout=30):
                    pass
            elif kind == "stream_unary":
                await rpc(raw_requests(*payload), metadata=metadata, timeout=30)
            else:
                await rpc(payload, metadata=metadata, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert dict(info.value.trailing_metadata() or ())["dbsvc-error-code"] == "invalid_request"
    assert await audit_since(http, since, code="invalid_request")
    assert (await client.fetch_all("SELECT count(*) FROM users")).rows == [(0,)]


async def test_unexpected_exception_in_a_unary_rpc_is_internal_and_audited(
    client: MultiDatabaseClient,
    core: Application,
    http: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaboom: internal detail")

    monkeypatch.setattr(core.health, "document", broken)
    since, before = dt.datetime.now(dt.UTC), internal_errors(core)
    with caplog.at_level(logging.ERROR), pytest.raises(InternalError) as info:
        await client.health()
    assert info.value.status is grpc.StatusCode.INTERNAL and info.value.code == "internal"
    assert "kaboom" not in info.value.message
    assert any(r.exc_info and "kaboom" in str(r.exc_info[1]) for r in caplog.records)
    assert internal_errors(core) == before + 1
    events = await audit_since(http, since, outcome="error", code="internal")
    assert any("HealthCheck" in e["action"] for e in events)


async def test_unexpected_exception_in_a_streaming_rpc_is_internal(
    client: MultiDatabaseClient, core: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> AsyncIterator[Any]:
        raise RuntimeError("kaboom: internal detail")
        yield  # an async generator, like the real one

    monkeypatch.setattr(core.executor, "stream", broken)
    with pytest.raises(InternalError) as info:
        await client.execute_query("SELECT 1").fetch_all()  # ExecuteQuery, streamed
    assert info.value.code == "internal" and "kaboom" not in info.value.message


async def test_unexpected_exception_in_a_unary_query_is_internal(
    client: MultiDatabaseClient, core: Application, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("kaboom: internal detail")

    monkeypatch.setattr(core.executor, "execute", broken)
    with pytest.raises(InternalError) as info:
        await client.fetch_all("SELECT 1")  # Query, unary
    assert info.value.code == "internal" and "kaboom" not in info.value.message
