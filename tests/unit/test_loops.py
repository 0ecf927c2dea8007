"""Background loops are supervised: one that fails is logged, counted, restarted and shown."""

from __future__ import annotations

import asyncio

import pytest

from database_service.loops import BackgroundLoops, RunningLoop
from database_service.observability import Metrics


async def test_a_loop_that_fails_is_restarted_counted_and_shown() -> None:
    metrics = Metrics()
    loops = BackgroundLoops(metrics.loop_restarts, max_backoff=0.05)
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs < 3:
            raise RuntimeError(f"boom {runs}")
        await asyncio.sleep(3600)

    task = loops.start("flaky", flaky)
    for _ in range(100):
        if runs >= 3:
            break
        await asyncio.sleep(0.01)
    state = loops.document()["flaky"]
    assert runs == 3 and state["state"] == "running" and state["restarts"] == 2
    assert state["last_error"] == "RuntimeError: boom 2"
    assert 'dbsvc_background_loop_restarts_total{loop="flaky"} 2.0' in metrics.render().decode()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert loops.document()["flaky"]["state"] == "stopped"


async def test_a_loop_that_keeps_failing_is_shown_restarting() -> None:
    loops = BackgroundLoops(max_backoff=10)

    async def broken() -> None:
        raise KeyError("always")

    task = loops.start("broken", broken)
    await asyncio.sleep(0.05)
    assert loops.restarting == ["broken"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_loop_that_returns_is_finished_not_restarted() -> None:
    loops = BackgroundLoops()

    async def done() -> None:
        return None

    await loops.start("once", done)
    assert loops.document()["once"]["state"] == "finished"


def test_the_running_loop_is_remembered_and_found_again_when_it_changes() -> None:
    running = RunningLoop()

    async def seen() -> tuple[asyncio.AbstractEventLoop, asyncio.AbstractEventLoop]:
        return running(), running()

    first, again = asyncio.run(seen())
    assert first is again
    second, _ = asyncio.run(seen())  # a new loop: the first one ended
    assert second is not first and not first.is_running()


def test_the_running_loop_outside_a_loop_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        RunningLoop()()
