"""The SQL guard's verdicts by shape (``classify_shape``): texts that differ only in their
constants share one verdict, and only when no rule of the guard reads a constant's value. The
specification: for every text, the verdict by shape is the verdict ``classify`` gives that
text on a fresh guard — whatever texts of the same shape were classified before it."""

from __future__ import annotations

import pytest

from database_service.errors import DatabaseServiceError, SqlRejected
from database_service.sqlguard import SqlGuard, StatementKind

OWN = "tenant_a"
SHARED = ("shared",)


def outcome(guard: SqlGuard, sql: str, *, shape: bool) -> tuple[str, str]:
    """(kind, tag) of an accepted text, or ("refused", SQLSTATE)."""
    try:
        if shape:
            verdict = guard.classify_shape(sql, own_schema=OWN, shared_schemas=SHARED)
        else:
            verdict = guard.classify(sql, own_schema=OWN, shared_schemas=SHARED)
    except DatabaseServiceError as exc:
        return "refused", exc.sqlstate or ""
    return verdict.kind.value, verdict.tag


# Pairs of one shape: an accepted text first (it warms the guard), then one whose verdict
# depends on a constant's value, which must not ride on the first's.
SAME_SHAPE = {
    "regclass cast": ("SELECT 'users'::regclass", "SELECT 'victim_b.users'::regclass"),
    "regclass cast, quoted": (
        "SELECT 'users'::regclass::oid",
        "SELECT '\"victim_b\".users'::regclass::oid",
    ),
    "regproc cast": ("SELECT 'abs'::regproc", "SELECT 'victim_b.f'::regproc"),
    "regnamespace cast": ("SELECT 'tenant_a'::regnamespace", "SELECT 'victim_b'::regnamespace"),
    "regrole cast": ("SELECT 'x'::regrole", "SELECT '12'::regrole"),
    "sequence argument": ("SELECT nextval('own_seq')", "SELECT nextval('victim_b.seq')"),
    "sequence argument, oid": ("SELECT currval('own_seq')", "SELECT currval('16384')"),
    "text search configuration": (
        "SELECT to_tsvector('english', email) FROM users",
        "SELECT to_tsvector('victim_b.cfg', email) FROM users",
    ),
    "set_config": (
        "SELECT set_config('application_name', 'x', false)",
        "SELECT set_config('role', 'postgres', false)",
    ),
    "current_setting": (
        "SELECT current_setting('application_name')",
        "SELECT current_setting('dbsvc.user_id', true)",
    ),
    "function name in a string": ("SELECT 'upper'::regproc", "SELECT 'pg_read_file'::regproc"),
    "SET value": ("SET application_name = 'a'", "SET role = 'postgres'"),
    "DDL default": (
        "CREATE TABLE t1 (x int DEFAULT 1)",
        "CREATE TABLE t1 (x regclass DEFAULT 'victim_b.users')",
    ),
    "function body": (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT count(*) FROM victim_b.users'",
    ),
    "plain values": (
        "SELECT * FROM users WHERE user_id = 'a' LIMIT 1",
        "SELECT * FROM users WHERE user_id = 'pg_authid' LIMIT 1000",
    ),
    "explain option": (
        "EXPLAIN (COSTS OFF) SELECT * FROM users WHERE user_id = 'a'",
        "EXPLAIN (COSTS ON) SELECT * FROM users WHERE user_id = 'b'",
    ),
}


@pytest.mark.parametrize("first, second", SAME_SHAPE.values(), ids=SAME_SHAPE.keys())
def test_a_verdict_by_shape_is_the_fresh_verdict_of_each_text(first: str, second: str) -> None:
    warm = SqlGuard()
    for sql in (first, second, first, second):
        assert outcome(warm, sql, shape=True) == outcome(SqlGuard(), sql, shape=False), sql


@pytest.mark.parametrize("first, second", SAME_SHAPE.values(), ids=SAME_SHAPE.keys())
def test_a_refused_constant_stays_refused_after_an_accepted_one_of_its_shape(
    first: str, second: str
) -> None:
    fresh = outcome(SqlGuard(), second, shape=False)
    warm = SqlGuard()
    outcome(warm, first, shape=True)
    assert outcome(warm, second, shape=True) == fresh


def test_texts_differing_only_in_values_share_one_verdict() -> None:
    guard = SqlGuard()
    for aid in range(200):
        verdict = guard.classify_shape(
            f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};",
            own_schema=OWN,
            shared_schemas=SHARED,
        )
        assert verdict.kind is StatementKind.READ and verdict.repeatable
        assert verdict.normalized == "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    # One exact verdict (the shape's own text), not one per value.
    assert guard.cached == 1


def test_a_shape_never_crosses_tenants() -> None:
    guard = SqlGuard()
    own = "SELECT * FROM tenant_a.users WHERE user_id = 'x'"
    assert outcome(guard, own, shape=True)[0] == "read"
    guard_b = guard.classify_shape
    with pytest.raises(DatabaseServiceError):
        guard_b(own.replace("'x'", "'y'"), own_schema="tenant_b", shared_schemas=SHARED)


def test_statements_the_guard_refuses_keep_their_exact_verdicts() -> None:
    guard = SqlGuard()
    for sql in ("SELECT 1; SELECT 2", "SELECT pg_read_file('/etc/passwd')", "SELECT 'a' +"):
        assert outcome(guard, sql, shape=True) == outcome(SqlGuard(), sql, shape=False)


def test_a_long_statements_verdict_is_not_kept() -> None:
    """The guard's cache is bounded by entries, and texts may be up to max_sql_bytes each: a
    long one is checked again whenever it is sent rather than held."""
    guard = SqlGuard()
    short = "SELECT 1"
    long = "SELECT 1 /* " + "x" * 20_000 + " */"
    assert (
        guard.classify(short, own_schema="t_own").kind
        is guard.classify(long, own_schema="t_own").kind
    )
    assert guard.cached == 1
    with pytest.raises(SqlRejected):
        guard.classify(
            "SELECT pg_sleep(1) /* " + "x" * 20_000 + " */ FROM pg_authid", own_schema="t_own"
        )
    assert guard.cached == 1
