"""Statement figures across the serving processes of one instance (and for the CLI).

Each process writes, every ``interval`` seconds, the figures of the tenants that changed since
its last write: ``<data dir>/run/statements/<pid>/<tenant>.json`` (a ``StatementStats``
export of one tenant; replaced atomically: written beside, then renamed). A reader asking for
one tenant reads that tenant's file of each other process still alive, so the cost of an answer
follows the tenant's statements, not the instance's. A figure is at most ``interval`` seconds
late in another process's answer; a process that died takes its figures with it.

Resets are written to ``resets.json`` and applied by every process when it next writes, so a
reset through any worker resets the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from database_service.statements.stats import StatementStats

__all__ = ["SharedFigures"]

log = logging.getLogger(__name__)

_RESETS = "resets.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _write(path: Path, document: dict[str, Any] | None) -> None:
    """Replace ``path`` atomically (None: remove it)."""
    if document is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    beside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    beside.write_text(json.dumps(document, separators=(",", ":")))
    beside.replace(path)


class SharedFigures:
    def __init__(self, stats: StatementStats, directory: Path, *, interval: float = 2.0) -> None:
        self._stats = stats
        self._dir = directory
        self._interval = interval
        self._pid = os.getpid()
        self._applied: dict[str, float] = {}
        # Writes come from the loop's thread and from ``write`` (a reset): a batch read earlier
        # never replaces a file a later batch wrote.
        self._lock = threading.Lock()
        self._batches = 0
        self._written: dict[Path, int] = {}

    @property
    def own_dir(self) -> Path:
        return self._dir / str(self._pid)

    def peers(self, tenant_id: str) -> list[dict[str, Any]]:
        """The tenant's figures in the other live processes (file reads: call it off the
        event loop, ``asyncio.to_thread``)."""
        found: list[dict[str, Any]] = []
        if not self._dir.is_dir():
            return found
        for process in self._dir.iterdir():
            if not process.name.isdigit() or int(process.name) == self._pid:
                continue
            if not _alive(int(process.name)):
                continue
            document = _read(process / f"{tenant_id}.json")
            if document is not None:
                found.append(document)
        return found

    def reset(self, tenant_id: str | None) -> None:
        """Reset here at once, and in every other process when it next writes."""
        self._stats.reset(tenant_id)
        resets = _read(self._dir / _RESETS) or {}
        resets["*" if tenant_id is None else tenant_id] = (
            self._stats.since if tenant_id is None else self._stats.reset_at(tenant_id)
        )
        self._applied.update(resets)
        _write(self._dir / _RESETS, resets)
        self.write()

    def _apply_resets(self) -> None:
        resets = _read(self._dir / _RESETS) or {}
        for key, at in resets.items():
            if not isinstance(at, int | float) or self._applied.get(key, 0.0) >= at:
                continue
            self._applied[key] = float(at)
            # Resets older than our figures' start were made before this process began.
            if at > self._stats.since:
                self._stats.reset(None if key == "*" else key)

    def _documents(self) -> tuple[int, list[tuple[Path, dict[str, Any] | None]]]:
        """The files to write: the changed tenants' figures (read on the event loop, where
        the request path changes them), numbered."""
        self._apply_resets()
        self._batches += 1
        documents: list[tuple[Path, dict[str, Any] | None]] = []
        for tenant_id in self._stats.changed():
            document = self._stats.export_tenant(tenant_id)
            empty = not document["tenants"][tenant_id] and not document["resets"]
            documents.append((self.own_dir / f"{tenant_id}.json", None if empty else document))
        return self._batches, documents

    def _write_batch(self, batch: tuple[int, list[tuple[Path, dict[str, Any] | None]]]) -> None:
        number, documents = batch
        with self._lock:
            for path, document in documents:
                if self._written.get(path, 0) > number:
                    continue
                _write(path, document)
                self._written[path] = number

    def write(self) -> None:
        """Share the changed figures now (a reset; tests)."""
        self._write_batch(self._documents())

    async def run_forever(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval)
                batch = self._documents()
                try:
                    await asyncio.to_thread(self._write_batch, batch)
                except OSError as exc:
                    log.warning("statement figures not shared: %s", exc)
        finally:
            shutil.rmtree(self.own_dir, ignore_errors=True)
