"""A tenant whose own trigger never ends cannot hold ingestion up for the others.

Ingestion writes a tenant's generic rows into the tenant's own tables, as the tenant; the
tenant may put a trigger there, and that trigger may lift its own statement timeout. The writer
keeps the tenant's time limit from outside the session: the slow tenant's records are canceled
at the limit and dead-lettered (not retried without end), while another tenant's records in the
same round are stored.
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
from database_service.tenancy import TenantLimits
from database_service_client import tick
from database_service_client._proto import ingest_pb2
from tests.fix_pg import PgCluster
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

T0 = 1_795_100_000_000_000


async def _token(core: Application, tenant_id: str) -> str:
    name = f"feed-{secrets.token_hex(4)}"
    await core.services.register(
        name, tenants=[tenant_id], scopes=[Scope.INGEST], with_secret=False
    )
    return "Bearer " + core.tokens.issue(
        name, tenants=[tenant_id], scopes=[Scope.INGEST], ttl_seconds=600
    )


async def test_a_tenants_endless_trigger_does_not_stall_ingestion(
    core: Application, tenants: Tenants, pg_cluster: PgCluster
) -> None:
    slow = await core.tenants.create(f"slowtrig_{secrets.token_hex(3)}", TenantLimits(10, 1000))
    conn = await asyncpg.connect(
        pg_cluster.dsn, user=slow.role_name, password=core.secret_box.open(slow.role_secret)
    )
    try:  # planted behind the guard's back: the guard would refuse SET in a function
        await conn.execute(
            "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " PERFORM set_config('statement_timeout', '0', true);"
            " LOOP BEGIN PERFORM pg_sleep(0.2); EXCEPTION WHEN query_canceled THEN NULL; END;"
            " END LOOP; END $$"
        )
        await conn.execute(
            "CREATE TRIGGER stall BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION stall()"
        )
    finally:
        await conn.close()

    row = ingest_pb2.TenantRow(
        event_id=str(uuid.uuid4()),
        tenant_id=slow.tenant_id,
        table="users",
        row_json='{"user_id": "s1", "email": "s1@x", "subscription_tier": "pro"}',
    )
    fine = tick(tenants.a.tenant_id, "LIMITS", T0, bid=1.0, ask=1.1, volume=1)
    messages = [
        Inbound(
            ingest_pb2.IngestBatch(rows=[row]).SerializeToString(),
            "x",
            await _token(core, slow.tenant_id),
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
    print(f"\nround with an endless trigger: {elapsed * 1000:.0f} ms")
    assert elapsed < 10, "ingestion waited on the endless trigger"
    stored = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.shared}.trading_ticks"
        " WHERE company_id = $1 AND symbol = 'LIMITS'",
        tenants.a.tenant_id,
    )
    assert stored == 1
    letters = [d for d in await core.dead_letters.list(limit=10_000) if d.event_id == row.event_id]
    assert [d.code for d in letters] == ["query_canceled"]
