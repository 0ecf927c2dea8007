"""The supervisor's ``WorkerSet`` with real processes (a few lines of Python standing in for a
worker): it starts the primary first and the others once the primary has started, waits until
all serve, replaces a worker that dies (counted, with its cause, after a delay when it died
young), fails a start when a worker ends during it, and stops them all with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from database_service.supervisor.ports import StartupError
from database_service.workers.runtime import RunDirectory
from database_service.workers.supervisor import WorkerSet

# A worker: reports itself started and serving (its snapshot), then waits for SIGTERM. With
# FAIL_AT_START set, worker 1 ends at once instead.
WORKER = """
import json, os, signal, sys, time
context = json.loads(os.environ["DATABASE_SERVICE_WORKER"])
if os.environ.get("FAIL_AT_START") and context["index"] == 1:
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
path = os.path.join(context["run_dir"], "worker-%d.json" % context["index"])
with open(path + ".tmp", "w") as f:
    json.dump({"pid": os.getpid(), "index": context["index"], "ready": True,
               "written": time.monotonic()}, f)
os.replace(path + ".tmp", path)
while True:
    time.sleep(1)
"""


def make(tmp_path: Path, count: int = 2, **env: str) -> WorkerSet:
    run = RunDirectory(tmp_path / "run")
    run.metrics.mkdir(parents=True)
    return WorkerSet(
        count,
        run,
        env=lambda index: {**os.environ, **env},
        command=[sys.executable, "-c", WORKER],
        grace_seconds=1,
    )


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[WorkerSet]:
    group = make(tmp_path)
    try:
        yield group
    finally:
        await group.stop()


def state(group: WorkerSet) -> dict[str, object]:
    return group._run.supervisor()


async def test_workers_start_are_replaced_when_they_die_and_stop(
    workers: WorkerSet, tmp_path: Path
) -> None:
    await workers.start()
    first = workers.pids()
    assert all(pid is not None and psutil.pid_exists(pid) for pid in first)
    documents = state(workers)["workers"]
    assert isinstance(documents, list)
    assert [w["up"] for w in documents] == [True, True]
    assert [w["primary"] for w in documents] == [True, False]

    watching = asyncio.create_task(workers.run())
    victim = first[1]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        worker = state(workers)["workers"][1]  # type: ignore[index]
        if worker["pid"] != victim and worker["up"]:
            break
        assert time.monotonic() < deadline, state(workers)
        await asyncio.sleep(0.05)
    # It died young (under 10 s): started again after a delay, not in a tight loop.
    assert worker["restarts"] == 1 and worker["last_exit"] == "killed by SIGKILL"
    assert state(workers)["restarts"] == 1 and workers.restarts == 1
    assert workers.pids()[0] == first[0]  # the other one was never touched

    workers.request_stop()
    await watching
    replaced = workers.pids()
    await workers.stop()
    assert not any(pid is not None and psutil.pid_exists(pid) for pid in replaced)
    assert [w["up"] for w in state(workers)["workers"]] == [False, False]  # type: ignore[union-attr]


async def test_a_worker_ending_during_start_up_fails_the_start(tmp_path: Path) -> None:
    group = make(tmp_path, FAIL_AT_START="1")
    try:
        with pytest.raises(StartupError, match=r"worker 1 \(pid \d+\) ended during start-up"):
            await group.start()
    finally:
        await group.stop()
    assert not any(pid is not None and psutil.pid_exists(pid) for pid in group.pids())
