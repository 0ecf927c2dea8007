"""L2: results shared by every instance, in Redis (DragonflyDB in production), per tenant.

Layout, all under the tenant's hash tag (one cluster slot per tenant, so one Lua script may
touch them together)::

    dbsvc:{<tenant>}:r:<key>    the encoded entry (``encode_entry``), with PX = its TTL
    dbsvc:{<tenant>}:lru        sorted set: <key> scored by last access (ms)
    dbsvc:{<tenant>}:sizes      hash: <key> → size in bytes; field "#" holds their sum

**Quota.** ``put`` runs ``_PUT`` atomically: it replaces the key's old size, then, while the
tenant's sum exceeds ``tenant_quota_bytes``, pops the tenant's least recently used member and
forgets its size, deleting the entry only if it still exists. Only the tenant's own keys are
named in the script, so one tenant can never evict another's. Entries expire by themselves
(PX): their bookkeeping stays until eviction reaches them (the sum over-counts dead entries
meanwhile, so a tenant near its quota may evict a little early — never over-use), and the
bookkeeping keys get a TTL no shorter than the longest entry's, so a tenant that stops
writing leaves nothing behind. An entry alone larger than the quota is not stored.

**Failure.** Every call is bounded by ``timeout_s`` (50 ms by default) and raises nothing: a
failure is a miss (``get`` → None, ``put`` → False) and flips ``state`` to down with the error
and the time. While down, calls skip Redis entirely until the next retry time (backoff from
0.5 s to 5 s); the first call after it probes, and success flips the state back to up.

**Encoding.** ``encode_entry``: magic ``DBSC``, a version byte, stored-at wall time and TTL
(float64), the generations (count, then per relation a length-prefixed UTF-8 name and an int64),
then the payload. ``decode_entry`` returns None for anything else (corrupt, truncated, foreign,
a future version): a miss, never an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from database_service.cache.keys import tenant_prefix
from database_service.cache.local import CachedResult

__all__ = [
    "RedisState",
    "RemoteCache",
    "connect_redis",
    "decode_entry",
    "encode_entry",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAGIC = b"DBSC"
_VERSION = 1
_HEADER = struct.Struct(">4sBddH")
_NAME_LEN = struct.Struct(">H")
_GENERATION = struct.Struct(">q")
_MIN_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0

# KEYS: entry, lru, sizes. ARGV: value, ttl_ms, quota, now_ms, member, size.
# Returns the number of entries evicted, or -1 when the entry alone exceeds the quota.
# Victims are keys the script computes (the tenant's own prefix + a member of its own set):
# DragonflyDB needs the flag below for that; Redis reads the line as a comment.
_PUT = """--!df flags=allow-undeclared-keys
local size = tonumber(ARGV[6])
local quota = tonumber(ARGV[3])
if size > quota then return -1 end
local member = ARGV[5]
local old = tonumber(redis.call('HGET', KEYS[3], member) or '0')
local total = tonumber(redis.call('HGET', KEYS[3], '#') or '0') - old + size
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[3], member, size)
-- Out of the set while evicting (another instance's clock may have scored others later).
redis.call('ZREM', KEYS[2], member)
local evicted = 0
local prefix = string.sub(KEYS[1], 1, string.len(KEYS[1]) - string.len(member))
while total > quota do
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
    if #oldest == 0 then break end
    local victim = oldest[1]
    total = total - tonumber(redis.call('HGET', KEYS[3], victim) or '0')
    redis.call('ZREM', KEYS[2], victim)
    redis.call('HDEL', KEYS[3], victim)
    evicted = evicted + redis.call('DEL', prefix .. victim)
end
redis.call('ZADD', KEYS[2], ARGV[4], member)
redis.call('HSET', KEYS[3], '#', total)
local ttl = tonumber(ARGV[2])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
return evicted
"""

# KEYS: entry, lru. ARGV: now_ms, member. The value, with its access time refreshed.
_GET = """
local value = redis.call('GET', KEYS[1])
if value then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[2]) end
return value
"""

# KEYS: entry, lru, sizes. ARGV: member.
_DELETE = """
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
if size > 0 then
    redis.call('HINCRBY', KEYS[3], '#', -size)
    redis.call('HDEL', KEYS[3], ARGV[1])
end
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


def encode_entry(result: CachedResult) -> bytes:
    """The bytes stored in Redis for ``result`` (see the module docstring)."""
    parts = [
        _HEADER.pack(_MAGIC, _VERSION, result.stored_at, result.ttl_s, len(result.generations))
    ]
    for relation, generation in result.generations:
        name = relation.encode()
        parts.append(_NAME_LEN.pack(len(name)))
        parts.append(name)
        parts.append(_GENERATION.pack(generation))
    parts.append(result.payload)
    return b"".join(parts)


def decode_entry(data: bytes, *, now: float | None = None) -> CachedResult | None:
    """The entry ``encode_entry`` made, or None for anything else. ``stored_mono`` is rebuilt
    from the wall-clock age, so expiry keeps working in another process."""
    try:
        magic, version, stored_at, ttl_s, count = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC or version != _VERSION:
            return None
        offset = _HEADER.size
        generations = []
        for _ in range(count):
            (length,) = _NAME_LEN.unpack_from(data, offset)
            offset += _NAME_LEN.size
            name = data[offset : offset + length]
            if len(name) != length:
                return None
            offset += length
            (generation,) = _GENERATION.unpack_from(data, offset)
            offset += _GENERATION.size
            generations.append((name.decode(), generation))
    except (struct.error, UnicodeDecodeError, TypeError):
        return None
    if not (math.isfinite(ttl_s) and ttl_s >= 0 and math.isfinite(stored_at)):
        return None
    wall = time.time() if now is None else now
    return CachedResult(
        bytes(data[offset:]),
        tuple(generations),
        stored_at,
        ttl_s,
        time.monotonic() - max(0.0, wall - stored_at),
    )


def connect_redis(url: str, *, timeout_s: float, **options: Any) -> aioredis.Redis:
    """A client that fails fast: socket timeouts at ``timeout_s`` and no retries of its own
    (callers decide; redis-py retries three times by default, which would triple a timeout).
    hiredis parses replies when installed (redis-py picks it up by itself)."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


@dataclass(frozen=True, slots=True)
class RedisState:
    """What health shows: ``status`` up or down, the last error, since when (wall time)."""

    status: Literal["up", "down"]
    last_error: str | None
    since: float

    def to_dict(self) -> dict[str, object]:
        return {"status": self.status, "last_error": self.last_error, "since": self.since}


class _Breaker:
    """Up/down bookkeeping shared by the Redis users: fail fast while down, probe after a
    backoff, flip back up on the first success."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.state = RedisState("up", None, time.time())
        self._retry_at = 0.0
        self._backoff = _MIN_BACKOFF_S
        self.failures = 0

    def allow(self) -> bool:
        if self.state.status == "up":
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._backoff  # this caller probes; the others keep skipping
        return True

    def succeeded(self) -> None:
        if self.state.status != "up":
            log.info("%s: Redis is reachable again", self.what)
            self.state = RedisState("up", None, time.time())
        self._backoff = _MIN_BACKOFF_S

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.state.status == "up":
            log.warning("%s: Redis failed, serving without it: %s", self.what, error)
            self.state = RedisState("down", error, time.time())
        else:
            self.state = RedisState("down", error, self.state.since)
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_S)
        self._retry_at = time.monotonic() + self._backoff

    async def call(self, timeout_s: float, operation: Callable[[], Awaitable[T]]) -> T | None:
        """``operation`` within ``timeout_s``; None when skipped or failed (state updated)."""
        if not self.allow():
            return None
        try:
            async with asyncio.timeout(timeout_s):
                result = await operation()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self.failed(exc)
            return None
        self.succeeded()
        return result


class RemoteCache:
    """The L2 cache. Owns its Redis client (``aclose`` closes it) unless one is passed."""

    def __init__(
        self,
        url: str | None = None,
        *,
        tenant_quota_bytes: int,
        timeout_s: float = 0.05,
        client: aioredis.Redis | None = None,
        stale_keep_s: float = 0.0,
    ) -> None:
        if client is None:
            if url is None:
                raise ValueError("a Redis URL or client is required")
            client = connect_redis(url, timeout_s=timeout_s)
            self._owns_client = True
        else:
            self._owns_client = False
        self.redis = client
        self.tenant_quota_bytes = tenant_quota_bytes
        self.timeout_s = timeout_s
        # Entries outlive their TTL in Redis by this much, for the stale fallback of any
        # instance while PostgreSQL is down (``get`` still treats them as expired at their TTL).
        self.stale_keep_s = stale_keep_s
        self.stale_hits = 0
        self._breaker = _Breaker("cache L2")
        self._put = client.register_script(_PUT)
        self._get = client.register_script(_GET)
        self._delete = client.register_script(_DELETE)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.rejected = 0
        self.corrupt = 0

    @property
    def state(self) -> RedisState:
        return self._breaker.state

    async def ping(self) -> bool:
        """A round trip (health), within the breaker's backoff: what brings a ``down`` state
        back to ``up`` when nothing else uses L2 (reads skip it while invalidation is down)."""
        return bool(await self._breaker.call(self.timeout_s, self.redis.ping))

    @staticmethod
    def _keys(tenant: str, key: str) -> list[bytes]:
        prefix = tenant_prefix(tenant)
        return [prefix + b"r:" + key.encode(), prefix + b"lru", prefix + b"sizes"]

    async def get(self, tenant: str, key: str) -> CachedResult | None:
        """The tenant's entry for ``key``, or None (absent, expired, corrupt, Redis down)."""
        keys = self._keys(tenant, key)
        now_ms = int(time.time() * 1000)
        data = await self._breaker.call(
            self.timeout_s, lambda: self._get(keys=keys[:2], args=[now_ms, key])
        )
        if data is None:
            self.misses += 1
            return None
        result = decode_entry(data)
        if result is None:
            self.corrupt += 1
            self.misses += 1
            return None
        if result.remaining_s() <= 0:
            self.misses += 1
            return None
        self.hits += 1
        return result

    async def stale(self, tenant: str, key: str, *, max_age_s: float) -> CachedResult | None:
        """The tenant's last entry for ``key``, expired or invalidated or not, if stored within
        ``max_age_s``: the fallback when PostgreSQL cannot answer (None when Redis cannot
        either)."""
        keys = self._keys(tenant, key)
        now_ms = int(time.time() * 1000)
        data = await self._breaker.call(
            self.timeout_s, lambda: self._get(keys=keys[:2], args=[now_ms, key])
        )
        result = None if data is None else decode_entry(data)
        if result is None or result.age_s() > max_age_s:
            return None
        self.stale_hits += 1
        return result

    async def put(
        self, tenant: str, key: str, result: CachedResult, ttl_s: float | None = None
    ) -> bool:
        """Store ``result`` for ``ttl_s`` (its own TTL by default) within the tenant's quota,
        evicting the tenant's least recently used entries. False when not stored."""
        ttl_ms = int((result.ttl_s if ttl_s is None else ttl_s) * 1000)
        if ttl_ms <= 0:
            return False
        ttl_ms += int(self.stale_keep_s * 1000)
        data = encode_entry(result)
        keys = self._keys(tenant, key)
        size = len(data) + len(keys[0])
        now_ms = int(time.time() * 1000)
        evicted = await self._breaker.call(
            self.timeout_s,
            lambda: self._put(
                keys=keys, args=[data, ttl_ms, self.tenant_quota_bytes, now_ms, key, size]
            ),
        )
        if evicted is None:
            return False
        if int(evicted) < 0:
            self.rejected += 1
            return False
        self.evictions += int(evicted)
        return True

    async def discard(self, tenant: str, key: str) -> None:
        keys = self._keys(tenant, key)
        await self._breaker.call(self.timeout_s, lambda: self._delete(keys=keys, args=[key]))

    async def tenant_bytes(self, tenant: str) -> int | None:
        """The bytes the tenant's entries count against its quota (None when down)."""
        value = await self._breaker.call(
            self.timeout_s, lambda: self.redis.hget(self._keys(tenant, "")[2], "#")
        )
        return None if value is None else int(value)

    def counters(self) -> dict[str, object]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "rejected": self.rejected,
            "corrupt": self.corrupt,
            "stale_hits": self.stale_hits,
            "failures": self._breaker.failures,
            "state": self.state.to_dict(),
        }

    async def aclose(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
