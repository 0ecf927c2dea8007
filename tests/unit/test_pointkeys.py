"""Which statements are point reads and keyed writes: only shapes whose rows are the key's."""

from __future__ import annotations

import pytest

from database_service.query.pointkeys import key_text, keyed_write, point_read

KEY = [("id", "integer")]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t WHERE id = $1",
        "SELECT a, b FROM t WHERE $1 = id",
        "SELECT * FROM t AS x WHERE x.id = $1 AND x.b > 3",
        "SELECT * FROM s.t WHERE id = 5",
    ],
)
def test_reads_of_one_key_are_point_reads(sql: str) -> None:
    read = point_read(sql)
    assert read is not None
    assert key_text(KEY, read.equal, [5]) == "5"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t WHERE id = $1 OR b = 2",
        "SELECT * FROM t WHERE id > $1",
        "SELECT * FROM t, u WHERE t.id = $1",
        "SELECT * FROM t JOIN u USING (id) WHERE id = $1",
        "SELECT * FROM t WHERE id = (SELECT max(id) FROM u)",
        "SELECT * FROM t WHERE id = $1 AND b IN (SELECT b FROM u)",
        "SELECT *, (SELECT 1 FROM u) FROM t WHERE id = $1",
        "SELECT * FROM ONLY t WHERE id = $1",
        "WITH w AS (SELECT 1) SELECT * FROM t WHERE id = $1",
        "SELECT * FROM t WHERE id = $1 UNION SELECT * FROM t WHERE id = 2",
        "SELECT count(*) FROM t WHERE id = $1 GROUP BY b",
        "SELECT * FROM t WHERE u.id = $1",  # another table's column
        "SELECT * FROM t",
    ],
)
def test_other_reads_are_not_point_reads(sql: str) -> None:
    read = point_read(sql)
    assert read is None or key_text(KEY, read.equal, [5]) is None


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE t SET b = 1 WHERE id = $1",
        "DELETE FROM t WHERE id = $1",
        "INSERT INTO t (id, b) VALUES ($1, 2)",
        "INSERT INTO t (b, id) VALUES (2, $1) ON CONFLICT DO NOTHING",
    ],
)
def test_writes_by_key_are_keyed(sql: str) -> None:
    write = keyed_write(sql)
    assert write is not None
    assert all(key_text(KEY, row, [5]) == "5" for row in write.rows)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE t SET b = 1 FROM u WHERE t.id = $1",
        "DELETE FROM t USING u WHERE t.id = $1",
        "WITH x AS (SELECT 1) UPDATE t SET b = 1 WHERE id = $1",
        "INSERT INTO t SELECT * FROM u",
        "INSERT INTO t VALUES ($1, 2)",  # no column list
        "INSERT INTO t (id, b) VALUES ($1, 2) ON CONFLICT ON CONSTRAINT t_b DO UPDATE SET b = 3",
        "UPDATE t SET b = 1 WHERE id IN (SELECT id FROM u)",
        "UPDATE t SET b = 1 WHERE b = 2",
    ],
)
def test_other_writes_are_not_keyed(sql: str) -> None:
    write = keyed_write(sql)
    assert write is None or any(key_text(KEY, row, [5]) is None for row in write.rows)


@pytest.mark.parametrize(
    ("value", "type_name"),
    [("5", "integer"), (5.0, "integer"), (True, "integer"), (5, "text"), ("zz", "uuid")],
)
def test_a_value_whose_printed_form_is_uncertain_keys_nothing(
    value: object, type_name: str
) -> None:
    assert (
        key_text(
            [("id", type_name)],
            {"id": point_read("SELECT 1 FROM t WHERE id = $1").equal["id"]},
            [value],
        )
        is None
    )  # type: ignore[union-attr]
