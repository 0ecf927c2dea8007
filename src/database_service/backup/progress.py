"""Progress of an export or restore on a terminal: one line redrawn in place (a bar, rows,
MB, rate), or, when stderr is not a terminal (a log, CI), a plain line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from database_service.backup.tenant import BackupProgress

__all__ = ["TerminalProgress", "render"]

_WIDTH = 30


def render(step: BackupProgress, elapsed: float) -> str:
    """``restore [#########.....]  412,000/1,000,000 rows  41% trading_ticks 120,000 rows/s``"""
    total = max(step.rows_total, 1)
    share = min(step.rows_done / total, 1.0)
    filled = int(share * _WIDTH)
    rate = step.rows_done / elapsed if elapsed > 0 else 0.0
    size = (
        f"  {step.bytes_done / 1e6:,.1f}/{step.bytes_total / 1e6:,.1f} MB"
        if step.bytes_total
        else ""
    )
    return (
        f"{step.phase:<7} [{'#' * filled}{'.' * (_WIDTH - filled)}]"
        f" {step.rows_done:,}/{step.rows_total:,} rows {share:4.0%}{size}"
        f"  {step.table}  {rate:,.0f} rows/s"
    )


class TerminalProgress:
    def __init__(self, stream: TextIO | None = None, *, every: float = 0.2) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._every = every if self._tty else 5.0
        self._started = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, step: BackupProgress) -> None:
        now = time.monotonic()
        finished = step.rows_done >= step.rows_total
        if now - self._last < self._every and not finished:
            return
        self._last = now
        line = render(step, now - self._started)
        if self._tty:
            self._stream.write("\r" + line + "\x1b[K")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown and self._tty:
            self._stream.write("\n")
            self._stream.flush()
