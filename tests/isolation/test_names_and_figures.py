"""The customer roster and figures about other tenants' rows stay out of a tenant's reach.

Names: schemas and roles are opaque (``t_<random>``), so whatever catalog path PostgreSQL leaves
open names no customer; the paths themselves — OID casts to ``reg*`` types, ``to_reg*``
existence oracles, privilege inquiries, catalog-name functions — are refused.

Figures: plan estimates and EXPLAIN ANALYZE's "rows removed by filter" are computed over every
tenant's rows of a shared table; so are relation sizes, statistics views and physical row
positions. None reaches a tenant.
"""

from __future__ import annotations

import asyncpg
import pytest

from database_service.app import Application
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")

ROSTER = {
    "schemas by OID": "SELECT g::oid::regnamespace::text FROM generate_series(2200, 40000) g",
    "roles by OID": "SELECT g::oid::regrole::text FROM generate_series(10, 40000) g",
    "relations by OID": "SELECT g::oid::regclass::text FROM generate_series(16384, 40000) g",
    "types by OID": "SELECT g::oid::regtype::text FROM generate_series(16384, 40000) g",
    "functions by OID": "SELECT g::oid::regprocedure::text FROM generate_series(16384, 40000) g",
    "format_type": "SELECT format_type(g::oid, NULL) FROM generate_series(16384, 40000) g",
    "existence by to_regclass": "SELECT to_regclass('{b}.users') IS NOT NULL",
    "existence by to_regnamespace": "SELECT to_regnamespace('{b}')",
    "existence by to_regrole": "SELECT to_regrole('{b_role}')",
    "existence by a cast": "SELECT '{b}.users'::regclass",
    "existence by a quoted cast": 'SELECT \'"{b}"."users"\'::regclass',
    "existence by nextval": "SELECT nextval('{b}._market_data_id_seq')",
    "existence by currval": "SELECT currval('\"{b}\"._market_data_id_seq')",
    "existence by a parameter": "SELECT nextval($1)",
    "privilege inquiry": "SELECT has_schema_privilege('{b}', 'USAGE')",
    "privilege inquiry on a table": "SELECT has_table_privilege('{b}.users', 'SELECT')",
    "role membership": "SELECT pg_has_role('{b_role}', 'MEMBER')",
    "column privilege": "SELECT has_column_privilege('{b}.users', 'email', 'SELECT')",
    "visibility": "SELECT pg_table_is_visible(16384)",
    "object description": "SELECT obj_description(16384, 'pg_class')",
    "identify object": "SELECT * FROM pg_identify_object('pg_class'::regclass, 16384, 0)",
    "input validity of a foreign type": "SELECT pg_input_is_valid('x', '{b}.users')",
    "namespace catalog": "SELECT nspname FROM pg_namespace",
    "roles catalog": "SELECT rolname FROM pg_roles",
    "authid": "SELECT rolname FROM pg_authid",
    "row types": "SELECT typname FROM pg_type",
    "row types qualified": "SELECT typname FROM pg_catalog.pg_type",
    "grants on row types": "SELECT * FROM information_schema.udt_privileges",
    "activity": "SELECT usename, application_name FROM pg_stat_activity",
    "locks": "SELECT * FROM pg_locks",
    "settings per role": "SELECT * FROM pg_db_role_setting",
    "a table with an OID-alias column": "CREATE TABLE names_later (r regclass)",
}

FIGURES = {
    "plan estimates": "EXPLAIN SELECT * FROM market_data",
    "plan estimates as JSON": "EXPLAIN (FORMAT JSON) SELECT * FROM trading_ticks",
    "costs on": "EXPLAIN (COSTS ON) SELECT * FROM market_data",
    "analyze": "EXPLAIN ANALYZE SELECT * FROM market_data",
    "analyze without costs": "EXPLAIN (ANALYZE, COSTS OFF) SELECT * FROM market_data",
    "analyze of a write": "EXPLAIN (ANALYZE, COSTS OFF) DELETE FROM market_data WHERE false",
    "buffers": "EXPLAIN (BUFFERS, COSTS OFF) SELECT * FROM market_data",
    "relation size": "SELECT pg_relation_size('market_data')",
    "total size": "SELECT pg_total_relation_size('shared.trading_ticks')",
    "table size": "SELECT pg_table_size('market_data')",
    "database size": "SELECT pg_database_size(current_database())",
    "live tuples": "SELECT n_live_tup FROM pg_stat_user_tables",
    "tuples by function": "SELECT pg_stat_get_live_tuples(16384)",
    "class estimates": "SELECT reltuples FROM pg_class",
    "column statistics": "SELECT most_common_vals FROM pg_stats",
    "extended statistics": "SELECT * FROM pg_stats_ext",
    "physical positions": "SELECT ctid FROM market_data",
    "transaction ids of rows": "SELECT xmin, xmax FROM market_data",
    "transaction counter": "SELECT txid_current()",
    "snapshot": "SELECT pg_current_snapshot()",
    "an xid read back": "SELECT age('3'::xid)",
    "statistics by ANALYZE": "ANALYZE market_data",
}


def render(sql: str, tenants: Tenants) -> str:
    return sql.format(b=tenants.b.schema_name, b_role=tenants.b.role_name)


@pytest.mark.parametrize("sql", ROSTER.values(), ids=ROSTER.keys())
async def test_the_roster_cannot_be_enumerated(
    front_end: FrontEnd, tenants: Tenants, sql: str
) -> None:
    params = (f"{tenants.b.schema_name}._market_data_id_seq",) if "$1" in sql else ()
    outcome = await front_end.run(render(sql, tenants), *params)
    assert outcome.refused and outcome.code == "sql_rejected", outcome


@pytest.mark.parametrize("sql", FIGURES.values(), ids=FIGURES.keys())
async def test_no_figure_about_other_tenants_rows_is_given(front_end: FrontEnd, sql: str) -> None:
    outcome = await front_end.run(sql)
    assert outcome.refused and outcome.code == "sql_rejected", outcome


async def test_plans_without_figures_are_still_available(front_end: FrontEnd) -> None:
    plan = await front_end.run("EXPLAIN (COSTS OFF) SELECT * FROM market_data WHERE symbol = 'X'")
    assert plan.ok, plan
    text = "\n".join(str(row[0]) for row in plan.rows)
    assert "rows=" not in text and "cost=" not in text and "Rows Removed" not in text


async def test_own_names_can_still_be_resolved(front_end: FrontEnd, tenants: Tenants) -> None:
    outcome = await front_end.run(
        "SELECT 'users'::regclass::text, to_tsvector('english', 'Trading ticks')::text"
    )
    assert outcome.ok, outcome
    assert outcome.rows[0][0] == "users"


async def test_catalog_names_show_no_customer_even_to_postgres_directly(
    attacker_conn: asyncpg.Connection, core: Application, tenants: Tenants
) -> None:
    # What PostgreSQL still shows every role, read without the guard: names, but none that
    # says who the customers are (sessions' application names included).
    names = await attacker_conn.fetch(
        "SELECT nspname AS name FROM pg_namespace UNION ALL SELECT rolname FROM pg_roles"
    )
    sessions = await core.owner_pool.fetch(
        "SELECT coalesce(application_name, '') AS name FROM pg_stat_activity"
    )
    shown = " ".join(r["name"] for r in [*names, *sessions])
    assert tenants.b.tenant_id not in shown and tenants.a.tenant_id not in shown


async def test_statistics_and_sizes_are_refused_by_postgres_too(
    attacker_conn: asyncpg.Connection, core: Application, tenants: Tenants
) -> None:
    # With a superuser at start (as here) the service also takes these from PUBLIC.
    superuser = await core.owner_pool.fetchval(
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    assert superuser
    for sql in (
        "SELECT n_live_tup FROM pg_stat_user_tables",
        "SELECT count(*) FROM pg_stat_activity",
        "SELECT count(*) FROM pg_locks",
        f"SELECT pg_total_relation_size('{tenants.shared}.market_data')",
        "SELECT * FROM ts_stat('SELECT to_tsvector(relname) FROM pg_class')",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.fetch(sql)
