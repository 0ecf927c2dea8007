"""The wire port's compiled relay (pgwire/relay.py, native/wire) runs idle clients' plain
statements without Python: every attack here runs against a port with the relay and one
without, and must end the same way. What the relay could get wrong that Python does not: a
shape allowed for one class of session serving another (another tenant, a read-only
service), settings of a server connection the previous client left behind, statements that
go unaudited, cancels and disconnects of statements Python never saw."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.pgwire.server import PgWireServer
from tests.fix_pgwire import PortLogin, RawClient, sqlstates
from tests.isolation.fix_attack import SECRET, Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

_REPEAT = 30  # enough for the relay to have every shape after its first text


@pytest.fixture(scope="module", params=["relay", "python"])
async def port(request: pytest.FixtureRequest, core: Application) -> AsyncIterator[PgWireServer]:
    server = PgWireServer(
        core, host="127.0.0.1", port=0, max_per_tenant=2, relay=request.param == "relay"
    )
    await server.start()
    if request.param == "relay":
        assert server.relay is not None, "dbsvc_wire is not installed (make install builds it)"
    yield server
    await server.close()


async def _login(
    core: Application, port: PgWireServer, tenant_id: str, scopes: tuple[Scope, ...]
) -> PortLogin:
    name = f"relay-{time.monotonic_ns()}"
    _, secret = await core.services.register(name, tenants=[tenant_id], scopes=scopes)
    assert secret is not None
    return PortLogin("127.0.0.1", port.port, name, secret, tenant_id)


async def _raw(port: PgWireServer, login: PortLogin) -> RawClient:
    return await RawClient.logged_in(port, login)


async def _writer_and_reader(
    core: Application, port: PgWireServer, tenants: Tenants
) -> tuple[RawClient, RawClient]:
    """Two clients of tenant A: a service that may write and a read-only one."""
    writer_login = await _login(core, port, tenants.a.tenant_id, (Scope.READ, Scope.WRITE))
    reader_login = await _login(core, port, tenants.a.tenant_id, (Scope.READ,))
    return await _raw(port, writer_login), await _raw(port, reader_login)


def _rows(messages: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [payload for kind, payload in messages if kind == b"D"]


async def test_relayed_reads_see_only_the_tenants_rows_and_never_the_victims(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ, Scope.WRITE))
    raw = await _raw(port, login)
    try:
        for i in range(_REPEAT):
            symbol = ("USDJPY", "EURUSD", "GBPUSD")[i % 3]
            answer = await raw.query(f"SELECT symbol FROM market_data WHERE symbol = '{symbol}'")
            assert sqlstates(answer) == []
            assert len(_rows(answer)) == (1 if symbol == "USDJPY" else 0)
            hostile = await raw.query(
                f"SELECT email FROM {tenants.b.schema_name}.users WHERE user_id = 'b-user{i}'"
            )
            assert sqlstates(hostile) == ["42501"]
            assert SECRET.encode() not in b"".join(p for _, p in hostile)
        who = await raw.query("SELECT current_user")
        assert _rows(who) and tenants.a.role_name.encode() in _rows(who)[0]
        await asyncio.sleep(0.1)  # the relay's events are drained every 20 ms
        before = port.relay.relayed if port.relay is not None else 0
        for i in range(_REPEAT):
            answer = await raw.query(f"SELECT symbol FROM market_data WHERE user_id = 'u{i}'")
            assert sqlstates(answer) == [] and _rows(answer) == []
    finally:
        raw.close()
    if port.relay is not None:
        await asyncio.sleep(0.1)  # the relay's events are drained every 20 ms
        # After a hand-back the session reads a few messages in Python first (backing off).
        assert port.relay.relayed - before >= _REPEAT // 2


async def test_a_shape_a_writer_runs_is_decided_again_for_a_read_only_service(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    writer, reader = await _writer_and_reader(core, port, tenants)
    update = "UPDATE market_data SET symbol = 'USDJPY' WHERE symbol = '{}'"
    try:
        for i in range(_REPEAT):
            assert sqlstates(await writer.query(update.format(f"W{i}"))) == []
            refused = await reader.query(update.format(f"R{i}"))
            assert sqlstates(refused) == ["42501"], refused
    finally:
        writer.close()
        reader.close()


async def test_a_read_only_service_is_read_only_on_every_server_connection_it_is_lent(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    """The pool has two connections and a writer uses them in turn with the reader: each
    statement of the reader runs read-only, whatever the writer left on the connection."""
    writer, reader = await _writer_and_reader(core, port, tenants)
    probe = "SELECT current_setting('transaction_read_only') WHERE 1 = {}"
    try:
        for i in range(_REPEAT):
            mine = _rows(await writer.query(probe.format(1 + i % 2)))
            theirs = _rows(await reader.query(probe.format(1 + i % 2)))
            if i % 2 == 0:
                assert mine and mine[0].endswith(b"off"), mine
                assert theirs and theirs[0].endswith(b"on"), theirs
    finally:
        writer.close()
        reader.close()


async def test_two_tenants_sending_the_same_texts_each_see_their_own_rows(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    a = await _raw(port, await _login(core, port, tenants.a.tenant_id, (Scope.READ,)))
    b = await _raw(port, await _login(core, port, tenants.b.tenant_id, (Scope.READ,)))
    text = "SELECT symbol, company_id FROM market_data WHERE length(symbol) > {} ORDER BY 1"
    try:
        for i in range(_REPEAT):
            mine = _rows(await a.query(text.format(i % 3)))
            theirs = _rows(await b.query(text.format(i % 3)))
            assert all(tenants.a.tenant_id.encode() in row for row in mine)
            assert all(tenants.b.tenant_id.encode() in row for row in theirs)
            assert len(mine) == 1 and len(theirs) == 2
    finally:
        a.close()
        b.close()


async def test_relayed_statements_are_audited(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ,))
    raw = await _raw(port, login)
    try:
        for i in range(_REPEAT):
            assert sqlstates(await raw.query(f"SELECT {i} + 1")) == []
        assert sqlstates(await raw.query("SELECT 1/0 + 1")) == ["22012"]
    finally:
        raw.close()
    await asyncio.sleep(0.1)  # the relay's events are drained every 20 ms
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT outcome, code, detail FROM {core.settings.control_schema}.audit_log"
        " WHERE service = $1 AND action = 'pgwire.query'",
        login.service,
    )
    # Statements the relay ran are booked a group at a time: "N statements" in the detail.
    ok = [r for r in rows if r["outcome"] == "ok"]
    assert sum(int(r["detail"].split()[0]) if r["detail"] else 1 for r in ok) == _REPEAT
    errors = [r for r in rows if r["outcome"] == "error"]
    assert len(errors) == 1 and "division by zero" in errors[0]["detail"]


async def test_a_relayed_statement_is_cancelled_by_its_client_and_the_session_goes_on(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ,))
    conn = await asyncpg.connect(login.dsn)
    try:
        for i in range(_REPEAT):  # the shape of the sleep is the relay's after the first
            await conn.execute(f"SELECT pg_sleep(0.00{i % 3})")
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.execute("SELECT pg_sleep(20)"), 0.5)
        assert await asyncio.wait_for(conn.fetchval("SELECT 41 + 1"), 10) == 42
        assert time.monotonic() - started < 10
    finally:
        await conn.close()


async def test_a_client_gone_mid_statement_leaves_connections_others_can_use(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ,))
    for _ in range(3):  # more than the pool's two connections
        raw = await _raw(port, login)
        for i in range(3):
            await raw.query(f"SELECT pg_sleep(0.00{i})")
        raw.send(b"Q", b"SELECT pg_sleep(0.3)\x00")
        await raw.writer.drain()
        await asyncio.sleep(0.05)
        raw.close()
    other = await _raw(port, login)
    try:
        for i in range(_REPEAT):
            answer = await asyncio.wait_for(other.query(f"SELECT {i} * 2"), 10)
            assert sqlstates(answer) == [] and _rows(answer)
            status = [p for k, p in answer if k == b"Z"]
            assert status == [b"I"]
    finally:
        other.close()


async def test_a_transaction_a_relayed_text_opens_is_kept_on_its_connection(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    """A plain statement whose text also begins a transaction: the session keeps its server
    connection (Python takes it from the relay) until the client ends it."""
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ, Scope.WRITE))
    raw = await _raw(port, login)
    try:
        for i in range(3):
            await raw.query(f"SELECT {i}")
        answer = await raw.query("SELECT 7; BEGIN")
        status = [p for k, p in answer if k == b"Z"]
        if sqlstates(answer):
            assert status == [b"I"]  # refused as a whole by the guard: nothing to keep
            return
        assert status == [b"T"]
        pid = _rows(await raw.query("SELECT pg_backend_pid()"))
        assert _rows(await raw.query("SELECT pg_backend_pid()")) == pid
        assert [p for k, p in await raw.query("COMMIT") if k == b"Z"] == [b"I"]
    finally:
        raw.close()


async def test_prepared_statements_run_by_the_relay_on_any_connection_see_own_rows(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    """Bind/Execute/Sync of a statement prepared through Python: the relay prepares it on
    whichever connection it lends (hiding that ParseComplete) and binds the server's name."""
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ,))
    first, second = await asyncpg.connect(login.dsn), await asyncpg.connect(login.dsn)
    query = "SELECT symbol, company_id FROM market_data WHERE symbol = $1"
    try:
        await asyncio.sleep(0.05)
        before = port.relay.relayed if port.relay is not None else 0
        for i in range(_REPEAT):
            for conn in (first, second):
                symbol = ("USDJPY", "EURUSD")[i % 2]
                rows = await conn.fetch(query, symbol)
                assert [r["symbol"] for r in rows] == (["USDJPY"] if i % 2 == 0 else [])
                assert all(r["company_id"] == tenants.a.tenant_id for r in rows)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await first.fetch("UPDATE market_data SET symbol = $1 WHERE symbol = $2", "x", "y")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await second.fetch(f"SELECT email FROM {tenants.b.schema_name}.users WHERE 1 = $1", 1)
    finally:
        await first.close()
        await second.close()
    if port.relay is not None:
        await asyncio.sleep(0.1)  # the relay's events are drained every 20 ms
        assert port.relay.relayed - before >= _REPEAT


async def test_a_large_result_comes_whole_and_the_session_goes_on(
    core: Application, port: PgWireServer, tenants: Tenants
) -> None:
    """Several MB of rows: more than one read of the server's socket and more than the
    client's socket takes at once, relayed in order."""
    login = await _login(core, port, tenants.a.tenant_id, (Scope.READ,))
    raw = await _raw(port, login)
    try:
        for i in range(4):
            answer = await raw.query(
                f"SELECT repeat('x', 1000) || g FROM generate_series(1, {6000 + i}) g"
            )
            rows = _rows(answer)
            assert len(rows) == 6000 + i
            assert rows[-1].endswith(str(6000 + i).encode())
            assert [p for k, p in answer if k == b"Z"] == [b"I"]
        assert _rows(await raw.query("SELECT 1 + 1"))
    finally:
        raw.close()
