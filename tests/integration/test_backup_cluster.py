"""Cluster backups against the real server: a base backup verified, the WAL archived as it is
written, a restore to a moment replaying exactly what was committed before it, and a corrupted
backup refused by verify and by restore. The restored cluster is started for real (PostgreSQL's
own programs, as the server's user) and read."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from database_service.backup.cluster import SLOT, ClusterBackups, WalReceiver, find_tools
from database_service.errors import BackupInvalid, FailedPrecondition
from database_service.supervisor import free_port
from tests.fix_pg import PgCluster


async def _backups(pg_cluster: PgCluster, root: Path) -> tuple[ClusterBackups, str]:
    """Backups of the test cluster into ``root``, and the OS user its server runs as."""
    admin = await asyncpg.connect(pg_cluster.admin_dsn)
    try:
        version = int(await admin.fetchval("SHOW server_version_num"))
        data_directory = str(await admin.fetchval("SHOW data_directory"))
    finally:
        await admin.close()
    owner = pwd.getpwuid(os.stat(data_directory).st_uid).pw_name
    return ClusterBackups(root, pg_cluster.admin_dsn, find_tools(version // 10000)), owner


def _as(user: str, argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: the server's own user runs it."""
    return ["runuser", "-u", user, "--", *argv] if os.geteuid() == 0 else argv


@contextlib.asynccontextmanager
async def _started(directory: Path, tools: Path, user: str, database: str) -> AsyncIterator[str]:
    """The restored cluster running (recovered and promoted): a superuser DSN to ``database``."""
    with tempfile.TemporaryDirectory(prefix="dbsvc-restored-sock-") as sock:
        if os.geteuid() == 0:
            await asyncio.to_thread(
                subprocess.run, ["chown", "-R", user, str(directory), sock], check=True
            )
        port = free_port()
        options = f"-p {port} -k {sock} -c listen_addresses= -c shared_preload_libraries="
        pg_ctl = [str(tools / "pg_ctl"), "-D", str(directory)]
        start = [*pg_ctl, "-w", "-t", "120", "-l", str(directory / "restored.log"), "-o", options]
        result = await asyncio.to_thread(
            subprocess.run, _as(user, [*start, "start"]), capture_output=True, text=True
        )
        log = directory / "restored.log"
        if result.returncode != 0:
            pytest.fail(f"{result.stderr}\n{log.read_text() if log.exists() else ''}")
        try:
            dsn = f"postgresql://postgres@/{database}?host={sock}&port={port}"
            conn = await asyncpg.connect(dsn)
            try:
                for _ in range(1200):  # replayed to the target, then promoted
                    if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                        break
                    await asyncio.sleep(0.1)
                else:
                    pytest.fail(f"still recovering: {log.read_text()[-2000:]}")
            finally:
                await conn.close()
            yield dsn
        finally:
            stop = _as(user, [*pg_ctl, "-m", "immediate", "stop"])
            await asyncio.to_thread(subprocess.run, stop, capture_output=True)


async def _drop_slot(pg_cluster: PgCluster) -> None:
    """The archive's slot would keep the test server's WAL forever."""
    admin = await asyncpg.connect(pg_cluster.admin_dsn)
    try:
        for _ in range(100):
            with contextlib.suppress(asyncpg.ObjectInUseError):
                await admin.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = $1",
                    SLOT,
                )
                return
            await asyncio.sleep(0.1)  # pg_receivewal's walsender is still going away
    finally:
        await admin.close()


async def test_a_restore_to_a_moment_holds_exactly_what_was_committed_before_it(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    backups, user = await _backups(pg_cluster, tmp_path / "backups")
    cleanups: list[Callable[[], object]] = []
    receiver = WalReceiver(backups)
    archiving = asyncio.create_task(receiver.run_forever())
    try:
        seen: list[tuple[int, int]] = []
        info = await backups.create(progress=lambda done, total: seen.append((done, total)))
        assert info.state == "done" and info.verified is True, info
        assert seen and seen[-1][0] == seen[-1][1] > 0  # pg_basebackup's progress, to the end
        assert [b.id for b in backups.list_backups()] == [info.id]

        table = f"pitr_{secrets.token_hex(4)}"
        conn = await asyncpg.connect(pg_cluster.dsn)
        try:
            await conn.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, note text)")
            await conn.execute(
                f"INSERT INTO {table} SELECT g, 'before' FROM generate_series(1, 100) g"
            )
            await asyncio.sleep(0.05)
            moment = await conn.fetchval("SELECT clock_timestamp()")
            await asyncio.sleep(0.05)
            await conn.execute(
                f"INSERT INTO {table} SELECT g, 'after' FROM generate_series(101, 200) g"
            )
            await conn.execute(f"UPDATE {table} SET note = 'changed after' WHERE n <= 10")
            await conn.execute(f"DELETE FROM {table} WHERE n BETWEEN 50 AND 60")
            expected = [(n, "before") for n in range(1, 101)]
        finally:
            await conn.close()
        await backups.wait_for_wal()
        assert receiver.status()["state"] == "receiving" and receiver.status()["segments"] > 0

        # Where the server's user can reach it (pytest's tmp_path is private to this user).
        reachable = Path(tempfile.mkdtemp(prefix="dbsvc-restored-"))
        os.chmod(reachable, 0o755)
        cleanups.append(lambda: shutil.rmtree(reachable, ignore_errors=True))
        plan = await backups.restore(reachable / "data", target=moment)
        assert plan.backup_id == info.id and plan.wal_files > 0
        async with _started(plan.directory, backups._tools, user, pg_cluster.database) as dsn:
            restored = await asyncpg.connect(dsn)
            try:
                rows = await restored.fetch(f"SELECT n, note FROM {table} ORDER BY n")
            finally:
                await restored.close()
        assert [tuple(r) for r in rows] == expected
    finally:
        archiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await archiving
        await _drop_slot(pg_cluster)
        for cleanup in cleanups:
            cleanup()


async def test_a_corrupted_backup_is_refused_by_verify_and_by_restore(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    backups, _ = await _backups(pg_cluster, tmp_path / "backups")
    info = await backups.create()
    assert info.verified is True
    version_file = backups.base_dir / info.id / "data" / "PG_VERSION"
    text = version_file.read_text()
    version_file.write_text(text.replace(text[0], chr(ord(text[0]) ^ 1), 1))  # same size

    with pytest.raises(BackupInvalid, match="failed verification"):
        await backups.verify(info.id)
    assert backups.get(info.id).verified is False
    into = tmp_path / "restored"
    with pytest.raises(BackupInvalid):
        await backups.restore(into)
    assert not into.exists()  # nothing written


async def test_a_restore_never_writes_over_a_directory_in_use(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    backups, _ = await _backups(pg_cluster, tmp_path / "backups")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "PG_VERSION").write_text("18\n")
    with pytest.raises(FailedPrecondition, match="not empty"):
        await backups.restore(busy)
    assert [p.name for p in busy.iterdir()] == ["PG_VERSION"]
