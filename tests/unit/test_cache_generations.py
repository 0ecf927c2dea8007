"""The local generation map is bounded, and what it forgets never comes back as a number an
entry was stored with: a forgotten name moves on (a miss), never back (a stale answer)."""

from __future__ import annotations

from database_service.cache import Generations


async def test_the_local_map_is_bounded() -> None:
    generations = Generations(None, mirror_max=100)
    for n in range(10_000):
        generations.bump_local("t", [f"s.t#row:{n}"])
    assert len(generations._mirror) <= 100


async def test_a_forgotten_name_never_returns_to_a_number_it_had() -> None:
    generations = Generations(None, mirror_max=3)
    seen: dict[str, list[tuple[tuple[str, int], ...]]] = {}
    for n in range(200):
        name = f"r{n % 7}"
        before = await generations.snapshot("t", [name])
        assert before is not None
        seen.setdefault(name, []).append(before)
        generations.bump_local("t", [name])
        after = await generations.snapshot("t", [name])
        assert after is not None
        # A bump always changes the name's number, to one it never had before.
        assert all(after != earlier for earlier in seen[name])


async def test_an_untouched_name_keeps_its_number_while_others_come_and_go() -> None:
    generations = Generations(None, mirror_max=1000)
    quiet = await generations.snapshot("t", ["quiet"])
    for n in range(500):
        generations.bump_local("t", [f"busy{n}"])
    assert await generations.snapshot("t", ["quiet"]) == quiet
