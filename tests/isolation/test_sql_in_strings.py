"""SQL hidden in strings, and limits a session could lift for itself.

Functions that plan and run a query given as text (``ts_stat``, ``query_to_xml``…) would carry
SQL past the guard: every one is refused (``test_catalog_systematic`` finds them in ``pg_proc``;
here, variants through every front end). And since any session can change its own settings —
in a function body the guard never saw, even trap the cancel a timeout sends — the tenant's time
limit is enforced by the service from outside the session: it cancels the statement at the limit
and terminates the backend if it keeps running.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantLimits, TenantRecord
from tests.fix_pg import PgCluster
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")

HIDDEN_SQL = {
    "ts_stat": "SELECT * FROM ts_stat('SELECT to_tsvector(nspname) FROM pg_namespace')",
    "ts_stat with weights": "SELECT * FROM ts_stat('SELECT to_tsvector(relname) FROM pg_class', 'a')",
    "ts_rewrite": "SELECT ts_rewrite('a'::tsquery, 'SELECT ''a''::tsquery, ''b''::tsquery')",
    "query_to_xml": "SELECT query_to_xml('SELECT rolname FROM pg_roles', true, true, '')",
    "query_to_xml_and_xmlschema": ("SELECT query_to_xml_and_xmlschema('SELECT 1', true, true, '')"),
    "table_to_xml": "SELECT table_to_xml('market_data', true, true, '')",
    "schema_to_xml": "SELECT schema_to_xml('shared', true, true, '')",
    "database_to_xml": "SELECT database_to_xml(true, true, '')",
    "qualified": "SELECT * FROM pg_catalog.ts_stat('SELECT to_tsvector(datname) FROM pg_database')",
    "in a subquery": "SELECT (SELECT count(*) FROM ts_stat('SELECT to_tsvector(1::text)'))",
    "in a CTE": "WITH s AS (SELECT * FROM ts_stat('SELECT to_tsvector(''x'')')) SELECT * FROM s",
    "in a view": "CREATE VIEW v_hidden AS SELECT * FROM ts_stat('SELECT to_tsvector(''x'')')",
    "in a SQL function": (
        "CREATE FUNCTION hidden() RETURNS SETOF record LANGUAGE sql AS"
        " 'SELECT * FROM ts_stat(''SELECT to_tsvector(relname) FROM pg_class'')'"
    ),
    "in a PL/pgSQL function": (
        "CREATE FUNCTION hidden2() RETURNS bigint LANGUAGE plpgsql AS $$ BEGIN RETURN"
        " (SELECT count(*) FROM ts_stat('SELECT to_tsvector(relname) FROM pg_class')); END $$"
    ),
    "in a default": (
        "CREATE TABLE hidden_t (x xml DEFAULT query_to_xml('SELECT 1', true, true, ''))"
    ),
    "lift the timeout": "SELECT set_config('statement_timeout', '0', false)",
    "lift it locally": "SELECT set_config('statement_timeout', '0', true)",
    "lift idle timeout": "SET idle_in_transaction_session_timeout = 0",
    "lift lock timeout": "SET lock_timeout TO 0",
}


@pytest.mark.parametrize("sql", HIDDEN_SQL.values(), ids=HIDDEN_SQL.keys())
async def test_sql_hidden_in_strings_is_refused(front_end: FrontEnd, sql: str) -> None:
    outcome = await front_end.run(sql)
    assert outcome.refused and outcome.code == "sql_rejected", outcome


@pytest.fixture(scope="module")
async def limited(core: Application) -> TenantRecord:
    """A tenant whose statements may run 1 s."""
    return await core.tenants.create(f"limited_{secrets.token_hex(3)}", TenantLimits(10, 1000))


@pytest.fixture
async def limited_front_end(
    front_end: FrontEnd,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    limited: TenantRecord,
) -> AsyncIterator[FrontEnd]:
    door = await front_end.for_tenant(
        core, limited.tenant_id, (Scope.READ, Scope.WRITE, Scope.ADMIN)
    )
    yield door
    await door.close()


@pytest.fixture
async def limited_conn(
    core: Application, limited: TenantRecord, pg_cluster: PgCluster
) -> AsyncIterator[asyncpg.Connection]:
    """The limited tenant's own login, straight to PostgreSQL (to plant functions the guard
    would refuse)."""
    conn = await asyncpg.connect(
        pg_cluster.dsn,
        user=limited.role_name,
        password=core.secret_box.open(limited.role_secret),
    )
    yield conn
    await conn.close()


async def _busy_backends(core: Application, limited: TenantRecord) -> int:
    return int(
        await core.owner_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = ANY($1::text[])"
            " AND state <> 'idle'",
            list(limited.roles),
        )
    )


LIFTED_LIMITS = {
    "statement_timeout lifted": (
        "PERFORM set_config('statement_timeout', '0', true); PERFORM pg_sleep(6);"
    ),
    "session-wide": "PERFORM set_config('statement_timeout', '0', false); PERFORM pg_sleep(6);",
    "cancel trapped": (
        "PERFORM set_config('statement_timeout', '0', true);"
        " FOR i IN 1..30 LOOP BEGIN PERFORM pg_sleep(0.2);"
        " EXCEPTION WHEN query_canceled THEN NULL; END; END LOOP;"
    ),
}


@pytest.mark.parametrize("lift", LIFTED_LIMITS)
async def test_a_limit_the_session_lifts_is_still_enforced_from_outside(
    limited_front_end: FrontEnd,
    limited_conn: asyncpg.Connection,
    core: Application,
    limited: TenantRecord,
    lift: str,
) -> None:
    name = f"lift_{abs(hash(lift)) % 100_000}"
    await limited_conn.execute(
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS int LANGUAGE plpgsql AS $$"
        f" BEGIN {LIFTED_LIMITS[lift]} RETURN 1; END $$"
    )
    started = time.perf_counter()
    outcome = await limited_front_end.run(f"SELECT {name}()")
    elapsed = time.perf_counter() - started
    print(f"\n{limited_front_end.name} {lift}: refused after {elapsed * 1000:.0f} ms")
    assert not outcome.ok
    assert (outcome.code, outcome.sqlstate) == ("query_canceled", "57014"), outcome
    assert elapsed < 5, "the limit was not enforced: the statement ran its course"
    # A backend that trapped the cancel is terminated after the grace period.
    for _ in range(50):
        if await _busy_backends(core, limited) == 0:
            break
        await asyncio.sleep(0.1)
    assert await _busy_backends(core, limited) == 0
    # And the tenant keeps working on fresh connections.
    assert (await limited_front_end.run("SELECT 1")).rows == [[1]]
