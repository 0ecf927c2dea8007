"""A rolling window of recent requests for the health document's performance figures."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

__all__ = ["RequestWindow", "WindowSummary"]


@dataclass(frozen=True, slots=True)
class WindowSummary:
    requests: int
    throughput_rps: float
    response_time_ms: float
    p50_ms: float
    p99_ms: float
    error_rate_percent: float


class RequestWindow:
    def __init__(self, seconds: float = 60.0, max_samples: int = 200_000) -> None:
        self._seconds = seconds
        self._samples: deque[tuple[float, float, bool]] = deque(maxlen=max_samples)
        self._started = time.monotonic()

    def record(self, duration_s: float, ok: bool) -> None:
        self._samples.append((time.monotonic(), duration_s, ok))

    def summary(self) -> WindowSummary:
        now = time.monotonic()
        horizon = now - self._seconds
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()
        samples = list(self._samples)
        if not samples:
            return WindowSummary(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        span = min(self._seconds, max(now - self._started, 1e-3))
        durations = sorted(d for _, d, _ in samples)
        errors = sum(1 for _, _, ok in samples if not ok)

        def pct(q: float) -> float:
            return durations[min(len(durations) - 1, int(q * len(durations)))] * 1000

        return WindowSummary(
            requests=len(samples),
            throughput_rps=round(len(samples) / span, 3),
            response_time_ms=round(sum(durations) / len(durations) * 1000, 3),
            p50_ms=round(pct(0.5), 3),
            p99_ms=round(pct(0.99), 3),
            error_rate_percent=round(100 * errors / len(samples), 3),
        )
