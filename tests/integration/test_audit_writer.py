"""The audit writer on PostgreSQL: what it gathers, it writes; a backlog is written at once,
not a batch per interval (the writer's own rate must never be what limits the requests that
wait for room in its queue)."""

from __future__ import annotations

import asyncio
import secrets

from database_service.app import Application
from database_service.observability.audit import AuditEvent, AuditLog


async def _rows(core: Application, action: str) -> int:
    schema = core.settings.control_schema
    async with core.owner_pool.acquire() as conn:
        count: int = await conn.fetchval(
            f'SELECT count(*) FROM "{schema}".audit_log WHERE action = $1', action
        )
    return count


def _writer(core: Application, flush_interval: float) -> AuditLog:
    """A writer of its own on the service's audit pool, in batches of 100."""
    return AuditLog(
        core.audit_pool,
        control_schema=core.settings.control_schema,
        metrics=core.metrics,
        batch_size=100,
        flush_interval=flush_interval,
    )


async def _until_written(writer: AuditLog, events: int) -> None:
    async with asyncio.timeout(20):
        while writer.written < events:  # noqa: ASYNC110 - the writer's own progress
            await asyncio.sleep(0.01)


async def test_a_backlog_of_whole_batches_is_written_without_waiting_for_the_interval(
    core: Application,
) -> None:
    action = f"writer.backlog.{secrets.token_hex(4)}"
    # A batch that waited for the interval would not be written in this test.
    writer = _writer(core, flush_interval=60.0)
    async with writer:
        for n in range(250):
            await writer.record(
                AuditEvent(service="svc", tenant_id="t", action=action, code=str(n))
            )
        await _until_written(writer, 200)
        # The two whole batches; the last 50 wait for the interval (or the close).
        assert writer.written == 200
        assert await _rows(core, action) == 200
    assert writer.written == 250  # the close wrote the rest
    assert await _rows(core, action) == 250


async def test_a_small_batch_waits_for_the_interval_then_is_written(core: Application) -> None:
    action = f"writer.small.{secrets.token_hex(4)}"
    writer = _writer(core, flush_interval=0.2)
    async with writer:
        for _ in range(3):
            await writer.record(AuditEvent(action=action))
        await _until_written(writer, 3)
    assert await _rows(core, action) == 3
