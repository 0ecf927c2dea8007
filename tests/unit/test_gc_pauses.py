"""The collector's pauses are timed into a histogram, by generation, while installed."""

from __future__ import annotations

import gc

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
        assert pauses(registry, "2") >= 1 and pauses(registry, "0") >= 1
    finally:
        probe.remove()
    assert not probe.installed and probe._callback not in gc.callbacks
    before = pauses(registry, "2")
    gc.collect(2)
    assert pauses(registry, "2") == before
