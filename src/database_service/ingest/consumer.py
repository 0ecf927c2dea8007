"""What the two transport consumers share: a background task that runs a session (connect,
then consume) until it fails, reports the failure, backs off and starts over, a stop that lets
the batch in hand finish, and ``Overlap`` (decode the next batch while one is written)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from database_service.ingest.pipeline import IngestPipeline

__all__ = ["Consumer", "Overlap"]

log = logging.getLogger(__name__)


class Consumer:
    transport: str = ""
    # How long a stop waits for the batch in hand to commit and be acknowledged; whatever is
    # cut short is redelivered later and deduplicated.
    stop_grace_seconds: float = 5.0

    def __init__(self, pipeline: IngestPipeline) -> None:
        self._pipeline = pipeline
        self._stats = pipeline.stats(self.transport)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> Consumer:
        self._task = asyncio.create_task(self._run(), name=f"ingest-{self.transport}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping = True
        task = self._task
        if task is not None:
            # asyncio.wait neither raises the task's outcome nor hides our own cancellation.
            done, _ = await asyncio.wait({task}, timeout=self.stop_grace_seconds)
            if not done:
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s ingest stopped on %r", self.transport, task.exception())
        await self._close()

    @property
    def state(self) -> str:
        return self._stats.state

    async def _session(self) -> None:
        """Connect and consume until stopped; raise on any failure (the loop starts over)."""
        raise NotImplementedError

    async def _close(self) -> None:
        """Release what outlives sessions (a client that reconnects by itself)."""

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: report, wait, start over
                self._stats.state = "disconnected"
                self._stats.errors += 1
                self._stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                if asyncio.get_running_loop().time() - started > 30:
                    delay = 0.2  # it had been working: start over quickly
                log.warning(
                    "%s ingest: %s; retrying in %.1fs", self.transport, self._stats.last_error,
                    delay,
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


class Overlap:
    """At most one batch being stored while the consumer fetches and decodes the next.

    ``submit`` waits for the previous batch to finish (acknowledged, offsets committed) before
    it starts the next one, so acknowledgements keep their order and memory holds two batches
    at most; what overlaps is the CPU work of one with the database round trips of the other."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def submit(self, work: Awaitable[None]) -> None:
        await self.drain()
        self._task = asyncio.ensure_future(work)

    async def drain(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await task

    async def cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
