"""The PostgreSQL wire port: an asyncio listener and one session per client.

A client logs in with SCRAM-SHA-256 as a service (user) for a tenant (database), then speaks
the simple or extended query protocol. Every Query and Parse passes the SQL guard (cached per
text and tenant) and the service's scopes before PostgreSQL sees it; what is allowed runs on a
server connection of the tenant's own role, lent from its pool for one transaction and given
back when PostgreSQL reports the session idle (ReadyForQuery 'I').

Server responses are forwarded as they came, message by message, decoding only the 5-byte
headers, except where the port changed the conversation: a named statement is kept per client
and prepared, under a name derived from its text, on whichever server connection runs it (as
PgBouncer >= 1.21 does), so the port answers some ParseComplete/CloseComplete itself and hides
those of the Parse it adds. ``_Expect`` entries keep the server's answers and the port's own in
the order the client sent its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import ssl
import struct
import time
import weakref
from array import array
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from database_service.auth import Principal, Scope
from database_service.auth.principal import ALL_TENANTS
from database_service.errors import DatabaseServiceError, QueryError
from database_service.observability.audit import AuditEvent
from database_service.pgwire import admin, codec
from database_service.pgwire.backend import (
    MAX_PREPARED_BYTES,
    BackendError,
    PgAddress,
    ServerConnection,
    send_cancel,
)
from database_service.pgwire.policy import (
    TRACKED_SETTINGS,
    USER_ID_SETTING,
    StatementPolicy,
    reset_batch,
    valid_user_id,
)
from database_service.pgwire.pooling import ServerPool, ServerPools
from database_service.pgwire.relay import Handback, Relay
from database_service.pgwire.relay import available as relay_available
from database_service.pgwire.scram import ScramError, ScramServer, parse_verifier
from database_service.results import StatementKind
from database_service.sqlguard import Classification
from database_service.tenancy import TenantRecord, quote_ident

if TYPE_CHECKING:
    from database_service.app import Application
    from database_service.tls import CertificateFiles

__all__ = ["PgWireServer", "listening"]

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1_048_576  # a Query or Bind larger than this is refused (08P01)
# What one client may keep of named statements and portals (see MAX_PREPARED_BYTES too): far
# beyond drivers' statement caches (asyncpg 100, psycopg 100, JDBC 256) and their names.
MAX_STATEMENTS = 10_000
MAX_NAME_BYTES = 1024
_READ_CHUNK = 65536
_WORKER_BITS = 6  # a client's cancel key names its worker in the pid's low bits
_MAX_WORKERS = 1 << _WORKER_BITS
_LINGER_SECONDS = 0.2  # a session ending on an error waits this long for its client's close
_LIMIT_MARGIN = 0.25  # seconds past the tenant's statement limit before the port steps in
# Server parameters passed to clients as PostgreSQL reports them; the rest are the port's.
_HIDDEN_PARAMETERS = {"session_authorization", "is_superuser", "application_name"}
# A dummy verifier: an unknown service costs the same exchange as a known one.
_DUMMY_VERIFIER = (
    "SCRAM-SHA-256$4096:AAAAAAAAAAAAAAAAAAAAAA==$"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
)
_PARSE_COMPLETE = codec.message(b"1")
_BIND_COMPLETE = codec.message(b"2")
_CLOSE_COMPLETE = codec.message(b"3")
_NO_DATA = codec.message(b"n")
_NO_PARAMETERS = codec.message(b"t", b"\x00\x00")
# SELECT pg_advisory_unlock_all() as PostgreSQL answers it: one column of type void (oid 2278,
# length 4), one row whose value is the empty text.
_UNLOCK_ALL_COLUMNS = codec.message(
    b"T",
    b"\x00\x01"
    + codec.cstring("pg_advisory_unlock_all")
    + struct.pack("!IhIhih", 0, 0, 2278, 4, -1, 0),
)
_UNLOCK_ALL_ROWS = (
    _UNLOCK_ALL_COLUMNS
    + codec.message(b"D", b"\x00\x01\x00\x00\x00\x00")
    + codec.message(b"C", codec.cstring("SELECT 1"))
)
_RESET_TAGS = {"reset_all": "RESET", "unlisten": "UNLISTEN", "close_all": "CLOSE CURSOR ALL"}
# The user name that asks for token authentication: the password is a service's access token,
# accepted only over TLS (cleartext password auth); the token names the service.
TOKEN_USER = "token"
# Where the port's own ErrorResponses carry the service's stable error code: the routine field
# ('R'), as "dbsvc:<code>". PostgreSQL's errors are passed on untouched (their routine is
# PostgreSQL's); their stable code is their SQLSTATE's, as in errors.py.
CODE_PREFIX = "dbsvc:"


def _code_for(sqlstate: str) -> str:
    return QueryError("", sqlstate=sqlstate).error_code


def _error(sqlstate: str, text: str, code: str | None = None, *, severity: str = "ERROR") -> bytes:
    """The port's own ErrorResponse, its stable code in the routine field."""
    return codec.error_response(
        sqlstate, text, severity=severity, R=CODE_PREFIX + (code or _code_for(sqlstate))
    )


_Refused = tuple[str, str, str]  # SQLSTATE, message, the service's stable code
_ABORTED: _Refused = (
    "25P02",
    "current transaction is aborted, commands ignored until end of transaction block",
    "invalid_transaction_state",
)
_DISCARD_IN_BLOCK: _Refused = (
    "25001",
    "DISCARD ALL cannot run inside a transaction block",
    "invalid_transaction_state",
)
_MID_BATCH: _Refused = (
    "0A000",
    "send this after a Sync: the extended-protocol messages before it are still unanswered",
    "invalid_request",
)
_NUL_IN_TEXT: _Refused = (
    "22021",
    "the SQL text contains a NUL character, which PostgreSQL cannot carry",
    "invalid_text",
)


class _Refusal(Exception):
    def __init__(
        self, sqlstate: str, text: str, code: str | None = None, *, fatal: bool = False
    ) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text
        self.code = code or _code_for(sqlstate)
        self.fatal = fatal


class _ClientGone(Exception):
    pass


@dataclass(slots=True)
class _Expect:
    """One answer the client expects, in order: from the server (``terminals``: the message
    types that complete it; ``swallow``: the port added the message, the client must not see
    its answer; ``prepares``: mark a statement prepared on the server once done), or the
    port's own bytes (``synthetic``), sent once everything before them is answered."""

    terminals: bytes = b""
    swallow: bool = False
    prepares: str | None = None
    synthetic: bytes | None = None
    # A statement of the client's to count when it completes: its verdict, text, start.
    record: tuple[Classification, str, float] | None = None


_FIGURES: weakref.WeakKeyDictionary[object, PortFigures] = weakref.WeakKeyDictionary()


class PortFigures:
    """The port's metrics (in the service's registry) and its own counts for the admin view."""

    @classmethod
    def of(cls, registry: object) -> PortFigures:
        """One set per registry: a second listener of the same service counts in it too."""
        figures = _FIGURES.get(registry)
        if figures is None:
            figures = _FIGURES[registry] = cls(registry)
        return figures

    def __init__(self, registry: object) -> None:
        self.clients = Gauge(
            "dbsvc_pgwire_clients", "Clients connected to the PostgreSQL wire port.",
            registry=registry, multiprocess_mode="livesum",  # type: ignore[arg-type]
        )  # fmt: skip
        self.servers = Gauge(
            "dbsvc_pgwire_servers", "Server connections lent to clients right now.",
            registry=registry, multiprocess_mode="livesum",  # type: ignore[arg-type]
        )  # fmt: skip
        self.transactions = Counter(
            "dbsvc_pgwire_transactions", "Transactions (server connection loans) of the port.",
            registry=registry,  # type: ignore[arg-type]
        )  # fmt: skip
        self.refused = Counter(
            "dbsvc_pgwire_refused_statements",
            "Statements the port refused (SQL guard, scopes, session rules), by SQLSTATE.",
            ["sqlstate"], registry=registry,  # type: ignore[arg-type]
        )  # fmt: skip
        self.logins = Counter(
            "dbsvc_pgwire_logins", "Login attempts on the port, by outcome.", ["outcome"],
            registry=registry,  # type: ignore[arg-type]
        )  # fmt: skip
        self.idle_ended = Counter(
            "dbsvc_pgwire_idle_in_transaction_ended",
            "Clients the port ended for holding a transaction open without a message for"
            " longer than the tenants' transaction limit.",
            registry=registry,  # type: ignore[arg-type]
        )  # fmt: skip
        self.servers_closed = Counter(
            "dbsvc_pgwire_servers_closed",
            "Server connections the port closed, by reason: idle (past"
            " DBSVC_PGWIRE_SERVER_IDLE_SECONDS), lifetime (past"
            " DBSVC_PGWIRE_SERVER_LIFETIME_SECONDS), budget (room for another under the"
            " service's cap), broken, cancelled (given back while a cancel of its client's"
            " statement was on its way), prepared (holding more than half of"
            " MAX_PREPARED_BYTES of prepared statements), closed (pool replaced or port"
            " stopped).",
            ["reason"], registry=registry,  # type: ignore[arg-type]
        )  # fmt: skip
        self.cancels = Counter(
            "dbsvc_pgwire_cancel_requests",
            "CancelRequests: served here (local), passed to the worker that holds the client"
            " (forwarded), or for no client (unknown).",
            ["route"], registry=registry,  # type: ignore[arg-type]
        )  # fmt: skip


@contextlib.asynccontextmanager
async def listening(
    app: Application,
    tls: CertificateFiles | None = None,
    *,
    worker: tuple[int, Path] | None = None,
) -> AsyncIterator[PgWireServer | None]:
    """The port as ``serve`` runs it: listening on ``DBSVC_PGWIRE_HOST``/``_PORT`` (beside the
    other workers: SO_REUSEPORT) with the service's TLS certificate when it has one, or None
    when no port is configured. ``worker``: this worker's index and the run directory, where
    the workers pass each other the CancelRequests that reached the wrong one."""
    s = app.settings
    if s.pgwire_port is None:
        yield None
        return
    context = None
    if tls is not None:
        from database_service.tls.servers import http_ssl_context  # noqa: PLC0415 (grpc, uvicorn)

        context = http_ssl_context(tls)
    server = PgWireServer(
        app,
        host=s.pgwire_host,
        port=s.pgwire_port,
        ssl_context=context,
        worker=worker[0] if worker else 0,
        cancel_dir=worker[1] if worker else None,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class PgWireServer:
    """The listener; ``start`` binds it (port 0: any free port, see ``port``)."""

    def __init__(
        self,
        app: Application,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        max_per_tenant: int | None = None,
        worker: int = 0,
        cancel_dir: Path | None = None,
        idle_transaction_seconds: float | None = None,
        server_idle_seconds: float | None = None,
        server_lifetime_seconds: float | None = None,
        relay: bool | None = None,
    ) -> None:
        if not 0 <= worker < _MAX_WORKERS:
            raise ValueError(f"worker index {worker} out of 0..{_MAX_WORKERS - 1}")
        self.app = app
        # With several workers on one port (SO_REUSEPORT) a CancelRequest reaches any of them:
        # a client's key carries its worker's index, and the worker that receives a cancel for
        # another passes it on over that one's Unix socket in ``cancel_dir``.
        self.worker = worker
        self.cancel_dir = cancel_dir
        self._cancel_server: asyncio.Server | None = None
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        s = app.settings
        self.address = PgAddress.from_dsn(app.postgres_dsn)
        # Server connections count against the service's PostgreSQL budget (the tenant pools'
        # global cap, this worker's share of it), as the other front ends' connections do;
        # each login's pool is as large as a tenant's OLTP pool.
        self.acquire_timeout = s.pool_acquire_timeout_seconds
        # A client silent inside a transaction holds a server connection others could use:
        # past the tenants' transaction limit the port ends it (25P03), as PostgreSQL's
        # idle_in_transaction_session_timeout would (the role's own is twice as long).
        self.idle_transaction_seconds = (
            idle_transaction_seconds or s.tenant_transaction_timeout_ms / 1000
        )
        # Idle server connections close after a while, as PgBouncer's server_idle_timeout,
        # and old ones are replaced, as its server_lifetime (see ``_reap``).
        self.server_idle_seconds = server_idle_seconds or s.pgwire_server_idle_seconds
        self.server_lifetime_seconds = (
            s.pgwire_server_lifetime_seconds
            if server_lifetime_seconds is None
            else server_lifetime_seconds
        )
        self.figures = PortFigures.of(app.metrics.registry)
        self.servers_closed: dict[str, int] = {}
        self.pools = ServerPools(
            self.address,
            max_per_tenant=max_per_tenant or s.pool_max_per_tenant,
            budget=app.pools,
            acquire_timeout=self.acquire_timeout,
            idle_seconds=self.server_idle_seconds,
            lifetime_seconds=self.server_lifetime_seconds,
            closed=self._server_closed,
        )
        self._reaper: asyncio.Task[None] | None = None
        self.policy = StatementPolicy(app.guard, (s.shared_schema,))
        # As the query core opens a user-scoped transaction (query/executor.py): the key is a
        # parameter, never in a statement's text.
        self.enter_user = f"SELECT {quote_ident(s.control_schema)}.enter_user($1, $2)"
        self.sessions: dict[int, ClientSession] = {}
        self._server: asyncio.Server | None = None
        # The compiled byte path for idle clients' plain statements (relay.py), when built.
        self._use_relay = s.pgwire_relay if relay is None else relay
        self.relay: Relay | None = None

    async def start(self) -> None:
        if self._use_relay and relay_available():
            self.relay = Relay(self)
        elif self._use_relay:
            log.warning("PostgreSQL wire port: dbsvc_wire is not installed, no relay")
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_port=True, limit=1 << 20
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.cancel_dir is not None:
            path = self._cancel_socket(self.worker)
            path.unlink(missing_ok=True)
            self._cancel_server = await asyncio.start_unix_server(self._forwarded, str(path))
        self.app.pools.add_idle_closer(self.pools.close_one_idle)
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        self.app.health.sections.setdefault("pgwire", self.health)
        self.app.pgwire_views.append(self.show)
        log.info("PostgreSQL wire port listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self.app.health.sections.get("pgwire") == self.health:
            del self.app.health.sections["pgwire"]
        if self.show in self.app.pgwire_views:
            self.app.pgwire_views.remove(self.show)
        self.app.pools.remove_idle_closer(self.pools.close_one_idle)
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._cancel_server is not None:
            self._cancel_server.close()
            self._cancel_socket(self.worker).unlink(missing_ok=True)
        if self._server is not None:
            self._server.close()
            for session in list(self.sessions.values()):
                session.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        self.pools.close()

    def _server_closed(self, reason: str) -> None:
        self.servers_closed[reason] = self.servers_closed.get(reason, 0) + 1
        self.figures.servers_closed.labels(reason).inc()

    async def _reap(self) -> None:
        """Close idle server connections past the idle limit or the age limit, checked a few
        times per limit (at most every 5 s): their budget slots go back to every front end."""
        limits = [self.server_idle_seconds, self.server_lifetime_seconds or float("inf")]
        period = min(5.0, max(0.05, min(limits) / 4))
        while True:
            await asyncio.sleep(period)
            try:
                self.pools.close_expired()
            except Exception:  # a bug here must not stop the reaping
                log.exception("PostgreSQL wire port: closing idle server connections failed")

    def health(self) -> dict[str, object]:
        return {
            "status": "ok" if self._server is not None and self._server.is_serving() else "down",
            "port": self.port,
            "clients": len(self.sessions),
            "servers": self.pools.servers,
            "server_idle_seconds": self.server_idle_seconds,
            "server_lifetime_seconds": self.server_lifetime_seconds or None,
            "servers_closed": dict(self.servers_closed),
            "relay": self.relay is not None,
            "relayed_statements": self.relay.relayed if self.relay is not None else 0,
            "relay_server_connections": self.relay.lent if self.relay is not None else 0,
        }

    def show(self, visible: Callable[[str], bool] = lambda _: True) -> dict[str, object]:
        """The admin view (admin.py) as documents: for each of pools, clients, servers and
        stats, its rows as column -> value; ``visible(tenant_id)`` filters them."""
        out: dict[str, object] = {}
        for kind in admin.SHOW_KINDS:
            columns, rows = admin.show(self, kind, visible)
            out[kind] = [dict(zip(columns, row, strict=True)) for row in rows]
        out["pool_figures"] = [
            {**asdict(f), "worker": self.worker}
            for f in self.pools.figures()
            if visible(f.tenant_id)
        ]
        return out

    def peer_views(self) -> list[dict[str, object]]:
        """The other workers' views, from their last snapshots (workers/runtime.py)."""
        return [view for peers in self.app.pgwire_peers for view in peers()]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = ClientSession(self, reader, writer)
        try:
            await session.run()
        except Exception:
            log.exception("PostgreSQL wire session failed")
        finally:
            session.cleanup()

    def new_key(self, session: ClientSession) -> tuple[int, int]:
        """A BackendKeyData of the port's own: the real backend's pid and key never leave it.
        The pid's low bits are this worker's index (see ``cancel``); the rest, and the key,
        are random."""
        while True:
            pid = secrets.randbits(31 - _WORKER_BITS) << _WORKER_BITS | self.worker
            if pid and pid not in self.sessions:
                self.sessions[pid] = session
                return pid, secrets.randbits(32)

    def _cancel_socket(self, worker: int) -> Path:
        assert self.cancel_dir is not None
        return self.cancel_dir / f"pgwire-cancel-{worker}.sock"

    async def cancel(self, pid: int, key: int) -> None:
        """A CancelRequest: the real backend of the client it names is cancelled — here, or by
        the worker whose index the pid carries (nothing is said to the sender either way, as
        PostgreSQL says nothing)."""
        owner = pid & (_MAX_WORKERS - 1)
        if owner != self.worker and self.cancel_dir is not None:
            path = self._cancel_socket(owner)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
            except (OSError, TimeoutError):
                self.figures.cancels.labels("unknown").inc()
                log.info("PostgreSQL wire port: cancel request for worker %d, not reachable", owner)
                return
            try:
                writer.write(struct.pack("!II", pid, key))
                await writer.drain()
            finally:
                writer.close()
            self.figures.cancels.labels("forwarded").inc()
            return
        await self._cancel_here(pid, key)

    async def _forwarded(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A CancelRequest another worker received for one of this worker's clients."""
        try:
            pid, key = struct.unpack("!II", await asyncio.wait_for(reader.readexactly(8), 5))
            await self._cancel_here(pid, key)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _cancel_here(self, pid: int, key: int) -> None:
        session = self.sessions.get(pid)
        if session is None or not hmac.compare_digest(
            struct.pack("!I", session.key), struct.pack("!I", key)
        ):
            self.figures.cancels.labels("unknown").inc()
            log.info("PostgreSQL wire port: cancel request for an unknown key ignored")
            return
        self.figures.cancels.labels("local").inc()
        server = session.server
        if server is None and session.relayed and self.relay is not None:
            server = self.relay.serving(session)
        if server is not None and server.pid:
            # Counted from here (no await before): if the client's statement ends and the
            # connection goes back before PostgreSQL has the cancel, the pool closes it.
            server.cancelling += 1
            try:
                await send_cancel(self.address, server.pid, server.key)
            finally:
                server.cancelling -= 1


class ClientSession:
    def __init__(
        self, port: PgWireServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.port = port
        self.reader = reader
        self.writer = writer
        self._in = bytearray()  # received from the client, not yet taken as messages
        self.pid = 0
        self.key = 0
        self.principal: Principal | None = None
        self.tenant: TenantRecord | None = None
        self.pool: ServerPool | None = None
        self.user_pool: ServerPool | None = None  # the tenant's user-scoped login, when needed
        self.server_pool: ServerPool | None = None  # where ``server`` was lent from
        self.server: ServerConnection | None = None
        # The user id for user-level row security (startup option or SET dbsvc.user_id): each
        # transaction then runs on the user-scoped login, opened by the port with
        # control.enter_user (``wrapped``); ``block``: the client itself began it.
        self.user_id: str | None = None
        # What RESET ALL / DISCARD ALL return to: the settings and user id of the startup
        # packet (PostgreSQL's session defaults), set once the login succeeds.
        self.startup_user_id: str | None = None
        self.startup_wanted: dict[str, str] = {}
        self.wrapped = False
        self.block = False
        # RESET ALL ran inside this transaction with a user id given by SET: the startup user
        # id comes back when the transaction commits (not if it rolls back).
        self.reset_at_commit = False
        # Statements (by name) and portals the port answers itself, never sent to a server:
        # SET dbsvc.user_id and, for a user id, BEGIN. Value: (control, user id or SQL).
        self.virtual: dict[str, tuple[str, str | None]] = {}
        self.begins: dict[str, str] = {}  # statements that are a BEGIN, parsed without a user id
        self.virtual_portals: dict[str, tuple[str, str | None]] = {}
        self.wanted: dict[str, str] = {}
        self.readonly = True
        self.aborted = False  # a statement the port refused inside a transaction
        self.skip_until_sync = False  # extended protocol: an error, drop messages until Sync
        self.server_skipping = False  # the server reported an error and skips until Sync
        self.expect: deque[_Expect] = deque()
        self.statements: dict[str, tuple[str, bytes]] = {}  # name -> server name, its Parse
        self.unnamed: bytes | None = None  # the client's last Parse of the unnamed statement
        self.pending: set[str] = set()  # server names parsed in this batch, not yet confirmed
        self.ident = id(self)
        # DEALLOCATE's name, the user id of a SET, or the text a lookup is rewritten to: from
        # the last decision.
        self._deallocating: str | None = None
        self._resets: tuple[str, ...] = ()  # a driver's reset batch, from the last decision
        self._verdict: Classification | None = None  # the last decision's
        # The guard's verdict and text of each prepared statement and bound portal, so that a
        # statement run through the port counts in the statement figures like any other.
        self.verdicts: dict[str, tuple[Classification, str]] = {}
        self.portal_verdicts: dict[str, tuple[Classification, str]] = {}
        self.recorder = port.app.statement_recorder
        self.events: list[AuditEvent] = []  # audit events to write after the current message
        self.expired = False  # the statement being relayed outlived the tenant's limit
        self.writing = False  # waiting for the client to take what was written to it
        self.tls = False
        # The compiled relay (relay.py) watches the client's socket now; after it handed the
        # session back without running anything, the next ``_relay_skip`` messages are read
        # here first (a client of the extended protocol is not handed over for each one).
        self.relayed = False
        self._relay_skip = 0
        self._relay_misses = 0
        self._handback: Handback | None = None  # the last hand-back, for a shape to allow
        self.connected_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.admin = False  # a session of the admin database (admin.py)

    # -- life cycle ------------------------------------------------------------------------

    def describe(self) -> dict[str, object]:
        return {
            "service": self.principal.service if self.principal else None,
            "tenant": self.tenant.tenant_id if self.tenant else None,
            "user_id": self.user_id,
            "server_pid": self.server.pid if self.server else None,
            "state": "active" if self.server else "idle",
        }

    def abort(self) -> None:
        if self.relayed and self.port.relay is not None:
            self.port.relay.recall(self)
        with contextlib.suppress(Exception):
            self.writer.close()

    def cleanup(self) -> None:
        if self.relayed and self.port.relay is not None:
            self.port.relay.recall(self)
        if self.pid:
            self.port.sessions.pop(self.pid, None)
            self.port.figures.clients.dec()
        if self.server is not None and self.server_pool is not None:
            # A client gone mid-transaction: the pool rolls the connection back before anyone
            # else gets it; one with answers still in flight is closed instead.
            if self.expect or self.server_skipping:
                self.server.broken = True
            self._release()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def run(self) -> None:
        try:
            if not await self._startup():
                return
            if self.admin:
                await self._admin_session()
                return
            while True:
                if self.server is None:
                    if self._relay_skip:
                        self._relay_skip -= 1
                    elif self._delegable():
                        await self._delegate()
                    kind, payload = await self._read()
                else:
                    kind, payload = await self._read_in_transaction()
                if kind == b"X":
                    return
                await self._message(kind, payload)
                if self.events:
                    await self._audit()
        except _ClientGone:
            return
        except codec.ProtocolViolation as exc:
            await self._fatal(exc.sqlstate, str(exc))
        except (ConnectionError, asyncio.IncompleteReadError):
            return

    async def _read_in_transaction(self) -> tuple[bytes, bytes]:
        """The next message while this client holds a server connection: silence past the
        port's idle-in-transaction limit ends the session (25P03); ``cleanup`` then hands the
        connection back, rolled back by its pool."""
        found = self._buffered()
        if found is not None:
            return found
        limit = self.port.idle_transaction_seconds
        try:
            async with asyncio.timeout(limit):
                return await self._read()
        except TimeoutError:
            pass
        self.port.figures.idle_ended.inc()
        self._event("error", "idle_in_transaction_timeout", None, f"idle for {limit:g} s")
        await self._audit()
        await self._fatal(
            "25P03",
            f"terminating connection due to idle-in-transaction timeout ({limit:g} s): the"
            " transaction was rolled back",
            "idle_in_transaction_timeout",
        )
        raise _ClientGone

    # -- the compiled relay ------------------------------------------------------------------

    def _delegable(self) -> bool:
        """Idle with nothing of a transaction, a batch or a user id of its own: the relay may
        watch this client (TLS sessions stay here: the relay speaks plain TCP)."""
        return (
            self.port.relay is not None
            and not self.tls
            and not self.admin
            and self.pool is not None
            and self.tenant is not None
            and self.server is None
            and self.user_id is None
            and not self.aborted
            and not self.skip_until_sync
            and not self.server_skipping
            and not self.expect
            and not self.pending
            and not self.events
            and not self.block
            and not self.wrapped
            and not self.reset_at_commit
        )

    async def _delegate(self) -> None:
        """Hand the client's socket to the relay until it gives the session back (the first
        message it does not run), then go on from what it read."""
        relay = self.port.relay
        assert relay is not None and self.pool is not None and self.tenant is not None
        transport = self.writer.transport
        sock = self.writer.get_extra_info("socket")
        if sock is None or transport.get_write_buffer_size() or self.reader.at_eof():
            return
        transport.pause_reading()  # type: ignore[attr-defined]
        unread = getattr(self.reader, "_buffer", None)  # what the stream read, not taken yet
        if unread:
            self._in += unread
            unread.clear()
        wanted = [(n, v, _set_statement(n, v)) for n, v in self.wanted.items()]
        future = relay.delegate(
            self,
            sock.fileno(),
            self.pool,
            bytes(self._in),
            wanted,
            self.tenant.limits.statement_timeout_ms,
            int(_LIMIT_MARGIN * 1000),
            self._relayable_statements(),
        )
        self._in.clear()
        self.relayed = True
        try:
            back = await future
        finally:
            self.relayed = False
        self._in += back.leftover
        self.wanted = dict(back.wanted)
        if back.ran:
            self.unnamed = None  # a Query drops the unnamed statement
            self._relay_misses = 0
        else:
            self._relay_misses = min(self._relay_misses + 1, 6)
            self._relay_skip = (1 << self._relay_misses) - 1
        taken = relay.taken(back)
        if taken is not None:
            self.server_pool, self.server = taken
            self.port.figures.servers.inc()
        if back.pending:
            self.writer.write(back.pending)
        transport.resume_reading()  # type: ignore[attr-defined]
        if back.close:
            with contextlib.suppress(Exception):
                await self.writer.drain()
            raise _ClientGone
        self._handback = back if back.key is not None else None

    def _relayable_statements(self) -> list[tuple[bytes, bytes, bytes, Classification, bytes]]:
        """The client's named statements the relay may run as Bind/Execute/Sync: plain READ or
        WRITE statements the guard and the scopes accepted at their Parse."""
        out = []
        for name, (server_name, parse) in self.statements.items():
            kept = self.verdicts.get(name)
            if not name or kept is None or name in self.virtual or name in self.begins:
                continue
            verdict, query = kept
            if verdict.kind in (StatementKind.READ, StatementKind.WRITE):
                out.append((name.encode(), server_name.encode(), parse, verdict, query.encode()))
        return out

    def _allow_in_relay(self, back: Handback | None, sql: str) -> None:
        """The relay handed back a statement of a shape it did not know, and Python ran it as
        a plain statement: the relay may run that shape from now on (relay.allow checks)."""
        verdict = self._verdict
        if back is None or self.port.relay is None or verdict is None:
            return
        if verdict.kind not in (StatementKind.READ, StatementKind.WRITE):
            return
        if self.port.relay.allow(self, back, sql, verdict):
            self._relay_misses = self._relay_skip = 0

    def relayed_done(
        self, verdict: Classification, command: bytes, micros: bytes, rows: int, sql: bytes
    ) -> int:
        """Statements of one verdict and command the relay ran to completion since the last
        drain (``micros``: each one's time, u32 in native byte order; ``rows`` together): their
        figures, as ``_done``, and one audit event for them, its detail saying how many (at
        the relay's rates, tens of thousands a second, a row per statement made the audit
        writer PostgreSQL's largest load: 15% of the port's throughput, twice its p99). How
        many."""
        times = array("I")  # the relay writes them in this machine's byte order
        times.frombytes(micros)
        if self.recorder is not None and self.tenant is not None:
            self.recorder.done_many(self.tenant, verdict, sql.decode(errors="replace"), times, rows)
        count = len(times)
        code = command.decode(errors="replace") or None
        self._event("ok", code, verdict.kind, f"{count} statements" if count > 1 else "")
        return count

    def relayed_failed(self, verdict: Classification, sqlstate: str, message: str) -> None:
        self._failed(verdict, {"C": sqlstate, "M": message})

    async def _admin_session(self) -> None:
        """The admin database: SHOW POOLS / CLIENTS / SERVERS / STATS, rows filtered to the
        tenants the service may act for."""
        principal = self.principal
        assert principal is not None
        while True:
            kind, payload = await self._read()
            if kind == b"X":
                return
            if kind == b"Q":
                answer = admin.answer(
                    self.port,
                    codec.query_text(payload),
                    principal.can_act_for,
                    self.port.peer_views(),
                )
            elif kind == b"S":
                answer = b""
            elif kind in b"PBDECHdcf" and len(kind) == 1:
                continue  # the extended protocol: answered at its Sync, with an error
            else:
                raise codec.ProtocolViolation(f"unexpected message type {kind!r}")
            if kind == b"S":
                answer = _error("0A000", "the admin database speaks the simple protocol only")
            await self._flush(answer + codec.ready_for_query(b"I"))

    async def _audit(self) -> None:
        events, self.events = self.events, []
        for event in events:
            await self.port.app.audit.record(event)

    def _event(
        self, outcome: str, code: str | None, kind: StatementKind | None, detail: str
    ) -> None:
        self.events.append(
            AuditEvent(
                service=self.principal.service if self.principal else None,
                tenant_id=self.tenant.tenant_id if self.tenant else None,
                action="pgwire.query",
                statement_class=kind.value if kind else None,
                outcome=outcome,
                code=code,
                detail=detail[:500] or None,
            )
        )

    async def _fatal(self, sqlstate: str, text: str, code: str | None = None) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(_error(sqlstate, text, code, severity="FATAL"))
            await self.writer.drain()
            # What the client sent after the message that ends the session is read and dropped
            # before the close (briefly): a socket closed with input unread sends a reset, and
            # the client's kernel may drop the error with it before the client reads it.
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(_LINGER_SECONDS):
                while await self.reader.read(_READ_CHUNK):
                    pass

    def _buffered(self) -> tuple[bytes, bytes] | None:
        """The next whole message already received, taken from the buffer, or None. A client
        pipelines (Bind, Execute, Sync arrive in one segment): those are taken from one read,
        with no wait and no timer each."""
        buffer = self._in
        if len(buffer) < 5:
            return None
        kind, length = codec.split_header(bytes(buffer[:5]), MAX_MESSAGE_BYTES)
        end = 5 + length
        if len(buffer) < end:
            return None
        payload = bytes(buffer[5:end])
        del buffer[:end]
        return kind, payload

    async def _read(self) -> tuple[bytes, bytes]:
        while True:
            found = self._buffered()
            if found is not None:
                return found
            data = await self.reader.read(_READ_CHUNK)
            if not data:
                raise asyncio.IncompleteReadError(bytes(self._in), None)
            self._in += data

    async def _flush(self, data: bytes | bytearray) -> None:
        if data:
            self.writer.write(data)
        self.writing = True
        try:
            await self.writer.drain()
        finally:
            self.writing = False

    # -- startup and authentication --------------------------------------------------------

    async def _startup(self) -> bool:
        tls = False
        while True:
            length = codec.startup_length(await self.reader.readexactly(4))
            request = codec.parse_startup(await self.reader.readexactly(length))
            if isinstance(request, codec.CancelRequest):
                await self.port.cancel(request.pid, request.key)
                return False
            if isinstance(request, int):
                if request == codec.SSL_REQUEST_CODE and self.port.ssl_context and not tls:
                    self.writer.write(b"S")
                    await self.writer.drain()
                    await self.writer.start_tls(self.port.ssl_context)
                    tls = True
                else:
                    self.writer.write(b"N")
                    await self.writer.drain()
                continue
            break
        params = request.parameters
        service, tenant_id = params.get("user", ""), params.get("database", "")
        try:
            wanted = self._startup_settings(params)
            self.user_id = wanted.pop(USER_ID_SETTING, None)
            self.tls = tls
            if service == TOKEN_USER:
                principal = await self._authenticate_token(tls)
            else:
                principal = await self._authenticate(service)
            if tenant_id == admin.ADMIN_DATABASE:
                return await self._admin_login(principal)
            tenant = await self._admit(principal, tenant_id)
        except _Refusal as exc:
            self.port.figures.logins.labels("refused").inc()
            await self.port.app.audit.record(
                AuditEvent(
                    service=service or None, tenant_id=tenant_id or None, action="pgwire.login",
                    outcome="denied", code=exc.code, detail=exc.text[:500],
                )
            )  # fmt: skip
            await self._fatal(exc.sqlstate, exc.text, exc.code)
            return False
        self.port.figures.logins.labels("ok").inc()
        await self.port.app.audit.record(
            AuditEvent(service=principal.service, tenant_id=tenant.tenant_id,
                       action="pgwire.login", code="ok")
        )  # fmt: skip
        self.principal, self.tenant = principal, tenant
        self.readonly = not principal.has_scope(Scope.WRITE)
        login = self.port.app.logins.login(tenant)
        settings = {
            "application_name": "dbsvc-pgwire",
            "statement_timeout": str(tenant.limits.statement_timeout_ms),
        }
        self.pool = self.port.pools.pool(login, settings)
        try:
            if not self.pool.parameters:  # the server's parameters, known from one login
                server = await self.pool.acquire(self.port.acquire_timeout)
                self.pool.release(server)
        except (BackendError, OSError) as exc:
            fields = getattr(exc, "fields", {"C": "08006", "M": str(exc)})
            await self._fatal(fields.get("C", "08006"), fields.get("M", str(exc)), "unavailable")
            return False
        defaults = {TRACKED_SETTINGS[k.lower()]: v for k, v in self.pool.parameters.items()
                    if k.lower() in TRACKED_SETTINGS}  # fmt: skip
        defaults["application_name"] = ""
        self.wanted = {**defaults, **wanted}
        self.wanted["default_transaction_read_only"] = "on" if self.readonly else "off"
        self.startup_wanted = dict(self.wanted)
        self.startup_user_id = self.user_id
        self.pid, self.key = self.port.new_key(self)
        self.port.figures.clients.inc()
        out = bytearray(codec.authentication_ok())
        shown = {k: v for k, v in self.pool.parameters.items() if k not in _HIDDEN_PARAMETERS}
        shown.update({k: v for k, v in self.wanted.items() if k in TRACKED_SETTINGS.values()})
        shown.update(is_superuser="off", session_authorization=principal.service)
        for name, value in shown.items():
            out += codec.parameter_status(name, value)
        out += codec.backend_key_data(self.pid, self.key)
        out += codec.ready_for_query(b"I")
        await self._flush(out)
        return True

    async def _admin_login(self, principal: Principal) -> bool:
        if not principal.has_scope(Scope.ADMIN):
            raise _Refusal(
                "42501",
                f"service {principal.service!r} lacks the 'admin' scope for the admin database",
                "permission_denied",
            )
        self.principal, self.admin = principal, True
        self.port.figures.logins.labels("ok").inc()
        await self.port.app.audit.record(
            AuditEvent(service=principal.service, action="pgwire.admin_login", code="ok")
        )
        out = codec.authentication_ok()
        for name, value in (("server_version", "16.0 (dbsvc admin)"), ("client_encoding", "UTF8"),
                            ("session_authorization", principal.service)):  # fmt: skip
            out += codec.parameter_status(name, value)
        await self._flush(out + codec.ready_for_query(b"I"))
        return True

    @staticmethod
    def _startup_settings(params: dict[str, str]) -> dict[str, str]:
        wanted: dict[str, str] = {}
        for name, value in params.items():
            lower = name.lower()
            if lower in ("user", "database", "replication"):
                if lower == "replication" and value.lower() not in ("false", "off", "0", "no"):
                    raise _Refusal("28000", "replication connections are not served by this port")
                continue
            if lower == "fallback_application_name":
                wanted.setdefault("application_name", value)
            elif lower in TRACKED_SETTINGS:
                wanted[TRACKED_SETTINGS[lower]] = value
            elif lower == "client_encoding":
                if value.strip("'\" ").lower().replace("-", "").replace("_", "") not in (
                    "utf8",
                    "unicode",
                ):
                    raise _Refusal(
                        "0A000", f"client_encoding {value!r} is not supported: the port speaks UTF8"
                    )
            elif lower == "extra_float_digits":
                continue  # PostgreSQL 12+ sends the shortest exact text whatever the value
            elif lower == USER_ID_SETTING:
                wanted[USER_ID_SETTING] = _user_id(value)
            elif lower == "options":
                for option, option_value in _options(value):
                    if option == USER_ID_SETTING:
                        wanted[USER_ID_SETTING] = _user_id(option_value)
                    elif option in TRACKED_SETTINGS:
                        wanted[TRACKED_SETTINGS[option]] = option_value
                    else:
                        raise _Refusal(
                            "42704",
                            f"option {option!r} is not supported by this port (allowed:"
                            f" {', '.join(sorted(TRACKED_SETTINGS))}, {USER_ID_SETTING})",
                        )
            else:
                raise _Refusal(
                    "42704",
                    f"startup parameter {name!r} is not supported by this port (allowed:"
                    f" {', '.join(sorted(TRACKED_SETTINGS))}, {USER_ID_SETTING},"
                    " client_encoding, options)",
                )
        return wanted

    async def _authenticate(self, service: str) -> Principal:
        """SCRAM-SHA-256 against the service's stored verifier; every failure alike, after the
        same exchange, so the answer tells nothing about which services exist."""
        found = await self.port.app.services.scram_verifier(service) if service else None
        if found is not None and found[1] is None and found[0].active:
            raise _Refusal(
                "28000",
                f"service {service!r} has no SCRAM verifier (created before the PostgreSQL"
                " port existed, or token-only): renew its secret to use the port, or log in"
                f" as user {TOKEN_USER!r} with an access token over TLS",
                "unauthenticated",
            )
        verifier = parse_verifier(found[1] if found and found[1] else _DUMMY_VERIFIER)
        self.writer.write(codec.authentication_sasl())
        await self.writer.drain()
        kind, payload = await self._read()
        if kind != b"p":
            raise _Refusal("08P01", "expected a SASLInitialResponse")
        mechanism, offset = codec.read_cstring(payload)
        if mechanism != "SCRAM-SHA-256":
            raise _Refusal("28000", f"SASL mechanism {mechanism!r} is not supported")
        scram = ScramServer(verifier)
        try:
            first = scram.first(payload[offset + 4 :].decode())
            self.writer.write(codec.authentication_sasl_continue(first.encode()))
            await self.writer.drain()
            kind, payload = await self._read()
            if kind != b"p":
                raise _Refusal("08P01", "expected a SASLResponse")
            final = scram.final(payload.decode())
        except (ScramError, UnicodeDecodeError):
            final = ""
        if not final or found is None or found[1] is None or not found[0].active:
            raise _Refusal(
                "28P01", f"password authentication failed for user {service!r}", "unauthenticated"
            )
        self.writer.write(codec.authentication_sasl_final(final.encode()))
        return found[0].principal()

    async def _authenticate_token(self, tls: bool) -> Principal:
        """A service's access token as the password (cleartext password auth), only over TLS:
        without it the port refuses before the client sends the token."""
        if not tls:
            raise _Refusal(
                "28000",
                f"user {TOKEN_USER!r} logs in with an access token as the password, accepted"
                " only over TLS: connect with sslmode=require (SCRAM-SHA-256 with the service's"
                " secret works without)",
                "unauthenticated",
            )
        self.writer.write(codec.message(b"R", struct.pack("!I", 3)))
        await self.writer.drain()
        kind, payload = await self._read()
        if kind != b"p":
            raise _Refusal("08P01", "expected a PasswordMessage")
        token, _ = codec.read_cstring(payload)
        try:
            return await self.port.app.authenticator.authenticate(f"Bearer {token}")
        except DatabaseServiceError as exc:
            raise _Refusal("28P01", f"token refused: {exc.message}", "unauthenticated") from None

    async def _admit(self, principal: Principal, tenant_id: str) -> TenantRecord:
        if not (ALL_TENANTS in principal.tenants or tenant_id in principal.tenants):
            raise _Refusal(
                "42501",
                f"service {principal.service!r} may not act for tenant {tenant_id!r}",
                "permission_denied",
            )
        if not principal.has_scope(Scope.READ):
            raise _Refusal(
                "42501",
                f"service {principal.service!r} lacks the 'read' scope",
                "permission_denied",
            )
        try:
            return await self.port.app.registry.get_active(tenant_id)
        except DatabaseServiceError as exc:
            sqlstate = "3D000" if exc.http_status == 404 else "57P03"
            raise _Refusal(sqlstate, exc.message, exc.error_code) from None

    # -- messages ----------------------------------------------------------------------------

    def _status(self) -> bytes:
        if self.aborted:
            return b"E"
        return self.server.status if self.server is not None else b"I"

    async def _decide(self, sql: str) -> tuple[str | None, _Refused | None]:
        """(transaction control or None, refusal or None) for a statement of this client."""
        assert self.principal is not None and self.tenant is not None
        if not sql.strip():
            return None, None  # an empty query: PostgreSQL answers EmptyQueryResponse
        decision = await self.port.policy.decide(sql, self.principal, self.tenant.schema_name)
        ends = decision.control in ("commit", "rollback") or decision.resets[:1] == ("rollback",)
        if self.aborted and not ends:
            return None, (
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
                "invalid_transaction_state",
            )
        refused = decision.refused
        if refused is None and decision.kind is StatementKind.DDL and self.user_id is not None:
            # As the other front ends: objects belong to the company, not to one user's login.
            refused = (
                "42501",
                f"DDL runs without a user id: RESET {USER_ID_SETTING} first",
                "sql_rejected",
            )
        if refused is not None:
            self.port.figures.refused.labels(refused[0]).inc()
        self._deallocating = decision.name
        self._resets = decision.resets
        self._verdict = decision.verdict
        return decision.control, refused

    def _virtual(self, control: str | None) -> bool:
        """Statements the port answers itself: SET/RESET dbsvc.user_id and a driver's reset
        statements always, and BEGIN when a user id is set (the port opens that transaction,
        see ``_server``)."""
        return control in ("user_id", "reset") or (control == "begin" and self.user_id is not None)

    async def _run_virtual(
        self, control: str, value: str | None, *, extended: bool = False
    ) -> bytes:
        """Do what the port answers itself; its CommandComplete (or raise _Refusal).
        ``extended``: run by Execute, whose rows come without a RowDescription."""
        if control == "reset":
            return await self._reset(reset_batch(value or "") or (), extended=extended)
        if control == "user_id":
            if self.server is not None:
                raise _Refusal(
                    "25001",
                    f"{USER_ID_SETTING} can be changed only outside a transaction block: it"
                    " applies to whole transactions",
                    "invalid_transaction_state",
                )
            self.user_id = value
            return codec.message(b"C", codec.cstring("SET" if value is not None else "RESET"))
        if self.block:
            return codec.notice_response(
                "25001", "there is already a transaction in progress"
            ) + codec.message(b"C", codec.cstring("BEGIN"))
        if self.server is None:
            await self._server(begin=value)
        if not self.wrapped:
            # A BEGIN prepared while a user id was set, run after RESET dbsvc.user_id: the
            # port opened no transaction, so this BEGIN goes to the server itself (only with
            # nothing else in flight there, which it would have to read past).
            assert self.server is not None and value is not None
            if self.expect:
                raise _Refusal(
                    "0A000",
                    "this BEGIN was prepared while dbsvc.user_id was set: send it again",
                    "invalid_request",
                )
            error = await self.server.simple(value)
            if error is not None:
                raise _Refusal(error.get("C", "XX000"), error.get("M", "BEGIN failed"))
        self.block = True
        return codec.message(b"C", codec.cstring("BEGIN"))

    async def _reset(self, kinds: tuple[str, ...], *, extended: bool = False) -> bytes:
        """A pooled driver's reset (``policy.reset_batch``), answered by the port statement by
        statement as PostgreSQL would, touching only this client's own state: nothing is sent
        to a server connection except a leading ROLLBACK and, inside a transaction, CLOSE ALL.
        An error ends the batch, as it ends a multi-statement Query in PostgreSQL."""
        out = bytearray()
        for kind in kinds:
            if kind == "rollback":
                out += await self._roll_back_now()
                continue
            if self.aborted:
                return self._reset_failed(out, _ABORTED, extended)
            in_block = self.server is not None
            if in_block and self.expect and kind == "close_all":
                return self._reset_failed(out, _MID_BATCH, extended)
            if kind == "unlock_all":
                # The port refuses every advisory lock: this session holds none to release.
                out += (
                    _UNLOCK_ALL_ROWS[len(_UNLOCK_ALL_COLUMNS) :] if extended else _UNLOCK_ALL_ROWS
                )
                continue
            if kind == "close_all" and in_block:
                # Cursors of this transaction live on its server connection (none outside one).
                assert self.server is not None
                error = await self._on_server("CLOSE ALL")
                if error is not None:
                    return bytes(out + error)
            elif kind in ("reset_all", "DISCARD ALL"):
                if in_block and kind == "DISCARD ALL":
                    return self._reset_failed(out, _DISCARD_IN_BLOCK, extended)
                if in_block:
                    if self.expect:
                        return self._reset_failed(out, _MID_BATCH, extended)
                    changed = await self._reset_in_block()
                    if isinstance(changed, bytearray):
                        return bytes(out + changed)
                    out += changed
                    out += codec.message(b"C", codec.cstring("RESET"))
                    continue
                out += self._reset_settings()
                if kind == "DISCARD ALL":
                    self._forget_statements()
            out += codec.message(b"C", codec.cstring(_RESET_TAGS.get(kind, kind)))
        return bytes(out)

    def _reset_failed(self, out: bytearray, refusal: _Refused, extended: bool) -> bytes:
        """The batch's answers so far and its error; run by Execute, the error is raised so
        that the messages up to the Sync are skipped, as after any error there."""
        if extended:
            raise _Refusal(*refusal)
        return bytes(out + self._refused(refusal))

    async def _roll_back_now(self) -> bytes:
        """The ROLLBACK asyncpg puts before its reset when it releases a connection inside a
        transaction: the transaction held (if any) ends and its server connection goes back."""
        if self.server is None:
            self.aborted = False
            return codec.notice_response(
                "25P01", "there is no transaction in progress", S="WARNING", V="WARNING"
            ) + codec.message(b"C", codec.cstring("ROLLBACK"))
        if self.expect:
            return self._refused(_MID_BATCH)
        error = await self._on_server("ROLLBACK")
        self.aborted = self.block = self.wrapped = False
        assert self.server is not None
        if self.server.status != b"I":
            self.server.broken = True
        self._release()
        return error or codec.message(b"C", codec.cstring("ROLLBACK"))

    async def _on_server(self, sql: str) -> bytes | None:
        """The port's own statement on the held server connection: its ErrorResponse or None."""
        assert self.server is not None
        try:
            error = await self.server.simple(sql)
        except (BackendError, OSError):
            self.server.broken = True
            error = {"C": "08006", "M": "the server connection was lost"}
        if error is None:
            return None
        if self.server.status == b"E":
            self.aborted = True
        detail = {k: v for k, v in error.items() if k in "DHP"}
        return codec.error_response(error.get("C", "XX000"), error.get("M", sql), **detail)

    async def _reset_in_block(self) -> bytes | bytearray:
        """RESET ALL inside a transaction block, as PostgreSQL runs it: transactional. The
        tracked settings are SET back to the session's defaults on the transaction's server
        connection (a ROLLBACK there restores them and reports it, which ``_track_setting``
        follows); a user id given by SET goes back to the startup one only if the transaction
        commits (the transaction's own user id is fixed when it begins). Nothing else reaches
        the server: never a literal RESET ALL, which would reset the port's statement limit
        and read-only mode there. The ParameterStatus messages of what changed, or the error
        (a bytearray)."""
        assert self.server is not None
        reported = TRACKED_SETTINGS.values()
        changes = {
            name: value
            for name, value in self.startup_wanted.items()
            if name in reported and self.server.applied.get(name) != value
        }
        if changes:
            error = await self._on_server(
                ";".join(f"SET {name} TO {_literal(value)}" for name, value in changes.items())
            )
            if error is not None:
                return bytearray(error)
        self.wanted.update(changes)
        self.reset_at_commit = self.user_id != self.startup_user_id
        return b"".join(codec.parameter_status(name, value) for name, value in changes.items())

    def _reset_settings(self) -> bytes:
        """RESET ALL: the tracked settings and the user id back to the startup packet's (a
        ``SET dbsvc.user_id`` is undone, a startup user id stays, as PostgreSQL's RESET ALL
        returns to the session defaults); a ParameterStatus for each reported one that changed."""
        before, self.wanted = self.wanted, dict(self.startup_wanted)
        self.user_id = self.startup_user_id
        reported = TRACKED_SETTINGS.values()
        return b"".join(
            codec.parameter_status(name, value)
            for name, value in self.wanted.items()
            if name in reported and before.get(name) != value
        )

    def _forget_statements(self) -> None:
        """DISCARD ALL: the client's prepared statements and portals are forgotten (the server
        connections keep what they prepared: other clients may run the same text)."""
        for kept in (self.statements, self.verdicts, self.begins, self.virtual,
                     self.virtual_portals, self.portal_verdicts):  # fmt: skip
            kept.clear()
        self.unnamed = None

    def _deallocate(self) -> bytes:
        """DEALLOCATE done by the port: the client's names go, the server connections keep
        what they prepared (other clients may run the same text)."""
        name = self._deallocating
        if name is None:
            self.statements.clear()
            self.verdicts.clear()
            self.begins.clear()
            return codec.message(b"C", codec.cstring("DEALLOCATE ALL"))
        self.verdicts.pop(name, None)
        if self.statements.pop(name, None) is None:
            return self._refused(
                ("26000", f'prepared statement "{name}" does not exist', "invalid_parameters")
            )
        return codec.message(b"C", codec.cstring("DEALLOCATE"))

    def _refused(self, refusal: _Refused) -> bytes:
        if self._status() in (b"T", b"E"):
            self.aborted = True  # as PostgreSQL would: the transaction fails
        self._event("denied", refusal[2], None, refusal[1])
        return _error(*refusal)

    def _pool_now(self) -> ServerPool:
        """The company-wide login's pool, or with a user id the user-scoped login's."""
        assert self.pool is not None and self.tenant is not None
        if self.user_id is None:
            return self.pool
        if self.user_pool is None:
            login = self.port.app.logins.login(self.tenant, user_scoped=True)
            self.user_pool = self.port.pools.pool(login, self.pool.settings)
        return self.user_pool

    async def _server(self, begin: str | None = None) -> ServerConnection:
        """The server connection of this client's transaction: lent now if not held, with
        the client's settings (read-only for a read-only service) set on it first. With a
        user id the port opens the transaction itself (``begin``: the client's own BEGIN, if
        that is what needs it) with control.enter_user, as the query core does: the user id
        is signed for that backend and transaction with a key the tenant never sees."""
        if self.server is not None:
            return self.server
        pool = self._pool_now()
        try:
            server = await pool.acquire(self.port.acquire_timeout)
        except (BackendError, OSError) as exc:
            fields = getattr(exc, "fields", {"C": "08006", "M": str(exc)})
            raise _Refusal(fields.get("C", "08006"), fields.get("M", str(exc))) from None
        changes = [
            _set_statement(name, value)
            for name, value in self.wanted.items()
            if server.applied.get(name) != value
        ]
        if changes:
            try:
                error = await server.simple(";".join(changes))
            except (BackendError, OSError):
                error = {"C": "08006", "M": "server connection lost"}
            if error is not None:
                server.broken = True
                pool.release(server)
                raise _Refusal(error.get("C", "XX000"), error.get("M", "cannot apply settings"))
            for name, value in self.wanted.items():
                server.applied[name] = value
        if self.user_id is not None:
            key = b"\\x" + self.port.app.user_context_key.hex().encode()
            try:
                error = await server.begin_with(
                    begin or "BEGIN", self.port.enter_user, (self.user_id.encode(), key)
                )
            except (BackendError, OSError):
                server.broken = True
                error = {"C": "08006", "M": "server connection lost"}
            if error is not None:
                pool.release(server)  # rolled back there if the BEGIN took
                raise _Refusal(error.get("C", "XX000"), error.get("M", "cannot begin"))
            self.wrapped = True
        self.server, self.server_pool = server, pool
        self.port.figures.servers.inc()
        return server

    def _release(self) -> None:
        if self.server is not None and self.server_pool is not None:
            self.server_pool.release(self.server)
            self.server = self.server_pool = None
            self._forget_portals()
            self.wrapped = self.block = self.reset_at_commit = False
            self.port.figures.servers.dec()
            self.port.figures.transactions.inc()

    def _forget_portals(self) -> None:
        """Portals end with their transaction, as in PostgreSQL: the port's records of the
        client's go too (kept past it, distinct portal names grew them without end)."""
        self.portal_verdicts.clear()
        self.virtual_portals.clear()

    async def _message(self, kind: bytes, payload: bytes) -> None:
        if kind == b"Q":
            await self._query(payload)
        elif kind in b"PBDECHS" and len(kind) == 1:
            await self._extended(kind, payload)
        elif kind in (b"d", b"c", b"f"):
            # Outside copy-in mode, as PostgreSQL does: ignored (a COPY that failed before
            # its data began; the client still sends the data, then CopyDone or CopyFail).
            return
        elif kind == b"F":
            await self._flush(
                _error("0A000", "the function call protocol is not supported")
                + codec.ready_for_query(self._status())
            )
        else:
            raise codec.ProtocolViolation(f"unexpected message type {kind!r}")

    async def _query(self, payload: bytes) -> None:
        # A simple Query drops the unnamed statement in PostgreSQL: a Bind of "" after it is
        # refused as there, not re-parsed from the port's copy.
        self.unnamed = None
        handback, self._handback = self._handback, None  # this Query's, if the relay's
        try:
            sql = codec.query_text(payload)
        except codec.ProtocolViolation:
            if not codec.nul_in_text(b"Q", payload):
                raise
            refused = self._refused(_NUL_IN_TEXT)
            await self._flush(refused + codec.ready_for_query(self._status()))
            return
        control, refusal = await self._decide(sql)
        if control == "deallocate" and refusal is None:
            await self._flush(self._deallocate() + codec.ready_for_query(self._status()))
            return
        if refusal is None and control is not None and self._virtual(control):
            try:
                answer = await self._run_virtual(
                    control, self._deallocating if control == "user_id" else sql
                )
            except _Refusal as exc:
                refusal = (exc.sqlstate, exc.text, exc.code)
            else:
                await self._flush(answer + codec.ready_for_query(self._status()))
                return
        if refusal is None:
            try:
                server = await self._server()
            except _Refusal as exc:
                refusal = (exc.sqlstate, exc.text, exc.code)
        if refusal is not None:
            await self._flush(self._refused(refusal) + codec.ready_for_query(self._status()))
            return
        if self.aborted and control == "commit":
            payload = codec.cstring("ROLLBACK")  # PostgreSQL answers COMMIT so in a failed one
        elif control == "rewrite" and self._deallocating is not None:
            payload = codec.cstring(self._deallocating)  # a driver's catalog lookup, limited
        if control is None:
            self._allow_in_relay(handback, sql)
        self.server_skipping = False
        server.send(codec.message(b"Q", payload))
        if self.server_pool is not None:
            self.server_pool.queries += 1
        verdict = self._verdict
        record = None
        if verdict is not None and control in (None, "copy"):
            record = (verdict, sql, time.perf_counter())
        self.expect.append(_Expect(terminals=b"Z", record=record))
        await self._relay()

    async def _extended(self, kind: bytes, payload: bytes) -> None:
        if kind == b"S":
            self.skip_until_sync = False
            if self.server is None:
                self._forget_portals()  # the implicit transaction, if any, ends here
                self._emit(codec.ready_for_query(self._status()))
                await self._flush(b"")
                return
            self.server.send(codec.message(b"S"))
            self.expect.append(_Expect(terminals=b"Z"))
            self.server_skipping = False
            await self._relay()
            return
        if self.skip_until_sync:
            return
        try:
            if kind == b"P":
                await self._parse(payload)
            elif kind == b"B":
                await self._bind(payload)
            elif kind == b"D":
                await self._describe(payload)
            elif kind == b"E":
                await self._execute(payload)
            elif kind == b"C":
                await self._close(payload)
            elif kind == b"H":
                if self.server is not None:
                    self.server.send(codec.message(b"H"))
                    await self._relay()
                else:
                    await self._flush(b"")
        except _Refusal as exc:
            self.port.figures.refused.labels(exc.sqlstate).inc()
            self._emit(self._refused((exc.sqlstate, exc.text, exc.code)))
            self.skip_until_sync = True

    def _emit(self, data: bytes) -> None:
        """The port's own answer, after whatever the server still owes before it (none
        while the server skips to the Sync after an error: PostgreSQL would answer nothing)."""
        if self.server_skipping:
            return
        if self.expect:
            self.expect.append(_Expect(synthetic=data))
        else:
            self.writer.write(data)

    def _forward(
        self,
        kind: bytes,
        payload: bytes,
        terminals: bytes,
        record: tuple[Classification, str, float] | None = None,
    ) -> None:
        if self.server is None:
            raise _Refusal("08P01", "a portal message outside of any Bind: nothing to run")
        self.server.send(codec.message(kind, payload))
        if not self.server_skipping:
            self.expect.append(_Expect(terminals=terminals, record=record))

    async def _parse(self, payload: bytes) -> None:
        try:
            name, query, types = codec.parse_parse(payload)
        except codec.ProtocolViolation:
            if not codec.nul_in_text(b"P", payload):
                raise
            raise _Refusal(*_NUL_IN_TEXT) from None
        _check_name(name, "prepared statement")
        if name and len(self.statements) + len(self.virtual) >= MAX_STATEMENTS:
            raise _Refusal(
                "54000",
                f"this client keeps {MAX_STATEMENTS} prepared statements: close statements it"
                " no longer uses",
            )
        control, refusal = await self._decide(query)
        if refusal is not None:
            raise _Refusal(*refusal)
        if control == "deallocate":
            raise _Refusal("0A000", "send DEALLOCATE as a simple query through this port")
        if control == "rewrite" and self._deallocating is not None:
            # A driver's catalog lookup: the tenant-limited query runs under the client's name.
            query = self._deallocating
            payload = codec.cstring(name) + codec.cstring(query) + types
        if control == "reset" and len(self._resets) > 1:
            raise _Refusal("42601", "cannot insert multiple commands into a prepared statement")
        if name and (name in self.statements or name in self.virtual):
            raise _Refusal("42P05", f'prepared statement "{name}" already exists')
        if control is not None and self._virtual(control):
            self.virtual[name] = (control, self._deallocating if control == "user_id" else query)
            self._emit(_PARSE_COMPLETE)
            return
        server = await self._server()
        if self._verdict is not None:
            self.verdicts[name] = (self._verdict, query)
        else:
            self.verdicts.pop(name, None)
        if control == "begin":
            self.begins[name] = query
        else:
            self.begins.pop(name, None)
        if not name:
            self.virtual.pop("", None)
            self.unnamed = payload
            server.unnamed = (self.ident, payload)
            server.send(codec.message(b"P", payload))
            if not self.server_skipping:
                self.expect.append(_Expect(terminals=b"1"))
            return
        digest = hashlib.sha256(query.encode() + b"\x00" + types).hexdigest()[:32]
        server_name = f"dbsvc_{digest}"
        parse = codec.replace_parse_name(server_name, query, types)
        kept = sum(len(p) for _, p in self.statements.values())
        if kept + len(parse) > MAX_PREPARED_BYTES:
            raise _Refusal(
                "54000",
                f"this client keeps {kept} bytes of prepared statements; at most"
                f" {MAX_PREPARED_BYTES}: close statements it no longer uses",
            )
        if server_name in server.prepared or server_name in self.pending:
            self.statements[name] = (server_name, parse)
            self._emit(_PARSE_COMPLETE)
            return
        self._prepare_on(server, len(parse))
        self.statements[name] = (server_name, parse)
        server.send(parse)
        self.pending.add(server_name)
        if not self.server_skipping:
            self.expect.append(_Expect(terminals=b"1", prepares=server_name))

    @staticmethod
    def _prepare_on(server: ServerConnection, size: int) -> None:
        """Count a named statement about to be prepared on ``server``; refused (54000) when
        the connection already holds ``MAX_PREPARED_BYTES`` of them."""
        if server.prepared_bytes + size > MAX_PREPARED_BYTES:
            raise _Refusal(
                "54000",
                f"this server connection holds {server.prepared_bytes} bytes of prepared"
                f" statements; at most {MAX_PREPARED_BYTES}: close statements no longer used,"
                " or reconnect",
            )
        server.prepared_bytes += size

    async def _statement(self, name: str) -> str:
        """The server's name of the client's statement ``name``, prepared on the server
        connection first if it is not yet (its ParseComplete hidden from the client)."""
        if not name:
            unnamed = self.unnamed
            if unnamed is None:
                # The server connection's unnamed statement, if it has one, is whichever
                # client's parsed it last: never this client's to bind or describe (it never
                # sent that SQL, so the guard never saw it from this client). PostgreSQL's own
                # answer for a client without one.
                raise _Refusal("26000", "unnamed prepared statement does not exist")
            server = await self._server()
            if server.unnamed != (self.ident, unnamed):
                server.send(codec.message(b"P", unnamed))
                server.unnamed = (self.ident, unnamed)
                if not self.server_skipping:
                    self.expect.append(_Expect(terminals=b"1", swallow=True))
            return ""
        kept = self.statements.get(name)
        if kept is None:
            raise _Refusal("26000", f'prepared statement "{name}" does not exist')
        server = await self._server()
        server_name, parse = kept
        if server_name not in server.prepared and server_name not in self.pending:
            self._prepare_on(server, len(parse))
            server.send(parse)
            self.pending.add(server_name)
            if not self.server_skipping:
                self.expect.append(_Expect(terminals=b"1", swallow=True, prepares=server_name))
        return server_name

    async def _bind(self, payload: bytes) -> None:
        portal = codec.read_cstring(payload)[0]
        name, _ = codec.bind_statement(payload)
        _check_name(portal, "portal")
        virtual = self.virtual.get(name)
        if virtual is None and self.user_id is not None and name in self.begins:
            # A BEGIN prepared before the user id was set: the port opens that transaction.
            virtual = ("begin", self.begins[name])
        if virtual is not None:
            self.virtual_portals[portal] = virtual
            self._emit(_BIND_COMPLETE)
            return
        self.virtual_portals.pop(portal, None)
        kept = self.verdicts.get(name)
        if kept is not None:
            self.portal_verdicts[portal] = kept
        else:
            self.portal_verdicts.pop(portal, None)
        server_name = await self._statement(name)
        assert self.server is not None
        self.server.send(codec.replace_bind_statement(payload, server_name) if name else
                         codec.message(b"B", payload))  # fmt: skip
        if not self.server_skipping:
            self.expect.append(_Expect(terminals=b"2"))

    async def _describe(self, payload: bytes) -> None:
        target, name = payload[:1], codec.read_cstring(payload, 1)[0]
        if target == b"S":
            if name in self.virtual:
                self._emit(_NO_PARAMETERS + self._virtual_columns(self.virtual[name]))
                return
            server_name = await self._statement(name)
            payload = b"S" + codec.cstring(server_name)
        else:
            if name in self.virtual_portals:
                self._emit(self._virtual_columns(self.virtual_portals[name]))
                return
            await self._server()
        self._forward(b"D", payload, b"Tn")

    @staticmethod
    def _virtual_columns(virtual: tuple[str, str | None]) -> bytes:
        """Describe's answer for a statement the port runs itself: only the advisory-unlock
        call of a driver's reset returns a row."""
        if virtual[0] == "reset" and reset_batch(virtual[1] or "") == ("unlock_all",):
            return _UNLOCK_ALL_COLUMNS
        return _NO_DATA

    async def _execute(self, payload: bytes) -> None:
        portal = codec.read_cstring(payload)[0]
        virtual = self.virtual_portals.get(portal)
        if virtual is None:
            kept = self.portal_verdicts.get(portal)
            record = None if kept is None else (*kept, time.perf_counter())
            self._forward(b"E", payload, b"CIs", record)
            if self.server_pool is not None:
                self.server_pool.queries += 1
            return
        self._emit(await self._run_virtual(*virtual, extended=True))

    async def _close(self, payload: bytes) -> None:
        target, name = payload[:1], codec.read_cstring(payload, 1)[0]
        if target == b"S":
            # Kept on the server connection (another client may run the same text); only this
            # client's name goes.
            self.statements.pop(name, None)
            self.virtual.pop(name, None)
            self.verdicts.pop(name, None)
            self.begins.pop(name, None)
            self._emit(_CLOSE_COMPLETE)
            return
        if self.virtual_portals.pop(name, None) is not None:
            self._emit(_CLOSE_COMPLETE)
            return
        await self._server()
        self._forward(b"C", payload, b"3")

    # -- the server's answers ----------------------------------------------------------------

    async def _relay(self) -> None:
        """Forward the server's answers until every expected one has come (the last being
        ReadyForQuery after a Sync or Query), then give the connection back if it is idle."""
        server = self.server
        assert server is not None
        # The tenant's statement limit, kept from outside the session as the query core does
        # (postgres/deadlines.py): SQL may lift its own statement_timeout or trap the cancel.
        # A little later than PostgreSQL's own timeout, which normally answers first.
        self.expired = False
        assert self.tenant is not None
        timer = asyncio.get_running_loop().call_later(
            self.tenant.limits.statement_timeout_ms / 1000 + _LIMIT_MARGIN, self._expire, server
        )
        try:
            await self._relay_until_done(server)
        finally:
            timer.cancel()

    async def _copy_in(self, server: ServerConnection, *, extended: bool) -> None:
        """Copy-in mode: CopyData from the client to the server until CopyDone or CopyFail
        (Flush and Sync pass, PostgreSQL ignores them there). After a COPY run by Execute the
        server wants one more Sync (libpq sends it after CopyDone); that one answers the Sync
        the client sent before the data. A client gone mid-COPY: the server gets CopyFail, so
        the COPY and its transaction roll back and the connection goes back to the pool."""
        while True:
            try:
                kind, payload = await self._read()
            except (ConnectionError, asyncio.IncompleteReadError, codec.ProtocolViolation):
                server.send(codec.message(b"f", codec.cstring("the client disconnected")))
                await self._drain_after_failed_copy(server, extended)
                raise _ClientGone from None
            if kind not in b"dcfHS" or len(kind) != 1:
                server.send(codec.message(b"f", codec.cstring(f"unexpected message {kind!r}")))
                await self._drain_after_failed_copy(server, extended)
                await self._fatal("08P01", f"unexpected message type {kind!r} during COPY")
                raise _ClientGone
            server.send(codec.message(kind, payload))
            if kind in b"cf":
                break
            await server.drain()  # the server's pace: a fast client waits here
        if extended:
            kind, payload = await self._read()
            if kind != b"S":
                raise codec.ProtocolViolation(f"expected Sync after COPY, got {kind!r}")
            server.send(codec.message(b"S"))
        await server.drain()

    async def _drain_after_failed_copy(self, server: ServerConnection, extended: bool) -> None:
        """After the port's CopyFail: read the server to its ReadyForQuery (after an Execute
        it skips to a Sync: one is sent), then give the connection back (rolled back there if
        still in a transaction), or close it."""
        if extended:
            server.send(codec.message(b"S"))
        try:
            await server.drain()
            async with asyncio.timeout(10):
                while True:
                    kind, payload = await server.read_message()
                    if kind == b"Z":
                        server.status = payload[:1]
                        break
        except (BackendError, OSError, TimeoutError):
            server.broken = True
        self.expect.clear()
        self.pending.clear()
        self._release()

    def _expire(self, server: ServerConnection) -> None:
        if self.server is server and self.server_pool is not None:
            self.expired = True
            # Never lent again: Deadlines terminates the backend after the grace period if it
            # is not idle by then, which must not hit another client's transaction.
            server.broken = True
            self.port.app.deadlines.expired(server.pid, self.server_pool.login.role, "statement")
            if self.writing:
                # The client stopped taking its rows: the relay would wait on it for ever,
                # holding the server connection and its slot of the service's PostgreSQL
                # budget (shared by every tenant) for as long as the socket stays open. Past
                # the limit the session ends, as PostgreSQL cancels a statement blocked on
                # sending; the drain then fails and ``cleanup`` gives the connection back.
                self.writer.transport.abort()

    async def _relay_until_done(self, server: ServerConnection) -> None:
        expect = self.expect
        out = bytearray()
        ready = False  # a ReadyForQuery came: the batch is over
        finish = False  # ... and it ends a transaction the port opened for a user id
        await server.drain()
        while True:
            while expect and expect[0].synthetic is not None:
                out += expect.popleft().synthetic  # type: ignore[arg-type]
            if not expect:
                break
            if out:
                await self._flush(out)
                out = bytearray()
            try:
                messages = await server.read_messages()
            except (BackendError, OSError):
                in_block = self.block or (server.status != b"I" and not self.wrapped)
                server.broken = True
                expect.clear()
                self.pending.clear()
                self._release()
                if self.expired and not in_block:
                    # Terminated past its limit outside any block of the client's: that
                    # statement fails, the client goes on (on another server connection).
                    self.aborted = False
                    limit = self.tenant.limits.statement_timeout_ms if self.tenant else 0
                    out += _error(
                        "57014",
                        f"the statement exceeded the tenant's limit of {limit} ms and was canceled",
                    )
                    await self._flush(out + codec.ready_for_query(b"I"))
                    return
                if self.expired:
                    await self._flush(out)
                    await self._fatal(
                        "57014",
                        "the statement exceeded the tenant's limit: the transaction is lost",
                    )
                else:
                    await self._fatal("08006", "the server connection was lost")
                raise _ClientGone from None
            for kind, raw in messages:
                head = expect[0] if expect else None
                if kind == b"E" and self.expired and b"SFATAL\x00" in raw:
                    continue  # the backend's own "terminating connection": answered above
                if kind == b"E":
                    out += raw
                    self._on_error(raw)
                    continue
                if kind == b"C" and head is not None and head.record is not None:
                    self._done(head.record, raw)
                    head.record = None
                if kind == b"C" and self.reset_at_commit and raw[5:-1] == b"COMMIT":
                    self.user_id, self.reset_at_commit = self.startup_user_id, False
                if kind in b"NA":
                    out += raw
                    continue
                if kind == b"S":
                    self._track_setting(server, raw)
                    out += raw
                    continue
                if kind == b"G":  # COPY FROM STDIN: the client's data goes to the server
                    out += raw
                    await self._flush(out)
                    out = bytearray()
                    await self._copy_in(
                        server, extended=head is not None and head.terminals != b"Z"
                    )
                    continue
                if head is None or kind not in head.terminals:
                    out += raw
                    continue
                expect.popleft()
                if kind == b"Z":
                    ready = True
                    server.status = raw[5:6]
                    if server.status == b"I":
                        self.aborted = self.block = self.wrapped = False
                    if self.wrapped and not self.block:
                        finish = True  # answered once the port's transaction has ended
                    elif self.aborted:
                        out += raw[:5] + b"E"
                    else:
                        out += raw
                elif not head.swallow:
                    out += raw
                if head.prepares is not None:
                    server.prepared.add(head.prepares)
                    self.pending.discard(head.prepares)
                while expect and expect[0].synthetic is not None:
                    out += expect.popleft().synthetic  # type: ignore[arg-type]
        if finish:
            out += await self._end_wrapped(server)
        if ready and server.broken and server.status != b"I" and not expect:
            # Past its limit inside the client's own transaction: the backend is cancelled and
            # then terminated, so that transaction is lost; the session ends, as PostgreSQL
            # ends a terminated one, rather than going on outside the client's transaction.
            self.pending.clear()
            self._release()
            await self._flush(out)
            await self._fatal(
                "57014", "the statement exceeded the tenant's limit: the transaction is lost"
            )
            raise _ClientGone
        if ready and (server.status == b"I" or server.broken) and not expect:
            self.pending.clear()
            self._release()
        await self._flush(out)

    async def _end_wrapped(self, server: ServerConnection) -> bytes:
        """Commit (or after an error roll back) the transaction the port opened for a user id
        around statements the client sent outside a block, as PostgreSQL ends an implicit one:
        its answer (an error, if COMMIT failed) and ReadyForQuery 'I'."""
        end = "COMMIT" if server.status == b"T" and not self.aborted else "ROLLBACK"
        try:
            error = await server.simple(end)
        except (BackendError, OSError):
            server.broken = True
            error = {"C": "08006", "M": "the server connection was lost"}
        self.aborted = self.wrapped = False
        out = b""
        if error is not None:
            detail = {k: v for k, v in error.items() if k in "DHP"}
            out = codec.error_response(error.get("C", "XX000"), error.get("M", end), **detail)
        if server.status != b"I":
            server.broken = True
        return out + codec.ready_for_query(b"I")

    def _done(self, record: tuple[Classification, str, float], raw: bytes) -> None:
        """A statement of the client's completed (CommandComplete): its figures and audit."""
        verdict, sql, started = record
        tag = raw[5:-1].decode(errors="replace")
        if self.recorder is not None and self.tenant is not None:
            last = tag.rsplit(" ", 1)[-1]
            rows = int(last) if last.isdigit() else 0
            took_ms = (time.perf_counter() - started) * 1000
            self.recorder.done(self.tenant, verdict, sql, (), took_ms, rows)
        self._event("ok", tag.split(" ", 1)[0] or None, verdict.kind, "")

    def _failed(self, verdict: Classification, fields: dict[str, str]) -> None:
        if self.recorder is not None and self.tenant is not None:
            self.recorder.failed(self.tenant.tenant_id, verdict)
        self._event("error", _code_for(fields.get("C", "XX000")), verdict.kind, fields.get("M", ""))

    def _on_error(self, raw: bytes) -> None:
        """The server refused a message: it skips everything up to the Sync (or the Query's
        end), so do the answers the client expected before then."""
        fields: dict[str, str] | None = None
        for head in self.expect:
            if head.record is not None:
                fields = fields or codec.parse_error_fields(raw[5:])
                self._failed(head.record[0], fields)
                head.record = None
            if head.terminals == b"Z":
                break
        while self.expect and self.expect[0].terminals != b"Z":
            self.expect.popleft()
        self.pending.clear()
        self.server_skipping = not self.expect

    def _track_setting(self, server: ServerConnection, raw: bytes) -> None:
        name, offset = codec.read_cstring(raw, 5)
        value, _ = codec.read_cstring(raw, offset)
        server.applied[name] = value
        if name in self.wanted:
            self.wanted[name] = value


def _check_name(name: str, what: str) -> None:
    """A statement or portal name the port keeps is at most ``MAX_NAME_BYTES``: names are the
    keys of per-client maps, and a 16 MiB message could carry a 16 MiB one."""
    if len(name.encode()) > MAX_NAME_BYTES:
        raise _Refusal("42622", f"{what} name longer than {MAX_NAME_BYTES} bytes")


def _user_id(value: str) -> str:
    if not valid_user_id(value):
        raise _Refusal(
            "22023",
            f"{USER_ID_SETTING} must be 1-50 characters of letters, digits and _ . @ : + -",
            "invalid_parameters",
        )
    return value


def _options(value: str) -> list[tuple[str, str]]:
    """``options`` as libpq sends it (``-c name=value`` or ``--name=value``, backslash
    escapes a space): (lower-case name, value) pairs."""
    words: list[str] = []
    word, escaped, started = "", False, False
    for char in value:
        if escaped:
            word, escaped, started = word + char, False, True
        elif char == "\\":
            escaped = True
        elif char.isspace():
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + char, True
    if started:
        words.append(word)
    pairs: list[tuple[str, str]] = []
    index = 0
    while index < len(words):
        item = words[index]
        if item == "-c" and index + 1 < len(words):
            index += 1
            item = words[index]
        elif item.startswith(("-c", "--")):
            item = item[2:]
        else:
            raise _Refusal("42704", f"options: {item!r} is not -c name=value")
        name, sep, setting = item.partition("=")
        if not sep:
            raise _Refusal("42704", f"options: {item!r} is not -c name=value")
        pairs.append((name.strip().lower().replace("-", "_"), setting))
        index += 1
    return pairs


def _set_statement(name: str, value: str) -> str:
    """The statement that gives a server connection a client's setting (Python's path and the
    relay's)."""
    return f"SET {name} TO {_literal(value)}"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
