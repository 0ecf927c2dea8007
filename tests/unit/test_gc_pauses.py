"""The collector's pauses are timed into a histogram, by generation, while installed — and
never observed from inside a collection, which can start while a metric's lock is held."""

from __future__ import annotations

import gc
import threading

from prometheus_client import CollectorRegistry, Histogram

from database_service.observability.gcpauses import GcPauses


def pauses(registry: CollectorRegistry, generation: str) -> float:
    value = registry.get_sample_value("gc_pause_seconds_count", {"generation": generation})
    return value or 0.0


def test_each_collection_is_timed_by_generation_until_removed() -> None:
    registry = CollectorRegistry()
    histogram = Histogram("gc_pause_seconds", "pauses", ["generation"], registry=registry)
    probe = GcPauses(histogram)
    probe.install()
    probe.install()  # once only
    try:
        gc.collect(2)
        gc.collect(0)
        assert pauses(registry, "2") == 0  # timed, not yet observed
        probe.flush()
        assert pauses(registry, "2") >= 1 and pauses(registry, "0") >= 1
    finally:
        probe.remove()
    assert not probe.installed and probe._callback not in gc.callbacks
    before = pauses(registry, "2")
    gc.collect(2)
    probe.flush()
    assert pauses(registry, "2") == before


class LockedChild:
    """A histogram child whose observe takes a lock (as prometheus-client's values do)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.observed: list[float] = []
        self.blocked = 0

    def observe(self, amount: float) -> None:
        if not self.lock.acquire(timeout=0.2):
            self.blocked += 1  # the real lock would have waited forever
            return
        try:
            self.observed.append(amount)
        finally:
            self.lock.release()


class LockedHistogram:
    def __init__(self, child: LockedChild) -> None:
        self.child = child

    def labels(self, *values: str) -> LockedChild:
        return self.child


def test_a_collection_inside_a_metric_update_does_not_wait_for_the_metric() -> None:
    lock = threading.Lock()
    child = LockedChild(lock)
    probe = GcPauses(LockedHistogram(child))
    probe.install()
    try:
        with lock:  # a metric being updated when the collector starts
            gc.collect()
        assert child.blocked == 0 and child.observed == []
        probe.flush()
        assert child.observed and child.blocked == 0
    finally:
        probe.remove()
