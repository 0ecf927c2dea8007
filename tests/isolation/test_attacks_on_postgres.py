"""Tenant A's own role, connected straight to PostgreSQL with no service and no guard in between.

This is the primary layer: whatever the guard might miss, PostgreSQL refuses (SQLSTATE 42501) or
filters to A's rows, because A's login role owns nothing outside its schema and RLS is forced on
the shared tables and keyed on the session's login role.
"""

from __future__ import annotations

import asyncpg
import pytest

from database_service.app import Application
from tests.fix_pg import PgCluster
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

REFUSED_BY_POSTGRES = {
    "read victim schema": "SELECT * FROM {b}.users",
    "write victim schema": "INSERT INTO {b}.users VALUES ('x', 'x@x', 'free')",
    "set role to victim": "SET ROLE {b_role}",
    "set session authorization": "SET SESSION AUTHORIZATION {b_role}",
    "set role to postgres": "SET ROLE postgres",
    "advisory lock": "SELECT pg_advisory_lock(42)",
    "temp table": "CREATE TEMP TABLE stash (x int)",
    "copy to program": "COPY (SELECT 1) TO PROGRAM 'true'",
    "copy from server file": "COPY users FROM '/etc/passwd'",
    "read server file": "SELECT pg_read_file('/etc/passwd')",
    "control plane": "SELECT * FROM dbsvc_control.tenants",
    "create schema": "CREATE SCHEMA evil",
    "create role": "CREATE ROLE evil",
    "alter own role": "ALTER ROLE CURRENT_USER BYPASSRLS",
    "disable rls on shared table": "ALTER TABLE {shared}.market_data NO FORCE ROW LEVEL SECURITY",
    "truncate shared table": "TRUNCATE {shared}.market_data",
    "drop shared table": "DROP TABLE {shared}.market_data",
    "grant victim role": "GRANT {b_role} TO CURRENT_USER",
}


@pytest.mark.parametrize("sql", REFUSED_BY_POSTGRES.values(), ids=REFUSED_BY_POSTGRES.keys())
async def test_postgres_refuses_the_attack_without_the_guard(
    attacker_conn: asyncpg.Connection, tenants: Tenants, sql: str
) -> None:
    statement = sql.format(
        b=tenants.b.schema_name, b_role=tenants.b.role_name, shared=tenants.shared
    )
    with pytest.raises(asyncpg.PostgresError) as info:
        await attacker_conn.execute(statement)
    # 42501 insufficient privilege; 3F000 for a schema it cannot even see; 55P02/42P01 never.
    assert info.value.sqlstate in {"42501", "3F000"}, (statement, info.value.sqlstate, info.value)


async def test_set_config_of_the_user_id_cannot_widen_company_rows(
    attacker_conn: asyncpg.Connection, tenants: Tenants
) -> None:
    await attacker_conn.execute("SELECT set_config('dbsvc.user_id', 'b-user', false)")
    rows = await attacker_conn.fetch(
        f"SELECT DISTINCT company_id FROM {tenants.shared}.market_data"
    )
    assert {r["company_id"] for r in rows} <= {tenants.a.tenant_id}


async def test_set_role_to_the_group_changes_nothing(
    attacker_conn: asyncpg.Connection, tenants: Tenants, core: Application, pg_cluster: PgCluster
) -> None:
    # On PostgreSQL 16+ the membership is granted WITH SET FALSE; on 15 the SET succeeds but the
    # policies key on session_user, so the rows are still only A's.
    try:
        await attacker_conn.execute(f"SET ROLE {core.settings.tenant_group_role}")
    except asyncpg.InsufficientPrivilegeError:
        assert pg_cluster.version >= 16
    rows = await attacker_conn.fetch(
        f"SELECT DISTINCT company_id FROM {tenants.shared}.market_data"
    )
    assert {r["company_id"] for r in rows} <= {tenants.a.tenant_id}


async def test_forged_company_id_is_refused_by_rls_directly(
    attacker_conn: asyncpg.Connection, tenants: Tenants
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await attacker_conn.execute(
            f"INSERT INTO {tenants.shared}.market_data (company_id, symbol) VALUES ($1, 'X')",
            tenants.b.tenant_id,
        )


async def test_catalog_shows_no_victim_data(
    attacker_conn: asyncpg.Connection, tenants: Tenants
) -> None:
    # Names of other schemas are visible in pg_namespace (PostgreSQL shows the catalog to all);
    # their contents, column statistics and function sources are not.
    stats = await attacker_conn.fetch(
        "SELECT most_common_vals::text FROM pg_stats WHERE schemaname = $1", tenants.b.schema_name
    )
    assert stats == []
    tables = await attacker_conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
        tenants.b.schema_name,
    )
    assert tables == []


async def test_victim_password_is_required(tenants: Tenants, pg_cluster: PgCluster) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg_cluster.dsn, user=tenants.b.role_name, password="guess")


async def test_creating_or_dropping_an_extension_is_refused(
    attacker_conn: asyncpg.Connection,
) -> None:
    # Trusted extensions need CREATE on the database, which tenants do not have. The embedded
    # PostgreSQL 18 ships only plpgsql and pgvector, both installed by the service (pgvector by
    # a control migration): there, only dropping is tried; Debian's 15 has contrib to create.
    name = await attacker_conn.fetchval(
        "SELECT name FROM pg_available_extensions WHERE installed_version IS NULL"
        " AND name IN ('pg_trgm', 'hstore', 'citext', 'vector', 'dblink') ORDER BY name LIMIT 1"
    )
    if name is not None:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.execute(f"CREATE EXTENSION {name}")
    installed = await attacker_conn.fetch("SELECT extname FROM pg_extension ORDER BY extname")
    assert installed, "no extension installed to try"
    for row in installed:  # only an extension's owner drops or alters it
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.execute(f'DROP EXTENSION "{row["extname"]}"')


async def test_victim_sessions_cannot_be_terminated(
    attacker_conn: asyncpg.Connection, tenants: Tenants, core: Application, pg_cluster: PgCluster
) -> None:
    victim = await asyncpg.connect(
        pg_cluster.dsn,
        user=tenants.b.role_name,
        password=core.secret_box.open(tenants.b.role_secret),
    )
    try:
        pid = await victim.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert await victim.fetchval("SELECT 1") == 1
    finally:
        await victim.close()
