"""Tenant A against tenant B through ingestion: whatever A's producer puts in a message, it can
only ever write A's rows. The pipeline is what both transports call, so attacking it attacks
NATS and Kafka alike (tests/integration/test_ingest_transports.py covers the transports).

What A gets dead-lettered stays A's problem: replaying dead letters (an operator's call, without
a token) re-checks who published them, so a refused record never reaches B that way either."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.ingest import DeadLetter, Inbound, NewDeadLetter, Verdict
from database_service_client import prediction, tick
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
    shared_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"collision/{T0}"))
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


async def test_as_producer_cannot_hide_another_tenants_records_behind_their_ids(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    # The other tenant's ids are predictable (a feed's sequence, or event_id_for's scheme of
    # earlier versions without the tenant). A's producer publishes them first, as A's own; the
    # service remembers recent records to skip the other transport's copy, and that memory must
    # not take them for the other tenant's. (C, not B: C's records are stored here.)
    c = await core.tenants.create(f"c_{uuid.uuid4().hex[:8]}")
    c_name = f"c-feed-{uuid.uuid4().hex[:8]}"
    await core.services.register(
        c_name, tenants=[c.tenant_id], scopes=[Scope.INGEST], with_secret=False
    )
    c_token = "Bearer " + core.tokens.issue(
        c_name, tenants=[c.tenant_id], scopes=[Scope.INGEST], ttl_seconds=600
    )
    ids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"feed-1/EURUSD/{i}")) for i in range(20)]
    planted = [
        tick(tenants.a.tenant_id, "EURUSD", T0 + 20 + i, bid=1.0, ask=1.0, event_id=e)
        for i, e in enumerate(ids)
    ]
    assert await send(core, a_token, ingest_pb2.IngestBatch(ticks=planted)) is Verdict.ACK
    real = [
        tick(c.tenant_id, "EURUSD", T0 + 20 + i, bid=2.0, ask=2.0, event_id=e)
        for i, e in enumerate(ids)
    ]
    (verdict,) = await core.ingest.process(
        "kafka", [Inbound(ingest_pb2.IngestBatch(ticks=real).SerializeToString(), "k", c_token)]
    )
    assert verdict is Verdict.ACK
    stored = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.shared}.trading_ticks"
        " WHERE company_id = $1 AND event_id = ANY($2)",
        c.tenant_id,
        [uuid.UUID(e) for e in ids],
    )
    assert stored == 20


async def test_a_cannot_read_or_write_bs_staging_tables(
    tenants: Tenants, attacker_conn: asyncpg.Connection
) -> None:
    for table in ("_ingest_ticks", "_ingest_predictions", "_ingest_events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.fetch(f"SELECT * FROM {tenants.b.schema_name}.{table}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.execute(f"DELETE FROM {tenants.b.schema_name}.{table}")


# Replaying dead letters.


def service_of(core: Application, authorization: str) -> str:
    return core.tokens.verify(authorization.removeprefix("Bearer ")).service


async def pending_letters(core: Application, *event_ids: str) -> list[DeadLetter]:
    wanted = set(event_ids)
    return [d for d in await core.dead_letters.list(limit=10_000) if d.event_id in wanted]


async def letters_with_payload(core: Application, payload: bytes) -> list[DeadLetter]:
    return [d for d in await core.dead_letters.list(limit=10_000) if d.payload == payload]


async def b_rows_with(core: Application, tenants: Tenants, *event_ids: str) -> int:
    """B's ticks and predictions carrying these event ids (``unchanged_victim`` checks the rest)."""
    ids = [uuid.UUID(e) for e in event_ids]
    total = 0
    for table in ("trading_ticks", "ai_predictions"):
        total += await core.owner_pool.fetchval(
            f"SELECT count(*) FROM {tenants.shared}.{table}"
            " WHERE company_id = $1 AND event_id = ANY($2)",
            tenants.b.tenant_id,
            ids,
        )
    return int(total)


async def test_replaying_as_records_naming_b_stores_nothing_in_b(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    b = tenants.b.tenant_id
    forged_tick = tick(b, "EURUSD", T0 + 1, bid=9.9, ask=9.9, user_id="b-user")
    forged_prediction = prediction(
        b, "EURUSD", T0 + 1, prediction_type="sell", confidence=0.99, user_id="b-user"
    )
    forged_user = ingest_pb2.TenantRow(
        event_id=str(uuid.uuid4()), tenant_id=b, table="users",
        row_json='{"user_id": "a-plant", "email": "a@plant", "subscription_tier": "free"}',
    )  # fmt: skip
    message = ingest_pb2.IngestBatch(
        ticks=[forged_tick], predictions=[forged_prediction], rows=[forged_user]
    )
    assert await send(core, a_token, message) is Verdict.ACK
    event_ids = [forged_tick.event_id, forged_prediction.event_id, forged_user.event_id]
    letters = await pending_letters(core, *event_ids)
    assert sorted(d.code for d in letters) == ["permission_denied"] * 3
    assert {d.service for d in letters} == {service_of(core, a_token)}
    assert {d.tenant_id for d in letters} == {b}

    # Named one by one, and as B's pending letters (``dead-letters replay --tenant B``).
    report = await core.ingest.replay([d.id for d in letters])
    assert (report.refused, report.replayed, report.stored, report.duplicates) == (3, 0, 0, 0)
    assert sorted(r["id"] for r in report.refusals) == sorted(d.id for d in letters)
    again = await core.ingest.replay(None, tenant_id=b)
    assert again.refused >= 3 and (again.replayed, again.stored) == (0, 0)

    assert await b_rows_with(core, tenants, forged_tick.event_id, forged_prediction.event_id) == 0
    assert not await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.b.schema_name}.users WHERE user_id = 'a-plant'"
    )
    still = await pending_letters(core, *event_ids)
    assert len(still) == 3 and all(d.replayed_at is None for d in still)
    for letter in still:
        assert letter.replay_result is not None
        assert letter.replay_result.startswith("refused: permission_denied")
        assert f"publish again with a token that holds ingest for {b}" in letter.replay_result


async def test_replaying_messages_without_a_valid_token_stores_nothing(
    core: Application, tenants: Tenants
) -> None:
    b = tenants.b.tenant_id
    read_only = f"ro-{uuid.uuid4().hex[:8]}"
    await core.services.register(read_only, tenants=[b], scopes=[Scope.READ], with_secret=False)
    ro_token = core.tokens.issue(read_only, tenants=[b], scopes=[Scope.READ], ttl_seconds=60)
    stranger = core.tokens.issue(
        "nosvc-does-not-exist", tenants=[b], scopes=[Scope.INGEST], ttl_seconds=60
    )
    records = {
        name: tick(b, "EURUSD", T0 + 2, bid=8.8, ask=8.8, user_id="b-user")
        for name in ("none", "forged", "stranger", "read_only")
    }
    payloads = {
        n: ingest_pb2.IngestBatch(ticks=[t]).SerializeToString() for n, t in records.items()
    }
    tokens = {
        "none": None,
        "forged": "Bearer forged.token.value",
        "stranger": f"Bearer {stranger}",
        "read_only": f"Bearer {ro_token}",
    }
    verdicts = await core.ingest.process(
        "nats", [Inbound(payloads[n], "x", tokens[n]) for n in records]
    )
    assert verdicts == [Verdict.TERM, Verdict.TERM, Verdict.TERM, Verdict.ACK]
    # No valid token: the whole message, no publisher. A valid one lacking ingest: its service.
    whole = [
        letter
        for n in ("none", "forged", "stranger")
        for letter in await letters_with_payload(core, payloads[n])
    ]
    assert [(d.code, d.service, d.tenant_id) for d in whole] == [
        ("unauthenticated", None, None)
    ] * 3
    (scoped,) = await pending_letters(core, records["read_only"].event_id)
    assert (scoped.code, scoped.service) == ("permission_denied", read_only)

    report = await core.ingest.replay([d.id for d in [*whole, scoped]])
    assert (report.refused, report.replayed, report.stored) == (4, 0, 0)
    assert await b_rows_with(core, tenants, *(t.event_id for t in records.values())) == 0
    for letter in await core.dead_letters.list(ids=[d.id for d in whole], limit=10):
        assert letter.replayed_at is None and letter.replay_result is not None
        assert letter.replay_result.startswith("refused: unauthenticated")
        assert f"holds ingest for {b}" in letter.replay_result


async def test_replaying_a_mixed_message_stores_only_what_was_stored_before(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    mine = [tick(a, "EURUSD", T0 + 3 + i, bid=1.0, ask=1.0) for i in range(3)]
    theirs = [tick(b, "EURUSD", T0 + 3 + i, bid=7.7, ask=7.7, user_id="b-user") for i in range(3)]
    message = ingest_pb2.IngestBatch(ticks=[mine[0], *theirs[:2], *mine[1:], theirs[2]])
    assert await send(core, a_token, message) is Verdict.ACK
    stored = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.shared}.trading_ticks"
        " WHERE company_id = $1 AND event_id = ANY($2)",
        a,
        [uuid.UUID(t.event_id) for t in mine],
    )
    assert stored == 3
    assert await pending_letters(core, *(t.event_id for t in mine)) == []
    letters = await pending_letters(core, *(t.event_id for t in theirs))
    assert [(d.code, d.tenant_id) for d in letters] == [("permission_denied", b)] * 3
    assert {d.service for d in letters} == {service_of(core, a_token)}

    report = await core.ingest.replay(None, tenant_id=b)
    assert report.refused >= 3 and (report.replayed, report.stored) == (0, 0)
    assert {r["id"] for r in report.refusals} >= {d.id for d in letters}
    assert await b_rows_with(core, tenants, *(t.event_id for t in theirs)) == 0
    assert len(await pending_letters(core, *(t.event_id for t in theirs))) == 3


@pytest.fixture
async def b_feed(core: Application, tenants: Tenants) -> AsyncIterator[tuple[str, DeadLetter]]:
    """A service that held ingest for B, and a letter of its that would store a tick in B now:
    published while B was suspended, B resumed since."""
    b = tenants.b.tenant_id
    name = f"b-feed-{uuid.uuid4().hex[:8]}"
    await core.services.register(name, tenants=[b], scopes=[Scope.INGEST], with_secret=False)
    token = core.tokens.issue(name, tenants=[b], scopes=[Scope.INGEST], ttl_seconds=600)
    record = tick(b, "EURUSD", T0 + 10, bid=6.6, ask=6.6, user_id="b-user")
    await core.tenants.suspend(b)
    try:
        await send(core, f"Bearer {token}", ingest_pb2.IngestBatch(ticks=[record]))
    finally:
        await core.tenants.resume(b)
    (letter,) = await pending_letters(core, record.event_id)
    assert (letter.code, letter.service, letter.tenant_id) == ("tenant_suspended", name, b)
    yield name, letter
    await core.services.set_active(name, False)


@pytest.mark.parametrize("revocation", ["disabled", "narrowed", "no_ingest_scope"])
async def test_a_letter_whose_publisher_lost_its_authority_is_refused(
    core: Application, tenants: Tenants, b_feed: tuple[str, DeadLetter], revocation: str
) -> None:
    name, letter = b_feed
    if revocation == "disabled":
        await core.services.set_active(name, False)
    elif revocation == "narrowed":
        await core.services.register(
            name, tenants=[tenants.a.tenant_id], scopes=[Scope.INGEST], replace=True
        )
    else:
        await core.services.register(
            name, tenants=[tenants.b.tenant_id], scopes=[Scope.READ], replace=True
        )
    report = await core.ingest.replay([letter.id])
    assert (report.refused, report.replayed, report.stored) == (1, 0, 0)
    reason = report.refusals[0]["reason"]
    assert reason.startswith(f"refused: publisher service {name!r}")
    assert f"holds ingest for {tenants.b.tenant_id}" in reason
    assert await b_rows_with(core, tenants, letter.event_id or "") == 0
    (kept,) = await core.dead_letters.list(ids=[letter.id])
    assert kept.replayed_at is None and kept.replay_result == reason


async def test_a_letter_without_a_publisher_is_refused_where_tokens_are_required(
    core: Application, tenants: Tenants
) -> None:
    # As a letter from before publishers were recorded, or from a tokenless pipeline.
    b = tenants.b.tenant_id
    record = tick(b, "EURUSD", T0 + 11, bid=5.5, ask=5.5, user_id="b-user")
    await core.dead_letters.add(
        [
            NewDeadLetter(
                "nats", "old", "tenant_suspended", f"tenant {b!r} is suspended",
                ingest_pb2.IngestBatch(ticks=[record]).SerializeToString(), tenant_id=b,
                event_id=record.event_id,
            )
        ]
    )  # fmt: skip
    (letter,) = await pending_letters(core, record.event_id)
    report = await core.ingest.replay([letter.id])
    assert (report.refused, report.replayed, report.stored) == (1, 0, 0)
    assert report.refusals[0]["reason"] == (
        f"refused: publisher unknown: publish again with a token that holds ingest for {b}"
    )
    assert await b_rows_with(core, tenants, record.event_id) == 0


async def test_a_legitimate_letter_is_still_replayed_once_its_cause_is_gone(
    core: Application, tenants: Tenants, a_token: str
) -> None:
    a = tenants.a.tenant_id
    user = f"late-{uuid.uuid4().hex[:8]}"
    signal = ingest_pb2.TradingSignal(
        event_id=str(uuid.uuid4()), tenant_id=a, signal_id=f"s-{user}", user_id=user,
        symbol="EURUSD", action="buy",
    )  # fmt: skip
    await send(core, a_token, ingest_pb2.IngestBatch(signals=[signal]))
    (letter,) = await pending_letters(core, signal.event_id)
    assert (letter.code, letter.service) == ("foreign_key_violation", service_of(core, a_token))
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.a.schema_name}.users (user_id, email, subscription_tier)"
        " VALUES ($1, $2, 'free')",
        user,
        f"{user}@attacker.example",
    )
    report = await core.ingest.replay([letter.id])
    assert (report.replayed, report.stored, report.refused, report.still_failing) == (1, 1, 0, 0)
    assert (
        await core.owner_pool.fetchval(
            f"SELECT user_id FROM {tenants.a.schema_name}.trading_signals WHERE signal_id = $1",
            signal.signal_id,
        )
        == user
    )
    assert await pending_letters(core, signal.event_id) == []
