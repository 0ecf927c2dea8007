"""The embedded servers as the service runs them: a nats-server that cannot listen fails start-up
(another server on the port is not taken for ours), a PostgreSQL in use by another process is
never stopped under it, and a supervised PostgreSQL that dies is started again, logged once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import tempfile
from pathlib import Path

import asyncpg
import psutil
import pytest

from database_service.supervisor import EmbeddedNats, EmbeddedPostgres, StartupError


def postmaster(pgdata: Path) -> psutil.Process | None:
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return None
    pid = int(pid_file.read_text().split()[0])
    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    return process if process.status() != psutil.STATUS_ZOMBIE else None


async def test_nats_fails_start_up_when_its_port_is_taken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="database_service.supervisor")
    with socket.socket() as squatter:  # anything listening there: another nats-server, say
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(StartupError, match=f"NATS port {port} on 127.0.0.1 is in use"):
            async with EmbeddedNats(tmp_path / "nats", port=port):
                pass
    assert "nats-server ready" not in caplog.text
    assert not any(
        "nats-server" in p.info["name"] and str(tmp_path) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(attrs=("name", "cmdline"))
    )


async def test_a_nats_server_that_cannot_listen_is_not_taken_for_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Past the port check (a port taken between check and start): our nats-server exits with
    # "address already in use"; the listener already there must not pass for it.
    monkeypatch.setattr("database_service.supervisor.nats.check_port_free", lambda *a, **k: None)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(StartupError, match=r"exited at start.*address already in use"):
            async with EmbeddedNats(tmp_path / "nats", port=port):
                pass


async def test_postgres_is_never_stopped_under_another_user() -> None:
    with tempfile.TemporaryDirectory(prefix="dbsvc-shared-pg-") as tmp:
        pgdata = Path(tmp) / "pg"
        async with EmbeddedPostgres(pgdata, stop_on_exit=False) as starter:
            # The serving instance (stop_on_exit) attaches to a server another process started
            # and leaves first: the server keeps running for the one still using it.
            async with EmbeddedPostgres(pgdata, stop_on_exit=True) as serving:
                assert serving.dsn == starter.dsn
            assert postmaster(pgdata) is not None
            conn = await asyncpg.connect(starter.dsn)
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()
        # The starter, now the last user, stops what it started.
        assert postmaster(pgdata) is None


async def test_a_supervised_postgres_that_dies_is_restarted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="database_service.supervisor")
    with tempfile.TemporaryDirectory(prefix="dbsvc-supervised-pg-") as tmp:
        pgdata = Path(tmp) / "pg"
        async with EmbeddedPostgres(pgdata, supervise=True, check_interval=0.2) as pg:
            first = postmaster(pgdata)
            assert first is not None
            os.kill(first.pid, signal.SIGKILL)
            for _ in range(150):
                await asyncio.sleep(0.2)
                again = postmaster(pgdata)
                if again is not None and again.pid != first.pid and pg.problem is None:
                    break
            else:
                raise AssertionError(f"not restarted: {pg.problem}\n{caplog.text}")
            for _ in range(50):
                try:
                    conn = await asyncpg.connect(pg.dsn)
                except (OSError, asyncpg.PostgresError):
                    await asyncio.sleep(0.2)
                    continue
                assert await conn.fetchval("SELECT 1") == 1
                await conn.close()
                break
            else:
                raise AssertionError("restarted PostgreSQL does not accept connections")
            assert pg.restarts == 1
        assert postmaster(pgdata) is None
    assert caplog.text.count("has stopped; restarting it") == 1, caplog.text
    assert caplog.text.count("embedded PostgreSQL is back") == 1, caplog.text


async def test_a_postgres_that_cannot_start_fails_start_up_with_the_reason() -> None:
    with tempfile.TemporaryDirectory(prefix="dbsvc-broken-pg-") as tmp:
        pgdata = Path(tmp) / "pg"
        async with EmbeddedPostgres(pgdata):
            pass
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\nmax_connections = lots\n")
        with pytest.raises(StartupError) as failed:
            async with EmbeddedPostgres(pgdata):
                raise AssertionError("reported ready")
        message = str(failed.value)
        assert "embedded PostgreSQL did not start" in message
        assert "max_connections" in message, message  # the server log's reason, not just pg_ctl's
        assert postmaster(pgdata) is None
