"""Cluster backup throughput and point-in-time restore time (issue #14), on a private PostgreSQL
of ``--gb`` gigabytes (default 5).

In one run:

- **baseline**: ``pg_basebackup`` alone (plain format, WAL streamed, SHA-256 manifest): what
  PostgreSQL's own tool takes;
- **ours**: ``ClusterBackups.create`` (the same ``pg_basebackup``, then the verification of
  every file against the manifest and of the WAL) while the WAL archive (``pg_receivewal``)
  runs; the verification alone is timed again;
- **restore**: a moment noted between two writes, ``ClusterBackups.restore`` to it (verify,
  copy, stage the WAL, configure), then the restored cluster started until it has replayed to
  the moment and promoted, and the rows compared.

The last line is one JSON object (``{"bench": "backup", ...}``).

    .venv/bin/python bench/backup.py [--gb 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from harness import reporting

from database_service.backup.cluster import SLOT, ClusterBackups, WalReceiver, find_tools
from database_service.supervisor import EmbeddedPostgres, free_port

ROW = "repeat(md5(g::text), 3)"  # 96 characters: rows of about 130 bytes on disk


def _as(user: str, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if os.geteuid() == 0 else argv


async def sh(argv: list[str], *, check: bool = True) -> None:
    """A program run to its end (off the event loop)."""
    await asyncio.to_thread(subprocess.run, argv, check=check, capture_output=not check)


async def load(dsn: str, gigabytes: float) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE bulk (id bigint PRIMARY KEY, payload text)")
        batch = 2_000_000
        done = 0
        started = time.perf_counter()
        while await conn.fetchval("SELECT pg_database_size(current_database())") < gigabytes * 1e9:
            await conn.execute(
                f"INSERT INTO bulk SELECT g, {ROW} FROM generate_series($1::bigint, $2) g",
                done + 1,
                done + batch,
            )
            done += batch
            size = await conn.fetchval("SELECT pg_database_size(current_database())")
            print(f"\r  loaded {done:,} rows, {size / 1e9:.2f} GB", end="", flush=True)
        print(f" in {time.perf_counter() - started:.0f} s")
        await conn.execute("CHECKPOINT")
        return int(await conn.fetchval("SELECT sum(pg_database_size(oid)) FROM pg_database"))
    finally:
        await conn.close()


async def main(args: argparse.Namespace, figures: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="dbsvc-bench-backup-", dir=args.dir) as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)  # the restored cluster's user must reach its directory
        async with EmbeddedPostgres(root / "pg", stop_on_exit=True) as pg:
            admin = await asyncpg.connect(pg.dsn)
            version = int(await admin.fetchval("SHOW server_version_num"))
            data_directory = str(await admin.fetchval("SHOW data_directory"))
            await admin.close()
            user = pwd.getpwuid(os.stat(data_directory).st_uid).pw_name
            tools = find_tools(version // 10000)
            print(f"PostgreSQL {version}, loading {args.gb:g} GB ...", flush=True)
            cluster_bytes = await load(pg.dsn, args.gb)
            figures["cluster_bytes"] = cluster_bytes
            gb = cluster_bytes / 1e9
            print(f"cluster: {gb:.2f} GB")

            raw = root / "raw"
            started = time.perf_counter()
            await sh(
                [str(tools / "pg_basebackup"), "-d", pg.dsn, "-D", str(raw), "-F", "p",
                 "-X", "stream", "--checkpoint=fast", "--manifest-checksums=SHA256"],
                check=True,
            )  # fmt: skip
            raw_s = time.perf_counter() - started
            shutil.rmtree(raw)
            print(f"baseline pg_basebackup:        {raw_s:7.1f} s  {gb / raw_s * 1000:7.0f} MB/s")

            backups = ClusterBackups(root / "backups", pg.dsn, tools)
            receiver = WalReceiver(backups)
            archiving = asyncio.create_task(receiver.run_forever())
            try:
                started = time.perf_counter()
                info = await backups.create()
                ours_s = time.perf_counter() - started
                assert info.verified, info
                started = time.perf_counter()
                await backups.verify(info.id)
                verify_s = time.perf_counter() - started
                print(
                    f"ours (base backup + verify):   {ours_s:7.1f} s  {gb / ours_s * 1000:7.0f} MB/s"
                    f"  ({ours_s / raw_s:.2f}x the baseline's time; verification alone"
                    f" {verify_s:.1f} s)"
                )
                conn = await asyncpg.connect(pg.dsn)
                await conn.execute("CREATE TABLE marks (n int)")
                await conn.execute("INSERT INTO marks SELECT generate_series(1, 1000)")
                moment = await conn.fetchval("SELECT clock_timestamp()")
                await asyncio.sleep(0.05)
                await conn.execute("INSERT INTO marks SELECT generate_series(1001, 2000)")
                await conn.execute("UPDATE bulk SET payload = 'after' WHERE id <= 100000")
                await conn.close()
                await backups.wait_for_wal()

                started = time.perf_counter()
                plan = await backups.restore(root / "restored", target=moment)
                prepare_s = time.perf_counter() - started
                await sh(["chown", "-R", user, str(plan.directory)], check=True)
                sock = root / "sock"
                sock.mkdir()
                await sh(["chown", user, str(sock)], check=True)
                port = free_port()
                pg_ctl = [str(tools / "pg_ctl"), "-D", str(plan.directory)]
                options = f"-p {port} -k {sock} -c listen_addresses= -c shared_preload_libraries="
                started = time.perf_counter()
                await sh(
                    _as(user, [*pg_ctl, "-w", "-t", "600", "-l", str(plan.directory / "restored.log"),
                               "-o", options, "start"]),
                )  # fmt: skip
                try:
                    restored = await asyncpg.connect(
                        f"postgresql://postgres@/postgres?host={sock}&port={port}"
                    )
                    for _ in range(12_000):  # replayed to the moment, then promoted
                        if not await restored.fetchval("SELECT pg_is_in_recovery()"):
                            break
                        await asyncio.sleep(0.05)
                    replay_s = time.perf_counter() - started
                    marks = await restored.fetchval("SELECT count(*) FROM marks")
                    changed = await restored.fetchval(
                        "SELECT count(*) FROM bulk WHERE payload = 'after'"
                    )
                    await restored.close()
                finally:
                    await sh(_as(user, [*pg_ctl, "-m", "immediate", "stop"]), check=False)
                assert (marks, changed) == (1000, 0), (marks, changed)
                print(
                    f"restore to a moment:           {prepare_s + replay_s:7.1f} s"
                    f"  (verify + copy + stage WAL {prepare_s:.1f} s, start + replay + promote"
                    f" {replay_s:.1f} s); the rows are those of the moment"
                )
            finally:
                archiving.cancel()
                await asyncio.gather(archiving, return_exceptions=True)
                admin = await asyncpg.connect(pg.dsn)
                await asyncio.sleep(0.5)
                await admin.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                    " WHERE slot_name = $1",
                    SLOT,
                )
                await admin.close()
    figures |= {
        "raw_basebackup_s": raw_s,
        "base_backup_s": ours_s,
        "base_backup_mb_s": gb / ours_s * 1000,
        "vs_pg_basebackup": ours_s / raw_s,
        "verify_s": verify_s,
        "restore_prepare_s": prepare_s,
        "restore_replay_s": replay_s,
        "restore_total_s": prepare_s + replay_s,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=5.0, help="the cluster's size to reach")
    parser.add_argument("--dir", help="where the cluster, the backups and the restore go")
    arguments = parser.parse_args()
    # Its last line, printed by harness.reporting on exit (and on interruption):
    # {"bench": "backup", ...the figures below}
    with reporting("backup") as out:
        uvloop.run(main(arguments, out))
