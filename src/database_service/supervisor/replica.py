"""A streaming replica of the service's PostgreSQL, from the same binaries: for tests, and for
``make run`` users who want one (``database-service replica start``).

``pg_basebackup --write-recovery-conf`` copies the primary into a new directory configured to
follow it (``standby.signal``, ``primary_conninfo``); ``pg_ctl`` starts it on its own port and
socket directory, as the primary's own system user (PostgreSQL refuses to run as root). The
owner DSN it returns goes into ``DBSVC_POSTGRES_REPLICA_URLS``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
from pathlib import Path

import asyncpg

from database_service.backup.cluster import RECOVERY_SETTINGS, find_tools

__all__ = ["replica_dsn", "restart_replica", "start_replica", "stop_replica"]


def _as(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user and os.geteuid() == 0 else argv


async def _run(argv: list[str]) -> None:
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} … failed: {(done.stderr or done.stdout)[-800:]}")


async def _primary(primary_dsn: str) -> tuple[Path, str | None, str]:
    """The primary's programs (of its major version), the system user its server runs as, and
    the server options a standby must match (max_connections… at least the primary's, or it
    refuses to replay)."""
    conn = await asyncpg.connect(primary_dsn)
    try:
        version = int(await conn.fetchval("SHOW server_version_num"))
        data_directory = str(await conn.fetchval("SHOW data_directory"))
        rows = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[])",
            list(RECOVERY_SETTINGS),
        )
    finally:
        await conn.close()
    matched = " ".join(f"-c {r['name']}={r['setting']}" for r in rows)
    try:
        user: str | None = pwd.getpwuid(os.stat(data_directory).st_uid).pw_name
    except OSError:  # not on this machine: run as ourselves
        user = None
    return find_tools(version // 10000), user, matched


def _new_directory(directory: Path, data: Path) -> None:
    if data.exists():
        raise RuntimeError(f"{data} exists: a replica is made afresh")
    directory.mkdir(parents=True, exist_ok=True)
    # The server's user (not us, when we are root) reaches its data and socket below.
    os.chmod(directory, 0o755)  # noqa: S103 - holds only the 0700 data directory and a socket
    (directory / "sock").mkdir(exist_ok=True)


def replica_dsn(directory: Path, port: int) -> str:
    return f"postgresql://postgres@/postgres?host={directory / 'sock'}&port={port}"


async def start_replica(primary_dsn: str, directory: Path, port: int) -> str:
    """A replica of ``primary_dsn`` in ``directory`` (new), listening on ``port`` and on a
    socket in ``directory/sock``; its owner DSN once it accepts connections."""
    tools, user, matched = await _primary(primary_dsn)
    data = directory / "data"
    await asyncio.to_thread(_new_directory, directory, data)
    await _run(
        [str(tools / "pg_basebackup"), "-d", primary_dsn, "-D", str(data), "-X", "stream",
         "--write-recovery-conf", "--checkpoint=fast", "--no-password"]
    )  # fmt: skip
    if user is not None and os.geteuid() == 0:
        await _run(["chown", "-R", user, str(data), str(directory / "sock")])
    await _start(tools, user, directory, port, matched)
    return replica_dsn(directory, port)


async def _start(tools: Path, user: str | None, directory: Path, port: int, matched: str) -> None:
    data = directory / "data"
    options = f"-p {port} -k {directory / 'sock'} -c listen_addresses= -c hot_standby=on {matched}"
    await _run(
        _as(user, [str(tools / "pg_ctl"), "-D", str(data), "-w", "-t", "120",
                   "-l", str(data / "replica.log"), "-o", options, "start"])
    )  # fmt: skip


async def stop_replica(primary_dsn: str, directory: Path, *, mode: str = "fast") -> None:
    """Stop the replica in ``directory`` (``mode``: fast, or immediate as a crash would)."""
    tools, user, _ = await _primary(primary_dsn)
    await _run(_as(user, [str(tools / "pg_ctl"), "-D", str(directory / "data"), "-m", mode,
                          "-w", "stop"]))  # fmt: skip


async def restart_replica(primary_dsn: str, directory: Path, port: int) -> None:
    """Start a stopped replica again (it catches up from the primary)."""
    tools, user, matched = await _primary(primary_dsn)
    await _start(tools, user, directory, port, matched)
