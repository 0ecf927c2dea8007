"""Key-value operations for services (the seed's ``"dragonflydb"`` store) through every front end:
gRPC ``KeyValue`` (the client's ``kv_*`` and ``execute_multi_db_operation``) and REST
``POST /api/v1/kv/{operation}``, on the session's service (no Redis: the embedded store) and on
a service configured with a real Redis (tests/fix_redis.py)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from database_service.api.grpc import GrpcServer
from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.cache import RedisKeyValueStore
from database_service.errors import InvalidParameters, PermissionDenied, Unavailable
from database_service.query import TenantContext
from database_service.tenancy import TenantRecord
from database_service_client import (
    FailedPrecondition as ClientFailedPrecondition,
)
from database_service_client import (
    InvalidArgument,
    MultiDatabaseClient,
)
from database_service_client import (
    PermissionDenied as ClientPermissionDenied,
)
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.fix_pg import PgCluster
from tests.fix_service import ClientFactory, TenantFactory, TokenFactory, make_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("kv")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> MultiDatabaseClient:
    return await client_for(tenant, (Scope.READ, Scope.WRITE))


# -- gRPC through the client ------------------------------------------------------------------


async def test_the_client_runs_every_operation(client: MultiDatabaseClient) -> None:
    assert await client.kv_get("position:EURUSD") is None
    await client.kv_set("position:EURUSD", '{"qty": 3}')
    assert await client.kv_get("position:EURUSD") == b'{"qty": 3}'
    await client.kv_set(b"\x00\xffbin", b"\x00\x01\x02")
    assert await client.kv_get(b"\x00\xffbin") == b"\x00\x01\x02"
    await client.kv_set("empty", b"")
    assert await client.kv_get("empty") == b""  # found, empty: not None
    assert await client.kv_incr("orders") == 1
    assert await client.kv_incr("orders", 41) == 42
    assert await client.kv_incr("orders", -50) == -8
    assert await client.kv_incr("zero", 0) == 0
    assert await client.kv_mget(["position:EURUSD", "missing", "orders", b"\x00\xffbin"]) == [
        b'{"qty": 3}',
        None,
        b"-8",
        b"\x00\x01\x02",
    ]
    assert await client.kv_mget([]) == []
    assert await client.kv_delete("orders")
    assert not await client.kv_delete("orders")
    assert await client.kv_get("orders") is None


async def test_ttls_expire_keys(client: MultiDatabaseClient) -> None:
    await client.kv_set("short", "v", ttl=dt.timedelta(milliseconds=80))
    await client.kv_set("kept", "v")
    assert await client.kv_expire("kept", dt.timedelta(milliseconds=80))
    assert not await client.kv_expire("never-set", dt.timedelta(seconds=1))
    assert await client.kv_get("short") == b"v"
    await asyncio.sleep(0.2)
    assert await client.kv_mget(["short", "kept"]) == [None, None]
    # incr keeps a key's TTL, as Redis does.
    await client.kv_set("counter", "1", ttl=dt.timedelta(milliseconds=150))
    assert await client.kv_incr("counter") == 2
    await asyncio.sleep(0.3)
    assert await client.kv_get("counter") is None
    with pytest.raises(ValueError, match="positive"):
        await client.kv_set("k", "v", ttl=dt.timedelta(0))


async def test_errors_have_stable_codes(client: MultiDatabaseClient) -> None:
    await client.kv_set("text", "abc")
    with pytest.raises(ClientFailedPrecondition) as info:
        await client.kv_incr("text")
    assert info.value.code == "failed_precondition"
    assert await client.kv_get("text") == b"abc"  # not overwritten
    await client.kv_set("max", str(2**63 - 1))
    with pytest.raises(ClientFailedPrecondition):
        await client.kv_incr("max")
    for call, code in [
        (client.kv_get("k" * 1025), "invalid_parameters"),
        (client.kv_get(""), "invalid_parameters"),
        (client.kv_set("big", b"x" * (1024 * 1024 + 1)), "payload_too_large"),
        (client.kv_mget(["k"] * 1001), "invalid_parameters"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            await call
        assert refused.value.code == code


async def test_raw_requests_are_checked(
    client: MultiDatabaseClient, grpc_target: str, tenant: TenantRecord
) -> None:
    """What the client never sends: no operation, fields the operation does not take, a zero
    or huge TTL."""
    metadata = client._metadata()
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = DatabaseServiceStub(channel)
        for request in [
            pb.KeyValueRequest(key=b"k"),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_GET, key=b"k", value=b"v"),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_GET, key=b"k", keys=[b"k"]),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_MGET, key=b"k", keys=[b"k"]),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_SET, key=b"k"),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_SET, key=b"k", value=b"", ttl_ms=0),
            pb.KeyValueRequest(
                operation=pb.KEY_VALUE_OPERATION_SET, key=b"k", value=b"", ttl_ms=2**64 - 1
            ),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_EXPIRE, key=b"k"),
            pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_DELETE, key=b"k", by=1),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.KeyValue(request, metadata=metadata)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, request
            trailing = dict(info.value.trailing_metadata() or ())
            assert trailing.get("dbsvc-error-code") == "invalid_parameters", request
        # incr by the smallest 64-bit integer is fine on a missing key; once more, it overflows.
        smallest = pb.KeyValueRequest(operation=pb.KEY_VALUE_OPERATION_INCR, key=b"m", by=-(2**63))
        assert (await stub.KeyValue(smallest, metadata=metadata)).number == -(2**63)
        with pytest.raises(grpc.aio.AioRpcError) as overflow:
            await stub.KeyValue(smallest, metadata=metadata)
        assert overflow.value.code() is grpc.StatusCode.FAILED_PRECONDITION


async def test_a_read_only_service_reads_but_cannot_write(
    client: MultiDatabaseClient, client_for: ClientFactory, tenant: TenantRecord
) -> None:
    await client.kv_set("shared", "v")
    reader = await client_for(tenant, (Scope.READ,))
    assert await reader.kv_get("shared") == b"v"
    assert await reader.kv_mget(["shared"]) == [b"v"]
    for call in [
        reader.kv_set("shared", "x"),
        reader.kv_delete("shared"),
        reader.kv_incr("n"),
        reader.kv_expire("shared", dt.timedelta(seconds=1)),
    ]:
        with pytest.raises(ClientPermissionDenied) as info:
            await call
        assert info.value.code == "permission_denied"
    writer = await client_for(tenant, (Scope.WRITE,))
    with pytest.raises(ClientPermissionDenied):
        await writer.kv_get("shared")
    await writer.kv_set("shared", "w")
    assert await client.kv_get("shared") == b"w"


async def test_unknown_and_suspended_tenants_are_refused(
    core: Application, client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    ghost = await client_for(f"ghost_{secrets.token_hex(4)}")
    with pytest.raises(Exception) as info:
        await ghost.kv_get("k")
    assert getattr(info.value, "code", None) == "tenant_not_found"
    tenant = await new_tenant("kvsusp")
    c = await client_for(tenant)
    await c.kv_set("k", "v")
    await core.tenants.suspend(tenant.tenant_id)
    core.registry.invalidate(tenant.tenant_id)
    with pytest.raises(ClientFailedPrecondition) as suspended:
        await c.kv_get("k")
    assert suspended.value.code == "tenant_suspended"
    await core.tenants.resume(tenant.tenant_id)
    core.registry.invalidate(tenant.tenant_id)
    assert await c.kv_get("k") == b"v"


# -- the seed's shape -------------------------------------------------------------------------


async def test_the_seeds_dragonflydb_operations(client: MultiDatabaseClient) -> None:
    stores = await client.stores()
    assert stores["dragonflydb"] == "not_configured"  # no Redis: the embedded store runs them
    signal = {"signal_id": "sig-kv", "symbol": "EURUSD", "action": "buy"}
    result = await client.execute_multi_db_operation(
        {
            "postgresql": {
                "query": "INSERT INTO trading_signals (signal_id, symbol, action)"
                " VALUES (:signal_id, :symbol, :action)",
                "params": signal,
            },
            "dragonflydb": {
                "operation": "set",
                "key": "signal:sig-kv",
                "value": signal,
                "ttl": 300,
                "company_id": client.tenant_id,
            },
        }
    )
    assert result["postgresql"].command == "INSERT 0 1"
    assert result["dragonflydb"] is True
    assert await client.kv_get("signal:sig-kv") == (
        b'{"signal_id": "sig-kv", "symbol": "EURUSD", "action": "buy"}'
    )

    async def kv(**operation: Any) -> Any:
        return (await client.execute_multi_db_operation({"dragonflydb": operation}))["dragonflydb"]

    assert await kv(operation="get", key="signal:sig-kv") is not None
    assert await kv(operation="set", key="n", value=1) is True
    assert await kv(operation="incr", key="n") == 2
    assert await kv(operation="incr", key="n", by=10) == 12
    assert await kv(operation="mget", keys=["n", "nope"]) == [b"12", None]
    assert await kv(operation="expire", key="n", ttl=0.05) is True
    await asyncio.sleep(0.15)
    assert await kv(operation="get", key="n") is None
    assert await kv(operation="set", key="b", value=b"\x00", ttl_ms=60_000) is True
    assert await kv(operation="delete", key="b") is True
    assert await kv(operation="delete", key="b") is False


@pytest.mark.parametrize(
    "operation",
    [
        {"operation": "sett", "key": "k", "value": "v"},
        {"operation": "set", "key": "k"},
        {"operation": "set", "key": "k", "value": "v", "ttl": 0},
        {"operation": "set", "key": "k", "value": "v", "ttl": 1, "ttl_ms": 1000},
        {"operation": "get", "key": "k", "value": "v"},
        {"operation": "incr", "key": "k", "by": "1"},
        {"operation": "expire", "key": "k"},
        {"operation": "mget", "keys": "k"},
        {"key": "k"},
    ],
)
async def test_a_malformed_seed_operation_runs_nothing(
    client: MultiDatabaseClient, operation: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        await client.execute_multi_db_operation(
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('kv-never', 'n@x', 'pro')"},
                "dragonflydb": operation,
            }
        )
    count = await client.fetch_all("SELECT count(*) FROM users WHERE user_id = 'kv-never'")
    assert count.rows == [(0,)]


async def test_another_company_in_the_seed_shape_is_refused_before_anything_runs(
    client: MultiDatabaseClient,
) -> None:
    for field in ("company_id", "tenant_id"):
        with pytest.raises(ClientPermissionDenied, match="names company"):
            await client.execute_multi_db_operation(
                {
                    "postgresql": {"query": "INSERT INTO users VALUES ('kv-n2', 'n@x', 'pro')"},
                    "dragonflydb": {"operation": "set", "key": "k", "value": "v", field: "other"},
                }
            )
    assert await client.kv_get("k") is None
    count = await client.fetch_all("SELECT count(*) FROM users WHERE user_id = 'kv-n2'")
    assert count.rows == [(0,)]


# -- REST -------------------------------------------------------------------------------------


async def kv_rest(
    http: httpx.AsyncClient, headers: dict[str, str], operation: str, **body: Any
) -> httpx.Response:
    # ASCII JSON: a lone surrogate travels as its escape, as any client may send it.
    return await http.post(
        f"/api/v1/kv/{operation}",
        content=json.dumps(body).encode(),
        headers={**headers, "Content-Type": "application/json"},
    )


async def test_rest_runs_every_operation(
    http: httpx.AsyncClient,
    service_headers: TokenFactory,
    tenant: TenantRecord,
    client: MultiDatabaseClient,
) -> None:
    headers = await service_headers([tenant.tenant_id], **{"X-Tenant-Id": tenant.tenant_id})

    async def call(operation: str, **body: Any) -> dict[str, Any]:
        response = await kv_rest(http, headers, operation, **body)
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document

    assert await call("get", key="a") == {
        "operation": "get",
        "found": False,
        "value": None,
        "number": None,
        "values": None,
        "encoding": "utf-8",
    }
    assert (await call("set", key="a", value="ä", ttl_ms=60_000))["found"]
    assert (await call("get", key="a"))["value"] == "ä"
    assert await client.kv_get("a") == "ä".encode()  # one store for every front end
    assert (await call("incr", key="n", by=5))["number"] == 5
    assert (await call("incr", key="n"))["number"] == 6
    mget = await call("mget", keys=["a", "n", "missing"])
    assert (mget["values"], mget["encoding"]) == (["ä", "6", None], "utf-8")
    # Binary keys and values in base64, both ways.
    key, value = base64.b64encode(b"\x00\xff").decode(), base64.b64encode(b"\xfe\x00").decode()
    assert (await call("set", key=key, value=value, encoding="base64"))["found"]
    assert await client.kv_get(b"\x00\xff") == b"\xfe\x00"
    got = await call("get", key=key, encoding="base64")
    assert (got["value"], got["encoding"]) == (value, "base64")
    # A utf-8 request for a value that is not UTF-8 gets base64, and is told so.
    await call("set", key=base64.b64encode(b"bv").decode(), value=value, encoding="base64")
    both = await call("mget", keys=["a", "bv", "missing"], encoding="utf-8")
    assert both["encoding"] == "base64"
    assert both["values"] == [base64.b64encode("ä".encode()).decode(), value, None]
    binary = await call("mget", keys=[key, base64.b64encode(b"a").decode()], encoding="base64")
    assert binary["values"] == [value, base64.b64encode("ä".encode()).decode()]
    assert (await call("expire", key="a", ttl_ms=50))["found"]
    assert (await call("delete", key="n"))["found"]
    assert not (await call("delete", key="n"))["found"]
    await asyncio.sleep(0.15)
    assert not (await call("get", key="a"))["found"]
    # The tenant in the body (either name) instead of the header.
    bare = {"Authorization": headers["Authorization"]}
    for name in ("tenant_id", "company_id"):
        response = await kv_rest(
            http, bare, "get", key=key, encoding="base64", **{name: tenant.tenant_id}
        )
        assert response.status_code == 200 and response.json()["found"]


@pytest.mark.parametrize(
    ("operation", "body", "status", "code"),
    [
        ("sett", {"key": "k"}, 400, "invalid_parameters"),
        ("get", {}, 400, "invalid_parameters"),
        ("get", {"key": ""}, 400, "invalid_parameters"),
        ("get", {"key": "k" * 10_240}, 400, "invalid_parameters"),
        ("get", {"key": "k", "value": "v"}, 400, "invalid_parameters"),
        ("get", {"key": "%%%", "encoding": "base64"}, 400, "invalid_parameters"),
        ("get", {"key": "k", "encoding": "latin-1"}, 400, "invalid_request"),
        ("get", {"key": "k", "extra": 1}, 400, "invalid_request"),
        ("get", {"key": 7}, 400, "invalid_request"),
        ("set", {"key": "k", "value": "\ud800"}, 400, "invalid_text"),
        ("set", {"key": "k", "value": "v", "ttl_ms": 0}, 400, "invalid_parameters"),
        ("set", {"key": "k", "value": "v", "ttl_ms": -5}, 400, "invalid_parameters"),
        ("set", {"key": "k", "value": "v", "ttl_ms": 2**70}, 400, "invalid_parameters"),
        ("set", {"key": "k", "value": "v", "ttl_ms": 1.5}, 400, "invalid_request"),
        ("set", {"key": "k", "value": "x" * (1024 * 1024 + 1)}, 413, "payload_too_large"),
        ("incr", {"key": "k", "by": 2**64}, 400, "invalid_parameters"),
        ("incr", {"key": "k", "by": True}, 400, "invalid_request"),
        ("mget", {"keys": ["k"] * 1001}, 400, "invalid_parameters"),
        ("mget", {"keys": "k"}, 400, "invalid_request"),
        ("expire", {"key": "k"}, 400, "invalid_parameters"),
    ],
)
async def test_rest_refusals_have_stable_codes(
    http: httpx.AsyncClient,
    service_headers: TokenFactory,
    tenant: TenantRecord,
    operation: str,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    headers = await service_headers([tenant.tenant_id], **{"X-Tenant-Id": tenant.tenant_id})
    response = await kv_rest(http, headers, operation, **body)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)


async def test_rest_incr_of_text_is_a_conflict(
    http: httpx.AsyncClient, service_headers: TokenFactory, tenant: TenantRecord
) -> None:
    headers = await service_headers([tenant.tenant_id], **{"X-Tenant-Id": tenant.tenant_id})
    await kv_rest(http, headers, "set", key="t", value="abc")
    response = await kv_rest(http, headers, "incr", key="t")
    assert (response.status_code, response.json()["error"]["code"]) == (409, "failed_precondition")


async def test_rest_needs_a_token_and_one_tenant(
    http: httpx.AsyncClient, service_headers: TokenFactory, tenant: TenantRecord
) -> None:
    response = await http.post("/api/v1/kv/get", json={"key": "k", "tenant_id": tenant.tenant_id})
    assert response.status_code == 401
    headers = await service_headers([tenant.tenant_id])
    assert (await kv_rest(http, headers, "get", key="k")).status_code == 400  # no tenant
    disagree = await kv_rest(
        http, headers, "get", key="k", tenant_id=tenant.tenant_id, company_id="other_one"
    )
    assert disagree.status_code == 400
    header = {**headers, "X-Tenant-Id": "other_one"}
    assert (
        await kv_rest(http, header, "get", key="k", tenant_id=tenant.tenant_id)
    ).status_code == (400)


# -- audit ------------------------------------------------------------------------------------


async def test_operations_are_audited_without_keys_or_values(
    core: Application, client_for: ClientFactory, tenant: TenantRecord
) -> None:
    since = dt.datetime.now(dt.UTC)
    writer = await client_for(tenant)
    reader = await client_for(tenant, (Scope.READ,))
    await writer.kv_set("audit-SECRETKEY", "SECRETVALUE", ttl=dt.timedelta(seconds=60))
    await reader.kv_mget(["audit-SECRETKEY", "x"])
    with pytest.raises(ClientPermissionDenied):
        await reader.kv_delete("audit-SECRETKEY")
    with pytest.raises(InvalidArgument):
        await writer.kv_get("SECRETKEY" * 200)
    await writer.kv_set("t", "text")
    with pytest.raises(ClientFailedPrecondition):
        await writer.kv_incr("t")
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT action, outcome, code, statement_class, detail, tenant_id"
        f" FROM {core.settings.control_schema}.audit_log"
        " WHERE tenant_id = $1 AND action LIKE 'kv.%' AND at >= $2 ORDER BY at",
        tenant.tenant_id,
        since,
    )
    seen = [(r["action"], r["outcome"], r["code"]) for r in rows]
    assert seen == [
        ("kv.set", "ok", "set"),
        ("kv.mget", "ok", "mget"),
        ("kv.delete", "denied", "permission_denied"),
        ("kv.get", "denied", "invalid_parameters"),
        ("kv.set", "ok", "set"),
        ("kv.incr", "error", "failed_precondition"),
    ]
    assert [r["statement_class"] for r in rows if r["outcome"] != "denied"] == [
        "write",
        "read",
        "write",
        "write",
    ]
    assert rows[0]["detail"] == "ttl_ms 60000" and rows[1]["detail"] == "2 keys"
    assert not [r for r in rows if "SECRET" in (r["detail"] or "")]


async def test_the_use_case_checks_whoever_calls_it(
    core: Application, tenant: TenantRecord, new_tenant: TenantFactory
) -> None:
    other = await new_tenant("kvother")
    principal = Principal(
        service="direct", tenants=frozenset({tenant.tenant_id}), scopes=frozenset({Scope.READ})
    )
    ops = core.key_value
    assert await ops.get(principal, TenantContext(tenant.tenant_id), "k") is None
    with pytest.raises(PermissionDenied):
        await ops.set(principal, TenantContext(tenant.tenant_id), "k", "v")
    with pytest.raises(PermissionDenied):
        await ops.get(principal, TenantContext(other.tenant_id), "k")
    with pytest.raises(InvalidParameters):
        await ops.mget(principal, TenantContext(tenant.tenant_id), ["k"] * 1001)


# -- with Redis -------------------------------------------------------------------------------


@dataclass
class RedisService:
    core: Application
    client: MultiDatabaseClient
    http: httpx.AsyncClient
    headers: dict[str, str]
    tenant_id: str
    redis: aioredis.Redis


@pytest.fixture
async def with_redis(
    pg_cluster: PgCluster, tmp_path: Path, redis_db_url: str
) -> AsyncIterator[RedisService]:
    settings = make_settings(pg_cluster, tmp_path / "data", redis_url=redis_db_url)
    async with Application(settings, start_nats=False, maintain_partitions=False) as core:
        tenant_id = f"kvr_{secrets.token_hex(4)}"
        await core.tenants.create(tenant_id)
        name = f"svc-{tenant_id}"
        scopes = [Scope.READ, Scope.WRITE]
        await core.services.register(name, tenants=[tenant_id], scopes=scopes, with_secret=False)
        token = core.tokens.issue(name, tenants=[tenant_id], scopes=scopes, ttl_seconds=600)
        transport = httpx.ASGITransport(app=create_http_app(core))
        redis = aioredis.Redis.from_url(redis_db_url)
        async with (
            GrpcServer(core) as server,
            MultiDatabaseClient(f"127.0.0.1:{server.port}", tenant_id, token, retries=0) as client,
            httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http,
        ):
            headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id}
            try:
                yield RedisService(core, client, http, headers, tenant_id, redis)
            finally:
                await redis.aclose()


async def test_with_redis_keys_live_in_the_tenants_namespace(with_redis: RedisService) -> None:
    svc = with_redis
    assert isinstance(svc.core.key_values, RedisKeyValueStore)
    assert not isinstance(svc.core.key_values, type(None))
    health = await svc.client.health()
    assert health["dependencies"]["dragonflydb"]["status"] == "healthy"
    await svc.client.kv_set("pos:1", "a", ttl=dt.timedelta(seconds=30))
    await svc.client.kv_set(b"\x00{x}:*", b"\xff")
    assert await svc.client.kv_incr("n", 3) == 3
    response = await kv_rest(svc.http, svc.headers, "set", key="rest", value="r")
    assert response.status_code == 200
    prefix = f"dbsvc:{{{svc.tenant_id}}}:kv:".encode()
    stored = sorted([k async for k in svc.redis.scan_iter(match=b"dbsvc:*:kv:*")])
    assert stored == sorted(prefix + k for k in [b"pos:1", b"\x00{x}:*", b"n", b"rest"])
    assert 0 < await svc.redis.pttl(prefix + b"pos:1") <= 30_000
    assert await svc.redis.pttl(prefix + b"n") == -1
    assert await svc.client.kv_mget(["pos:1", b"\x00{x}:*", "n", "rest", "x"]) == [
        b"a",
        b"\xff",
        b"3",
        b"r",
        None,
    ]
    assert await svc.client.kv_expire("n", dt.timedelta(milliseconds=50))
    await asyncio.sleep(0.15)
    assert await svc.client.kv_get("n") is None
    assert await svc.client.kv_delete("rest")
    # The seed's shape runs on Redis too (health: healthy).
    result = await svc.client.execute_multi_db_operation(
        {"dragonflydb": {"operation": "set", "key": "seed", "value": 7, "ttl": 60}}
    )
    assert result == {"dragonflydb": True}
    assert await svc.redis.get(prefix + b"seed") == b"7"


async def test_with_redis_errors_keep_their_codes(with_redis: RedisService) -> None:
    svc = with_redis
    await svc.client.kv_set("t", "abc")
    with pytest.raises(ClientFailedPrecondition) as info:
        await svc.client.kv_incr("t")
    assert info.value.code == "failed_precondition"
    response = await kv_rest(svc.http, svc.headers, "set", key="k", value="v", ttl_ms=2**53)
    assert response.status_code == 400


async def test_with_redis_down_operations_are_unavailable(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    """Unlike the result cache, a key-value call is explicit: Redis unreachable answers
    UNAVAILABLE / 503 with a stable code, never a silent miss or a 500."""
    from database_service.supervisor import free_port

    settings = make_settings(
        pg_cluster, tmp_path / "data", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    async with Application(settings, start_nats=False, maintain_partitions=False) as core:
        tenant_id = f"kvd_{secrets.token_hex(4)}"
        await core.tenants.create(tenant_id)
        principal = Principal(
            service="direct", tenants=frozenset({tenant_id}), scopes=frozenset(Scope)
        )
        with pytest.raises(Unavailable):
            await core.key_value.get(principal, TenantContext(tenant_id), "k")
        transport = httpx.ASGITransport(app=create_http_app(core))
        name = f"svc-{tenant_id}"
        await core.services.register(name, tenants=[tenant_id], scopes=[Scope.READ])
        token = core.tokens.issue(name, tenants=[tenant_id], scopes=[Scope.READ], ttl_seconds=60)
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            response = await kv_rest(
                http,
                {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id},
                "get",
                key="k",
            )
        assert (response.status_code, response.json()["error"]["code"]) == (503, "unavailable")


async def test_with_redis_a_deleted_tenants_keys_are_purged(with_redis: RedisService) -> None:
    svc = with_redis
    other = f"kvo_{secrets.token_hex(4)}"
    await svc.core.tenants.create(other)
    await svc.core.key_values.set(other, "kept", b"1")
    for n in range(1200):  # more than one SCAN batch
        await svc.core.key_values.set(svc.tenant_id, f"k{n}", b"v")
    await svc.core.tenants.delete(svc.tenant_id, confirm=True)
    prefix = f"dbsvc:{{{svc.tenant_id}}}:kv:*".encode()
    assert [k async for k in svc.redis.scan_iter(match=prefix)] == []
    assert await svc.core.key_values.get(other, "kept") == b"1"
    await svc.core.tenants.delete(other, confirm=True)


async def test_a_deleted_tenant_takes_its_keys_and_their_quota_usage_with_it(
    core: Application,
) -> None:
    """On the embedded store the keys go by cascade with the tenant's row, and so does the
    tenant's quota accounting (control migration 0017): a tenant created again under the id
    starts empty, with its whole quota."""
    tenant_id = f"kvd_{secrets.token_hex(4)}"
    await core.tenants.create(tenant_id)
    for n in range(50):
        await core.key_values.set(tenant_id, f"k{n}", b"v" * 100)
    assert await core.key_values.usage(tenant_id) == 50 * (len("k10") + 100 + 64) - 10
    await core.tenants.delete(tenant_id, confirm=True)
    control = core.settings.control_schema
    left = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {control}.kv_usage WHERE tenant_id = $1", tenant_id
    )
    assert left == 0
    await core.tenants.create(tenant_id)
    try:
        assert await core.key_values.usage(tenant_id) == 0
        assert await core.key_values.get(tenant_id, "k0") is None
    finally:
        await core.tenants.delete(tenant_id, confirm=True)
