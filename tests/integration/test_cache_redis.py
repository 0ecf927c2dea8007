"""The result cache and key-value store against a real Redis (tests/fix_redis.py): the
per-tenant quota, invalidation between two instances, Redis going away and coming back, and
key-value namespacing under attack."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from database_service.cache import (
    CachedResult,
    Generations,
    InMemoryKeyValueStore,
    KeyValueStore,
    LocalCache,
    RedisKeyValueStore,
    RemoteCache,
    ResultCache,
    Snapshot,
    result_key,
)
from database_service.errors import FailedPrecondition, InvalidParameters, PayloadTooLarge
from tests.fix_redis import RedisServer

pytestmark = pytest.mark.integration

Names = tuple[tuple[str, str], ...]


def result(payload: bytes, ttl_s: float = 60.0) -> CachedResult:
    return CachedResult.new(payload, (("#epoch", 0),), ttl_s)


async def test_quota_evicts_only_the_tenants_own_entries(redis_db_url: str) -> None:
    remote = RemoteCache(redis_db_url, tenant_quota_bytes=10_000, timeout_s=0.5)
    try:
        for i in range(5):
            assert await remote.put("other", f"k{i}", result(b"o" * 1000))
        for i in range(30):
            assert await remote.put("acme", f"k{i}", result(b"a" * 1000))
            await asyncio.sleep(0.002)  # distinct access times
        # acme is held within its quota, its oldest entries gone, the newest kept.
        used = await remote.tenant_bytes("acme")
        assert used is not None and used <= 10_000
        assert await remote.get("acme", "k0") is None
        assert await remote.get("acme", "k29") is not None
        assert remote.evictions >= 20
        # Not one of the other tenant's entries was touched.
        for i in range(5):
            assert await remote.get("other", f"k{i}") is not None
        # A read refreshes an entry's place: the first survivor, read last, outlives the second.
        survivors = []
        for i in range(30):
            if await remote.get("acme", f"k{i}") is not None:
                survivors.append(i)
            await asyncio.sleep(0.002)  # access times are in milliseconds
        assert await remote.get("acme", f"k{survivors[0]}") is not None
        await asyncio.sleep(0.002)
        for i in range(30, 30 + len(survivors) - 1):
            assert await remote.put("acme", f"k{i}", result(b"a" * 1000))
            await asyncio.sleep(0.002)
        assert await remote.get("acme", f"k{survivors[0]}") is not None
        assert await remote.get("acme", f"k{survivors[1]}") is None
        # An entry larger than the quota is not stored.
        assert not await remote.put("acme", "huge", result(b"x" * 20_000))
    finally:
        await remote.aclose()


async def test_quota_bookkeeping_of_expired_entries(redis_db_url: str) -> None:
    remote = RemoteCache(redis_db_url, tenant_quota_bytes=6_000, timeout_s=0.5)
    try:
        for i in range(4):
            assert await remote.put("acme", f"short{i}", result(b"s" * 1000, ttl_s=0.05))
            await asyncio.sleep(0.002)
        assert await remote.put("acme", "long", result(b"l" * 1000, ttl_s=60))
        await asyncio.sleep(0.1)  # the short ones expired in Redis; their sizes still count
        assert (await remote.tenant_bytes("acme") or 0) > 5000
        evictions = remote.evictions
        for i in range(4):
            assert await remote.put("acme", f"live{i}", result(b"l" * 1000))
        # The dead entries' sizes were reclaimed first; no live entry was evicted for them.
        assert remote.evictions == evictions
        assert await remote.get("acme", "long") is not None
        for i in range(4):
            assert await remote.get("acme", f"live{i}") is not None
        used = await remote.tenant_bytes("acme")
        assert used is not None and used <= 6_000
        client = aioredis.Redis.from_url(redis_db_url)
        try:
            assert await client.zcard(b"dbsvc:{acme}:lru") == 5
            assert await client.hlen(b"dbsvc:{acme}:sizes") == 6  # five sizes and the sum
            assert await client.pttl(b"dbsvc:{acme}:lru") > 50_000  # the longest entry's TTL
        finally:
            await client.aclose()
    finally:
        await remote.aclose()


async def test_bookkeeping_expires_with_the_entries(redis_db_url: str) -> None:
    remote = RemoteCache(redis_db_url, tenant_quota_bytes=6_000, timeout_s=0.5)
    client = aioredis.Redis.from_url(redis_db_url)
    try:
        assert await remote.put("acme", "a", result(b"x", ttl_s=0.05))
        await asyncio.sleep(0.1)
        assert await client.keys(b"dbsvc:{acme}:*") == []
    finally:
        await client.aclose()
        await remote.aclose()


async def test_corrupt_values_are_misses(redis_db_url: str) -> None:
    remote = RemoteCache(redis_db_url, tenant_quota_bytes=10_000, timeout_s=0.5)
    client = aioredis.Redis.from_url(redis_db_url)
    try:
        await client.set(b"dbsvc:{acme}:r:bad", b"not an entry")
        assert await remote.get("acme", "bad") is None
        assert remote.corrupt == 1
    finally:
        await client.aclose()
        await remote.aclose()


async def make_cache(
    url: str, channel: str, lags: list[float] | None = None, *, stale_keep_s: float = 0.0
) -> ResultCache:
    generations = Generations(
        url, channel=channel, timeout_s=0.5, on_lag=lags.append if lags is not None else None
    )
    await generations.start()
    assert await generations.wait_attached(5)
    return ResultCache(
        local=LocalCache(1 << 20),
        remote=RemoteCache(
            url, tenant_quota_bytes=1 << 20, timeout_s=0.5, stale_keep_s=stale_keep_s
        ),
        generations=generations,
    )


@pytest.fixture
async def two_caches(
    redis_db_url: str,
) -> AsyncIterator[tuple[ResultCache, ResultCache, list[float]]]:
    channel = f"dbsvc:invalidate:test:{time.monotonic_ns()}"
    lags: list[float] = []
    a = await make_cache(redis_db_url, channel)
    b = await make_cache(redis_db_url, channel, lags)
    yield a, b, lags
    await a.aclose()
    await b.aclose()


async def test_hit_miss_and_promotion_between_instances(two_caches) -> None:
    a, b, _ = two_caches
    rels = {"t_x.positions", "shared.positions"}
    key = result_key("acme", None, "select * from positions", [])
    snap = await a.snapshot("acme", rels)
    assert snap is not None
    assert await a.lookup("acme", key, rels, snapshot=snap) is None
    assert await a.fill("acme", key, snap, b"rows-v1", 30)
    assert (await a.lookup("acme", key, rels)).payload == b"rows-v1"  # type: ignore[union-attr]
    # B finds it in L2 and promotes it to its L1.
    assert (await b.lookup("acme", key, rels)).payload == b"rows-v1"  # type: ignore[union-attr]
    assert b.l2_hits == 1
    assert (await b.lookup("acme", key, rels)).payload == b"rows-v1"  # type: ignore[union-attr]
    assert b.l1_hits == 1
    # The same statement for another tenant or user is another key: a miss.
    other = result_key("acme2", None, "select * from positions", [])
    assert await b.lookup("acme2", other, rels) is None
    user = result_key("acme", "u1", "select * from positions", [])
    assert await b.lookup("acme", user, rels) is None


async def test_a_write_in_one_instance_invalidates_the_other(two_caches) -> None:
    a, b, lags = two_caches
    rels = {"t_x.positions"}
    measured: list[float] = []
    for round_ in range(20):
        key = result_key("acme", None, "select * from t_x.positions", [round_])
        snap = await b.snapshot("acme", rels)
        assert snap is not None and await b.fill("acme", key, snap, b"old", 30)
        assert await b.lookup("acme", key, rels) is not None
        started = time.monotonic()
        await a.invalidate("acme", rels)
        # The writer never serves the old result once invalidate returned.
        assert await a.lookup("acme", key, rels) is None
        deadline = started + 2.0
        while await b.lookup("acme", key, rels) is not None:
            assert time.monotonic() < deadline, "B served a stale entry for more than 2 s"
            await asyncio.sleep(0.001)
        measured.append(time.monotonic() - started)
    measured.sort()
    p50, worst = measured[len(measured) // 2], measured[-1]
    print(
        f"invalidation seen by the other instance: p50 {p50 * 1000:.2f} ms, max {worst * 1000:.2f} ms"
    )
    assert len(lags) >= 20  # the receiving side measured the lag of every message
    # An unrelated tenant's relation with the same name is not invalidated.
    snap = await b.snapshot("other", rels)
    await a.invalidate("acme", rels)
    await asyncio.sleep(0.05)
    assert await b.snapshot("other", rels) == snap


async def test_the_stale_fallback_finds_what_another_instance_cached(redis_db_url: str) -> None:
    """An instance that never ran the statement still has a last answer to give while
    PostgreSQL is down: the one another instance left in L2, kept past its TTL (and past
    invalidation) for the stale window — but never served as fresh once its TTL passed."""
    channel = f"dbsvc:invalidate:test:{time.monotonic_ns()}"
    a = await make_cache(redis_db_url, channel, stale_keep_s=60)
    b = await make_cache(redis_db_url, channel, stale_keep_s=60)
    try:
        rels = {"t_x.positions"}
        key = result_key("acme", None, "select * from t_x.positions", [])
        snap = await a.snapshot("acme", rels)
        assert snap is not None and await a.fill("acme", key, snap, b"rows-v1", 0.2)
        await asyncio.sleep(0.3)  # past its TTL
        assert await b.lookup("acme", key, rels) is None  # not fresh
        await a.invalidate("acme", rels)
        kept = await b.stale("acme", key)
        assert kept is not None and kept.payload == b"rows-v1" and kept.age_s() >= 0.3
        assert b.remote is not None and b.remote.stale_hits == 1
        # Within the caller's stale window only; never another tenant's key.
        assert await b.stale("acme", key, max_age_s=0.1) is None
        assert await b.stale("acme2", key) is None
        other_user = result_key("acme", "u1", "select * from t_x.positions", [])
        assert await b.stale("acme", other_user) is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_fill_is_skipped_when_a_write_raced_the_query(two_caches) -> None:
    a, b, _ = two_caches
    rels = {"t_x.a"}
    key = result_key("acme", None, "select * from t_x.a", [])
    snap = await b.snapshot("acme", rels)
    assert snap is not None
    await a.invalidate("acme", rels)  # a write commits while B's query runs
    await asyncio.sleep(0.05)
    assert not await b.fill("acme", key, snap, b"maybe-old", 30)
    assert await b.lookup("acme", key, rels) is None


async def test_redis_down_fails_fast_and_recovers(private_redis: RedisServer) -> None:
    url = private_redis.url
    channel = "dbsvc:invalidate:down"
    cache = await make_cache(url, channel)
    remote = cache.remote
    assert remote is not None
    remote.timeout_s = 0.05
    rels = {"t_x.a"}
    key = result_key("acme", None, "select 1", [])
    try:
        snap = await cache.snapshot("acme", rels)
        assert snap is not None and await cache.fill("acme", key, snap, b"rows", 60)
        await asyncio.to_thread(private_redis.stop)
        started = time.monotonic()
        assert await remote.get("acme", key) is None
        assert not await remote.put("acme", key, result(b"x"))
        for _ in range(100):  # while down, calls skip Redis: no timeout each
            assert await remote.get("acme", key) is None
        elapsed = time.monotonic() - started
        assert elapsed < 0.5, elapsed
        assert remote.state.status == "down" and remote.state.last_error
        # The subscription notices, clears L1 and gives no snapshot: nothing served from cache.
        deadline = time.monotonic() + 5
        while cache.generations.attached:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert cache.generations.state.status == "down"
        assert await cache.lookup("acme", key, rels) is None
        assert await cache.stale("acme", key) is not None  # the fallback still has it
        # A committed write while Redis is down is kept and replayed when it is back.
        await cache.invalidate("acme", rels)
        assert cache.generations.state.pending_bumps == 1
        await asyncio.to_thread(private_redis.start)
        assert await cache.generations.wait_attached(10)
        assert cache.generations.state.pending_bumps == 0
        client = aioredis.Redis.from_url(url)
        try:
            assert int(await client.hget(b"dbsvc:{acme}:gen", "t_x.a")) == 1  # type: ignore[arg-type]
        finally:
            await client.aclose()
        deadline = time.monotonic() + 10
        while not await remote.put("acme", key, result(b"y")):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert remote.state.status == "up"
        assert cache.stats()["invalidation"]["status"] == "up"  # type: ignore[index]
    finally:
        await cache.aclose()


async def test_local_mode_without_redis() -> None:
    generations = Generations(None)
    cache = ResultCache(local=LocalCache(1 << 20), generations=generations)
    rels = {"t_x.a"}
    snap = await cache.snapshot("acme", rels)
    assert snap is not None
    assert await cache.fill("acme", "k", snap, b"rows", 60)
    assert (await cache.lookup("acme", "k", rels)).payload == b"rows"  # type: ignore[union-attr]
    await cache.invalidate("acme", rels)
    assert await cache.lookup("acme", "k", rels) is None
    assert (await cache.stale("acme", "k")).payload == b"rows"  # type: ignore[union-attr]
    assert generations.state.mode == "local" and generations.state.status == "off"
    with pytest.raises(ValueError, match="Redis-backed"):
        ResultCache(
            local=LocalCache(1000),
            generations=generations,
            remote=RemoteCache("redis://127.0.0.1:1/0", tenant_quota_bytes=1000),
        )
    await cache.aclose()


# -- key-value operations ---------------------------------------------------------------------


@pytest.fixture(params=["redis", "memory"])
async def kv(request: pytest.FixtureRequest, redis_db_url: str) -> AsyncIterator[KeyValueStore]:
    store: KeyValueStore
    store = (
        RedisKeyValueStore(redis_db_url) if request.param == "redis" else InMemoryKeyValueStore()
    )
    yield store
    await store.aclose()


async def test_kv_operations(kv: KeyValueStore) -> None:
    assert await kv.get("acme", "k") is None
    await kv.set("acme", "k", "v")
    assert await kv.get("acme", "k") == b"v"
    assert await kv.incr("acme", "n") == 1
    assert await kv.incr("acme", "n", 41) == 42
    assert await kv.incr("acme", "n", -2) == 40
    assert await kv.mget("acme", ["k", "n", "missing"]) == [b"v", b"40", None]
    assert await kv.delete("acme", "k")
    assert not await kv.delete("acme", "k")
    await kv.set("acme", "t", b"\x00bin", ttl_ms=50)
    assert await kv.get("acme", "t") == b"\x00bin"
    await asyncio.sleep(0.1)
    assert await kv.get("acme", "t") is None
    await kv.set("acme", "e", "x")
    assert await kv.expire("acme", "e", 50)
    assert not await kv.expire("acme", "missing", 50)
    await asyncio.sleep(0.1)
    assert await kv.get("acme", "e") is None


async def test_kv_errors(kv: KeyValueStore) -> None:
    await kv.set("acme", "s", "abc")
    with pytest.raises(FailedPrecondition):
        await kv.incr("acme", "s")
    assert await kv.get("acme", "s") == b"abc"  # not overwritten
    await kv.set("acme", "big", str(2**63 - 1))
    with pytest.raises(FailedPrecondition):
        await kv.incr("acme", "big")
    with pytest.raises(PayloadTooLarge):
        await kv.set("acme", "v", b"x" * (1024 * 1024 + 1))
    with pytest.raises(InvalidParameters):
        await kv.set("acme", "v", "x", ttl_ms=0)
    with pytest.raises(InvalidParameters):
        await kv.get("acme", "k" * 10_000)
    with pytest.raises(InvalidParameters):
        await kv.mget("acme", ["k"] * 1001)


ATTACK_KEYS: list[bytes | str] = [
    "k",
    "k:",
    ":k",
    "*",
    "k*",
    "?",
    "[a-z]",
    "{victim}",
    "}",
    "{",
    "x}:kv:k",
    "dbsvc:{victim}:kv:k",
    "}:kv:k",
    "\x00",
    "k\x00",
    b"\xff\xfe\x00k",
    "k" * 1024,
    b"\x00" * 1024,
    "ключ",
    " k",
    "K",
]


async def test_kv_namespacing_attacks(kv: KeyValueStore, redis_db_url: str) -> None:
    # The victim stores a value under every key; the attacker tries every key and spelling.
    for key in ATTACK_KEYS:
        await kv.set("victim", key, b"secret")
        await kv.set("victim", key if isinstance(key, bytes) else key.encode(), b"secret")
    for key in ATTACK_KEYS:
        assert await kv.get("attacker", key) is None
        assert await kv.mget("attacker", [key]) == [None]
        assert not await kv.delete("attacker", key)
        assert not await kv.expire("attacker", key, 1)
        await kv.set("attacker", key, b"overwritten")
        raw = key if isinstance(key, bytes) else key.encode()
        assert await kv.incr("attacker", b"n" + raw[:1000]) == 1
    # Keys spelling the victim's namespaced key from the attacker's side, in full.
    for forged in [b"dbsvc:{victim}:kv:K", b"{victim}:kv:K", b"victim}:kv:K", b"\x00victim:K"]:
        assert await kv.get("attacker", forged) is None
        await kv.set("attacker", forged, b"forged")
    for key in ATTACK_KEYS:
        assert await kv.get("victim", key) == b"secret"
    assert await kv.get("victim", "kn") is None
    # A key over the limit is refused rather than truncated onto another key.
    with pytest.raises(InvalidParameters):
        await kv.set("attacker", "k" * 10_240, b"x")
    if isinstance(kv, RedisKeyValueStore):
        client = aioredis.Redis.from_url(redis_db_url)
        try:
            victim_keys = [k async for k in client.scan_iter(match=b"dbsvc:{victim}:*")]
            # Its keys, and the bookkeeping of its quota beside them (never a key's name).
            books = {b"dbsvc:{victim}:kvq:" + n for n in (b"sizes", b"expiries", b"total")}
            assert victim_keys and all(
                k.startswith(b"dbsvc:{victim}:kv:") or k in books for k in victim_keys
            )
            assert not [
                k async for k in client.scan_iter(match=b"dbsvc:{victim}*") if b"forged" in k
            ]
        finally:
            await client.aclose()


Clocked = Callable[[], float]


async def test_in_memory_kv_is_bounded() -> None:
    store = InMemoryKeyValueStore(max_bytes=10_000)
    for i in range(100):
        await store.set("acme", f"k{i}", b"x" * 500)
    assert store.evictions > 0
    assert await store.get("acme", "k99") == b"x" * 500
    assert await store.get("acme", "k0") is None


async def test_the_generation_mirror_keeps_the_names_read_most_recently(
    redis_db_url: str,
) -> None:
    """Cluster mode keeps a bounded mirror of Redis's numbers: what it drops is the least
    recently *read* name, so a hot row's number is not fetched from Redis again every time
    ``mirror_max`` other names pass through."""
    generations = Generations(redis_db_url, channel="mirror-test", mirror_max=4)
    await generations.start()
    try:
        assert await generations.wait_attached()
        for name in ("a", "b", "c"):  # with "#epoch": four names held
            assert await generations.snapshot("mirror_t", [name]) is not None
        assert await generations.snapshot("mirror_t", ["a"]) is not None  # read again: kept
        assert await generations.snapshot("mirror_t", ["d"]) is not None
        held = {relation for _, relation in generations._mirror}
        assert "a" in held and "b" not in held, held
    finally:
        await generations.aclose()


async def _evict(generations: Generations, tenant: str, names: list[str]) -> None:
    for name in names:
        assert await generations.snapshot(tenant, [name]) is not None


@contextlib.asynccontextmanager
async def _attached(url: str, channel: str, mirror_max: int = 50_000) -> AsyncIterator[Generations]:
    generations = Generations(url, channel=channel, mirror_max=mirror_max)
    await generations.start()
    try:
        assert await generations.wait_attached()
        yield generations
    finally:
        await generations.aclose()


async def _known(generations: Generations, tenant: str, relation: str) -> tuple[Names, Snapshot]:
    """The names of ``relation`` and their snapshot now."""
    names = Generations.names(tenant, [relation])
    snapshot = await generations.snapshot_of(tenant, names)
    assert snapshot is not None
    return names, snapshot


async def test_an_entry_outlives_its_names_in_the_mirror(redis_db_url: str) -> None:
    """An L1 entry whose row name the mirror evicted (a cache holding more keys than the
    mirror holds names) is still known current, without reading the name from Redis again:
    no change to it can have been forgotten since the entry was known current."""
    async with _attached(redis_db_url, "outlive-test", mirror_max=4) as generations:
        names, snapshot = await _known(generations, "outlive_t", "row-a")
        current_at = generations.clock
        await _evict(generations, "outlive_t", ["b", "c", "d", "e"])
        assert ("outlive_t", "row-a") not in generations._mirror
        reads = generations.state.mirror_reads
        assert generations.unchanged(names, snapshot, current_at) is True
        assert generations.state.mirror_reads == reads  # not read from Redis again
        mirror = generations.state.to_dict()["mirror"]
        assert mirror == {"names": 4, "max": 4, "reads_from_redis": reads}


async def test_a_change_to_an_evicted_name_is_never_missed(redis_db_url: str) -> None:
    """Another instance's write to a name this mirror evicted invalidates the entry; once the
    mirror has forgotten that change too, the entry is no longer known current either way
    (None: read Redis), and never served as current."""
    channel = "outlive-change-test"
    async with (
        _attached(redis_db_url, channel, mirror_max=4) as here,
        _attached(redis_db_url, channel) as there,
    ):
        names, snapshot = await _known(here, "change_t", "row-a")
        current_at = here.clock
        await _evict(here, "change_t", ["b", "c", "d", "e"])
        await there.bump("change_t", ["row-a"])
        deadline = time.monotonic() + 5
        # The message comes over Redis pub/sub: polled, there is no event to wait on.
        while here.unchanged(names, snapshot, current_at) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        assert here.unchanged(names, snapshot, current_at) is False
        await _evict(here, "change_t", ["f", "g", "h", "i"])  # the change forgotten in turn
        assert ("change_t", "row-a") not in here._mirror
        assert here.unchanged(names, snapshot, current_at) is None
        # An entry known current after the change is trusted again.
        _, fresh = await _known(here, "change_t", "row-a")
        assert fresh != snapshot
        fresh_at = here.clock
        await _evict(here, "change_t", ["j", "k", "l", "m"])
        assert here.unchanged(names, fresh, fresh_at) is True
        assert here.unchanged(names, snapshot, current_at) is None


async def test_after_a_reset_no_absent_name_is_trusted(redis_db_url: str) -> None:
    """The mirror cleared (the invalidation channel lost and back) forgets every change it
    heard of: an entry known current before is not trusted for a name read again since."""
    async with _attached(redis_db_url, "outlive-reset-test", mirror_max=4) as generations:
        names, snapshot = await _known(generations, "reset_t", "row-a")
        current_at = generations.clock
        generations.reset("test")
        assert generations.unchanged(names, snapshot, current_at) is None
        assert await generations.snapshot("reset_t", ["b"]) is not None  # the epoch read again
        assert generations.unchanged(names, snapshot, current_at) is None


async def test_an_entry_is_not_current_for_other_names(redis_db_url: str) -> None:
    """The names an entry was stored with are compared too: a plan naming other relations
    (the same number, another name) never validates it."""
    async with _attached(redis_db_url, "outlive-names-test") as generations:
        names, snapshot = await _known(generations, "names_t", "a")
        other, _ = await _known(generations, "names_t", "b")
        assert generations.unchanged(other, snapshot, generations.clock) is False
        assert generations.unchanged(other[:1], snapshot, generations.clock) is False
        assert generations.unchanged(names, snapshot, generations.clock) is True
