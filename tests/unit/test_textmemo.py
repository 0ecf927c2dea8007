"""Memoised functions of a caller's text keep short texts' results only."""

from __future__ import annotations

from database_service.textmemo import short_text_cache


def test_a_short_texts_result_is_kept_and_a_long_ones_is_computed_each_time() -> None:
    calls: list[str] = []

    @short_text_cache(maxsize=8, max_chars=10)
    def length(text: str) -> int:
        calls.append(text)
        return len(text)

    assert [length("short"), length("short")] == [5, 5]
    assert calls == ["short"]  # kept
    long = "x" * 11
    assert [length(long), length(long)] == [11, 11]
    assert calls == ["short", long, long]  # not kept
    assert length.__name__ == "length"
