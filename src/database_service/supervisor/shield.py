"""Stopping a child server must finish even when the task doing it is cancelled meanwhile (a
second Ctrl-C, a start-up cancelled by a signal): a PostgreSQL or nats-server left running
behind an exited service is worse than an exit a moment later."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["run_to_completion"]

T = TypeVar("T")


async def run_to_completion(work: Awaitable[T]) -> T:
    """Await ``work`` to its end whatever cancellations arrive; if the calling task was
    cancelled meanwhile, raise ``CancelledError`` after it is done (its result is then lost;
    its exception, if any, still propagates)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                cancelled = True  # ours, not the work's: keep waiting
                continue
            raise  # the work itself was cancelled
        if cancelled:
            raise asyncio.CancelledError
        return result
