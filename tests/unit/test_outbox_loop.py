"""The outbox's background applier rides out PostgreSQL going away, whatever form the driver's
error takes: a retrying loop that raised would be restarted by the supervisor with an ERROR and a
traceback for an outage it is built to wait out."""

import asyncio
import logging
from typing import Any, cast

import asyncpg
import pytest
from asyncpg.exceptions._base import InternalClientError

from database_service.multidb.outbox import Outbox, OutboxMetrics, StoreAppliers
from database_service.observability.metrics import Metrics


class _GonePool:
    """A pool whose every call fails as a pool does while PostgreSQL restarts."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0
        self.retried = asyncio.Event()

    async def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls >= 3:
            self.retried.set()
        raise self.failures[(self.calls - 1) % len(self.failures)]

    fetch = fetchrow = execute = _fail


@pytest.mark.parametrize(
    "failure",
    [
        InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
    ids=type,
)
async def test_outbox_applier_waits_out_an_unreachable_postgres(
    failure: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    pool = _GonePool([failure])
    outbox = Outbox(
        cast(asyncpg.Pool, pool),
        control_schema="dbsvc_control",
        appliers=StoreAppliers(key_values=None, vectors=None, graphs=None),
        metrics=OutboxMetrics(Metrics()),
    )
    caplog.set_level(logging.WARNING, logger="database_service.multidb.outbox")
    loop = asyncio.create_task(outbox.run_forever(interval_seconds=0.01))
    await asyncio.wait_for(pool.retried.wait(), 10)
    assert not loop.done()  # still retrying: nothing escaped to the supervisor
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert all(r.levelno == logging.WARNING for r in caplog.records), caplog.text
    assert "PostgreSQL unreachable" in caplog.text
