"""The pure parts of tenant-writable ClickHouse tables: which statements the query API routes to
the table guard, how placeholders pick values, and how values become one JSONEachRow line."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from decimal import Decimal

import pytest

from database_service.analytics.tables import CheckedInsert, is_table_ddl, row_json
from database_service.errors import InvalidParameters


@pytest.mark.parametrize(
    ("sql", "ddl"),
    [
        ("CREATE TABLE t (a Int8) ENGINE = MergeTree ORDER BY a", True),
        ("  drop table t", True),
        ("\ncreate view v AS SELECT 1", True),  # routed to the table guard, which refuses it
        ("SELECT 'CREATE TABLE'", False),
        ("WITH x AS (SELECT 1) SELECT * FROM x", False),
        ("CREATEX", False),
    ],
)
def test_only_create_and_drop_are_routed_to_the_table_guard(sql: str, ddl: bool) -> None:
    assert is_table_ddl(sql) is ddl


def test_positional_placeholders_take_a_list() -> None:
    insert = CheckedInsert("t", ("a", "b", "c"), (1, 0, 1))
    assert insert.row(["x", "y"]) == {"a": "y", "b": "x", "c": "y"}
    with pytest.raises(InvalidParameters, match="as a list"):
        insert.row({"a": 1})
    with pytest.raises(InvalidParameters, match=r"uses \$2 but 1"):
        insert.row(["only"])
    with pytest.raises(InvalidParameters, match="list"):
        insert.row("xy")  # a string is not a list of parameters


def test_named_placeholders_take_a_mapping_and_ignore_other_keys() -> None:
    insert = CheckedInsert("t", ("a", "b"), ("x", "y"))
    assert insert.row({"x": 1, "y": 2, "unrelated": 3}) == {"a": 1, "b": 2}
    with pytest.raises(InvalidParameters, match="no value for parameter"):
        insert.row({"x": 1})
    with pytest.raises(InvalidParameters, match="as an object"):
        insert.row([1, 2])


def test_values_become_exact_json() -> None:
    when = dt.datetime(2026, 12, 3, 11, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    ident = uuid.UUID(int=7)
    line = row_json(
        {
            "d": Decimal("0.10"),
            "t": when,
            "day": dt.date(2026, 12, 3),
            "u": ident,
            "j": {"k": [1, Decimal("2.5")]},
            "n": None,
            "b": True,
        }
    )
    assert json.loads(line) == {
        "d": "0.10",
        "t": "2026-12-03 09:00:00",
        "day": "2026-12-03",
        "u": str(ident),
        "j": {"k": [1, "2.5"]},
        "n": None,
        "b": True,
    }
    with pytest.raises(InvalidParameters, match="NaN"):
        row_json({"f": float("inf")})
    with pytest.raises(InvalidParameters, match="bytes"):
        row_json({"raw": b"\x00"})
