"""Parameters by position or by name (client/src/database_service_client/params.py)."""

from __future__ import annotations

import pytest

from database_service_client import bind


def test_a_sequence_binds_in_order() -> None:
    assert bind("SELECT $1, $2", ["a", 1]) == ("SELECT $1, $2", ["a", 1])
    assert bind("SELECT 1", None) == ("SELECT 1", [])


def test_a_mapping_binds_by_name_never_by_its_keys() -> None:
    # The seed passes the signal's dict: it must not become ('signal_id', 'symbol').
    signal = {"signal_id": "sig-42", "symbol": "EURUSD"}
    sql, values = bind(
        "INSERT INTO trading_signals (signal_id, symbol) VALUES (:signal_id, :symbol)", signal
    )
    assert sql == "INSERT INTO trading_signals (signal_id, symbol) VALUES ($1, $2)"
    assert values == ["sig-42", "EURUSD"]


def test_a_name_used_twice_is_one_parameter() -> None:
    assert bind("SELECT :a, :b, :a", {"a": 1, "b": 2}) == ("SELECT $1, $2, $1", [1, 2])


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ':not_a_param' , :x",
        "SELECT E'\\' :not', :x",  # an escaped quote inside E'...'
        "SELECT E'\\\\', :x",  # an escaped backslash, then the string ends
        "SELECT $$ :not $$, :x",
        "SELECT $tag$ :not $tag$, :x",
        'SELECT ":not" , :x',
        "SELECT 1 -- :not\n, :x",
        "SELECT /* :not /* nested :not */ */ :x",
        "SELECT '1'::int, :x",
        "SELECT arr[1:2], :x FROM t",
    ],
)
def test_placeholders_inside_strings_comments_and_casts_are_not_parameters(sql: str) -> None:
    bound, values = bind(sql, {"x": 7})
    assert values == [7]
    assert bound.count("$1") == 1 and ":x" not in bound


@pytest.mark.parametrize(
    ("sql", "params", "error"),
    [
        ("INSERT INTO t VALUES ($1, $2)", {"a": 1, "b": 2}, ValueError),  # no :name at all
        ("SELECT :a", {"a": 1, "b": 2}, ValueError),  # b unused
        ("SELECT :a, :c", {"a": 1}, KeyError),  # c missing
        ("SELECT $1", {1, 2}, TypeError),  # a set has no order
        ("SELECT $1", "ab", TypeError),  # a string is not a list of values
    ],
)
def test_anything_else_is_refused_before_it_is_sent(
    sql: str, params: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        bind(sql, params)  # type: ignore[arg-type]
