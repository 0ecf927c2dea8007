"""Time limits on tenant sessions, enforced from outside the session.

A tenant's SQL can change its own session's settings (``statement_timeout``, ``lock_timeout``,
``idle_in_transaction_session_timeout``) in a function body, and PL/pgSQL can even trap the
``query_canceled`` a timeout raises. So the limits that protect everyone else are kept by the
service, not by the session:

- each statement (each round trip: a query, a cursor fetch, a COPY) runs under the tenant's
  statement limit; when it passes, the awaiting task is cancelled, which makes asyncpg send
  PostgreSQL a cancel request for that backend (over a separate connection, keyed by the
  backend's secret);
- the whole session (a transaction, a stream whose reader is slow) runs under the transaction
  limit, checked by a timer whatever the session is doing;
- a session whose limit passed is never returned to its pool: its connection is closed, and
  when its backend is still busy ``grace`` seconds later (a cancel it trapped, a loop that never
  reads the socket), the owner role terminates it (``pg_terminate_backend``, checked against the
  backend's pid and role so that nothing else is hit).

An expired session raises ``QueryError`` with SQLSTATE 57014 (query_canceled), which front ends
report as a deadline exceeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

import asyncpg

from database_service.errors import QueryError, postgres_unreachable
from database_service.loops import RunningLoop

__all__ = ["Deadlines", "SessionWatch"]

log = logging.getLogger(__name__)

_NEVER = math.inf
# How late a deadline may be seen: one within this of the timer's waits for it, rather than the
# timer being moved (each session's first statement would move it otherwise).
_SLACK = 0.005
# A statement its caller gave up on and still running this long after: asyncpg's cancel of it
# was lost (``Deadlines.abandoned``).
_ABANDONED_SECONDS = 1.0


class SessionWatch:
    """The limits of one tenant session on one connection. Its deadlines are kept by its
    ``Deadlines`` (one timer for every session), not by timers of its own."""

    __slots__ = (
        "_closed",
        "_conn",
        "_limits",
        "_owner",
        "_pid",
        "_role",
        "_total_at",
        "expired",
        "statement_seconds",
        "total_seconds",
    )

    def __init__(
        self,
        owner: Deadlines,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        role: str,
        *,
        statement_seconds: float,
        total_seconds: float,
    ) -> None:
        self._owner = owner
        self._conn = conn
        self._role = role
        self._pid = conn.get_server_pid()
        self.statement_seconds = statement_seconds
        self.total_seconds = total_seconds
        self.expired: str | None = None  # why: "statement" or "transaction"
        self._closed = False
        self._limits: list[_StatementLimit] = []  # the round trips under way (usually one)
        self._total_at = owner.now() + total_seconds
        owner.watched(self, self._total_at)

    def statement(self) -> _StatementLimit:
        """One round trip under the statement limit (and the session's, if that expired), as
        ``async with`` or, cheaper, ``with`` (neither enter nor exit awaits anything). A class
        rather than a generator-based context manager: it runs several times per request."""
        return _StatementLimit(self)

    def given_up(self) -> None:
        """Its caller gave up on the round trip under way (cancelled, not by a limit): the
        cancel asyncpg sends may be lost, so the owner sees that the statement ends
        (``Deadlines.abandoned``)."""
        if self.expired is None and not self._closed and not self._conn.is_closed():
            self._owner.abandoned(self._pid, self._role)

    def check(self) -> None:
        if self.expired is not None:
            raise self.error()

    def error(self) -> QueryError:
        if self.expired == "statement":
            limit, what = self.statement_seconds, "statement"
        else:
            limit, what = self.total_seconds, "transaction"
        return QueryError(
            f"the {what} exceeded the tenant's limit of {limit * 1000:.0f} ms and was canceled",
            sqlstate="57014",
        )

    def _due(self, now: float) -> float:
        """The owner's check: act on the deadlines that passed; return the next one (inf: none
        left to watch)."""
        if self._closed or self.expired is not None:
            return _NEVER
        if now >= self._total_at:
            self._expire("transaction")
            # A round trip under way ends now too, as its own limit would end it: the awaiting
            # task is cancelled (asyncpg asks PostgreSQL to cancel), rather than left waiting
            # for a backend that traps the cancel until it is terminated after the grace.
            for limit in list(self._limits):
                limit.fire()
            return _NEVER
        due = self._total_at
        for limit in self._limits:
            if now >= limit.at:
                limit.fire()
            else:
                due = min(due, limit.at)
        return due

    def _expire(self, why: str) -> None:
        if self.expired is not None or self._closed:
            return
        self.expired = why
        self._owner.expired(self._pid, self._role, why)

    def close(self) -> None:
        """End of the session: a connection whose limit passed is closed, never reused."""
        self._closed = True
        self._owner.unwatched(self)
        if self.expired is not None:
            with contextlib.suppress(Exception):
                self._conn.terminate()


class _StatementLimit:
    """One round trip's limit, as ``asyncio.timeout`` would keep it — the awaiting task is
    cancelled when it passes (asyncpg then asks PostgreSQL to cancel the statement) and the
    cancellation becomes the limit's error — but with no timer of its own: a deadline the
    owner's one timer checks."""

    __slots__ = ("_cancelling", "_fired", "_task", "_watch", "at")

    def __init__(self, watch: SessionWatch) -> None:
        self._watch = watch
        self._fired = False
        self.at = _NEVER

    def fire(self) -> None:
        if not self._fired:
            self._fired = True
            self.at = _NEVER
            self._task.cancel()

    def __enter__(self) -> None:
        watch = self._watch
        watch.check()
        task = asyncio.current_task(watch._owner.loop())
        if task is None:
            raise RuntimeError("a statement limit is entered in a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.at = at = watch._owner.now() + watch.statement_seconds
        watch._limits.append(self)
        watch._owner.due(at)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        watch = self._watch
        watch._limits.remove(self)
        self.at = _NEVER
        # Ours unless someone else cancelled the task too (then theirs goes on).
        if (
            self._fired
            and self._task.uncancel() <= self._cancelling
            and kind is asyncio.CancelledError
        ):
            watch._expire("statement")
            raise watch.error() from None
        if exc is None or watch.expired is None:
            return  # canceled by someone else (PostgreSQL's statement_timeout, a user)
        if isinstance(exc, asyncpg.QueryCanceledError) or postgres_unreachable(exc):
            # Canceled, or its backend terminated, after the session's limit passed.
            raise watch.error() from exc

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(kind, exc, tb)


class Deadlines:
    """Starts watches and ends what outlives its limit, through the owner's pool."""

    def __init__(
        self,
        owner_pool: asyncpg.Pool,
        *,
        grace_seconds: float = 2.0,
        on_expired: Callable[[str], None] | None = None,
    ) -> None:
        self._pool = owner_pool
        self._grace = grace_seconds
        self._on_expired = on_expired or (lambda why: None)
        self._tasks: set[asyncio.Task[None]] = set()
        self.terminated = 0
        self.recancelled = 0  # abandoned statements whose first cancel was lost
        # One timer for every session's deadlines, set for the earliest one known (a later
        # deadline is seen when it fires and looks at them all). Entering a statement costs an
        # attribute and a comparison, not a TimerHandle per round trip; a deadline is seen at
        # most ``_SLACK`` late when it comes within that of the timer's.
        self._sessions: dict[SessionWatch, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _NEVER
        self._loop: asyncio.AbstractEventLoop | None = None
        self.loop = RunningLoop()

    def now(self) -> float:
        return self.loop().time()

    def watched(self, watch: SessionWatch, at: float) -> None:
        self._sessions[watch] = None
        self.due(at)

    def unwatched(self, watch: SessionWatch) -> None:
        self._sessions.pop(watch, None)

    def due(self, at: float) -> None:
        """A deadline to check at ``at`` (loop time): the timer moves earlier if need be."""
        loop = self.loop()
        if loop is not self._loop:  # a timer of another (closed) loop never fires here
            self._loop, self._timer, self._timer_at = loop, None, _NEVER
        if at < self._timer_at - _SLACK:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(at, self._check)
            self._timer_at = at

    def _check(self) -> None:
        self._timer = None
        self._timer_at = _NEVER
        assert self._loop is not None
        now = self._loop.time()
        earliest = _NEVER
        for watch in list(self._sessions):
            at = watch._due(now)
            if at == _NEVER:
                self._sessions.pop(watch, None)  # expired (or closed): nothing left to watch
            elif at < earliest:
                earliest = at
        if earliest != _NEVER:
            self.due(earliest)

    def watch(
        self,
        conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
        role: str,
        *,
        statement_seconds: float,
        total_seconds: float,
    ) -> SessionWatch:
        return SessionWatch(
            self, conn, role, statement_seconds=statement_seconds, total_seconds=total_seconds
        )

    def expired(self, pid: int, role: str, why: str) -> None:
        self._on_expired(why)
        self._start(self._end(pid, role, time.time()))

    def abandoned(self, pid: int, role: str) -> None:
        """The statement running on backend ``pid`` was given up by its caller (its deadline,
        a cancel): asyncpg asks PostgreSQL to cancel it, but a CancelRequest that arrives
        before the backend has read the statement is lost (PostgreSQL cancels only what runs),
        and the statement then runs to its end. One still running a moment later is cancelled
        again, and terminated after the grace period if that does not end it either."""
        self._start(self._end(pid, role, time.time(), abandoned=True))

    def _start(self, ending: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(ending)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end(self, pid: int, role: str, since: float, *, abandoned: bool = False) -> None:
        """Cancel now (for a backend the awaiting task does not own any more, e.g. a stream
        whose reader stalls) — or, for a statement given up, a moment later if it still runs;
        terminate after the grace period if it is still busy."""
        what = "a statement given up still ran" if abandoned else "it outlived its time limit"
        try:
            if abandoned:
                await asyncio.sleep(_ABANDONED_SECONDS)
            # A statement given up: only one that began before, for the connection may be
            # back in its pool by now, running another caller's.
            cancelled = await self._signal("pg_cancel_backend", pid, role, since, running=abandoned)
            if abandoned:
                if not cancelled:
                    return  # it ended (asyncpg's cancel came through)
                self.recancelled += 1
                log.warning("backend %d of a tenant: %s; cancelled again", pid, what)
            await asyncio.sleep(self._grace)
            if await self._signal("pg_terminate_backend", pid, role, since, running=abandoned):
                self.terminated += 1
                log.warning("backend %d of a tenant ended: %s", pid, what)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # PostgreSQL down: nothing left to stop
            log.warning("could not stop backend %d (%s): %s", pid, what, exc)

    async def _signal(
        self, function: str, pid: int, role: str, since: float, *, running: bool = False
    ) -> bool:
        # Only that backend, only while it still runs (or holds a transaction) for that role and
        # since before the limit passed: a pid reused by another session is left alone.
        # ``running``: only while it runs a statement that began before ``since``.
        condition = (
            "state = 'active' AND query_start <= to_timestamp($3)"
            if running
            else "state <> 'idle' AND backend_start <= to_timestamp($3)"
        )
        return bool(
            await self._pool.fetchval(
                f"SELECT {function}(pid) FROM pg_stat_activity WHERE pid = $1 AND usename = $2"
                f" AND {condition}",
                pid,
                role,
                since,
            )
        )

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, _NEVER
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
