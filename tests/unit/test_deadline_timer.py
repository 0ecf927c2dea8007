"""Deadlines' one timer (postgres/deadlines.py): the cancellation logic, without PostgreSQL
(the owner's cancel and terminate of a backend are tested in tests/integration/test_deadlines)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from database_service.errors import QueryError
from database_service.postgres.deadlines import Deadlines


class _Connection:
    """What a watch asks of its connection: the backend's pid, and terminate() when expired."""

    def __init__(self) -> None:
        self.terminated = False

    def get_server_pid(self) -> int:
        return 4242

    def terminate(self) -> None:
        self.terminated = True


def _deadlines() -> Deadlines:
    # No owner pool: the owner's cancel of the backend fails and is logged, which is all these
    # tests need of it (they check the task side).
    return Deadlines(None, grace_seconds=0)  # type: ignore[arg-type]


async def test_a_round_trip_past_its_limit_is_cancelled_with_sqlstate_57014() -> None:
    deadlines = _deadlines()
    conn = _Connection()
    watch = deadlines.watch(conn, "r", statement_seconds=0.05, total_seconds=30)  # type: ignore[arg-type]
    started = time.perf_counter()
    with pytest.raises(QueryError) as info:
        with watch.statement():
            await asyncio.sleep(5)
    assert time.perf_counter() - started < 1
    assert info.value.sqlstate == "57014" and watch.expired == "statement"
    watch.close()
    assert conn.terminated  # never back to the pool
    await deadlines.aclose()


@pytest.mark.parametrize("statement_seconds", [0.05, 30])
async def test_the_sessions_limit_ends_the_round_trip_under_way(statement_seconds: float) -> None:
    """When the whole session's limit passes first — or with the statement's, as the ingest
    writer sets them — the awaiting task is cancelled at once, not left waiting for a backend
    that traps the cancel (found by test_a_tenants_endless_trigger_does_not_stall_ingestion)."""
    deadlines = _deadlines()
    watch = deadlines.watch(
        _Connection(),  # type: ignore[arg-type]
        "r",
        statement_seconds=statement_seconds,
        total_seconds=0.05,
    )
    started = time.perf_counter()
    with pytest.raises(QueryError) as info:
        async with watch.statement():
            await asyncio.sleep(5)
    assert time.perf_counter() - started < 1
    assert info.value.sqlstate == "57014" and watch.expired == "transaction"
    watch.close()
    await deadlines.aclose()


async def test_a_short_limit_after_long_ones_moves_the_timer_earlier() -> None:
    deadlines = _deadlines()
    longs = [
        deadlines.watch(_Connection(), "r", statement_seconds=30, total_seconds=60)  # type: ignore[arg-type]
        for _ in range(3)
    ]
    short = deadlines.watch(_Connection(), "r", statement_seconds=0.05, total_seconds=60)  # type: ignore[arg-type]
    started = time.perf_counter()
    with pytest.raises(QueryError):
        async with short.statement():
            await asyncio.sleep(5)
    assert time.perf_counter() - started < 1
    assert all(w.expired is None for w in longs)
    for w in (*longs, short):
        w.close()
    await deadlines.aclose()


async def test_a_session_past_its_total_limit_expires_and_refuses_the_next_round_trip() -> None:
    deadlines = _deadlines()
    watch = deadlines.watch(_Connection(), "r", statement_seconds=10, total_seconds=0.05)  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert watch.expired == "transaction"
    with pytest.raises(QueryError) as info, watch.statement():
        pass
    assert "transaction exceeded" in info.value.message
    watch.close()
    await deadlines.aclose()


async def test_a_round_trip_within_its_limit_leaves_the_task_uncancelled() -> None:
    deadlines = _deadlines()
    watch = deadlines.watch(_Connection(), "r", statement_seconds=0.05, total_seconds=30)  # type: ignore[arg-type]
    for _ in range(3):
        with watch.statement():
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # past the deadlines of the finished round trips: nothing fires
    task: Any = asyncio.current_task()
    assert task.cancelling() == 0 and watch.expired is None
    watch.close()
    await deadlines.aclose()
