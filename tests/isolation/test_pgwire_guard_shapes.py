"""The port classifies statements by shape (``SqlGuard.classify_shape``): every ``-M simple``
statement carries its values in its text, and texts that differ only in their constants share
one verdict. Attacks: warm the verdict of a shape with an accepted constant, then send the
same shape with a constant that names another tenant's object or a setting of the session.
Each must be refused exactly as on a guard that never saw the first."""

from __future__ import annotations

import contextlib

import asyncpg
import pytest

from tests.fix_pgwire import PortLogin, PortLoginFactory
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture(scope="module")
async def login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    login = await port_login(tenants.a.tenant_id)
    conn = await asyncpg.connect(login.dsn)
    try:
        await conn.execute("CREATE SEQUENCE IF NOT EXISTS shape_seq")
    finally:
        await conn.close()
    return login


def attacks(victim: str) -> dict[str, tuple[str, str]]:
    return {
        "regclass": ("SELECT 'users'::regclass::oid", f"SELECT '{victim}.users'::regclass::oid"),
        "regclass, quoted": (
            "SELECT 'users'::regclass::oid",
            f"SELECT '\"{victim}\".users'::regclass::oid",
        ),
        "regtype": ("SELECT 'int4'::regtype::oid", f"SELECT '{victim}.users'::regtype::oid"),
        "sequence": ("SELECT nextval('shape_seq')", f"SELECT nextval('{victim}.users_id_seq')"),
        "oid as a name": ("SELECT currval('shape_seq')", "SELECT currval('1259')"),
        "text search configuration": (
            "SELECT to_tsvector('english', 'a b')",
            f"SELECT to_tsvector('{victim}.cfg', 'a b')",
        ),
        "function name in a string": (
            "SELECT 'pi'::regproc::oid",
            f"SELECT '{victim}.enter_user'::regproc::oid",
        ),
    }


ATTACKS = list(attacks("victim"))


@pytest.mark.parametrize("attack", ATTACKS)
async def test_a_constant_cannot_ride_on_the_verdict_of_another_of_its_shape(
    login: PortLogin, tenants: Tenants, attack: str
) -> None:
    benign, hostile = attacks(tenants.b.schema_name)[attack]
    conn = await asyncpg.connect(login.dsn)
    try:
        for _ in range(2):
            await conn.execute(benign)  # accepted: warms the shape's verdict
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await conn.execute(hostile)
            assert info.value.sqlstate == "42501"
            assert tenants.b.schema_name not in str(info.value.detail or "")
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "benign, hostile",
    [
        ("SET application_name = 'a'", "SET role = 'postgres'"),
        ("SET TimeZone = 'UTC'", "SET session_authorization = 'postgres'"),
        (
            "SELECT current_setting('application_name')",
            "SELECT set_config('role', 'postgres', false)",
        ),
        (
            "SELECT set_config('application_name', 'x', false)",
            "SELECT set_config('dbsvc.user_id', 'u2', false)",
        ),
    ],
)
async def test_settings_named_by_value_keep_their_own_verdicts(
    login: PortLogin, tenants: Tenants, benign: str, hostile: str
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        with contextlib.suppress(asyncpg.PostgresError):  # refused or not, it warmed its shape
            await conn.execute(benign)
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.execute(hostile)
        assert info.value.sqlstate == "42501"
        assert await conn.fetchval("SELECT current_user") == tenants.a.role_name
    finally:
        await conn.close()


async def test_values_of_a_plain_read_share_the_verdict_and_see_only_own_rows(
    login: PortLogin, tenants: Tenants
) -> None:
    conn = await asyncpg.connect(login.dsn)
    try:
        for symbol in ("USDJPY", "EURUSD", "GBPUSD", "x' OR 'a' = 'a"):
            rows = await conn.fetch(
                "SELECT symbol FROM market_data WHERE symbol = '" + symbol.replace("'", "''") + "'"
            )
            assert [r["symbol"] for r in rows] == (["USDJPY"] if symbol == "USDJPY" else [])
    finally:
        await conn.close()
