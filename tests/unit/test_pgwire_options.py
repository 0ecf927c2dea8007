"""Pure parts of the wire port's new paths: libpq ``options``, the user id statements, the
session-only refusals, a NUL inside SQL text, the admin view's rows."""

from __future__ import annotations

import struct

import pglast
import pytest

from database_service.pgwire import admin, codec
from database_service.pgwire.policy import _session_only, _user_id, driver_catalog_query
from database_service.pgwire.server import _options, _Refusal


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("-c dbsvc.user_id=42", [("dbsvc.user_id", "42")]),
        ("-cdbsvc.user_id=42", [("dbsvc.user_id", "42")]),
        ("--dbsvc.user_id=u1 -c TimeZone=UTC", [("dbsvc.user_id", "u1"), ("timezone", "UTC")]),
        ("-c application_name=a\\ b", [("application_name", "a b")]),
        ("  ", []),
    ],
)
def test_libpq_options_are_read_as_postgres_reads_them(
    value: str, expected: list[tuple[str, str]]
) -> None:
    assert _options(value) == expected


@pytest.mark.parametrize("value", ["dbsvc.user_id=1", "-c dbsvc.user_id", "-x y"])
def test_options_that_are_not_settings_are_refused(value: str) -> None:
    with pytest.raises(_Refusal):
        _options(value)


def _stmt(sql: str) -> object:
    return pglast.parse_sql(sql)[0].stmt


@pytest.mark.parametrize(
    ("sql", "control", "name"),
    [
        ("SET dbsvc.user_id = 'u1'", "user_id", "u1"),
        ("SET dbsvc.user_id TO 42", "user_id", "42"),
        ("RESET dbsvc.user_id", "user_id", None),
        ("SET dbsvc.user_id TO DEFAULT", "user_id", None),
    ],
)
def test_the_user_id_statements(sql: str, control: str, name: str | None) -> None:
    decision = _user_id(_stmt(sql))
    assert (decision.control, decision.name, decision.refused) == (control, name, None)


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("SET LOCAL dbsvc.user_id = 'u1'", "42501"),
        ("SET dbsvc.user_id = 'a b'", "22023"),
        ("SET dbsvc.user_id = a, b", "22023"),
        ("SET dbsvc.user_id = ''", "22023"),
    ],
)
def test_bad_user_id_statements_are_refused(sql: str, sqlstate: str) -> None:
    refused = _user_id(_stmt(sql)).refused
    assert refused is not None and refused[0] == sqlstate


@pytest.mark.parametrize(
    ("sql", "feature"),
    [
        ("LISTEN x", "LISTEN/UNLISTEN"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "a WITH HOLD cursor"),
        ("DECLARE c CURSOR FOR SELECT 1", None),
        ("CREATE TEMP TABLE t (x int)", "a temporary object"),
        ("CREATE TABLE t (x int)", None),
        ("SELECT 1 INTO TEMP t", "a temporary object"),
        ("RESET ALL", "RESET ALL"),
        ("RESET TimeZone", None),
        ("DISCARD PLANS", "DISCARD"),
    ],
)
def test_session_only_features(sql: str, feature: str | None) -> None:
    stmt = _stmt(sql)
    assert _session_only(type(stmt).__name__, stmt) == feature


def test_a_nul_inside_sql_is_told_from_a_broken_message() -> None:
    assert codec.nul_in_text(b"Q", b"SELECT 'a\x00b'\x00")
    assert not codec.nul_in_text(b"Q", b"SELECT 1")
    parse = codec.cstring("") + b"SELECT 1 -- \x00 x\x00" + struct.pack("!H", 0)
    assert codec.nul_in_text(b"P", parse)
    assert not codec.nul_in_text(b"P", codec.cstring("") + b"SELECT 1\x00\x00")


def test_admin_rows_are_text_with_nulls() -> None:
    row = admin.data_row(["a", None, 3, True])
    assert row[:1] == b"D"
    body = row[5:]
    assert struct.unpack_from("!H", body)[0] == 4
    assert b"\xff\xff\xff\xff" in body and b"true" in body
    description = admin.row_description(["database", "user"])
    assert description[:1] == b"T" and b"database\x00" in description


PSYCOPG_TYPEINFO = """\
SELECT
    typname AS name, oid, typarray AS array_oid,
    oid::regtype::text AS regtype, typdelim AS delimiter
FROM pg_type t
WHERE t.oid = to_regtype($1)
ORDER BY t.oid
"""


def test_psycopgs_typeinfo_lookup_is_limited_to_the_catalog_and_the_tenants_schema() -> None:
    limited = driver_catalog_query(PSYCOPG_TYPEINFO, "t_abc")
    assert limited is not None
    assert "IN ('pg_catalog'::regnamespace, '\"t_abc\"'::regnamespace)" in limited
    assert "to_regtype" not in limited and "$1::text" in limited
    assert len(pglast.parse_sql(limited)) == 1
    # The same text with whitespace changed (psycopg's "%s::regtype" form for old servers too).
    assert driver_catalog_query(" ".join(PSYCOPG_TYPEINFO.split()), "t_abc") == limited
    older = PSYCOPG_TYPEINFO.replace("to_regtype($1)", "$1::regtype")
    assert driver_catalog_query(older, "t_abc") == limited


@pytest.mark.parametrize(
    "sql",
    [
        PSYCOPG_TYPEINFO.replace("$1", "'hstore'"),
        PSYCOPG_TYPEINFO.replace("ORDER BY", "OR true ORDER BY"),
        PSYCOPG_TYPEINFO.replace("typname AS name", "typname AS name, typowner"),
        "SELECT * FROM pg_type",
    ],
)
def test_any_other_catalog_query_is_not_rewritten(sql: str) -> None:
    assert driver_catalog_query(sql, "t_abc") is None


def test_a_schema_name_cannot_break_out_of_its_literal() -> None:
    limited = driver_catalog_query(PSYCOPG_TYPEINFO, "x'); DROP TABLE y; --")
    assert limited is not None
    assert len(pglast.parse_sql(limited)) == 1
