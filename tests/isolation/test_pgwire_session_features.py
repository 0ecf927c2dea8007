"""Session-only features through the PostgreSQL wire port, which pools transactions: each
is refused with SQLSTATE 0A000 (feature_not_supported) and the stable code sql_rejected, and
the connection goes on; advisory locks stay refused by the SQL guard (42501) as on every front
end. The README's table lists the same. A pooled driver's reset statements (RESET ALL, DISCARD,
UNLISTEN, CLOSE ALL, pg_advisory_unlock_all()) are answered by the port: test_pgwire_resets.py."""

from __future__ import annotations

import asyncpg
import pytest

from tests.fix_pgwire import PortLogin, PortLoginFactory
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")

SESSION_ONLY = {
    "listen": "LISTEN dbsvc_events",
    "with hold cursor": "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
    "temporary table": "CREATE TEMP TABLE scratch (x int)",
    "temporary table as": "CREATE TEMPORARY TABLE scratch AS SELECT 1 AS x",
    "temporary view": "CREATE TEMP VIEW scratch AS SELECT 1 AS x",
    "temporary sequence": "CREATE TEMP SEQUENCE scratch",
    "select into temp": "SELECT 1 AS x INTO TEMP scratch",
    "prepare": "PREPARE p AS SELECT 1",
    "execute": "EXECUTE p",
}


@pytest.fixture(scope="module")
async def login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    return await port_login(tenants.a.tenant_id)


@pytest.mark.parametrize("sql", SESSION_ONLY.values(), ids=SESSION_ONLY.keys())
@pytest.mark.parametrize("block", [False, True], ids=["autocommit", "in a transaction"])
async def test_session_only_features_are_refused_clearly(
    login: PortLogin, sql: str, block: bool
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        transaction = conn.transaction()
        if block:
            await transaction.start()
        with pytest.raises(asyncpg.FeatureNotSupportedError) as info:
            await conn.execute(sql)
        assert info.value.server_source_function == "dbsvc:sql_rejected"
        assert "pools transactions" in str(info.value)
        if block:
            await transaction.rollback()
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "SELECT pg_advisory_lock_shared(1)",
        "SELECT pg_advisory_xact_lock(1)",
        "NOTIFY dbsvc_events",
        "SELECT pg_notify('dbsvc_events', 'x')",
    ],
)
async def test_advisory_locks_and_notify_stay_refused_by_the_guard(
    login: PortLogin, sql: str
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(sql)
        assert info.value.sqlstate == "42501"
        assert info.value.server_source_function == "dbsvc:sql_rejected"
    finally:
        await conn.close()


async def test_a_cursor_without_hold_is_refused_by_the_guard_as_elsewhere(
    login: PortLogin,
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        async with conn.transaction():
            with pytest.raises(asyncpg.PostgresError) as info:
                await conn.execute("DECLARE c CURSOR FOR SELECT 1")
            assert info.value.sqlstate == "42501"
    finally:
        await conn.close()
