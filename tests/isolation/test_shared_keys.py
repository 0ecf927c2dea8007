"""No key, sequence or unique constraint is shared between tenants.

``shared.market_data`` used to take ids from one sequence and keep them unique across tenants:
its ``last_value`` counted everyone's inserts, an explicit id probed for another tenant's row
(a unique violation, ``ON CONFLICT … RETURNING``), and ids claimed ahead made another tenant's
inserts fail. Now its key is ``(company_id, id)`` and each tenant draws ids from a sequence of
its own.
"""

from __future__ import annotations

import pytest

from database_service.app import Application
from database_service.auth import Scope
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd, service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")


async def _b_ids(core: Application, tenants: Tenants, *, not_a: bool = False) -> list[int]:
    """B's market_data ids (with ``not_a``: those A does not happen to use itself)."""
    rows = await core.owner_pool.fetch(
        f"SELECT id FROM {tenants.shared}.market_data WHERE company_id = $1"
        f" AND NOT ($2 AND id IN (SELECT id FROM {tenants.shared}.market_data"
        "  WHERE company_id = $3)) ORDER BY id",
        tenants.b.tenant_id,
        not_a,
        tenants.a.tenant_id,
    )
    return [r["id"] for r in rows]


async def test_every_unique_key_of_a_shared_table_starts_with_the_company(
    core: Application, tenants: Tenants
) -> None:
    rows = await core.owner_pool.fetch(
        "SELECT c.relname, i.indexrelid::regclass::text AS index,"
        " (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.oid"
        "  AND a.attnum = i.indkey[0]) AS first"
        " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND i.indisunique AND NOT c.relispartition",
        tenants.shared,
    )
    assert rows, "no unique index found at all"
    shared_keys = [(r["relname"], r["index"]) for r in rows if r["first"] != "company_id"]
    assert not shared_keys


async def test_no_sequence_is_shared_between_tenants(core: Application, tenants: Tenants) -> None:
    sequences = await core.owner_pool.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relkind = 'S'",
        tenants.shared,
    )
    assert sequences == []


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT last_value FROM shared.market_data_id_seq",
        "SELECT nextval('shared.market_data_id_seq')",
        "SELECT currval('market_data_id_seq')",
    ],
)
async def test_the_old_shared_sequence_is_gone(front_end: FrontEnd, sql: str) -> None:
    outcome = await front_end.run(sql)
    assert not outcome.ok and not outcome.server_error, outcome


async def test_an_explicit_id_of_another_tenant_neither_collides_nor_reveals(
    front_end: FrontEnd, core: Application, tenants: Tenants
) -> None:
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, id, symbol)"
        " VALUES ($1, 900001, 'B-HIGH') ON CONFLICT DO NOTHING",
        tenants.b.tenant_id,
    )
    try:
        b_ids = await _b_ids(core, tenants, not_a=True)
        assert 900001 in b_ids
        await _probe_ids(front_end, tenants, b_ids)
    finally:
        await core.owner_pool.execute(
            f"DELETE FROM {tenants.shared}.market_data WHERE company_id = $1 AND id = 900001",
            tenants.b.tenant_id,
        )


async def _probe_ids(front_end: FrontEnd, tenants: Tenants, b_ids: list[int]) -> None:
    for b_id in b_ids:
        # B has this id; for A it is just a free id of its own.
        inserted = await front_end.run(
            "INSERT INTO market_data (id, symbol) VALUES ($1, 'PROBE') RETURNING id, company_id",
            b_id,
        )
        assert inserted.ok and inserted.rows == [[b_id, tenants.a.tenant_id]], inserted
        again = await front_end.run(
            "INSERT INTO market_data (id, symbol) VALUES ($1, 'PROBE')"
            " ON CONFLICT (company_id, id) DO UPDATE SET symbol = 'PROBED' RETURNING company_id",
            b_id,
        )
        assert again.rows == [[tenants.a.tenant_id]], again
        nothing = await front_end.run(
            "INSERT INTO market_data (id, symbol) VALUES ($1, 'PROBE')"
            " ON CONFLICT DO NOTHING RETURNING id",
            b_id,
        )
        assert nothing.ok and nothing.rows == [], nothing  # A's own row now, nothing of B's
        await front_end.run("DELETE FROM market_data WHERE id = $1", b_id)


async def test_ids_claimed_ahead_do_not_stop_another_tenants_inserts(
    front_end: FrontEnd, core: Application, tenants: Tenants
) -> None:
    row = await core.owner_pool.fetchrow(
        f"SELECT last_value, is_called FROM {tenants.b.schema_name}._market_data_id_seq"
    )
    assert row is not None
    b_next = row["last_value"] + (1 if row["is_called"] else 0)
    claimed = await front_end.run(
        "INSERT INTO market_data (id, symbol) SELECT g, 'CLAIM' FROM generate_series($1, $1 + 50) g",
        b_next,
    )
    assert claimed.ok, claimed
    token = await service_token(core, [tenants.b.tenant_id], (Scope.READ, Scope.WRITE))
    try:
        victim = await front_end.run(
            "INSERT INTO market_data (symbol) VALUES ('B-OWN') RETURNING id",
            tenant_id=tenants.b.tenant_id,
            token=token,
        )
        assert victim.ok and victim.rows == [[b_next]], victim  # B's ids go on undisturbed
    finally:
        await core.owner_pool.execute(
            f"DELETE FROM {tenants.shared}.market_data WHERE company_id = $1 AND symbol = 'B-OWN'",
            tenants.b.tenant_id,
        )
        await core.owner_pool.execute(
            f"SELECT setval('{tenants.b.schema_name}._market_data_id_seq', $1, false)", b_next
        )
        await front_end.run("DELETE FROM market_data WHERE symbol = 'CLAIM'")


async def test_a_tenants_ids_say_nothing_of_another_tenants_volume(
    front_end: FrontEnd, core: Application, tenants: Tenants
) -> None:
    first = await front_end.run("INSERT INTO market_data (symbol) VALUES ('VOL') RETURNING id")
    # B inserts a hundred rows in between.
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, symbol)"
        " SELECT $1, 'B-VOL' FROM generate_series(1, 100)",
        tenants.b.tenant_id,
    )
    second = await front_end.run("INSERT INTO market_data (symbol) VALUES ('VOL') RETURNING id")
    await core.owner_pool.execute(
        f"DELETE FROM {tenants.shared}.market_data WHERE company_id = $1 AND symbol = 'B-VOL'",
        tenants.b.tenant_id,
    )
    await front_end.run("DELETE FROM market_data WHERE symbol = 'VOL'")
    assert second.rows[0][0] == first.rows[0][0] + 1
