"""Drivers' own catalog lookups through the PostgreSQL wire port: psycopg's ``TypeInfo.fetch``
(SQLAlchemy's psycopg dialect runs it for ``hstore`` at connect time) reads ``pg_type``, which
the guard refuses (it names every tenant's types, tables' row types included). The port runs
instead the same query limited to pg_catalog's types and the tenant's own schema: a type of
another tenant, however it is named, is answered as missing, and the limited text is special
only with a bound parameter, exactly as psycopg sends it."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from psycopg.types import TypeInfo

from tests.fix_pgwire import PortLogin, PortLoginFactory
from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


@pytest.fixture(scope="module")
async def login(tenants: Tenants, port_login: PortLoginFactory) -> PortLogin:
    login = await port_login(tenants.a.tenant_id)

    def create() -> None:
        with psycopg.connect(login.dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS own_lookup (x int)")

    await asyncio.to_thread(create)
    return login


def _fetch(login: PortLogin, name: str) -> tuple[str, str] | None:
    with psycopg.connect(login.dsn, autocommit=True) as conn:
        info = TypeInfo.fetch(conn, name)
        return None if info is None else (info.name, info.regtype)


async def test_typeinfo_finds_builtin_and_own_types(login: PortLogin, tenants: Tenants) -> None:
    assert await asyncio.to_thread(_fetch, login, "int4") == ("int4", "integer")
    assert await asyncio.to_thread(_fetch, login, "integer") == ("int4", "integer")
    for name in ("own_lookup", f"{tenants.a.schema_name}.own_lookup"):
        own = await asyncio.to_thread(_fetch, login, name)
        assert own is not None and own[0] == "own_lookup", name


async def test_typeinfo_of_another_tenants_type_is_answered_as_missing(
    login: PortLogin, tenants: Tenants
) -> None:
    victim = tenants.b.schema_name
    names = (f"{victim}.users", f'"{victim}".users', f"{victim}.users[]", "hstore")
    for name in names:
        assert await asyncio.to_thread(_fetch, login, name) is None, name


@pytest.mark.parametrize(
    "sql",
    [
        # The lookup with its value in the text, or anything added: the guard's, refused.
        "SELECT typname AS name, oid, typarray AS array_oid, oid::regtype::text AS regtype,"
        " typdelim AS delimiter FROM pg_type t WHERE t.oid = to_regtype('users') ORDER BY t.oid",
        "SELECT typname AS name, oid, typarray AS array_oid, oid::regtype::text AS regtype,"
        " typdelim AS delimiter FROM pg_type t WHERE t.oid = to_regtype(%s) OR true"
        " ORDER BY t.oid",
        "SELECT typname FROM pg_type",
    ],
)
async def test_other_pg_type_queries_stay_refused(login: PortLogin, sql: str) -> None:
    def run() -> str | None:
        with psycopg.connect(login.dsn, autocommit=True) as conn:
            try:
                conn.execute(sql, ("users",) if "%s" in sql else None)
            except psycopg.Error as exc:
                return exc.sqlstate
            return None

    assert await asyncio.to_thread(run) == "42501"
