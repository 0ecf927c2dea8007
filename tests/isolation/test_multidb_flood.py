"""Tenant A flooding ``execute_multi_db_operation`` (REST and gRPC) with writes that go through
the outbox (key-value) and join the transaction (graph), while B's own calls — a key-value get,
a multi-store read, a SQL read — are timed: they must still be answered within seconds, and
every one of A's operations must end applied (nothing acknowledged is lost)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.stores.graph.model import Vertex
from database_service.tenancy import quote_ident
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token
from tests.isolation.test_multidb_attacks import execute

pytestmark = [pytest.mark.usefixtures("unchanged_victim"), pytest.mark.pgvector]

FRONT_ENDS = ("grpc", "rest")


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_flood_of_multi_store_writes_does_not_stall_another_tenant(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    a_token = await service_token(core, [a], (Scope.READ, Scope.WRITE))
    b_token = await service_token(core, [b], (Scope.READ, Scope.WRITE))
    # A's graph made first: the flood times steady-state writes, not the tables' creation.
    status, answer = await execute(
        front_end, core, http, grpc_target, a, a_token,
        {"graph": {"operation": "upsert", "vertices": [{"collection": "fl", "_key": "first"}]}},
    )  # fmt: skip
    assert status == 200, answer
    stop = asyncio.Event()
    latencies: list[float] = []
    answers: list[dict[str, Any]] = []

    async def flood(worker: int) -> None:
        i = 0
        while not stop.is_set():
            status, answer = await execute(
                front_end, core, http, grpc_target, a, a_token,
                {
                    "postgresql": {"query": "SELECT 1"},
                    "dragonflydb": {"operation": "set", "key": f"f{worker}", "value": str(i)},
                    "graph": {"operation": "upsert",
                              "vertices": [{"collection": "fl", "_key": f"w{worker}"}]},
                },
            )  # fmt: skip
            assert status == 200, answer
            answers.append(answer)
            i += 1

    async def victim() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            status, answer = await execute(
                front_end, core, http, grpc_target, b, b_token,
                {"dragonflydb": {"operation": "get", "key": "nothing"}},
            )  # fmt: skip
            assert status == 200, answer
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)

    workers = [asyncio.create_task(flood(i)) for i in range(16)]
    watcher = asyncio.create_task(victim())
    try:
        await asyncio.sleep(4)
    finally:
        stop.set()
        done = await asyncio.gather(*workers, watcher, return_exceptions=True)
    assert not [e for e in done if isinstance(e, BaseException)], done
    statuses = [p["status"] for a_ in answers for p in a_["stores"].values()]
    print(
        f"\n{front_end}: {len(answers)} operations by A ({statuses.count('applied')} parts"
        f" applied, {statuses.count('pending')} pending); B's reads: {len(latencies)}, median"
        f" {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 3, "B's calls stalled behind A's multi-store writes"
    # Nothing acknowledged is lost: whatever was left pending is applied by the applier.
    deadline = time.monotonic() + 30
    control = core.settings.control_schema
    while time.monotonic() < deadline:
        await core.multidb_outbox.apply_due()
        left = await core.owner_pool.fetchval(
            f"SELECT count(*) FROM {control}.multidb_outbox WHERE tenant_id = $1"
            " AND status <> 'applied'",
            a,
        )
        if left == 0:
            break
        await asyncio.sleep(0.5)
    assert left == 0


async def test_a_tenants_slow_outbox_entries_do_not_hold_up_another_tenants(
    core: Application,
    tenants: Tenants,
    attacker_conn: asyncpg.Connection,
    new_tenant: Any,
) -> None:
    """A keeps its own graph table locked (a direct login, in a transaction) and has ten graph
    entries pending ahead of a bystander's key-value entry: each of A's waits for the lock until
    the apply timeout, and the bystander's entry must not wait behind them."""
    bystander = await new_tenant("bystander")
    outbox = core.multidb_outbox
    control = quote_ident(core.settings.control_schema)
    a = tenants.a.tenant_id
    principal = Principal("slow", frozenset({a}), frozenset({Scope.READ, Scope.WRITE}))
    await core.graphs.upsert_vertices(principal, TenantContext(a), [Vertex.of("slow", "k0")])
    target = outbox.appliers.target("graph")
    slow = [
        await attacker_conn.fetchval(
            f"SELECT {control}.multidb_record(gen_random_uuid(), 'graph', 'graph',"
            " $1::text::jsonb, $2)",
            f'{{"operation": "upsert", "vertices": [{{"collection": "slow", "_key": "k{i}"}}]}}',
            target,
        )
        for i in range(1, 11)
    ]
    await core.owner_pool.execute(
        f"INSERT INTO {control}.multidb_outbox (tenant_id, operation_id, store, part, op, target)"
        " VALUES ($1, gen_random_uuid(), 'dragonflydb', 'dragonflydb', $2::text::jsonb, $3)",
        bystander.tenant_id,
        '{"operation": "set", "key": "behind", "value": "applied"}',
        outbox.appliers.target("dragonflydb"),
    )
    await core.owner_pool.execute(
        f"UPDATE {control}.multidb_outbox SET next_attempt_at = clock_timestamp()"
        " WHERE id = ANY($1::bigint[])",
        slow,
    )
    kept_timeout = outbox._timeout
    outbox._timeout = 1.0  # each of A's entries waits this long for the lock
    locker = attacker_conn.transaction()
    await locker.start()
    await attacker_conn.execute(
        f"LOCK TABLE {quote_ident(tenants.a.schema_name)}._graph_vertices IN ACCESS EXCLUSIVE MODE"
    )
    started = time.monotonic()
    waited: float | None = None
    try:
        applying = asyncio.create_task(outbox.apply_due())
        while time.monotonic() - started < 20 and waited is None:
            if await core.key_values.get(bystander.tenant_id, "behind") == b"applied":
                waited = time.monotonic() - started
            await asyncio.sleep(0.05)
        await applying
    finally:
        await locker.rollback()
        outbox._timeout = kept_timeout
    print(f"\nthe bystander's entry was applied {waited} s after the applier started")
    assert waited is not None and waited < 3, waited
    # A's entries are still A's to apply: pending again after their timeouts, not lost.
    statuses = {
        r["status"]
        for r in await core.owner_pool.fetch(
            f"SELECT status FROM {control}.multidb_outbox WHERE id = ANY($1::bigint[])", slow
        )
    }
    assert statuses <= {"pending", "applied"}, statuses
