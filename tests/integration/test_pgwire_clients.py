"""Real PostgreSQL clients through the wire port: asyncpg (extended protocol, named
statements), psql (simple protocol), transactions pooled on the tenant's own role."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
from pathlib import Path

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire.server import PgWireServer
from database_service.tenancy import TenantRecord
from tests.fix_pgwire import PortLogin, PortLoginFactory, RawClient, sqlstates


@pytest.fixture(scope="module")
async def tenant(core: Application) -> TenantRecord:
    import secrets

    return await core.tenants.create(f"pgw_{secrets.token_hex(4)}")


@pytest.fixture(scope="module")
async def login(tenant: TenantRecord, port_login: PortLoginFactory) -> PortLogin:
    login = await port_login(tenant.tenant_id)
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute(
            "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric)"
        )
        await conn.execute("INSERT INTO items VALUES (1, 'one', 1.5), (2, 'two', 2.5)")
    finally:
        await conn.close()
    return login


async def test_asyncpg_fetches_with_parameters_through_named_statements(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        rows = await conn.fetch("SELECT id, name FROM items WHERE id >= $1 ORDER BY id", 1)
        assert [tuple(r) for r in rows] == [(1, "one"), (2, "two")]
        row = await conn.fetchrow("SELECT name, price FROM items WHERE id = $1", 2)
        assert row is not None and row["name"] == "two" and str(row["price"]) == "2.5"
        # The same statement again: asyncpg reuses its named statement, prepared on whichever
        # server connection the port lends this time.
        for _ in range(5):
            assert await conn.fetchval("SELECT name FROM items WHERE id = $1", 1) == "one"
    finally:
        await conn.close()


async def test_asyncpg_transaction_commits_and_rolls_back(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO items VALUES ($1, $2, $3)", 10, "ten", 10)
        with pytest.raises(RuntimeError):
            async with conn.transaction():
                await conn.execute("INSERT INTO items VALUES ($1, $2, $3)", 11, "eleven", 11)
                raise RuntimeError("roll back")
        names = await conn.fetch("SELECT name FROM items WHERE id >= 10 ORDER BY id")
        assert [r["name"] for r in names] == ["ten"]
        await conn.execute("DELETE FROM items WHERE id >= 10")
    finally:
        await conn.close()


async def test_errors_come_back_with_their_sqlstate(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO items VALUES (1, 'dup', 0)")
        with pytest.raises(asyncpg.UndefinedTableError):
            await conn.fetch("SELECT * FROM no_such_table")
        assert await conn.fetchval("SELECT count(*) FROM items") == 2  # still usable
    finally:
        await conn.close()


async def test_many_clients_share_a_small_pool(login: PortLogin, pgwire: PgWireServer) -> None:
    conns = [await asyncpg.connect(login.dsn) for _ in range(12)]
    try:

        async def work(conn: asyncpg.Connection) -> int:
            total = 0
            for i in range(10):
                total += await conn.fetchval("SELECT id FROM items WHERE id = $1", 1 + i % 2)
            return total

        assert await asyncio.gather(*(work(c) for c in conns)) == [15] * 12
        assert all(f.active + f.idle <= f.max_size for f in pgwire.pools.figures())
    finally:
        for conn in conns:
            await conn.close()


async def test_a_read_only_service_runs_read_only_transactions(
    tenant: TenantRecord, login: PortLogin, port_login: PortLoginFactory
) -> None:
    reader = await port_login(tenant.tenant_id, scopes=(Scope.READ,))
    conn = await asyncpg.connect(reader.dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM items") == 2
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("INSERT INTO items VALUES (5, 'five', 5)")
        # A write hidden where the guard sees a read still meets PostgreSQL's read-only rule.
        assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
    finally:
        await conn.close()
    writer = await asyncpg.connect(login.dsn)
    try:
        assert await writer.fetchval("SHOW default_transaction_read_only") == "off"
    finally:
        await writer.close()


async def test_cancel_reaches_the_right_backend(login: PortLogin) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        task = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(5)"))
        await asyncio.sleep(0.3)
        task.cancel()  # asyncpg sends a CancelRequest with the port's key
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


async def test_psql_runs_simple_queries(login: PortLogin) -> None:
    env = {**os.environ, "PGPASSWORD": login.secret, "PGSSLMODE": "disable"}
    args = [
        "psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", login.host, "-p", str(login.port), "-U", login.service, "-d", login.tenant_id,
        "-c", "SELECT name FROM items ORDER BY id",
        "-c", "BEGIN", "-c", "UPDATE items SET price = price + 1 WHERE id = 1",
        "-c", "ROLLBACK", "-c", "SELECT price FROM items WHERE id = 1",
    ]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["one", "two", "BEGIN", "UPDATE", "1", "ROLLBACK", "1.5"]


async def test_the_health_document_and_metrics_show_the_port(
    core: Application, login: PortLogin, pgwire: PgWireServer
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        # The health document carries the section of the process's first listener (other
        # tests of the session may have started one before this fixture's): check it is there,
        # and this listener's own section.
        assert core.health.sections["pgwire"]()["status"] == "ok"
        section = pgwire.health()
        assert section["status"] == "ok" and section["port"] == pgwire.port
        assert section["clients"] >= 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SET ROLE postgres")
    finally:
        await conn.close()
    assert (core.metrics.registry.get_sample_value("dbsvc_pgwire_transactions_total") or 0) > 0
    refused = core.metrics.registry.get_sample_value(
        "dbsvc_pgwire_refused_statements_total", {"sqlstate": "42501"}
    )
    assert refused is not None and refused >= 1
    shown = pgwire.show()
    pools = shown["pools"]
    assert isinstance(pools, list) and any(p["database"] == login.tenant_id for p in pools)


async def test_serve_starts_the_port_only_when_configured(core: Application) -> None:
    from database_service.pgwire import listening

    async with listening(core) as off:
        assert off is None  # DBSVC_PGWIRE_PORT unset
    core.settings.pgwire_port = 0
    try:
        async with listening(core) as on:
            assert on is not None and on.port > 0
            reader, writer = await asyncio.open_connection("127.0.0.1", on.port)
            writer.write(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest, no certificate
            assert await reader.readexactly(1) == b"N"
            writer.close()
    finally:
        core.settings.pgwire_port = None


@pytest.fixture(scope="module")
async def pgbench_tables(login: PortLogin) -> None:
    """pgbench's tables at scale 1, made through the port (its COPY-based -i is not served)."""
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int)")
        await conn.execute("INSERT INTO pgbench_branches VALUES (1, 0)")
        await conn.execute(
            "CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int,"
            " filler char(84))"
        )
        await conn.execute(
            "INSERT INTO pgbench_accounts SELECT g, 1, 0, '' FROM generate_series(1, 100000) g"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
async def test_pgbench_select_only_runs_in_every_query_mode(
    login: PortLogin, pgbench_tables: None, mode: str
) -> None:
    env = {**os.environ, "PGPASSWORD": login.secret, "PGSSLMODE": "disable"}
    args = [
        "pgbench", "-S", "-n", "-M", mode, "-c", "4", "-t", "50",
        "-h", login.host, "-p", str(login.port), "-U", login.service, login.tenant_id,
    ]  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "number of transactions actually processed: 200/200" in result.stdout
    assert "number of failed transactions: 0" in result.stdout or "failed" not in result.stdout


async def test_the_unnamed_statement_follows_its_client_to_another_server_connection(
    login: PortLogin,
) -> None:
    """Parse of the unnamed statement in one transaction, Bind in the next (as drivers without
    named statements do): the port parses it again wherever the Bind runs."""
    client = RawClient(*await asyncio.open_connection(login.host, login.port))
    try:
        await client.login(login)
        client.send(b"P", b"\x00" + b"SELECT name FROM items WHERE id = $1\x00" + b"\x00\x00")
        client.send(b"S")
        assert sqlstates(await client.until_ready()) == []
        busy = await asyncpg.connect(login.dsn)  # another client takes a server connection
        try:
            async with busy.transaction():
                await busy.execute("SELECT 1")
                client.send(
                    b"B",
                    b"\x00\x00" + b"\x00\x00" + b"\x00\x01" + b"\x00\x00\x00\x011" + b"\x00\x00",
                )
                client.send(b"E", b"\x00\x00\x00\x00\x00")
                client.send(b"S")
                answer = await client.until_ready()
        finally:
            await busy.close()
        assert sqlstates(answer) == []
        rows = [payload for kind, payload in answer if kind == b"D"]
        assert len(rows) == 1 and rows[0].endswith(b"one")
    finally:
        client.close()


async def test_psycopg_sync_uses_server_side_prepared_statements(login: PortLogin) -> None:
    # The port runs on this test's event loop: the blocking driver runs on a thread.
    await asyncio.to_thread(_psycopg_sync, login)


def _psycopg_sync(login: PortLogin) -> None:
    import psycopg

    with psycopg.connect(login.dsn, autocommit=False) as conn:
        for i in range(4):  # prepare=True: a named statement from the first execution
            row = conn.execute(
                "SELECT name FROM items WHERE id = %s", (1 + i % 2,), prepare=True
            ).fetchone()
            assert row == ("one" if i % 2 == 0 else "two",)
        conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (20, "twenty", 20))
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM items WHERE id = 20").fetchone() == (0,)


async def test_psycopg_async_runs_a_transaction(login: PortLogin) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(login.dsn) as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO items VALUES (%s, %s, %s)", (21, "x", 1))
        cursor = await conn.execute("SELECT name FROM items WHERE id = %s", (21,), prepare=True)
        assert await cursor.fetchone() == ("x",)
        await conn.execute("DELETE FROM items WHERE id = 21")
        await conn.commit()


async def test_sqlalchemy_async_engine_works_through_the_port(login: PortLogin) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    url = f"postgresql+asyncpg://{login.service}:{login.secret}@{login.host}:{login.port}/"
    engine = create_async_engine(url + login.tenant_id, connect_args={"ssl": False})
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text("SELECT name FROM items WHERE id = :id"), {"id": 2})
            assert result.scalar_one() == "two"
    finally:
        await engine.dispose()


async def test_tls_is_offered_when_the_service_has_a_certificate(
    core: Application, login: PortLogin, tmp_path: Path
) -> None:
    from database_service.tls import CertificateFiles, make_dev_certificates
    from database_service.tls.servers import http_ssl_context

    certs = make_dev_certificates(tmp_path / "tls")
    files = CertificateFiles(certs.server_cert, certs.server_key)
    server = PgWireServer(core, host="127.0.0.1", port=0, ssl_context=http_ssl_context(files))
    await server.start()
    try:
        context = ssl.create_default_context(cafile=str(certs.ca_cert))
        conn = await asyncpg.connect(
            host="127.0.0.1", port=server.port, user=login.service, password=login.secret,
            database=login.tenant_id, ssl=context,
        )  # fmt: skip
        try:
            assert await conn.fetchval("SELECT name FROM items WHERE id = 1") == "one"
            assert conn.get_server_pid() != 0
        finally:
            await conn.close()
    finally:
        await server.close()
