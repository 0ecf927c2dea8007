"""COPY through the PostgreSQL wire port: FROM STDIN and TO STDOUT of the tenant's own
relations with the real clients (asyncpg, psycopg, psql's \\copy), everything else refused —
files and programs (the server's, not the tenant's), another tenant's or the control relations
(the guard first, PostgreSQL as the tenant's role in any case), rows for another company (row
security). A CopyFail or a client that leaves mid-COPY rolls the COPY back and the server
connection is reused."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire import codec
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture(scope="module")
async def login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    login = await port_login(tenants.a.tenant_id)
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS copied (id int PRIMARY KEY, note text)")
    finally:
        await conn.close()
    return login


@pytest.fixture
async def conn(login: PortLogin) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(login.dsn)
    await conn.execute("DELETE FROM copied")
    yield conn
    await conn.close()


async def test_asyncpg_copies_records_in_and_a_table_out(conn: asyncpg.Connection) -> None:
    records = [(i, f"note {i}") for i in range(1, 1001)]
    status = await conn.copy_records_to_table("copied", records=records, columns=["id", "note"])
    assert status == "COPY 1000"
    assert await conn.fetchval("SELECT count(*) FROM copied") == 1000
    out = io.BytesIO()
    status = await conn.copy_from_table("copied", output=out, format="csv")
    assert status == "COPY 1000"
    assert out.getvalue().splitlines()[0] == b"1,note 1"
    out = io.BytesIO()
    await conn.copy_from_query("SELECT id FROM copied WHERE id <= $1 ORDER BY id", 3, output=out)
    assert out.getvalue() == b"1\n2\n3\n"


async def test_asyncpg_copy_to_table_from_a_file_like_source(conn: asyncpg.Connection) -> None:
    source = io.BytesIO(b"".join(b"%d\tline %d\n" % (i, i) for i in range(5000)))
    assert await conn.copy_to_table("copied", source=source) == "COPY 5000"
    assert await conn.fetchval("SELECT max(id) FROM copied") == 4999


async def test_psycopg_copies_rows_in_and_out(login: PortLogin, conn: asyncpg.Connection) -> None:
    def run() -> list[tuple[object, ...]]:
        with psycopg.connect(login.dsn, autocommit=True) as pg, pg.cursor() as cur:
            with cur.copy("COPY copied (id, note) FROM STDIN") as copy:
                for i in range(10):
                    copy.write_row((i, f"p{i}"))
            with cur.copy("COPY (SELECT id, note FROM copied ORDER BY id) TO STDOUT") as copy:
                return list(copy.rows())

    rows = await asyncio.to_thread(run)
    assert len(rows) == 10 and rows[0] == ("0", "p0")


async def test_psycopg_copy_fail_rolls_back_and_the_connection_goes_on(
    login: PortLogin, conn: asyncpg.Connection
) -> None:
    def run() -> int:
        with psycopg.connect(login.dsn, autocommit=True) as pg, pg.cursor() as cur:
            with pytest.raises(RuntimeError):  # psycopg sends CopyFail, then re-raises
                with cur.copy("COPY copied (id, note) FROM STDIN") as copy:
                    copy.write_row((1, "never"))
                    raise RuntimeError("the client gives up")
            row = cur.execute("SELECT count(*) FROM copied").fetchone()
            assert row is not None
            return int(row[0])

    assert await asyncio.to_thread(run) == 0


async def test_psql_backslash_copy_in_and_out(
    login: PortLogin, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},psql {i}\n" for i in range(50)))
    target = tmp_path / "out.csv"
    env = {**os.environ, "PGPASSWORD": login.secret, "PGSSLMODE": "disable"}
    args = [
        "psql", "-X", "-v", "ON_ERROR_STOP=1",
        "-h", login.host, "-p", str(login.port), "-U", login.service, "-d", login.tenant_id,
        "-c", f"\\copy copied (id, note) FROM '{source}' WITH (FORMAT csv)",
        "-c", f"\\copy copied TO '{target}' WITH (FORMAT csv)",
    ]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert len(target.read_text().splitlines()) == 50


@pytest.mark.parametrize(
    "sql",
    [
        "COPY copied TO '/tmp/dbsvc-pgwire-copy'",
        "COPY copied FROM '/etc/passwd'",
        "COPY copied TO PROGRAM 'id'",
        "COPY copied FROM PROGRAM 'id'",
        "COPY (SELECT 1) TO '/tmp/dbsvc-pgwire-copy'",
    ],
)
async def test_copy_to_or_from_a_file_or_program_is_refused(
    conn: asyncpg.Connection, sql: str
) -> None:
    with pytest.raises(asyncpg.PostgresError) as info:
        await conn.execute(sql)
    assert info.value.sqlstate == "42501"
    assert info.value.server_source_function == "dbsvc:sql_rejected"


async def test_copy_of_another_tenants_relation_is_refused(
    conn: asyncpg.Connection, tenants: Tenants, core: Application
) -> None:
    b = tenants.b.schema_name
    control = core.settings.control_schema
    for sql in [
        f"COPY {b}.users TO STDOUT",
        f"COPY (SELECT * FROM {b}.users) TO STDOUT",
        f"COPY {b}.users FROM STDIN",
        f"COPY {control}.tenants TO STDOUT",
        f"COPY {control}.user_context_key TO STDOUT",
        "COPY pg_authid TO STDOUT",
        "COPY (SELECT pg_read_file('/etc/passwd')) TO STDOUT",
    ]:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(sql)
        assert info.value.sqlstate in ("42501", "42P01", "3F000"), (sql, info.value)


async def test_copy_out_of_a_shared_table_gives_only_the_tenants_rows(
    conn: asyncpg.Connection, tenants: Tenants
) -> None:
    out = io.BytesIO()
    await conn.copy_from_table("market_data", columns=["company_id"], output=out)
    assert set(out.getvalue().split()) == {tenants.a.tenant_id.encode()}


async def test_copy_into_a_table_under_row_security_is_refused_by_postgres(
    conn: asyncpg.Connection, tenants: Tenants
) -> None:
    # PostgreSQL has no COPY FROM under row-level security: the shared tables take INSERTs.
    with pytest.raises(asyncpg.FeatureNotSupportedError):
        await conn.copy_records_to_table(
            "market_data", records=[(tenants.b.tenant_id, "FORGED")],
            columns=["company_id", "symbol"],
        )  # fmt: skip
    assert await conn.fetchval("SELECT 1") == 1


async def test_a_read_only_service_cannot_copy_in(
    tenants: Tenants, port_login: PortLoginFactory, login: PortLogin
) -> None:
    reader = await port_login(tenants.a.tenant_id, (Scope.READ,))
    conn = await asyncpg.connect(reader.dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.copy_records_to_table("copied", records=[(9, "x")])
        assert info.value.server_source_function == "dbsvc:permission_denied"
        assert (await conn.copy_from_table("copied", output=io.BytesIO())).startswith("COPY")
    finally:
        await conn.close()


async def test_a_client_that_leaves_mid_copy_is_rolled_back_and_its_server_reused(
    login: PortLogin, pgwire: PgWireServer, conn: asyncpg.Connection, core: Application,
    tenants: Tenants,
) -> None:  # fmt: skip
    raw = await RawClient.open(pgwire)
    assert (await raw.login(login))[-1][:1] == b"Z"
    raw.send(b"Q", codec.cstring("COPY copied (id, note) FROM STDIN"))
    kind, _ = await raw.read()
    assert kind == b"G"
    for i in range(100):
        raw.send(b"d", f"{i}\thalf\n".encode())
    await raw.writer.drain()
    raw.close()
    for _ in range(50):  # the port fails the COPY on the server and takes the connection back
        busy = await core.owner_pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state <> 'idle'",
            tenants.a.role_name,
        )
        if busy == 0:
            break
        await asyncio.sleep(0.1)
    assert busy == 0
    assert await conn.fetchval("SELECT count(*) FROM copied") == 0
    # The pool's connections all still work.
    for _ in range(6):
        assert await conn.fetchval("SELECT 1") == 1


async def test_a_copy_out_with_a_user_id_gives_that_users_rows_only(
    login: PortLogin, core: Application, tenants: Tenants
) -> None:
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, user_id, symbol)"
        " VALUES ($1, 'cu1', 'CPYU1'), ($1, 'cu2', 'CPYU2')",
        tenants.a.tenant_id,
    )
    conn = await asyncpg.connect(login.dsn, server_settings={"dbsvc.user_id": "cu1"})
    try:
        out = io.BytesIO()
        await conn.copy_from_query(
            "SELECT symbol FROM market_data WHERE symbol LIKE 'CPYU%'", output=out
        )
        assert out.getvalue() == b"CPYU1\n"
    finally:
        await conn.close()
