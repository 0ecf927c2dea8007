"""The SQL guard's rules, without a database: what is read, write or DDL, and what is refused."""

from __future__ import annotations

import pytest

from database_service.errors import InvalidText, PayloadTooLarge, SqlRejected, SqlSyntaxError
from database_service.sqlguard import Classification, SqlGuard, StatementKind

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
        "EXPLAIN (COSTS OFF) SELECT * FROM users",
        "EXPLAIN (COSTS false, VERBOSE) DELETE FROM users",
        "EXPLAIN (COSTS OFF, ANALYZE false) SELECT 1",
        "SELECT pg_sleep(0.1)",
        "SELECT pg_typeof(1), pg_column_size('x')",
        "SELECT current_setting('dbsvc.user_id', true)",
        "SELECT $$;$$, E'a;b', 'it''s; fine'",
        "SELECT name FROM pg_catalog.pg_timezone_names",
        "SELECT nextval('own_seq'), currval('tenant_a.own_seq'), setval('\"own_seq\"', 1)",
        "SELECT to_tsvector('english', email), to_tsvector(email) FROM users",
        "SELECT 'users'::regclass, 'tenant_a.users'::regclass, 'shared.market_data'::regclass",
        "SELECT upper($1), now() AT TIME ZONE 'UTC', extract(year FROM now()), trim(' x ')",
        "SELECT count(*) FILTER (WHERE x > 1), percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t",
        "SELECT row_number() OVER (), jsonb_build_object('a', 1), gen_random_uuid()",
        "SELECT my_own_function(1), tenant_a.other(2), shared.tick_price(1, 2)",
        "SELECT tableoid FROM shared.market_data",
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
        ("SELECT public.dblink('host=x', 'select 1')", "schema public"),
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
        ("EXPLAIN (COSTS OFF) CREATE TABLE x AS SELECT 1", "EXPLAIN of DDL"),
        # plans and statistics of shared tables
        ("EXPLAIN SELECT * FROM shared.market_data", "COSTS OFF"),
        ("EXPLAIN (COSTS ON) SELECT 1", "COSTS OFF"),
        ("EXPLAIN (ANALYZE, COSTS OFF) SELECT * FROM market_data", "ANALYZE"),
        ("EXPLAIN ANALYZE DELETE FROM users", "ANALYZE"),
        ("EXPLAIN (BUFFERS, COSTS OFF) SELECT 1", "BUFFERS"),
        ("SELECT pg_relation_size('shared.market_data')", "pg_relation_size"),
        ("SELECT pg_total_relation_size('market_data')", "pg_total_relation_size"),
        ("SELECT reltuples FROM pg_class", "pg_class"),
        ("SELECT * FROM pg_stat_user_tables", "pg_stat_user_tables"),
        ("SELECT typname FROM pg_catalog.pg_type", "pg_type"),
        ("SELECT enumlabel FROM pg_enum", "pg_enum"),
        # SQL given as text
        ("SELECT * FROM ts_stat('SELECT 1')", "ts_stat"),
        ("SELECT ts_rewrite('a'::tsquery, 'SELECT 1')", "ts_rewrite"),
        ("SELECT query_to_xmlschema('SELECT 1', true, true, '')", "query_to_xmlschema"),
        ("SELECT cursor_to_xml('c', 1, true, true, '')", "cursor_to_xml"),
        ("SELECT table_to_xml('users', true, true, '')", "table_to_xml"),
        ("SELECT schema_to_xml('tenant_b', true, true, '')", "schema_to_xml"),
        ("SELECT database_to_xml(true, true, '')", "database_to_xml"),
        # names, OIDs and existence of other tenants' objects
        ("SELECT 2200::oid::regnamespace", "regnamespace"),
        ("SELECT oid::regclass FROM generate_series(16384, 17000) oid", "regclass"),
        ("SELECT 'tenant_b.users'::regclass", "regclass"),
        ('SELECT \'"tenant_b"."users"\'::regclass', "regclass"),
        ("SELECT '16384'::regclass", "regclass"),
        ("SELECT 'tenant_b'::regnamespace", "regnamespace"),
        ("SELECT CAST($1 AS regclass)", "regclass"),
        ("SELECT '{users}'::regclass[]", "regclass"),
        ("SELECT 'f(tenant_b.t)'::regprocedure", "regprocedure"),
        ("SELECT 'x'::pg_catalog.regrole", "regrole"),
        ("SELECT to_regclass('tenant_b.users')", "to_regclass"),
        ("SELECT to_regnamespace('tenant_b')", "to_regnamespace"),
        ("SELECT has_table_privilege('tenant_b.users', 'select')", "has_table_privilege"),
        ("SELECT has_schema_privilege('tenant_b', 'usage')", "has_schema_privilege"),
        ("SELECT pg_has_role('tenant_b', 'member')", "pg_has_role"),
        ("SELECT format_type(16400, NULL)", "format_type"),
        ("SELECT obj_description(16400)", "obj_description"),
        ("SELECT row_security_active('tenant_b.users')", "row_security_active"),
        ("SELECT pg_input_is_valid('1', 'tenant_b.t')", "pg_input_is_valid"),
        ("SELECT nextval('tenant_b.seq')", "nextval"),
        ("SELECT nextval($1)", "nextval"),
        ("SELECT nextval(name) FROM t", "nextval"),
        ("SELECT to_tsvector($1, 'text')", "to_tsvector"),
        ("SELECT to_tsvector('tenant_b.cfg', 'text')", "to_tsvector"),
        ("SELECT setval(seq => 'tenant_b.s', value => 1)", "setval"),
        ("CREATE TABLE t (r regclass)", "regclass"),
        ("CREATE DOMAIN d AS regclass", "regclass"),
        # where and when other tenants write
        ("SELECT ctid, * FROM shared.market_data", "ctid"),
        ("SELECT m.xmin FROM market_data m", "xmin"),
        ("SELECT age('3'::xid)", "xid"),
        ("SELECT txid_current()", "txid_current"),
        ("SELECT pg_current_xact_id()", "pg_current_xact_id"),
        ("SELECT * FROM pg_current_snapshot()", "pg_current_snapshot"),
        ("SELECT setseed(0.5)", "setseed"),
        # session settings and functions the guard does not see
        ("SELECT information_schema._pg_truetypid(null, null)", "function _pg_truetypid"),
        ("SELECT pg_someday_new_function()", "pg_someday_new_function"),
        ("CREATE TABLE kid () INHERITS (shared.market_data)", "own schema"),
        ("ALTER TABLE users INHERIT shared.market_data", "inheritance"),
        (
            "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS"
            " 'SELECT set_config(''dbsvc.user_id'', ''b'', true)'",
            "set_config",
        ),
        (
            "CREATE FUNCTION f() RETURNS bigint LANGUAGE sql AS"
            " 'SELECT 1; SELECT reltuples::bigint FROM pg_class'",
            "pg_class",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ BEGIN EXECUTE format('SELECT %s', 1); END $$",
            "computed at run time",
        ),
        (
            "CREATE FUNCTION f(q text) RETURNS SETOF record LANGUAGE plpgsql AS"
            " $$ BEGIN RETURN QUERY EXECUTE q; END $$",
            "computed at run time",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'SELECT * FROM pg_stats' LOOP END LOOP;"
            " END $$",
            "pg_stats",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ BEGIN PERFORM set_config('statement_timeout', '0', true); END $$",
            "set_config",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ BEGIN SET LOCAL statement_timeout = 0; END $$",
            "SET/RESET",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ BEGIN LOCK TABLE shared.market_data; END $$",
            "LOCK",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ DECLARE r regclass; BEGIN END $$",
            "regclass",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS"
            " $$ DECLARE n int := (SELECT count(*) FROM pg_class); BEGIN RETURN n; END $$",
            "pg_class",
        ),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS"
            " $$ DECLARE n int; BEGIN n := pg_backend_pid(); RETURN n; END $$",
            "pg_backend_pid",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ BEGIN IF txid_current() > 0 THEN RAISE NOTICE 'x'; END IF; END $$",
            "txid_current",
        ),
        (
            "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE NOTICE '%', (SELECT string_agg(nspname, ',') FROM pg_namespace);"
            " END $$",
            "pg_namespace",
        ),
        (
            "CREATE TRIGGER t BEFORE INSERT ON users FOR EACH ROW"
            " EXECUTE FUNCTION tsvector_update_trigger(x, 'pg_catalog.english', y)",
            "trigger",
        ),
        ("ALTER FUNCTION f() SECURITY DEFINER", "ALTER FUNCTION"),
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
    sql = "SELECT " + ", ".join(f"${i}" for i in range(1, 5_001))
    assert classify(sql, SqlGuard(max_sql_bytes=10**6)) is StatementKind.READ


def test_statement_with_too_many_tokens_is_refused_before_parsing() -> None:
    # 120,000 constants in 240 KB kept the event loop busy for seconds when it was parsed.
    sql = "SELECT " + ",".join(str(i % 10) for i in range(120_000))
    with pytest.raises(PayloadTooLarge, match="tokens"):
        SqlGuard(max_sql_bytes=10**6, max_sql_tokens=20_000).classify(sql, own_schema=OWN)


@pytest.mark.parametrize(
    "sql", ["SELECT '\ud800'", "SELECT 1 -- \udfff", "SELECT 'a\x00b'", "SELECT \x00"]
)
def test_text_that_is_not_unicode_is_invalid_text(sql: str) -> None:
    with pytest.raises(InvalidText) as info:
        classify(sql)
    assert info.value.sqlstate == "22021"


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE FUNCTION f(a int) RETURNS int LANGUAGE plpgsql AS $$ DECLARE n int := a + 1;"
        " BEGIN n := n * 2; SELECT count(*) INTO n FROM users; IF n > 1 THEN RETURN n; END IF;"
        " EXECUTE 'UPDATE users SET email = lower(email)'; RETURN 0; END $$",
        "CREATE FUNCTION f() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY"
        " SELECT email::text FROM users; END $$",
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " NEW.updated_at := now(); RETURN NEW; END $$",
        "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql AS 'SELECT x + 1'",
        "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql RETURN x + 1",
        "CREATE TRIGGER t BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION touch()",
        "CREATE TRIGGER t BEFORE UPDATE ON users FOR EACH ROW"
        " EXECUTE FUNCTION suppress_redundant_updates_trigger()",
    ],
)
def test_functions_with_static_sql_of_their_own_are_ddl(sql: str) -> None:
    assert classify(sql) is StatementKind.DDL


def test_a_large_statement_is_classified_in_a_worker_process() -> None:
    import asyncio
    import os

    guard = SqlGuard()
    big = "SELECT " + ", ".join(["1"] * 2000)
    refused = "SELECT " + ", ".join(["1"] * 2000) + " FROM pg_class"
    too_many = "SELECT " + ",".join(["1"] * 30_000)

    async def run() -> tuple[object, ...]:
        small = await guard.classify_async("SELECT 1", own_schema=OWN)
        assert guard._executor is None  # small statements never leave the caller
        verdict = await guard.classify_async(big, own_schema=OWN)
        assert guard._executor is not None
        pid = guard._executor.submit(os.getpid).result()
        with pytest.raises(SqlRejected, match="pg_class") as info:
            await guard.classify_async(refused, own_schema=OWN)
        with pytest.raises(PayloadTooLarge, match="tokens"):
            await guard.classify_async(too_many, own_schema=OWN)
        return small, verdict, pid, info.value

    try:
        _small, verdict, pid, error = asyncio.run(run())
    finally:
        guard.close()
    assert pid != os.getpid()
    assert verdict == Classification(StatementKind.READ, "SELECT", repeatable=True)
    assert isinstance(error, SqlRejected) and error.sqlstate == "42501"
    # Verdicts from the worker are cached like any other.
    assert guard.classify(big, own_schema=OWN) == verdict


@pytest.mark.parametrize(
    ("sql", "repeatable"),
    [
        ("SELECT * FROM users WHERE user_id = $1", True),
        ("SELECT lower(email), now(), random() FROM users", True),
        ("EXPLAIN (COSTS OFF) SELECT * FROM users", True),
        ("SELECT nextval('my_seq')", False),
        ("SELECT setval('my_seq', 5)", False),
        ("SELECT my_function(1)", False),
        (f"SELECT {OWN}.my_function(1)", False),
        ("SELECT * FROM users WHERE user_id = (SELECT my_function(1))", False),
    ],
)
def test_a_read_is_repeatable_only_when_no_function_it_calls_may_write(
    sql: str, repeatable: bool
) -> None:
    """The query core may run a repeatable read twice (its first rows outside a transaction,
    then by cursor when the result is larger): never one calling a sequence function or a
    function of the tenant's, which may write."""
    verdict = SqlGuard().classify(sql, own_schema=OWN)
    assert verdict.kind is StatementKind.READ
    assert verdict.repeatable is repeatable
