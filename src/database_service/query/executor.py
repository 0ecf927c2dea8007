"""The query execution core every front end shares.

For a request (principal, tenant, optional user, SQL, parameters) the executor checks, in order:
the principal may act for the tenant; the tenant exists and is active; the SQL guard accepts the
statement; the principal's scopes allow its class (read → ``read``, write → ``write``, DDL →
``admin``). Then it runs the statement on a connection logged in as the tenant's own role.

A user id puts the statement on the tenant's user-scoped login, in a transaction whose first
statement is ``control.enter_user(user, key)``: PostgreSQL then shows that session the user's
rows (and the company's rows without a user) and nothing else, and a user id the tenant's SQL
sets for itself is refused rather than trusted (control migration 0004). A principal without the
``write`` scope runs in a READ ONLY transaction, so PostgreSQL itself refuses writes hidden in
functions. Every session runs under the tenant's time limits, enforced from outside the session
(``postgres.deadlines``). Every request is audited, whatever ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, cast

import asyncpg
from asyncpg.prepared_stmt import PreparedStatement
from asyncpg.transaction import Transaction

from database_service.auth import Principal, Scope
from database_service.errors import (
    DatabaseServiceError,
    InvalidParameters,
    NotFound,
    PermissionDenied,
    QueryError,
    ResultTooLarge,
    SqlRejected,
    StatementOutdated,
    Unavailable,
    postgres_unreachable,
)
from database_service.loops import RunningLoop
from database_service.observability.audit import AuditEvent, AuditLog
from database_service.observability.metrics import Metrics
from database_service.observability.tracing import (
    AUTHORIZE,
    DB_OPERATION,
    DB_STATEMENT,
    DB_SYSTEM,
    POSTGRESQL,
    SQL_GUARD,
    STATEMENT,
    STATEMENT_CLASS,
    TENANT_ID,
    Spans,
    SpanScope,
)
from database_service.postgres import Connection, TenantConnection, TenantLogin, TenantPools
from database_service.postgres.deadlines import Deadlines, SessionWatch
from database_service.postgres.pools import Workload
from database_service.postgres.replicas import Replica, ReplicaSet
from database_service.query.boundary import (
    StatementShapes,
    cached_statement,
    fetch_first,
    postgres_errors,
    prepare_cached,
)
from database_service.query.caching import CacheOptions, ReadPlan, ResultCaching
from database_service.query.replays import (
    KEPT_READS,
    Checked,
    CheckedKey,
    Replay,
    Replayed,
    ReplayKey,
    Replays,
)
from database_service.query.values import PgType, coerce_params, coerce_rows
from database_service.results import (
    Column,
    Event,
    Header,
    QueryResult,
    Rows,
    StatementKind,
    Summary,
    TransactionResult,
    approximate_bytes,
)
from database_service.sqlguard import Classification, SqlGuard
from database_service.tenancy import TenantRecord, TenantRegistry, quote_ident
from database_service.tenancy.secrets import TenantLogins

if TYPE_CHECKING:  # the statements package builds on this one's modules
    from database_service.statements.recorder import StatementRecorder

__all__ = [
    "JOINED_SESSION",
    "Column",
    "Header",
    "OwnSession",
    "QueryExecutor",
    "QueryResult",
    "Summary",
    "TenantContext",
    "TransactionResult",
]

log = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
Isolation = Literal["read_committed", "repeatable_read", "serializable"]
STORE = "postgresql"  # the store this core runs statements on (results carry it too)
_KIND_ORDER = [StatementKind.READ, StatementKind.WRITE, StatementKind.DDL]
_USER_ID = re.compile(r"^[A-Za-z0-9_.@:+-]{1,50}$")
_REQUIRED_SCOPE = {
    StatementKind.READ: Scope.READ,
    StatementKind.WRITE: Scope.WRITE,
    StatementKind.DDL: Scope.ADMIN,
}


@dataclass(frozen=True, slots=True)
class TenantContext:
    tenant_id: str
    user_id: str | None = None


@dataclass(slots=True)
class _Outcome:
    kind: StatementKind | None = None
    command: str | None = None
    # The one statement of the operation, once classified: an error from then on is counted
    # in its statement figures.
    verdict: Classification | None = None
    # A statement that succeeded: ``StatementRecorder.done``'s arguments, recorded with the
    # rest of the operation's bookkeeping once the answer is on its way (one callback).
    statistics: tuple[Any, ...] | None = None


class _Session:
    """A tenant connection, the watch that keeps its time limits, and its transaction: begun at
    once when the session needs one (read-only callers, a user id, several statements), else
    only if a statement turns out to need one (``begin``)."""

    __slots__ = (
        "_isolation",
        "_readonly",
        "_tx",
        "began",
        "conn",
        "ran",
        "stateless",
        "tenant_id",
        "watch",
    )

    def __init__(
        self,
        conn: Connection,
        watch: SessionWatch,
        tenant_id: str,
        *,
        readonly: bool,
        isolation: Isolation,
    ) -> None:
        self.conn = conn
        self.watch = watch
        self.tenant_id = tenant_id
        self._readonly = readonly
        self._isolation = isolation
        self._tx: Transaction | None = None
        self.began = False
        # Set by the query core when the session ran one repeatable read in one round trip
        # and nothing else: no session state can have changed, so no reset is needed.
        self.stateless = False
        self.ran = False  # a statement of the query core ran

    async def begin(self) -> None:
        if not self.began:
            self._tx = self.conn.transaction(readonly=self._readonly, isolation=self._isolation)
            with self.watch.statement():
                await self._tx.start()
            self.began = True

    async def commit(self) -> None:
        if self.began and self._tx is not None:
            with self.watch.statement():
                await self._tx.commit()

    async def rollback(self) -> None:
        if self._tx is not None:
            await self._tx.rollback()


@dataclass(slots=True)
class OwnSession:
    """What ``QueryExecutor.own_session`` yields: the tenant, its connection (in a transaction),
    the watch whose ``statement()`` arms the statement limit around each round trip, the
    command tag for the audit, the relations (``schema.table``) written, whose cached
    results are then invalidated, and whether the session changed no session state."""

    tenant: TenantRecord
    conn: Connection
    watch: SessionWatch
    command: str | None = None
    written: list[str] = field(default_factory=list)
    stateless: bool = False


# A transaction of the query core that stores living in this PostgreSQL join instead of opening
# their own session (set by the multi-store operation around its writes, in its own task only):
# the vector and graph writes then commit or roll back with the operation's PostgreSQL part.
JOINED_SESSION: ContextVar[OwnSession | None] = ContextVar("dbsvc_joined_session", default=None)


@dataclass(frozen=True, slots=True)
class _Target:
    schema: str
    name: str
    types: dict[str, PgType] = field(repr=False)
    rls: bool

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


class _DeadConnection(Unavailable):
    """A repeatable read's first round trip found its pooled connection dead (nothing ran): the
    query core retries it once on another connection, as a dead connection found at BEGIN."""


_NO_SPAN = contextlib.nullcontext()  # a streamed statement's span when traces are off

# A replayed read (``replay``) is counted, added to the statistics and audited with the others
# answered within this many seconds: together, after the answers, rather than each right after
# its own (2026-12-05, bench/cache.py at concurrency 1: that bookkeeping, one read at a time,
# added 30 µs to a 0.66 ms hit).
_BOOKS_S = 0.01
_FROM_CACHE = "SELECT (from the cache)"  # the command audited for an answer from the cache

# A read outside a transaction gets its rows in one round trip when they are this many or fewer.
_FIRST_ROWS = 2048
_FETCH_BYTES = 1_048_576  # what a cursor fetch of a whole result aims at
_RETRIED = (StatementOutdated, _DeadConnection)


def _outdated(exc: BaseException) -> bool:
    """A kept statement PostgreSQL refused because its tables changed (raw, or translated)."""
    return isinstance(exc, asyncpg.InvalidCachedStatementError | StatementOutdated)


def _row_count(status: str, fetched: int) -> int:
    """Rows affected from the command tag ("INSERT 0 3", "UPDATE 2"), else rows returned."""
    parts = status.split()
    if (
        parts
        and parts[0] in {"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"}
        and parts[-1].isdigit()
    ):
        return int(parts[-1])
    return fetched


# Reports and time-series reads hold analytics connections; everything else of a caller's,
# OLTP's (bulk loads name their own).
_ANALYTICS_ACTIONS = frozenset({"analytics", "timeseries"})


def _workload_of(action: str) -> Workload:
    return "analytics" if action in _ANALYTICS_ACTIONS else "oltp"


def _pure_read(verdict: Classification) -> bool:
    """A read that calls nothing that writes: a replica may answer it."""
    return verdict.kind is StatementKind.READ and verdict.repeatable


# What a replica may refuse that the primary would run: a write a function attempted in a
# read-only standby (25006), a query canceled by a conflict with recovery (40001).
_REPLICA_REFUSALS = frozenset({"25006", "40001"})


def _replica_may_fail(exc: Exception) -> bool:
    """A replica's failure the primary answers instead of the caller seeing it."""
    return isinstance(exc, Unavailable) or (
        isinstance(exc, QueryError) and exc.sqlstate in _REPLICA_REFUSALS
    )


class _Audited:
    """``QueryExecutor._audited``'s context manager: a class, not a generator-based one, as it
    wraps every request."""

    __slots__ = ("_action", "_ctx", "_executor", "_outcome", "_principal")

    def __init__(
        self, executor: QueryExecutor, principal: Principal, ctx: TenantContext, action: str
    ) -> None:
        self._executor = executor
        self._principal = principal
        self._ctx = ctx
        self._action = action
        self._outcome = _Outcome()

    async def __aenter__(self) -> _Outcome:
        return self._outcome

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        executor, principal, ctx, action = self._executor, self._principal, self._ctx, self._action
        outcome = self._outcome
        metrics, statements = executor._metrics, executor._statements
        if exc is None:
            if executor._audit.backlogged:  # the writer is behind: wait here (back-pressure)
                executor._succeeded(principal, ctx, action, outcome)
                event = executor._event(principal, ctx, action, outcome, code=outcome.command)
                await executor._audit.record(event)
                return
            # The usual case: counted and audited once the answer is on its way, with the
            # others of the next few milliseconds (``book``; before the audit log flushes or
            # closes, so nothing is lost).
            executor._book(principal, ctx, action, outcome)
        elif isinstance(exc, DatabaseServiceError):
            state = "error" if outcome.kind is not None else "denied"
            if state == "denied":
                metrics.denials.labels(exc.error_code).inc()
            elif outcome.verdict is not None and statements is not None:
                statements.failed(ctx.tenant_id, outcome.verdict)
            await executor._record(
                principal, ctx, action, outcome, state, exc.error_code, exc.message
            )
            log.info(
                "tenant %s: %s by %s %s: %s", ctx.tenant_id, action, principal.service, state,
                exc.error_code,
            )  # fmt: skip
        elif isinstance(exc, asyncio.CancelledError | GeneratorExit):
            await asyncio.shield(
                executor._record(principal, ctx, action, outcome, "cancelled", "cancelled", "")
            )
        elif isinstance(exc, Exception):
            # Not one of ours: a bug, or a driver error no boundary translated. Still audited
            # and counted; the front end reports it as an internal error.
            metrics.errors.labels("internal").inc()
            if outcome.verdict is not None and statements is not None:
                statements.failed(ctx.tenant_id, outcome.verdict)
            await executor._record(
                principal, ctx, action, outcome, "error", "internal", type(exc).__name__
            )
            log.error(
                "tenant %s: %s by %s failed", ctx.tenant_id, action, principal.service,
                exc_info=exc,
            )  # fmt: skip


class QueryExecutor:
    def __init__(
        self,
        *,
        pools: TenantPools,
        registry: TenantRegistry,
        logins: TenantLogins,
        guard: SqlGuard,
        audit: AuditLog,
        metrics: Metrics,
        deadlines: Deadlines,
        shared_schema: str,
        control_schema: str,
        user_context_key: bytes,
        max_params: int,
        max_result_rows: int,
        transaction_timeout_ms: int,
        max_result_bytes: int = 32 * 1_048_576,
        spans: Spans | None = None,
        caching: ResultCaching | None = None,
        statements: StatementRecorder | None = None,
        workload_statement_ms: dict[Workload, int] | None = None,
        replicas: ReplicaSet | None = None,
        kept_reads: int = KEPT_READS,
    ) -> None:
        self._pools = pools
        self._running_loop = RunningLoop()  # call_soon on every request, without getpid()
        # Read replicas (None: none configured): pure reads may go there (postgres/replicas.py).
        self._replicas = replicas
        # The statement limits of analytics and bulk sessions (their pools' connections start
        # with the same statement_timeout); OLTP's is the tenant's own limit.
        self._workload_ms = workload_statement_ms or {}
        # Per-tenant statement figures and the slow-query log: a synchronous O(1) call when a
        # statement ends (None: not kept).
        self._statements = statements
        self._caching = caching
        # None when traces are off: each span site tests it first, so then costs nothing.
        self._spans = spans
        self._registry = registry
        self._guard = guard
        self._audit = audit
        self._metrics = metrics
        self._deadlines = deadlines
        self._shared = (shared_schema,)
        self._enter_user = f"SELECT {quote_ident(control_schema)}.enter_user($1, $2)"
        self._user_key = user_context_key
        self._max_params = max_params
        self._max_rows = max_result_rows
        self._max_bytes = max_result_bytes
        self._transaction_seconds = transaction_timeout_ms / 1000
        self._logins = logins
        # Per tenant, moved on whenever its tables may have changed shape: after DDL it ran
        # through us, or when PostgreSQL refused a kept statement (DDL elsewhere).
        self._schema_generations: dict[str, int] = {}
        self._shapes = StatementShapes()  # kept statements' parameter types and columns
        self._statement_counters: dict[StatementKind, Any] = {}
        # Cached reads answered again (``replay``): as many as the cache keeps plans of.
        self._replays: Replays[ReplayKey, Replay] = Replays(kept_reads)
        self._checked: Replays[CheckedKey, Checked] = Replays()
        # Operations answered, not yet booked (``book``): who, for whom, what, how it went,
        # when; and how many of them were replays.
        self._books: list[tuple[Principal, TenantContext, str, _Outcome, float]] = []
        self._replays_unbooked = 0
        audit.before_flush(self.book)

    async def _prepare(self, session: _Session, sql: str) -> PreparedStatement:
        generation = self._schema_generations.get(session.tenant_id, 0)
        kept = cached_statement(session.conn, sql, generation)
        if kept is not None:
            return kept  # no round trip, so no statement limit to arm
        with session.watch.statement():
            prepared = await prepare_cached(session.conn, sql, generation)
        return prepared

    def _schema_changed(self, tenant_id: str) -> None:
        self._schema_generations[tenant_id] = self._schema_generations.get(tenant_id, 0) + 1

    def _login(self, tenant: TenantRecord, ctx: TenantContext) -> TenantLogin:
        return self._logins.login(tenant, user_scoped=ctx.user_id is not None)

    async def authorize(
        self, principal: Principal, ctx: TenantContext, sql: str
    ) -> tuple[TenantRecord, Classification]:
        """Every check that happens before PostgreSQL sees the statement."""
        if self._spans is None:
            return await self._authorize(principal, ctx, sql)
        with self._spans.scope(
            AUTHORIZE, {TENANT_ID: ctx.tenant_id, DB_SYSTEM: POSTGRESQL}
        ) as span:
            tenant, verdict = await self._authorize(principal, ctx, sql)
            span.set_attribute(STATEMENT_CLASS, verdict.kind.value)
            return tenant, verdict

    async def _authorize(
        self, principal: Principal, ctx: TenantContext, sql: str
    ) -> tuple[TenantRecord, Classification]:
        if not principal.can_act_for(ctx.tenant_id):
            principal.require(Scope.READ, ctx.tenant_id)  # raises PermissionDenied
        if ctx.user_id is not None and not _USER_ID.fullmatch(ctx.user_id):
            raise InvalidParameters(
                "user_id must be 1-50 characters of letters, digits and _ . @ : + -"
            )
        tenant = await self._registry.get_active(ctx.tenant_id)
        if self._spans is None:
            verdict = await self._guard.classify_async(
                sql, own_schema=tenant.schema_name, shared_schemas=self._shared
            )
        else:
            attributes = {TENANT_ID: ctx.tenant_id, DB_SYSTEM: POSTGRESQL}
            with self._spans.scope(SQL_GUARD, attributes) as span:
                verdict = await self._guard.classify_async(
                    sql, own_schema=tenant.schema_name, shared_schemas=self._shared
                )
                span.set_attribute(STATEMENT_CLASS, verdict.kind.value)
        principal.require(_REQUIRED_SCOPE[verdict.kind], ctx.tenant_id)
        if verdict.kind is StatementKind.DDL and ctx.user_id is not None:
            # Objects belong to the company, not to one user's login.
            raise SqlRejected("DDL runs without a user id: send it without one", sqlstate="42501")
        return tenant, verdict

    def _succeeded(
        self,
        principal: Principal,
        ctx: TenantContext,
        action: str,
        outcome: _Outcome,
    ) -> None:
        """Count an operation that succeeded and add its statement to the statistics (its
        audit event is its caller's: awaited while the writer is behind, else ``book``)."""
        if outcome.statistics is not None and self._statements is not None:
            self._statements.done(*outcome.statistics)
        if outcome.kind is not None:
            self._statement_counter(outcome.kind).inc()

    def _statement_counter(self, kind: StatementKind) -> Any:
        counter = self._statement_counters.get(kind)
        if counter is None:  # labels() locks and builds a key: its child is kept
            counter = self._metrics.statements.labels(STORE, kind.value)
            self._statement_counters[kind] = counter
        return counter

    @staticmethod
    def _event(
        principal: Principal,
        ctx: TenantContext,
        action: str,
        outcome: _Outcome,
        state: str = "ok",
        code: str | None = None,
        detail: str = "",
        at: float | None = None,
    ) -> AuditEvent:
        """``at``: when it happened (``time.time()``), if not now."""
        return AuditEvent(
            at=datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC),
            service=principal.service,
            tenant_id=ctx.tenant_id,
            action=action,
            statement_class=outcome.kind.value if outcome.kind else None,
            outcome=state,
            code=code,
            detail=detail[:500] or None,
        )

    def _audited(self, principal: Principal, ctx: TenantContext, action: str) -> _Audited:
        """Audit and count one operation, however it ends (ok, denied, error or cancelled)."""
        return _Audited(self, principal, ctx, action)

    async def _record(
        self,
        principal: Principal,
        ctx: TenantContext,
        action: str,
        outcome: _Outcome,
        state: str,
        code: str | None,
        detail: str,
    ) -> None:
        await self._audit.record(self._event(principal, ctx, action, outcome, state, code, detail))

    def _check_params(self, params: Sequence[Any]) -> None:
        if len(params) > self._max_params:
            raise InvalidParameters(
                f"{len(params)} parameters exceed the limit of {self._max_params}"
            )

    @contextlib.asynccontextmanager
    async def _session(
        self,
        tenant: TenantRecord,
        ctx: TenantContext,
        *,
        readonly: bool,
        transaction: bool,
        isolation: Isolation = "read_committed",
        workload: Workload = "oltp",
        replica: Replica | None = None,
    ) -> AsyncIterator[_Session]:
        """A tenant connection under the tenant's time limits, in a transaction when asked
        (always for a read-only caller, and with a user id, whose context is the transaction's
        first statement); otherwise a statement begins one only if it needs it.

        A pooled connection that PostgreSQL ended while it sat idle (a failover, an operator's
        pg_terminate_backend) is only found dead when used. When that first use is BEGIN, which
        has no effect, the session is retried once on another connection instead of failing
        (the query core retries a repeatable read's first round trip the same way)."""
        login = self._login(tenant, ctx)
        pools, deadlines = self._pools, self._deadlines
        if replica is not None:
            assert replica.pools is not None and replica.deadlines is not None
            pools, deadlines = replica.pools, replica.deadlines
        # A failover ends every pooled connection: each attempt meets (and drops) one of them.
        attempts = pools.max_per_tenant + 1
        with postgres_errors(ctx.tenant_id):
            for attempt in range(attempts):
                retry = attempt < attempts - 1
                async with pools.acquire(login, workload) as conn:
                    watch = self._watch(deadlines, conn, login, tenant, workload)
                    try:
                        session = _Session(
                            conn, watch, ctx.tenant_id, readonly=readonly, isolation=isolation
                        )
                        if transaction or readonly or login.user_scoped:
                            try:
                                await session.begin()
                            except Exception as exc:
                                if not (retry and postgres_unreachable(exc)):
                                    raise
                                # Released as closed rather than reset over a dead socket.
                                with contextlib.suppress(asyncpg.InterfaceError):
                                    conn.terminate()
                                continue
                        try:
                            if login.user_scoped:
                                with watch.statement():
                                    await conn.execute(
                                        self._enter_user, ctx.user_id, self._user_key
                                    )
                            yield session
                        except BaseException as exc:
                            if exc.__class__ is asyncio.CancelledError:
                                watch.given_up()
                            if session.began and watch.expired is None and not conn.is_closed():
                                with contextlib.suppress(Exception):
                                    await session.rollback()
                            if _outdated(exc):
                                # Every connection of the tenant drops its kept statements
                                # when next used: the retry, wherever it runs, prepares afresh.
                                self._schema_changed(ctx.tenant_id)
                            raise
                        await session.commit()
                        if session.stateless and not session.began and not login.user_scoped:
                            cast(TenantConnection, conn).skip_next_reset()
                    finally:
                        watch.close()
                    return

    def _watch(
        self,
        deadlines: Deadlines,
        conn: Connection,
        login: TenantLogin,
        tenant: TenantRecord,
        workload: Workload,
    ) -> SessionWatch:
        """The time limits of a session on ``conn``: the tenant's (or the workload's) statement
        limit, and the whole session's (the transaction's, if longer)."""
        statement_ms = tenant.limits.statement_timeout_ms
        if workload != "oltp":
            statement_ms = self._workload_ms.get(workload, statement_ms)
        statement_seconds = statement_ms / 1000
        return deadlines.watch(
            conn,
            login.role,
            statement_seconds=statement_seconds,
            total_seconds=max(statement_seconds, self._transaction_seconds),
        )

    def _attempts(self) -> list[bool]:
        """Whether each attempt is the last: a statement refused as outdated, or a read that
        met a dead pooled connection, is tried again (as many times as the pool has
        connections a failover may have ended)."""
        return [False] * self._pools.max_per_tenant + [True]

    async def _begin_statement(
        self,
        session: _Session,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
        *,
        first_rows: bool = True,
    ) -> tuple[PreparedStatement, Sequence[Any], list[Column], bool, tuple[Rows, str] | None]:
        """The statement prepared, its parameters bound, its columns, whether it is a read
        returning rows, and — for a repeatable read whose result is small — its rows and tag,
        in one round trip (a larger result is read again, whole, by cursor). ``first_rows``
        False: a read always goes by cursor (its rows reach the caller as PostgreSQL makes
        them)."""
        stmt = await self._prepare(session, sql)
        types, shape = self._shapes.of(stmt)
        args = coerce_params(params, types)
        columns = list(shape)
        reading = verdict.kind is StatementKind.READ and bool(columns)
        first = None
        if reading and verdict.repeatable and first_rows:
            first = await self._first_rows(session, stmt, args)
        # Only a session's first statement counts: one that ran another keeps its reset.
        session.stateless = first is not None and not session.began and not session.ran
        session.ran = True
        return stmt, args, columns, reading, first

    async def _first_rows(
        self, session: _Session, stmt: PreparedStatement, args: Sequence[Any]
    ) -> tuple[Rows, str] | None:
        """A repeatable read in one round trip: its rows and command tag when they fit in the
        first ``_FIRST_ROWS``, else None (to be read again, whole, by cursor)."""
        try:
            with session.watch.statement():
                rows, status, complete = await fetch_first(stmt, args, _FIRST_ROWS)
        except Exception as exc:
            if not postgres_unreachable(exc):
                raise
            # A pooled connection PostgreSQL ended while it sat idle: nothing ran.
            with contextlib.suppress(asyncpg.InterfaceError):
                session.conn.terminate()
            raise _DeadConnection(str(exc)) from exc
        return (cast(Rows, rows), status) if complete else None

    async def execute(
        self,
        principal: Principal,
        ctx: TenantContext,
        sql: str,
        params: Sequence[Any] = (),
        *,
        action: str = "query",
        cache: CacheOptions | None = None,
        replay_key: ReplayKey | None = None,
        checked: Checked | None = None,
        check_key: CheckedKey | None = None,
    ) -> QueryResult:
        """One statement, whole result (bounded by ``max_result_rows``). ``cache``: the result
        cache's options for a read (``query.caching``); an answer from the cache comes back
        already encoded (``QueryResult.payload``). ``replay_key``: what the caller sent, when
        its front end asks ``replay`` first (a cached read is then kept for it).
        ``checked``: what ``checked`` gave back for this caller and text (the checks are not
        made again); ``check_key``: what the caller sent, when its front end asks ``checked``
        first (what the checks establish is then kept for it)."""
        started = time.perf_counter()
        async with self._audited(principal, ctx, action) as outcome:
            self._check_params(params)
            if checked is not None:
                tenant, verdict = checked.tenant, checked.verdict
            else:
                # Read first: DDL while the checks run leaves what they found unkept.
                checked_at = self._schema_generations.get(ctx.tenant_id, 0)
                tenant, verdict = await self.authorize(principal, ctx, sql)
                if check_key is not None and self._spans is None:
                    self._checked.keep(
                        check_key, Checked(principal, tenant, ctx, verdict, checked_at)
                    )
            outcome.kind = verdict.kind
            outcome.verdict = verdict
            readonly = not principal.has_scope(Scope.WRITE)
            workload = _workload_of(action)
            caching = self._caching
            if caching is not None and cache is not None and verdict.kind is StatementKind.READ:

                async def load() -> QueryResult:
                    # From the primary: a replica's older view, once cached, would be served
                    # past the replica's lag bound (until the TTL or the next write).
                    return await self._run(
                        tenant,
                        ctx,
                        verdict,
                        sql,
                        params,
                        readonly=readonly,
                        workload=workload,
                        replica_ok=False,
                    )

                generation = self._schema_generations.get(tenant.tenant_id, 0)
                planned = None
                if replay_key is not None and action == "query" and self._spans is None:

                    def planned(plan: ReadPlan) -> None:
                        text = sys.intern(sql)  # as the kept plan's key holds it (shared_texts)
                        kept = Replay(
                            principal, tenant, ctx, verdict, generation, text, params, plan
                        )
                        self._replays.keep(replay_key, kept)

                result = await caching.read(
                    tenant, ctx.user_id, sql, params, cache, generation, load, planned
                )
            else:
                result = await self._run(
                    tenant, ctx, verdict, sql, params, readonly=readonly, workload=workload
                )
                if caching is not None and verdict.kind is not StatementKind.READ:
                    generation = self._schema_generations.get(tenant.tenant_id, 0)
                    await caching.written(
                        tenant, sql, params, generation, ddl=verdict.kind is StatementKind.DDL
                    )
            result.duration_ms = (time.perf_counter() - started) * 1000
            if self._statements is not None:
                hit = result.cache is not None and result.cache.status == "hit"
                # Recorded once the answer is on its way, with the audit event (_Audited).
                outcome.statistics = (
                    tenant, verdict, sql, params, result.duration_ms, result.row_count, hit
                )  # fmt: skip
            outcome.command = result.command or _FROM_CACHE
            return result

    def checked(self, principal: Principal, key: CheckedKey) -> Checked | None:
        """What ``execute``'s checks established for ``key`` (its caller's credential, headers
        and statement text) before, while it all still holds as ``authorize`` would find it
        now: the credential verified to the same principal object, the tenant's cached record
        the same and active, its schema generation unchanged. None: ``authorize`` decides."""
        entry = self._checked.get(key)
        if entry is None:
            return None
        if not self._still_holds(entry, principal):
            self._checked.drop(key)
            return None
        return entry

    def _still_holds(self, entry: Checked, principal: Principal) -> bool:
        """What the checks established for ``entry`` is what ``authorize`` would find now for
        ``principal``: the same principal object, the tenant's cached record the same and
        active, its schema generation unchanged."""
        tenant_id = entry.tenant.tenant_id
        return (
            entry.principal is principal
            and self._registry.known_active(tenant_id) is entry.tenant
            and self._schema_generations.get(tenant_id, 0) == entry.schema_generation
        )

    def replay(self, principal: Principal, key: ReplayKey) -> Replayed | None:
        """A cached read ``execute`` answered for ``key`` before, answered again from L1 when
        every check it passed still holds as ``execute`` would find it now (``query.replays``),
        audited and counted as ``execute`` does; None: ``execute`` it."""
        entry = self._replays.get(key)
        if entry is None:
            return None
        started = time.perf_counter()
        tenant = entry.tenant
        tenant_id = tenant.tenant_id
        if not self._still_holds(entry, principal):
            self._replays.drop(key)
            return None
        if self._audit.backlogged or self._caching is None:
            return None  # execute waits for the audit writer (back-pressure)
        hit = self._caching.replayed(tenant_id, entry.plan)
        if hit is None:
            return None
        duration_ms = (time.perf_counter() - started) * 1000
        verdict = entry.verdict
        statistics = (tenant, verdict, entry.sql, entry.params, duration_ms, 0, True)
        self._replays_unbooked += 1
        self._book(
            principal, entry.ctx, "query", _Outcome(verdict.kind, _FROM_CACHE, verdict, statistics)
        )
        return Replayed(hit.payload, duration_ms, hit.age_s() * 1000)

    def _book(
        self, principal: Principal, ctx: TenantContext, action: str, outcome: _Outcome
    ) -> None:
        """An operation that succeeded, booked (``book``) with the others answered within
        ``_BOOKS_S``."""
        books = self._books
        if not books:
            self._running_loop().call_later(_BOOKS_S, self.book)
        books.append((principal, ctx, action, outcome, time.time()))

    def book(self) -> None:
        """Count, add to the statistics and audit the operations answered and not booked yet:
        together, once their answers are on their way (also when the audit log flushes or
        closes, so none is left out)."""
        books, self._books = self._books, []
        if self._replays_unbooked:
            self._metrics.cache_replays.inc(self._replays_unbooked)
            if self._caching is not None:  # a replay is one (it exists only with a cache)
                self._caching.replays_booked(self._replays_unbooked)
            self._replays_unbooked = 0
        # ``_succeeded`` and the audit event for each, with each counter added to once (this
        # runs for every operation).
        statements, record, event = self._statements, self._audit.record_nowait, self._event
        kinds: dict[StatementKind, int] = {}
        for principal, ctx, action, outcome, at in books:
            if outcome.statistics is not None and statements is not None:
                statements.done(*outcome.statistics)
            if outcome.kind is not None:
                kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
            record(event(principal, ctx, action, outcome, code=outcome.command, at=at))
        for kind, count in kinds.items():
            self._statement_counter(kind).inc(count)

    def caches_by_rule(self, tenant_id: str) -> bool:
        """The tenant has result cache rules: its reads go through the cache even when the
        caller did not ask (a front end's fast path skips it otherwise)."""
        return self._caching is not None and self._caching.rules.has_rules(tenant_id)

    async def _run(
        self,
        tenant: TenantRecord,
        ctx: TenantContext,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
        *,
        readonly: bool,
        workload: Workload = "oltp",
        replica_ok: bool = True,
    ) -> QueryResult:
        replica = self._replica_for(tenant, ctx, verdict) if replica_ok else None
        if (
            replica is None
            and workload == "oltp"
            and not readonly
            and ctx.user_id is None
            and self._spans is None
            and _pure_read(verdict)
        ):
            direct = await self._direct(tenant, sql, params)
            if direct is not None:
                return direct
        if replica is not None:
            assert self._replicas is not None
            try:
                result = await self._attempted(
                    tenant, ctx, verdict, sql, params, readonly, workload, replica
                )
            except (Unavailable, QueryError) as exc:
                if not _replica_may_fail(exc):
                    raise
                self._replicas.failed(replica, exc)  # the primary answers instead
            else:
                replica.reads += 1
                return result
        result = await self._attempted(tenant, ctx, verdict, sql, params, readonly, workload)
        if not _pure_read(verdict):
            self._wrote(tenant.tenant_id)
        return result

    async def _direct(
        self, tenant: TenantRecord, sql: str, params: Sequence[Any]
    ) -> QueryResult | None:
        """A pure read of a caller with neither user id nor read-only scope, on its own login:
        what ``_attempted`` does for it, flat — the connection, its kept statement, one round
        trip, the connection back — where the session's layers (attempts, a session context,
        a transaction that such a read never opens) cost ~10% of a PK lookup's CPU
        (2026-12-05, ``bench/query_cpu.py``, concurrency 32). None, having run nothing that
        counts, when the whole way must answer instead: the statement is not kept on that
        connection yet (the whole way prepares it), the connection was found dead or the
        statement outdated (the whole way retries), or the result is more than the first rows
        (the whole way reads it by cursor; a pure read runs again to the same effect)."""
        tenant_id = tenant.tenant_id
        login = self._logins.login(tenant, user_scoped=False)
        with postgres_errors(tenant_id):
            async with self._pools.acquire(login) as conn:
                # Nothing but this pure read runs on the connection: no reset is due for it,
                # whether it answers or hands over to the whole way (which takes a connection
                # of its own).
                tenant_conn = cast(TenantConnection, conn)
                stmt = cached_statement(conn, sql, self._schema_generations.get(tenant_id, 0))
                if stmt is None:
                    tenant_conn.skip_next_reset()
                    return None
                types, columns = self._shapes.of(stmt)
                args = coerce_params(params, types)
                watch = self._watch(self._deadlines, conn, login, tenant, "oltp")
                try:
                    with watch.statement():
                        rows, status, complete = await fetch_first(stmt, args, _FIRST_ROWS)
                except asyncio.CancelledError:
                    watch.given_up()
                    raise
                except Exception as exc:
                    if postgres_unreachable(exc):
                        # Ended by PostgreSQL while it sat idle: nothing ran.
                        with contextlib.suppress(asyncpg.InterfaceError):
                            conn.terminate()
                        return None
                    if _outdated(exc):
                        self._schema_changed(tenant_id)
                        tenant_conn.skip_next_reset()
                        return None
                    raise
                finally:
                    watch.close()
                tenant_conn.skip_next_reset()
                if not complete:
                    return None
        self._check_size(len(rows), approximate_bytes(cast(Rows, rows), columns))
        return QueryResult(
            columns=list(columns),
            rows=cast(Rows, rows),
            command=status,
            row_count=len(rows),
            kind=StatementKind.READ,
            duration_ms=0.0,
        )

    async def _attempted(
        self,
        tenant: TenantRecord,
        ctx: TenantContext,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
        readonly: bool,
        workload: Workload,
        replica: Replica | None = None,
    ) -> QueryResult:
        for last in self._attempts():
            try:
                async with self._session(
                    tenant,
                    ctx,
                    readonly=readonly,
                    transaction=False,
                    workload=workload,
                    replica=replica,
                ) as session:
                    return await self._statement(session, verdict, sql, params)
            except _RETRIED:
                if last:
                    raise
        raise AssertionError("the last attempt raises")  # for the type checker

    def _replica_for(
        self, tenant: TenantRecord, ctx: TenantContext, verdict: Classification
    ) -> Replica | None:
        """A replica for a pure read of a caller without a user id (the user's context is
        entered on the primary's sessions), when one may answer now."""
        if self._replicas is None or ctx.user_id is not None or not _pure_read(verdict):
            return None
        return self._replicas.choose(tenant.tenant_id)

    def _wrote(self, tenant_id: str) -> None:
        """A write of the tenant's committed on the primary (read your writes)."""
        if self._replicas is not None:
            self._replicas.wrote(tenant_id)

    async def stream(
        self,
        principal: Principal,
        ctx: TenantContext,
        sql: str,
        params: Sequence[Any] = (),
        *,
        batch_rows: int = 500,
        read_only: bool = False,
        own_sql: bool = False,
        first_rows: bool = True,
        action: str = "query.stream",
    ) -> AsyncGenerator[Event, None]:
        """One statement, streamed: a Header, batches of rows, a Summary.

        Reads go through a server-side cursor, so neither side holds the whole result; the
        connection is held until the consumer finishes or stops (cancellation releases it and
        cancels the statement in PostgreSQL).

        ``own_sql``: the text is the service's own (time-series reads), a read the guard still
        checks, so a read-only caller needs no READ ONLY transaction around it: that
        transaction guards a caller's SQL (functions that write), and costs two round trips.

        ``first_rows`` False: a read goes by cursor even when its result is small, each batch
        forwarded as PostgreSQL makes it — for a result of few rows that each take PostgreSQL
        long to make (candles packed by part), so the caller reads one while the next is made."""
        started = time.perf_counter()
        async with self._audited(principal, ctx, action) as outcome:
            self._check_params(params)
            tenant, verdict = await self.authorize(principal, ctx, sql)
            outcome.kind = verdict.kind
            outcome.verdict = verdict
            if read_only and verdict.kind is not StatementKind.READ:
                raise SqlRejected("this operation runs read-only statements only", sqlstate="25006")
            readonly = read_only or not principal.has_scope(Scope.WRITE)
            if own_sql and verdict.kind is StatementKind.READ and verdict.repeatable:
                readonly = False
            replica = self._replica_for(tenant, ctx, verdict)
            attempts = self._attempts()
            if replica is not None:
                attempts = [False, *attempts]  # the replica's, then the primary's as ever
            for last in attempts:
                # The header goes out once the statement is bound: a kept statement whose
                # tables changed is refused at Bind, and retried while nothing has been sent.
                sent = False
                try:
                    async with (
                        self._session(
                            tenant,
                            ctx,
                            readonly=readonly,
                            transaction=False,
                            workload=_workload_of(action),
                            replica=replica,
                        ) as session,
                        self._streamed_statement_span(tenant.tenant_id, verdict, sql),
                    ):
                        watch = session.watch
                        stmt, args, columns, reading, first = await self._begin_statement(
                            session, verdict, sql, params, first_rows=first_rows
                        )
                        if first is not None:
                            rows, command = first
                            sent = True
                            yield Header(columns, verdict.kind)
                            for i in range(0, len(rows), batch_rows):
                                yield rows[i : i + batch_rows]
                            row_count = len(rows)
                        elif reading:
                            await session.begin()
                            # Each fetch is a round trip under the statement limit; the
                            # reader's time between fetches counts against the session's
                            # limit only.
                            count = 0
                            with watch.statement():
                                cursor = await stmt.cursor(*args)
                            sent = True
                            yield Header(columns, verdict.kind)
                            while True:
                                with watch.statement():
                                    batch = await cursor.fetch(batch_rows)
                                if batch:
                                    count += len(batch)
                                    yield cast(Rows, batch)
                                if len(batch) < batch_rows:
                                    break
                            command = f"SELECT {count}"
                            row_count = count
                        else:
                            with watch.statement():
                                rows = cast(Rows, await stmt.fetch(*args))
                            if verdict.kind is StatementKind.DDL:
                                self._schema_changed(tenant.tenant_id)
                            sent = True
                            yield Header(columns, verdict.kind)
                            for i in range(0, len(rows), batch_rows):
                                yield rows[i : i + batch_rows]
                            command = stmt.get_statusmsg() or ""
                            row_count = _row_count(command, len(rows))
                    if replica is not None:
                        replica.reads += 1
                    break
                except _RETRIED:
                    if sent or last:
                        raise
                except (Unavailable, QueryError) as exc:
                    if replica is None or sent or not _replica_may_fail(exc):
                        raise
                    assert self._replicas is not None
                    self._replicas.failed(replica, exc)  # the primary answers instead
                    replica = None
            if not _pure_read(verdict):
                self._wrote(tenant.tenant_id)
            outcome.command = command
            duration_ms = (time.perf_counter() - started) * 1000
            if self._statements is not None:
                # A stream's time runs to its last row: the reader's pace is part of it.
                self._statements.done(tenant, verdict, sql, params, duration_ms, row_count)
            yield Summary(row_count, command, duration_ms, verdict.kind)

    async def transaction(
        self,
        principal: Principal,
        ctx: TenantContext,
        statements: Sequence[tuple[str, Sequence[Any]]],
        *,
        isolation: Isolation = "read_committed",
        read_only: bool = False,
        before_commit: Callable[[OwnSession], Awaitable[None]] | None = None,
    ) -> TransactionResult:
        """Several statements, all or nothing; every one is checked before BEGIN.

        ``before_commit`` runs the service's own SQL in the transaction after the last statement
        (the multi-store operation records its outbox entries there and, through
        ``JOINED_SESSION``, writes the stores that live in this PostgreSQL: they commit with the
        statements or not at all); it arms the statement limit around each of its round trips,
        and may run twice when the transaction is retried whole."""
        started = time.perf_counter()
        async with self._audited(principal, ctx, "transaction") as outcome:
            if not statements:
                raise InvalidParameters("a transaction needs at least one statement")
            verdicts = []
            tenant = None
            for index, (sql, params) in enumerate(statements, start=1):
                self._check_params(params)
                try:
                    tenant, verdict = await self.authorize(principal, ctx, sql)
                except DatabaseServiceError as exc:
                    exc.message = f"statement {index}: {exc.message}"
                    raise
                verdicts.append(verdict)
            assert tenant is not None
            outcome.kind = max((v.kind for v in verdicts), key=_KIND_ORDER.index)
            readonly = read_only or not principal.has_scope(Scope.WRITE)
            joined: OwnSession | None = None
            for last in (False, True):
                results: list[QueryResult] = []
                try:
                    async with self._session(
                        tenant, ctx, readonly=readonly, transaction=True, isolation=isolation
                    ) as session:
                        for index, ((sql, params), verdict) in enumerate(
                            zip(statements, verdicts, strict=True), start=1
                        ):
                            began = time.perf_counter()
                            try:
                                with postgres_errors(ctx.tenant_id):
                                    result = await self._statement(session, verdict, sql, params)
                                results.append(result)
                            except DatabaseServiceError as exc:
                                if self._statements is not None:
                                    self._statements.failed(ctx.tenant_id, verdict)
                                exc.message = f"statement {index}: {exc.message}"
                                raise
                            if self._statements is not None:
                                took_ms = (time.perf_counter() - began) * 1000
                                self._statements.done(
                                    tenant, verdict, sql, params, took_ms, result.row_count
                                )
                        if before_commit is not None:
                            joined = OwnSession(tenant, session.conn, session.watch)
                            with postgres_errors(ctx.tenant_id):
                                await before_commit(joined)
                    break
                except StatementOutdated:
                    # Rolled back whole; every statement runs again, prepared afresh.
                    if last:
                        raise
            if self._caching is not None:
                if joined is not None:
                    for relation in joined.written:
                        await self._caching.written_table(tenant, relation)
                generation = self._schema_generations.get(tenant.tenant_id, 0)
                for (sql, params), verdict in zip(statements, verdicts, strict=True):
                    if verdict.kind is not StatementKind.READ:
                        await self._caching.written(
                            tenant, sql, params, generation, ddl=verdict.kind is StatementKind.DDL
                        )
            if not all(_pure_read(v) for v in verdicts):
                self._wrote(tenant.tenant_id)
            outcome.command = f"{len(results)} statements"
            return TransactionResult(results, (time.perf_counter() - started) * 1000)

    @contextlib.asynccontextmanager
    async def own_session(
        self, principal: Principal, ctx: TenantContext, *, action: str, kind: StatementKind
    ) -> AsyncIterator[OwnSession]:
        """A transaction on the tenant's own login for SQL the service wrote itself (stores
        built on PostgreSQL, such as vector collections), with what every statement gets:
        the scope of ``kind`` checked (read, write, DDL → admin) for an active tenant, the
        tenant's time limits, READ ONLY for a reader, audit and counts as ``action``. The
        caller quotes every name it puts in its SQL; the session runs as the company (no user
        id: these objects are the company's, as DDL is).

        A read by a caller that may write runs without a transaction (its one statement in one
        round trip; the caller opens one if it needs it); a read-only caller's reads run READ
        ONLY, so that nothing a tenant's administrator defined (a view in place of a table)
        writes for it. ``stateless``, set by the caller when it changed no session state, spares
        the connection's reset on release."""
        async with self._audited(principal, ctx, action) as outcome:
            principal.require(_REQUIRED_SCOPE[kind], ctx.tenant_id)
            tenant = await self._registry.get_active(ctx.tenant_id)
            outcome.kind = kind
            readonly = not principal.has_scope(Scope.WRITE)
            async with self._session(
                tenant,
                TenantContext(ctx.tenant_id),
                readonly=readonly,
                transaction=kind is not StatementKind.READ,
            ) as session:
                own = OwnSession(tenant, session.conn, session.watch)
                yield own
                session.stateless = own.stateless
            outcome.command = own.command
            if kind is StatementKind.DDL:
                self._schema_changed(tenant.tenant_id)
            if kind is not StatementKind.READ:
                if self._caching is not None:
                    for relation in own.written:
                        await self._caching.written_table(tenant, relation)
                self._wrote(tenant.tenant_id)

    async def bulk_insert(
        self,
        principal: Principal,
        ctx: TenantContext,
        table: str,
        columns: Sequence[str],
        batches: AsyncIterator[Sequence[Sequence[Any]]],
    ) -> int:
        """Rows into a table by binary COPY, in one transaction: a bad row writes nothing.

        A table under row-level security (the shared tables) cannot be the target of COPY, so
        rows go by COPY into a staging table in the tenant's schema, then INSERT … SELECT, which
        RLS checks row by row."""
        started = time.perf_counter()
        async with self._audited(principal, ctx, "bulk_insert") as outcome:
            tenant = await self._bulk_tenant(principal, ctx)
            outcome.kind = StatementKind.WRITE
            async with self._session(
                tenant, ctx, readonly=False, transaction=True, workload="bulk"
            ) as session:
                conn, watch = session.conn, session.watch
                with watch.statement():
                    target = await self._target(conn, tenant, table, columns)
                if self._statements is not None:
                    outcome.verdict = self._statements.bulk("BULK INSERT", target.name, columns)
                records = self._records(target, columns, batches)
                # COPY runs as long as the caller streams rows: bounded by the session's limit.
                if not target.rls:
                    status = await _copy(
                        conn, tenant.tenant_id, target.schema, target.name, columns, records
                    )
                else:
                    stage = await self._stage(conn, tenant, target, columns, records)
                    cols = ", ".join(quote_ident(c) for c in columns)
                    with watch.statement():
                        status = await conn.execute(
                            f"INSERT INTO {target.qualified} ({cols}) SELECT {cols} FROM {stage}"
                        )
                        await conn.execute(f"DROP TABLE {stage}")
            if self._caching is not None:
                await self._caching.written_table(tenant, f"{target.schema}.{target.name}")
            self._wrote(tenant.tenant_id)
            written = _row_count(status, 0)
            if outcome.verdict is not None and self._statements is not None:
                took_ms = (time.perf_counter() - started) * 1000
                self._statements.done(tenant, outcome.verdict, "", (), took_ms, written)
            outcome.command = f"BULK INSERT {written}"
            return written

    async def bulk_update(
        self,
        principal: Principal,
        ctx: TenantContext,
        table: str,
        key_columns: Sequence[str],
        columns: Sequence[str],
        batches: AsyncIterator[Sequence[Sequence[Any]]],
    ) -> int:
        """Keyed updates: COPY into a staging table, then one UPDATE … FROM, all or nothing.

        Each row holds the key values, then the new values. The staging table is an unlogged
        table in the tenant's own schema, created and dropped inside the transaction (tenants
        have no TEMP privilege, so no temporary object can outlive a request)."""
        started = time.perf_counter()
        async with self._audited(principal, ctx, "bulk_update") as outcome:
            tenant = await self._bulk_tenant(principal, ctx)
            outcome.kind = StatementKind.WRITE
            if not key_columns or not columns:
                raise InvalidParameters("bulk update needs key columns and columns to set")
            if set(key_columns) & set(columns):
                raise InvalidParameters("a column cannot be both a key and a column to set")
            all_columns = [*key_columns, *columns]
            async with self._session(
                tenant, ctx, readonly=False, transaction=True, workload="bulk"
            ) as session:
                conn, watch = session.conn, session.watch
                with watch.statement():
                    target = await self._target(conn, tenant, table, all_columns)
                if self._statements is not None:
                    outcome.verdict = self._statements.bulk("BULK UPDATE", target.name, columns)
                records = self._records(target, all_columns, batches)
                stage = await self._stage(conn, tenant, target, all_columns, records)
                sets = ", ".join(f"{quote_ident(c)} = s.{quote_ident(c)}" for c in columns)
                keys = " AND ".join(f"t.{quote_ident(c)} = s.{quote_ident(c)}" for c in key_columns)
                with watch.statement():
                    status = await conn.execute(
                        f"UPDATE {target.qualified} AS t SET {sets} FROM {stage} AS s WHERE {keys}"
                    )
                    await conn.execute(f"DROP TABLE {stage}")
            if self._caching is not None:
                await self._caching.written_table(tenant, f"{target.schema}.{target.name}")
            self._wrote(tenant.tenant_id)
            updated = _row_count(status, 0)
            if outcome.verdict is not None and self._statements is not None:
                took_ms = (time.perf_counter() - started) * 1000
                self._statements.done(tenant, outcome.verdict, "", (), took_ms, updated)
            outcome.command = f"BULK UPDATE {updated}"
            return updated

    async def _bulk_tenant(self, principal: Principal, ctx: TenantContext) -> TenantRecord:
        principal.require(Scope.WRITE, ctx.tenant_id)
        if ctx.user_id is not None and not _USER_ID.fullmatch(ctx.user_id):
            raise InvalidParameters(
                "user_id must be 1-50 characters of letters, digits and _ . @ : + -"
            )
        return await self._registry.get_active(ctx.tenant_id)

    async def _target(
        self, conn: Connection, tenant: TenantRecord, table: str, columns: Sequence[str]
    ) -> _Target:
        """Resolve a bulk target the tenant may write: its own schema or the shared one."""
        parts = table.split(".")
        if not 1 <= len(parts) <= 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
            raise InvalidParameters(
                "table must be 'name' or 'schema.name' in lower-case identifiers,"
                f" not {table!r:.80}"
            )
        allowed = {tenant.schema_name, *self._shared}
        if len(parts) == 2 and parts[0] not in allowed:
            raise PermissionDenied(f"tables of schema {parts[0]} are not yours to write")
        for column in columns:
            if not _IDENTIFIER.fullmatch(column):
                raise InvalidParameters(f"invalid column name {column!r:.80}")
        if len(set(columns)) != len(columns) or not columns:
            raise InvalidParameters("columns must be given once each")
        with postgres_errors(tenant.tenant_id):
            rel = await conn.fetchrow(
                "SELECT n.nspname, c.relname, c.oid, c.relrowsecurity FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
                ".".join(quote_ident(p) for p in parts),
            )
        if rel is None or rel["nspname"] not in allowed:
            raise NotFound(f"table {table!r} does not exist")
        types = {
            r["attname"]: PgType(r["typname"], "array" if r["typcategory"] == "A" else "scalar")
            for r in await conn.fetch(
                "SELECT a.attname, t.typname, t.typcategory FROM pg_attribute a"
                " JOIN pg_type t ON t.oid = a.atttypid"
                " WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
                rel["oid"],
            )
        }
        unknown = [c for c in columns if c not in types]
        if unknown:
            raise InvalidParameters(f"table {table!r} has no column {', '.join(unknown)}")
        return _Target(rel["nspname"], rel["relname"], types, rel["relrowsecurity"])

    async def _records(
        self,
        target: _Target,
        columns: Sequence[str],
        batches: AsyncIterator[Sequence[Sequence[Any]]],
    ) -> AsyncIterator[Sequence[Any]]:
        types = [target.types[c] for c in columns]
        number = 1
        async for batch in batches:
            for row in coerce_rows(batch, types, columns, number):
                yield row
            number += len(batch)

    async def _stage(
        self,
        conn: Connection,
        tenant: TenantRecord,
        target: _Target,
        columns: Sequence[str],
        records: AsyncIterator[Sequence[Any]],
    ) -> str:
        name = f"_dbsvc_stage_{secrets.token_hex(6)}"
        cols = ", ".join(quote_ident(c) for c in columns)
        with postgres_errors(tenant.tenant_id):
            await conn.execute(
                f"CREATE UNLOGGED TABLE {quote_ident(tenant.schema_name)}.{quote_ident(name)}"
                f" AS SELECT {cols} FROM {target.qualified} WITH NO DATA"
            )
        await _copy(conn, tenant.tenant_id, tenant.schema_name, name, columns, records)
        return f"{quote_ident(tenant.schema_name)}.{quote_ident(name)}"

    def _statement_span(
        self, tenant_id: str, verdict: Classification, sql: str, *, current: bool = True
    ) -> SpanScope:
        """The span of one statement (traces on), from prepare to its last row. asyncpg's spans
        of the driver calls it makes are its children (a whole result's), or its siblings (a
        stream's); the one round trip of a small read (``fetch_first``) has none, asyncpg's
        instrumentation does not see it. The text, never the parameters."""
        assert self._spans is not None
        attributes = {
            TENANT_ID: tenant_id,
            DB_SYSTEM: POSTGRESQL,
            STATEMENT_CLASS: verdict.kind.value,
            DB_OPERATION: verdict.tag,
            DB_STATEMENT: sql,
        }
        return self._spans.scope(STATEMENT, attributes, kind="client", current=current)

    def _streamed_statement_span(
        self, tenant_id: str, verdict: Classification, sql: str
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A streamed statement's span, not made current: the stream yields to its reader."""
        if self._spans is None:
            return _NO_SPAN
        return self._statement_span(tenant_id, verdict, sql, current=False)

    async def _statement(
        self,
        session: _Session,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
    ) -> QueryResult:
        if self._spans is None:
            return await self._whole_result(session, verdict, sql, params)
        with self._statement_span(session.tenant_id, verdict, sql):
            return await self._whole_result(session, verdict, sql, params)

    async def _whole_result(
        self,
        session: _Session,
        verdict: Classification,
        sql: str,
        params: Sequence[Any],
    ) -> QueryResult:
        """One statement, whole result, bounded by ``max_result_rows`` and ``max_result_bytes``.

        A repeatable read takes one round trip when its result is small.
        A larger read is read by cursor, chunk by chunk, so a result past a limit is refused
        having held about the limit, not the result. A write that returns rows runs in a
        transaction, so one refused for its size changes nothing."""
        watch = session.watch
        stmt, args, columns, reading, first = await self._begin_statement(
            session, verdict, sql, params
        )
        rows: Rows
        if first is not None:
            rows, status = first
            self._check_size(len(rows), approximate_bytes(rows, columns))
        elif reading:
            await session.begin()
            rows = await self._read_bounded(session, stmt, args, columns)
            status = f"SELECT {len(rows)}"
        else:
            if columns:
                await session.begin()
            with watch.statement():
                rows = cast(Rows, await stmt.fetch(*args))
            status = stmt.get_statusmsg() or ""
            if columns:
                self._check_size(len(rows), approximate_bytes(rows, columns))
        if verdict.kind is StatementKind.DDL:
            self._schema_changed(session.tenant_id)
        return QueryResult(
            columns=columns,
            rows=rows,  # asyncpg's Records are sequences
            command=status,
            row_count=_row_count(status, len(rows)),
            kind=verdict.kind,
            duration_ms=0.0,
        )

    async def _read_bounded(
        self,
        session: _Session,
        stmt: PreparedStatement,
        args: Sequence[Any],
        columns: Sequence[Column],
    ) -> Rows:
        watch = session.watch
        with watch.statement():
            cursor = await stmt.cursor(*args)
        rows: list[Any] = []
        size = 0
        wanted = _FIRST_ROWS
        while True:
            with watch.statement():
                batch = await cursor.fetch(wanted)
            rows.extend(batch)
            batch_bytes = approximate_bytes(cast(Rows, batch), columns)
            size += batch_bytes
            self._check_size(len(rows), size)
            if len(batch) < wanted:
                return rows
            # About a megabyte a fetch: wide rows in small batches, so that a result past the
            # byte limit is refused having held little more than the limit.
            per_row = max(1, batch_bytes // len(batch))
            wanted = max(16, min(_FIRST_ROWS, _FETCH_BYTES // per_row))

    def _check_size(self, rows: int, size: int) -> None:
        if rows > self._max_rows:
            raise ResultTooLarge(
                f"the result has more than {self._max_rows} rows; add a LIMIT or use the "
                "streaming gRPC API"
            )
        if size > self._max_bytes:
            raise ResultTooLarge(
                f"the result is larger than {self._max_bytes} bytes; add a LIMIT, select fewer"
                " columns or use the streaming gRPC API"
            )


_COPY_LINE = re.compile(r"COPY \S+, line (\d+)")


async def _copy(
    conn: Connection,
    tenant_id: str,
    schema: str,
    table: str,
    columns: Sequence[str],
    records: AsyncIterator[Sequence[Any]],
) -> str:
    """Binary COPY of records; a failing row is named in the error (PostgreSQL says 'line N')."""
    try:
        with postgres_errors(tenant_id):
            return await conn.copy_records_to_table(
                table, schema_name=schema, columns=list(columns), records=records
            )
    except QueryError as exc:
        context = getattr(exc.__cause__, "context", None) or ""
        match = _COPY_LINE.search(context)
        if match:
            exc.message = f"row {match.group(1)}: {exc.message}"
        raise
