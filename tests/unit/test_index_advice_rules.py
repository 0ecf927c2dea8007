"""The pure rules of index advice: what a statement filters and sorts on, which index would
serve it, when an existing one already does, and the names of the indexes built."""

from __future__ import annotations

import pytest

from database_service.statements.advice import covered, index_name
from database_service.statements.predicates import candidates


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "SELECT * FROM orders WHERE account = $1 AND created_at >= $2",
            [(None, "orders", ("account", "created_at"))],
        ),
        # OR: no single index serves it, so nothing is guessed.
        ("SELECT * FROM orders WHERE account = $1 OR x = 2", []),
        (
            "SELECT * FROM orders WHERE status IS NULL ORDER BY created_at LIMIT 10",
            [(None, "orders", ("status", "created_at"))],
        ),
        ("UPDATE orders SET x = 1 WHERE id = $1", [(None, "orders", ("id",))]),
        ("DELETE FROM orders WHERE created_at < $1", [(None, "orders", ("created_at",))]),
        # A correlated subquery: the outer column is a value for the inner scan.
        (
            "SELECT * FROM a WHERE EXISTS (SELECT 1 FROM b WHERE b.aid = a.id AND b.k = 3)",
            [(None, "b", ("aid", "k"))],
        ),
        # An expression over the column: a plain index would not serve it.
        ("SELECT count(*) FROM t WHERE lower(name) = 'x'", []),
        ("SELECT * FROM orders WHERE account::text = $1", [(None, "orders", ("account",))]),
        (
            "SELECT * FROM x WHERE a = 1 UNION SELECT * FROM y WHERE b > 2",
            [(None, "x", ("a",)), (None, "y", ("b",))],
        ),
        (
            "SELECT o.id FROM s.orders o JOIN users u ON u.user_id = o.user_id"
            " WHERE o.account = $1 AND o.created_at > now() - interval '1 day'",
            [(None, "users", ("user_id",)), ("s", "orders", ("user_id", "account", "created_at"))],
        ),
        ("SELECT 1", []),
        ("not sql at all", []),
    ],
)
def test_candidates_follow_the_predicates(
    sql: str, expected: list[tuple[str | None, str, tuple[str, ...]]]
) -> None:
    assert sorted((c.schema or "", c.table, c.columns) for c in candidates(sql)) == sorted(
        (s or "", t, cols) for s, t, cols in expected
    )


def test_a_wide_filter_keeps_its_range_column_last() -> None:
    (c,) = candidates("SELECT * FROM t WHERE a = 1 AND b = 2 AND c = 3 AND d > 4")
    assert c.columns == ("a", "b", "d")
    assert c.reason == "equality on a, b; range on d"


def test_an_index_covers_a_suggestion_by_its_leading_columns() -> None:
    assert covered(("a",), [["a", "b"]]) == "a,b"
    assert covered(("a", "b"), [["b", "a", "c"]]) is None  # b is the range column: order counts
    assert covered(("a", "b", "c"), [["b", "a", "c"]]) == "b,a,c"  # equality part in any order
    assert covered(("a", "b"), [["a"]]) is None
    assert covered(("b",), [["a", "b"]]) is None


def test_index_names_fit_postgresql_and_are_stable() -> None:
    long = index_name("t" * 40, ["c" * 30, "d" * 30])
    assert len(long.encode()) <= 63 and long.endswith("_dbsvc_idx")
    assert long == index_name("t" * 40, ["c" * 30, "d" * 30])
    assert index_name("orders", ["account"]) == "orders_account_dbsvc_idx"
