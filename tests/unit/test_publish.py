"""The pure parts of the publisher: records, event ids, batching, the Kafka key, reports."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from database_service_client import (
    DatabaseServiceError,
    MarketDataPublisher,
    PublishError,
    PublishReport,
    event_id_for,
    prediction,
    tick,
)
from database_service_client._proto import ingest_pb2
from database_service_client.publish import (
    EVENT_ID_NAMESPACE,
    TransportReport,
    batch_id,
    batch_key,
    iter_batches,
    new_event_id,
    unix_us,
)

T0 = datetime(2026, 1, 5, 9, 30, 0, 123456, tzinfo=UTC)
T0_US = 1_767_605_400_123_456


def test_tick_fields() -> None:
    t = tick(
        "abc", "EURUSD", T0, bid=1.0841, ask=1.0843, volume=7, spread=0.2, user_id="u1",
        event_id="e1",
    )  # fmt: skip
    assert (t.event_id, t.tenant_id, t.user_id, t.symbol) == ("e1", "abc", "u1", "EURUSD")
    assert t.time_unix_us == T0_US
    assert (t.bid, t.ask, t.volume, t.spread) == (1.0841, 1.0843, 7, 0.2)
    assert all(t.HasField(f) for f in ("bid", "ask", "volume", "spread"))


def test_tick_optional_fields_stay_unset() -> None:
    t = tick("abc", "EURUSD", T0)
    assert not any(t.HasField(f) for f in ("bid", "ask", "volume", "spread"))
    assert t.user_id == ""
    assert uuid.UUID(t.event_id).version == 4  # a random id when none is given
    assert tick("abc", "EURUSD", T0).event_id != t.event_id
    zero = tick("abc", "EURUSD", T0, bid=0.0, volume=0)
    assert zero.HasField("bid") and zero.HasField("volume")  # 0 is a value, not "unset"


def test_times() -> None:
    assert unix_us(T0) == T0_US
    assert unix_us(T0.replace(tzinfo=None)) == T0_US  # naive = UTC
    assert unix_us(T0.astimezone(timezone(timedelta(hours=3)))) == T0_US
    assert unix_us(T0_US) == T0_US  # an int is already microseconds
    assert tick("abc", "X", T0_US).time_unix_us == T0_US
    assert unix_us(datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)) == -1_000_000


def test_prediction_fields() -> None:
    p = prediction(
        "abc", "EURUSD", T0, prediction_type="buy", confidence=0.87, model_version="m-3",
        features={"rsi": 71.5, "tags": ["a"]}, result='{"ok":true}', user_id="u1", event_id="e2",
    )  # fmt: skip
    assert (p.event_id, p.tenant_id, p.user_id, p.symbol) == ("e2", "abc", "u1", "EURUSD")
    assert (p.time_unix_us, p.prediction_type, p.confidence) == (T0_US, "buy", 0.87)
    assert p.model_version == "m-3"
    assert json.loads(p.features_json) == {"rsi": 71.5, "tags": ["a"]}
    assert p.result_json == '{"ok":true}'
    bare = prediction("abc", "EURUSD", T0, prediction_type="hold", confidence=0.0)
    assert (bare.features_json, bare.result_json) == ("", "")
    assert uuid.UUID(bare.event_id).version == 4
    with pytest.raises(ValueError, match="confidence"):
        prediction("abc", "EURUSD", T0, prediction_type="buy", confidence=1.5)


def test_event_id_for_is_stable_uuid5_of_the_tenant_and_key() -> None:
    a = event_id_for("abc", 7, 12345)
    assert a == event_id_for("abc", 7, 12345) == event_id_for("abc", "7", "12345")
    assert a == str(uuid.uuid5(EVENT_ID_NAMESPACE, "abc/7/12345"))
    assert a == "9af81c30-4f36-58e1-bc1a-f251c18d23dd"  # fixed forever: ids already stored
    assert uuid.UUID(a).version == 5
    assert event_id_for("abc", 7, 12346) != a
    assert event_id_for("abc", "é", "") == str(uuid.uuid5(EVENT_ID_NAMESPACE, "abc/é/"))
    u = uuid.UUID(new_event_id())
    assert (u.version, u.variant) == (4, uuid.RFC_4122)


def test_two_tenants_never_get_the_same_event_id() -> None:
    # The same feed for two tenants: different ids, so neither's records can hide the other's.
    assert event_id_for("abc", "feed-1", "EURUSD", 1) != event_id_for("xyz", "feed-1", "EURUSD", 1)


@pytest.mark.parametrize(
    "call",
    [
        ("feed-1", "EURUSD", 42),  # the call of earlier versions: no tenant
        (7, "abc", 12345),
        ("ABC", 1),
        ("abc/x", 1),  # a tenant id has no "/", so it cannot run into the key's parts
        ("",),
    ],
)
def test_event_id_for_without_a_tenant_is_refused(call: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match=r"is not a tenant id\. The record's tenant comes first"):
        event_id_for(*call)  # type: ignore[arg-type]


def test_event_id_for_needs_a_key() -> None:
    with pytest.raises(ValueError, match="needs a key"):
        event_id_for("abc")


def ticks(n: int, tenant: str = "abc") -> list[ingest_pb2.Tick]:
    return [tick(tenant, "EURUSD", T0_US + i, bid=1.0, event_id=event_id_for(tenant, i)) for i in range(n)]  # fmt: skip


def test_batches_of_batch_size() -> None:
    records = ticks(2500)
    batches = list(iter_batches(iter(records), batch_size=1000, producer="p"))
    assert [kind for kind, _ in batches] == ["trading"] * 3
    assert [len(b.ticks) for _, b in batches] == [1000, 1000, 500]
    assert [t for _, b in batches for t in b.ticks] == records  # every record, in order
    assert all(b.producer == "p" and not b.predictions for _, b in batches)
    assert [len(b.ticks) for _, b in iter_batches(ticks(1000), batch_size=1000)] == [1000]
    assert list(iter_batches([], batch_size=10)) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(records, batch_size=0))


def test_batches_hold_one_tenant_in_order() -> None:
    a, b = ticks(5, "aa"), ticks(3, "bb")
    mixed = [a[0], b[0], a[1], a[2], b[1], a[3], b[2], a[4]]
    batches = [batch for _, batch in iter_batches(mixed, batch_size=2)]
    assert [[t.tenant_id for t in x.ticks] for x in batches] == [
        ["aa", "aa"], ["bb", "bb"], ["aa", "aa"], ["bb"], ["aa"],
    ]  # fmt: skip
    by_tenant = {
        tenant: [t for x in batches for t in x.ticks if t.tenant_id == tenant]
        for tenant in ("aa", "bb")
    }
    assert by_tenant == {"aa": a, "bb": b}


def test_many_tenants_do_not_buffer_without_bound() -> None:
    records = [tick(f"t{i}", "X", T0_US, event_id=str(i)) for i in range(10)]
    batches = list(iter_batches(records, batch_size=100, max_buffered=4))
    assert sum(len(b.ticks) for _, b in batches) == 10
    assert len(batches) == 10  # flushed every 4 records, one batch per tenant


def test_batches_are_cut_by_bytes() -> None:
    records = ticks(100)
    one = records[0].ByteSize()
    batches = [b for _, b in iter_batches(records, batch_size=1000, max_batch_bytes=10 * (one + 6))]
    assert [len(b.ticks) for b in batches] == [10] * 10
    assert all(b.ByteSize() <= 10 * (one + 6) for b in batches)


def test_predictions_go_to_analytics() -> None:
    p = prediction("abc", "X", T0, prediction_type="buy", confidence=0.5)
    s = ingest_pb2.TradingSignal(event_id="s", tenant_id="abc", signal_id="1", action="buy")
    r = ingest_pb2.TenantRow(event_id="r", tenant_id="abc", table="users", row_json="{}")
    t = tick("abc", "X", T0)
    out = list(iter_batches([t, p, s, r], batch_size=10))
    assert [kind for kind, _ in out] == ["trading", "analytics"]
    trading, analytics = out[0][1], out[1][1]
    assert (list(trading.ticks), list(trading.signals), list(trading.rows)) == ([t], [s], [r])
    assert list(analytics.predictions) == [p]
    with pytest.raises(TypeError, match="not an ingestion record"):
        list(iter_batches([ingest_pb2.IngestBatch()]))  # type: ignore[list-item]


def test_kafka_key_is_the_tenant() -> None:
    for _, batch in iter_batches(ticks(3, "acme") + ticks(2, "zeta"), batch_size=10):
        assert batch_key(batch) == batch.ticks[0].tenant_id.encode()
    assert batch_key(ingest_pb2.IngestBatch(ticks=ticks(1, "acme"))) == b"acme"
    only_predictions = ingest_pb2.IngestBatch(
        predictions=[prediction("p1", "X", T0, prediction_type="buy", confidence=1)]
    )
    assert batch_key(only_predictions) == b"p1"
    assert batch_key(ingest_pb2.IngestBatch()) is None


def test_batch_id_follows_the_bytes() -> None:
    data = ingest_pb2.IngestBatch(ticks=ticks(2)).SerializeToString()
    assert batch_id(data) == batch_id(bytes(data))
    assert len(batch_id(data)) == 40
    assert batch_id(data + b"\x00") != batch_id(data)


def test_reports_add_up() -> None:
    total = PublishReport()
    one = PublishReport(
        batches=2,
        records=20,
        seconds=0.5,
        transports={
            "nats": TransportReport("nats", batches=2, records=20),
            "kafka": TransportReport(
                "kafka", batches=1, records=10, failed_batches=1, failed_records=10, errors=["x"]
            ),
        },
    )
    total.add(one)
    total.add(one)
    assert not total.ok
    assert total.to_dict() == {
        "batches": 4,
        "records": 40,
        "seconds": 1.0,
        "transports": {
            "nats": {
                "batches": 4, "records": 40, "failed_batches": 0, "failed_records": 0,
                "errors": [],
            },
            "kafka": {
                "batches": 2, "records": 20, "failed_batches": 2, "failed_records": 20,
                "errors": ["x", "x"],
            },
        },
    }  # fmt: skip
    assert PublishReport(transports={"nats": TransportReport("nats", batches=1)}).ok


def test_publish_error_is_a_client_error() -> None:
    error = PublishError("down", report=PublishReport(), errors={"nats": "timeout"})
    assert isinstance(error, DatabaseServiceError)
    assert error.code == "publish_failed"
    assert error.errors == {"nats": "timeout"}


async def test_publisher_arguments() -> None:
    with pytest.raises(ValueError, match="nats_url, kafka_bootstrap"):
        MarketDataPublisher("token")
    with pytest.raises(ValueError, match="token"):
        MarketDataPublisher("", nats_url="nats://x")
    with pytest.raises(ValueError, match="unknown kind"):
        MarketDataPublisher("t", nats_url="nats://x", nats_subjects={"other": "s"})  # type: ignore[dict-item]
    p = MarketDataPublisher(
        "Bearer abc", kafka_bootstrap="h:9092", kafka_topics={"trading": "my-topic"}
    )
    assert p.token == "abc"
    assert p.transports == ("kafka",)
    assert p.kafka_topics == {"trading": "my-topic", "analytics": "database-analytics-data"}
    assert p.nats_subjects["analytics"] == "database.real-time-analytics"
    # Nothing connects before ``async with``, and publishing needs it.
    with pytest.raises(RuntimeError, match="async with"):
        await p.publish_ticks(ticks(1))
