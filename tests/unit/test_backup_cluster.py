"""The cluster backups' pure parts: pg_basebackup's progress, the WAL names a restore replays,
the settings it writes, and pg_verifybackup's checks of a manifest (made here as PostgreSQL
writes one)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from database_service.backup.cluster import (
    BackupInfo,
    ClusterBackups,
    manifest_problems,
    parse_progress,
    restore_settings,
    staged_wal_name,
)


def test_progress_is_the_last_figure_of_a_chunk_in_bytes() -> None:
    chunk = b"    12/30811 kB (0%), 0/1 tablespace\r30811/30811 kB (100%), 1/1 tablespace\r"
    assert parse_progress(chunk) == (30811 * 1024, 30811 * 1024)
    assert parse_progress(b"pg_basebackup: checkpoint completed\n") is None


def test_a_partial_segment_is_replayed_under_its_full_name_and_nothing_else_is() -> None:
    assert staged_wal_name("000000010000000000000003") == "000000010000000000000003"
    assert staged_wal_name("000000010000000000000004.partial") == "000000010000000000000004"
    assert staged_wal_name("00000002.history") == "00000002.history"
    for other in ("dbsvc_backup.json", "000000010000000000000004.tmp", "../x", "archive_status"):
        assert staged_wal_name(other) is None


def test_restore_settings_stop_at_the_moment_with_the_primarys_sizes() -> None:
    moment = dt.datetime(2026, 12, 2, 23, 0, 1, 500_000, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    text = restore_settings(
        Path("/r/it's"),
        moment,
        {"max_connections": "300", "max_wal_senders": "10", "work_mem": "4MB", "x": "1; evil"},
    )
    assert "restore_command = 'cp \"/r/it''s/%f\" \"%p\"'" in text
    assert "recovery_target_time = '2026-12-02T22:00:01.500000+00:00'" in text  # in UTC
    assert "max_connections = '300'" in text and "max_wal_senders = '10'" in text
    assert "work_mem" not in text and "evil" not in text  # only the sizes recovery checks
    assert "recovery_target_action = 'promote'" in text
    assert "recovery_target_time =" not in restore_settings(Path("/r"), None)


def _backup(tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A plain-format backup with a manifest as PostgreSQL writes it (SHA-256 checksums)."""
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    entries = [
        {
            "Path": name,
            "Size": len(content),
            "Last-Modified": "2026-12-02 23:00:00 GMT",
            "Checksum-Algorithm": "SHA256",
            "Checksum": hashlib.sha256(content).hexdigest(),
        }
        for name, content in files.items()
    ]
    body = (
        '{ "PostgreSQL-Backup-Manifest-Version": 2,\n"System-Identifier": 1,\n"Files": [\n'
        + ",\n".join(json.dumps(e) for e in entries)
        + ' ],\n"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN":'
        ' "0/2000100" }\n],\n'
    )
    checksum = hashlib.sha256(body.encode()).hexdigest()
    (tmp_path / "backup_manifest").write_text(body + f'"Manifest-Checksum": "{checksum}"}}\n')
    return tmp_path


def test_an_intact_backup_has_no_problems(tmp_path: Path) -> None:
    data = _backup(tmp_path, {"PG_VERSION": b"18\n", "base/1/1259": b"\0" * 8192})
    (data / "pg_wal").mkdir()
    (data / "pg_wal" / "000000010000000000000002").write_bytes(b"wal")  # checked by pg_waldump
    (data / "postgresql.auto.conf").write_text("# a restore writes here\n")
    assert manifest_problems(data) == []


def test_every_kind_of_damage_is_named(tmp_path: Path) -> None:
    data = _backup(
        tmp_path, {"PG_VERSION": b"18\n", "base/1/1259": b"\0" * 8192, "global/1262": b"x"}
    )
    (data / "PG_VERSION").write_bytes(b"19\n")  # same size, other content
    (data / "base/1/1259").write_bytes(b"\0" * 100)  # truncated
    (data / "global/1262").unlink()
    (data / "base/1/9999").write_bytes(b"planted")
    assert sorted(manifest_problems(data)) == [
        "PG_VERSION: checksum mismatch",
        "base/1/1259: 100 bytes, the manifest says 8192",
        "base/1/9999: present but not in the manifest",
        "global/1262: missing",
    ]


def test_an_edited_manifest_fails_its_own_checksum(tmp_path: Path) -> None:
    data = _backup(tmp_path, {"PG_VERSION": b"18\n"})
    manifest = data / "backup_manifest"
    manifest.write_text(manifest.read_text().replace('"Size": 3', '"Size": 3 '))
    assert manifest_problems(data) == ["backup_manifest: its own checksum does not match"]
    manifest.write_text("not json")
    assert manifest_problems(data)[0].startswith("backup_manifest unreadable")


def test_pruning_keeps_the_newest_backups_and_the_wal_they_need(tmp_path: Path) -> None:
    backups = ClusterBackups(tmp_path, "postgresql:///x", tmp_path / "bin")
    made = []
    for i, (state, start) in enumerate(
        [
            ("done", "0/1000028"),
            ("failed", "0/2000028"),
            ("done", "0/3000060"),
            ("done", "0/5000028"),
        ]
    ):
        info = BackupInfo(id=f"2026120{i}T000000Z-abcdef", started_at="x", state=state,
                          start_lsn=start)  # fmt: skip
        (backups.base_dir / info.id / "data").mkdir(parents=True)
        backups._save(info)
        made.append(info.id)
    backups.wal_dir.mkdir()
    for segment in range(1, 7):
        (backups.wal_dir / f"0000000100000000{segment:08X}").write_bytes(b"")
    (backups.wal_dir / "000000010000000000000007.partial").write_bytes(b"")

    assert backups.prune(keep=2) == [made[0], made[1]]
    assert [b.id for b in backups.list_backups()] == made[2:]
    # The oldest kept backup starts in segment 3: 1 and 2 go, 3 on (and the partial) stay.
    assert sorted(p.name for p in backups.wal_dir.iterdir()) == [
        *(f"0000000100000000{s:08X}" for s in range(3, 7)),
        "000000010000000000000007.partial",
    ]
