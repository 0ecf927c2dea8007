"""The local generation numbers are bounded whatever the names, and a name's number only ever
moves on: an entry stored with it stays invalid after a write (a miss, never a stale answer)."""

from __future__ import annotations

from database_service.cache import Generations


async def test_the_local_numbers_take_a_fixed_space() -> None:
    generations = Generations(None, counters=1024)
    for n in range(10_000):
        generations.bump_local("t", [f"s.t#row:{n}"])
    assert generations._counters is not None and len(generations._counters) == 1024
    assert generations._mirror == {}


async def test_a_bump_always_moves_a_name_to_a_number_it_never_had() -> None:
    generations = Generations(None, counters=3)  # names share counters
    seen: dict[str, list[tuple[tuple[str, int], ...]]] = {}
    for n in range(200):
        name = f"r{n % 7}"
        before = await generations.snapshot("t", [name])
        assert before is not None
        seen.setdefault(name, []).append(before)
        generations.bump_local("t", [name])
        after = await generations.snapshot("t", [name])
        assert after is not None
        assert all(after != earlier for earlier in seen[name])


async def test_an_untouched_name_keeps_its_number_while_others_are_written() -> None:
    generations = Generations(None)
    quiet = await generations.snapshot("t", ["quiet"])
    assert generations._counters is not None
    size = len(generations._counters)
    busy = [f"busy{n}" for n in range(500)]
    busy = [b for b in busy if hash(("t", b)) % size != hash(("t", "quiet")) % size]
    for name in busy:
        generations.bump_local("t", [name])
    assert await generations.snapshot("t", ["quiet"]) == quiet


def test_only_a_notification_signed_with_the_key_is_taken() -> None:
    import hashlib

    from database_service.cache.generations import verified_notification

    body = "acme|t_1.positions#row:ab|42|1700000000000"
    signed = f"{body}|{hashlib.md5(('k' * 32 + body).encode()).hexdigest()}"
    assert verified_notification(signed, "k" * 32) == body
    assert verified_notification(signed, "x" * 32) is None
    assert verified_notification(body, "k" * 32) is None
    assert verified_notification(body + "|" + "0" * 32, "k" * 32) is None


async def test_locally_an_entry_is_current_until_a_name_it_read_is_bumped() -> None:
    generations = Generations(None)
    names = Generations.names("t", ["s.a", "s.b"])
    snapshot = await generations.snapshot_of("t", names)
    assert snapshot is not None
    assert generations.unchanged(names, snapshot, generations.clock) is True
    generations.bump_local("t", ["s.other"])
    assert generations.unchanged(names, snapshot, -1) is True  # no clock needed locally
    generations.bump_local("t", ["s.b"])
    assert generations.unchanged(names, snapshot, generations.clock) is False
    assert generations.unchanged(names[:2], snapshot, generations.clock) is False
