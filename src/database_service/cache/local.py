"""L1: the in-process result cache, bounded by bytes, with single-flight loading and a stale
store for the fallback when PostgreSQL is down.

Entries are ``CachedResult``: the payload the caller serialised (this module never looks
inside), the generations of the relations it read (taken before the query ran; the facade
compares them with the current ones), when it was stored and its TTL. The LRU is bounded by the
sum of entry sizes (the encoded length the caller gives, plus the key), so a few large results
cannot hide behind an entry count.

Tenants share the bound but cannot evict one another: every entry has an owner (the tenant,
the first element of the ``(tenant, key)`` keys the facade uses), and when a fill needs room the
filler's own oldest entries go first while it holds more than its fair share (the bound divided
by the owners holding entries); otherwise the oldest entries of the owner holding the most. So
an owner within its fair share loses entries only to expiry, invalidation and its own fills,
whatever another tenant caches (a tenant filling L1 with large results evicts itself).

The stale store is separate and smaller: an entry that leaves the LRU because it expired, was
found invalidated, or was evicted for room goes there (a later fill of the same key replaces
it), and stays up to ``stale_max_age_s`` after it was stored, within ``stale_max_bytes``. A
separate store means fresh entries never compete with stale ones for room, and a lookup never
has to skip stale entries: the fallback is the only reader.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

__all__ = ["CachedResult", "LocalCache", "LocalStats"]

T = TypeVar("T")

# Bookkeeping per entry (dict slot, key, dataclass) counted against the byte bound.
ENTRY_OVERHEAD = 200


@dataclass(frozen=True, slots=True)
class CachedResult:
    """A cached result. ``stored_at`` is wall-clock time (comparable across processes, shown
    as the age of a stale answer); ``stored_mono`` the monotonic time in this process, used
    for expiry (a wall-clock jump cannot revive an entry)."""

    payload: bytes
    generations: tuple[tuple[str, int], ...]
    stored_at: float
    ttl_s: float
    stored_mono: float = field(default=0.0, compare=False)
    # The generations' clock when ``generations`` were known to be current (``put``'s
    # ``current_at``; -1: never known here). See ``Generations.unchanged``.
    current_at: int = field(default=-1, compare=False)

    @classmethod
    def new(
        cls, payload: bytes, generations: tuple[tuple[str, int], ...], ttl_s: float
    ) -> CachedResult:
        return cls(payload, generations, time.time(), ttl_s, time.monotonic())

    def expires_mono(self) -> float:
        return self.stored_mono + self.ttl_s

    def age_s(self, now: float | None = None) -> float:
        """Seconds since it was stored (wall clock; never negative)."""
        return max(0.0, (time.time() if now is None else now) - self.stored_at)

    def remaining_s(self, now_mono: float | None = None) -> float:
        return self.expires_mono() - (time.monotonic() if now_mono is None else now_mono)


@dataclass(slots=True)
class LocalStats:
    hits: int = 0
    misses: int = 0
    expirations: int = 0
    evictions: int = 0
    invalidations: int = 0
    stale_hits: int = 0
    single_flight_waits: int = 0
    loads: int = 0

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


# An entry as the LRU holds it: an exact tuple of atomic values (payload, generations,
# stored_at, ttl_s, stored_mono, current_at, size, owner). The collector stops tracking such a
# tuple once it has looked at it, so a full cache adds nothing to a full collection's walk.
# Held as objects (a slot and its CachedResult, two tracked objects per entry), ~100,000
# entries made every full collection of a serving process take 40-160 ms, every ~7 s
# (bench/cache.py, 2026-12-04).
_Slot = tuple[bytes, tuple[tuple[str, int], ...], float, float, float, int, int, Hashable]
_TTL: Final = 3
_STORED_MONO: Final = 4
_SIZE: Final = 6
_OWNER: Final = 7


def _slot(result: CachedResult, size: int, owner: Hashable, current_at: int) -> _Slot:
    return (
        result.payload, result.generations, result.stored_at, result.ttl_s, result.stored_mono,
        current_at, size, owner,
    )  # fmt: skip


def _result(slot: _Slot) -> CachedResult:
    return CachedResult(slot[0], slot[1], slot[2], slot[3], slot[4], slot[5])


def _owner_of(key: Hashable) -> Hashable:
    """The tenant of a ``(tenant, key)`` key; other keys share one anonymous owner."""
    return key[0] if type(key) is tuple and key else None


class _Owned:
    """One owner's entries in LRU order, and their bytes."""

    __slots__ = ("bytes", "lru")

    def __init__(self) -> None:
        self.lru: OrderedDict[Hashable, None] = OrderedDict()
        self.bytes = 0


class LocalCache:
    """An LRU of ``CachedResult`` bounded by bytes; not thread-safe (one event loop)."""

    def __init__(
        self,
        max_bytes: int,
        *,
        stale_max_bytes: int | None = None,
        stale_max_age_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.stale_max_bytes = max_bytes // 4 if stale_max_bytes is None else stale_max_bytes
        self.stale_max_age_s = stale_max_age_s
        self._clock = clock
        self._entries: dict[Hashable, _Slot] = {}
        self._owners: dict[Hashable, _Owned] = {}
        self._bytes = 0
        self._stale: OrderedDict[Hashable, _Slot] = OrderedDict()
        self._stale_bytes = 0
        self._flights: dict[Hashable, asyncio.Future[Any]] = {}
        self.stats = LocalStats()

    # -- the LRU ---------------------------------------------------------------------------

    def __contains__(self, key: Hashable) -> bool:
        """Whether an entry is held for ``key`` (expired or not), not counted as a lookup."""
        return key in self._entries

    def get(self, key: Hashable) -> CachedResult | None:
        """The entry, or None when absent or expired (an expired one moves to the stale store)."""
        slot = self._entries.get(key)
        if slot is None:
            self.stats.misses += 1
            return None
        if slot[_STORED_MONO] + slot[_TTL] <= self._clock():
            self._remove(key, to_stale=True)
            self.stats.expirations += 1
            self.stats.misses += 1
            return None
        self._owners[slot[_OWNER]].lru.move_to_end(key)
        self.stats.hits += 1
        return _result(slot)

    def put(
        self,
        key: Hashable,
        result: CachedResult,
        size: int | None = None,
        *,
        current_at: int = -1,
    ) -> bool:
        """Store ``result`` (``size``: its encoded length; the payload's by default;
        ``current_at``: the generations' clock when its generations were current). Returns
        False when it alone is larger than the cache."""
        total = (len(result.payload) if size is None else size) + ENTRY_OVERHEAD
        if total > self.max_bytes or result.ttl_s <= 0:
            return False
        if key in self._entries:
            self._remove(key, to_stale=False)
        self._drop_stale(key)
        owner = _owner_of(key)
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = _Owned()
        self._entries[key] = _slot(result, total, owner, current_at)
        owned.lru[key] = None
        owned.bytes += total
        self._bytes += total
        while self._bytes > self.max_bytes:
            victim = self._victim(owned)
            self._remove(next(iter(victim.lru)), to_stale=True)
            self.stats.evictions += 1
        return True

    def _victim(self, filler: _Owned) -> _Owned:
        """Whose oldest entry makes room: the filler's while it holds more than its fair
        share, else the owner holding the most (over its share, since the cache is full)."""
        if filler.bytes * len(self._owners) > self.max_bytes:
            return filler
        return max(self._owners.values(), key=lambda owned: owned.bytes)

    def owner_bytes(self, owner: Hashable) -> int:
        owned = self._owners.get(owner)
        return 0 if owned is None else owned.bytes

    def discard(self, key: Hashable, *, invalidated: bool = True) -> None:
        """Drop an entry (kept for the stale fallback)."""
        if key in self._entries:
            self._remove(key, to_stale=True)
            if invalidated:
                self.stats.invalidations += 1

    def clear(self, *, keep_stale: bool = True) -> None:
        """Drop every entry; with ``keep_stale`` they stay available to the fallback."""
        for key in list(self._entries):
            self._remove(key, to_stale=keep_stale)
        if not keep_stale:
            self._stale.clear()
            self._stale_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _remove(self, key: Hashable, *, to_stale: bool) -> None:
        slot = self._entries.pop(key)
        size, owner = slot[_SIZE], slot[_OWNER]
        self._bytes -= size
        owned = self._owners[owner]
        del owned.lru[key]
        owned.bytes -= size
        if not owned.lru:
            del self._owners[owner]
        if to_stale:
            self._keep_stale(key, slot)

    # -- the stale store -------------------------------------------------------------------

    def stale(self, key: Hashable, *, max_age_s: float | None = None) -> CachedResult | None:
        """The last value of ``key``, fresh or not, if stored within ``max_age_s`` (default
        ``stale_max_age_s``): for the fallback when PostgreSQL cannot answer."""
        limit = self.stale_max_age_s if max_age_s is None else min(max_age_s, self.stale_max_age_s)
        now = self._clock()
        slot = self._entries.get(key) or self._stale.get(key)
        if slot is None or now - slot[_STORED_MONO] > limit:
            return None
        self.stats.stale_hits += 1
        return _result(slot)

    def _keep_stale(self, key: Hashable, slot: _Slot) -> None:
        size = slot[_SIZE]
        if self.stale_max_bytes <= 0 or size > self.stale_max_bytes:
            return
        if self._clock() - slot[_STORED_MONO] > self.stale_max_age_s:
            return
        self._drop_stale(key)
        self._stale[key] = slot
        self._stale_bytes += size
        while self._stale_bytes > self.stale_max_bytes:
            _, oldest = self._stale.popitem(last=False)
            self._stale_bytes -= oldest[_SIZE]

    def _drop_stale(self, key: Hashable) -> None:
        slot = self._stale.pop(key, None)
        if slot is not None:
            self._stale_bytes -= slot[_SIZE]

    # -- single flight ---------------------------------------------------------------------

    async def single_flight(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        """Run ``loader`` once for concurrent callers of one key; all get its result or its
        exception. Nothing is remembered afterwards: a failure is not cached, the next caller
        loads again. The load runs in its own task, so a caller that is cancelled does not
        cancel it for the others."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(loader())
            self._flights[key] = flight
            self.stats.loads += 1
            flight.add_done_callback(functools.partial(self._landed, key))
        else:
            self.stats.single_flight_waits += 1
        result: T = await asyncio.shield(flight)
        return result

    def _landed(self, key: Hashable, flight: asyncio.Future[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: no "never retrieved" warning if every waiter left

    def counters(self) -> dict[str, int]:
        return {
            **self.stats.to_dict(),
            "entries": len(self._entries),
            "bytes": self._bytes,
            "owners": len(self._owners),
            "max_bytes": self.max_bytes,
            "stale_entries": len(self._stale),
            "stale_bytes": self._stale_bytes,
        }
