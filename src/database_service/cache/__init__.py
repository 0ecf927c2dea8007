"""The two-level result cache and the key-value store (issue #11).

Building blocks: cache keys that cannot cross tenants or users (``keys``), the cacheability
of a statement from its parse tree (``policy``), L1 in the process (``local``), L2 in Redis
with a per-tenant quota (``remote``), relation generations and invalidation across instances and
from PostgreSQL's notifications (``generations``), and key-value operations (``kv``).
``ResultCache`` puts L1, L2 and the generations together.

The contract, for the documentation of the wiring:

- an instance never serves a result older than its own acknowledged write (``invalidate`` raises
  the generations, in Redis and locally, before it returns; call it after the commit and before
  answering);
- across instances, staleness is bounded by the invalidation lag (Redis pub/sub; measured, see
  ``Generations.on_lag``); while the channel is down no snapshot is given, so nothing is served
  from the cache (``serve_when_detached`` relaxes that);
- a write that bypasses the service is seen through PostgreSQL's notifications, bounded by the
  notification's delivery plus the lag;
- TTL is the last line of defence.

The flow of a cacheable read::

    verdict = policy.analyse(sql, schema)                     # cacheable? which relations
    key = result_key(tenant, user_id, sql, params)
    snap = await cache.snapshot(tenant, verdict.relations)    # BEFORE the query runs
    hit = await cache.lookup(tenant, key, verdict.relations, snapshot=snap)
    if hit is None and snap is not None:
        payload = await local.single_flight((tenant, key), run_query_and_encode)
        await cache.fill(tenant, key, snap, payload, ttl_s)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from database_service.cache.generations import (
    CHANNEL,
    EPOCH,
    PG_CHANNEL,
    Generations,
    InvalidationState,
    PostgresInvalidationListener,
    Snapshot,
    parse_notification,
)
from database_service.cache.keys import (
    MAX_KV_KEY_BYTES,
    UncacheableParameter,
    canonical_statement,
    generations_key,
    kv_key,
    result_key,
    tenant_prefix,
)
from database_service.cache.kv import (
    DEFAULT_TENANT_MAX_BYTES,
    KEY_OVERHEAD_BYTES,
    MAX_MGET_BYTES,
    MAX_MGET_KEYS,
    MAX_VALUE_BYTES,
    InMemoryKeyValueStore,
    KeyValueStore,
    PostgresKeyValueStore,
    RedisKeyValueStore,
)
from database_service.cache.local import CachedResult, LocalCache, LocalStats
from database_service.cache.policy import (
    IMMUTABLE_FUNCTIONS_SQL,
    VIEW_DEPENDENCIES_SQL,
    Cacheability,
    CachePolicy,
    analyse,
    expand_relations,
    parameters_cacheable,
)
from database_service.cache.remote import (
    RedisState,
    RemoteCache,
    connect_redis,
    decode_entry,
    encode_entry,
)

__all__ = [
    "CHANNEL",
    "DEFAULT_TENANT_MAX_BYTES",
    "EPOCH",
    "IMMUTABLE_FUNCTIONS_SQL",
    "KEY_OVERHEAD_BYTES",
    "MAX_KV_KEY_BYTES",
    "MAX_MGET_BYTES",
    "MAX_MGET_KEYS",
    "MAX_VALUE_BYTES",
    "PG_CHANNEL",
    "VIEW_DEPENDENCIES_SQL",
    "CachePolicy",
    "Cacheability",
    "CachedResult",
    "Generations",
    "InMemoryKeyValueStore",
    "InvalidationState",
    "KeyValueStore",
    "LocalCache",
    "LocalStats",
    "PostgresInvalidationListener",
    "PostgresKeyValueStore",
    "RedisKeyValueStore",
    "RedisState",
    "RemoteCache",
    "ResultCache",
    "Snapshot",
    "UncacheableParameter",
    "analyse",
    "canonical_statement",
    "connect_redis",
    "decode_entry",
    "encode_entry",
    "expand_relations",
    "generations_key",
    "kv_key",
    "parameters_cacheable",
    "parse_notification",
    "result_key",
    "tenant_prefix",
]


class ResultCache:
    """L1 (always), L2 (optional, Redis) and the generations, behind one small API.

    An entry is served only when the generations it was stored with equal the current
    snapshot; an L2 hit is promoted to L1 for what remains of its TTL. L2 requires cluster
    generations (the numbers in L2 entries must mean the same in every instance). The
    generations' ``on_reset`` clears L1 (entries stay available to the stale fallback)."""

    def __init__(
        self,
        *,
        local: LocalCache,
        generations: Generations,
        remote: RemoteCache | None = None,
    ) -> None:
        if remote is not None and generations.mode != "cluster":
            raise ValueError("an L2 cache needs Redis-backed generations (Generations(url))")
        self.local = local
        self.remote = remote
        self.generations = generations
        self.lookups = 0
        self.l1_hits = 0
        self.invalidations = 0
        self.fills = 0
        self.fills_skipped = 0
        self.l2_hits = 0
        self.l2_misses = 0
        self.resets = 0
        generations.on_reset.append(self._reset)

    def _reset(self, reason: str) -> None:
        self.resets += 1
        self.local.clear(keep_stale=True)

    async def snapshot(self, tenant: str, relations: Iterable[str]) -> Snapshot | None:
        """The generations to store a result with: take them before the query runs. None:
        the numbers cannot be trusted now, run uncached."""
        return await self.generations.snapshot(tenant, relations)

    async def snapshot_of(self, tenant: str, names: tuple[tuple[str, str], ...]) -> Snapshot | None:
        """``snapshot`` of what ``Generations.names`` made (kept by a reader that repeats)."""
        return await self.generations.snapshot_of(tenant, names)

    async def lookup(
        self,
        tenant: str,
        key: str,
        relations: Iterable[str],
        *,
        snapshot: Snapshot | None = None,
        local: bool = True,
    ) -> CachedResult | None:
        """A fresh entry for ``key`` (L1 unless ``local`` is false, then L2), or None.
        ``snapshot``: taken just before (no await between), so current now."""
        current = snapshot if snapshot is not None else await self.snapshot(tenant, relations)
        current_at = self.generations.clock  # when ``current`` is current (before L2's await)
        if current is None:
            self.lookups += 1
            return None
        if local:
            hit = self.local_hit(tenant, key, current)
            if hit is not None:
                return hit
        if self.remote is None:
            return None
        remote = await self.remote.get(tenant, key)
        if remote is None or remote.generations != current:
            self.l2_misses += 1
            return None
        self.l2_hits += 1
        self.local.put((tenant, key), remote, len(remote.payload), current_at=current_at)
        return remote

    def local_unchanged(
        self, tenant: str, key: str, names: tuple[tuple[str, str], ...]
    ) -> CachedResult | None:
        """``lookup`` in L1 alone, without a snapshot: a fresh entry whose generations are
        still current (``Generations.unchanged``, which knows that of names the mirror no
        longer holds), or None (counted as a lookup either way; L2 is ``lookup``'s)."""
        self.lookups += 1
        local_key = (tenant, key)
        hit = self.local.get(local_key)
        if hit is None:
            return None
        current = self.generations.unchanged(names, hit.generations, hit.current_at)
        if current:
            self.l1_hits += 1
            return hit
        if current is False:
            self.local.discard(local_key)  # invalidated: kept for the stale fallback
        return None

    def local_hit(self, tenant: str, key: str, current: Snapshot) -> CachedResult | None:
        """``lookup`` in L1 alone, with the generations ``current`` (a ``snapshot`` of now):
        a fresh entry, or None (counted as a lookup either way; L2 is ``lookup``'s)."""
        self.lookups += 1
        local_key = (tenant, key)
        hit = self.local.get(local_key)
        if hit is not None:
            if hit.generations == current:
                self.l1_hits += 1
                return hit
            self.local.discard(local_key)  # invalidated: kept for the stale fallback
        return None

    async def fill(
        self,
        tenant: str,
        key: str,
        generations: Snapshot,
        payload: bytes,
        ttl_s: float,
    ) -> bool:
        """Store a result read with ``generations`` (the snapshot taken before the query).
        Skipped when a write has moved the generations since: the result may predate it."""
        relations = [r for r, _ in generations if r != EPOCH]
        current = await self.generations.snapshot(tenant, relations)
        if current != generations or ttl_s <= 0:
            self.fills_skipped += 1
            return False
        result = CachedResult.new(payload, generations, ttl_s)
        self.local.put((tenant, key), result, len(payload), current_at=self.generations.clock)
        if self.remote is not None and self.generations.attached:
            await self.remote.put(tenant, key, result, ttl_s)
        self.fills += 1
        return True

    async def invalidate(self, tenant: str, relations: Iterable[str]) -> None:
        """An own committed write to ``relations``: every result that read one of them is
        invalid here when this returns, and everywhere after the invalidation lag."""
        rels = list(relations)
        if rels:
            self.invalidations += 1
            await self.generations.bump(tenant, rels)

    async def stale(
        self, tenant: str, key: str, *, max_age_s: float | None = None
    ) -> CachedResult | None:
        """The last result of ``key``, fresh or not (the fallback while PostgreSQL is
        unreachable; show its ``age_s()``): this process's (L1 and its stale store), else the
        one any instance left in L2, which keeps entries past their TTL for the purpose."""
        kept = self.local.stale((tenant, key), max_age_s=max_age_s)
        if kept is not None or self.remote is None:
            return kept
        limit = self.local.stale_max_age_s if max_age_s is None else max_age_s
        return await self.remote.stale(tenant, key, max_age_s=limit)

    def stats(self) -> dict[str, object]:
        l1 = self.local.counters()
        l2 = self.remote.counters() if self.remote is not None else None
        return {
            "lookups": self.lookups,
            "l1_hits": self.l1_hits,
            "l1": l1,
            "l2": l2,
            "l2_state": self.remote.state.to_dict() if self.remote is not None else None,
            "l2_hits": self.l2_hits,
            "l2_misses": self.l2_misses,
            "fills": self.fills,
            "fills_skipped": self.fills_skipped,
            "invalidations": self.invalidations,
            "resets": self.resets,
            "hit_rate": ((self.l1_hits + self.l2_hits) / self.lookups if self.lookups else None),
            "invalidation": self.generations.state.to_dict(),
        }

    async def aclose(self) -> None:
        with contextlib.suppress(ValueError):
            self.generations.on_reset.remove(self._reset)
        if self.remote is not None:
            await self.remote.aclose()
        await self.generations.aclose()
        self.local.clear(keep_stale=False)
