"""Per-tenant pools of raw server connections, lent for one transaction at a time.

A client holds a server connection from its first message of a transaction until PostgreSQL
says the connection is idle again (ReadyForQuery 'I'); then it goes back to its pool. A
connection handed back in any other state (a client that vanished mid-transaction) is rolled
back before anyone else gets it, and one whose stream state is unknown is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from database_service.errors import ResourceExhausted
from database_service.pgwire.backend import (
    MAX_PREPARED_BYTES,
    BackendError,
    PgAddress,
    ServerConnection,
)
from database_service.postgres import TenantLogin

__all__ = ["ConnectionBudget", "PoolFigures", "ServerPool", "ServerPools"]

log = logging.getLogger(__name__)


class ConnectionBudget(Protocol):
    """The service's cap on PostgreSQL connections (``TenantPools``): every server connection
    the port opens takes a slot first and gives it back when it closes, so the port and the
    other front ends together never exceed ``DBSVC_POOL_GLOBAL_MAX`` (this worker's share)."""

    async def take_slot(self, tenant_id: str, timeout: float | None = None) -> None: ...

    def give_slot(self) -> None: ...

    def starved(self) -> bool:
        """Whether something waits for room under the cap now: a connection about to idle
        is closed instead, or the waiter would wait for a slot nobody gives back."""
        ...


class _Unbounded:
    async def take_slot(self, tenant_id: str, timeout: float | None = None) -> None:
        return None

    def give_slot(self) -> None:
        return None

    def starved(self) -> bool:
        return False


_EXHAUSTED = "53300"


@dataclass(slots=True)
class PoolFigures:
    tenant_id: str
    role: str
    idle: int
    active: int
    waiting: int
    max_size: int
    transactions: int


@dataclass(eq=False)
class ServerPool:
    """One login role's connections: at most ``max_size`` open, idle ones reused LIFO."""

    address: PgAddress
    login: TenantLogin
    max_size: int
    settings: dict[str, str]
    budget: ConnectionBudget = field(default_factory=_Unbounded)
    acquire_timeout: float = 10.0  # for a waiter that opens a connection itself
    idle: deque[ServerConnection] = field(default_factory=deque)
    open: int = 0
    waiters: deque[asyncio.Future[ServerConnection]] = field(default_factory=deque)
    transactions: int = 0
    queries: int = 0  # Query and Execute messages run on its connections
    waits: int = 0  # acquisitions that had to wait for a free connection, and how long
    wait_seconds: float = 0.0
    # The server's parameters as a new connection reports them (server_version...), for the
    # ParameterStatus messages the port sends its clients.
    parameters: dict[str, str] = field(default_factory=dict)
    last_used: float = field(default_factory=time.monotonic)
    # PgBouncer's server_idle_timeout and server_lifetime (None: no limit); ``closed`` is told
    # why each connection closes: idle, lifetime, budget, broken, cancelled, prepared.
    idle_seconds: float | None = None
    lifetime_seconds: float | None = None
    closed: Callable[[str], None] = field(default=lambda _: None)
    # The compiled relay (relay.py) holds some of this pool's connections while it uses
    # them: a waiter here asks it for one back.
    reclaim: Callable[[], None] | None = None

    def _too_old(self, conn: ServerConnection, now: float) -> bool:
        return self.lifetime_seconds is not None and now - conn.opened >= self.lifetime_seconds

    async def acquire(self, timeout: float, *, reclaim: bool = True) -> ServerConnection:
        self.last_used = now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.broken or conn.reader.at_eof():
                self._discard(conn)
            elif self._too_old(conn, now):
                self._discard(conn, "lifetime")
            else:
                return conn
        if self.open < self.max_size:
            self.open += 1
            try:
                conn = await self._connect(timeout)
            except BaseException:
                self.open -= 1
                self._wake()
                raise
            if not self.parameters:
                self.parameters = dict(conn.parameters)
            return conn
        waiter: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        self.waits += 1
        if reclaim and self.reclaim is not None:
            self.reclaim()
        started = time.monotonic()
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise BackendError(
                f"tenant {self.login.tenant_id!r}: no server connection free within {timeout:g} s",
                {
                    "C": _EXHAUSTED,
                    "M": f"no server connection free within {timeout:g} s (pool of"
                    f" {self.max_size}); retry later",
                },
            ) from None
        finally:
            self.wait_seconds += time.monotonic() - started
            if waiter in self.waiters:
                self.waiters.remove(waiter)

    def release(self, conn: ServerConnection) -> None:
        """Back to the pool: an idle connection at once, one left in a transaction after a
        rollback (on a task of its own), a broken one closed."""
        self.transactions += 1
        if conn.broken:
            self._discard(conn)
        elif conn.prepared_bytes > MAX_PREPARED_BYTES // 2:
            # Its prepared statements stay in the backend's memory for its life: a fresh one
            # for the next client instead.
            self._discard(conn, "prepared")
        elif conn.cancelling:
            # A cancel of the returning client's statement has not reached PostgreSQL yet:
            # lent now, the connection could have the next client's statement cancelled.
            self._discard(conn, "cancelled")
        elif conn.status == b"I" and self._too_old(conn, time.monotonic()):
            self._discard(conn, "lifetime")  # a fresh one for the next, if any wants it
        elif conn.status == b"I":
            self._give(conn)
        else:
            asyncio.get_running_loop().create_task(self._roll_back(conn))

    async def _roll_back(self, conn: ServerConnection) -> None:
        try:
            error = await asyncio.wait_for(conn.simple("ROLLBACK"), 10)
        except (BackendError, OSError, TimeoutError):
            error = {"M": "no answer"}
        if error is not None or conn.status != b"I":
            log.info("tenant %s: server connection closed, not rolled back", self.login.tenant_id)
            self._discard(conn)
        else:
            self._give(conn)

    def _give(self, conn: ServerConnection) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if self.budget.starved():
            # Another pool (or front end) waits for room under the service's cap, which an
            # idle connection here would keep from it until the idle limit.
            self._discard(conn, "budget")
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    async def _connect(self, timeout: float) -> ServerConnection:
        """A new server connection, once the service's budget has room for it (53300 when it
        has none within ``timeout``)."""
        try:
            await self.budget.take_slot(self.login.tenant_id, timeout)
        except ResourceExhausted as exc:
            raise BackendError(exc.message, {"C": _EXHAUSTED, "M": exc.message}) from None
        try:
            return await ServerConnection.connect(
                self.address, self.login.role, self.login.password, self.settings
            )
        except BaseException:
            self.budget.give_slot()
            raise

    def _discard(self, conn: ServerConnection, reason: str = "broken") -> None:
        conn.close()
        self.open -= 1
        self.budget.give_slot()
        self.closed(reason)
        self._wake()

    def close_one_idle(self) -> bool:
        """Close the least recently used idle connection (room for another under the cap)."""
        if not self.idle:
            return False
        self._discard(self.idle.popleft(), "budget")
        return True

    def close_expired(self, now: float) -> int:
        """Close the idle connections past the idle limit or the age limit: how many."""
        expired = [
            conn
            for conn in self.idle
            if (self.idle_seconds is not None and now - conn.idle_since >= self.idle_seconds)
            or self._too_old(conn, now)
        ]
        for conn in expired:
            self.idle.remove(conn)
            idle = self.idle_seconds is not None and now - conn.idle_since >= self.idle_seconds
            self._discard(conn, "idle" if idle else "lifetime")
        return len(expired)

    def _wake(self) -> None:
        """A slot freed: the first waiter opens a connection of its own."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                task = asyncio.get_running_loop().create_task(self._open_for(waiter))
                task.add_done_callback(lambda _: None)
                return

    async def _open_for(self, waiter: asyncio.Future[ServerConnection]) -> None:
        if self.open >= self.max_size:
            self.waiters.appendleft(waiter)
            return
        self.open += 1
        try:
            conn = await self._connect(self.acquire_timeout)
        except Exception as exc:
            self.open -= 1
            if not waiter.done():
                waiter.set_exception(exc)
            return
        if waiter.done():
            self._give(conn)
        else:
            waiter.set_result(conn)

    def figures(self, waiting: int = 0) -> PoolFigures:
        return PoolFigures(
            self.login.tenant_id,
            self.login.role,
            len(self.idle),
            self.open - len(self.idle),
            len(self.waiters),
            self.max_size,
            self.transactions,
        )

    def close(self) -> None:
        while self.idle:
            self._discard(self.idle.pop(), "closed")


class ServerPools:
    """Every tenant's pool of this port, by login role."""

    def __init__(
        self,
        address: PgAddress,
        *,
        max_per_tenant: int,
        budget: ConnectionBudget | None = None,
        acquire_timeout: float = 10.0,
        idle_seconds: float | None = None,
        lifetime_seconds: float | None = None,
        closed: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.address = address
        self.max_per_tenant = max_per_tenant
        self.budget = budget or _Unbounded()
        self.acquire_timeout = acquire_timeout
        self.idle_seconds = idle_seconds
        self.lifetime_seconds = lifetime_seconds or None  # 0: no age limit
        self.closed = closed
        self._pools: dict[str, ServerPool] = {}
        # Set by the relay: give back the server connections it holds idle.
        self.lent_idle: Callable[[], None] | None = None

    def pool(self, login: TenantLogin, settings: dict[str, str]) -> ServerPool:
        pool = self._pools.get(login.role)
        if pool is None or pool.login.password != login.password or pool.settings != settings:
            if pool is not None:
                pool.close()  # a rotated secret or new limits: new connections from now on
            pool = ServerPool(
                self.address, login, self.max_per_tenant, settings, self.budget,
                self.acquire_timeout, idle_seconds=self.idle_seconds,
                lifetime_seconds=self.lifetime_seconds, closed=self.closed,
            )  # fmt: skip
            self._pools[login.role] = pool
        return pool

    def figures(self) -> list[PoolFigures]:
        return [p.figures() for p in self._pools.values()]

    def close_one_idle(self) -> bool:
        """An idle connection of the pool used least recently closed (``TenantPools`` asks
        when the service's budget is full), or False when none is idle. With none idle here,
        the relay is asked for those it holds idle: they come back, and are closed, soon
        (``ServerPool._give``, while the budget is starved)."""
        pools = sorted((p for p in self._pools.values() if p.idle), key=lambda p: p.last_used)
        if pools:
            return pools[0].close_one_idle()
        if self.lent_idle is not None:
            self.lent_idle()
        return False

    def close_expired(self) -> int:
        """Every pool's idle connections past the idle or age limit closed: how many."""
        now = time.monotonic()
        return sum(pool.close_expired(now) for pool in self._pools.values())

    def all(self) -> list[ServerPool]:
        return list(self._pools.values())

    @property
    def servers(self) -> int:
        return sum(p.open for p in self._pools.values())

    def close(self) -> None:
        for pool in self._pools.values():
            with contextlib.suppress(Exception):
                pool.close()
