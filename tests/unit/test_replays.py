"""The kept replays (``query.replays``): bounded, least recently used dropped first, and an
entry only ever found under everything its request sent."""

from __future__ import annotations

from typing import Any, cast

from database_service.query.replays import Replay, ReplayKey, Replays


def entry(n: int) -> Replay:
    # Only identity matters to the memo: what a Replay holds is the executor's to check.
    return cast("Replay", ("replay", n))


def key(
    n: int, *, token: str = "Bearer t", tenant: str = "a", user: str | None = None
) -> ReplayKey:
    return (token, tenant, user, f"request {n}".encode())


def test_an_entry_is_found_only_under_its_whole_key() -> None:
    replays = Replays()
    replays.keep(key(1), entry(1))
    assert replays.get(key(1)) == entry(1)
    others: list[Any] = [
        key(1, token="Bearer u"),
        key(1, tenant="b"),
        key(1, user="u1"),
        key(1, user=""),
        key(2),
        ("Bearer t", "a", None, b"request 1 "),
    ]
    for other in others:
        assert replays.get(other) is None, other


def test_the_least_recently_used_entry_goes_first() -> None:
    replays = Replays(max_entries=3)
    for n in range(3):
        replays.keep(key(n), entry(n))
    assert replays.get(key(0)) == entry(0)  # used: 1 is now the oldest
    replays.keep(key(3), entry(3))
    assert len(replays) == 3
    assert replays.get(key(1)) is None
    assert [replays.get(key(n)) for n in (0, 2, 3)] == [entry(0), entry(2), entry(3)]


def test_a_dropped_entry_is_gone() -> None:
    replays = Replays()
    replays.keep(key(1), entry(1))
    replays.keep(key(2), entry(2))
    replays.drop(key(1))
    replays.drop(key(9))  # absent: nothing happens
    assert replays.get(key(1)) is None and replays.get(key(2)) == entry(2)
    assert len(replays) == 1
