"""The tenant backup file: a zip archive (stored, not compressed) of binary COPY streams and a
signed manifest.

Why a zip: standard tools can list it and print its manifest (``unzip -p FILE manifest.json``),
and members can be written as a stream (no size needed up front), so an export writes each
table once, straight from PostgreSQL's COPY into the file. Members are stored: binary COPY of
numbers barely compresses and deflate would cost more CPU than the disk saves.

The manifest names the format version, the service and PostgreSQL versions, the tenant, and per
table its row count, byte count and SHA-256. It is signed with an HMAC-SHA256 keyed from the
service's master key (purpose ``tenant-backups``), so every member is covered through its
checksum: a byte changed anywhere, a member swapped, or the tenant id edited is refused
(``backup_corrupt``). A tenant may hold its own export but cannot make a file the service
accepts for another tenant.

Everything here is pure file handling (no sockets): the unit tests drive it directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from database_service.errors import BackupCorrupt, BackupUnsupported

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "ArchiveReader",
    "ArchiveWriter",
    "MemberSink",
    "canonical",
    "sign",
]

FORMAT = "dbsvc-tenant-backup"
# 2: vector collections of an external store (``collections``, JSON-lines members). A version 1
# file is read as one without them; a service that reads only 1 refuses a 2 rather than
# restoring it without its collections.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# Far above any export's manifest (a few hundred bytes per table and collection).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_CHUNK = 1 << 20


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes the signature covers: the manifest without its signature, keys sorted."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign(manifest: dict[str, Any], key: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, canonical(manifest), hashlib.sha256).hexdigest()


class MemberSink:
    """One member being written: counts and hashes what passes (COPY's output callback)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self.bytes = 0

    async def __call__(self, chunk: bytes) -> None:
        # Called by asyncpg for every chunk of COPY's output. The write goes to the page cache
        # (microseconds), so it stays on the event loop rather than paying a thread per chunk.
        self._handle.write(chunk)
        self._hash.update(chunk)
        self.bytes += len(chunk)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


def private_file(path: Path) -> BinaryIO:
    """A new file only its owner can read (backups hold a tenant's whole data)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb")


class ArchiveWriter:
    """Writes ``path`` via ``path.partial``, renamed into place once the signed manifest is in:
    a file under the final name is always whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._partial = path.with_name(path.name + ".partial")
        self._file = private_file(self._partial)
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)

    @contextlib.contextmanager
    def member(self, name: str) -> Iterator[MemberSink]:
        with self._zip.open(name, "w", force_zip64=True) as handle:
            yield MemberSink(handle)  # type: ignore[arg-type]

    def finish(self, manifest: dict[str, Any], key: bytes) -> dict[str, Any]:
        signed = {**manifest, "signature": sign(manifest, key)}
        self._zip.writestr(MANIFEST, json.dumps(signed, indent=2, sort_keys=True))
        self._zip.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)
        return signed

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._zip.close()
        with contextlib.suppress(Exception):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._partial.unlink()


@dataclass
class ArchiveReader:
    """An archive whose manifest is verified (format, version, signature) on opening; members
    are verified by ``verify`` (all of them, before anything is changed) and again while they
    are read (``chunks``), so a file changed in between is still caught."""

    path: Path
    manifest: dict[str, Any]
    _zip: zipfile.ZipFile

    @classmethod
    def open(cls, path: Path, key: bytes) -> ArchiveReader:
        try:
            archive = zipfile.ZipFile(path, "r")
        except FileNotFoundError:
            raise BackupCorrupt(f"no backup file at {path}") from None
        except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:
            raise BackupCorrupt(f"{path.name}: not a tenant backup (unreadable: {exc})") from None
        try:
            return cls(path, read_manifest(archive, key), archive)
        except BaseException:
            archive.close()
            raise

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tables(self) -> list[dict[str, Any]]:
        return list(self.manifest["tables"])

    def collections(self) -> list[dict[str, Any]]:
        """Vector collections of an external store (Weaviate), JSON lines each (version 2)."""
        return list(self.manifest.get("collections") or [])

    def verify(self) -> None:
        """Every member's size and SHA-256 against the manifest; nothing else in the file."""
        members = [*self.tables(), *self.collections()]
        expected = {t["member"] for t in members} | {MANIFEST}
        present = set(self._zip.namelist())
        if present != expected:
            extra = sorted(present - expected)[:3]
            missing = sorted(expected - present)[:3]
            raise BackupCorrupt(
                f"{self.path.name}: members do not match the manifest"
                f" (unexpected {extra}, missing {missing})"
            )
        for member in members:
            for _ in self.chunks(member):
                pass

    def chunks(self, table: dict[str, Any]) -> Iterator[bytes]:
        """The member's bytes; raises ``BackupCorrupt`` at the end when they differ from the
        manifest (a caller loading them into PostgreSQL then rolls back)."""
        digest = hashlib.sha256()
        size = 0
        try:
            with self._zip.open(table["member"], "r") as handle:
                while chunk := handle.read(_CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk
        except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError,
                NotImplementedError, RuntimeError) as exc:  # fmt: skip
            raise BackupCorrupt(f"{self.path.name}: {table['member']} is damaged ({exc})") from None
        if size != table["bytes"] or not hmac.compare_digest(digest.hexdigest(), table["sha256"]):
            raise BackupCorrupt(
                f"{self.path.name}: the checksum of {table['name']!r} does not match the"
                " manifest; the file is damaged or was changed"
            )


def read_manifest(archive: zipfile.ZipFile, key: bytes) -> dict[str, Any]:
    # A tenant administrator may upload any bytes as its own export, and this is read before
    # the signature can be checked: the manifest's declared size bounds what is inflated (a
    # few hundred KiB of deflate can declare gigabytes), and nesting deeper than the JSON
    # parser's stack is refused like any other damage (it was a RecursionError, a 500).
    try:
        info = archive.getinfo(MANIFEST)
    except KeyError:
        raise BackupCorrupt("not a tenant backup: it has no manifest.json") from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise BackupCorrupt(
            f"the manifest declares {info.file_size} bytes; a tenant backup's has at most"
            f" {MAX_MANIFEST_BYTES}: the file is damaged or not an export"
        )
    try:
        raw = archive.read(info)
    # NotImplementedError: a compression method zipfile lacks; RuntimeError: encrypted.
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError) as exc:  # fmt: skip
        raise BackupCorrupt(f"the manifest is damaged ({exc})") from None
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        raise BackupCorrupt("the manifest is not valid JSON: the file is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupCorrupt("not a tenant backup (the manifest names another format)")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise BackupUnsupported(
            f"backup format version {version!r}: this service reads versions"
            f" {', '.join(map(str, READABLE_VERSIONS))}"
        )
    signature = manifest.get("signature")
    if not isinstance(signature, str) or not hmac.compare_digest(signature, sign(manifest, key)):
        raise BackupCorrupt(
            "the backup's signature does not match: it was changed, or made by a deployment"
            " with another master key"
        )
    return manifest
