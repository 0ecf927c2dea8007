"""The wire port's compiled byte path (``dbsvc_wire``, Rust): Python's side of it.

Why it exists: a data plane that handles every message in Python stops near half of
PgBouncer's throughput on this machine (issue #16: a bare uvloop byte forwarder, with no
parsing and no pooling, made 0.55x). So the steady state of a pooled client, a simple
``Query`` outside any transaction, runs on a thread of the relay's own, in Rust, with no
Python per statement; everything else stays here.

The split:

- Python (``server.py``) logs the client in, decides every statement it has not seen the
  shape of (the SQL guard, scopes, session rules), runs transactions the client opens, the
  extended protocol, COPY, settings, user ids, TLS sessions and the admin database.
- When a session is idle (no server connection, nothing pending, no user id, no TLS) it is
  *delegated*: its socket is watched by the relay, which runs each ``Query`` whose shape
  (``dbsvc_wire.shape_of``: its text with constants as ``$n``, in pg_query's format) Python
  *allowed* for the session's class (tenant schema, service and scopes) on a server
  connection of the tenant's pool, forwarding the answers untouched. The first message it
  does not run, it hands back with everything it read, and the session goes on here.
- A shape is allowed only after the guard accepted a text of it by shape (the verdict every
  text of that pg_query shape gets) or, for a text without constants, by its exact text,
  as a plain READ or WRITE the service's scopes permit, with no transaction control, and
  only if pg_query normalises that text to exactly the relay's shape.
- Server connections stay the pool's: the relay borrows idle ones (``need``), keeps them
  while it uses them and gives them back idle after a second, after five seconds lent, or
  broken; a Python session that must wait for one takes one back (``ServerPool.reclaim``).
- Statement figures, audit events and counters of relayed statements come back as events,
  drained every 20 ms (and before the audit log flushes): nothing is lost, nothing waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pglast

from database_service.pgwire.backend import MAX_PREPARED_BYTES, BackendError, ServerConnection
from database_service.pgwire.pooling import ServerPool
from database_service.sqlguard import Classification

if TYPE_CHECKING:
    from database_service.pgwire.server import ClientSession, PgWireServer

__all__ = ["Handback", "Relay", "available"]

log = logging.getLogger(__name__)

try:  # the compiled part: built by `make install` (native/wire)
    import dbsvc_wire
except ImportError:  # pragma: no cover - an install without it serves everything in Python
    dbsvc_wire = None  # type: ignore[assignment]

_DRAIN_SECONDS = 0.02
_VERDICTS_MAX = 65536


def available() -> bool:
    return dbsvc_wire is not None


def shape_of(text: bytes) -> tuple[bytes, bytes] | None:
    """The relay's shape of a statement: (normalised text, kinds of its constants)."""
    assert dbsvc_wire is not None
    result: tuple[bytes, bytes] | None = dbsvc_wire.shape_of(text)
    return result


class Handback:
    """What the relay gives back with a session: the bytes it read and did not run, the
    bytes it had not written to the client yet, the shape it did not know (to allow), whether
    it ran a statement, a server connection still in the client's transaction, the
    session's settings as the servers reported them, and whether the session must end."""

    __slots__ = (
        "applied",
        "close",
        "key",
        "leftover",
        "normalized",
        "pending",
        "prepared",
        "prepared_bytes",
        "ran",
        "server",
        "status",
        "wanted",
    )

    def __init__(self, event: tuple[Any, ...]) -> None:
        (
            _,
            _,
            self.leftover,
            self.pending,
            self.key,
            self.normalized,
            self.ran,
            self.server,
            self.status,
            self.close,
            self.wanted,
            (self.applied, self.prepared, self.prepared_bytes),
        ) = event


class Relay:
    """One per port (worker): the relay's thread and Python's bookkeeping of what it holds."""

    def __init__(self, port: PgWireServer) -> None:
        assert dbsvc_wire is not None
        self.port = port
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._plane = dbsvc_wire.Plane(self._write_fd)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._read_fd, self._signalled)
        self._waiting: dict[int, asyncio.Future[Handback]] = {}
        self._lent: dict[int, tuple[ServerPool, ServerConnection]] = {}
        self._pool_ids: dict[ServerPool, int] = {}
        self._pools: dict[int, ServerPool] = {}
        self._classes: dict[tuple[object, ...], int] = {}
        self._verdicts: list[Classification] = []
        self._verdict_ids: dict[int, int] = {}
        self._next = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._drainer = self._loop.create_task(self._drain_often())
        self.relayed = 0  # statements the relay ran (the admin view and the tests)
        port.app.audit.before_flush(self.drain)
        port.pools.lent_idle = self._plane.reclaim_idle

    # -- sessions ---------------------------------------------------------------------------

    def class_of(self, session: ClientSession) -> int:
        """Sessions whose decisions are the same (tenant schema, service, scopes) share the
        shapes allowed for them."""
        assert session.principal is not None and session.tenant is not None
        key = (
            session.tenant.tenant_id,
            session.tenant.schema_name,
            session.principal.service,
            session.principal.scopes,
        )
        found = self._classes.get(key)
        if found is None:
            found = self._classes[key] = len(self._classes) + 1
        return found

    @property
    def lent(self) -> int:
        """Server connections the relay holds now (running a statement or idle)."""
        return len(self._lent)

    def held(self) -> list[tuple[ServerPool, ServerConnection, int | None, float]]:
        """The server connections the relay holds now: (pool, connection, the pid of the
        session whose statement runs on it or None, seconds idle) — the admin view's rows."""
        out = []
        for sid, session, idle in self._plane.held():
            lent = self._lent.get(sid)
            if lent is not None:
                out.append((lent[0], lent[1], session, idle))
        return out

    def pool_id(self, pool: ServerPool) -> int:
        found = self._pool_ids.get(pool)
        if found is None:
            self._next += 1
            found = self._pool_ids[pool] = self._next
            self._pools[found] = pool
            pool.reclaim = lambda: self._plane.reclaim(found)
        return found

    def delegate(
        self,
        session: ClientSession,
        fd: int,
        pool: ServerPool,
        buffered: bytes,
        wanted: list[tuple[str, str, str]],
        limit_ms: int,
        margin_ms: int,
        statements: list[tuple[bytes, bytes, bytes, Classification, bytes]],
    ) -> asyncio.Future[Handback]:
        """``statements``: the client's named statements the relay may run (client's name,
        server's name, the Parse under that name, verdict, text)."""
        future: asyncio.Future[Handback] = self._loop.create_future()
        self._waiting[session.pid] = future
        self._plane.delegate(
            session.pid,
            fd,
            self.pool_id(pool),
            self.class_of(session),
            buffered,
            wanted,
            limit_ms,
            margin_ms,
            pool.max_size,
            [(n, s, p, self.verdict_index(v), t) for n, s, p, v, t in statements],
        )
        return future

    def recall(self, session: ClientSession) -> None:
        """Take a delegated session back at once (it is closing): the relay stops watching its
        socket before this returns."""
        future = self._waiting.pop(session.pid, None)
        self._plane.recall(session.pid)
        self.drain()
        if future is not None and not future.done():
            # The session's task waits for the relay: it ends as a client gone.
            future.set_exception(ConnectionAbortedError("the port took the session back"))

    def serving(self, session: ClientSession) -> ServerConnection | None:
        """The server connection running the session's statement in the relay now (held:
        the relay gives it back rather than lend it again), for a cancel request."""
        sid = self._plane.serving(session.pid)
        lent = self._lent.get(sid) if sid is not None else None
        return lent[1] if lent is not None else None

    def allow(
        self, session: ClientSession, back: Handback, sql: str, verdict: Classification
    ) -> bool:
        """After Python decided the first text of a shape the relay did not know: let the
        relay run that shape for the session's class if its verdict holds for every text of
        it (see the module's docstring)."""
        if back.key is None or back.normalized is None:
            return False
        if back.normalized != sql.encode():  # constants: the guard's verdict must be by shape
            try:
                normalized = pglast.parser.normalize(sql)
            except pglast.parser.ParseError:
                return False
            if normalized.encode() != back.normalized:
                return False
            if not self.port.app.guard.shape_known(
                normalized,
                session.tenant.schema_name if session.tenant else "",
                self.port.policy.shared_schemas,
            ):
                return False
        self._plane.allow(self.class_of(session), back.key, self.verdict_index(verdict))
        return True

    def verdict_index(self, verdict: Classification) -> int:
        """The relay names verdicts by index (its events carry it back)."""
        index = self._verdict_ids.get(id(verdict))
        if index is None:
            if len(self._verdicts) >= _VERDICTS_MAX:
                # Shapes allowed so far name indexes about to be reused: forgotten with them.
                # Sessions delegated now keep their statements' indexes: a few figures may be
                # booked under a newer verdict of the same tenant, never run under one.
                self._verdicts.clear()
                self._verdict_ids.clear()
                self._plane.forget()
            index = len(self._verdicts)
            self._verdicts.append(verdict)
            self._verdict_ids[id(verdict)] = index
        return index

    def forget(self) -> None:
        """Every allowed shape forgotten (the guard's catalog or rules changed)."""
        self._plane.forget()

    # -- events -----------------------------------------------------------------------------

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._read_fd, 4096)
        self.drain()

    async def _drain_often(self) -> None:
        while True:
            await asyncio.sleep(_DRAIN_SECONDS)
            try:
                self.drain()
            except Exception:  # a bug here must not stop the figures
                log.exception("PostgreSQL wire relay: handling its events failed")

    def drain(self) -> None:
        """Everything the relay did since the last drain, in order."""
        sessions = self.port.sessions
        touched: set[ClientSession] = set()
        for event in self._plane.take():
            kind = event[0]
            if kind == "done":
                session = sessions.get(event[1])
                if session is not None:
                    verdict = self._verdicts[event[2]]
                    self.relayed += session.relayed_done(
                        verdict, event[3], event[4], event[5], event[6]
                    )
                    touched.add(session)
            elif kind == "failed":
                session = sessions.get(event[1])
                if session is not None:
                    session.relayed_failed(self._verdicts[event[2]], event[3], event[4])
                    touched.add(session)
            elif kind == "returned":
                future = self._waiting.pop(event[1], None)
                if future is not None and not future.done():
                    future.set_result(Handback(event))
            elif kind == "setting":
                lent = self._lent.get(event[1])
                if lent is not None:
                    lent[1].applied[event[2]] = event[3]
            elif kind == "need":
                self._spawn(self._lend(event[1]))
            elif kind == "back":
                self._back(event[1], event[2], event[3], event[4], event[5])
            elif kind == "expired":
                lent = self._lent.get(event[2])
                if lent is not None:
                    pool, server = lent
                    self.port.app.deadlines.expired(server.pid, pool.login.role, "statement")
            elif kind == "count":
                counted = self._pools.get(event[1])
                if counted is not None:
                    counted.transactions += event[2]
                    counted.queries += event[3]
                    self.port.figures.transactions.inc(event[2])
        audit = self.port.app.audit
        for session in touched:
            events, session.events = session.events, []
            for audit_event in events:
                audit.record_nowait(audit_event)

    def taken(self, back: Handback) -> tuple[ServerPool, ServerConnection] | None:
        """The server connection a session came back with (its transaction open), as the
        session's own now."""
        if back.server is None:
            return None
        lent = self._lent.pop(back.server, None)
        if lent is None:
            return None
        pool, server = lent
        _returned(server, back.applied, back.prepared, back.prepared_bytes, back.status)
        return pool, server

    def _back(
        self,
        sid: int,
        broken: bool,
        applied: list[tuple[str, str]],
        prepared: list[bytes],
        prepared_bytes: int,
    ) -> None:
        lent = self._lent.pop(sid, None)
        if lent is None:
            return
        pool, server = lent
        if broken:
            server.broken = True
        else:
            _returned(server, applied, prepared, prepared_bytes, b"I")
        pool.release(server)

    def _spawn(self, coroutine: Any) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lend(self, pool_id: int) -> None:
        """A server connection of the pool for the relay, once one is free (``unavailable``
        if none comes: the relay's first waiter goes back to Python, which answers it)."""
        pool = self._pools.get(pool_id)
        if pool is None:
            return
        try:
            server = await pool.acquire(self.port.acquire_timeout, reclaim=False)
        except (BackendError, OSError):
            self._plane.unavailable(pool_id)
            return
        if not _quiet(server):
            server.broken = True
            pool.release(server)
            self._plane.unavailable(pool_id)
            return
        server.writer.transport.pause_reading()  # type: ignore[attr-defined]
        self._next += 1
        sid = self._next
        self._lent[sid] = (pool, server)
        sock = server.writer.get_extra_info("socket")
        self._plane.lend(
            pool_id,
            sid,
            sock.fileno(),
            list(server.applied.items()),
            [name.encode() for name in server.prepared],
            server.prepared_bytes,
            MAX_PREPARED_BYTES,
        )

    async def close(self) -> None:
        """Stop the relay: every socket is Python's alone again, every lent server goes back
        to its pool (closed)."""
        self._drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._drainer
        self._plane.close()
        self.drain()
        for pool, server in self._lent.values():
            server.broken = True
            pool.release(server)
        self._lent.clear()
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        self._loop.remove_reader(self._read_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
        for pool in self._pools.values():
            pool.reclaim = None
        self.port.pools.lent_idle = None


def _returned(
    server: ServerConnection,
    applied: list[tuple[str, str]],
    prepared: list[bytes],
    prepared_bytes: int,
    status: bytes,
) -> None:
    """A server connection back from the relay: what the relay knew of its session (settings,
    prepared statements, transaction status) becomes Python's, and asyncio reads it again."""
    server.applied = dict(applied)
    server.prepared = {name.decode() for name in prepared}
    server.prepared_bytes = prepared_bytes
    server.status = status
    server.unnamed = None  # a Query drops the unnamed statement
    server.writer.transport.resume_reading()  # type: ignore[attr-defined]


def _quiet(server: ServerConnection) -> bool:
    """Nothing of the server's is buffered on Python's side (read or to write): its socket
    can change hands."""
    server.flush()
    transport = server.writer.transport
    buffered: Callable[[], int] = transport.get_write_buffer_size
    reader_buffer = getattr(server.reader, "_buffer", b"")
    return (
        server.status == b"I"
        and not server.broken
        and not server.reader.at_eof()
        and buffered() == 0
        and not reader_buffer
        and not server._buffer
    )
