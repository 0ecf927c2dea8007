"""The audit log: who did what for which tenant, and how it ended.

Events are queued and written in batches with COPY by one background task, so auditing adds no
round trip to a request. The queue is bounded: when PostgreSQL cannot keep up, ``record`` waits
(backpressure). A batch that PostgreSQL refuses or cannot receive (it is down) is dropped and
counted in ``dbsvc_audit_write_failures_total``, not retried. While PostgreSQL is unreachable the
writer tries it again at most every ``retry_interval`` seconds and drops the batches in between,
so the queue keeps draining (requests never wait on a dead database), and the log gets one line
when the outage starts and one when writes work again, not one per batch. ``__aexit__`` flushes
the queue.

Details are redacted when an event is made (``redact``): error messages echo what the caller
sent (``got str '…'``, PostgreSQL's ``invalid input syntax for type integer: "…"``), and the
audit log keeps who did what, not the values they sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from database_service.errors import DatabaseServiceError, postgres_unreachable
from database_service.loops import LoopStarter, plain_start
from database_service.observability.metrics import Metrics

__all__ = ["AuditEvent", "AuditLog", "redact"]

log = logging.getLogger(__name__)

REDACTED = "…"
# A quoted name right after one of these words is an identifier (kept when it looks like one);
# anything else quoted is a value (dropped).
_NAMED_BY = frozenset(
    {
        "relation", "column", "constraint", "table", "schema", "function", "type", "index",
        "sequence", "view", "trigger", "policy", "role", "database", "operator", "extension",
        "tenant", "service", "scope",
    }
)  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][\w.$-]{0,62}")
_SCOPES = frozenset({"read", "write", "ingest", "admin", "metrics"})
# Values echoed without quotes: ours ("...; got int 12345", "; got [1, 2]") and asyncpg's
# ("invalid input for query argument $1: 12345 (reason)").
_GOT = re.compile(r"(; got )(?:([a-zA-Z_]\w*) (?=\S))?.*$", re.DOTALL)
_ARGUMENT = re.compile(r"(query argument \$\d+: )(?:[^'\"(\s][^(]*?)(?=\s*\(|$)")


def redact(detail: str, keep: tuple[str | None, ...] = ()) -> str:
    """``detail`` without the values it quotes or echoes. Kept: quoted identifiers named as such
    (``relation "users"``, ``tenant 'abc'``), scope names, and the ``keep`` strings (the event's
    own service and tenant)."""
    kept = {k for k in keep if k}
    out: list[str] = []
    i, n = 0, len(detail)
    while i < n:
        quote = detail[i]
        if quote not in "'\"" or (i > 0 and detail[i - 1].isalnum()):  # not an apostrophe
            out.append(quote)
            i += 1
            continue
        end = _closing(detail, i)
        content = detail[i + 1 : end]
        words = detail[max(0, i - 40) : i].split()
        before = words[-1].lower() if words else ""
        named = before in _NAMED_BY and _IDENTIFIER.fullmatch(content) is not None
        if named or content in kept or content in _SCOPES:
            out.append(detail[i : end + 1])
        else:
            out.append(f"{quote}{REDACTED}{quote}")
        i = end + 1
    text = "".join(out)
    text = _ARGUMENT.sub(lambda m: m.group(1) + REDACTED, text)
    return _GOT.sub(_got, text)


def _got(match: re.Match[str]) -> str:
    kind = f"{match.group(2)} " if match.group(2) else ""
    return f"{match.group(1)}{kind}{REDACTED}"


def _closing(text: str, start: int) -> int:
    """The quote closing the one at ``start``: the next same quote not escaped and not followed
    by a letter or digit (so ``"a"b"`` closes at its last quote); the end if none."""
    quote = text[start]
    i = start + 1
    last = len(text) - 1
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == quote and (i == last or not text[i + 1].isalnum()):
            return i
        i += 1
    return last


# Not frozen: one is made for every operation, and a frozen dataclass's __init__ sets each field
# through object.__setattr__ (twice the cost). Nothing changes an event once made.
@dataclass(slots=True)
class AuditEvent:
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    service: str | None = None
    tenant_id: str | None = None
    action: str = ""
    statement_class: str | None = None
    outcome: str = "ok"  # ok | denied | error
    code: str | None = None
    detail: str | None = None

    def record(self) -> tuple[object, ...]:
        """The row, in _COLUMNS order (``dataclasses.astuple`` deep-copies every value)."""
        return (
            self.at, self.service, self.tenant_id, self.action, self.statement_class,
            self.outcome, self.code, self.detail,
        )  # fmt: skip

    def __post_init__(self) -> None:
        if self.detail:
            detail = redact(self.detail, (self.service, self.tenant_id))
            self.detail = detail


_COLUMNS = ["at", "service", "tenant_id", "action", "statement_class", "outcome", "code", "detail"]


class AuditLog:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        metrics: Metrics,
        max_queue: int = 10_000,
        batch_size: int = 1000,
        flush_interval: float = 0.2,
        retry_interval: float = 1.0,
        start_loop: LoopStarter | None = None,
    ) -> None:
        self._pool = pool
        self._schema = control_schema
        self._metrics = metrics
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(max_queue)
        self._batch_size = batch_size
        self._interval = flush_interval
        self._retry_interval = retry_interval
        self._task: asyncio.Task[None] | None = None
        self._start_loop = start_loop or plain_start
        self.written = 0
        # The current run of failed writes: when it began, when to try again, what it dropped.
        self._failing_since: float | None = None
        self._retry_at = 0.0
        self._dropped = 0
        self._waiting: set[asyncio.Task[None]] = set()  # record_nowait's, while the queue is full
        self._holders: list[Callable[[], None]] = []  # before_flush's

    async def __aenter__(self) -> AuditLog:
        self._task = self._start_loop("audit-writer", self._run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._hand_over()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._flush_all()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def denied(
        self,
        service: str | None,
        tenant_id: str | None,
        action: str,
        exc: DatabaseServiceError,
    ) -> None:
        """Count and record a refusal (every front end's denials go through here)."""
        self._metrics.denials.labels(exc.error_code).inc()
        await self.record(
            AuditEvent(
                service=service,
                tenant_id=tenant_id,
                action=action,
                outcome="denied",
                code=exc.error_code,
                detail=exc.message[:500],
            )
        )

    @property
    def backlogged(self) -> bool:
        """The queue is full: ``record`` would wait (callers that record after answering
        await it instead, so back-pressure still reaches the request)."""
        return self._queue.full()

    def record_nowait(self, event: AuditEvent) -> None:
        """Queue ``event`` without waiting (for callers that checked ``backlogged``): if the
        queue filled up meanwhile, a task waits for room, so nothing is dropped."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            task = asyncio.get_running_loop().create_task(self._queue.put(event))
            self._waiting.add(task)
            task.add_done_callback(self._waiting.discard)

    async def record(self, event: AuditEvent) -> None:
        """Queue ``event`` for the batched writer; wait only while the queue is full (the
        writer behind: back-pressure, nothing dropped)."""
        queue = self._queue
        if queue.full():
            await queue.put(event)
        else:
            queue.put_nowait(event)  # the common case: no coroutine of Queue.put's

    def before_flush(self, hand_over: Callable[[], None]) -> None:
        """``hand_over`` records the events its caller holds back to record them together
        (``QueryExecutor.book``): called when the log flushes or closes."""
        self._holders.append(hand_over)

    def _hand_over(self) -> None:
        for hand_over in self._holders:
            hand_over()

    async def flush(self) -> None:
        """Write everything recorded so far, including a batch the writer is holding."""
        await asyncio.sleep(0)  # events of operations just answered are queued a turn later
        self._hand_over()
        await self._flush_all()
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            try:
                # Let a batch gather, unless a whole one is already waiting. A writer that
                # slept before every batch wrote at most ``batch_size`` events per interval:
                # past that rate (5,000/s) the queue filled and every request waited for room
                # (the wire port at 6,000 transactions/s stalled 120 ms every 0.2 s).
                if self._queue.qsize() + 1 < self._batch_size:
                    await asyncio.sleep(self._interval)
            finally:
                # Also when cancelled at shutdown: the events taken from the queue are written.
                await self._write([first, *self._drain(self._batch_size - 1)])

    def _drain(self, limit: int | None = None) -> list[AuditEvent]:
        """Up to ``limit`` (a batch) queued events."""
        limit = self._batch_size if limit is None else limit
        batch: list[AuditEvent] = []
        while len(batch) < limit and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _flush_all(self) -> None:
        while True:
            if not self._queue.empty():
                await self._write(self._drain())
            elif self._waiting:  # record_nowait's events, waiting for the room just made
                await asyncio.wait(set(self._waiting))
            else:
                return

    async def _write(self, batch: list[AuditEvent]) -> None:
        if not batch:
            return
        try:
            await self._copy(batch)
        finally:
            for _ in batch:
                self._queue.task_done()

    async def _copy(self, batch: list[AuditEvent]) -> None:
        now = time.monotonic()
        if self._failing_since is not None and now < self._retry_at:
            self._drop(batch)
            return
        try:
            await self._pool.copy_records_to_table(
                "audit_log",
                schema_name=self._schema,
                columns=_COLUMNS,
                records=[e.record() for e in batch],
            )
        except Exception as exc:  # the writer must outlive any failure: record() relies on it
            if not postgres_unreachable(exc):
                # PostgreSQL is there and refused this batch: a bug to look at, not an outage.
                self._drop(batch)
                log.error("audit: PostgreSQL refused %d events", len(batch), exc_info=exc)
                return
            if self._failing_since is None:
                self._failing_since = now
                log.error(
                    "audit: PostgreSQL unreachable, dropping events until it is back (%s: %s)",
                    type(exc).__name__,
                    exc,
                )
            self._retry_at = time.monotonic() + self._retry_interval
            self._drop(batch)
            return
        self.written += len(batch)
        if self._failing_since is not None:
            log.warning(
                "audit: writing again after %.1fs; %d events were dropped meanwhile",
                now - self._failing_since,
                self._dropped,
            )
            self._failing_since = None
            self._dropped = 0

    def _drop(self, batch: list[AuditEvent]) -> None:
        self._metrics.audit_dropped.inc()
        if self._failing_since is not None:
            self._dropped += len(batch)
