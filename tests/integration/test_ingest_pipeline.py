"""The ingestion pipeline on real PostgreSQL, without a transport: what any consumer relies on.

Stored once however often a record arrives (per tenant: another tenant's records with the same
ids are its own), poison records isolated into dead letters without blocking the rest, dead
letters stored and announced once, naming their publisher, and replayable while it may publish
them; a tenant whose records keep failing is dead-lettered after a few tries instead of stalling
every tenant. (tests/isolation/test_ingest_attacks.py replays what one tenant tried against
another.)"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.ingest import (
    Inbound,
    IngestPipeline,
    IngestWriter,
    NewDeadLetter,
    StoreResult,
    Verdict,
)
from database_service.ingest.records import TenantWork
from database_service.postgres import TenantLogin
from database_service.tenancy import quote_ident
from database_service.tenancy.secrets import SecretBox, TenantLogins
from database_service_client._proto import ingest_pb2
from tests.fix_service import ClientFactory, TenantFactory, TokenFactory

NOW_US = int(dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC).timestamp() * 1_000_000)


def ticks(
    tenant_id: str, n: int, *, start: int = 0, symbol: str = "EURUSD"
) -> list[ingest_pb2.Tick]:
    return [
        ingest_pb2.Tick(
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant_id}/{symbol}/{i}")),
            tenant_id=tenant_id,
            user_id="u1",
            symbol=symbol,
            time_unix_us=NOW_US + i * 1000,
            bid=1.1 + i * 1e-5,
            ask=1.1002 + i * 1e-5,
            volume=i % 7 + 1,
            spread=0.2,
        )
        for i in range(start, start + n)
    ]


def batch(*records: ingest_pb2.Tick) -> bytes:
    return ingest_pb2.IngestBatch(ticks=list(records), producer="test").SerializeToString()


@pytest.fixture
async def ingest_token(service_headers: TokenFactory) -> object:
    async def make(tenants: list[str]) -> str:
        headers = await service_headers(tenants, (Scope.INGEST,))
        return headers["Authorization"]

    return make


async def count_ticks(core: Application, tenant_id: str) -> int:
    value = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {core.settings.shared_schema}.trading_ticks WHERE company_id = $1",
        tenant_id,
    )
    return int(value)


async def letters(core: Application, tenant_id: str | None = None) -> list[str]:
    return [d.code for d in await core.dead_letters.list(tenant_id=tenant_id, limit=1000)]


async def test_the_same_ticks_twice_are_stored_once(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant = await new_tenant("ing")
    auth = await ingest_token([tenant.tenant_id])  # type: ignore[operator]
    records = ticks(tenant.tenant_id, 500)
    first = [Inbound(batch(*records[:300]), "s", auth), Inbound(batch(*records[300:]), "s", auth)]
    assert await core.ingest.process("nats", first) == [Verdict.ACK, Verdict.ACK]
    # Both transports, overlapping batches, duplicates inside one message.
    again = [Inbound(batch(*records[100:], *records[:50]), "t", auth)]
    assert await core.ingest.process("kafka", again) == [Verdict.ACK]
    assert await count_ticks(core, tenant.tenant_id) == 500
    stored = await core.owner_pool.fetchrow(
        f"SELECT time, bid, ask, volume, user_id FROM {core.settings.shared_schema}.trading_ticks"
        " WHERE company_id = $1 AND event_id = $2",
        tenant.tenant_id,
        uuid.UUID(records[7].event_id),
    )
    assert stored["time"] == dt.datetime(2026, 11, 25, 12, 0, 0, 7000, tzinfo=dt.UTC)
    assert str(stored["bid"]) == "1.10007" and stored["volume"] == 1 and stored["user_id"] == "u1"
    # The 1-minute rollup saw every tick once.
    candles = await core.owner_pool.fetchval(
        f"SELECT sum(ticks) FROM {core.settings.shared_schema}.candles_1m WHERE company_id = $1",
        tenant.tenant_id,
    )
    assert candles == 500
    assert await letters(core, tenant.tenant_id) == []


async def test_event_ids_are_unique_by_constraint_not_by_memory(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("ingc")
    shared = core.settings.shared_schema
    async with core.owner_pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {shared}.trading_ticks (event_id, time, company_id, user_id, symbol)"
            " VALUES ($1, now(), $2, 'u', 'X')",
            uuid.UUID(int=1),
            tenant.tenant_id,
        )
        with pytest.raises(
            asyncpg.UniqueViolationError, match=r"\(company_id, \"time\", event_id\)"
        ):
            await conn.execute(
                f"INSERT INTO {shared}.trading_ticks (event_id, time, company_id, user_id, symbol)"
                " SELECT event_id, time, company_id, user_id, symbol FROM"
                f" {shared}.trading_ticks WHERE company_id = $1",
                tenant.tenant_id,
            )


async def test_poison_records_reach_dead_letters_and_do_not_block_the_rest(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant = await new_tenant("ingp")
    auth = await ingest_token([tenant.tenant_id, "nosuchtenant"])  # type: ignore[operator]
    good = ticks(tenant.tenant_id, 100)
    overflow = ticks(tenant.tenant_id, 1, start=1000)[0]
    overflow.volume = 2**40  # integer column: PostgreSQL refuses it
    too_long = ticks(tenant.tenant_id, 1, start=1001)[0]
    too_long.user_id = "u" * 80  # varchar(50)
    no_tenant = ticks("nosuchtenant", 1)[0]
    bad_id = ticks(tenant.tenant_id, 1, start=1002)[0]
    bad_id.event_id = "not-a-uuid"
    messages = [
        Inbound(b"\xff\xff\x00garbage", "s", auth),
        Inbound(batch(*good[:50], overflow, too_long), "s", auth),
        Inbound(batch(no_tenant, bad_id, *good[50:]), "s", auth),
    ]
    verdicts = await core.ingest.process("nats", messages)
    assert verdicts == [Verdict.TERM, Verdict.ACK, Verdict.ACK]
    assert await count_ticks(core, tenant.tenant_id) == 100
    codes = sorted(await letters(core, tenant.tenant_id))
    assert len(codes) == 3 and codes.count("invalid_record") == 1, codes
    assert "tenant_not_found" in await letters(core, "nosuchtenant")
    bad = [d for d in await core.dead_letters.list(limit=1000) if d.code == "bad_protobuf"]
    assert any(d.payload == b"\xff\xff\x00garbage" for d in bad)


async def test_a_token_for_one_tenant_cannot_ingest_for_another(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    a = await new_tenant("inga")
    b = await new_tenant("ingb")
    auth_a = await ingest_token([a.tenant_id])  # type: ignore[operator]
    message = batch(*ticks(a.tenant_id, 5), *ticks(b.tenant_id, 5))
    assert await core.ingest.process("nats", [Inbound(message, "s", auth_a)]) == [Verdict.ACK]
    assert await count_ticks(core, a.tenant_id) == 5
    assert await count_ticks(core, b.tenant_id) == 0
    assert await letters(core, b.tenant_id) == ["permission_denied"] * 5
    # No token, a forged one, a read-only one: the whole message is refused.
    read_only = await core.services.register(
        "ro-ingest", tenants=[b.tenant_id], scopes=[Scope.READ], with_secret=False
    )
    del read_only
    ro = core.tokens.issue("ro-ingest", tenants=[b.tenant_id], scopes=[Scope.READ], ttl_seconds=60)
    verdicts = await core.ingest.process(
        "nats",
        [
            Inbound(batch(*ticks(b.tenant_id, 3)), "s", None),
            Inbound(batch(*ticks(b.tenant_id, 3)), "s", "Bearer forged.token.value"),
            Inbound(batch(*ticks(b.tenant_id, 3)), "s", f"Bearer {ro}"),
        ],
    )
    assert verdicts == [Verdict.TERM, Verdict.TERM, Verdict.ACK]
    assert await count_ticks(core, b.tenant_id) == 0


async def test_dead_letters_replay_once_the_cause_is_fixed(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant_id = f"late_{uuid.uuid4().hex[:8]}"
    auth = await ingest_token([tenant_id])  # type: ignore[operator]
    records = ticks(tenant_id, 20)
    await core.ingest.process("kafka", [Inbound(batch(*records), "k/0@1", auth)])
    pending = await core.dead_letters.list(tenant_id=tenant_id)
    assert [d.code for d in pending] == ["tenant_not_found"] * 20
    assert {d.service for d in pending} == {core.tokens.verify(auth.split()[1]).service}
    still = await core.ingest.replay([d.id for d in pending[:5]])
    assert (still.replayed, still.still_failing, still.stored, still.refused) == (5, 5, 0, 0)
    await core.tenants.create(tenant_id)
    report = await core.ingest.replay(None, tenant_id=tenant_id)
    assert (report.replayed, report.stored, report.still_failing) == (20, 20, 0)
    assert await count_ticks(core, tenant_id) == 20
    assert await core.dead_letters.list(tenant_id=tenant_id) == []
    # Replaying the same letters again (now marked replayed) stores nothing twice.
    again = await core.ingest.replay([d.id for d in pending])
    assert again.replayed == 0
    assert await count_ticks(core, tenant_id) == 20


async def test_predictions_signals_and_rows_are_stored_once(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant = await new_tenant("ingr")
    t = tenant.tenant_id
    auth = await ingest_token([t])  # type: ignore[operator]
    prediction = ingest_pb2.Prediction(
        event_id=str(uuid.uuid4()), tenant_id=t, user_id="u1", symbol="EURUSD",
        time_unix_us=NOW_US, prediction_type="buy", confidence=0.75, model_version="m1",
        features_json='{"rsi": 31}',
    )  # fmt: skip
    user = ingest_pb2.TenantRow(
        event_id=str(uuid.uuid4()), tenant_id=t, table="users",
        row_json='{"user_id": "u1", "email": "u1@x", "subscription_tier": "pro"}',
    )  # fmt: skip
    signal = ingest_pb2.TradingSignal(
        event_id=str(uuid.uuid4()), tenant_id=t, signal_id="s1", user_id="u1", symbol="EURUSD",
        action="buy", confidence=0.5, payload_json='{"why": "test"}',
    )  # fmt: skip
    foreign = ingest_pb2.TenantRow(
        event_id=str(uuid.uuid4()), tenant_id=t, table="no_such_table", row_json='{"a": 1}'
    )
    message = ingest_pb2.IngestBatch(
        predictions=[prediction], rows=[user, foreign], signals=[signal]
    ).SerializeToString()
    for _ in range(2):
        await core.ingest.process("nats", [Inbound(message, "s", auth)])
    schema = tenant.schema_name
    assert await core.owner_pool.fetchval(f"SELECT count(*) FROM {schema}.users") == 1
    row = await core.owner_pool.fetchrow(f"SELECT * FROM {schema}.trading_signals")
    assert row["action"] == "buy" and row["payload"] == {"why": "test"}
    assert row["created_at"] is not None  # the column's default, not NULL
    p = await core.owner_pool.fetchrow(
        f"SELECT confidence, features FROM {core.settings.shared_schema}.ai_predictions"
        " WHERE company_id = $1",
        t,
    )
    assert str(p["confidence"]) == "0.75" and p["features"] == {"rsi": 31}
    # The first pass met the signal before its user existed (a foreign key, a row-level error:
    # dead-lettered alone); the second pass stored it. The unknown table fails both passes: the
    # same letter, stored once.
    assert sorted(await letters(core, t)) == ["foreign_key_violation", "undefined_table"]


async def test_dead_letters_name_the_service_that_published_each_record(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant = await new_tenant("ingw")
    t, missing = tenant.tenant_id, f"gone_{uuid.uuid4().hex[:8]}"
    first = await ingest_token([t, missing])  # type: ignore[operator]
    second = await ingest_token([t])  # type: ignore[operator]
    name = {auth: core.tokens.verify(auth.split()[1]).service for auth in (first, second)}
    # One batch, two publishers of the same tenant: each refused record names its own.
    overflow_1, overflow_2, too_long, bad_id, other = ticks(t, 5, start=2000)
    overflow_1.volume = overflow_2.volume = 2**40
    too_long.user_id = "u" * 80
    bad_id.event_id = f"not-a-uuid-{uuid.uuid4().hex[:8]}"
    (nobody,) = ticks(missing, 1)
    (foreign,) = ticks(f"other_{uuid.uuid4().hex[:8]}", 1)
    messages = [
        Inbound(batch(overflow_1, *ticks(t, 3)), "s", first),
        Inbound(batch(overflow_2, too_long, bad_id), "s", second),
        Inbound(batch(nobody, other), "s", first),
        Inbound(batch(foreign), "s", second),  # a tenant the token does not cover
        Inbound(b"\xff\xff\x00garbage", "s", second),
        Inbound(batch(*ticks(t, 1, start=3000)), "s", None),
    ]
    assert await core.ingest.process("nats", messages) == [Verdict.ACK] * 4 + [Verdict.TERM] * 2
    assert await count_ticks(core, t) == 4
    by_event = {d.event_id: d for d in await core.dead_letters.list(limit=10_000)}
    expected = {
        overflow_1.event_id: name[first],
        overflow_2.event_id: name[second],
        too_long.event_id: name[second],
        nobody.event_id: name[first],
        foreign.event_id: name[second],
    }
    assert {e: by_event[e].service for e in expected} == expected
    assert by_event[foreign.event_id].code == "permission_denied"
    assert by_event[nobody.event_id].code == "tenant_not_found"
    # Decoding refused it (not a UUID): its letter names its publisher too.
    assert (by_event[bad_id.event_id].code, by_event[bad_id.event_id].service) == (
        "invalid_record", name[second],
    )  # fmt: skip
    whole = {
        d.code: d.service
        for d in await core.dead_letters.list(limit=10_000)
        if d.payload in (messages[4].payload, messages[5].payload)
    }
    assert whole == {"bad_protobuf": name[second], "unauthenticated": None}


def tokenless(core: Application, **changes: Any) -> IngestPipeline:
    """A pipeline like ``core.ingest`` that requires no token (``DBSVC_INGEST_REQUIRE_TOKEN=0``);
    ``changes`` replace its parts."""
    parts: dict[str, Any] = {
        "writer": IngestWriter(core.pools, shared_schema=core.settings.shared_schema, parallel=2),
        "dead_letters": core.dead_letters,
        "authenticator": core.authenticator,
        "registry": core.registry,
        "logins": core.logins,
        "metrics": core.metrics,
        "require_token": False,
    }
    return IngestPipeline(**{**parts, **changes})


async def test_letters_without_a_publisher_replay_only_where_no_token_is_required(
    core: Application,
) -> None:
    tenant_id = f"open_{uuid.uuid4().hex[:8]}"
    open_pipeline = tokenless(core)
    records = ticks(tenant_id, 4)
    await open_pipeline.process("nats", [Inbound(batch(*records[:3]), "s", None)])
    unauthenticated = batch(records[3])
    await core.ingest.process("nats", [Inbound(unauthenticated, "s", None)])
    letters = await core.dead_letters.list(tenant_id=tenant_id)
    assert [(d.code, d.service) for d in letters] == [("tenant_not_found", None)] * 3
    (refused,) = [
        d for d in await core.dead_letters.list(limit=10_000) if d.payload == unauthenticated
    ]
    assert (refused.code, refused.service) == ("unauthenticated", None)
    await core.tenants.create(tenant_id)
    ids = [*(d.id for d in letters), refused.id]

    # Where tokens are required, nobody vouches for them now.
    report = await core.ingest.replay(ids)
    assert (report.refused, report.replayed, report.stored) == (4, 0, 0)
    reasons = {r["id"]: r["reason"] for r in report.refusals}
    assert reasons[letters[0].id] == (
        f"refused: publisher unknown: publish again with a token that holds ingest for {tenant_id}"
    )
    assert await count_ticks(core, tenant_id) == 0

    # Without tokens they replay, except the one refused for want of a token.
    report = await open_pipeline.replay(ids)
    assert (report.refused, report.replayed, report.stored) == (1, 3, 3)
    assert report.refusals[0]["id"] == refused.id
    assert report.refusals[0]["reason"].startswith("refused: unauthenticated")
    assert await count_ticks(core, tenant_id) == 3
    (pending,) = await core.dead_letters.list(ids=ids)
    assert pending.id == refused.id and pending.replayed_at is None


# Review: tenants with the same event ids, failures that do not pass, dead letters once, user ids.


def feed(tenant_id: str, n: int, *, start: int = 0) -> list[ingest_pb2.Tick]:
    """Ticks of a market-data feed that several tenants receive: ids from the feed's own key
    (the pattern of ``event_id_for`` before it took the tenant), the same for every tenant."""
    records = ticks(tenant_id, n, start=start)
    for record in records:
        i = (record.time_unix_us - NOW_US) // 1000
        record.event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"feed-1/EURUSD/{i}"))
    return records


async def test_two_tenants_fed_the_same_market_data_both_store_it(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    a, b = (await new_tenant("feeda")).tenant_id, (await new_tenant("feedb")).tenant_id
    auth = await ingest_token([a, b])  # type: ignore[operator]
    # Separate batches and both transports, as two tenants' feeds arrive.
    assert await core.ingest.process("nats", [Inbound(batch(*feed(a, 50)), "s", auth)])
    await core.ingest.process("kafka", [Inbound(batch(*feed(b, 50)), "k", auth)])
    await core.ingest.process("nats", [Inbound(batch(*feed(b, 50)), "s", auth)])  # a copy
    assert (await count_ticks(core, a), await count_ticks(core, b)) == (50, 50)
    # A's producer cannot hide B's records by publishing B's predictable ids first either.
    await core.ingest.process("nats", [Inbound(batch(*feed(a, 10, start=50)), "s", auth)])
    await core.ingest.process("kafka", [Inbound(batch(*feed(b, 10, start=50)), "k", auth)])
    assert (await count_ticks(core, a), await count_ticks(core, b)) == (60, 60)
    # The memory of recent records is keyed like the unique index: the same id at another time
    # is another row of the same tenant, and PostgreSQL decides.
    (moved,) = feed(a, 1)
    moved.time_unix_us += 3_600_000_000
    await core.ingest.process("nats", [Inbound(batch(moved), "s", auth)])
    assert await count_ticks(core, a) == 61

    # Signals and rows: the same event id in two tenants' own tables.
    shared_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "crm/user/1"))
    for tenant_id in (a, b):
        row = ingest_pb2.TenantRow(
            event_id=shared_id, tenant_id=tenant_id, table="users",
            row_json=f'{{"user_id": "same-{tenant_id}", "email": "x@x", "subscription_tier": "pro"}}',
        )  # fmt: skip
        message = ingest_pb2.IngestBatch(rows=[row]).SerializeToString()
        await core.ingest.process("nats", [Inbound(message, "s", auth)])
    for tenant_id in (a, b):
        schema = (await core.registry.get_active(tenant_id)).schema_name
        assert await core.owner_pool.fetchval(
            f"SELECT count(*) FROM {quote_ident(schema)}.users WHERE user_id = $1",
            f"same-{tenant_id}",
        ) == 1  # fmt: skip
    assert await letters(core, a) == [] and await letters(core, b) == []


async def test_a_tenant_whose_login_is_refused_is_dead_lettered_without_stalling_the_others(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    broken, fine = await new_tenant("pwbad"), await new_tenant("pwok")
    auth = await ingest_token([broken.tenant_id, fine.tenant_id])  # type: ignore[operator]
    # The role's password no longer matches the sealed secret (28P01 at every login).
    await core.owner_pool.execute(
        f"ALTER ROLE {quote_ident(broken.role_name)} PASSWORD 'not-the-sealed-one'"
    )
    await core.pools.close_tenant(broken.tenant_id)
    first = [
        Inbound(batch(*ticks(broken.tenant_id, 5), *ticks(fine.tenant_id, 5)), "s", auth),
        Inbound(batch(*ticks(fine.tenant_id, 5, start=5)), "s", auth),
    ]
    async with asyncio.timeout(30):  # retried without end, it never returned
        assert await core.ingest.process("nats", first) == [Verdict.ACK, Verdict.ACK]
    assert await count_ticks(core, fine.tenant_id) == 10
    dead = await core.dead_letters.list(tenant_id=broken.tenant_id, limit=100)
    assert [d.code for d in dead] == ["retries_exhausted"] * 5
    assert "invalid_password" in dead[0].reason and "SQLSTATE 28P01" in dead[0].reason
    # Later batches: the failing tenant gets one try, not another full round.
    started = time.monotonic()
    later = [Inbound(batch(*ticks(broken.tenant_id, 3, start=5), *ticks(fine.tenant_id, 5, start=10)), "s", auth)]  # fmt: skip
    assert await core.ingest.process("kafka", later) == [Verdict.ACK]
    assert time.monotonic() - started < 1.0
    assert await count_ticks(core, fine.tenant_id) == 15
    # Fixed, the letters replay.
    password = core.secret_box.open(broken.role_secret)
    await core.owner_pool.execute(
        f"ALTER ROLE {quote_ident(broken.role_name)} PASSWORD '{password}'"
    )
    report = await core.ingest.replay(None, tenant_id=broken.tenant_id)
    assert (report.replayed, report.stored, report.still_failing) == (8, 8, 0)
    assert await count_ticks(core, broken.tenant_id) == 8


async def test_a_master_key_that_opens_no_tenant_secret_dead_letters_instead_of_looping(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("mkey")
    wrong_key = tokenless(core, logins=TenantLogins(SecretBox("another-master-key-" + "z" * 32)))
    records = ticks(tenant.tenant_id, 4)
    async with asyncio.timeout(30):
        verdicts = await wrong_key.process("nats", [Inbound(batch(*records), "s", None)])
    assert verdicts == [Verdict.ACK]
    dead = await core.dead_letters.list(tenant_id=tenant.tenant_id, limit=100)
    assert [d.code for d in dead] == ["tenant_secret_unreadable"] * 4
    assert "master key" in dead[0].reason
    assert await count_ticks(core, tenant.tenant_id) == 0
    report = await tokenless(core).replay([d.id for d in dead])  # the right key: stored
    assert (report.stored, report.still_failing) == (4, 0)


class FailingFor(IngestWriter):
    """A writer that fails for one tenant with an error nobody foresaw."""

    def __init__(self, core: Application, tenant_id: str) -> None:
        super().__init__(core.pools, shared_schema=core.settings.shared_schema)
        self.tenant_id = tenant_id
        self.calls = 0

    async def store(
        self, login: TenantLogin, schema: str, work: TenantWork, *, limit_seconds: float = 30.0
    ) -> StoreResult:
        if login.tenant_id == self.tenant_id:
            self.calls += 1
            raise RuntimeError("a bug in the writer")
        return await super().store(login, schema, work, limit_seconds=limit_seconds)


async def test_an_unforeseen_error_is_retried_a_few_times_then_dead_lettered(
    core: Application, new_tenant: TenantFactory
) -> None:
    bad, good = (await new_tenant("bug")).tenant_id, (await new_tenant("nobug")).tenant_id
    writer = FailingFor(core, bad)
    pipeline = tokenless(core, writer=writer)
    message = batch(*ticks(bad, 2), *ticks(good, 2))
    async with asyncio.timeout(30):
        assert await pipeline.process("nats", [Inbound(message, "s", None)]) == [Verdict.ACK]
    assert writer.calls > 1
    assert await count_ticks(core, good) == 2
    dead = await core.dead_letters.list(tenant_id=bad, limit=100)
    assert [d.code for d in dead] == ["retries_exhausted"] * 2
    assert dead[0].reason.startswith(f"gave up after {writer.calls} tries")
    assert "RuntimeError: a bug in the writer" in dead[0].reason


async def test_a_poison_record_is_one_dead_letter_announced_once(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant = await new_tenant("dl1")
    auth = await ingest_token([tenant.tenant_id])  # type: ignore[operator]
    (poison,) = ticks(tenant.tenant_id, 1)
    poison.user_id = "u" * 80  # varchar(50)
    message = batch(poison, *ticks(tenant.tenant_id, 2, start=1))
    announced: dict[str, list[NewDeadLetter]] = {"nats": [], "kafka": []}

    def sink(transport: str) -> Any:
        async def announce(letters: Sequence[NewDeadLetter]) -> None:
            announced[transport].extend(letters)

        return announce

    # Both transports carry it, and each delivers it twice (a redelivery).
    for transport in ("nats", "kafka", "nats", "kafka"):
        await core.ingest.process(
            transport, [Inbound(message, transport, auth)], announce=sink(transport)
        )
    dead = await core.dead_letters.list(tenant_id=tenant.tenant_id, limit=100)
    assert [(d.code, d.event_id, d.transport) for d in dead] == [
        ("data_exception", poison.event_id, "nats")
    ]
    assert [d.event_id for d in announced["nats"]] == [poison.event_id]
    assert announced["kafka"] == []
    # A whole message refused (no token) is one letter too.
    garbage = b"\x0a\xff\xff not a batch " + uuid.uuid4().bytes
    for transport in ("nats", "kafka"):
        await core.ingest.process(transport, [Inbound(garbage, transport, None)])
    assert len([d for d in await core.dead_letters.list(limit=10_000) if d.payload == garbage]) == 1


async def test_a_record_naming_a_nul_is_dead_lettered_not_looping(
    core: Application, new_tenant: TenantFactory, ingest_token: object
) -> None:
    tenant = await new_tenant("nul")
    auth = await ingest_token([tenant.tenant_id])  # type: ignore[operator]
    bad = ingest_pb2.Tick(event_id="\x00" * 5, tenant_id=tenant.tenant_id, symbol="X")
    message = batch(bad, *ticks(tenant.tenant_id, 2))
    async with asyncio.timeout(30):
        assert await core.ingest.process("nats", [Inbound(message, "s", auth)]) == [Verdict.ACK]
    assert await count_ticks(core, tenant.tenant_id) == 2
    (letter,) = await core.dead_letters.list(tenant_id=tenant.tenant_id, limit=10)
    assert (letter.code, letter.event_id) == ("invalid_record", "\ufffd" * 5)


async def test_market_data_without_a_user_id_is_the_companys_and_seen_with_a_user_id(
    core: Application, new_tenant: TenantFactory, ingest_token: object, client_for: ClientFactory
) -> None:
    tenant = await new_tenant("nouser")
    t = tenant.tenant_id
    auth = await ingest_token([t])  # type: ignore[operator]
    own, other, everyone = ticks(t, 3)  # the company's tick is the last one
    everyone.user_id = ""  # absent: protobuf's default
    own.user_id, other.user_id = "u9", "u8"
    prediction = ingest_pb2.Prediction(
        event_id=str(uuid.uuid4()), tenant_id=t, symbol="EURUSD", time_unix_us=NOW_US,
        prediction_type="buy", confidence=0.5,
    )  # fmt: skip
    message = ingest_pb2.IngestBatch(ticks=[everyone, own, other], predictions=[prediction])
    await core.ingest.process("nats", [Inbound(message.SerializeToString(), "s", auth)])

    # A caller with user id u9 sees the company's tick and its own, not u8's.
    db = await client_for(tenant, (Scope.READ,), user_id="u9")
    start = dt.datetime.fromtimestamp(NOW_US / 1e6, dt.UTC)
    end = start + dt.timedelta(minutes=1)
    series = await db.time_series("EURUSD", start, end)
    assert len(series.rows) == 2, series.rows
    candles = await db.candles("EURUSD", start, end, dt.timedelta(seconds=1), source="raw")
    assert sum(row[6] for row in candles.rows) == 2, candles.rows  # ticks per bucket
    (last,) = (await db.last_ticks(start)).rows
    assert last[1] == start + dt.timedelta(milliseconds=2)  # the company's tick
    predictions = await db.fetch_all("SELECT count(*) FROM ai_predictions")
    assert predictions.rows == [(1,)]

    # Stored as NULL, the company's.
    shared = core.settings.shared_schema
    stored = await core.owner_pool.fetch(
        f"SELECT event_id::text, user_id FROM {shared}.trading_ticks WHERE company_id = $1", t
    )
    assert {r["event_id"]: r["user_id"] for r in stored} == {
        everyone.event_id: None, own.event_id: "u9", other.event_id: "u8",
    }  # fmt: skip
    assert await core.owner_pool.fetchval(
        f"SELECT user_id FROM {shared}.ai_predictions WHERE company_id = $1", t
    ) is None  # fmt: skip
