"""Tenant A against tenant B through the generation mirror every serving process keeps of
Redis's numbers (bounded: least recently used names dropped). A fills it with names of its own
— reads of many keys, and writes — so that B's names are dropped; an L1 entry of B then judged
without them (``Generations.unchanged``) is never served after B's row changed, whatever A
evicted before or after that change, and A's reads alone cost B nothing (its entries are still
known current without reading Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from database_service.cache import CachedResult, Generations, LocalCache, ResultCache

MIRROR = 8
VICTIM, ATTACKER = "victim_co", "attacker_co"
ROW = "victim_co.accounts#row:1"


@contextlib.asynccontextmanager
async def _cache(url: str, channel: str, mirror_max: int) -> AsyncIterator[ResultCache]:
    generations = Generations(url, channel=channel, mirror_max=mirror_max)
    await generations.start()
    cache = ResultCache(local=LocalCache(1_000_000), generations=generations)
    try:
        assert await generations.wait_attached()
        yield cache
    finally:
        await cache.aclose()


async def _flood(cache: ResultCache, start: int) -> None:
    """A's reads of keys of its own: as many names as the mirror holds."""
    for n in range(start, start + MIRROR):
        assert await cache.snapshot(ATTACKER, [f"attacker_co.t#row:{n}"]) is not None


async def _victim_entry(cache: ResultCache) -> tuple[tuple[tuple[str, str], ...], str]:
    names = Generations.names(VICTIM, [ROW])
    snapshot = await cache.snapshot_of(VICTIM, names)
    assert snapshot is not None
    assert await cache.fill(VICTIM, "balance", snapshot, b"old balance", 60)
    return names, "balance"


@pytest.mark.parametrize("attacker_writes", [False, True])
async def test_a_tenant_flooding_the_mirror_never_gets_a_changed_entry_served(
    redis_db_url: str, attacker_writes: bool
) -> None:
    channel = f"mirror-attack-{attacker_writes}"
    async with (
        _cache(redis_db_url, channel, MIRROR) as here,
        _cache(redis_db_url, channel, 50_000) as there,
    ):
        names, key = await _victim_entry(here)
        await _flood(here, 0)
        if attacker_writes:  # A's own changes, forgotten in turn: they move the horizon
            await here.invalidate(ATTACKER, [f"attacker_co.t#row:{n}" for n in range(MIRROR)])
            await _flood(here, 100)
        assert (VICTIM, ROW) not in here.generations._mirror
        hit = here.local_unchanged(VICTIM, key, names)
        if attacker_writes:
            assert hit is None  # not known without Redis: read again, never guessed
        else:
            assert hit is not None and hit.payload == b"old balance"  # A's reads cost B nothing
            assert here.generations.state.mirror_reads == MIRROR + 1  # B's name read once
        # B's row changes through another instance; A evicts it again from this mirror.
        await there.invalidate(VICTIM, [ROW])
        deadline = time.monotonic() + 5
        while (VICTIM, ROW) not in here.generations._mirror and time.monotonic() < deadline:  # noqa: ASYNC110 - pub/sub, polled
            await asyncio.sleep(0.005)
        await _flood(here, 200)
        assert (VICTIM, ROW) not in here.generations._mirror
        assert here.local_unchanged(VICTIM, key, names) is None
        # The whole way: the numbers read from Redis have moved, the old entry is no answer.
        snapshot = await here.snapshot_of(VICTIM, names)
        assert snapshot is not None
        assert await here.lookup(VICTIM, key, [ROW], snapshot=snapshot) is None


async def test_an_entry_stored_from_another_tenant_never_validates(redis_db_url: str) -> None:
    """An entry is judged by the names of the read asking: A's names never make B's entry
    (another tenant's key) current, nor B's entry answer under A's key."""
    async with _cache(redis_db_url, "mirror-attack-names", MIRROR) as here:
        names, key = await _victim_entry(here)
        attacker_names = Generations.names(ATTACKER, [ROW])
        assert await here.snapshot_of(ATTACKER, attacker_names) is not None
        assert here.local_unchanged(ATTACKER, key, attacker_names) is None  # not A's entry
        entry = CachedResult.new(b"x", (("#epoch", 0),), 60)
        here.local.put((ATTACKER, "balance"), entry, current_at=here.generations.clock)
        assert here.local_unchanged(ATTACKER, key, attacker_names) is None  # other names
        assert here.local_unchanged(VICTIM, key, names) is not None
