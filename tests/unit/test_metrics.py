"""Requests counted together (``Metrics.requests_done``, what the gRPC front end does with the
calls of a few milliseconds) render exactly as the same requests counted one by one, in one
process and in prometheus_client's multiprocess mode (chosen at import: a process each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from database_service.observability.metrics import Metrics, observe_all

# Durations on, around and past the latency buckets' bounds, and two kinds of request.
DONE = [
    ("grpc", "Query", "ok", seconds)
    for seconds in (0.0, 0.0004, 0.001, 0.0010001, 0.004, 0.25, 2.5, 3.0, 1e9)
] + [("grpc", "BulkInsert", "ok", 0.02), ("http", "/api/v1/query", "not_found", 0.003)]

# Renders the request metrics, counted one by one (argv[1] == "each") or together.
RENDER = """
import sys
from database_service.observability.metrics import Metrics
from tests.unit.test_metrics import DONE
metrics = Metrics()
if sys.argv[1] == "each":
    for done in DONE:
        metrics.request_done(*done)
else:
    metrics.requests_done(DONE)
sys.stdout.write(metrics.render().decode())
"""


def request_lines(text: str) -> list[str]:
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith(("dbsvc_requests_total", "dbsvc_request_duration_seconds"))
        and "_created" not in line  # when the first one was counted
    )


def test_requests_counted_together_render_as_counted_one_by_one() -> None:
    each, together = Metrics(), Metrics()
    for done in DONE:
        each.request_done(*done)
    together.requests_done(DONE)
    lines = request_lines(together.render().decode())
    assert lines == request_lines(each.render().decode())
    assert any('code="not_found"' in line for line in lines)


def test_requests_counted_together_in_multiprocess_mode(tmp_path: Path) -> None:
    rendered = {}
    for way in ("each", "together"):
        directory = tmp_path / way
        directory.mkdir()
        rendered[way] = subprocess.run(
            [sys.executable, "-c", RENDER, way],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            cwd=Path(__file__).parents[2],
        ).stdout
    lines = request_lines(rendered["together"])
    assert lines and lines == request_lines(rendered["each"])


def test_observe_all_of_a_histogram_without_labels() -> None:
    registry = CollectorRegistry()
    each = Histogram("each_seconds", "-", buckets=(0.1, 1.0), registry=registry)
    together = Histogram("together_seconds", "-", buckets=(0.1, 1.0), registry=registry)
    values = [0.05, 0.1, 0.5, 1.0, 7.0]
    for value in values:
        each.observe(value)
    observe_all(together, values)
    text = generate_latest(registry).decode()

    def body(name: str) -> list[str]:
        return sorted(
            line.removeprefix(name)
            for line in text.splitlines()
            if line.startswith(name) and "_created" not in line
        )

    assert body("each_seconds") == body("together_seconds")
