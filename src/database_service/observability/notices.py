"""Conditions logged once per episode, not once per request.

When PostgreSQL is unreachable every request fails the same way; a traceback per request buries
the one line that matters. ``Notices.once(key, ...)`` logs the first occurrence of ``key`` (with
what to do) and counts the repeats; after ``quiet_seconds`` without one, the episode is over and
the next occurrence is logged again, with how many were not.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["Notices"]


class Notices:
    def __init__(self, log: logging.Logger, *, quiet_seconds: float = 60.0) -> None:
        self._log = log
        self._quiet = quiet_seconds
        self._last: dict[str, float] = {}
        self._repeats: dict[str, int] = {}

    def once(self, key: str, message: str, *args: Any, level: int = logging.WARNING) -> bool:
        """Log ``message`` unless ``key`` was logged within ``quiet_seconds``; True if logged."""
        now = time.monotonic()
        last = self._last.get(key)
        self._last[key] = now
        if last is not None and now - last < self._quiet:
            self._repeats[key] = self._repeats.get(key, 0) + 1
            return False
        repeats = self._repeats.pop(key, 0)
        suffix = f" ({repeats} more like it since the last notice)" if repeats else ""
        self._log.log(level, message + suffix, *args)
        return True
