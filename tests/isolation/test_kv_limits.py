"""Tenant A using its own key-value namespace to hold up the service or other tenants: one
``mget`` of many large values (a gigabyte answered, and encoded, by one request), a flood of
large writes while B's key-value calls and SQL must still be answered, and keys without end
(the per-tenant quota, ``DBSVC_KV_TENANT_MAX_BYTES``, on every store: A is refused, B's keys
and writes are untouched).

Through REST ``POST /api/v1/kv/{operation}`` and gRPC ``KeyValue``, on the default (embedded
PostgreSQL) store; the bound itself on every store (PostgreSQL, Redis, in memory).
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.cache import (
    KEY_OVERHEAD_BYTES,
    MAX_MGET_BYTES,
    MAX_VALUE_BYTES,
    InMemoryKeyValueStore,
    KeyValueStore,
    PostgresKeyValueStore,
    RedisKeyValueStore,
)
from database_service.errors import ResourceExhausted, ResultTooLarge
from database_service.tenancy import quote_ident
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

FRONT_ENDS = ("grpc", "rest")
# Enough 1 MiB values to pass the bound by one.
_BIG_KEYS = [f"big-{i}".encode() for i in range(MAX_MGET_BYTES // MAX_VALUE_BYTES + 1)]


async def kv(
    front_end: str,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenant_id: str,
    token: str,
    operation: str,
    **fields: Any,
) -> tuple[str, str | None, Any]:
    """(status, error code, answer) of one key-value call; keys and values as bytes."""
    if front_end == "rest":
        body: dict[str, Any] = {"encoding": "base64"}
        for name, item in fields.items():
            if name in ("key", "value"):
                body[name] = base64.b64encode(item).decode()
            elif name == "keys":
                body[name] = [base64.b64encode(k).decode() for k in item]
            else:
                body[name] = item
        response = await http.post(
            f"/api/v1/kv/{operation}",
            json=body,
            headers={"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id},
        )
        document = response.json()
        code = document.get("error", {}).get("code") if response.status_code != 200 else None
        return str(response.status_code), code, document
    async with grpc.aio.insecure_channel(
        grpc_target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        request = pb.KeyValueRequest(
            operation=getattr(pb, f"KEY_VALUE_OPERATION_{operation.upper()}"), **fields
        )
        try:
            reply = await DatabaseServiceStub(channel).KeyValue(
                request,
                metadata=(("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id)),
                timeout=60,
            )
        except grpc.aio.AioRpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())
            return exc.code().name, trailing.get("dbsvc-error-code"), None  # type: ignore[return-value]
        return "200", None, reply


@pytest.fixture
async def a_token(core: Application, tenants: Tenants) -> str:
    return await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))


@pytest.fixture
async def a_big_values(core: Application, tenants: Tenants) -> AsyncIterator[None]:
    a = tenants.a.tenant_id
    for key in _BIG_KEYS:
        await core.key_values.set(a, key, b"v" * MAX_VALUE_BYTES)
    yield
    for key in _BIG_KEYS:
        await core.key_values.delete(a, key)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_an_mget_of_more_bytes_than_one_answer_holds_is_refused(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    a_token: str,
    a_big_values: None,
) -> None:
    a = tenants.a.tenant_id
    status, code, _ = await kv(front_end, http, grpc_target, a, a_token, "mget", keys=_BIG_KEYS)
    assert (status, code) in {
        ("422", "result_too_large"),
        ("RESOURCE_EXHAUSTED", "result_too_large"),
    }
    # Within the bound, the same keys answer.
    status, code, answer = await kv(
        front_end, http, grpc_target, a, a_token, "mget", keys=_BIG_KEYS[:2]
    )
    assert status == "200", code
    values = answer["values"] if front_end == "rest" else [i.value for i in answer.items]
    assert len(values) == 2 and all(v for v in values)


async def _bounds_mget(store: KeyValueStore, tenant_id: str) -> None:
    for key in _BIG_KEYS:
        await store.set(tenant_id, key, b"v" * MAX_VALUE_BYTES)
    try:
        with pytest.raises(ResultTooLarge):
            await store.mget(tenant_id, _BIG_KEYS)
        one = await store.mget(tenant_id, [_BIG_KEYS[0], b"absent"])
        assert one == [b"v" * MAX_VALUE_BYTES, None]
        assert await store.mget(tenant_id, []) == []
    finally:
        for key in _BIG_KEYS:
            await store.delete(tenant_id, key)


@pytest.mark.parametrize("kind", ["postgres", "memory"])
async def test_every_store_bounds_what_one_mget_answers(
    kind: str, core: Application, tenants: Tenants
) -> None:
    store: KeyValueStore = (
        PostgresKeyValueStore(core.owner_pool, control_schema=core.settings.control_schema)
        if kind == "postgres"
        else InMemoryKeyValueStore(max_bytes=64 * 1024 * 1024)
    )
    await _bounds_mget(store, tenants.a.tenant_id)


async def test_redis_bounds_what_one_mget_answers(redis_db_url: str, tenants: Tenants) -> None:
    store = RedisKeyValueStore(redis_db_url, timeout_s=10)
    try:
        await _bounds_mget(store, tenants.a.tenant_id)
    finally:
        await store.aclose()


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_flood_of_large_writes_does_not_stall_another_tenants_calls(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    a_token: str,
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    b_token = await service_token(core, [b], (Scope.READ, Scope.WRITE))
    stop = asyncio.Event()
    latencies: list[float] = []
    written = 0

    async def flood(worker: int) -> None:
        nonlocal written
        i = 0
        while not stop.is_set():
            key = f"flood-{worker}-{i % 4}".encode()
            # 128 KiB: in base64, within the test service's request bound (256 KiB).
            status, code, _ = await kv(
                front_end, http, grpc_target, a, a_token, "set", key=key, value=b"x" * 131_072
            )
            assert status == "200", code  # (a refusal would spin without ever waiting)
            written += 1
            i += 1

    async def victim() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            status, code, _ = await kv(front_end, http, grpc_target, b, b_token, "get", key=b"k")
            assert status == "200", code
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)

    workers = [asyncio.create_task(flood(i)) for i in range(32)]
    watcher = asyncio.create_task(victim())
    try:
        await asyncio.sleep(4)
    finally:
        stop.set()
        done = await asyncio.gather(*workers, watcher, return_exceptions=True)
    assert not [e for e in done if isinstance(e, BaseException)], done
    print(
        f"\n{front_end}: {written} writes of 128 KiB by A; B's gets: {len(latencies)},"
        f" median {statistics.median(latencies) * 1000:.1f} ms,"
        f" max {max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 3, "B's key-value calls stalled behind A's writes"
    for worker in range(32):
        for i in range(4):
            await core.key_values.delete(a, f"flood-{worker}-{i}".encode())


# -- the per-tenant quota ----------------------------------------------------------------------

_QUOTA = 40_000  # bytes: about 36 keys of 1,000-byte values


def store_with_quota(kind: str, core: Application, redis_url: str, quota: int) -> Any:
    """A key-value store of ``kind`` (postgres, memory, redis) whose tenants get ``quota``."""
    if kind == "postgres":
        return PostgresKeyValueStore(
            core.owner_pool, control_schema=core.settings.control_schema, tenant_max_bytes=quota
        )
    if kind == "memory":
        return InMemoryKeyValueStore(tenant_max_bytes=quota)
    return RedisKeyValueStore(redis_url, timeout_s=10, tenant_max_bytes=quota)


@pytest.fixture(params=["postgres", "memory", "redis"])
async def quota_store(
    request: pytest.FixtureRequest, core: Application, tenants: Tenants, redis_db_url: str
) -> AsyncIterator[KeyValueStore]:
    store = store_with_quota(request.param, core, redis_db_url, _QUOTA)
    try:
        yield store
    finally:
        for tenant in (tenants.a.tenant_id, tenants.b.tenant_id):
            await store.purge(tenant)
        if request.param != "memory":
            await store.aclose()


async def _fill(store: KeyValueStore, tenant_id: str, prefix: str, **ttl: int) -> int:
    """Keys of 1,000-byte values until the quota refuses one; how many were stored."""
    for i in range(1000):
        try:
            await store.set(tenant_id, f"{prefix}{i}", b"v" * 1000, **ttl)
        except ResourceExhausted as exc:
            assert "DBSVC_KV_TENANT_MAX_BYTES" in str(exc)
            return i
    raise AssertionError("the quota never refused a key")


async def test_a_tenant_at_its_key_value_quota_is_refused_and_another_is_not(
    quota_store: KeyValueStore, tenants: Tenants
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    await quota_store.set(b, "mine", b"kept")
    stored = await _fill(quota_store, a, "k")
    per_key = len("k10") + 1000 + KEY_OVERHEAD_BYTES
    assert _QUOTA // per_key - 1 <= stored <= _QUOTA // per_key
    used = await quota_store.usage(a)
    assert used <= _QUOTA
    # The refused write changed nothing; what A had is still there.
    assert await quota_store.get(a, f"k{stored}") is None
    assert await quota_store.get(a, "k0") == b"v" * 1000
    assert await quota_store.usage(a) == used
    # A's quota is A's alone: B writes as much as its own allows, and its key is untouched.
    assert await _fill(quota_store, b, "b") == stored
    assert await quota_store.get(b, "mine") == b"kept"
    # Rewriting a key with a value no larger, or deleting one, works at the quota.
    await quota_store.set(a, "k0", b"w" * 1000)
    assert await quota_store.delete(a, "k1")
    await quota_store.set(a, "k1", b"v" * 900)
    with pytest.raises(ResourceExhausted):
        await quota_store.set(a, "k1", b"v" * 10_000)
    assert await quota_store.get(a, "k1") == b"v" * 900


async def test_keys_made_by_increments_count_against_the_quota(
    quota_store: KeyValueStore, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    with pytest.raises(ResourceExhausted):
        for i in range(10_000):
            await quota_store.incr(a, f"counter-{i}")
    assert await quota_store.usage(a) <= _QUOTA
    # Existing counters still count up.
    assert await quota_store.incr(a, "counter-0") == 2


async def test_expired_keys_make_room_again(quota_store: KeyValueStore, tenants: Tenants) -> None:
    a = tenants.a.tenant_id
    stored = await _fill(quota_store, a, "t", ttl_ms=300)
    assert stored > 0
    await asyncio.sleep(0.5)
    # The expired keys still counted until now: the next write finds them and takes their room.
    assert await _fill(quota_store, a, "u") >= stored - 1


async def test_a_tenants_deletion_forgets_its_usage(
    quota_store: KeyValueStore, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    await _fill(quota_store, a, "p")
    await quota_store.purge(a)
    assert await quota_store.usage(a) == 0
    assert await _fill(quota_store, a, "q") > 0


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_the_quota_refusal_is_resource_exhausted_on_every_front_end(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    a_token: str,
) -> None:
    a = tenants.a.tenant_id
    store: Any = core.key_values
    configured = store.tenant_max_bytes
    store.tenant_max_bytes = 5_000
    try:
        codes = set()
        for i in range(10):
            status, code, _ = await kv(
                front_end, http, grpc_target, a, a_token, "set", key=f"f{i}".encode(),
                value=b"x" * 1000,
            )  # fmt: skip
            codes.add((status, code))
        assert codes == {("200", None), (
            "429" if front_end == "rest" else "RESOURCE_EXHAUSTED", "resource_exhausted"
        )}, codes  # fmt: skip
    finally:
        store.tenant_max_bytes = configured
        await core.key_values.purge(a)


async def test_a_tenants_own_login_cannot_touch_the_quota_books(
    core: Application, tenants: Tenants, attacker_conn: asyncpg.Connection
) -> None:
    """The books live in the control schema, where tenants' roles have USAGE (for the outbox's
    recording function): neither the usage table nor the function the triggers call is theirs
    to use, so A can neither push B over its quota nor give itself room."""
    control = quote_ident(core.settings.control_schema)
    b = tenants.b.tenant_id
    attempts = [
        (f"SELECT {control}.kv_account_apply(ARRAY[$1::text], ARRAY[1000000000]::bigint[])", b),
        (f"SELECT {control}.kv_account_apply(ARRAY[$1::text], ARRAY[-1000000000]::bigint[])",
         tenants.a.tenant_id),
        (f"UPDATE {control}.kv_usage SET bytes = 0 WHERE tenant_id = $1", tenants.a.tenant_id),
        (f"SELECT bytes FROM {control}.kv_usage WHERE tenant_id = $1", b),
    ]  # fmt: skip
    for sql, arg in attempts:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.execute(sql, arg)
