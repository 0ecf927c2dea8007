"""Connection pools: the owner's pool, and small pools per active tenant logged in as its roles.

``TenantPools`` owns connection lifecycle and nothing else. A pool per login role (a tenant has
a company-wide login and, when requests carry user ids, a user-scoped one) and workload is
created on first use and closed after ``idle_seconds`` without use. The workloads (the seed's
"connection pools per workload") are OLTP (queries, transactions), analytics (reports,
time-series reads) and bulk (bulk loads, ingestion): each has its own pool per login and its own
size, so a long report holds an analytics connection, never the one an order needs. A global
budget caps open connections across all pools, and when it is exhausted the least recently used
idle pools are closed to make room.
Everything runs on one event loop, so the bookkeeping needs no locks; an entry is closed only
while its ``in_use`` is zero, checked again after every await.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from database_service.errors import ResourceExhausted, ResultTooLarge
from database_service.loops import LoopStarter, plain_start

if TYPE_CHECKING:  # observability imports this module
    from database_service.observability.tracing import Spans

__all__ = [
    "WORKLOADS",
    "Connection",
    "PoolStats",
    "TenantConnection",
    "TenantLogin",
    "TenantPools",
    "Workload",
    "create_owner_pool",
    "init_connection",
]

log = logging.getLogger(__name__)

# What the rest of the service calls a connection: a direct one or one lent by a pool.
Connection = asyncpg.Connection | PoolConnectionProxy


_RESET_QUERY = "CLOSE ALL;\nUNLISTEN *;\nRESET ALL;"

# How long a connection stays kept for its login's next request (``TenantPools._keep``) before
# it goes back to asyncpg's pool, whose inactivity timer then closes it if the load no longer
# needs it: connections stay open about as long as they did when every release went to asyncpg.
_KEPT_SECONDS = 1.0

Workload = Literal["oltp", "analytics", "bulk"]
WORKLOADS: tuple[Workload, ...] = ("oltp", "analytics", "bulk")


def _reset_needed(conn: Connection) -> bool:
    """Whether releasing ``conn`` costs a round trip (a proxy whose connection was terminated
    has none left: asyncpg has already taken it back)."""
    raw = getattr(conn, "_con", None) if isinstance(conn, PoolConnectionProxy) else conn
    return not isinstance(raw, TenantConnection) or raw.reset_needed


class TenantConnection(asyncpg.Connection):
    """A tenant's connection. Resets session state on release without pg_advisory_unlock_all,
    which tenants may not run, and keeps its statement cache in step with its tenant's schema
    generation (see ``query.boundary.prepare_cached``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schema_generation = 0
        self._reset_needed = True

    def get_reset_query(self) -> str:
        needed, self._reset_needed = self._reset_needed, True
        return _RESET_QUERY if needed else ""

    @property
    def reset_needed(self) -> bool:
        return self._reset_needed

    def skip_next_reset(self) -> None:
        """The session ran nothing that can change session state (the query core's one
        repeatable read, outside a transaction: a SELECT calling none of the tenant's functions
        and only catalog functions the SQL guard allows, none of which touches session state).
        Its release then skips the reset's round trip; asyncpg still rolls back a transaction
        left open and forgets listeners. The next release resets again unless told otherwise."""
        self._reset_needed = False

    def expect_reset(self) -> None:
        """Undo ``skip_next_reset`` without a release (a connection kept for the next request,
        ``TenantPools``' ready connections): its next user must say again that it needs none."""
        self._reset_needed = True

    def follow_schema(self, generation: int) -> None:
        """Drop the statements kept from before ``generation`` (this connection's only: the
        others of the pool may be in the middle of using theirs)."""
        if generation != self.schema_generation:
            self._drop_local_statement_cache()  # type: ignore[attr-defined]
            self.schema_generation = generation


def _json_out(value: Any) -> bytes:
    return json.dumps(value).encode()


def _jsonb_out(value: Any) -> bytes:
    return _JSONB_VERSION + json.dumps(value).encode()


def _jsonb_in(data: bytes) -> Any:
    if data[:1] != _JSONB_VERSION:
        raise ValueError(f"unknown jsonb binary format version {data[:1]!r}")
    return _json_in(data[1:])


def _json_in(data: bytes) -> Any:
    """A json/jsonb value PostgreSQL sent (always valid JSON). A tenant's statement can make one
    Python's reader refuses: nested past the interpreter's recursion limit (PostgreSQL nests as
    deep as its stack allows), or with an integer of thousands of digits (past Python's limit
    for converting text to int). Either is a clear ``result_too_large``, not a server error."""
    try:
        return json.loads(data)
    except RecursionError:
        reason = "nested too deeply (about 900 levels at most)"
    except ValueError:
        reason = "holding a number too long (4,300 digits at most)"
    raise ResultTooLarge(
        f"a json value in the result is {reason} for the service to read: select less of it,"
        " or cast it to text"
    )


_JSONB_VERSION = b"\x01"  # the binary jsonb format: a version byte, then the JSON text


async def init_connection(conn: asyncpg.Connection) -> None:
    """json/jsonb as Python values in both directions, in the binary format: binary COPY (bulk
    loads) has no text-format fallback, and a text codec left it without an encoder."""
    await conn.set_type_codec(
        "json", encoder=_json_out, decoder=_json_in, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb", encoder=_jsonb_out, decoder=_jsonb_in, schema="pg_catalog", format="binary"
    )


async def create_owner_pool(dsn: str, *, max_size: int, purpose: str = "") -> asyncpg.Pool:
    """A pool of the service's owner role; ``purpose`` names it in pg_stat_activity."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=1,
        max_size=max_size,
        init=init_connection,
        # UTC: partition bounds and audit times are read back as text.
        server_settings={
            "application_name": f"dbsvc-owner{'-' + purpose if purpose else ''}",
            "timezone": "UTC",
        },
    )
    assert pool is not None
    return pool


@dataclass(frozen=True, slots=True)
class PoolStats:
    size: int
    idle: int
    in_use: int
    max_size: int


@dataclass(slots=True)
class _Entry:
    tenant_id: str
    pool: asyncpg.Pool
    max_size: int
    workload: Workload = "oltp"
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)
    # Connections a request finished with that needed no reset, kept out of asyncpg's pool for
    # the next request (``TenantPools._keep``), newest last, with when each was kept.
    ready: list[tuple[Connection, float]] = field(default_factory=list)
    # While some are kept: the timer that gives back those kept longer than _KEPT_SECONDS.
    expiry: asyncio.TimerHandle | None = None


def _added(seen: PoolStats | None, entry: _Entry) -> PoolStats:
    seen = seen or PoolStats(0, 0, 0, 0)
    return PoolStats(
        seen.size + entry.pool.get_size(),
        seen.idle + entry.pool.get_idle_size() + len(entry.ready),
        seen.in_use + entry.in_use,
        seen.max_size + entry.max_size,
    )


class _Budget:
    """Counts open connections across all tenant pools."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.waiting = 0  # callers in wait(): an idle connection is closed for them
        self._freed = asyncio.Condition()

    def try_take(self) -> bool:
        if self.open < self.limit:
            self.open += 1
            return True
        return False

    async def wait(self) -> None:
        self.waiting += 1
        try:
            async with self._freed:
                await self._freed.wait_for(lambda: self.open < self.limit)
                self.open += 1
        finally:
            self.waiting -= 1

    def give_back(self) -> None:
        self.open -= 1

        async def notify() -> None:
            async with self._freed:
                self._freed.notify_all()

        with contextlib.suppress(RuntimeError):  # no running loop at interpreter shutdown
            asyncio.get_running_loop().create_task(notify())


@dataclass(frozen=True, slots=True)
class TenantLogin:
    """What a pool needs to log in as a tenant (one of its login roles)."""

    tenant_id: str
    role: str
    password: str = field(repr=False)
    user_scoped: bool = False


def _idle_connected(pool: asyncpg.Pool) -> bool:
    """Whether ``pool.acquire()`` returns at once: the holder it takes next (asyncpg's queue is
    LIFO) has an open connection of the pool's generation, and the pool has no setup hook. On
    an asyncpg whose internals differ, False: the acquisition is then bounded as ever."""
    holders = getattr(getattr(pool, "_queue", None), "_queue", None)
    if not holders or getattr(pool, "_setup", True) is not None:
        return False
    holder = holders[-1]
    con = getattr(holder, "_con", None)
    return con is not None and not con.is_closed() and _current(holder, pool)


def _current(holder: Any, pool: asyncpg.Pool) -> bool:
    """Whether asyncpg's holder is of the pool's generation (``expire_connections`` moves it
    on; asyncpg replaces a connection of an older one when it is next acquired or released)."""
    return getattr(holder, "_generation", None) == getattr(pool, "_generation", 0)


class _Acquired:
    """``TenantPools.acquire``'s context manager."""

    __slots__ = ("_conn", "_entry", "_login", "_pools", "_workload")

    def __init__(self, pools: TenantPools, login: TenantLogin, workload: Workload) -> None:
        self._pools = pools
        self._login = login
        self._workload = workload

    async def __aenter__(self) -> Connection:
        pools = self._pools
        if pools._spans is None:
            self._entry, self._conn = await pools._take(self._login, self._workload)
        else:
            with pools._spans.pool_acquire(self._login.tenant_id):
                self._entry, self._conn = await pools._take(self._login, self._workload)
        return self._conn

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pools, entry, conn = self._pools, self._entry, self._conn
        if exc is not None or _reset_needed(conn):
            pools._release_later(entry, conn)
        elif not pools._keep(entry, conn):
            # Before the answer, not left to a task: a request that followed at once would find
            # no idle connection and open another (measured: sequential callers of one tenant
            # kept two connections open instead of one, and a long test session ran out of
            # PostgreSQL's connection slots).
            await pools._release_inline(entry, conn)


class TenantPools:
    def __init__(
        self,
        dsn: str,
        *,
        max_per_tenant: int,
        global_max: int,
        workload_max: dict[Workload, int] | None = None,
        workload_settings: dict[Workload, dict[str, str]] | None = None,
        idle_seconds: float,
        acquire_timeout: float,
        on_event: Callable[[str, str], None] | None = None,
        start_loop: LoopStarter | None = None,
        spans: Spans | None = None,
    ) -> None:
        self._dsn = dsn
        self._spans = spans  # None: traces are off
        self._start_loop = start_loop or plain_start
        self._max_per_tenant = max_per_tenant
        # Each workload's pool size per login (OLTP's is ``max_per_tenant``).
        # Session defaults of each workload's connections (its statement_timeout: the tenant
        # role's own default is OLTP's limit, PostgreSQL's second line behind ``Deadlines``).
        self._workload_settings = workload_settings or {}
        self._workload_max: dict[Workload, int] = {
            "analytics": max_per_tenant,
            "bulk": max_per_tenant,
            **(workload_max or {}),
            "oltp": max_per_tenant,
        }
        self._idle_seconds = idle_seconds
        self._acquire_timeout = acquire_timeout
        self._budget = _Budget(global_max)
        self._entries: dict[tuple[str, Workload], _Entry] = {}
        self._creating: dict[tuple[str, Workload], asyncio.Task[_Entry]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Task[None]] = set()
        self._on_event = on_event or (lambda tenant, event: None)
        # Connections opened outside these pools under the same budget (the PostgreSQL wire
        # port's): each closer shuts one of its idle connections, if it has one, to make room.
        self._idle_closers: list[Callable[[], bool]] = []

    async def __aenter__(self) -> TenantPools:
        self._reaper = self._start_loop("tenant-pool-reaper", self._reap_forever)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.drain()
        for key in list(self._entries):
            await self._close(key)

    @property
    def max_per_tenant(self) -> int:
        return self._max_per_tenant

    def workload_max(self, workload: Workload) -> int:
        return self._workload_max[workload]

    @property
    def open_connections(self) -> int:
        return self._budget.open

    @property
    def global_max(self) -> int:
        return self._budget.limit

    async def take_slot(self, tenant_id: str, timeout: float | None = None) -> None:
        """Room under the global cap for one connection opened elsewhere (the wire port's
        server connections), made as for these pools' own (idle pools closed) and given back
        with ``give_slot`` when that connection closes; ResourceExhausted when none is free
        within ``timeout`` (the acquisition timeout by default)."""
        try:
            async with asyncio.timeout(self._acquire_timeout if timeout is None else timeout):
                # Every tenant's idle pools may make room, this one's too: the connection is
                # for the port, not for one of these pools.
                await self._take_budget(tenant_id, evict_own=True)
        except TimeoutError:
            raise ResourceExhausted(
                f"tenant {tenant_id!r}: the service's {self._budget.limit} PostgreSQL "
                "connections are all in use; retry later"
            ) from None

    def give_slot(self) -> None:
        self._budget.give_back()

    def starved(self) -> bool:
        """Whether a request waits for room under the cap (connections about to idle are
        closed for it instead: ``ServerPool._give``, ``_done_with``)."""
        return self._budget.waiting > 0

    def add_idle_closer(self, closer: Callable[[], bool]) -> None:
        """``closer()`` closes one idle connection counted by ``take_slot`` (True) or finds
        none (False); called before a request waits for room under the cap."""
        self._idle_closers.append(closer)

    def remove_idle_closer(self, closer: Callable[[], bool]) -> None:
        with contextlib.suppress(ValueError):
            self._idle_closers.remove(closer)

    def stats(self) -> dict[str, PoolStats]:
        """Per tenant, its pools added up."""
        result: dict[str, PoolStats] = {}
        for entry in self._entries.values():
            result[entry.tenant_id] = _added(result.get(entry.tenant_id), entry)
        return result

    def workload_stats(self) -> dict[str, dict[str, PoolStats]]:
        """Per tenant, per workload, its pools (of its logins) added up."""
        result: dict[str, dict[str, PoolStats]] = {}
        for entry in self._entries.values():
            tenant = result.setdefault(entry.tenant_id, {})
            tenant[entry.workload] = _added(tenant.get(entry.workload), entry)
        return result

    def acquire(self, login: TenantLogin, workload: Workload = "oltp") -> _Acquired:
        """A connection of the login's pool for ``workload`` (``async with``). Its release, when
        asyncpg resets the session (a round trip), runs after the caller is done, not before its
        answer goes out; the connection counts as in use, and returns to the pool, when the
        reset is over. A connection that needs no reset (``TenantConnection.skip_next_reset``)
        is released at once. A class, not a generator-based context manager: it runs on every
        request."""
        return _Acquired(self, login, workload)

    def _release_later(self, entry: _Entry, conn: Connection) -> None:
        self._in_background(self._release(entry, conn))

    def _in_background(self, releasing: Coroutine[Any, Any, None]) -> None:
        """Run a release as a task of its own, which ``drain`` (tests, shutdown) waits for."""
        task = asyncio.get_running_loop().create_task(releasing)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def _drop_kept(self, entry: _Entry, conn: Connection) -> None:
        """A kept connection that closed: asyncpg takes its holder back when the connection's
        cleanup has run (then the proxy lends nothing), else its release does that."""
        if getattr(conn, "_con", None) is not None:
            entry.in_use += 1  # counted back by the release
            self._release_later(entry, conn)

    async def _take(self, login: TenantLogin, workload: Workload) -> tuple[_Entry, Connection]:
        """A connection of the login's pool and its entry, counted in use (``_release`` or
        ``_done_with`` counts it back)."""
        entry = self._entries.get((login.role, workload)) or await self._entry(login, workload)
        # Counted in use: last_used matters only to idle entries (eviction, the reaper), and
        # _done_with stamps it when this use ends.
        entry.in_use += 1
        ready = entry.ready
        while ready:
            conn, _ = ready.pop()
            raw = getattr(conn, "_con", None)
            if raw is not None and not raw.is_closed():
                return entry, conn
            self._drop_kept(entry, conn)
        pool = entry.pool
        if _idle_connected(pool):
            # A connected idle connection is handed over without waiting (nothing in asyncpg's
            # acquire awaits then): no deadline to arm.
            try:
                return entry, await pool.acquire()
            except BaseException:
                self._done_with(entry)
                raise
        try:
            # One deadline for the whole acquisition: the pool's wait for a free connection
            # and, inside it, the wait for room under the global cap.
            async with asyncio.timeout(self._acquire_timeout):
                conn = await pool.acquire()
        except TimeoutError:
            self._done_with(entry)
            if self._budget.open >= self._budget.limit:
                raise ResourceExhausted(
                    f"tenant {login.tenant_id!r}: the service's {self._budget.limit} "
                    "PostgreSQL connections are all in use; retry later"
                ) from None
            raise ResourceExhausted(
                f"tenant {login.tenant_id!r}: no connection free within "
                f"{self._acquire_timeout:g}s ({workload} pool of {entry.max_size}); retry later"
            ) from None
        except BaseException:
            self._done_with(entry)
            raise
        return entry, conn

    async def _release(self, entry: _Entry, conn: Connection) -> None:
        try:
            await entry.pool.release(cast(PoolConnectionProxy, conn))
        except Exception as exc:  # asyncpg terminates a connection it could not reset
            log.debug("tenant %s: connection not reset on release: %s", entry.tenant_id, exc)
        finally:
            self._done_with(entry)

    def _keep(self, entry: _Entry, conn: Connection) -> bool:
        """Keep a connection that needs no reset for the login's next request instead of giving
        it back to asyncpg's pool, whose acquire and release (a queue, a future, a proxy, a
        timeout scope and an inactivity timer each way) were a third of a PK lookup's Python.

        Only when nothing waits in asyncpg's queue (a waiter gets it from asyncpg, as ever),
        the connection is open, outside a transaction, not waiting for a cancel request to be
        answered (asyncpg's release waits for that), of the pool's current generation and
        under asyncpg's query limit. It stays checked out as far as asyncpg knows: ``_take``
        hands it over first, a timer gives back the ones kept longer than ``_KEPT_SECONDS``
        (``_expire_kept``), and closing a pool gives them all back first. Same login, so
        the same tenant and role; no session state either (that is what needing no reset
        means), and ``expect_reset`` makes the next user say so again."""
        pool = entry.pool
        raw = getattr(conn, "_con", None)
        holder = getattr(conn, "_holder", None)
        waiting = getattr(getattr(pool, "_queue", None), "_getters", None)
        if (
            waiting is None
            or waiting
            or not isinstance(raw, TenantConnection)
            or raw.is_closed()
            or raw.is_in_transaction()
            or raw._protocol._is_cancelling()  # type: ignore[attr-defined]  # asyncpg waits for it
            or pool.is_closing()
            or not _current(holder, pool)
            or raw._protocol.queries_count >= getattr(holder, "_max_queries", 0)  # type: ignore[attr-defined]
        ):
            return False
        raw.expect_reset()
        entry.ready.append((conn, time.monotonic()))
        if entry.expiry is None:
            entry.expiry = asyncio.get_running_loop().call_later(
                _KEPT_SECONDS, self._expire_kept, entry
            )
        self._done_with(entry)
        return True

    def _expire_kept(self, entry: _Entry) -> None:
        """Give back the connections kept longer than ``_KEPT_SECONDS``; again later while
        some are kept."""
        entry.expiry = None
        if not entry.ready:
            return
        self._in_background(
            self._give_back_kept(entry, older_than=time.monotonic() - _KEPT_SECONDS)
        )
        entry.expiry = asyncio.get_running_loop().call_later(
            _KEPT_SECONDS, self._expire_kept, entry
        )

    async def _give_back_kept(self, entry: _Entry, older_than: float | None = None) -> None:
        """Kept connections back to asyncpg's pool (all of them, or those kept before
        ``older_than``): there its inactivity timer closes the ones a quieter load no longer
        needs, and closing the pool waits for them."""
        ready = entry.ready
        while ready and (older_than is None or ready[0][1] < older_than):
            conn, _ = ready.pop(0)
            raw = getattr(conn, "_con", None)
            if isinstance(raw, TenantConnection) and not raw.is_closed():
                raw.skip_next_reset()  # nothing ran on it since it was kept
                entry.in_use += 1  # counted back by the release
                await self._release_inline(entry, conn)
            else:
                self._drop_kept(entry, conn)

    async def _release_inline(self, entry: _Entry, conn: Connection) -> None:
        """A release with no reset to run, done in the caller's task. ``Pool.release`` runs the
        holder's release in a task of its own (shielded from cancellation), which costs a turn
        of the event loop: about 60 µs of a PK lookup's latency here. With no reset query and
        no transaction open (``skip_next_reset`` is only given outside one) nothing in the
        holder's release awaits, so there is nothing for a cancellation to interrupt. The same
        steps as ``Pool.release``; on an asyncpg whose internals differ, ``Pool.release``."""
        holder: Any = getattr(conn, "_holder", None)
        raw: Any = getattr(conn, "_con", None)
        if (
            getattr(holder, "_pool", None) is not entry.pool
            or not hasattr(raw, "_on_release")
            or not hasattr(holder, "release")
        ):
            await self._release(entry, conn)
            return
        try:
            raw._on_release()  # asyncpg's housekeeping: the proxy no longer lends it
            await holder.release(getattr(holder, "_timeout", None))
        except Exception as exc:  # asyncpg terminates a connection it could not release
            log.debug("tenant %s: connection not released cleanly: %s", entry.tenant_id, exc)
        finally:
            self._done_with(entry)

    def _done_with(self, entry: _Entry) -> None:
        entry.in_use -= 1
        entry.last_used = time.monotonic()
        if entry.in_use == 0 and self._budget.waiting:
            # A request waits for room under the cap: this pool, idle now, makes it (eviction
            # ran before that request began to wait, and nothing else would run it again).
            key = next((k for k, e in self._entries.items() if e is entry), None)
            if key is not None:
                self._in_background(self._close(key, only_idle=True))

    async def drain(self) -> None:
        """Wait for the releases under way (tests, shutdown)."""
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def _entry(self, login: TenantLogin, workload: Workload) -> _Entry:
        key = (login.role, workload)
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        # One creator per login and workload; concurrent first requests await the same task.
        task = self._creating.get(key)
        if task is None:
            task = asyncio.create_task(self._create(login, workload))
            self._creating[key] = task
            task.add_done_callback(lambda _: self._creating.pop(key, None))
        return await asyncio.shield(task)

    async def _create(self, login: TenantLogin, workload: Workload) -> _Entry:
        async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
            await self._take_budget(login.tenant_id)
            try:
                conn: asyncpg.Connection = await asyncpg.connect(*args, **kwargs)
            except (Exception, asyncio.CancelledError):
                self._budget.give_back()
                raise
            released = False

            def on_close(_: object) -> None:
                nonlocal released
                if not released:
                    released = True
                    self._budget.give_back()

            conn.add_termination_listener(on_close)
            return conn

        pool = await asyncpg.create_pool(
            self._dsn,
            user=login.role,
            password=login.password,
            min_size=0,
            max_size=self._workload_max[workload],
            max_inactive_connection_lifetime=self._idle_seconds,
            connect=connect,
            init=init_connection,
            connection_class=TenantConnection,
            # No tenant id here: every role can read application_name in pg_stat_activity.
            server_settings={
                **self._workload_settings.get(workload, {}),
                "application_name": f"dbsvc-tenant-{workload}",
            },
        )
        assert pool is not None
        size = self._workload_max[workload]
        entry = _Entry(login.tenant_id, pool, size, workload)
        self._entries[(login.role, workload)] = entry
        self._on_event(login.tenant_id, "pool_opened")
        log.info("tenant %s: %s pool opened (max %d)", login.tenant_id, workload, size)
        return entry

    async def _take_budget(self, tenant_id: str, *, evict_own: bool = False) -> None:
        if self._budget.try_take():
            return
        await self._evict_idle(exclude=None if evict_own else tenant_id)
        if not self._budget.try_take():
            await self._budget.wait()  # bounded by the caller's acquisition deadline

    async def _evict_idle(self, exclude: str | None) -> None:
        # The port's idle server connections first: one connection each, no pool to reopen.
        for closer in self._idle_closers:
            while self._budget.open >= self._budget.limit and closer():
                pass
        if self._budget.open < self._budget.limit:
            return
        idle = sorted(
            (e.last_used, key)
            for key, e in self._entries.items()
            if e.in_use == 0 and e.tenant_id != exclude and e.pool.get_size() > 0
        )
        for _, key in idle:
            await self._close(key, only_idle=True)
            if self._budget.open < self._budget.limit:
                return

    async def close_tenant(self, tenant_id: str) -> None:
        """Close a tenant's pools (suspend, delete). In-flight work finishes first."""
        for key in [k for k, e in self._entries.items() if e.tenant_id == tenant_id]:
            await self._close(key)

    async def _close(self, key: tuple[str, Workload], *, only_idle: bool = False) -> None:
        entry = self._entries.get(key)
        # Re-checked here, after whatever the caller awaited: a request may have started.
        if entry is None or (only_idle and entry.in_use):
            return
        del self._entries[key]
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None
        await self._give_back_kept(entry)
        try:
            await asyncio.wait_for(entry.pool.close(), timeout=10)
        except Exception:  # a server that already ended the sessions: nothing left to close
            entry.pool.terminate()
        self._on_event(entry.tenant_id, "pool_closed")
        log.info("tenant %s: pool closed", entry.tenant_id)

    async def _reap_forever(self) -> None:
        interval = max(0.5, self._idle_seconds / 2)
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self._idle_seconds
            for key, entry in list(self._entries.items()):
                if entry.in_use == 0 and entry.last_used < deadline:
                    await self._close(key, only_idle=True)
