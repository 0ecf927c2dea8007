"""A tenant poisoning ingestion batches with errors it chooses.

Tenant P plants a trigger on its own table that raises, for every row, a SQLSTATE of its
choosing — the classes the pipeline treats as "may pass" (serialization, resources, object in
use, operator intervention, system error, authorization) and the one it treats as "PostgreSQL is
unreachable, retry without end" (08). P's records ride in the same round as tenant A's ticks.
A's ticks must be stored within seconds, P's records dead-lettered (never retried for ever,
never silently dropped), and the next round must not pay P's full retries again.
"""

from __future__ import annotations

import secrets
import time
import uuid

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.ingest import Inbound
from database_service_client import tick
from database_service_client._proto import ingest_pb2
from tests.fix_pg import PgCluster
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

T0 = 1_795_200_000_000_000

SQLSTATES = ["40001", "40P01", "53300", "55P03", "57P01", "58030", "28000", "08006", "08P01"]


async def _token(core: Application, tenant_id: str) -> str:
    name = f"feed-{secrets.token_hex(4)}"
    await core.services.register(
        name, tenants=[tenant_id], scopes=[Scope.INGEST], with_secret=False
    )
    return "Bearer " + core.tokens.issue(
        name, tenants=[tenant_id], scopes=[Scope.INGEST], ttl_seconds=600
    )


@pytest.mark.parametrize("sqlstate", SQLSTATES)
async def test_a_tenants_chosen_sqlstate_neither_stalls_nor_drops_another_tenants_records(
    core: Application, tenants: Tenants, pg_cluster: PgCluster, sqlstate: str
) -> None:
    poison = await core.tenants.create(f"poison_{secrets.token_hex(3)}")
    conn = await asyncpg.connect(
        pg_cluster.dsn, user=poison.role_name, password=core.secret_box.open(poison.role_secret)
    )
    try:
        await conn.execute(
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" RAISE EXCEPTION 'poisoned' USING ERRCODE = '{sqlstate}'; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER poison BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION poison()"
        )
    finally:
        await conn.close()
    poison_token = await _token(core, poison.tenant_id)
    a_token = await _token(core, tenants.a.tenant_id)
    symbol = f"P{sqlstate}"

    async def round_(n: int) -> tuple[float, str]:
        row = ingest_pb2.TenantRow(
            event_id=str(uuid.uuid4()),
            tenant_id=poison.tenant_id,
            table="users",
            row_json=f'{{"user_id": "p{n}", "email": "p{n}@x", "subscription_tier": "pro"}}',
        )
        fine = tick(tenants.a.tenant_id, symbol, T0 + n, bid=1.0, ask=1.1, volume=1)
        messages = [
            Inbound(ingest_pb2.IngestBatch(rows=[row]).SerializeToString(), "x", poison_token),
            Inbound(ingest_pb2.IngestBatch(ticks=[fine]).SerializeToString(), "x", a_token),
        ]
        started = time.perf_counter()
        await core.ingest.process("nats", messages)
        return time.perf_counter() - started, row.event_id

    first, first_event = await round_(1)
    second, second_event = await round_(2)
    print(f"\n{sqlstate}: first round {first * 1000:.0f} ms, second {second * 1000:.0f} ms")
    assert first < 30 and second < 10, (first, second)
    stored = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.shared}.trading_ticks"
        " WHERE company_id = $1 AND symbol = $2",
        tenants.a.tenant_id,
        symbol,
    )
    assert stored == 2
    letters = {d.event_id for d in await core.dead_letters.list(limit=10_000)} & {
        first_event,
        second_event,
    }
    assert letters == {first_event, second_event}, (
        "a poisoned record was dropped, not dead-lettered"
    )
    assert not await core.owner_pool.fetchval(f"SELECT count(*) FROM {poison.schema_name}.users")


_BAD_TICKS = {
    "time_beyond_postgresql": {"time_unix_us": 2**63 - 1},
    "time_before_postgresql": {"time_unix_us": -(2**63)},
    "nan_prices": {"bid": float("nan"), "ask": float("nan")},
    "infinite_prices": {"bid": float("inf"), "ask": float("-inf")},
    "huge_volume": {"volume": 2**63 - 1},
}


@pytest.mark.parametrize("kind", sorted(_BAD_TICKS))
async def test_a_batch_of_out_of_range_ticks_is_settled_quickly_and_others_are_stored(
    core: Application, tenants: Tenants, kind: str
) -> None:
    """2,000 ticks of one tenant that PostgreSQL may refuse one by one (each failing row is
    isolated by halving), in the same round as another tenant's good tick: the round ends in
    seconds, the good tick is stored, every bad tick is stored or dead-lettered (none lost)."""
    poison = await core.tenants.create(f"badticks_{secrets.token_hex(3)}")
    symbol = f"B{kind[:10]}"
    bad = []
    for n in range(2000):
        fields = {"bid": 1.0, "ask": 1.1, "volume": 1, **_BAD_TICKS[kind]}
        time_us = fields.pop("time_unix_us", T0 + n)
        bad.append(tick(poison.tenant_id, "BAD", time_us, **fields))  # type: ignore[arg-type]
    fine = tick(tenants.a.tenant_id, symbol, T0, bid=1.0, ask=1.1, volume=1)
    messages = [
        Inbound(
            ingest_pb2.IngestBatch(ticks=bad).SerializeToString(),
            "x",
            await _token(core, poison.tenant_id),
        ),
        Inbound(
            ingest_pb2.IngestBatch(ticks=[fine]).SerializeToString(),
            "x",
            await _token(core, tenants.a.tenant_id),
        ),
    ]
    started = time.perf_counter()
    await core.ingest.process("nats", messages)
    elapsed = time.perf_counter() - started
    print(f"\n{kind}: {elapsed * 1000:.0f} ms")
    assert elapsed < 3, f"the round took {elapsed:.1f} s"
    assert (
        await core.owner_pool.fetchval(
            f"SELECT count(*) FROM {tenants.shared}.trading_ticks WHERE company_id = $1"
            " AND symbol = $2",
            tenants.a.tenant_id,
            symbol,
        )
        == 1
    )
    stored = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.shared}.trading_ticks WHERE company_id = $1",
        poison.tenant_id,
    )
    ids = {t.event_id for t in bad}
    lettered = {d.event_id for d in await core.dead_letters.list(limit=100_000)} & ids
    assert stored + len(lettered) == len(ids), (stored, len(lettered))
