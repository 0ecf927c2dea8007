"""Decoding ingestion messages: pure functions, no sockets."""

from __future__ import annotations

import uuid

import pytest

from database_service.ingest.records import (
    TICK_COLUMNS,
    BadPayload,
    TenantWork,
    decode,
    single_record_batch,
)
from database_service_client._proto import ingest_pb2

EID = "6f1c2f5e-8d1b-4c4e-9a55-2b1f0e7c1a01"
EID2 = "6f1c2f5e-8d1b-4c4e-9a55-2b1f0e7c1a02"
EID3 = "6f1c2f5e-8d1b-4c4e-9a55-2b1f0e7c1a03"


def batch(**fields: object) -> bytes:
    return ingest_pb2.IngestBatch(**fields).SerializeToString()  # type: ignore[arg-type]


def test_a_tick_becomes_a_tuple_in_the_staging_tables_column_order() -> None:
    t = ingest_pb2.Tick(
        event_id=EID, tenant_id="abc", user_id="u", symbol="EURUSD", time_unix_us=5, bid=1.5
    )
    decoded = decode(batch(ticks=[t]))
    row = decoded.work["abc"].ticks[EID]
    assert dict(zip(TICK_COLUMNS, row, strict=True)) == {
        "event_id": EID, "time_us": 5, "user_id": "u", "symbol": "EURUSD", "bid": 1.5,
        "ask": None, "volume": None, "spread": None,
    }  # fmt: skip


def test_optional_zero_is_a_value_not_a_missing_field() -> None:
    t = ingest_pb2.Tick(event_id=EID, tenant_id="abc", symbol="X", volume=0, ask=0.0)
    row = decode(batch(ticks=[t])).work["abc"].ticks[EID]
    assert row[TICK_COLUMNS.index("volume")] == 0
    assert row[TICK_COLUMNS.index("ask")] == 0.0


def test_the_same_event_twice_in_a_message_is_one_record() -> None:
    t = ingest_pb2.Tick(event_id=EID, tenant_id="abc", symbol="X")
    decoded = decode(batch(ticks=[t, t, t]))
    assert decoded.records == 3 and decoded.work["abc"].size == 1


def test_records_are_grouped_by_tenant() -> None:
    ticks = [
        ingest_pb2.Tick(event_id=str(uuid.uuid4()), tenant_id=tenant, symbol="X")
        for tenant in ("abc", "xyz", "abc")
    ]
    decoded = decode(batch(ticks=ticks))
    assert {t: w.size for t, w in decoded.work.items()} == {"abc": 2, "xyz": 1}


@pytest.mark.parametrize("payload", [b"\xff\xff\xff", b"", batch(producer="only metadata")])
def test_what_is_not_a_batch_of_records_is_a_bad_payload(payload: bytes) -> None:
    with pytest.raises(BadPayload):
        decode(payload)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"tenant_id": "ABC"}, "tenant_id"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"event_id": "42"}, "event_id"),
        ({"symbol": ""}, "symbol"),
    ],
)
def test_unattributable_ticks_are_rejected_with_a_replayable_payload(
    fields: dict[str, str], reason: str
) -> None:
    values = {"event_id": EID, "tenant_id": "abc", "symbol": "X", **fields}
    t = ingest_pb2.Tick(**values)  # type: ignore[arg-type]
    decoded = decode(batch(ticks=[t]))
    (rejected,) = decoded.rejected
    assert rejected.code == "invalid_record" and reason in rejected.reason
    assert ingest_pb2.IngestBatch.FromString(rejected.payload).ticks[0] == t
    assert decoded.work == {}


@pytest.mark.parametrize(
    ("table", "row_json"),
    [
        ("other.users", '{"a": 1}'),
        ("_ingest_events", '{"event_id": "x"}'),
        ("users", "not json"),
        ("users", "[1, 2]"),
        ("users", "{}"),
        ("users", '{"bad column": 1}'),
    ],
)
def test_tenant_rows_name_an_own_table_and_a_json_object(table: str, row_json: str) -> None:
    row = ingest_pb2.TenantRow(event_id=EID, tenant_id="abc", table=table, row_json=row_json)
    (rejected,) = decode(batch(rows=[row])).rejected
    assert rejected.code == "invalid_record"


def test_a_signal_is_a_row_of_trading_signals() -> None:
    s = ingest_pb2.TradingSignal(
        event_id=EID, tenant_id="abc", signal_id="s1", symbol="X", action="buy",
        payload_json='{"k": 1}', created_at_unix_us=1_000_000,
    )  # fmt: skip
    work = decode(batch(signals=[s])).work["abc"]
    assert work.rows["trading_signals"][EID] == {
        "signal_id": "s1", "user_id": None, "symbol": "X", "action": "buy", "confidence": None,
        "payload": {"k": 1}, "created_at": "1970-01-01T00:00:01+00:00",
    }  # fmt: skip


def test_single_record_batches_round_trip_every_kind() -> None:
    records = [
        ingest_pb2.Tick(event_id=EID),
        ingest_pb2.Prediction(event_id=EID),
        ingest_pb2.TradingSignal(event_id=EID),
        ingest_pb2.TenantRow(event_id=EID),
    ]
    for record in records:
        decoded = ingest_pb2.IngestBatch.FromString(single_record_batch(record))
        assert (
            sum(len(f) for f in (decoded.ticks, decoded.predictions, decoded.signals, decoded.rows))
            == 1
        )


def test_large_batches_are_cut_into_parts_that_keep_every_record_once() -> None:
    from database_service.ingest.writer import _split, _Unit

    ticks = _Unit("ticks", None, [f"t{i}" for i in range(7001)], list(range(7001)))
    rows = _Unit("rows", "users", [f"r{i}" for i in range(3000)], list(range(3000)))
    parts = _split([ticks, rows], parallel=2, min_part=1000)
    assert len(parts) == 2
    assert [sum(len(u.keys) for u in p) for p in parts] == [5001, 5000]
    keys = [k for p in parts for u in p for k in u.keys]
    assert sorted(keys) == sorted([*ticks.keys, *rows.keys])
    assert all(u.values == [int(k[1:]) for k in u.keys] for p in parts for u in p)
    assert _split([ticks], parallel=2, min_part=5000) == [[ticks]]  # too small to cut
    assert _split([rows], parallel=1, min_part=1) == [[rows]]


def test_recent_records_are_known_by_tenant_time_and_event_id_like_the_unique_indexes() -> None:
    from database_service.ingest.pipeline import RecentEvents

    def work(tenant_id: str, time_us: int = 5) -> TenantWork:
        return decode(
            batch(
                ticks=[ingest_pb2.Tick(event_id=EID, tenant_id=tenant_id, symbol="X",
                                       time_unix_us=time_us)],
                predictions=[ingest_pb2.Prediction(event_id=EID2, tenant_id=tenant_id, symbol="X",
                                                   prediction_type="buy", time_unix_us=time_us)],
                rows=[ingest_pb2.TenantRow(event_id=EID3, tenant_id=tenant_id, table="users",
                                           row_json='{"user_id": "u"}')],
            )
        ).work[tenant_id]  # fmt: skip

    recent = RecentEvents(1000)
    recent.remember(work("abc"))
    # Another tenant's records with the same ids are its own: nothing is skipped.
    other = work("xyz")
    assert other.discard(recent.seen("xyz")) == 0 and other.size == 3
    # The same tenant at another time: another row of the shared tables (the row is the same).
    later = work("abc", time_us=6)
    assert later.discard(recent.seen("abc")) == 1
    assert (list(later.ticks), list(later.predictions), later.rows) == ([EID], [EID2], {})
    assert set(later.sources) == {EID, EID2}
    again = work("abc")
    assert again.discard(recent.seen("abc")) == 3 and again.size == 0 and not again.sources


def test_recent_records_forget_the_older_generation() -> None:
    from database_service.ingest.pipeline import RecentEvents

    def work(event_id: str) -> TenantWork:
        tick = ingest_pb2.Tick(event_id=event_id, tenant_id="abc", symbol="X")
        return decode(batch(ticks=[tick])).work["abc"]

    recent = RecentEvents(4)
    recent.remember(work(EID))  # 1 of 2: the new generation
    assert work(EID).discard(recent.seen("abc")) == 1
    for i in range(4):  # two generations more
        recent.remember(work(str(uuid.UUID(int=i))))
    assert work(EID).discard(recent.seen("abc")) == 0
    assert work(str(uuid.UUID(int=3))).discard(recent.seen("abc")) == 1


def test_recent_records_are_forgotten_by_age_too() -> None:
    """Memory follows the ingestion rate times two generations' age, not the capacity: a steady
    stream once filled the whole capacity (~40 MB) before the older generation was dropped."""
    from database_service.ingest.pipeline import RecentEvents

    def work(event_id: str) -> TenantWork:
        tick = ingest_pb2.Tick(event_id=event_id, tenant_id="abc", symbol="X")
        return decode(batch(ticks=[tick])).work["abc"]

    now = [0.0]
    recent = RecentEvents(1_000_000, max_age=60, clock=lambda: now[0])
    recent.remember(work(EID))
    now[0] = 61.0
    recent.remember(work(str(uuid.UUID(int=1))))  # the generation holding EID is now the older
    assert work(EID).discard(recent.seen("abc")) == 1  # still caught a minute later
    now[0] = 122.0
    recent.remember(work(str(uuid.UUID(int=2))))
    assert work(EID).discard(recent.seen("abc")) == 0  # two minutes on: left to the unique index
    assert work(str(uuid.UUID(int=2))).discard(recent.seen("abc")) == 1


def test_time_is_the_second_column_of_ticks_and_predictions() -> None:
    from database_service.ingest.records import _TIME, PREDICTION_COLUMNS

    assert TICK_COLUMNS[_TIME] == PREDICTION_COLUMNS[_TIME] == "time_us"
