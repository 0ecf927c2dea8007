"""Key-value operations for services (the seed's ``"dragonflydb": {"operation": "set", …}``):
get, set with a TTL, delete, incr, expire, mget — namespaced per tenant by the service.

Every key a caller names goes through ``keys.kv_key``: ``dbsvc:{<tenant>}:kv:`` followed by the
caller's bytes verbatim, so no key — separators, glob characters, braces, NUL, another tenant's
full namespaced key — can reach outside the caller's tenant; no operation takes a pattern.
Values are bytes (a ``str`` is stored as UTF-8) of at most ``MAX_VALUE_BYTES``; reads return
bytes. ``incr`` follows Redis: a missing key counts from 0, a value that is not a 64-bit
integer is refused (``failed_precondition``), not overwritten.

``RedisKeyValueStore`` runs against Redis/DragonflyDB; ``PostgresKeyValueStore`` is the embedded
default (an unlogged table of the control schema: every worker and instance sees the same keys,
a tenant's keys are deleted with it, no tenant's writes can evict another's);
``InMemoryKeyValueStore`` is one process's (tests, tools). Unlike the result cache, a
key-value call is an explicit request: a store unreachable is an error (``unavailable``), not
a silent miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import asyncpg
import redis.asyncio as aioredis

from database_service.cache.keys import kv_key, tenant_prefix
from database_service.cache.remote import connect_redis
from database_service.errors import (
    FailedPrecondition,
    InvalidParameters,
    PayloadTooLarge,
    ResourceExhausted,
    ResultTooLarge,
    Unavailable,
    postgres_unreachable,
    unavailable,
)
from database_service.tenancy.ids import quote_ident

__all__ = [
    "DEFAULT_TENANT_MAX_BYTES",
    "KEY_OVERHEAD_BYTES",
    "MAX_MGET_BYTES",
    "MAX_MGET_KEYS",
    "MAX_VALUE_BYTES",
    "InMemoryKeyValueStore",
    "KeyValueStore",
    "PostgresKeyValueStore",
    "RedisKeyValueStore",
]

MAX_VALUE_BYTES = 1024 * 1024
# How long an exactly-once increment remembers its token: far beyond the outbox's retries (an
# entry is retried for minutes, then failed; an administrator's retry comes within days).
APPLIED_TTL_MS = 7 * 24 * 3600 * 1000
MAX_MGET_KEYS = 1000
# What one mget may answer, in value bytes: 1,000 keys of 1 MiB each would be a gigabyte held
# (and encoded) at once by one request, for any tenant to ask.
MAX_MGET_BYTES = 16 * 1024 * 1024
_INT64 = (-(2**63), 2**63 - 1)
# What a key costs against its tenant's quota besides its key and value bytes: the store's own
# bookkeeping, so a flood of empty values cannot go on for ever (control migration 0017 uses
# the same figure).
KEY_OVERHEAD_BYTES = 64
DEFAULT_TENANT_MAX_BYTES = 256 * 1024 * 1024
# PostgreSQL store: expired keys one reclaim deletes, and reclaims one write tries (``_write``).
_RECLAIM_ROWS = 5000
_RECLAIM_ROUNDS = 4

Key = bytes | str
Value = bytes | str


class KeyValueStore(Protocol):
    async def get(self, tenant: str, key: Key) -> bytes | None: ...

    async def set(
        self, tenant: str, key: Key, value: Value, *, ttl_ms: int | None = None
    ) -> None: ...

    async def delete(self, tenant: str, key: Key) -> bool: ...

    async def incr(self, tenant: str, key: Key, by: int = 1) -> int: ...

    async def incr_once(self, tenant: str, key: Key, by: int, token: str) -> tuple[int, bool]:
        """``incr`` at most once per ``token`` (an outbox entry's id): the number after it and
        whether this call incremented (False: an earlier call with the token already had, and
        its number is returned). The record of the token is kept ``APPLIED_TTL_MS``."""
        ...

    async def expire(self, tenant: str, key: Key, ttl_ms: int) -> bool: ...

    async def mget(self, tenant: str, keys: Sequence[Key]) -> list[bytes | None]: ...

    async def purge(self, tenant: str) -> int:
        """Delete every key of a tenant (it was deleted); how many there were."""
        ...

    async def usage(self, tenant: str) -> int:
        """The bytes the tenant's keys count against its quota (``tenant_max_bytes``): keys and
        values, and ``KEY_OVERHEAD_BYTES`` per key."""
        ...

    async def aclose(self) -> None: ...


def _value(value: Value) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if len(raw) > MAX_VALUE_BYTES:
        raise PayloadTooLarge(
            f"a value may have at most {MAX_VALUE_BYTES} bytes (this one has {len(raw)})"
        )
    return raw


def _ttl(ttl_ms: int | None) -> int | None:
    if ttl_ms is None:
        return None
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms <= 0:
        raise InvalidParameters("ttl_ms must be a positive integer (milliseconds)")
    return ttl_ms


def _by(by: int) -> int:
    if isinstance(by, bool) or not isinstance(by, int) or not _INT64[0] <= by <= _INT64[1]:
        raise InvalidParameters("incr takes a 64-bit integer")
    return by


def _keys(tenant: str, keys: Sequence[Key]) -> list[bytes]:
    if len(keys) > MAX_MGET_KEYS:
        raise InvalidParameters(f"mget takes at most {MAX_MGET_KEYS} keys")
    return [kv_key(tenant, key) for key in keys]


def _too_large(total: int) -> ResultTooLarge:
    return ResultTooLarge(
        f"these keys hold {total} bytes; one mget answers at most {MAX_MGET_BYTES}: ask for"
        " fewer keys at a time"
    )


def _over_quota(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"this tenant's key-value store is full: its keys and values may take {limit} bytes"
        f" ({KEY_OVERHEAD_BYTES} more per key; DBSVC_KV_TENANT_MAX_BYTES): delete keys or give"
        " them a TTL"
    )


def _applied_key(tenant: str, token: str) -> bytes:
    """Where an exactly-once increment records its token: the tenant's namespace, beside (not
    inside) its ``kv:`` keys, so no key a caller names can be it."""
    return tenant_prefix(tenant) + b"applied:" + token.encode("ascii")


# MGET only when the values' lengths add up to at most ARGV[1] (else their total, a number):
# checked and read in one step, so nothing written between is missed.
_MGET_BOUNDED = """
local total = 0
for i = 1, #KEYS do total = total + redis.call('STRLEN', KEYS[i]) end
if total > tonumber(ARGV[1]) then return total end
return redis.call('MGET', unpack(KEYS))
"""

_NOT_INTEGER = "the key's value is not an integer (or incrementing it would overflow 64 bits)"

# The tenant's quota on Redis: its keys' sizes (key + value + KEY_OVERHEAD_BYTES) in a hash,
# their sum in a counter, and the expiry times of keys with a TTL in a sorted set, all under the
# tenant's hash tag beside its ``kv:`` keys (``_books``), kept by the scripts below in the step
# that writes the key. A key that expired is forgotten when it is written again, or when its
# tenant reaches the quota (``_RECLAIM``: up to 256 of its keys due by the server's clock, each
# checked with EXISTS first). Keys written before the quota existed count from their next
# write. Only the tenant's own keys are named, so no tenant's write touches another's.
_BOOKS = """--!df flags=allow-undeclared-keys
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- KEYS[1] the key, [2] sizes, [3] expiries, [4] total; member = the key after the prefix.
local function forget_if_gone(member)
    if redis.call('EXISTS', KEYS[1]) == 1 then return false end
    local stale = tonumber(redis.call('HGET', KEYS[2], member) or '0')
    if stale > 0 then
        redis.call('HDEL', KEYS[2], member)
        redis.call('DECRBY', KEYS[4], stale)
    end
    redis.call('ZREM', KEYS[3], member)
    return true
end
local function reclaim(prefix)
    local due = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms(), 'LIMIT', 0, 256)
    for _, m in ipairs(due) do
        local pttl = redis.call('PTTL', prefix .. m)
        if pttl > 0 then
            redis.call('ZADD', KEYS[3], now_ms() + pttl, m)
        else
            if pttl == -1 then redis.call('ZREM', KEYS[3], m) else
                local stale = tonumber(redis.call('HGET', KEYS[2], m) or '0')
                redis.call('HDEL', KEYS[2], m)
                redis.call('ZREM', KEYS[3], m)
                if stale > 0 then redis.call('DECRBY', KEYS[4], stale) end
            end
        end
    end
end
local function total()
    return tonumber(redis.call('GET', KEYS[4]) or '0')
end
"""

# ARGV: value, ttl_ms ('' for none), quota, member. Returns -1 past the quota, else 1.
_SET = (
    _BOOKS
    + """
local member, quota = ARGV[4], tonumber(ARGV[3])
local size = string.len(member) + string.len(ARGV[1]) + __OVERHEAD__
local old = 0
if not forget_if_gone(member) then
    old = tonumber(redis.call('HGET', KEYS[2], member) or '0')
end
if size > old and total() - old + size > quota then
    reclaim(string.sub(KEYS[1], 1, string.len(KEYS[1]) - string.len(member)))
    if total() - old + size > quota then return -1 end
end
if ARGV[2] == '' then
    redis.call('SET', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[3], member)
else
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[2]), member)
end
redis.call('HSET', KEYS[2], member, size)
redis.call('INCRBY', KEYS[4], size - old)
return 1
"""
)

# The increment and the exactly-once token's record in one step (a script runs atomically), so
# a crash never leaves one without the other. ARGV: by, quota, member; with KEYS[5] and ARGV[4]:
# the token's record and its TTL. Returns {number, 1} (or {recorded number, 0} for a token seen
# before), or -1 past the quota (checked for a new key: an increment of an existing one adds at
# most a few digits).
_INCR = (
    _BOOKS
    + """
local member, quota = ARGV[3], tonumber(ARGV[2])
if KEYS[5] then
    local done = redis.call('GET', KEYS[5])
    if done then return {done, 0} end
end
local old = 0
if forget_if_gone(member) then
    local size = string.len(member) + 20 + __OVERHEAD__
    if total() + size > quota then
        reclaim(string.sub(KEYS[1], 1, string.len(KEYS[1]) - string.len(member)))
        if total() + size > quota then return -1 end
    end
else
    old = tonumber(redis.call('HGET', KEYS[2], member) or '0')
end
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
local size = string.len(member) + string.len(tostring(n)) + __OVERHEAD__
redis.call('HSET', KEYS[2], member, size)
redis.call('INCRBY', KEYS[4], size - old)
if KEYS[5] then redis.call('SET', KEYS[5], n, 'PX', ARGV[4]) end
return {tostring(n), 1}
"""
)

# ARGV: member. Returns how many keys were deleted (0 or 1).
_DELETE = (
    _BOOKS
    + """
local deleted = redis.call('DEL', KEYS[1])
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if old > 0 then
    redis.call('HDEL', KEYS[2], ARGV[1])
    redis.call('DECRBY', KEYS[4], old)
end
redis.call('ZREM', KEYS[3], ARGV[1])
return deleted
"""
)

# ARGV: ttl_ms, member. Returns 1 when the key exists (and now expires then), else 0.
_EXPIRE = (
    _BOOKS
    + """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[3], now_ms() + tonumber(ARGV[1]), ARGV[2])
return 1
"""
)
_SET, _INCR = (script.replace("__OVERHEAD__", str(KEY_OVERHEAD_BYTES)) for script in (_SET, _INCR))


def _books(tenant: str) -> list[bytes]:
    """The tenant's quota bookkeeping keys: sizes, expiries, total (beside, never inside, its
    ``kv:`` keys, so no key a caller names can be one)."""
    prefix = tenant_prefix(tenant)
    return [prefix + b"kvq:sizes", prefix + b"kvq:expiries", prefix + b"kvq:total"]


class RedisKeyValueStore:
    """Key-value operations over Redis; owns its client unless one is passed."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout_s: float = 0.5,
        client: aioredis.Redis | None = None,
        tenant_max_bytes: int = DEFAULT_TENANT_MAX_BYTES,
    ) -> None:
        self.tenant_max_bytes = tenant_max_bytes
        if client is None:
            if url is None:
                raise ValueError("a Redis URL or client is required")
            client = connect_redis(url, timeout_s=timeout_s)
            self._owns_client = True
        else:
            self._owns_client = False
        self.redis = client
        self.timeout_s = timeout_s

    async def _call(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await operation()
        except aioredis.ResponseError as exc:
            if "not an integer" in str(exc) or "overflow" in str(exc):
                raise FailedPrecondition(_NOT_INTEGER) from exc
            raise Unavailable(f"key-value store error: {exc}") from exc
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            raise Unavailable(
                f"the key-value store (Redis) is unreachable: {type(exc).__name__}"
            ) from exc

    async def get(self, tenant: str, key: Key) -> bytes | None:
        name = kv_key(tenant, key)
        value = await self._call(lambda: self.redis.get(name))
        return None if value is None else bytes(value)

    async def set(self, tenant: str, key: Key, value: Value, *, ttl_ms: int | None = None) -> None:
        name, raw, ttl = kv_key(tenant, key), _value(value), _ttl(ttl_ms)
        member = _raw_key(tenant, key)
        done = await self._call(
            lambda: self.redis.eval(
                _SET,
                4,
                name,
                *_books(tenant),
                raw,
                "" if ttl is None else ttl,
                self.tenant_max_bytes,
                member,
            )
        )
        if done == -1:
            raise _over_quota(self.tenant_max_bytes)

    async def delete(self, tenant: str, key: Key) -> bool:
        name, member = kv_key(tenant, key), _raw_key(tenant, key)
        return bool(
            await self._call(lambda: self.redis.eval(_DELETE, 4, name, *_books(tenant), member))
        )

    async def incr(self, tenant: str, key: Key, by: int = 1) -> int:
        number, _ = await self._incr(tenant, key, by, None)
        return number

    async def incr_once(self, tenant: str, key: Key, by: int, token: str) -> tuple[int, bool]:
        return await self._incr(tenant, key, by, _applied_key(tenant, token))

    async def _incr(self, tenant: str, key: Key, by: int, marker: bytes | None) -> tuple[int, bool]:
        name, step, member = kv_key(tenant, key), _by(by), _raw_key(tenant, key)
        keys = [name, *_books(tenant), *([marker] if marker is not None else [])]
        args: list[Any] = [step, self.tenant_max_bytes, member]
        if marker is not None:
            args.append(APPLIED_TTL_MS)
        done = await self._call(lambda: self.redis.eval(_INCR, len(keys), *keys, *args))
        if done == -1:
            raise _over_quota(self.tenant_max_bytes)
        number, fresh = done
        return int(number), bool(fresh)

    async def expire(self, tenant: str, key: Key, ttl_ms: int) -> bool:
        name, ttl, member = kv_key(tenant, key), _ttl(ttl_ms), _raw_key(tenant, key)
        assert ttl is not None
        return bool(
            await self._call(
                lambda: self.redis.eval(_EXPIRE, 4, name, *_books(tenant), ttl, member)
            )
        )

    async def usage(self, tenant: str) -> int:
        """The bytes the tenant's keys count against its quota."""
        used = await self._call(lambda: self.redis.get(_books(tenant)[2]))
        return int(used or 0)

    async def mget(self, tenant: str, keys: Sequence[Key]) -> list[bytes | None]:
        names = _keys(tenant, keys)
        if not names:
            return []
        values = await self._call(
            lambda: self.redis.eval(_MGET_BOUNDED, len(names), *names, MAX_MGET_BYTES)
        )
        if isinstance(values, int):
            raise _too_large(values)
        return [None if v is None else bytes(v) for v in values]

    async def purge(self, tenant: str) -> int:
        pattern = tenant_prefix(tenant) + b"kv:*"
        deleted = 0
        try:
            async for batch in _batches(self.redis.scan_iter(match=pattern, count=1000), 500):
                deleted += int(await self.redis.unlink(*batch))
            await self.redis.unlink(*_books(tenant))
        except (aioredis.RedisError, OSError) as exc:
            raise Unavailable(f"the key-value store is unreachable: {exc}") from exc
        return deleted

    async def aclose(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


class InMemoryKeyValueStore:
    """The embedded key-value store of one process (tests, tools): TTLs, a per-tenant quota like
    the other stores', and a bound on the whole by bytes (LRU eviction across tenants: the one
    store whose keys one tenant's writes can evict, which is why no serving path uses it)."""

    def __init__(
        self,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        clock: Callable[[], float] = time.monotonic,
        tenant_max_bytes: int = DEFAULT_TENANT_MAX_BYTES,
    ) -> None:
        self.max_bytes = max_bytes
        self.tenant_max_bytes = tenant_max_bytes
        self._clock = clock
        # name -> (value, expiry, the tenant it counts against: "" for bookkeeping)
        self._data: OrderedDict[bytes, tuple[bytes, float | None, str]] = OrderedDict()
        self._bytes = 0
        self._usage: dict[str, int] = {}
        self.evictions = 0

    @staticmethod
    def _size(name: bytes, value: bytes, tenant: str) -> int:
        return len(name) - len(tenant_prefix(tenant)) - 3 + len(value) + KEY_OVERHEAD_BYTES

    def _live(self, name: bytes) -> bytes | None:
        item = self._data.get(name)
        if item is None:
            return None
        value, expires, _ = item
        if expires is not None and expires <= self._clock():
            self._drop(name)
            return None
        self._data.move_to_end(name)
        return value

    def _drop(self, name: bytes) -> bool:
        item = self._data.pop(name, None)
        if item is None:
            return False
        value, _, tenant = item
        self._bytes -= len(name) + len(value)
        if tenant:
            self._usage[tenant] -= self._size(name, value, tenant)
        return True

    def _over(self, name: bytes, value: bytes, tenant: str) -> bool:
        """Whether storing ``value`` under ``name`` grows the tenant past its quota."""
        old = self._data.get(name)
        grows = self._size(name, value, tenant) - (
            self._size(name, old[0], tenant) if old is not None else 0
        )
        return grows > 0 and self._usage.get(tenant, 0) + grows > self.tenant_max_bytes

    def _reclaim(self, tenant: str) -> None:
        now = self._clock()
        for name, (_, expires, owner) in list(self._data.items()):
            if owner == tenant and expires is not None and expires <= now:
                self._drop(name)

    def _store(self, name: bytes, value: bytes, expires: float | None, tenant: str = "") -> None:
        if tenant and self._over(name, value, tenant):
            self._reclaim(tenant)  # expired keys count until now: forgotten, then checked again
            if self._over(name, value, tenant):
                raise _over_quota(self.tenant_max_bytes)
        self._drop(name)
        self._data[name] = (value, expires, tenant)
        self._bytes += len(name) + len(value)
        if tenant:
            self._usage[tenant] = self._usage.get(tenant, 0) + self._size(name, value, tenant)
        while self._bytes > self.max_bytes and len(self._data) > 1:
            oldest = next(iter(self._data))
            self._drop(oldest)
            self.evictions += 1

    async def get(self, tenant: str, key: Key) -> bytes | None:
        return self._live(kv_key(tenant, key))

    async def set(self, tenant: str, key: Key, value: Value, *, ttl_ms: int | None = None) -> None:
        name, raw, ttl = kv_key(tenant, key), _value(value), _ttl(ttl_ms)
        self._store(name, raw, None if ttl is None else self._clock() + ttl / 1000, tenant)

    async def delete(self, tenant: str, key: Key) -> bool:
        name = kv_key(tenant, key)
        return self._live(name) is not None and self._drop(name)

    async def incr(self, tenant: str, key: Key, by: int = 1) -> int:
        name, step = kv_key(tenant, key), _by(by)
        current = self._live(name)
        expires = self._data[name][1] if current is not None else None  # INCR keeps the TTL
        try:
            number = int(current) if current is not None else 0
            if current is not None and current.strip() != current:
                raise ValueError("whitespace")
        except ValueError:
            raise FailedPrecondition(_NOT_INTEGER) from None
        result = number + step
        if not _INT64[0] <= number <= _INT64[1] or not _INT64[0] <= result <= _INT64[1]:
            raise FailedPrecondition(_NOT_INTEGER)
        self._store(name, str(result).encode(), expires, tenant)
        return result

    async def incr_once(self, tenant: str, key: Key, by: int, token: str) -> tuple[int, bool]:
        marker = _applied_key(tenant, token)
        done = self._live(marker)
        if done is not None:
            return int(done), False
        number = await self.incr(tenant, key, by)  # no await inside: atomic in this loop
        self._store(marker, str(number).encode(), self._clock() + APPLIED_TTL_MS / 1000)
        return number, True

    async def expire(self, tenant: str, key: Key, ttl_ms: int) -> bool:
        name, ttl = kv_key(tenant, key), _ttl(ttl_ms)
        assert ttl is not None
        value = self._live(name)
        if value is None:
            return False
        self._data[name] = (value, self._clock() + ttl / 1000, tenant)
        return True

    async def mget(self, tenant: str, keys: Sequence[Key]) -> list[bytes | None]:
        values = [self._live(name) for name in _keys(tenant, keys)]
        total = sum(len(v) for v in values if v is not None)
        if total > MAX_MGET_BYTES:
            raise _too_large(total)
        return values

    async def usage(self, tenant: str) -> int:
        """The bytes the tenant's keys count against its quota."""
        self._reclaim(tenant)
        return self._usage.get(tenant, 0)

    async def purge(self, tenant: str) -> int:
        prefix = tenant_prefix(tenant) + b"kv:"
        names = [name for name in self._data if name.startswith(prefix)]
        for name in names:
            self._drop(name)
        self._usage.pop(tenant, None)
        return len(names)

    async def aclose(self) -> None:
        self._data.clear()
        self._bytes = 0
        self._usage.clear()


def _raw_key(tenant: str, key: Key) -> bytes:
    """The caller's key as stored in the tenant's row range (checked as ``kv_key`` checks it)."""
    return kv_key(tenant, key)[len(tenant_prefix(tenant)) + len(b"kv:") :]


class PostgresKeyValueStore:
    """Key-value operations in an unlogged table of the control schema (control migration
    0010), through the owner's pool: the embedded default, shared by workers and instances.
    Expired keys are invisible at once and deleted now and then."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        tenant_max_bytes: int = DEFAULT_TENANT_MAX_BYTES,
    ) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.kv"
        self._live = "(expires_at IS NULL OR expires_at > clock_timestamp())"
        self._writes = 0
        self.tenant_max_bytes = tenant_max_bytes
        # The quota travels with each write, for the triggers of control migration 0017 (set
        # for the write's own transaction only: the pool's connections keep no state).
        self._quota = "SELECT set_config('dbsvc.kv_tenant_max_bytes', $1, true)"

    async def _call(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await operation()
        except asyncpg.ForeignKeyViolationError:
            raise InvalidParameters("unknown tenant") from None
        except asyncpg.ConfigurationLimitExceededError:  # 53400, from the quota's trigger
            raise _over_quota(self.tenant_max_bytes) from None
        except Exception as exc:
            if postgres_unreachable(exc):  # else a value asyncpg refused: the caller's
                raise unavailable("the key-value store", exc) from exc
            raise

    async def _write(self, tenant: str, operation: Callable[[], Awaitable[Any]]) -> Any:
        """A write that may grow the tenant's keys: refused at the quota, after more tries
        once some of the tenant's expired keys (which count until deleted) are gone.

        Each reclaim deletes at most ``_RECLAIM_ROWS`` keys, skipping those another caller is
        deleting (SKIP LOCKED), and a write tries at most ``_RECLAIM_ROUNDS`` of them: a tenant
        with a great many expired keys and many writers at its quota cannot keep connections
        of the owner's pool (which every tenant's calls share) busy, or waiting on each
        other's deletes, for long. A write still refused with expired keys left gets room on a
        later try."""
        for _ in range(_RECLAIM_ROUNDS):
            try:
                return await self._call(operation)
            except ResourceExhausted:
                deleted = await self._call(
                    lambda: self._pool.execute(
                        f"DELETE FROM {self._table} WHERE ctid = ANY(ARRAY("
                        f"SELECT ctid FROM {self._table} WHERE tenant_id = $1"
                        " AND expires_at <= clock_timestamp()"
                        f" LIMIT {_RECLAIM_ROWS} FOR UPDATE SKIP LOCKED))",
                        tenant,
                    )
                )
                if deleted == "DELETE 0":
                    raise
        return await self._call(operation)

    async def usage(self, tenant: str) -> int:
        """The bytes the tenant's keys count against its quota."""
        used = await self._call(
            lambda: self._pool.fetchval(
                f"SELECT bytes FROM {self._table}_usage WHERE tenant_id = $1", tenant
            )
        )
        return int(used or 0)

    async def get(self, tenant: str, key: Key) -> bytes | None:
        value: bytes | None = await self._call(
            lambda: self._pool.fetchval(
                f"SELECT value FROM {self._table} WHERE tenant_id = $1 AND key = $2"
                f" AND {self._live}",
                tenant,
                _raw_key(tenant, key),
            )
        )
        return value

    async def set(self, tenant: str, key: Key, value: Value, *, ttl_ms: int | None = None) -> None:
        raw_key, raw, ttl = _raw_key(tenant, key), _value(value), _ttl(ttl_ms)
        await self._write(
            tenant,
            lambda: self._pool.execute(
                f"WITH quota AS ({self._quota.replace('$1', '$5')})"
                f" INSERT INTO {self._table} (tenant_id, key, value, expires_at)"
                " SELECT $1, $2, $3, clock_timestamp() + $4 * interval '1 millisecond'"
                " FROM quota ON CONFLICT (tenant_id, key) DO UPDATE"
                " SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
                tenant,
                raw_key,
                raw,
                ttl,
                str(self.tenant_max_bytes),
            ),
        )
        await self._sweep()

    async def delete(self, tenant: str, key: Key) -> bool:
        deleted = await self._call(
            lambda: self._pool.fetchval(
                f"WITH d AS (DELETE FROM {self._table} WHERE tenant_id = $1 AND key = $2"
                f" RETURNING {self._live} AS live) SELECT coalesce(bool_or(live), false) FROM d",
                tenant,
                _raw_key(tenant, key),
            )
        )
        return bool(deleted)

    async def incr(self, tenant: str, key: Key, by: int = 1) -> int:
        number, _ = await self._incr(tenant, key, by, None)
        return number

    async def incr_once(self, tenant: str, key: Key, by: int, token: str) -> tuple[int, bool]:
        return await self._incr(tenant, key, by, token)

    async def _incr(self, tenant: str, key: Key, by: int, token: str | None) -> tuple[int, bool]:
        raw_key, step = _raw_key(tenant, key), _by(by)
        # The token's record is a row of the tenant's beside its keys (a NUL-led name the
        # record shares with nothing the service writes), in the increment's transaction.
        marker = None if token is None else b"\x00dbsvc-applied:" + token.encode("ascii")

        async def run() -> tuple[int, bool]:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(self._quota, str(self.tenant_max_bytes))
                if marker is not None:
                    # Serialises two appliers of one token: the second waits, then sees it.
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                        f"{tenant}:{token}",
                    )
                    done = await conn.fetchval(
                        f"SELECT value FROM {self._table} WHERE tenant_id = $1 AND key = $2"
                        f" AND {self._live}",
                        tenant,
                        marker,
                    )
                    if done is not None:
                        return int(done), False
                # A row to lock before reading: FOR UPDATE locks nothing when the key does not
                # exist yet, so two first increments both counted from 0 and one was lost
                # (acknowledged). The placeholder is the value a missing key counts from; the
                # second waits on it, then reads the first's number.
                await conn.execute(
                    f"INSERT INTO {self._table} (tenant_id, key, value) VALUES ($1, $2, '0')"
                    " ON CONFLICT (tenant_id, key) DO NOTHING",
                    tenant,
                    raw_key,
                )
                row = await conn.fetchrow(
                    f"SELECT value, {self._live} AS live, expires_at FROM {self._table}"
                    " WHERE tenant_id = $1 AND key = $2 FOR UPDATE",
                    tenant,
                    raw_key,
                )
                live = row is not None and row["live"]
                current = row["value"] if row is not None and live else None
                expires = row["expires_at"] if row is not None and live else None
                try:
                    number = int(current) if current is not None else 0
                    if current is not None and current.strip() != current:
                        raise ValueError("whitespace")
                except ValueError:
                    raise FailedPrecondition(_NOT_INTEGER) from None
                result = number + step
                if not _INT64[0] <= result <= _INT64[1]:
                    raise FailedPrecondition(_NOT_INTEGER)
                upsert = (
                    f"INSERT INTO {self._table} (tenant_id, key, value, expires_at)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (tenant_id, key) DO UPDATE"
                    " SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at"
                )
                await conn.execute(upsert, tenant, raw_key, str(result).encode(), expires)
                if marker is not None:
                    await conn.execute(
                        upsert.replace("$4", f"clock_timestamp() + interval '{APPLIED_TTL_MS} ms'"),
                        tenant,
                        marker,
                        str(result).encode(),
                    )
                return result, True

        done: tuple[int, bool] = await self._write(tenant, run)
        return done

    async def expire(self, tenant: str, key: Key, ttl_ms: int) -> bool:
        ttl = _ttl(ttl_ms)
        status = await self._call(
            lambda: self._pool.execute(
                f"UPDATE {self._table}"
                " SET expires_at = clock_timestamp() + $3 * interval '1 millisecond'"
                f" WHERE tenant_id = $1 AND key = $2 AND {self._live}",
                tenant,
                _raw_key(tenant, key),
                ttl,
            )
        )
        return bool(status == "UPDATE 1")

    async def mget(self, tenant: str, keys: Sequence[Key]) -> list[bytes | None]:
        _keys(tenant, keys)  # the count limit
        raw_keys = [_raw_key(tenant, k) for k in keys]
        # The values only when their sizes (read without reading the values) add up to at
        # most MAX_MGET_BYTES.
        rows = await self._call(
            lambda: self._pool.fetch(
                "SELECT key, total, CASE WHEN total <= $3 THEN value END AS value FROM"
                " (SELECT key, value, sum(octet_length(value)) OVER () AS total"
                f" FROM {self._table} WHERE tenant_id = $1"
                f" AND key = ANY($2::bytea[]) AND {self._live}) AS asked",
                tenant,
                raw_keys,
                MAX_MGET_BYTES,
            )
        )
        if rows and rows[0]["total"] > MAX_MGET_BYTES:
            raise _too_large(int(rows[0]["total"]))
        found = {bytes(r["key"]): bytes(r["value"]) for r in rows}
        return [found.get(k) for k in raw_keys]

    async def _sweep(self) -> None:
        """Now and then (every 1,000 writes), delete some expired keys."""
        self._writes += 1
        if self._writes % 1000 == 0:
            with contextlib.suppress(Exception):
                await self._pool.execute(
                    f"DELETE FROM {self._table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM"
                    f" {self._table} WHERE expires_at < clock_timestamp() LIMIT 10000))"
                )

    async def purge(self, tenant: str) -> int:
        status = await self._call(
            lambda: self._pool.execute(f"DELETE FROM {self._table} WHERE tenant_id = $1", tenant)
        )
        return int(str(status).split()[-1])

    async def aclose(self) -> None:
        return None


async def _batches(items: Any, size: int) -> Any:
    batch: list[bytes] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
