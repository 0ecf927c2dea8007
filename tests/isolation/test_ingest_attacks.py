"""Tenant A against tenant B through ingestion: whatever A's producer puts in a message, it can
only ever write A's rows. The pipeline is what both transports call, so attacking it attacks
NATS and Kafka alike (tests/integration/test_ingest_transports.py covers the transports)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.ingest import Inbound, Verdict
from database_service_client import event_id_for, tick
from database_service_client._proto import ingest_pb2
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

T0 = 1_795_000_000_000_000


@pytest.fixture
async def a_token(core: Application, tenants: Tenants) -> str:
    name = f"feed-{uuid.uuid4().hex[:8]}"
    a = tenants.a.tenant_id
    await core.services.register(name, tenants=[a], scopes=[Scope.INGEST], with_secret=False)
    token = core.tokens.issue(name, tenants=[a], scopes=[Scope.INGEST], ttl_seconds=600)
    return f"Bearer {token}"


async def send(core: Application, token: str | None, batch: ingest_pb2.IngestBatch) -> Verdict:
    (verdict,) = await core.ingest.process("nats", [Inbound(batch.SerializeToString(), "x", token)])
    return verdict


async def letters_for(core: Application, event_id: str) -> list[str]:
    return [d.code for d in await core.dead_letters.list(limit=10_000) if d.event_id == event_id]


async def test_records_naming_another_tenant_are_refused(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    forged = tick(tenants.b.tenant_id, "EURUSD", T0, bid=9.9, ask=9.9, user_id="b-user")
    assert await send(core, a_token, ingest_pb2.IngestBatch(ticks=[forged])) is Verdict.ACK
    assert await letters_for(core, forged.event_id) == ["permission_denied"]


async def test_a_token_with_every_tenant_but_no_ingest_scope_is_refused(
    core: Application, tenants: Tenants
) -> None:
    token = core.tokens.issue(
        "nosvc-does-not-exist", tenants=["*"], scopes=[Scope.READ], ttl_seconds=60
    )
    record = tick(tenants.b.tenant_id, "EURUSD", T0, bid=1.0, ask=1.0)
    assert await send(core, f"Bearer {token}", ingest_pb2.IngestBatch(ticks=[record])) is (
        Verdict.TERM
    )
    assert await send(core, None, ingest_pb2.IngestBatch(ticks=[record])) is Verdict.TERM


@pytest.mark.parametrize(
    "table",
    ["{b_schema}.users", "shared.trading_ticks", "_ingest_events", "users; DROP TABLE users", ""],
)
async def test_rows_cannot_name_a_table_outside_the_tenants_own_schema(
    core: Application, tenants: Tenants, a_token: str, table: str
) -> None:
    row = ingest_pb2.TenantRow(
        event_id=str(uuid.uuid4()),
        tenant_id=tenants.a.tenant_id,
        table=table.format(b_schema=tenants.b.schema_name),
        row_json='{"user_id": "x", "email": "x@x", "subscription_tier": "pro"}',
    )
    await send(core, a_token, ingest_pb2.IngestBatch(rows=[row]))
    assert await letters_for(core, row.event_id) == ["invalid_record"]


async def test_a_row_for_a_table_b_has_lands_in_as_own_table(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    row = ingest_pb2.TenantRow(
        event_id=str(uuid.uuid4()),
        tenant_id=tenants.a.tenant_id,
        table="users",
        row_json='{"user_id": "b-user", "email": "a-side@x", "subscription_tier": "free"}',
    )
    await send(core, a_token, ingest_pb2.IngestBatch(rows=[row]))
    mine = await core.owner_pool.fetchval(
        f"SELECT email FROM {tenants.a.schema_name}.users WHERE user_id = 'b-user'"
    )
    assert mine == "a-side@x"


async def test_as_event_ids_cannot_block_bs_records(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    # A stores a tick under an event id that B will use later: the uniqueness is per company,
    # so B's record is still stored (by the owner here: B has no producer in this module).
    shared_id = event_id_for("collision", T0)
    a_tick = tick(tenants.a.tenant_id, "EURUSD", T0, bid=1.0, ask=1.0, event_id=shared_id)
    await send(core, a_token, ingest_pb2.IngestBatch(ticks=[a_tick]))
    stored = await core.owner_pool.fetch(
        f"SELECT company_id FROM {tenants.shared}.trading_ticks WHERE event_id = $1",
        uuid.UUID(shared_id),
    )
    assert [r["company_id"] for r in stored] == [tenants.a.tenant_id]
    async with core.owner_pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:  # B's record with the same id and time is accepted; rolled back to keep B as it was
            await conn.execute(
                f"INSERT INTO {tenants.shared}.trading_ticks (event_id, time, company_id,"
                " user_id, symbol) SELECT event_id, time, $2, 'b-user', symbol"
                f" FROM {tenants.shared}.trading_ticks WHERE event_id = $1",
                uuid.UUID(shared_id),
                tenants.b.tenant_id,
            )
            both = await conn.fetchval(
                f"SELECT count(*) FROM {tenants.shared}.trading_ticks WHERE event_id = $1",
                uuid.UUID(shared_id),
            )
            assert both == 2
        finally:
            await transaction.rollback()


async def test_a_cannot_read_or_write_bs_staging_tables(
    tenants: Tenants, attacker_conn: asyncpg.Connection
) -> None:
    for table in ("_ingest_ticks", "_ingest_predictions", "_ingest_events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.fetch(f"SELECT * FROM {tenants.b.schema_name}.{table}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.execute(f"DELETE FROM {tenants.b.schema_name}.{table}")
