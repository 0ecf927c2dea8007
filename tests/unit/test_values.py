import datetime as dt
import re
from decimal import Decimal
from typing import Any, NamedTuple

import pytest

from database_service.errors import InvalidParameters
from database_service.query import coerce_params, encode_value
from database_service.query.values import PgType, coerce_row, coerce_rows


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


BULK_TYPES = [
    PgType("int8", "scalar"),
    PgType("float8", "scalar"),
    PgType("numeric", "scalar"),
    PgType("bool", "scalar"),
    PgType("timestamptz", "scalar"),
    PgType("text", "scalar"),
    PgType("jsonb", "scalar"),
    PgType("_int4", "array"),
]
BULK_NAMES = ["i", "f", "n", "b", "ts", "t", "j", "a"]
BULK_ROWS: list[list[Any]] = [
    [1, 1.5, "1.25", True, "2026-01-02T03:04:05", "x", {"k": 1}, [1, None]],
    [None, 2, 3, False, None, None, None, None],
    [3.0, "2.5", 1.5, "t", "2026-01-02T03:04:05+01:00", "", [1], []],
]


def test_bulk_rows_coerced_a_column_at_a_time_equal_the_row_at_a_time_path() -> None:
    expected = [coerce_row(r, BULK_TYPES, BULK_NAMES, i) for i, r in enumerate(BULK_ROWS, 1)]
    assert [tuple(r) for r in coerce_rows(BULK_ROWS, BULK_TYPES, BULK_NAMES, 1)] == expected


def test_bulk_columns_that_need_nothing_pass_as_they_are() -> None:
    rows = [["a", 1, 2.5, True], ["b", None, 3, None]]
    types = [PgType(n, "scalar") for n in ("text", "int4", "float8", "bool")]
    assert coerce_rows(rows, types, ["t", "i", "f", "b"], 1) is rows


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([1, 1.5, None, True, None, 5, None, None], "row 12, column t (text)"),
        ([True, 1.5, None, True, None, None, None, None], "row 12, column i (int8)"),
        ([1, "x", None, None, None, None, None, None], "row 12, column f (float8)"),
        ([1, 1, "one", None, None, None, None, None], "row 12, column n (numeric)"),
        ([1, 1, None, 1, None, None, None, None], "row 12, column b (bool)"),
        ([1, 1, None, None, "soon", None, None, None], "row 12, column ts (timestamptz)"),
        ([1, 1, None, None, None, None, None, [1, "x"]], "row 12, column a (_int4)"),
        ([1, 1, None, None, None, None, None], "row 12: 7 values for 8 columns"),
    ],
)
def test_a_bad_bulk_value_names_its_row_in_the_load(bad: list[Any], message: str) -> None:
    with pytest.raises(InvalidParameters, match=re.escape(message)):
        coerce_rows([*BULK_ROWS, bad], BULK_TYPES, BULK_NAMES, 9)
