"""The tenant backup file on its own (no PostgreSQL): written, signed, read back; every way of
damaging or forging it is refused with a stable code."""

from __future__ import annotations

import asyncio
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from database_service.backup.archive import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ArchiveReader,
    ArchiveWriter,
    canonical,
    sign,
)
from database_service.backup.progress import render
from database_service.backup.tenant import BackupProgress, _create_table, _renamer
from database_service.errors import BackupCorrupt, BackupUnsupported

KEY = b"k" * 32


def _write(path: Path, tables: dict[str, bytes], key: bytes = KEY, **extra: Any) -> dict[str, Any]:
    writer = ArchiveWriter(path)
    entries = []
    for index, (name, data) in enumerate(tables.items()):
        member = f"data/{index:04d}.copy"
        with writer.member(member) as sink:
            for start in range(0, len(data), 7):
                asyncio.run(sink(data[start : start + 7]))
        entries.append(
            {"kind": "tenant", "name": name, "member": member, "rows": 1, "bytes": sink.bytes,
             "sha256": sink.sha256, "columns": ["a"]}
        )  # fmt: skip
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tenant_id": "acme",
        "tables": entries,
        **extra,
    }
    return writer.finish(manifest, key)


def _rewrite(src: Path, dst: Path, change: Any) -> None:
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            b.writestr(item.filename, change(item.filename, a.read(item)))


def test_round_trip_verifies_and_reads_every_member(tmp_path: Path) -> None:
    path = tmp_path / "t.dbsvc-backup"
    tables = {"users": b"\x00binary\xffcopy" * 100, "empty": b""}
    signed = _write(path, tables)
    assert path.stat().st_mode & 0o777 == 0o600
    assert not path.with_name(path.name + ".partial").exists()
    with ArchiveReader.open(path, KEY) as archive:
        assert archive.manifest == signed
        archive.verify()
        for table in archive.tables():
            assert b"".join(archive.chunks(table)) == tables[table["name"]]
    # Standard tools read it: the manifest is a plain member.
    with zipfile.ZipFile(path) as plain:
        assert json.loads(plain.read(MANIFEST))["tenant_id"] == "acme"


def test_signature_covers_everything_but_itself() -> None:
    manifest = {"b": 1, "a": [1, 2]}
    assert canonical({**manifest, "signature": "x"}) == canonical(manifest) == b'{"a":[1,2],"b":1}'
    assert sign(manifest, KEY) != sign({**manifest, "b": 2}, KEY)
    assert sign(manifest, KEY) != sign(manifest, b"other" * 8)


@pytest.mark.parametrize("position", [0.1, 0.5, 0.9])
def test_a_flipped_byte_anywhere_is_refused(tmp_path: Path, position: float) -> None:
    path = tmp_path / "t.dbsvc-backup"
    _write(path, {"users": bytes(range(256)) * 40})
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(BackupCorrupt) as refused:
        with ArchiveReader.open(path, KEY) as archive:
            archive.verify()
    assert refused.value.error_code == "backup_corrupt"


def test_changed_data_with_a_valid_zip_is_refused_by_checksum(tmp_path: Path) -> None:
    path, changed = tmp_path / "a", tmp_path / "b"
    _write(path, {"users": b"x" * 1000})
    _rewrite(path, changed, lambda name, data: b"y" * 1000 if name != MANIFEST else data)
    with (
        ArchiveReader.open(changed, KEY) as archive,
        pytest.raises(BackupCorrupt, match="checksum"),
    ):
        archive.verify()


def test_an_edited_manifest_or_another_key_is_refused(tmp_path: Path) -> None:
    path, edited = tmp_path / "a", tmp_path / "b"
    _write(path, {"users": b"x"})

    def retarget(name: str, data: bytes) -> bytes:
        if name != MANIFEST:
            return data
        body = json.loads(data)
        body["tenant_id"] = "victim"
        return json.dumps(body).encode()

    _rewrite(path, edited, retarget)
    with pytest.raises(BackupCorrupt, match="signature"):
        ArchiveReader.open(edited, KEY)
    with pytest.raises(BackupCorrupt, match="signature"):
        ArchiveReader.open(path, b"z" * 32)


def test_an_extra_or_missing_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a"
    _write(path, {"users": b"x"})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("data/9999.copy", b"smuggled")
    with ArchiveReader.open(path, KEY) as archive, pytest.raises(BackupCorrupt, match="members"):
        archive.verify()


def test_other_format_versions_and_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a"
    _write(path, {})
    future = tmp_path / "future"
    _rewrite(
        path,
        future,
        lambda name, data: json.dumps({**json.loads(data), "format_version": 99}).encode(),
    )
    with pytest.raises(BackupUnsupported) as refused:
        ArchiveReader.open(future, KEY)
    assert refused.value.error_code == "backup_unsupported"
    text = tmp_path / "text"
    text.write_text("hello")
    with pytest.raises(BackupCorrupt, match="not a tenant backup"):
        ArchiveReader.open(text, KEY)
    with pytest.raises(BackupCorrupt, match="no backup file"):
        ArchiveReader.open(tmp_path / "absent", KEY)
    no_manifest = tmp_path / "nomanifest"
    with zipfile.ZipFile(no_manifest, "w") as archive:
        archive.writestr("x", b"y")
    with pytest.raises(BackupCorrupt, match=r"no manifest\.json"):
        ArchiveReader.open(no_manifest, KEY)


def test_aborted_writes_leave_nothing(tmp_path: Path) -> None:
    path = tmp_path / "a"
    writer = ArchiveWriter(path)
    with writer.member("data/0000.copy") as sink:
        asyncio.run(sink(b"half"))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_definitions_are_renamed_to_the_target_schema_only_as_whole_names() -> None:
    rename = _renamer("t_0123abcd", "t_ffff0000")
    assert (
        rename("CREATE INDEX i ON t_0123abcd.notes (x)") == "CREATE INDEX i ON t_ffff0000.notes (x)"
    )
    assert rename('SELECT "t_0123abcd".f()') == 'SELECT "t_ffff0000".f()'
    assert rename("SELECT t_0123abcdx, xt_0123abcd") == "SELECT t_0123abcdx, xt_0123abcd"
    same = _renamer("t_1", "t_1")
    assert same("t_1.x") == "t_1.x"


def test_table_definitions_from_the_manifest() -> None:
    table = {
        "name": "notes",
        "unlogged": False,
        "columns": [
            {"name": "id", "type": "bigint", "not_null": True, "default": None, "identity": "a",
             "generated": None},
            {"name": "n", "type": "numeric", "not_null": False, "default": None, "identity": None,
             "generated": "s", },
            {"name": "body", "type": "text", "not_null": True, "default": "'x'::text",
             "identity": None, "generated": None},
        ],
    }  # fmt: skip
    table["columns"][1]["default"] = "(amount * 2)"
    assert _create_table("t_1", table, lambda s: s) == (
        'CREATE TABLE "t_1"."notes" ("id" bigint GENERATED ALWAYS AS IDENTITY NOT NULL,'
        ' "n" numeric GENERATED ALWAYS AS ((amount * 2)) STORED,'
        " \"body\" text DEFAULT 'x'::text NOT NULL)"
    )


def test_progress_line() -> None:
    line = render(BackupProgress("restore", "trading_ticks", 500, 1000, 5_000_000, 10_000_000), 2.0)
    assert "[###############...............]" in line
    assert "500/1,000 rows" in line and "50%" in line and "250 rows/s" in line
    assert "5.0/10.0 MB" in line
