"""Tenant A attacks tenant B through the service's query API.

Every attack gets a clear error (the guard's ``sql_rejected`` or PostgreSQL's own refusal with its
SQLSTATE), never B's rows; B's data is unchanged after each (``unchanged_victim``) and B's secret
never appears in a response (``Tenants.attack``).
"""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

# {b} is the victim's schema, {b_role} its role, {shared} the shared schema.
GUARD_REFUSES = {
    "qualified select": "SELECT * FROM {b}.users",
    "qualified insert": "INSERT INTO {b}.users VALUES ('x', 'x@x', 'free')",
    "qualified update": "UPDATE {b}.users SET email = 'pwned'",
    "qualified delete": "DELETE FROM {b}.users",
    "join with own table": "SELECT * FROM users u JOIN {b}.users v ON true",
    "scalar subquery": "SELECT (SELECT email FROM {b}.users LIMIT 1)",
    "cte": "WITH v AS (SELECT * FROM {b}.users) SELECT * FROM v",
    "quoted identifiers": 'SELECT * FROM "{b}"."users"',
    "comments between tokens": "SELECT * FROM {b} /* x */ . /* y */ users",
    "unicode escape identifier": 'SELECT * FROM U&"{b_escaped}".users',
    "upper-case quoted schema": 'SELECT * FROM "{b_upper}".users',
    "insert from victim": "INSERT INTO users SELECT * FROM {b}.users",
    "control plane": "SELECT role_secret FROM dbsvc_control.tenants",
    "set search_path": "SET search_path = {b}",
    "set local search_path": "SET LOCAL search_path = {b}",
    "set_config search_path": "SELECT set_config('search_path', '{b}', false)",
    "set role": "SET ROLE {b_role}",
    "reset role": "RESET ROLE",
    "set session authorization": "SET SESSION AUTHORIZATION {b_role}",
    "set_config role": "SELECT set_config('role', '{b_role}', false)",
    "set_config user id": "SELECT set_config('dbsvc.user_id', 'b-user', false)",
    "set_config nested in an argument": "SELECT length(set_config('role', '{b_role}', true))",
    "set statement_timeout": "SET statement_timeout = 0",
    "set application_name": "SET application_name = 'evil'",
    "set work_mem": "SET work_mem = '2GB'",
    "do block": "DO $$ BEGIN PERFORM * FROM {b}.users; END $$",
    "security definer function": (
        "CREATE FUNCTION steal() RETURNS text SECURITY DEFINER LANGUAGE sql"
        " AS 'SELECT email FROM {b}.users'"
    ),
    "function with its own search_path": (
        "CREATE FUNCTION sp() RETURNS int LANGUAGE sql SET search_path = {b} AS 'SELECT 1'"
    ),
    "copy out": "COPY {b}.users TO STDOUT",
    "copy to program": "COPY users TO PROGRAM 'cat > /tmp/x'",
    "copy from file": "COPY users FROM '/etc/passwd'",
    "pg_read_file": "SELECT pg_read_file('/etc/passwd')",
    "pg_ls_dir": "SELECT pg_ls_dir('.')",
    "lo_import": "SELECT lo_import('/etc/passwd')",
    "create extension dblink": "CREATE EXTENSION dblink",
    "dblink": "SELECT * FROM public.dblink('dbname=postgres', 'SELECT 1') AS t(x int)",
    "query_to_xml": "SELECT query_to_xml('SELECT * FROM {b}.users', true, true, '')",
    "pg_class": "SELECT relname FROM pg_class",
    "pg_namespace": "SELECT nspname FROM pg_catalog.pg_namespace",
    "pg_proc sources": "SELECT prosrc FROM pg_proc",
    "pg_roles": "SELECT rolname FROM pg_roles",
    "pg_stat_activity": "SELECT query FROM pg_stat_activity",
    "pg_stats": "SELECT most_common_vals FROM pg_stats",
    "pg_views": "SELECT definition FROM pg_views",
    "pg_get_functiondef": "SELECT pg_get_functiondef('{b}.f'::regproc)",
    "listen": "LISTEN victim_channel",
    "notify": "NOTIFY victim_channel, 'x'",
    "pg_notify": "SELECT pg_notify('victim_channel', 'x')",
    "advisory lock": "SELECT pg_advisory_lock(42)",
    "temp table": "CREATE TEMP TABLE stash AS SELECT 1",
    "prepare": "PREPARE leak AS SELECT 1",
    "execute": "EXECUTE leak",
    "multi-statement": "SELECT 1; SELECT * FROM {b}.users",
    "multi-statement behind a comment": "SELECT 1 /* ; */; DELETE FROM users",
    "multi-statement behind a line comment": "SELECT 1 --\n; SELECT * FROM users",
    "multi-statement after an escaped string": "SELECT E'\\';'; SELECT 2",
    "multi-statement after dollar quotes": "SELECT $q$;$q$; SELECT 2",
    "begin": "BEGIN",
    "truncate shared table": "TRUNCATE {shared}.market_data",
    "alter shared table rls": "ALTER TABLE {shared}.market_data NO FORCE ROW LEVEL SECURITY",
    "drop shared table": "DROP TABLE {shared}.market_data",
    "create policy": "CREATE POLICY open ON {shared}.market_data USING (true)",
    "grant": "GRANT SELECT ON users TO PUBLIC",
    "grant role": "GRANT {b_role} TO CURRENT_USER",
}


def render(sql: str, t: Tenants) -> str:
    return sql.format(
        b=t.b.schema_name,
        b_role=t.b.role_name,
        shared=t.shared,
        b_escaped=t.b.schema_name.replace("_", "\\005f"),
        b_upper=t.b.schema_name.upper(),
    )


@pytest.mark.parametrize("sql", GUARD_REFUSES.values(), ids=GUARD_REFUSES.keys())
async def test_attack_is_refused_before_reaching_postgres(
    http: httpx.AsyncClient, tenants: Tenants, sql: str
) -> None:
    response = await tenants.attack(http, render(sql, tenants))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in {"sql_rejected", "sql_syntax_error"}


async def test_tenant_cannot_read_another_company_by_filtering_shared_rows(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await tenants.attack(
        http, "SELECT * FROM market_data WHERE company_id = $1", tenants.b.tenant_id
    )
    assert response.status_code == 200 and response.json()["rows"] == []


async def test_shared_tables_show_only_the_tenants_own_rows(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    for table in ("market_data", "trading_ticks", "ai_predictions", "tenant_configurations"):
        response = await tenants.attack(http, f"SELECT DISTINCT company_id FROM {table}")
        assert response.status_code == 200
        assert {row[0] for row in response.json()["rows"]} <= {tenants.a.tenant_id}


@pytest.mark.parametrize(
    ("table", "columns"),
    [
        ("market_data", "(company_id, symbol) VALUES ($1, 'EURUSD')"),
        ("trading_ticks", "(time, company_id, user_id, symbol) VALUES (now(), $1, 'u', 'EURUSD')"),
        (
            "ai_predictions",
            "(time, company_id, user_id, symbol, prediction_type, confidence)"
            " VALUES (now(), $1, 'u', 'EURUSD', 'buy', 0.5)",
        ),
        ("tenant_configurations", "(company_id, config_key, config_value) VALUES ($1, 'k', '{}')"),
    ],
)
async def test_forged_company_id_on_insert_is_refused_by_rls(
    http: httpx.AsyncClient, tenants: Tenants, table: str, columns: str
) -> None:
    response = await tenants.attack(http, f"INSERT INTO {table} {columns}", tenants.b.tenant_id)
    assert response.status_code == 403
    assert response.json()["error"]["sqlstate"] == "42501"


async def test_moving_own_row_to_another_company_is_refused(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await tenants.attack(
        http, "UPDATE market_data SET company_id = $1", tenants.b.tenant_id
    )
    assert response.status_code == 403 and response.json()["error"]["sqlstate"] == "42501"


async def test_upsert_into_another_companys_configuration_is_refused(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await tenants.attack(
        http,
        "INSERT INTO tenant_configurations (company_id, config_key, config_value)"
        " VALUES ($1, 'risk_limit', '{\"pwned\": true}')"
        " ON CONFLICT (company_id, config_key) DO UPDATE SET config_value = EXCLUDED.config_value",
        tenants.b.tenant_id,
    )
    assert response.status_code == 403 and response.json()["error"]["sqlstate"] == "42501"


async def test_same_configuration_key_stays_per_company(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    sql = (
        "INSERT INTO tenant_configurations (config_key, config_value) VALUES ('risk_limit', $1)"
        " ON CONFLICT (company_id, config_key) DO UPDATE SET config_value = EXCLUDED.config_value"
    )
    response = await tenants.attack(http, sql, {"mine": True})
    assert response.status_code == 200, response.text


async def test_unqualified_update_and_delete_touch_only_own_rows(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    updated = await tenants.attack(http, "UPDATE market_data SET symbol = 'HACKED'")
    assert updated.status_code == 200
    deleted = await tenants.attack(http, "DELETE FROM trading_ticks")
    assert deleted.status_code == 200


async def test_forged_user_id_in_shared_insert_is_refused(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await tenants.attack(
        http,
        "INSERT INTO market_data (user_id, symbol) VALUES ('someone-else', 'X')",
        user_id="a-user",
    )
    assert response.status_code == 403 and response.json()["error"]["sqlstate"] == "42501"


FUNCTIONS_THE_GUARD_NEVER_SAW = {
    # name: (body of a PL/pgSQL function returning SETOF text, SQLSTATEs PostgreSQL may answer)
    "peek": (
        "RETURN QUERY EXECUTE 'SELECT email::text FROM {b}.users';",
        {"42501", "3F000"},
    ),
    "hop_role": ("EXECUTE 'SET ROLE {b_role}'; RETURN NEXT current_user;", {"42501"}),
    "hop_session": (
        "EXECUTE 'SET SESSION AUTHORIZATION {b_role}'; RETURN NEXT current_user;",
        {"42501"},
    ),
    "hop_reset": (
        "EXECUTE 'RESET ROLE'; EXECUTE 'SET ROLE {b_role}'; RETURN NEXT current_user;",
        {"42501"},
    ),
}


@pytest.mark.parametrize("name", FUNCTIONS_THE_GUARD_NEVER_SAW)
async def test_functions_the_guard_never_saw_are_stopped_by_postgres(
    http: httpx.AsyncClient, tenants: Tenants, attacker_conn: asyncpg.Connection, name: str
) -> None:
    # The guard refuses dynamic SQL in function bodies; a function created another way (before
    # that rule, or by A's own login directly) still meets PostgreSQL: A's role reaches nothing
    # of B's.
    body, states = FUNCTIONS_THE_GUARD_NEVER_SAW[name]
    body = body.format(b=tenants.b.schema_name, b_role=tenants.b.role_name)
    create = (
        f"CREATE FUNCTION {name}() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN {body} END $$"
    )
    refused = await tenants.attack(http, create)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "sql_rejected"
    await attacker_conn.execute(create.replace(f"FUNCTION {name}(", f"OR REPLACE FUNCTION {name}("))
    called = await tenants.attack(http, f"SELECT * FROM {name}()")
    assert called.status_code in {403, 404}, called.text
    assert called.json()["error"]["sqlstate"] in states


async def test_user_id_changed_inside_a_function_is_refused_by_postgres(
    http: httpx.AsyncClient, tenants: Tenants, attacker_conn: asyncpg.Connection
) -> None:
    # Created behind the guard's back; PostgreSQL does not trust a user id it did not sign.
    await attacker_conn.execute(
        "CREATE OR REPLACE FUNCTION widen() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN"
        " PERFORM set_config('dbsvc.user_id', 'b-user', true);"
        " RETURN QUERY SELECT coalesce(user_id, '-') || '@' || company_id FROM market_data; END $$"
    )
    response = await tenants.attack(http, "SELECT * FROM widen()", user_id="a-user")
    assert response.status_code == 403, response.text
    assert response.json()["error"]["sqlstate"] == "42501"
    # Without a user id the function's setting is irrelevant: company-wide, A's rows only.
    plain = await tenants.attack(http, "SELECT * FROM widen()")
    assert plain.status_code == 200
    assert all(row[0].endswith("@" + tenants.a.tenant_id) for row in plain.json()["rows"])


async def test_token_for_a_cannot_name_tenant_b(http: httpx.AsyncClient, tenants: Tenants) -> None:
    response = await http.post(
        "/api/v1/query",
        json={"sql": "SELECT * FROM users", "tenant_id": tenants.b.tenant_id},
        headers=tenants.a_headers,
    )
    assert response.status_code == 403
    assert SECRET not in response.text


async def test_tenant_header_cannot_override_the_body(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.post(
        "/api/v1/query",
        json={"sql": "SELECT * FROM users", "tenant_id": tenants.a.tenant_id},
        headers={**tenants.a_headers, "X-Tenant-Id": tenants.b.tenant_id},
    )
    assert response.status_code == 400


async def test_tenant_header_alone_cannot_reach_b(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.post(
        "/api/v1/query",
        json={"sql": "SELECT * FROM users"},
        headers={**tenants.a_headers, "X-Tenant-Id": tenants.b.tenant_id},
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    "tenant_id",
    ["{a}; SET ROLE postgres", "{a}' OR '1'='1", "{a}\u0000", "../{b}", "{A}"],
)
async def test_tenant_id_injection_is_rejected(
    http: httpx.AsyncClient, tenants: Tenants, tenant_id: str
) -> None:
    forged = tenant_id.format(
        a=tenants.a.tenant_id, b=tenants.b.tenant_id, A=tenants.a.tenant_id.upper()
    )
    response = await http.post(
        "/api/v1/query",
        json={"sql": "SELECT 1", "tenant_id": forged},
        headers=tenants.a_headers,
    )
    assert response.status_code in {400, 403}
    assert response.json()["error"]["code"] in {"invalid_tenant_id", "permission_denied"}


async def test_user_id_injection_is_rejected(http: httpx.AsyncClient, tenants: Tenants) -> None:
    response = await tenants.attack(http, "SELECT 1", user_id="a-user', true); SET ROLE x; --")
    assert response.status_code == 400


async def test_suspended_victim_stays_invisible_and_locked(
    http: httpx.AsyncClient, tenants: Tenants, core: object
) -> None:
    from database_service.app import Application

    assert isinstance(core, Application)
    await core.tenants.suspend(tenants.b.tenant_id)
    try:
        victim = await tenants.as_victim(http, "SELECT 1")
        assert victim.status_code == 409
        attacker = await tenants.attack(
            http, "SELECT count(*) FROM market_data WHERE company_id = $1", tenants.b.tenant_id
        )
        assert attacker.json()["rows"] == [[0]]
    finally:
        await core.tenants.resume(tenants.b.tenant_id)
