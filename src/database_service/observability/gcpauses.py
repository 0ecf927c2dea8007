"""Pauses of Python's cyclic garbage collector, as a metric.

A collection stops the whole process: every call in flight waits for it. Measured on
2026-12-04 (``bench/cache.py``, a ``gc.callbacks`` probe): a serving process whose L1 result
cache held ~100,000 entries ran a full collection every ~7 s, each 40-160 ms and longer as the
cache grew: the stalls behind the p99s of that bench and of the wire port's. Start-up's objects
are frozen out of the collector (``cli._settle_heap``) and the cache's entries are not tracked
by it; this histogram shows what is left.

The callback only appends to a list: a collection can start inside any allocation, including
one made while prometheus-client holds a value's lock (in multiprocess mode one lock for every
value of the process), so observing there could wait on that lock forever. ``flush`` moves
the pauses into the histogram; the metrics do that before each scrape and each refresh.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Protocol

__all__ = ["GcPauses"]

# Pauses kept between two flushes at most (a process nobody scrapes keeps no more).
_MAX_PENDING = 10_000


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Labelled(Protocol):
    def labels(self, *values: str) -> _Observer: ...


class GcPauses:
    """``install()`` puts a callback in ``gc.callbacks`` that times each collection;
    ``flush()`` observes the pauses timed since, by generation, in the histogram;
    ``remove()`` takes the callback out (the callbacks are the process's)."""

    def __init__(self, histogram: _Labelled) -> None:
        self._children = [histogram.labels(str(generation)) for generation in range(3)]
        self._started = 0.0
        self._pending: list[tuple[int, float]] = []
        self.dropped = 0  # pauses not kept: more than _MAX_PENDING between two flushes
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def flush(self) -> None:
        """Observe the pauses timed since the last flush (not from a collection's callback)."""
        pending, self._pending = self._pending, []
        for generation, seconds in pending:
            self._children[generation].observe(seconds)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        # No lock, no metric here: see the module's docstring.
        if phase == "start":
            self._started = time.perf_counter()
        elif phase == "stop":
            if len(self._pending) >= _MAX_PENDING:
                self.dropped += 1
                return
            generation = min(max(int(info.get("generation", 0)), 0), 2)
            self._pending.append((generation, time.perf_counter() - self._started))
