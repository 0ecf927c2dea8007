"""Pauses of Python's cyclic garbage collector, as a metric.

A collection stops the whole process: every call in flight waits for it. Measured on
2026-12-04 (``bench/cache.py``, a ``gc.callbacks`` probe): a serving process whose L1 result
cache held ~100,000 entries ran a full collection every ~7 s, each 40-160 ms and longer as the
cache grew — the stalls behind the p99s of that bench and of the wire port's. Start-up's
objects are frozen out of the collector (``cli._settle_heap``); what serving keeps (cache
entries, plans, statements) is not, so this histogram shows what is left.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Protocol

__all__ = ["GcPauses"]


class _Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class _Labelled(Protocol):
    def labels(self, *values: str) -> _Observer: ...


class GcPauses:
    """``install()`` puts a callback in ``gc.callbacks`` that times each collection into the
    histogram, by generation; ``remove()`` takes it out (the callbacks are the process's)."""

    def __init__(self, histogram: _Labelled) -> None:
        self._children = [histogram.labels(str(generation)) for generation in range(3)]
        self._started = 0.0
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True

    def remove(self) -> None:
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif phase == "stop":
            generation = int(info.get("generation", 0))
            self._children[min(max(generation, 0), 2)].observe(time.perf_counter() - self._started)
