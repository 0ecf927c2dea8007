"""Control migration 0006 on a control plane with data from before it: existing dead letters
(duplicates among them) get idempotency keys without the migration failing, and ingested ticks
and predictions stored with user_id '' become the company's (NULL), candles unchanged.

Runs in a database of its own, migrated to 0005, filled, then migrated to 0006."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.ingest import DeadLetterStore, NewDeadLetter
from database_service.ingest.deadletters import idempotency_key
from database_service.tenancy import quote_ident
from database_service.tenancy.migrations import Migrator, load_migrations
from tests.fix_pg import PgCluster, with_database

HOUR = dt.datetime(2026, 3, 2, 10, tzinfo=dt.UTC)  # a range partition, attached as maintenance does
LATE = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)  # no partition: DEFAULT


@pytest.fixture
async def old_database(pg_cluster: PgCluster) -> AsyncIterator[str]:
    name = f"dbsvc_mig_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(pg_cluster.admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    try:
        yield with_database(pg_cluster.dsn, name)
    finally:
        admin = await asyncpg.connect(pg_cluster.admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await admin.close()


def migrator(cluster: PgCluster, up_to: int) -> Migrator:
    return Migrator(
        control_schema="dbsvc_control",
        shared_schema="shared",
        group_role=cluster.group_role,
        role_prefix=cluster.role_prefix,
        control_migrations=[m for m in load_migrations("control") if m.version <= up_to],
    )


async def attach_range(conn: asyncpg.Connection, table: str, hash_partitions: int) -> None:
    """A range partition as ``PartitionManager.create_range`` makes one: a standalone table
    LIKE the parent (with its own NOT NULLs), then attached."""
    name = f"shared.{table}_p{HOUR:%Y%m%d_%H%M}"
    if hash_partitions:
        await conn.execute(
            f"CREATE TABLE {name} (LIKE shared.{table} INCLUDING ALL) PARTITION BY HASH (company_id)"
        )
        for remainder in range(hash_partitions):
            await conn.execute(
                f"CREATE TABLE {name}_h{remainder} PARTITION OF {name}"
                f" FOR VALUES WITH (MODULUS {hash_partitions}, REMAINDER {remainder})"
            )
    else:
        await conn.execute(f"CREATE TABLE {name} (LIKE shared.{table} INCLUDING ALL)")
    await conn.execute(
        f"ALTER TABLE shared.{table} ATTACH PARTITION {name}"
        f" FOR VALUES FROM ('{HOUR.isoformat()}') TO ('{(HOUR + dt.timedelta(hours=1)).isoformat()}')"
    )


CANDLES = (
    "SELECT company_id, symbol, bucket, open, high, low, close, volume, ticks, price_volume,"
    " spread_sum, spread_min, spread_max, spread_n, open_time, close_time"
    " FROM shared.candles_1m ORDER BY company_id, symbol, bucket"
)


async def test_migration_0006_keys_old_dead_letters_and_makes_absent_user_ids_null(
    pg_cluster: PgCluster, old_database: str
) -> None:
    conn = await asyncpg.connect(old_database)
    try:
        await migrator(pg_cluster, 5).migrate_control(conn)
        await attach_range(conn, "trading_ticks", 4)
        await attach_range(conn, "ai_predictions", 0)
        # Ticks as ingestion stored them: '' without a user id, across minutes, companies,
        # the range partition and DEFAULT; several statements, as batches arrive.
        for company in ("acme", "zeta"):
            for at in (HOUR, LATE):
                for i in range(0, 300, 50):
                    await conn.execute(
                        "INSERT INTO shared.trading_ticks"
                        " (event_id, time, company_id, user_id, symbol, bid, ask, volume)"
                        " SELECT gen_random_uuid(), $1::timestamptz + n * interval '1 second',"
                        " $2, CASE WHEN n % 7 = 0 THEN 'u1' ELSE '' END, 'EURUSD',"
                        " 1.1 + n * 0.0001, 1.1002 + n * 0.0001, n % 5 + 1"
                        " FROM generate_series($3::int, $3::int + 49) n",
                        at,
                        company,
                        i,
                    )
        await conn.execute(
            "INSERT INTO shared.ai_predictions (event_id, time, company_id, user_id, symbol,"
            " prediction_type, confidence) VALUES"
            " (gen_random_uuid(), $1, 'acme', '', 'EURUSD', 'buy', 0.5),"
            " (gen_random_uuid(), $1, 'acme', 'u1', 'EURUSD', 'buy', 0.5),"
            " (gen_random_uuid(), $2, 'acme', '', 'EURUSD', 'buy', 0.5)",
            HOUR,
            LATE,
        )
        before_candles = [tuple(r) for r in await conn.fetch(CANDLES)]
        empty = await conn.fetchval("SELECT count(*) FROM shared.trading_ticks WHERE user_id = ''")
        u1 = await conn.fetchval("SELECT count(*) FROM shared.trading_ticks WHERE user_id = 'u1'")
        assert empty > 0 and u1 > 0 and before_candles

        # Dead letters from before: the same poison record three times (both transports, a
        # redelivery), another one, and a whole message without tenant, event or publisher.
        event = str(uuid.uuid4())
        same = NewDeadLetter(
            "nats", "s", "data_exception", "too long", b"\x0a\x01same", tenant_id="acme",
            event_id=event, service="feed",
        )  # fmt: skip
        other = NewDeadLetter(
            "kafka", "t/0@1", "tenant_not_found", "no", b"other", tenant_id="acmé",
            event_id=str(uuid.uuid4()), service="feed",
        )  # fmt: skip
        whole = NewDeadLetter("nats", "s", "unauthenticated", "no token", b"\xff\x00")
        rows = [same, dataclass_with(same, transport="kafka", source="t/1@9"), same, other, whole]
        await conn.executemany(
            "INSERT INTO dbsvc_control.dead_letters"
            " (transport, source, code, reason, payload, tenant_id, event_id, service)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [dataclasses.astuple(d) for d in rows],
        )

        await migrator(pg_cluster, 6).migrate_control(conn)

        # Dead letters: nothing deleted, the first of each kind keyed as the service keys it.
        keyed = await conn.fetch(
            "SELECT id, idempotency_key FROM dbsvc_control.dead_letters ORDER BY id"
        )
        assert len(keyed) == 5
        assert [r["idempotency_key"] for r in keyed] == [
            idempotency_key(same), None, None, idempotency_key(other), idempotency_key(whole),
        ]  # fmt: skip

        # Ticks and predictions: '' became NULL, user ids stayed, candles are what they were.
        assert await conn.fetchval(
            "SELECT count(*) FROM shared.trading_ticks WHERE user_id IS NULL"
        ) == empty  # fmt: skip
        assert await conn.fetchval(
            "SELECT count(*) FROM shared.trading_ticks WHERE user_id = 'u1'"
        ) == u1  # fmt: skip
        assert not await conn.fetchval(
            "SELECT count(*) FROM shared.trading_ticks WHERE user_id = ''"
        )  # fmt: skip
        assert await conn.fetchval(
            "SELECT count(*) FILTER (WHERE user_id IS NULL) FROM shared.ai_predictions"
        ) == 2  # fmt: skip
        assert [tuple(r) for r in await conn.fetch(CANDLES)] == before_candles
        # No partition keeps a NOT NULL of its own; the candle trigger is on again.
        assert not await conn.fetch(
            "SELECT p.relid::regclass::text FROM unnest(ARRAY['shared.trading_ticks',"
            " 'shared.ai_predictions']) t(name), pg_partition_tree(t.name::regclass) p"
            " JOIN pg_attribute a ON a.attrelid = p.relid AND a.attname = 'user_id'"
            " WHERE a.attnotnull"
        )
        assert await conn.fetchval(
            "SELECT tgenabled::text FROM pg_trigger"
            " WHERE tgname = 'candles_1m_update' AND tgrelid = 'shared.trading_ticks'::regclass"
        ) == "O"  # fmt: skip
        await conn.execute(
            "UPDATE shared.trading_ticks SET bid = bid + 1, ask = ask + 1"
            " WHERE company_id = 'acme' AND time = $1",
            HOUR,
        )
        assert [tuple(r) for r in await conn.fetch(CANDLES)] != before_candles
        for at in (HOUR, LATE):
            await conn.execute(
                "INSERT INTO shared.trading_ticks (event_id, time, company_id, user_id, symbol,"
                " bid) VALUES (gen_random_uuid(), $1, 'acme', NULL, 'NEW', 1)",
                at,
            )
    finally:
        await conn.close()

    # The service's inserts meet the old letters' keys.
    pool = await asyncpg.create_pool(old_database, min_size=1, max_size=2)
    assert pool is not None
    try:
        store = DeadLetterStore(pool, control_schema="dbsvc_control")
        assert await store.add([dataclass_with(same, transport="kafka"), whole]) == []
        fresh = dataclass_with(other, event_id=str(uuid.uuid4()))
        assert await store.add([other, fresh, fresh]) == [fresh]
    finally:
        await pool.close()


def dataclass_with(letter: NewDeadLetter, **changes: str) -> NewDeadLetter:
    return dataclasses.replace(letter, **changes)
