"""Memoised functions of a caller's text, bounded by the text's length as well as by entries.

``functools.lru_cache`` bounds a cache by entries only. Where the key is a statement a caller
sent, one entry may be up to ``DBSVC_MAX_SQL_BYTES`` (1 MiB by default): 4,096 distinct long
statements would keep 4 GiB. ``short_text_cache`` keeps results for texts up to ``max_chars``
and computes a longer one's every time (a long statement is rare, and pays for its own parse).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

__all__ = ["KEPT_CHARS", "short_text_cache"]

KEPT_CHARS = 16_384  # the longest text whose result is kept

T = TypeVar("T")


def short_text_cache(
    maxsize: int, max_chars: int = KEPT_CHARS
) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    def decorate(compute: Callable[[str], T]) -> Callable[[str], T]:
        cached = functools.lru_cache(maxsize=maxsize)(compute)

        @functools.wraps(compute)
        def call(text: str) -> T:
            return cached(text) if len(text) <= max_chars else compute(text)

        return call

    return decorate
