"""The user id behind user-level row security cannot be forged by the tenant's own SQL.

A request with a user id runs on the tenant's user-scoped login; the service opens each of its
transactions with ``control.enter_user(user, key)``, which tags the user id for that backend and
that transaction with a key the tenant never sees. The policies accept the user id only with a
valid tag: a user id the tenant's SQL sets, clears or copies from another transaction is an
error (42501), never another user's rows. Company-wide requests (no user id) see every row of
their company, as before.

Rows of tenant A for these tests: one per user ``u1``, ``u2`` and one without a user.
"""

from __future__ import annotations

import asyncpg
import pytest

from database_service.app import Application
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture(scope="module", autouse=True)
async def a_rows(core: Application, tenants: Tenants) -> None:
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, user_id, symbol)"
        " VALUES ($1, 'u1', 'U1SYM'), ($1, 'u2', 'U2SYM'), ($1, NULL, 'ALLSYM')",
        tenants.a.tenant_id,
    )


SYMBOLS = "SELECT symbol FROM market_data WHERE symbol IN ('U1SYM', 'U2SYM', 'ALLSYM') ORDER BY 1"


async def test_a_user_sees_its_rows_and_the_companys_only(front_end: FrontEnd) -> None:
    as_u1 = await front_end.run(SYMBOLS, user_id="u1")
    assert as_u1.ok and as_u1.rows == [["ALLSYM"], ["U1SYM"]], as_u1
    company = await front_end.run(SYMBOLS)
    assert company.ok and company.rows == [["ALLSYM"], ["U1SYM"], ["U2SYM"]], company


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT set_config('dbsvc.user_id', 'u2', true)",
        "SELECT set_config('dbsvc.user_id', '', true)",
        "SELECT set_config('dbsvc.user_sig', 'x', false)",
        "SELECT pg_catalog.set_config('dbsvc.user_id', 'u2', false)",
        "SET dbsvc.user_id = 'u2'",
        "SET LOCAL dbsvc.user_id TO DEFAULT",
        "RESET dbsvc.user_id",
        "SELECT dbsvc_control.enter_user('u2', '\\x00'::bytea)",
        "SELECT length((SELECT set_config('dbsvc.user_id', 'u2', true))) FROM market_data",
    ],
)
async def test_the_guard_refuses_setting_the_user_id(front_end: FrontEnd, sql: str) -> None:
    outcome = await front_end.run(sql, user_id="u1")
    if front_end.name == "pgwire" and sql in PORT_USER_ID_STATEMENTS:
        # How a port client picks its user id: kept by the port, which signs it per
        # transaction (test_pgwire_user_ids.py); never sent to PostgreSQL.
        assert outcome.ok, outcome
        return
    assert outcome.refused and outcome.code == "sql_rejected", outcome


PORT_USER_ID_STATEMENTS = {"SET dbsvc.user_id = 'u2'", "RESET dbsvc.user_id"}


FORGERIES = {
    # PL/pgSQL the guard never saw (created by A's own login directly): what it does to the
    # user context before reading the shared table.
    "another user": "PERFORM set_config('dbsvc.user_id', 'u2', true);",
    "cleared": "PERFORM set_config('dbsvc.user_id', '', true);",
    "reset": "EXECUTE 'RESET dbsvc.user_id';",
    "session-wide": "PERFORM set_config('dbsvc.user_id', 'u2', false);",
    "tag removed": "PERFORM set_config('dbsvc.user_sig', '', true);",
    "tag and id replaced": (
        "PERFORM set_config('dbsvc.user_id', 'u2', true);"
        " PERFORM set_config('dbsvc.user_sig', repeat('0', 64), true);"
    ),
    "role reset": "EXECUTE 'RESET ROLE'; PERFORM set_config('dbsvc.user_id', 'u2', true);",
}


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_a_forged_user_context_is_refused_by_postgres(
    front_end: FrontEnd, attacker_conn: asyncpg.Connection, forgery: str
) -> None:
    name = f"forge_{abs(hash(forgery)) % 100_000}"
    await attacker_conn.execute(
        f"CREATE OR REPLACE FUNCTION {name}() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN"
        f" {FORGERIES[forgery]} RETURN QUERY SELECT symbol::text FROM market_data"
        " WHERE symbol IN ('U1SYM', 'U2SYM', 'ALLSYM'); END $$"
    )
    outcome = await front_end.run(f"SELECT * FROM {name}()", user_id="u1")
    assert not outcome.ok, f"forged user context accepted: {outcome}"
    assert (outcome.code, outcome.sqlstate) == ("insufficient_privilege", "42501"), outcome
    # The next request on the same pool is not affected by what the function left behind.
    after = await front_end.run(SYMBOLS, user_id="u1")
    assert after.rows == [["ALLSYM"], ["U1SYM"]], after


async def test_a_tag_replayed_from_an_earlier_transaction_is_refused(
    front_end: FrontEnd, attacker_conn: asyncpg.Connection
) -> None:
    await attacker_conn.execute("CREATE TABLE IF NOT EXISTS stolen (id text, tag text)")
    await attacker_conn.execute(
        "CREATE OR REPLACE FUNCTION steal() RETURNS int LANGUAGE sql AS $$"
        " INSERT INTO stolen SELECT current_setting('dbsvc.user_id'),"
        " current_setting('dbsvc.user_sig') RETURNING 1 $$"
    )
    await attacker_conn.execute(
        "CREATE OR REPLACE FUNCTION replay() RETURNS SETOF text LANGUAGE plpgsql AS $$"
        " DECLARE s record; BEGIN SELECT * INTO s FROM stolen WHERE id = 'u2' LIMIT 1;"
        " PERFORM set_config('dbsvc.user_id', s.id, true);"
        " PERFORM set_config('dbsvc.user_sig', s.tag, true);"
        " RETURN QUERY SELECT symbol::text FROM market_data WHERE symbol = 'U2SYM'; END $$"
    )
    stole = await front_end.run("SELECT steal()", user_id="u2")  # a real u2 request, earlier
    assert stole.ok, stole
    replayed = await front_end.run("SELECT * FROM replay()", user_id="u1")
    assert not replayed.ok and replayed.sqlstate == "42501", replayed


async def test_rows_written_for_another_user_are_refused(front_end: FrontEnd) -> None:
    outcome = await front_end.run(
        "INSERT INTO market_data (user_id, symbol) VALUES ('u2', 'FORGED')", user_id="u1"
    )
    assert not outcome.ok and outcome.sqlstate == "42501", outcome
    moved = await front_end.run(
        "UPDATE market_data SET user_id = 'u2' WHERE symbol = 'U1SYM'", user_id="u1"
    )
    assert not moved.ok and moved.sqlstate == "42501", moved


async def test_the_user_scoped_login_is_refused_without_the_services_context(
    core: Application, tenants: Tenants, pg_cluster: object
) -> None:
    # Even with the tenant's password (which only the service holds), the user-scoped login
    # reads no user-level row without a context the service signed.
    from tests.fix_pg import PgCluster

    assert isinstance(pg_cluster, PgCluster)
    assert tenants.a.user_role_name is not None
    conn = await asyncpg.connect(
        pg_cluster.dsn,
        user=tenants.a.user_role_name,
        password=core.secret_box.open(tenants.a.role_secret),
    )
    try:
        await conn.execute("SELECT set_config('dbsvc.user_id', 'u2', false)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch(f"SELECT * FROM {tenants.shared}.market_data")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                f"SELECT {core.settings.control_schema}.enter_user('u2', $1)", b"\x00" * 32
            )
    finally:
        await conn.close()


async def test_ddl_with_a_user_id_is_refused(front_end: FrontEnd) -> None:
    outcome = await front_end.run("CREATE TABLE per_user (x int)", user_id="u1")
    assert outcome.refused and outcome.code == "sql_rejected", outcome
