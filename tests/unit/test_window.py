import asyncio
import json
import sys
import time

from database_service.observability import RequestWindow


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_empty_window_reports_zeroes() -> None:
    summary = RequestWindow().summary()
    assert summary.requests == 0 and summary.error_rate_percent == 0.0
    assert RequestWindow().summary("nobody").requests == 0


def test_window_reports_latency_and_error_rate() -> None:
    window = RequestWindow()
    for _ in range(99):
        window.record(0.002, True)
    window.record(0.5, False)
    summary = window.summary()
    assert summary.requests == 100
    assert summary.error_rate_percent == 1.0
    assert summary.p50_ms == 2.0
    assert summary.p99_ms == 500.0
    assert summary.response_time_ms == round((99 * 2 + 500) / 100, 3)


def test_percentiles_come_from_the_histogram_within_its_bin() -> None:
    window = RequestWindow()
    for i in range(1, 1001):
        window.record(i / 10_000, True)  # 0.1 ms .. 100 ms, evenly
    summary = window.summary()
    # The true p50 is 50 ms and p99 99 ms; the histogram answers with its bin's upper bound.
    assert 50.0 <= summary.p50_ms <= 60.0
    assert 99.0 <= summary.p99_ms <= 100.0


def test_each_tenant_sees_its_own_figures_and_the_service_sees_all() -> None:
    window = RequestWindow()
    for _ in range(3):
        window.record(0.010, True, tenant_id="a")
    window.record(0.200, False, tenant_id="b")
    window.record(0.001, True)  # no tenant known (e.g. refused before naming one)
    a, b, everyone = window.summary("a"), window.summary("b"), window.summary()
    assert (a.requests, a.error_rate_percent, a.p99_ms) == (3, 0.0, 10.0)
    assert (b.requests, b.error_rate_percent, b.p50_ms) == (1, 100.0, 200.0)
    assert everyone.requests == 5
    assert window.summary("c").requests == 0


def test_requests_leave_the_window_after_a_minute() -> None:
    clock = Clock()
    window = RequestWindow(60, clock=clock)
    window.record(0.01, True, tenant_id="a")
    clock.now += 30
    window.record(0.01, False, tenant_id="a")
    assert window.summary("a").requests == 2
    clock.now += 31  # the first is now older than 60 s
    summary = window.summary("a")
    assert (summary.requests, summary.error_rate_percent) == (1, 100.0)
    clock.now += 60
    assert window.summary().requests == 0 and window.summary("a").requests == 0


def test_idle_tenants_are_forgotten() -> None:
    clock = Clock()
    window = RequestWindow(60, clock=clock)
    for tenant in ("a", "b", "c"):
        window.record(0.01, True, tenant_id=tenant)
    assert window.tenants_tracked == 3
    clock.now += 61
    window.record(0.01, True, tenant_id="a")
    assert window.tenants_tracked == 1


def test_tenant_count_is_capped_but_the_service_counts_everything() -> None:
    window = RequestWindow(max_tenants=2)
    for tenant in ("a", "b", "c"):
        window.record(0.01, True, tenant_id=tenant)
    assert window.tenants_tracked == 2
    assert window.summary("c").requests == 0
    assert window.summary().requests == 3


def test_memory_is_bounded_whatever_the_load() -> None:
    clock = Clock()
    window = RequestWindow(60, clock=clock)

    def footprint() -> int:
        series = window._all
        return sum(sys.getsizeof(getattr(series, name)) for name in series.__slots__)

    for _ in range(1000):
        window.record(0.001, True, tenant_id="a")
    before = footprint()
    for i in range(200_000):
        clock.now += 0.001
        window.record(0.001 * (i % 50), i % 7 != 0, tenant_id="a")
    assert footprint() == before
    assert window.summary().requests <= 60_000  # 60 s at 1000 requests a second


def test_summary_is_cheap() -> None:
    window = RequestWindow()
    for i in range(100_000):
        window.record(0.0001 * (i % 100), True, tenant_id="a")
    started = time.perf_counter()
    for _ in range(10):
        window.summary()
        window.summary("a")
    assert (time.perf_counter() - started) / 20 < 0.01  # well under 10 ms each


def test_windows_of_several_workers_merge_into_one_summary() -> None:
    """Each worker exports its buckets; a window given the others' (``set_peers``) reports the
    instance: counts and errors added, percentiles from the merged histograms."""
    clock = Clock()
    mine, theirs = RequestWindow(clock=clock), RequestWindow(clock=clock)
    for _ in range(90):
        mine.record(0.002, True, "t1")
    for _ in range(10):
        theirs.record(0.5, False, "t1")
    theirs.record(0.001, True, "t2")
    clock.now += 2

    class Peers:
        def windows(self) -> list[dict[str, object]]:
            # As a worker reads it from the run directory: through JSON.
            return [json.loads(json.dumps(theirs.export()))]

        def pools(self) -> list[dict[str, object]]:
            return []

        def system(self) -> list[dict[str, object]]:
            return []

        def workers(self) -> dict[str, object]:
            return {}

    alone = mine.summary()
    mine.set_peers(Peers())
    merged = mine.summary()
    assert alone.requests == 90 and alone.p99_ms == 2.0
    assert merged.requests == 101
    assert merged.error_rate_percent == round(100 * 10 / 101, 3)
    assert merged.p50_ms == 2.0 and merged.p99_ms == 500.0  # not an average of percentiles
    assert mine.summary("t1").requests == 100
    assert mine.summary("t2").requests == 1
    clock.now += 61  # the peers' buckets age out like one's own
    assert mine.summary().requests == 0


async def test_bookkeeping_held_back_is_done_before_any_figure_is_read() -> None:
    window = RequestWindow()

    def record_each(requests: list[tuple[float, bool, str | None]]) -> None:
        for duration_s, ok, tenant_id in requests:
            window.record(duration_s, ok, tenant_id)

    window.later(record_each, (0.002, True, "t1"))
    window.later(record_each, (0.004, False, "t1"))
    assert window._all.counts == [0] * len(window._all.counts)  # held, not yet recorded
    assert window.summary("t1").requests == 2  # a summary settles first
    window.later(record_each, (0.001, True, None))
    assert window.export()["all"][0][1] == 3  # so does an export
    window.later(record_each, (0.001, True, None))
    await asyncio.sleep(0.05)  # and the loop, within its few milliseconds
    assert window.summary().requests == 4


async def test_what_is_held_back_reaches_its_recorder_together() -> None:
    window = RequestWindow()
    batches: list[list[int]] = []
    others: list[list[str]] = []
    for n in range(3):
        window.later(batches.append, n)
    window.later(others.append, "x")
    window.settle()
    assert batches == [[0, 1, 2]] and others == [["x"]]
    window.settle()  # nothing held: nothing recorded
    assert batches == [[0, 1, 2]] and others == [["x"]]
