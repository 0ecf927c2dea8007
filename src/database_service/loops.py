"""Every long-running background loop of the service, supervised.

A loop that ends with an exception (a bug, something unforeseen) must not end silently and stay
ended until the next restart: it is logged with its traceback, counted
(``dbsvc_background_loop_restarts_total``), started again after a backoff, and shown in the
health document (``background_loops``). Cancellation (shutdown) ends it for good.

Components that own a loop take a ``LoopStarter``; the composition root passes
``BackgroundLoops.start``, and a component used on its own falls back to ``plain_start``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["BackgroundLoops", "LoopStarter", "RunningLoop", "plain_start"]

log = logging.getLogger(__name__)

LoopStarter = Callable[[str, Callable[[], Awaitable[None]]], "asyncio.Task[None]"]


class _Counter(Protocol):
    def labels(self, *values: str) -> Any: ...


class RunningLoop:
    """The running event loop, looked up again only when the one remembered is not running.

    On Python 3.11, ``asyncio.get_running_loop()`` — and ``current_task()`` without a loop,
    which calls it — makes a ``getpid()`` system call every time (its check for a fork). The
    request path asked several times per request: 3.7% of the service's CPU on PK lookups.
    A component that asks on every request keeps one of these (the service never forks a
    process with a running loop: its workers are new processes)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or not loop.is_running():
            # First use, or the loop remembered ended (a test's, a restarted component's).
            loop = self._loop = asyncio.get_running_loop()
        return loop


def plain_start(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """Run a loop unsupervised (a component on its own, in a test)."""

    async def once() -> None:
        await run()

    return asyncio.create_task(once(), name=name)


@dataclass(slots=True)
class _LoopState:
    state: str = "running"  # running | restarting | finished | stopped
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


class BackgroundLoops:
    def __init__(self, restarts: _Counter | None = None, *, max_backoff: float = 30.0) -> None:
        self._restarts = restarts
        self._max_backoff = max_backoff
        self._loops: dict[str, _LoopState] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        state = self._loops[name] = _LoopState()
        return asyncio.create_task(self._supervise(name, run, state), name=name)

    async def _supervise(
        self, name: str, run: Callable[[], Awaitable[None]], state: _LoopState
    ) -> None:
        delay = 0.1
        while True:
            state.state = "running"
            started = time.monotonic()
            try:
                await run()
            except asyncio.CancelledError:
                state.state = "stopped"
                raise
            except Exception as exc:
                state.restarts += 1
                state.last_error = f"{type(exc).__name__}: {exc}"[:300]
                state.last_error_at = time.time()
                state.state = "restarting"
                if self._restarts is not None:
                    self._restarts.labels(name).inc()
                if time.monotonic() - started > 60:
                    delay = 0.1  # it ran a good while: not a crash loop
                log.exception("background loop %s failed; restarting in %.1f s", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            state.state = "finished"
            return

    def document(self) -> dict[str, dict[str, Any]]:
        """For the health document: each loop's state, restarts and last error."""
        return {
            name: {
                "state": s.state,
                "restarts": s.restarts,
                "last_error": s.last_error,
                "seconds_since_last_error": (
                    round(time.time() - s.last_error_at, 1) if s.last_error_at else None
                ),
            }
            for name, s in sorted(self._loops.items())
        }

    @property
    def restarting(self) -> list[str]:
        return [name for name, s in self._loops.items() if s.state == "restarting"]
