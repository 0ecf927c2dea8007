"""L1 (cache/local.py): LRU by bytes, TTL, the stale store, single-flight; and the L2 entry
encoding (cache/remote.py)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from database_service.cache import CachedResult, LocalCache, decode_entry, encode_entry
from database_service.cache.local import ENTRY_OVERHEAD


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(payload: bytes, clock: Clock, ttl_s: float = 10.0, gens=(("#epoch", 0),)) -> CachedResult:
    return CachedResult(payload, tuple(gens), 1.7e9, ttl_s, clock.now)


def test_lru_bounded_by_bytes() -> None:
    clock = Clock()
    cache = LocalCache(3 * (100 + ENTRY_OVERHEAD), clock=clock)
    for name in "abc":
        assert cache.put(name, entry(b"x" * 100, clock))
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("d", entry(b"x" * 100, clock))
    assert cache.get("b") is None  # the least recently used went
    assert {k for k in "acd" if cache.get(k) is not None} == {"a", "c", "d"}
    assert cache.stats.evictions == 1
    assert cache.bytes == 3 * (100 + ENTRY_OVERHEAD)
    # One big entry evicts several; an entry larger than the cache is refused.
    assert cache.put("big", entry(b"x" * 500, clock))
    assert len(cache) == 1
    assert not cache.put("huge", entry(b"x" * 10_000, clock))


def test_a_tenant_filling_the_cache_evicts_only_itself() -> None:
    """B holds one entry, far within its fair share; A fills the cache many times over: A's
    own oldest entries go, B's stays."""
    clock = Clock()
    size = 100 + ENTRY_OVERHEAD
    cache = LocalCache(10 * size, clock=clock)
    assert cache.put(("b", "balance"), entry(b"x" * 100, clock))
    for i in range(50):
        assert cache.put(("a", f"fill-{i}"), entry(b"x" * 100, clock))
    assert cache.get(("b", "balance")) is not None
    assert cache.bytes <= cache.max_bytes
    assert cache.owner_bytes("b") == size and cache.owner_bytes("a") == 9 * size
    # A's most recent entries are the ones kept.
    assert cache.get(("a", "fill-49")) is not None and cache.get(("a", "fill-40")) is None


def test_room_comes_from_the_owner_holding_the_most() -> None:
    """A fill by an owner within its share takes room from the biggest owner, oldest first:
    A held the whole cache; B and C fill their shares from A's entries."""
    clock = Clock()
    size = 100 + ENTRY_OVERHEAD
    cache = LocalCache(9 * size, clock=clock)
    for i in range(9):
        cache.put(("a", i), entry(b"x" * 100, clock))
    for owner in ("b", "c"):
        for i in range(3):
            cache.put((owner, i), entry(b"x" * 100, clock))
    assert [cache.owner_bytes(o) // size for o in "abc"] == [3, 3, 3]
    assert [i for i in range(9) if cache.get(("a", i)) is not None] == [6, 7, 8]
    # Now C, at its fair share, fills more: it evicts its own oldest, not A's or B's.
    cache.put(("c", 3), entry(b"x" * 100, clock))
    assert cache.get(("c", 0)) is None and cache.owner_bytes("a") == 3 * size
    assert cache.counters()["owners"] == 3


def test_explicit_size_is_counted() -> None:
    clock = Clock()
    cache = LocalCache(1000 + ENTRY_OVERHEAD, clock=clock)
    assert cache.put("a", entry(b"x", clock), size=1000)
    assert cache.bytes == 1000 + ENTRY_OVERHEAD
    assert cache.put("b", entry(b"x", clock), size=10)
    assert cache.get("a") is None


def test_ttl_and_stale_store() -> None:
    clock = Clock()
    cache = LocalCache(10_000, stale_max_age_s=60, clock=clock)
    cache.put("a", entry(b"v1", clock, ttl_s=5))
    clock.now += 4
    assert cache.get("a") is not None
    clock.now += 2
    assert cache.get("a") is None  # expired
    assert cache.stats.expirations == 1
    stale = cache.stale("a")
    assert stale is not None and stale.payload == b"v1"
    clock.now += 100
    assert cache.stale("a") is None  # past stale_max_age_s
    # An invalidated entry stays available to the fallback; a new fill replaces it.
    cache.put("b", entry(b"old", clock))
    cache.discard("b")
    assert cache.get("b") is None
    assert cache.stale("b").payload == b"old"  # type: ignore[union-attr]
    cache.put("b", entry(b"new", clock))
    assert cache.stale("b").payload == b"new"  # type: ignore[union-attr]
    cache.clear(keep_stale=False)
    assert cache.stale("b") is None


def test_stale_store_is_bounded() -> None:
    clock = Clock()
    cache = LocalCache(100_000, stale_max_bytes=2 * (100 + ENTRY_OVERHEAD), clock=clock)
    for name in "abc":
        cache.put(name, entry(b"x" * 100, clock))
        cache.discard(name)
    assert cache.stale("a") is None
    assert cache.stale("b") is not None and cache.stale("c") is not None


async def test_single_flight_runs_the_loader_once() -> None:
    cache = LocalCache(10_000)
    calls = 0
    release = asyncio.Event()

    async def loader() -> bytes:
        nonlocal calls
        calls += 1
        await release.wait()
        return b"rows"

    tasks = [asyncio.create_task(cache.single_flight("k", loader)) for _ in range(50)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*tasks) == [b"rows"] * 50
    assert calls == 1
    assert cache.stats.single_flight_waits == 49
    # Afterwards nothing is remembered: the next call loads again.
    assert await cache.single_flight("k", loader) == b"rows"
    assert calls == 2


async def test_single_flight_exception_reaches_all_and_is_not_cached() -> None:
    cache = LocalCache(10_000)
    calls = 0

    async def failing() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    results = await asyncio.gather(
        *(cache.single_flight("k", failing) for _ in range(10)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(r, RuntimeError) for r in results)

    async def ok() -> bytes:
        return b"fine"

    assert await cache.single_flight("k", ok) == b"fine"


async def test_single_flight_survives_a_cancelled_caller() -> None:
    cache = LocalCache(10_000)
    release = asyncio.Event()

    async def loader() -> int:
        await release.wait()
        return 7

    first = asyncio.create_task(cache.single_flight("k", loader))
    second = asyncio.create_task(cache.single_flight("k", loader))
    await asyncio.sleep(0.01)
    first.cancel()
    release.set()
    assert await second == 7
    with pytest.raises(asyncio.CancelledError):
        await first


def test_entry_encoding_round_trip() -> None:
    result = CachedResult(b"\x00payload\xff", (("#epoch", 3), ("t_x.a.b|c", 2**40)), 1.7e9, 2.5)
    decoded = decode_entry(encode_entry(result), now=1.7e9 + 1)
    assert decoded is not None
    assert decoded.payload == result.payload
    assert decoded.generations == result.generations
    assert (decoded.stored_at, decoded.ttl_s) == (result.stored_at, result.ttl_s)
    assert 1.4 < decoded.remaining_s() < 1.6  # one second of its TTL already gone


def test_entry_encoding_empty_payload_and_generations() -> None:
    result = CachedResult(b"", (), 1.0, 1.0)
    decoded = decode_entry(encode_entry(result))
    assert decoded is not None and decoded.payload == b"" and decoded.generations == ()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"DBSC",
        b"nope" + b"\x00" * 40,
        b"DBSC\x02" + b"\x00" * 40,  # a future version
        struct.pack(">4sBddH", b"DBSC", 1, 1.0, 1.0, 5),  # generations missing
        struct.pack(">4sBddH", b"DBSC", 1, 1.0, 1.0, 1) + b"\x00\x10ab",  # name truncated
        struct.pack(">4sBddH", b"DBSC", 1, 1.0, 1.0, 1) + b"\x00\x01\xff" + b"\x00" * 8,
        struct.pack(">4sBddH", b"DBSC", 1, float("nan"), 1.0, 0),
        struct.pack(">4sBddH", b"DBSC", 1, 1.0, -1.0, 0),
        b'{"json": "from another program"}',
    ],
)
def test_corrupt_entries_are_misses(data: bytes) -> None:
    assert decode_entry(data) is None


def test_a_full_cache_adds_nothing_to_a_full_collections_walk() -> None:
    """Entries are exact tuples of atomic values, which the collector stops tracking once it
    has seen them: a cache of many entries does not lengthen every full collection."""
    import gc

    clock = Clock()
    cache = LocalCache(10_000 * (100 + ENTRY_OVERHEAD), clock=clock)
    for i in range(1_000):
        key = ("tenant-a", f"key-{i}")
        assert cache.put(key, entry(b"x" * 100, clock, gens=(("t.users", i), ("#epoch", 0))))
    # A tuple is let go when every item already was: a pass may visit it before its items
    # (younger generations are merged in that order), so each level of nesting (the
    # generations' pairs, the generations, the entry) may take one more pass.
    for _ in range(3):
        gc.collect()
    slots = list(cache._entries.values())
    assert len(slots) == 1_000 and not any(gc.is_tracked(slot) for slot in slots)
    # What a caller gets is the result it stored, equal and complete.
    got = cache.get(("tenant-a", "key-7"))
    assert got == entry(b"x" * 100, clock, gens=(("t.users", 7), ("#epoch", 0)))
    assert got is not None and got.stored_mono == clock.now
    cache.discard(("tenant-a", "key-7"))
    stale = cache.stale(("tenant-a", "key-7"))
    assert stale == got


def test_an_entry_keeps_when_its_generations_were_current() -> None:
    cache = LocalCache(1_000_000)
    cache.put(("t", "k"), CachedResult.new(b"x", (("#epoch", 1),), 60), current_at=42)
    hit = cache.get(("t", "k"))
    assert hit is not None and hit.current_at == 42
    cache.put(("t", "l"), CachedResult.new(b"x", (("#epoch", 1),), 60))
    unknown = cache.get(("t", "l"))
    assert unknown is not None and unknown.current_at == -1
