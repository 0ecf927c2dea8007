import datetime as dt
from decimal import Decimal
from typing import Any, NamedTuple

import pytest

from database_service.errors import InvalidParameters
from database_service.query import coerce_params, encode_value


class T(NamedTuple):  # the shape of asyncpg.types.Type that coerce_params reads
    oid: int
    name: str
    kind: str
    schema: str


def t(name: str, kind: str = "scalar") -> Any:
    return T(0, name, kind, "pg_catalog")


def test_json_params_become_the_types_postgres_expects() -> None:
    values = coerce_params(
        ["42", "12.50", "2024-01-02T03:04:05Z", {"a": 1}, "true", [1, "2"]],
        [t("int8"), t("numeric"), t("timestamptz"), t("jsonb"), t("bool"), t("int4[]", "array")],
    )
    assert values[0] == 42
    assert values[1] == Decimal("12.50")
    assert values[2] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert values[3] == {"a": 1}
    assert values[4] is True
    assert values[5] == [1, 2]


def test_naive_timestamptz_is_taken_as_utc() -> None:
    (value,) = coerce_params(["2024-01-02 03:04:05"], [t("timestamptz")])
    assert value.tzinfo == dt.UTC


def test_wrong_parameter_count_is_reported() -> None:
    with pytest.raises(InvalidParameters, match="takes 2 parameter"):
        coerce_params([1], [t("int4"), t("int4")])


@pytest.mark.parametrize(
    ("value", "type_name"),
    [("abc", "int4"), (True, "int4"), ("x", "numeric"), (1, "text"), ("nope", "timestamptz"),
     ("maybe", "bool"), ("not-a-uuid", "uuid"), ("%%%", "bytea"), (1.5, "int8")],
)  # fmt: skip
def test_wrong_type_names_the_parameter(value: object, type_name: str) -> None:
    with pytest.raises(InvalidParameters, match=r"parameter \$1"):
        coerce_params([value], [t(type_name)])


def test_null_is_null_for_every_type() -> None:
    assert coerce_params([None, None], [t("int4"), t("jsonb")]) == [None, None]


def test_results_keep_exact_values() -> None:
    assert encode_value(Decimal("1.10")) == "1.10"
    assert encode_value(dt.datetime(2024, 1, 2, tzinfo=dt.UTC)) == "2024-01-02T00:00:00+00:00"
    assert encode_value(b"\x00\x01") == "AAE="
    assert encode_value(float("nan")) == "nan"
    assert encode_value([Decimal("1"), None]) == ["1", None]
    assert encode_value({"k": Decimal("2")}) == {"k": "2"}
