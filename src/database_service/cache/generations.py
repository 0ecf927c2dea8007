"""Generations of relations, and invalidation across instances.

**The model.** Each (tenant, relation) has a generation number that only grows. A cached
result carries the generations of every relation it read, taken *before* the query ran, and is
served only while they are unchanged; a committed write bumps the generations of what it wrote.
A write racing a fill therefore only causes a miss (the fill carries the older number), never a
stale entry — the race that delete-on-write caches have. Every snapshot also carries a global
``#epoch``: bumping it invalidates everything, for the cases where we cannot know what changed
(notifications PostgreSQL may have dropped while we were not listening).

**Embedded (no Redis).** The numbers live in this process only (``Generations(None)``): a
write through this process bumps them at commit; other processes learn of writes only from
PostgreSQL's notifications (``PostgresInvalidationListener``, which every serving process runs).
Cluster-wide invalidation is off and ``state`` says so.

**With Redis.** The numbers are Redis hashes ``dbsvc:{<tenant>}:gen`` (relation → number) and
``dbsvc:global:epoch``; each process keeps a mirror. ``bump`` (an own committed write) runs one
script — HINCRBY each relation and PUBLISH on ``dbsvc:invalidate`` a JSON message (tenant,
relations, new numbers, origin instance, commit time in ms) — and raises the mirror before it
returns, so this instance never serves a result older than its own acknowledged write. Every
instance subscribes (a background task that reconnects) and raises its mirror to
``max(current, received)``, recording the lag (now - commit time) through ``on_lag``. A
relation missing from the mirror is read with HMGET (raised with max too: a message may
overtake the reply). Snapshots are only given while subscribed (``None`` otherwise: the caller
runs uncached), since a mirror that may have missed messages cannot be trusted. When the
subscription drops, the mirror is cleared and ``on_reset`` callbacks fire (the facade clears L1);
bumps made meanwhile (the write committed, Redis did not hear of it) are kept and replayed when
Redis is back, before snapshots are given again. ``serve_when_detached=True`` trades that for
availability: local numbers while detached, other instances' writes unseen until TTL.

**Writes that bypass the service** reach us as PostgreSQL notifications (control migration
0009: statement-level triggers ``pg_notify('dbsvc_invalidate', 'tenant|schema.table|txid|ms')``).
Every instance listens, so with N instances a notification arrives N times; it must raise Redis's
number once, not N times (N bumps would be harmless but wasteful). ``_EXTERNAL`` does it in one
atomic script: ``SET NX PX`` a dedup key per (transaction id, relation); the instance that set
it increments and publishes, every caller gets the resulting numbers back and raises its mirror
— so mirrors agree with Redis whoever won. No leader election, no extra round trip. A write
through the service is counted twice (its own ``bump`` and the trigger's notification): one
extra miss per write, accepted for simplicity. The listener bumps ``#epoch`` whenever it
(re)connects, since notifications sent while no connection listened are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg
import redis.asyncio as aioredis

from database_service.cache.keys import generations_key, tenant_prefix
from database_service.cache.remote import connect_redis
from database_service.tenancy.ids import quote_ident

__all__ = [
    "CHANNEL",
    "EPOCH",
    "PG_CHANNEL",
    "Generations",
    "InvalidationState",
    "PostgresInvalidationListener",
    "Snapshot",
    "parse_notification",
    "verified_notification",
]

log = logging.getLogger(__name__)

CHANNEL = "dbsvc:invalidate"
PG_CHANNEL = "dbsvc_invalidate"
EPOCH = "#epoch"
_GLOBAL = "*"
_EPOCH_KEY = b"dbsvc:global:epoch"
_PING_EVERY_S = 1.0
_SILENT_LIMIT_S = 3.0

Snapshot = tuple[tuple[str, int], ...]
LagCallback = Callable[[float], None]
ResetCallback = Callable[[str], None]

# KEYS: hash. ARGV: channel, tenant, origin, commit_ms, relations...
_BUMP = """
local gens = {}
local rels = {}
for i = 5, #ARGV do
    rels[#rels + 1] = ARGV[i]
    gens[#gens + 1] = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
end
redis.call('PUBLISH', ARGV[1], cjson.encode(
    {v = 1, t = ARGV[2], r = rels, g = gens, o = ARGV[3], c = tonumber(ARGV[4])}))
return gens
"""

# KEYS: hash, then one dedup key per relation. ARGV: channel, tenant, origin, commit_ms,
# relations... (as many as dedup keys). A dedup key lives 60 s: far longer than a
# notification takes to reach every instance.
_EXTERNAL = """
local gens = {}
local rels = {}
local bumped = false
for i = 5, #ARGV do
    rels[#rels + 1] = ARGV[i]
    if redis.call('SET', KEYS[i - 3], '1', 'NX', 'PX', 60000) then
        gens[#gens + 1] = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
        bumped = true
    else
        gens[#gens + 1] = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
    end
end
if bumped then
    redis.call('PUBLISH', ARGV[1], cjson.encode(
        {v = 1, t = ARGV[2], r = rels, g = gens, o = ARGV[3], c = tonumber(ARGV[4])}))
end
return gens
"""

# KEYS: epoch. ARGV: channel, origin, commit_ms.
_BUMP_EPOCH = """
local epoch = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], cjson.encode(
    {v = 1, t = '*', r = {'#epoch'}, g = {epoch}, o = ARGV[2], c = tonumber(ARGV[3])}))
return epoch
"""


@dataclass(frozen=True, slots=True)
class InvalidationState:
    """For health: ``mode`` local (no Redis) or cluster; ``status`` of the subscription;
    the mirror of Redis's numbers (cluster mode): names held, its bound, and how many reads
    of missing names it made from Redis (a figure that grows with every hit means the mirror
    is too small for the keys read: ``mirror_max``)."""

    mode: Literal["local", "cluster"]
    status: Literal["up", "down", "starting", "off"]
    last_error: str | None
    since: float
    messages: int
    last_lag_s: float | None
    pending_bumps: int
    mirror_names: int = 0
    mirror_max: int = 0
    mirror_reads: int = 0

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "status": self.status,
            "last_error": self.last_error,
            "since": self.since,
            "messages": self.messages,
            "last_lag_ms": None if self.last_lag_s is None else round(self.last_lag_s * 1000, 3),
            "pending_bumps": self.pending_bumps,
            "mirror": {
                "names": self.mirror_names,
                "max": self.mirror_max,
                "reads_from_redis": self.mirror_reads,
            },
        }


class Generations:
    """The generation map; Redis-backed and cluster-wide with a URL (or client), local without.

    Call ``start`` (subscribes, with Redis) and ``aclose``. Not thread-safe (one event loop)."""

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        instance_id: str | None = None,
        channel: str = CHANNEL,
        timeout_s: float = 0.05,
        bump_timeout_s: float = 0.5,
        serve_when_detached: bool = False,
        on_lag: LagCallback | None = None,
        mirror_max: int = 50_000,
        counters: int = 1 << 20,
    ) -> None:
        self.instance_id = instance_id or secrets.token_hex(8)
        self.channel = channel
        self.timeout_s = timeout_s
        self.bump_timeout_s = bump_timeout_s
        self.serve_when_detached = serve_when_detached
        self.on_lag = on_lag
        self.on_reset: list[ResetCallback] = []
        self._url = redis_url
        self._owns_client = client is None and redis_url is not None
        if client is None and redis_url is not None:
            client = connect_redis(redis_url, timeout_s=max(timeout_s, bump_timeout_s))
        self.redis = client
        self.mode: Literal["local", "cluster"] = "local" if client is None else "cluster"
        # Cluster mode: a bounded mirror of Redis's numbers (least recently used first out;
        # what is evicted is read again from Redis). Local mode: the numbers exist only here,
        # in a fixed array of counters a name is hashed to — bounded whatever the names (row
        # names come and go with the keys written), each counter only ever grows (a name's
        # number never goes back to one an entry was stored with), and two names sharing a
        # counter only invalidate each other's entries (a miss, never a stale answer).
        self._mirror: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._mirror_max = mirror_max
        # What lets an entry outlive its names in the mirror (``unchanged``): a clock that
        # counts the changes the mirror heard of (a message, an own bump, a number read that
        # went up), the clock of each held name's last change, and the horizon: the latest
        # change the mirror has forgotten (its name evicted), or the last reset.
        self._clock = 0
        self._changed: dict[tuple[str, str], int] = {}
        self._horizon = 0
        self._counters = array("q", bytes(8 * counters)) if self.mode == "local" else None
        self._reset_epoch = 0  # bumped at each reset: HMGET replies from before are dropped
        self._attached = client is None
        self._status: Literal["up", "down", "starting", "off"] = (
            "off" if client is None else "starting"
        )
        self._last_error: str | None = None
        self._since = time.time()
        self._pending: dict[tuple[str, str], int] = {}
        self._resync = asyncio.Event()
        self._attached_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.messages = 0
        self.mirror_reads = 0
        self.last_lag_s: float | None = None
        if client is not None:
            self._bump = client.register_script(_BUMP)
            self._external = client.register_script(_EXTERNAL)
            self._bump_epoch = client.register_script(_BUMP_EPOCH)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe (with Redis) in a background task that reconnects on loss."""
        if self.redis is not None and self._task is None:
            self._task = asyncio.create_task(self._listen(), name="cache-invalidation")

    async def wait_attached(self, timeout_s: float = 5.0) -> bool:
        """Until snapshots can be given (subscribed), or ``timeout_s``; for start-up and tests."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._attached_event.wait()
        return self._attached

    async def aclose(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._owns_client and self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    @property
    def attached(self) -> bool:
        """Whether snapshots reflect every instance's writes (always true when local)."""
        return self._attached

    @property
    def state(self) -> InvalidationState:
        return InvalidationState(
            self.mode,
            self._status,
            self._last_error,
            self._since,
            self.messages,
            self.last_lag_s,
            len(self._pending),
            len(self._mirror),
            self._mirror_max if self.mode == "cluster" else 0,
            self.mirror_reads,
        )

    # -- reading ---------------------------------------------------------------------------

    @staticmethod
    def names(tenant: str, relations: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """What ``snapshot_of`` reads for ``relations``: ``#epoch`` first, then the tenant's
        names sorted (a reader that asks again and again keeps it)."""
        return ((_GLOBAL, EPOCH), *((tenant, r) for r in sorted(set(relations))))

    async def snapshot(self, tenant: str, relations: Iterable[str]) -> Snapshot | None:
        """The current generations of ``relations`` (sorted, ``#epoch`` first), or None when
        they cannot be trusted now (cluster mode, not subscribed): run uncached."""
        return await self.snapshot_of(tenant, self.names(tenant, relations))

    async def snapshot_of(self, tenant: str, keys: tuple[tuple[str, str], ...]) -> Snapshot | None:
        """``snapshot`` of the names ``names(tenant, relations)`` made."""
        numbers = self.snapshot_now(keys)
        if numbers is not None or not self._attached:  # local mode always has its numbers
            return numbers
        missing = [k for k in keys if k not in self._mirror]
        if not await self._fetch(tenant, missing):
            return None
        return self.snapshot_now(keys)  # None: reset while fetching

    @property
    def clock(self) -> int:
        """Now, on the clock ``unchanged`` compares with (an entry stored with a snapshot that
        is current is stored with this)."""
        return self._clock

    def unchanged(
        self, keys: tuple[tuple[str, str], ...], numbers: Snapshot, current_at: int
    ) -> bool | None:
        """Whether an entry stored with ``numbers`` (a snapshot of ``keys``, ``snapshot_of``'s
        order), current at ``current_at`` (``clock`` then), is current now: True, False (a
        number moved: invalid), None (not known without reading Redis, or not trustable now).

        A name the mirror no longer holds is unchanged since ``current_at`` unless the mirror
        forgot a change made after it (the horizon): a change puts its name back in the mirror
        whatever was evicted before (``_raise``), so an absent name that changed since was
        evicted after changing. An entry thus needs its names read from Redis only when the
        mirror forgot changes that recent, not each time a cache larger than the mirror (50,000
        names by default; an L1 holds more point reads than that) serves an entry whose row
        name was evicted — a round trip to Redis per hit on the long tail of keys
        (bench/cache.py, 2026-12-05: one hit in six over 100,000 keys)."""
        if len(keys) != len(numbers):
            return False
        if self.mode == "local" or (not self._attached and self.serve_when_detached):
            for (tenant, relation), (name, number) in zip(keys, numbers, strict=True):
                if name != relation or self._local(tenant, relation) != number:
                    return False
            return True
        if not self._attached:
            return None
        mirror = self._mirror
        known = self._horizon <= current_at
        for key, (name, number) in zip(keys, numbers, strict=True):
            if name != key[1]:
                return False
            held = mirror.get(key)
            if held is None:
                if not known:
                    return None
            elif held != number:
                return False
            else:
                mirror.move_to_end(key)  # used: see snapshot_now
        return True

    def snapshot_now(self, keys: tuple[tuple[str, str], ...]) -> Snapshot | None:
        """``snapshot_of`` when every number is at hand (the usual case), without awaiting.
        None: a number must be read from Redis first, or none can be trusted now."""
        if self.mode == "local" or (not self._attached and self.serve_when_detached):
            return tuple((r, self._local(t, r)) for t, r in keys)
        if not self._attached:
            return None
        mirror = self._mirror
        try:
            numbers = tuple([(key[1], mirror[key]) for key in keys])
        except KeyError:
            return None
        # Read names move to the back: the mirror drops its least recently *used* names, so a
        # hot row's number stays instead of being read from Redis again every 50,000 names.
        used = mirror.move_to_end
        for key in keys:
            used(key)
        return numbers

    async def _fetch(self, tenant: str, missing: list[tuple[str, str]]) -> bool:
        assert self.redis is not None
        epoch_wanted = (_GLOBAL, EPOCH) in missing
        relations = [r for t, r in missing if t != _GLOBAL]
        reset_epoch = self._reset_epoch
        self.mirror_reads += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.redis.pipeline(transaction=False) as pipe:
                    if epoch_wanted:
                        pipe.get(_EPOCH_KEY)
                    if relations:
                        pipe.hmget(generations_key(tenant), relations)
                    replies = await pipe.execute()
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            log.debug("generations: HMGET failed: %s", exc)
            return False
        if reset_epoch != self._reset_epoch:
            return False
        if epoch_wanted:
            self._raise((_GLOBAL, EPOCH), int(replies.pop(0) or 0), changed=False)
        if relations:
            for relation, value in zip(relations, replies[0], strict=True):
                self._raise((tenant, relation), int(value or 0), changed=False)
        return True

    def _raise(self, key: tuple[str, str], value: int, *, changed: bool = True) -> None:
        """Hold ``value`` for ``key`` if it is higher. ``changed``: it comes from a change (a
        message, a bump), counted on the clock even when the number is already held (a
        read from Redis may overtake the message). A number read that moves a held one up is
        a change too; one read for a name not held is not (nothing here had another)."""
        held = self._mirror.get(key, -1)
        if changed or -1 < held < value:
            self._clock += 1
            self._changed[key] = self._clock
        if value > held:
            self._hold(key, value)
        elif changed:
            self._mirror.move_to_end(key)  # held: its change is not forgotten first

    def _local(self, tenant: str, relation: str) -> int:
        if self._counters is not None:
            return self._counters[hash((tenant, relation)) % len(self._counters)]
        value = self._mirror.get((tenant, relation))
        if value is None:
            return 0
        self._mirror.move_to_end((tenant, relation))
        return value

    def _hold(self, key: tuple[str, str], value: int) -> None:
        self._mirror[key] = value
        self._mirror.move_to_end(key)
        while len(self._mirror) > self._mirror_max:
            evicted, _ = self._mirror.popitem(last=False)
            self._horizon = max(self._horizon, self._changed.pop(evicted, 0))

    def bump_local(self, tenant: str, relations: Iterable[str]) -> None:
        """Raise this process's numbers only (local mode, or Redis unreachable)."""
        for relation in relations:
            if self._counters is not None:
                self._counters[hash((tenant, relation)) % len(self._counters)] += 1
            else:
                self._raise((tenant, relation), self._local(tenant, relation) + 1)

    async def bump(
        self, tenant: str, relations: Iterable[str], *, committed_at: float | None = None
    ) -> None:
        """An own committed write: raise the numbers everywhere (Redis and this process)
        before returning. With Redis unreachable the bump is kept and replayed when it is
        back; this process stops serving snapshots until then (unless serve_when_detached)."""
        rels = sorted(set(relations))
        if not rels:
            return
        if self.redis is None:
            self.bump_local(tenant, rels)
            return
        commit_ms = int((time.time() if committed_at is None else committed_at) * 1000)
        try:
            async with asyncio.timeout(self.bump_timeout_s):
                gens = await self._bump(
                    keys=[generations_key(tenant)],
                    args=[self.channel, tenant, self.instance_id, commit_ms, *rels],
                )
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._defer(tenant, rels, exc)
            return
        for relation, value in zip(rels, gens, strict=True):
            self._raise((tenant, relation), int(value))

    async def apply_external(
        self,
        tenant: str,
        relations: Iterable[str],
        *,
        event: str,
        committed_at: float | None = None,
    ) -> None:
        """A write PostgreSQL notified us of (``event``: its transaction id): counted once in
        Redis whichever instance hears it first (see the module docstring)."""
        rels = sorted(set(relations))
        if not rels:
            return
        if self.redis is None:
            self.bump_local(tenant, rels)
            return
        commit_ms = int((time.time() if committed_at is None else committed_at) * 1000)
        prefix = tenant_prefix(tenant) + b"inv:" + event.encode() + b":"
        dedup = [prefix + relation.encode() for relation in rels]
        try:
            async with asyncio.timeout(self.bump_timeout_s):
                gens = await self._external(
                    keys=[generations_key(tenant), *dedup],
                    args=[self.channel, tenant, self.instance_id, commit_ms, *rels],
                )
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._defer(tenant, rels, exc)
            return
        for relation, value in zip(rels, gens, strict=True):
            self._raise((tenant, relation), int(value))

    async def bump_epoch(self) -> None:
        """Invalidate every cached result of every tenant, everywhere."""
        if self.redis is None:
            self.bump_local(_GLOBAL, [EPOCH])
            return
        try:
            async with asyncio.timeout(self.bump_timeout_s):
                epoch = await self._bump_epoch(
                    keys=[_EPOCH_KEY],
                    args=[self.channel, self.instance_id, int(time.time() * 1000)],
                )
        except (aioredis.RedisError, OSError, TimeoutError) as exc:
            self._defer(_GLOBAL, [EPOCH], exc)
            return
        self._raise((_GLOBAL, EPOCH), int(epoch))

    def _defer(self, tenant: str, relations: list[str], exc: BaseException) -> None:
        log.warning("generations: Redis bump failed, kept for replay: %s", exc)
        for relation in relations:
            self._pending[(tenant, relation)] = self._pending.get((tenant, relation), 0) + 1
        if self.serve_when_detached:
            self.bump_local(tenant, relations)
        self._detach(f"bump failed: {type(exc).__name__}: {exc}")
        self._resync.set()

    def reset(self, reason: str) -> None:
        """Forget the mirror (cluster mode: it is read again from Redis) and tell ``on_reset``
        listeners (the facade clears L1). In local mode the numbers are the only truth and
        are kept; ``bump_epoch`` is the local way to invalidate everything."""
        if self.mode == "cluster":
            self._mirror.clear()
            self._changed.clear()
            self._clock += 1
            self._horizon = self._clock  # nothing known before this is trusted for an absent name
            self._reset_epoch += 1
        for callback in list(self.on_reset):
            try:
                callback(reason)
            except Exception:
                log.exception("generations: on_reset callback failed")

    def _detach(self, error: str) -> None:
        if self._attached or self._status != "down":
            self._since = time.time()
        self._attached = False
        self._attached_event.clear()
        self._status = "down"
        self._last_error = error
        self.reset(f"invalidation channel lost: {error}")

    # -- the subscription ------------------------------------------------------------------

    async def _flush_pending(self) -> None:
        assert self.redis is not None
        while self._pending:
            (tenant, relation), _ = next(iter(self._pending.items()))
            async with asyncio.timeout(self.bump_timeout_s):
                if tenant == _GLOBAL:
                    await self._bump_epoch(
                        keys=[_EPOCH_KEY],
                        args=[self.channel, self.instance_id, int(time.time() * 1000)],
                    )
                else:
                    await self._bump(
                        keys=[generations_key(tenant)],
                        args=[self.channel, tenant, self.instance_id, 0, relation],
                    )
            del self._pending[(tenant, relation)]

    async def _listen(self) -> None:
        assert self._url is not None or self.redis is not None
        backoff = 0.1
        first = True
        while not self._closing:
            # Its own connection without a read timeout: a subscription waits for messages.
            sub = (
                aioredis.Redis.from_url(self._url, socket_connect_timeout=self.bump_timeout_s)
                if self._url is not None
                else self.redis
            )
            assert sub is not None
            pubsub = sub.pubsub()
            try:
                async with asyncio.timeout(max(self.bump_timeout_s, 1.0)):
                    await pubsub.subscribe(self.channel)
                    await self._flush_pending()
                self._resync.clear()
                self.reset("invalidation channel (re)established")
                self._attached = True
                self._attached_event.set()
                self._status = "up"
                self._last_error = None
                self._since = time.time()
                if not first:
                    log.info("generations: invalidation channel is back")
                first = False
                backoff = 0.1
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._closing:
                    self._detach(f"{type(exc).__name__}: {exc}")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                if sub is not self.redis:
                    with contextlib.suppress(Exception):
                        await sub.aclose()

    async def _receive(self, pubsub: Any) -> None:
        last_heard = time.monotonic()
        last_ping = last_heard
        while not self._closing:
            if self._resync.is_set():
                raise ConnectionError("resynchronising after a failed bump")
            message = await pubsub.get_message(timeout=_PING_EVERY_S / 2)
            now = time.monotonic()
            if message is not None:
                last_heard = now
                if message.get("type") == "message":
                    self._apply_message(message.get("data"))
            if now - last_ping >= _PING_EVERY_S:
                await pubsub.ping()
                last_ping = now
            if now - last_heard > _SILENT_LIMIT_S:
                raise TimeoutError("the invalidation channel went silent (no reply to PING)")

    def _apply_message(self, data: object) -> None:
        try:
            body = json.loads(data)  # type: ignore[arg-type]
            tenant = body["t"]
            relations = body["r"]
            gens = body["g"]
            if not isinstance(tenant, str) or len(relations) != len(gens):
                raise ValueError("malformed")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("generations: ignored a malformed invalidation message: %s", exc)
            return
        self.messages += 1
        for relation, value in zip(relations, gens, strict=True):
            self._raise((tenant, str(relation)), int(value))
        if body.get("o") != self.instance_id and body.get("c"):
            lag = max(0.0, time.time() - float(body["c"]) / 1000)
            self.last_lag_s = lag
            if self.on_lag is not None:
                self.on_lag(lag)


def verified_notification(payload: str, key: str) -> str | None:
    """The payload a trigger signed (``<payload>|md5(key || payload)``, control migration 0009's
    ``cache_signed``), or None: anyone may NOTIFY the channel, only the triggers know the key."""
    body, sep, signature = payload.rpartition("|")
    if not sep:
        return None
    expected = hashlib.md5((key + body).encode()).hexdigest()  # noqa: S324 - as PostgreSQL's
    return body if hmac.compare_digest(expected, signature) else None


def parse_notification(payload: str) -> tuple[str, str, str, float | None] | None:
    """``tenant|schema.relation|txid|epoch ms`` → (tenant, relation, txid, seconds), or None.
    The relation may itself contain ``|`` (a quoted name): tenant is split off the front,
    txid and time off the back."""
    tenant, sep, rest = payload.partition("|")
    parts = rest.rsplit("|", 2)
    if not sep or not tenant or len(parts) != 3 or not parts[0]:
        return None
    relation, txid, millis = parts
    try:
        committed = float(millis) / 1000 if millis else None
    except ValueError:
        committed = None
    return tenant, relation, txid, committed


class PostgresInvalidationListener:
    """LISTENs on ``dbsvc_invalidate`` over one dedicated owner connection and turns every
    notification into a generation bump (``Generations.apply_external``). Reconnects with
    backoff; each (re)connection bumps ``#epoch`` (notifications are lost while no one
    listens). A notification for tenant ``*`` (TRUNCATE of a shared table) bumps the relation
    for every tenant in the control plane."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        generations: Generations,
        *,
        control_schema: str,
        channel: str = PG_CHANNEL,
        on_notification: Callable[[str, str], None] | None = None,
    ) -> None:
        self._connect = connect
        self.generations = generations
        self.control_schema = control_schema
        self.channel = channel
        self.on_notification = on_notification
        self.status: Literal["up", "down", "starting"] = "starting"
        self._key: str | None = None
        self.forged = 0  # notifications without the triggers' signature, ignored
        self.last_error: str | None = None
        self.notifications = 0
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._lost = asyncio.Event()
        self._up = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cache-pg-listener")

    async def wait_listening(self, timeout_s: float = 10.0) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        return self.status == "up"

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self._queue.put_nowait(str(payload))

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._connect()
                self._key = await conn.fetchval(
                    f"SELECT key FROM {quote_ident(self.control_schema)}.cache_notify_key"
                )
                self._lost.clear()
                conn.add_termination_listener(lambda _conn: self._lost.set())
                await conn.add_listener(self.channel, self._notified)
                # Anything written while nobody listened is unknown: invalidate everything.
                await self.generations.bump_epoch()
                self.status, self.last_error = "up", None
                self._up.set()
                backoff = 0.2
                await self._consume(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.status = "down"
                self._up.clear()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("cache: PostgreSQL invalidation listener lost: %s", self.last_error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)

    async def _consume(self, conn: asyncpg.Connection) -> None:
        while True:
            get = asyncio.ensure_future(self._queue.get())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                done, _ = await asyncio.wait(
                    {get, lost}, timeout=5.0, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                # Also when the listener itself is cancelled (shutdown): a task left waiting
                # on the queue is destroyed pending once the loop is gone, logged as an ERROR.
                # A get cancelled after it was woken leaves its notification in the queue.
                get.cancel()
                lost.cancel()
            if get in done:
                await self._apply(conn, get.result())
            elif lost in done or conn.is_closed():
                raise ConnectionError("the listening connection was closed")
            else:
                await conn.execute("SELECT 1")  # a dead socket shows up here

    async def _apply(self, conn: asyncpg.Connection, payload: str) -> None:
        verified = verified_notification(payload, self._key or "")
        if verified is None:
            self.forged += 1
            log.warning("cache: ignored an unsigned notification %r", payload[:200])
            return
        parsed = parse_notification(verified)
        if parsed is None:
            log.warning("cache: ignored notification %r", payload[:200])
            return
        tenant, relation, txid, committed = parsed
        self.notifications += 1
        if self.on_notification is not None:
            self.on_notification(tenant, relation)
        if tenant == _GLOBAL:
            rows = await conn.fetch(
                f"SELECT tenant_id FROM {quote_ident(self.control_schema)}.tenants"
            )
            tenants = [r["tenant_id"] for r in rows]
        else:
            tenants = [tenant]
        for one in tenants:
            await self.generations.apply_external(
                one, [relation], event=txid or "-", committed_at=committed
            )
