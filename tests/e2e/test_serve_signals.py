"""Ctrl-C or SIGTERM at any moment of ``serve``'s start-up stops everything started so far and
exits promptly: no embedded PostgreSQL, initdb or nats-server is left running, and the service
never goes on to announce itself."""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_serve import Served, children_left


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not under tmp_path, as in test_serve: initdb runs as another user when we are root.
    with tempfile.TemporaryDirectory(prefix="dbsvc-signals-") as tmp:
        yield Path(tmp) / "data"


def _wait_for_initdb(served: Served) -> None:
    """Until initdb runs (pgserver's INFO line just before it, shown with ``-v``)."""
    served.wait_for_line("Initializing pgdata")
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not any(
        p.info["name"] == "initdb" for p in psutil.process_iter(attrs=("name",))
    ):
        time.sleep(0.01)
    time.sleep(0.2)  # well inside it: initdb takes over a second


# Moments of start-up: while initdb runs, and just after each log line of the start-up.
MOMENTS = {
    "initdb": None,
    "postgres ready": "embedded PostgreSQL ready",
    "migrations": "control plane: applied migration",
    "nats ready": "embedded nats-server ready",
    "grpc listening": "gRPC listening",
}


@pytest.mark.parametrize(
    ("moment", "sig", "twice"),
    [
        ("initdb", signal.SIGINT, False),
        ("initdb", signal.SIGTERM, False),
        ("postgres ready", signal.SIGINT, False),
        ("postgres ready", signal.SIGTERM, True),
        ("migrations", signal.SIGTERM, False),
        ("nats ready", signal.SIGINT, True),
        ("grpc listening", signal.SIGTERM, False),
    ],
)
def test_a_signal_during_start_up_stops_everything_started(
    data_dir: Path, moment: str, sig: signal.Signals, twice: bool
) -> None:
    served = Served(data_dir, args=("-v",) if moment == "initdb" else ())
    try:
        line = MOMENTS[moment]
        if line is None:
            _wait_for_initdb(served)
        else:
            served.wait_for_line(line)
        served.process.send_signal(sig)
        sent = time.monotonic()
        if twice:  # an impatient operator: the second one must not cut the stopping short
            time.sleep(0.1)
            if served.process.poll() is None:
                served.process.send_signal(sig)
        try:
            code = served.process.wait(timeout=20)
        except Exception:
            raise AssertionError(
                f"{sig.name} at {moment!r}: still running after 20 s:\n{served.output()}"
            ) from None
        took = time.monotonic() - sent
        output = served.output()
    finally:
        served.kill()
    assert children_left(served.data_dir) == [], output
    if "Database Service is running." in output:
        # The signal won the race against the last step of start-up: a normal stop.
        assert moment == "grpc listening" and code == 0, output
    else:
        assert code == 128 + sig, output
        assert "Start-up interrupted" in output, output
    assert took < 15, output
    assert "Traceback" not in output, output


def test_serve_starts_after_a_start_up_interrupted_during_initdb(data_dir: Path) -> None:
    first = Served(data_dir, args=("-v",))
    try:
        _wait_for_initdb(first)
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=20) == 128 + signal.SIGTERM, first.output()
    finally:
        first.kill()
    assert children_left(first.data_dir) == []
    again = Served(data_dir)
    try:
        again.wait_healthy(timeout=60)
        code, output = again.stop(signal.SIGTERM)
        assert code == 0, output
    finally:
        again.kill()
    assert children_left(again.data_dir) == []
