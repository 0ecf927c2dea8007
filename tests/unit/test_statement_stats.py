"""Statement statistics in memory: fingerprints from the guard's cached classification (the
worker process's too), quantiles from the fixed histogram, the bounded table per tenant, merging
the exports of several processes, resets shared through the run directory."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from pathlib import Path

from database_service.sqlguard import SqlGuard
from database_service.statements import SharedFigures, StatementStats
from database_service.statements.stats import OTHER, merge_exports

OWN = "t_own"


def test_the_guard_fingerprints_once_and_literals_do_not_matter() -> None:
    guard = SqlGuard()
    one = guard.classify("SELECT * FROM users WHERE user_id = 'a'", own_schema=OWN)
    two = guard.classify("select *\n from users where user_id='b'", own_schema=OWN)
    param = guard.classify("SELECT * FROM users WHERE user_id = $1", own_schema=OWN)
    other = guard.classify("SELECT * FROM users WHERE email = 'a'", own_schema=OWN)
    assert one.fingerprint == two.fingerprint == param.fingerprint != other.fingerprint
    assert len(one.fingerprint) == 16
    assert one.normalized == "SELECT * FROM users WHERE user_id = $1"
    # The cached verdict is returned as it is: nothing is computed again.
    assert guard.classify("SELECT * FROM users WHERE user_id = 'a'", own_schema=OWN) is one


def test_a_verdict_from_the_worker_process_has_its_fingerprint() -> None:
    guard = SqlGuard(max_sql_bytes=200_000, max_sql_tokens=50_000)
    large = "SELECT " + " + ".join(["1"] * 2000) + " AS total"
    try:
        verdict = asyncio.run(guard.classify_async(large, own_schema=OWN))
    finally:
        guard.close()
    assert verdict.fingerprint == SqlGuard().classify(large, own_schema=OWN).fingerprint
    assert verdict.normalized.startswith("SELECT $1 + $2")


def test_figures_and_quantiles() -> None:
    verdict = SqlGuard().classify("SELECT 1", own_schema=OWN)
    stats = StatementStats()
    for ms in [1.0] * 98 + [50.0, 400.0]:
        stats.record("acme", verdict, ms, 2)
    stats.record("acme", verdict, 0.0, 0, error=True)
    stats.record("acme", verdict, 0.01, 2, cache_hit=True)
    [figures] = stats.top("acme", 10)
    assert (figures.calls, figures.errors, figures.cache_hits, figures.rows) == (102, 1, 1, 202)
    assert figures.total_ms == 98 + 450 + 0.01
    assert figures.min_ms == 0.01 and figures.max_ms == 400.0
    assert 1.0 <= figures.p50_ms <= 1.6  # one bin's width above the truth at most
    assert 50.0 <= figures.p99_ms <= 80.0
    assert stats.top("other-tenant", 10) == []


def test_statements_held_back_are_recorded_before_the_figures_are_read() -> None:
    verdict = SqlGuard().classify("SELECT 1", own_schema=OWN)
    stats = StatementStats()
    held: list[str] = []  # tenants whose statement a caller holds back (QueryExecutor.book)

    def settle() -> None:
        for tenant in held:
            stats.record(tenant, verdict, 1.0, 1)
        held.clear()

    stats.before_read(settle)
    held.append("acme")
    [figures] = stats.top("acme", 10)
    assert figures.calls == 1
    held.append("acme")
    assert stats.changed() == {"acme"}  # what is shared, too
    assert stats.export()["tenants"]["acme"]
    held.append("acme")
    stats.reset("acme")  # held before the reset: reset with the rest
    assert stats.top("acme", 10) == []


def test_a_tenant_keeps_a_bounded_table_and_totals_stay_whole() -> None:
    base = SqlGuard().classify("SELECT 1", own_schema=OWN)
    stats = StatementStats(max_fingerprints=10)
    for i in range(100):
        stats.record("acme", dataclasses.replace(base, fingerprint=f"{i:016x}"), 1.0, 1)
    stats.record("acme", dataclasses.replace(base, fingerprint=f"{99:016x}"), 1.0, 1)
    table = stats.top("acme", 1000, order="calls")
    assert len(table) == 10
    assert sum(f.calls for f in table) == 101
    by_key = {f.fingerprint: f for f in table}
    assert by_key[OTHER].calls == 91 and by_key[f"{99:016x}"].calls == 2


def test_exports_of_several_processes_add_up() -> None:
    verdict = SqlGuard().classify("SELECT 1", own_schema=OWN)
    one, two = StatementStats(), StatementStats()
    for _ in range(3):
        one.record("acme", verdict, 1.0, 1)
    two.record("acme", verdict, 100.0, 5)
    two.record("globex", verdict, 7.0, 1)
    document = json.loads(json.dumps(two.export()))  # through a file, as the workers do
    [figures] = one.top("acme", 10, peers=[document])
    assert (figures.calls, figures.rows, figures.max_ms) == (4, 8, 100.0)
    assert 60.0 <= figures.p99_ms <= 100.0  # from the merged bins, not an average
    assert set(merge_exports([document], "acme")) == {verdict.fingerprint}
    assert merge_exports([one.export()], "globex") == {}


def test_a_reset_reaches_the_other_processes(tmp_path: Path) -> None:
    verdict = SqlGuard().classify("SELECT 1", own_schema=OWN)
    here, there = StatementStats(), StatementStats()
    here_shared = SharedFigures(here, tmp_path)
    there_shared = SharedFigures(there, tmp_path)
    there_shared._pid = os.getppid()  # another live process (this test's parent)
    for stats in (here, there):
        stats.record("acme", verdict, 1.0, 1)
        stats.record("globex", verdict, 1.0, 1)
    there_shared.write()
    assert here.top("acme", 10, peers=here_shared.peers("acme"))[0].calls == 2
    here_shared.reset("acme")
    assert here.top("acme", 10) == []
    there_shared.write()  # the other process applies the reset when it next writes
    assert there.top("acme", 10) == []
    assert there.top("globex", 10)[0].calls == 1
    assert here.top("globex", 10, peers=here_shared.peers("globex"))[0].calls == 2


def test_statements_booked_as_a_group_count_as_if_booked_one_by_one() -> None:
    verdict = SqlGuard().classify("SELECT * FROM users WHERE user_id = 'a'", own_schema=OWN)
    micros = [150, 90, 2_400, 31_000, 700]
    one_by_one, grouped = StatementStats(), StatementStats()
    for us in micros:
        one_by_one.record("t", verdict, us / 1000, 1)
    grouped.record_many("t", verdict, micros, len(micros))

    def figures(stats: StatementStats) -> dict[str, object]:
        entry = stats.export_tenant("t")["tenants"]["t"][verdict.fingerprint]
        entry.pop("updated", None)
        return entry

    assert figures(grouped) == figures(one_by_one)
