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
    ResultTooLarge,
    Unavailable,
)
from database_service.tenancy.ids import quote_ident

__all__ = [
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


def _applied_key(tenant: str, token: str) -> bytes:
    """Where an exactly-once increment records its token: the tenant's namespace, beside (not
    inside) its ``kv:`` keys, so no key a caller names can be it."""
    return tenant_prefix(tenant) + b"applied:" + token.encode("ascii")


# INCRBY and the token's record in one step (a script runs atomically), so a crash can never
# leave one without the other; both keys share the tenant's hash tag (one cluster slot).
_INCR_ONCE = """
local done = redis.call('GET', KEYS[2])
if done then return {done, 0} end
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], n, 'PX', ARGV[2])
return {tostring(n), 1}
"""

# MGET only when the values' lengths add up to at most ARGV[1] (else their total, a number):
# checked and read in one step, so nothing written between is missed.
_MGET_BOUNDED = """
local total = 0
for i = 1, #KEYS do total = total + redis.call('STRLEN', KEYS[i]) end
if total > tonumber(ARGV[1]) then return total end
return redis.call('MGET', unpack(KEYS))
"""

_NOT_INTEGER = "the key's value is not an integer (or incrementing it would overflow 64 bits)"


class RedisKeyValueStore:
    """Key-value operations over Redis; owns its client unless one is passed."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout_s: float = 0.5,
        client: aioredis.Redis | None = None,
    ) -> None:
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
        await self._call(lambda: self.redis.set(name, raw, px=ttl))

    async def delete(self, tenant: str, key: Key) -> bool:
        name = kv_key(tenant, key)
        return bool(await self._call(lambda: self.redis.delete(name)))

    async def incr(self, tenant: str, key: Key, by: int = 1) -> int:
        name, step = kv_key(tenant, key), _by(by)
        return int(await self._call(lambda: self.redis.incrby(name, step)))

    async def incr_once(self, tenant: str, key: Key, by: int, token: str) -> tuple[int, bool]:
        name, step, marker = kv_key(tenant, key), _by(by), _applied_key(tenant, token)
        number, fresh = await self._call(
            lambda: self.redis.eval(_INCR_ONCE, 2, name, marker, step, APPLIED_TTL_MS)
        )
        return int(number), bool(fresh)

    async def expire(self, tenant: str, key: Key, ttl_ms: int) -> bool:
        name, ttl = kv_key(tenant, key), _ttl(ttl_ms)
        assert ttl is not None
        return bool(await self._call(lambda: self.redis.pexpire(name, ttl)))

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
        except (aioredis.RedisError, OSError) as exc:
            raise Unavailable(f"the key-value store is unreachable: {exc}") from exc
        return deleted

    async def aclose(self) -> None:
        if self._owns_client:
            with contextlib.suppress(Exception):
                await self.redis.aclose()


class InMemoryKeyValueStore:
    """The embedded key-value store: one process, TTLs, bounded by bytes (LRU eviction)."""

    def __init__(
        self, max_bytes: int = 64 * 1024 * 1024, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[bytes, float | None]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def _live(self, name: bytes) -> bytes | None:
        item = self._data.get(name)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock():
            self._drop(name)
            return None
        self._data.move_to_end(name)
        return value

    def _drop(self, name: bytes) -> bool:
        item = self._data.pop(name, None)
        if item is None:
            return False
        self._bytes -= len(name) + len(item[0])
        return True

    def _store(self, name: bytes, value: bytes, expires: float | None) -> None:
        self._drop(name)
        self._data[name] = (value, expires)
        self._bytes += len(name) + len(value)
        while self._bytes > self.max_bytes and len(self._data) > 1:
            oldest = next(iter(self._data))
            self._drop(oldest)
            self.evictions += 1

    async def get(self, tenant: str, key: Key) -> bytes | None:
        return self._live(kv_key(tenant, key))

    async def set(self, tenant: str, key: Key, value: Value, *, ttl_ms: int | None = None) -> None:
        name, raw, ttl = kv_key(tenant, key), _value(value), _ttl(ttl_ms)
        self._store(name, raw, None if ttl is None else self._clock() + ttl / 1000)

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
        self._store(name, str(result).encode(), expires)
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
        self._data[name] = (value, self._clock() + ttl / 1000)
        return True

    async def mget(self, tenant: str, keys: Sequence[Key]) -> list[bytes | None]:
        values = [self._live(name) for name in _keys(tenant, keys)]
        total = sum(len(v) for v in values if v is not None)
        if total > MAX_MGET_BYTES:
            raise _too_large(total)
        return values

    async def purge(self, tenant: str) -> int:
        prefix = tenant_prefix(tenant) + b"kv:"
        names = [name for name in self._data if name.startswith(prefix)]
        for name in names:
            self._drop(name)
        return len(names)

    async def aclose(self) -> None:
        self._data.clear()
        self._bytes = 0


def _raw_key(tenant: str, key: Key) -> bytes:
    """The caller's key as stored in the tenant's row range (checked as ``kv_key`` checks it)."""
    return kv_key(tenant, key)[len(tenant_prefix(tenant)) + len(b"kv:") :]


class PostgresKeyValueStore:
    """Key-value operations in an unlogged table of the control schema (control migration
    0010), through the owner's pool: the embedded default, shared by workers and instances.
    Expired keys are invisible at once and deleted now and then."""

    def __init__(self, pool: asyncpg.Pool, *, control_schema: str) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.kv"
        self._live = "(expires_at IS NULL OR expires_at > clock_timestamp())"
        self._writes = 0

    async def _call(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await operation()
        except (OSError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError) as exc:
            raise Unavailable(f"the key-value store is unreachable: {exc}") from exc
        except asyncpg.ForeignKeyViolationError:
            raise InvalidParameters("unknown tenant") from None

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
        await self._call(
            lambda: self._pool.execute(
                f"INSERT INTO {self._table} (tenant_id, key, value, expires_at)"
                " VALUES ($1, $2, $3, clock_timestamp() + $4 * interval '1 millisecond')"
                " ON CONFLICT (tenant_id, key) DO UPDATE"
                " SET value = EXCLUDED.value, expires_at = EXCLUDED.expires_at",
                tenant,
                raw_key,
                raw,
                ttl,
            )
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

        done: tuple[int, bool] = await self._call(run)
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
