"""The kept replays (``query.replays``): bounded, least recently used dropped first, and an
entry only ever found under everything its request sent."""

from __future__ import annotations

from typing import Any, cast

from database_service.query.replays import MAX_KEPT, Checked, CheckedKey, Replay, ReplayKey, Replays


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


def test_a_long_request_is_not_kept() -> None:
    """The memo is bounded by entries; what a caller sends is not: a request or statement past
    MAX_KEPT is answered the whole way every time rather than held."""
    replays: Replays[ReplayKey, Replay] = Replays()
    long_key = ("Bearer t", "a", None, b"x" * (MAX_KEPT + 1))
    replays.keep(long_key, entry(1))
    assert replays.get(long_key) is None and len(replays) == 0
    limit_key = ("Bearer t", "a", None, b"x" * MAX_KEPT)
    replays.keep(limit_key, entry(2))
    assert replays.get(limit_key) == entry(2)
    checked: Replays[CheckedKey, Checked] = Replays()
    text = "SELECT 1 " + "-" * MAX_KEPT
    checked.keep(("Bearer t", "a", None, text), cast("Checked", ("checked", 1)))
    assert len(checked) == 0


def test_kept_keys_share_one_copy_of_each_text() -> None:
    """Each request brings its credential and headers as strings of its own; kept keys hold
    one copy of each text (a credential is hundreds of characters), found by equal texts."""
    token = "Bearer " + "x" * 300
    replays: Replays[ReplayKey, Replay] = Replays()
    for n in range(3):
        replays.keep(key(n, token="".join(token), tenant="".join(["ac", "me"])), entry(n))
    kept = list(replays._entries)
    assert all(k[0] is kept[0][0] and k[1] is kept[0][1] for k in kept)
    assert replays.get(key(2, token="".join(token), tenant="acme")) == entry(2)


def test_no_entry_is_kept_with_a_bound_of_zero() -> None:
    replays: Replays[ReplayKey, Replay] = Replays(max_entries=0)
    replays.keep(key(1), entry(1))
    assert len(replays) == 0 and replays.get(key(1)) is None
