"""``/metrics`` of several workers (prometheus-client's multiprocess mode, which the supervisor
turns on with ``PROMETHEUS_MULTIPROC_DIR``): whichever worker renders, counters add up every
worker's, the dead ones' included; live readings (pools) are summed over the live workers, and
a dead worker's readings go with it.

The mode is chosen when prometheus_client is imported, so each worker here is a process of its
own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import multiprocess

# A worker: counts requests and reports a live pool reading, then renders (or exits at once).
WORKER = """
import sys
from prometheus_client.core import GaugeMetricFamily
from database_service.observability.metrics import Metrics

requests, open_connections = int(sys.argv[1]), int(sys.argv[2])

class Pools:
    def collect(self):
        gauge = GaugeMetricFamily("dbsvc_pool_connections_open_total", "Open connections.")
        gauge.add_metric([], open_connections)
        yield gauge

metrics = Metrics()
assert metrics.multiprocess
metrics.register(Pools())
for _ in range(requests):
    metrics.requests.labels("http", "/api/v1/query", "ok").inc()
if len(sys.argv) > 3:
    sys.stdout.write(metrics.render().decode())
"""


def worker(directory: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", WORKER, *args],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def sample(text: str, prefix: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_counters_add_up_every_worker_and_live_readings_only_the_living(tmp_path: Path) -> None:
    first = worker(tmp_path, "3", "5", "render")
    assert sample(first, 'dbsvc_requests_total{code="ok"') == 3
    assert sample(first, "dbsvc_pool_connections_open_total") == 5

    # A second worker renders both workers' figures (the first, ended, is not yet marked dead).
    both = worker(tmp_path, "4", "2", "render")
    assert sample(both, 'dbsvc_requests_total{code="ok"') == 7
    assert sample(both, "dbsvc_pool_connections_open_total") == 7

    # Both processes have ended: the supervisor marks them dead. Their counts stay; their live
    # readings go.
    for name in os.listdir(tmp_path):
        pid = name.rsplit("_", 1)[-1].removesuffix(".db")
        if pid.isdigit():
            multiprocess.mark_process_dead(int(pid), str(tmp_path))  # type: ignore[no-untyped-call]
    after = worker(tmp_path, "0", "1", "render")
    assert sample(after, 'dbsvc_requests_total{code="ok"') == 7
    assert sample(after, "dbsvc_pool_connections_open_total") == 1
