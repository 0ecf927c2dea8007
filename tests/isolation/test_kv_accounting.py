"""The key-value quota's books (``DBSVC_KV_TENANT_MAX_BYTES``, control migration 0017 on
PostgreSQL, the bookkeeping scripts on Redis) against concurrent writers, on every store.

Tenant A races set, delete, expire and incr on the same few keys; afterwards ``usage()`` must be
exactly what its live keys take (key + value + ``KEY_OVERHEAD_BYTES`` each), never negative,
and B's books — B writing keys of the same names at the same time — must be B's own. Concurrent
increments of a key that does not exist yet must all count (Redis ``INCR`` is atomic; a store
that lets two first increments both start from 0 loses one, acknowledged).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from database_service.app import Application
from database_service.cache import (
    KEY_OVERHEAD_BYTES,
    KeyValueStore,
    PostgresKeyValueStore,
)
from database_service.errors import FailedPrecondition, ResourceExhausted
from tests.isolation.fix_attack import Tenants
from tests.isolation.test_kv_limits import store_with_quota

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_QUOTA = 200_000
_KEYS = [f"race-{i}" for i in range(6)]
# Long enough that nothing expires while a test runs, so usage can be compared exactly.
_LONG_TTL_MS = 600_000


@pytest.fixture(params=["postgres", "redis", "memory"])
async def store(
    request: pytest.FixtureRequest, core: Application, tenants: Tenants, redis_db_url: str
) -> AsyncIterator[KeyValueStore]:
    kv = store_with_quota(request.param, core, redis_db_url, _QUOTA)
    for tenant in (tenants.a.tenant_id, tenants.b.tenant_id):
        await kv.purge(tenant)
    try:
        yield kv
    finally:
        for tenant in (tenants.a.tenant_id, tenants.b.tenant_id):
            await kv.purge(tenant)
        await kv.aclose()


async def _real_usage(store: KeyValueStore, tenant: str, keys: list[str]) -> int:
    values = await store.mget(tenant, keys)
    return sum(
        len(k.encode()) + len(v) + KEY_OVERHEAD_BYTES
        for k, v in zip(keys, values, strict=True)
        if v is not None
    )


async def _storm(store: KeyValueStore, tenant: str, seed: int, rounds: int = 400) -> None:
    """Concurrent writers on the same few keys: every operation that changes a key's size."""
    rng = random.Random(seed)

    async def one() -> None:
        key = rng.choice(_KEYS)
        action = rng.choice(["set", "set_ttl", "delete", "expire", "incr", "incr"])
        try:
            if action == "set":
                await store.set(tenant, key, b"v" * rng.randint(0, 3000))
            elif action == "set_ttl":
                await store.set(tenant, key, str(rng.randint(0, 99)), ttl_ms=_LONG_TTL_MS)
            elif action == "delete":
                await store.delete(tenant, key)
            elif action == "expire":
                await store.expire(tenant, key, _LONG_TTL_MS)
            else:
                await store.incr(tenant, key, rng.randint(-(10**12), 10**12))
        except FailedPrecondition:
            pass  # incr of a value that is not an integer: refused, nothing changed

    for _ in range(rounds // 40):
        await asyncio.gather(*(one() for _ in range(40)))


async def test_concurrent_writes_leave_usage_equal_to_the_live_keys(
    store: KeyValueStore, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    await _storm(store, a, seed=1)
    used = await store.usage(a)
    assert used >= 0
    assert used == await _real_usage(store, a, _KEYS)
    for key in _KEYS:
        await store.delete(a, key)
    assert await store.usage(a) == 0


async def test_another_tenants_storm_on_the_same_key_names_leaves_the_books_alone(
    store: KeyValueStore, tenants: Tenants
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    await store.set(b, _KEYS[0], b"b" * 1000)
    b_before = await store.usage(b)
    await asyncio.gather(_storm(store, a, seed=2), _storm(store, a, seed=3))
    assert await store.usage(b) == b_before
    assert await store.get(b, _KEYS[0]) == b"b" * 1000
    assert await store.usage(a) == await _real_usage(store, a, _KEYS)


async def test_concurrent_first_increments_of_a_key_all_count(
    store: KeyValueStore, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    results = await asyncio.gather(*(store.incr(a, "counter") for _ in range(30)))
    assert sorted(results) == list(range(1, 31))
    assert await store.get(a, "counter") == b"30"
    assert await store.usage(a) == await _real_usage(store, a, ["counter"])


async def test_concurrent_first_increments_once_per_token_all_count(
    store: KeyValueStore, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    results = await asyncio.gather(
        *(store.incr_once(a, "once", 1, f"token-{i}") for i in range(20))
    )
    assert sorted(n for n, _ in results) == list(range(1, 21))
    assert await store.get(a, "once") == b"20"


async def test_a_refused_write_at_the_quota_leaves_the_books_as_they_were(
    store: KeyValueStore, tenants: Tenants
) -> None:
    a = tenants.a.tenant_id
    keys = [f"fill-{i}" for i in range(70)]
    stored: list[str] = []
    for key in keys:
        try:
            await store.set(a, key, b"x" * 3000)
        except ResourceExhausted:
            break
        stored.append(key)
    used = await store.usage(a)
    assert used == await _real_usage(store, a, stored) <= _QUOTA
    # Concurrent growing writes and increments of new keys at the quota: all refused or within.
    outcomes = await asyncio.gather(
        *(store.set(a, f"more-{i}", b"y" * 3000) for i in range(10)),
        *(store.incr(a, f"n-{i}") for i in range(10)),
        return_exceptions=True,
    )
    assert all(o is None or isinstance(o, (int, ResourceExhausted)) for o in outcomes), outcomes
    extra = [f"more-{i}" for i in range(10)] + [f"n-{i}" for i in range(10)]
    assert await store.usage(a) == await _real_usage(store, a, stored + extra) <= _QUOTA


async def test_reclaiming_many_expired_keys_at_the_quota_does_not_hold_up_others(
    core: Application, tenants: Tenants
) -> None:
    """A tenant with a great many expired keys (they count until deleted) writes at its quota
    from many callers at once: each write reclaims expired keys through the owner's pool, which
    every tenant's key-value calls share. B's calls must still be answered promptly, and A's
    writes succeed once room is made (no caller refused because another was reclaiming)."""
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    table = f"{core.settings.control_schema}.kv"
    probe = PostgresKeyValueStore(core.owner_pool, control_schema=core.settings.control_schema)
    await probe.purge(a)
    await core.owner_pool.execute(
        f"INSERT INTO {table} (tenant_id, key, value, expires_at)"
        " SELECT $1, convert_to('gone-' || g, 'UTF8'), '\\x00'::bytea,"
        " clock_timestamp() - interval '1 s' FROM generate_series(1, 150000) g",
        a,
    )
    try:
        quota = await probe.usage(a) + 100
        store = PostgresKeyValueStore(
            core.owner_pool, control_schema=core.settings.control_schema, tenant_max_bytes=quota
        )
        await store.set(b, "b-key", b"b")
        latencies: list[float] = []
        stop = asyncio.Event()

        async def b_calls() -> None:
            while not stop.is_set():
                started = asyncio.get_running_loop().time()
                assert await store.get(b, "b-key") == b"b"
                latencies.append(asyncio.get_running_loop().time() - started)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(b_calls())
        await asyncio.sleep(0.1)
        outcomes = await asyncio.gather(
            *(store.set(a, f"new-{i}", b"v" * 1000) for i in range(16)), return_exceptions=True
        )
        stop.set()
        await watcher
        print(f"\nB's key-value latency: max {max(latencies) * 1000:.0f} ms")
        assert max(latencies) < 2.0, max(latencies)
        assert all(o is None for o in outcomes), outcomes
    finally:
        await probe.purge(a)
        await probe.purge(b)
