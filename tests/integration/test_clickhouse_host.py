"""chDB's host process (stores/clickhouse/host.py): one per data path, shared by every serving
process of an instance (chDB opens a path in one process only); started by the first that needs
it, started again after it died (the data kept), gone once no serving process holds it."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from database_service.stores.clickhouse import ClickHouseError
from database_service.stores.clickhouse.host import ChdbProcessStore

pytestmark = pytest.mark.integration


def _host_pid(path: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"database_service.stores.clickhouse.host" in cmdline and str(path).encode() in cmdline:
            return int(entry.name)
    return None


async def test_serving_processes_share_one_host_that_outlives_a_crash(tmp_path: Path) -> None:
    first = ChdbProcessStore(tmp_path, idle_exit=1.0)
    second = ChdbProcessStore(tmp_path, idle_exit=1.0)
    await first.start()
    await second.start()
    pid = _host_pid(tmp_path)
    assert pid is not None
    await first.command(
        "CREATE TABLE t (k UInt64) ENGINE = MergeTree ORDER BY k"
        " SETTINGS non_replicated_deduplication_window = 100"
    )
    await first.insert_json("t", ['{"k": 1}', '{"k": 2}'], "token-1")
    await second.insert_json("t", ['{"k": 1}', '{"k": 2}'], "token-1")  # the same batch again
    assert (await second.query("SELECT count(), sum(k) FROM t")).rows == [[2, 3]]
    with pytest.raises(ClickHouseError) as info:
        await second.query("SELECT nope FROM t")
    assert info.value.code == 47  # UNKNOWN_IDENTIFIER, ClickHouse's code carried over
    assert _host_pid(tmp_path) == pid  # one host for both

    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    # The next call finds the host gone and starts another on the same data.
    deadline = time.monotonic() + 30
    while True:
        try:
            rows = (await first.query("SELECT count() FROM t")).rows
            break
        except ClickHouseError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
    assert rows == [[2]]
    new_pid = _host_pid(tmp_path)
    assert new_pid not in (None, pid)

    await first.close()
    await second.close()
    deadline = time.monotonic() + 30
    while _host_pid(tmp_path) is not None:  # idle: it leaves by itself
        assert time.monotonic() < deadline, "the host outlived its clients"
        await asyncio.sleep(0.5)
