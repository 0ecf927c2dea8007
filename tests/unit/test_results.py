"""Results are store-neutral: a column carries its store's own type name, shown to callers as
it is, and a value kind that alone decides how front ends encode its values; no front end
knows a store's type names."""

import datetime as dt
from decimal import Decimal

from database_service.api.grpc.encoding import columns_message, encoders_for
from database_service.query.values import postgres_column
from database_service.results import Column, ValueKind
from database_service_client._proto.database_service_pb2 import Row
from database_service_client.values import from_row


def encoded(columns: list[Column], row: tuple[object, ...]) -> tuple[object, ...]:
    message = Row()
    for encode, value in zip(encoders_for(columns), row, strict=True):
        encode(message.values.add, value)
    return from_row(message)


def test_a_store_the_front_ends_have_never_heard_of_is_encoded_by_kind() -> None:
    # ClickHouse's names, which no front end knows.
    columns = [
        Column("px", "Decimal(18, 4)", ValueKind.DECIMAL),
        Column("at", "DateTime64(3, 'UTC')", ValueKind.TIMESTAMP),
        Column("n", "UInt64", ValueKind.INTEGER),
        Column("tags", "Map(String, String)", ValueKind.JSON),
    ]
    at = dt.datetime(2026, 12, 2, 3, 4, 5, 123000, tzinfo=dt.UTC)
    row = (Decimal("1.2345"), at, 2**64 - 1, {"venue": "LSE"})  # UInt64 beyond int64: exact
    assert encoded(columns, row) == row
    assert encoded(columns[2:3], (42,)) == (42,)
    assert [(c.name, c.type) for c in columns_message(columns)] == [
        ("px", "Decimal(18, 4)"), ("at", "DateTime64(3, 'UTC')"), ("n", "UInt64"),
        ("tags", "Map(String, String)"),
    ]  # fmt: skip


def test_postgresql_columns_map_their_types_to_kinds() -> None:
    class PgType:
        kind = "scalar"

        def __init__(self, name: str) -> None:
            self.name = name

    kinds = {
        name: postgres_column("c", PgType(name)).kind  # type: ignore[arg-type]
        for name in ("int8", "numeric", "timestamptz", "jsonb", "text", "bool", "bytea", "uuid")
    }
    assert kinds == {
        "int8": ValueKind.INTEGER, "numeric": ValueKind.DECIMAL,
        "timestamptz": ValueKind.TIMESTAMP, "jsonb": ValueKind.JSON, "text": ValueKind.TEXT,
        "bool": ValueKind.BOOLEAN, "bytea": ValueKind.BYTES, "uuid": ValueKind.OTHER,
    }  # fmt: skip


def test_integers_beyond_int64_travel_exactly_both_ways() -> None:
    from database_service_client.values import from_value, to_value

    for value in (2**63 - 1, -(2**63), 2**64 - 1, -(2**70)):
        assert from_value(to_value(value)) == value
