"""The SQL guard's rules, without a database: what is read, write or DDL, and what is refused."""

from __future__ import annotations

import pytest

from database_service.errors import PayloadTooLarge, SqlRejected, SqlSyntaxError
from database_service.sqlguard import SqlGuard, StatementKind

OWN = "tenant_a"


def classify(sql: str, guard: SqlGuard | None = None) -> StatementKind:
    return (guard or SqlGuard()).classify(sql, own_schema=OWN, shared_schemas=("shared",)).kind


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select * from users where user_id = $1",
        "SELECT * FROM shared.market_data",
        "SELECT * FROM tenant_a.users",
        "VALUES (1), (2)",
        "TABLE users",
        "SHOW search_path",
        "EXPLAIN SELECT * FROM users",
        "EXPLAIN DELETE FROM users",
        "SELECT pg_sleep(0.1)",
        "SELECT pg_typeof(1), pg_column_size('x')",
        "SELECT current_setting('dbsvc.user_id', true)",
        "SELECT $$;$$, E'a;b', 'it''s; fine'",
        "SELECT typname FROM pg_catalog.pg_type",
        "SELECT table_name FROM information_schema.tables",
        "SELECT 1::pg_catalog.int4",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SELECT * FROM users u JOIN LATERAL (SELECT 1) l ON true",
    ],
)
def test_reads_are_read(sql: str) -> None:
    assert classify(sql) is StatementKind.READ


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO users VALUES ('u', 'e', 'free')",
        "UPDATE users SET email = 'x'",
        "DELETE FROM users",
        "MERGE INTO users u USING (SELECT 'u' AS id) s ON u.user_id = s.id WHEN MATCHED THEN DELETE",
        "SELECT * FROM users FOR UPDATE",
        "SELECT * FROM users FOR SHARE",
        "WITH x AS (DELETE FROM users RETURNING *) SELECT * FROM x",
        "SELECT * FROM (SELECT 1) s WHERE EXISTS (WITH d AS (DELETE FROM users RETURNING 1) SELECT 1 FROM d)",
        "EXPLAIN ANALYZE DELETE FROM users",
        "INSERT INTO shared.market_data (symbol) VALUES ('EURUSD') RETURNING id",
    ],
)
def test_writes_are_write(sql: str) -> None:
    assert classify(sql) is StatementKind.WRITE


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE notes (id int)",
        "CREATE TABLE tenant_a.notes (id int)",
        "CREATE TABLE notes AS SELECT 1",
        "SELECT 1 INTO notes",
        "CREATE INDEX ON users (email)",
        "CREATE VIEW v AS SELECT * FROM shared.market_data",
        "CREATE SEQUENCE s",
        "CREATE TYPE mood AS ENUM ('a')",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ begin return 1; end $$",
        "ALTER TABLE users ADD COLUMN nickname text",
        "DROP TABLE notes",
        "DROP FUNCTION tenant_a.f()",
        "TRUNCATE users",
        "COMMENT ON TABLE users IS 'people'",
    ],
)
def test_ddl_in_own_schema_is_ddl(sql: str) -> None:
    assert classify(sql) is StatementKind.DDL


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT 1; SELECT 2", "multiple statements"),
        ("SELECT 1;/* */SELECT 2", "multiple statements"),
        ("SELECT 1 -- x\n; DELETE FROM users", "multiple statements"),
        ("BEGIN", "transaction control"),
        ("COMMIT", "transaction control"),
        ("SAVEPOINT s", "transaction control"),
        ("SET search_path = tenant_b", "SET/RESET"),
        ("SET LOCAL statement_timeout = 0", "SET/RESET"),
        ("RESET ALL", "SET/RESET"),
        ("SET ROLE postgres", "SET/RESET"),
        ("RESET ROLE", "SET/RESET"),
        ("SET SESSION AUTHORIZATION postgres", "SET/RESET"),
        ("DISCARD ALL", "DISCARD"),
        ("LISTEN ch", "LISTEN"),
        ("NOTIFY ch", "NOTIFY"),
        ("PREPARE p AS SELECT 1", "PREPARE"),
        ("EXECUTE p", "EXECUTE"),
        ("DEALLOCATE p", "DEALLOCATE"),
        ("DECLARE c CURSOR FOR SELECT 1", "cursors"),
        ("DO $$ begin end $$", "DO blocks"),
        ("CALL p()", "CALL"),
        ("LOAD 'x'", "LOAD"),
        ("COPY users TO STDOUT", "bulk API"),
        ("COPY users FROM PROGRAM 'id'", "bulk API"),
        ("VACUUM users", "VACUUM"),
        ("LOCK TABLE users", "LOCK"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "ALTER SYSTEM"),
        ("GRANT SELECT ON users TO PUBLIC", "GRANT"),
        ("GRANT postgres TO me", "GRANT"),
        ("CREATE ROLE x", "role management"),
        ("ALTER ROLE x SUPERUSER", "role management"),
        ("CREATE SCHEMA evil", "schemas are created"),
        ("CREATE EXTENSION dblink", "extensions"),
        ("CREATE SERVER s FOREIGN DATA WRAPPER f", "foreign servers"),
        ("ALTER TABLE users OWNER TO postgres", "ownership"),
        ("ALTER TABLE users SET SCHEMA tenant_b", "moving objects"),
        ("CREATE POLICY p ON users USING (true)", "policies"),
        ("ALTER TABLE shared.market_data DISABLE ROW LEVEL SECURITY", "row-level security"),
        ("ALTER TABLE users NO FORCE ROW LEVEL SECURITY", "row-level security"),
        ("CREATE RULE r AS ON SELECT TO users DO INSTEAD NOTHING", "rules"),
        (
            "CREATE FUNCTION f() RETURNS int SECURITY DEFINER LANGUAGE sql AS 'select 1'",
            "SECURITY DEFINER",
        ),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE plpythonu AS '1'", "language plpythonu"),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE c AS 'x', 'y'", "language c"),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = tenant_b AS 'select 1'",
            "SET",
        ),
        ("CREATE TEMP TABLE t (x int)", "temporary"),
        ("CREATE TABLE shared.evil (x int)", "own schema"),
        ("CREATE TABLE tenant_b.evil (x int)", "own schema"),
        ("CREATE INDEX ON shared.market_data (symbol)", "own schema"),
        ("DROP TABLE tenant_b.users", "own schema"),
        ("TRUNCATE shared.market_data", "own schema"),
        ("SELECT * FROM tenant_b.users", "schema tenant_b"),
        ('SELECT * FROM "tenant_b"."users"', "schema tenant_b"),
        ("SELECT * FROM tenant_b . users", "schema tenant_b"),
        ("SELECT * FROM tenant_b/**/./**/users", "schema tenant_b"),
        ('SELECT * FROM U&"tenant\\005fb".users', "schema tenant_b"),
        ("SELECT (SELECT count(*) FROM tenant_b.users)", "schema tenant_b"),
        ("WITH x AS (SELECT * FROM tenant_b.users) SELECT * FROM x", "schema tenant_b"),
        ("INSERT INTO users SELECT * FROM tenant_b.users", "schema tenant_b"),
        ("SELECT 1::tenant_b.mytype", "schema tenant_b"),
        ("SELECT tenant_b.f()", "schema tenant_b"),
        ("SELECT * FROM dbsvc_control.tenants", "schema dbsvc_control"),
        ("SELECT set_config('role', 'x', false)", "set_config"),
        ("select/**/set_config('dbsvc.user_id','bob',true)", "set_config"),
        ("SELECT pg_catalog.set_config('a', 'b', false)", "set_config"),
        ("SELECT length((SELECT set_config('a', 'b', false)))", "set_config"),
        ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
        ("SELECT (SELECT pg_read_file('/etc/passwd'))", "pg_read_file"),
        ("SELECT pg_ls_dir('.')", "pg_ls_dir"),
        ("SELECT lo_import('/etc/passwd')", "lo_import"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
        ("SELECT pg_try_advisory_xact_lock(1)", "pg_try_advisory_xact_lock"),
        ("SELECT dblink('host=x', 'select 1')", "dblink"),
        ("SELECT query_to_xml('select * from tenant_b.users', true, true, '')", "query_to_xml"),
        ("SELECT pg_get_functiondef(1)", "pg_get_functiondef"),
        ("SELECT pg_terminate_backend(1)", "pg_terminate_backend"),
        ("SELECT pg_notify('ch', 'x')", "pg_notify"),
        ("SELECT pg_stat_get_activity(1)", "pg_stat_get_activity"),
        ("SELECT * FROM pg_class", "pg_class"),
        ("SELECT * FROM pg_catalog.pg_namespace", "pg_namespace"),
        ("SELECT prosrc FROM pg_proc", "pg_proc"),
        ("SELECT * FROM pg_roles", "pg_roles"),
        ("SELECT * FROM pg_stat_activity", "pg_stat_activity"),
        ("SELECT * FROM pg_views", "pg_views"),
        ("SELECT * FROM pg_stats", "pg_stats"),
        ("EXPLAIN CREATE TABLE x AS SELECT 1", "EXPLAIN of DDL"),
    ],
)
def test_refused_statements_say_why(sql: str, reason: str) -> None:
    with pytest.raises(SqlRejected, match=reason) as info:
        classify(sql)
    assert info.value.sqlstate == "42501"
    assert not isinstance(info.value, SqlSyntaxError)


@pytest.mark.parametrize("sql", ["", "   ", "-- just a comment", "/* nothing */"])
def test_empty_statement_is_a_syntax_error(sql: str) -> None:
    with pytest.raises(SqlSyntaxError, match="empty"):
        classify(sql)


def test_syntax_error_position_is_one_based() -> None:
    with pytest.raises(SqlSyntaxError) as info:
        classify("SELECT * FRM users")
    assert (info.value.sqlstate, info.value.position) == ("42601", 10)


def test_oversized_sql_is_refused_before_parsing() -> None:
    guard = SqlGuard(max_sql_bytes=100)
    with pytest.raises(PayloadTooLarge, match="100 bytes"):
        guard.classify("SELECT " + "(" * 10_000, own_schema=OWN)


def test_multibyte_sql_is_measured_in_bytes() -> None:
    guard = SqlGuard(max_sql_bytes=20)
    with pytest.raises(PayloadTooLarge):
        guard.classify("SELECT 'ééééééééé'", own_schema=OWN)


def test_many_parameters_parse() -> None:
    sql = "SELECT " + ", ".join(f"${i}" for i in range(1, 10_001))
    assert classify(sql, SqlGuard(max_sql_bytes=10**6)) is StatementKind.READ


def test_verdicts_are_cached_and_rejections_raised_afresh() -> None:
    guard = SqlGuard()
    first = guard.classify("SELECT 1", own_schema=OWN)
    assert guard.classify("SELECT 1", own_schema=OWN) is first
    errors = []
    for _ in range(2):
        with pytest.raises(SqlRejected) as info:
            guard.classify("SET ROLE x", own_schema=OWN)
        errors.append(info.value)
    assert errors[0] is not errors[1]
    assert guard.cached == 2


def test_cache_is_per_schema() -> None:
    guard = SqlGuard()
    assert guard.classify("SELECT * FROM tenant_a.users", own_schema="tenant_a").readonly
    with pytest.raises(SqlRejected):
        guard.classify("SELECT * FROM tenant_a.users", own_schema="tenant_b")


def test_cache_is_bounded() -> None:
    guard = SqlGuard(cache_size=10)
    for i in range(50):
        guard.classify(f"SELECT {i}", own_schema=OWN)
    assert guard.cached == 10
