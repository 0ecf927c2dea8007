"""The audit log: who did what for which tenant, and how it ended.

Events are queued and written in batches with COPY by one background task, so auditing adds no
round trip to a request. The queue is bounded: when PostgreSQL cannot keep up, ``record`` waits
(backpressure). A batch that PostgreSQL refuses or cannot receive (it is down) is dropped and
counted in ``dbsvc_audit_write_failures_total``, not retried. While PostgreSQL is unreachable the
writer tries it again at most every ``retry_interval`` seconds and drops the batches in between,
so the queue keeps draining (requests never wait on a dead database), and the log gets one line
when the outage starts and one when writes work again, not one per batch. ``__aexit__`` flushes
the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime

import asyncpg

from database_service.errors import DatabaseServiceError, postgres_unreachable
from database_service.observability.metrics import Metrics

__all__ = ["AuditEvent", "AuditLog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    service: str | None = None
    tenant_id: str | None = None
    action: str = ""
    statement_class: str | None = None
    outcome: str = "ok"  # ok | denied | error
    code: str | None = None
    detail: str | None = None


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
    ) -> None:
        self._pool = pool
        self._schema = control_schema
        self._metrics = metrics
        self._queue: asyncio.Queue[AuditEvent] = asyncio.Queue(max_queue)
        self._batch_size = batch_size
        self._interval = flush_interval
        self._retry_interval = retry_interval
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        # The current run of failed writes: when it began, when to try again, what it dropped.
        self._failing_since: float | None = None
        self._retry_at = 0.0
        self._dropped = 0

    async def __aenter__(self) -> AuditLog:
        self._task = asyncio.create_task(self._run(), name="audit-writer")
        return self

    async def __aexit__(self, *exc: object) -> None:
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

    async def record(self, event: AuditEvent) -> None:
        await self._queue.put(event)

    async def flush(self) -> None:
        """Write everything recorded so far, including a batch the writer is holding."""
        await self._flush_all()
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            try:
                await asyncio.sleep(self._interval)  # let a batch gather
            finally:
                # Also when cancelled at shutdown: the events taken from the queue are written.
                await self._write([first, *self._drain()])

    def _drain(self) -> list[AuditEvent]:
        batch: list[AuditEvent] = []
        while len(batch) < self._batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _flush_all(self) -> None:
        while not self._queue.empty():
            await self._write(self._drain())

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
                records=[astuple(e) for e in batch],
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
