"""Systematic, not from memory: the catalog is enumerated and every dangerous function found.

Three probes run as tenant A's own login, straight to PostgreSQL (no service, no guard), over
every function A may execute that takes a string:

- **SQL runners**: each string argument in turn is given ``SELECT <probe>()``, a function of A's
  that raises a marker; a function whose call raises the marker planned and ran that SQL.
- **Name oracles**: each string argument in turn is given the name of an object of B's (its
  schema, its table, its role) and the name of one that does not exist; a function that errors
  for one and not the other, or returns NULL for one and not the other, tells A whether B's
  object exists.
- **OID alias types**: every ``reg*`` type of pg_type, cast from a number or a foreign name.

Then every function and cast found is sent as A through every front end, and each must be
refused. The allowlist the guard uses (``sqlguard.functions``) is checked against the same
catalog, and every view of information_schema is read as A and must show nothing of B's.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from database_service.app import Application
from database_service.sqlguard import ALLOWED_FUNCTIONS, NAME_ARGUMENTS, NAME_TYPES
from tests.fix_pg import PgCluster
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")

MARKER = "DBSVC-PROBE-RAN"
STRING_TYPES = {"text", "character varying", "cstring", "name", '"char"', "character"}
# A value of each type for the arguments not being probed (others are NULL).
DEFAULTS = {
    "smallint": "0", "integer": "0", "bigint": "0", "oid": "0", "real": "0",
    "double precision": "0", "numeric": "0", "boolean": "false", "bytea": "''::bytea",
    "tsquery": "'a'::tsquery", "tsvector": "'a'::tsvector", "jsonb": "'{}'::jsonb",
    "json": "'{}'::json", "interval": "'0'::interval",
    "timestamp with time zone": "now()", "timestamp without time zone": "localtimestamp",
    "date": "current_date", "text[]": "'{}'::text[]", "xml": "'<a/>'::xml",
}  # fmt: skip


@dataclass(frozen=True)
class Function:
    schema: str
    name: str
    args: tuple[str, ...]

    def call(self, position: int, value: str) -> str:
        return f"SELECT {self.expression(position, value)}"

    def expression(self, position: int, value: str) -> str:
        values = []
        for index, arg in enumerate(self.args):
            if index == position:
                values.append(f"{value}::{arg}" if arg != '"char"' else value)
            elif arg in STRING_TYPES:
                values.append(f"''::{arg}")
            else:
                values.append(f"{DEFAULTS.get(arg, 'NULL')}::{arg}")
        return f'"{self.schema}"."{self.name}"({", ".join(values)})'

    @property
    def label(self) -> str:
        return f"{self.schema}.{self.name}({', '.join(self.args)})"


def _shuffled(name: str, shift: int = 1) -> str:
    """The name with the characters after its first two rotated: same letters, no such object."""
    head, tail = name[:2], name[2:]
    return head + tail[shift:] + tail[:shift] if len(set(tail)) > 1 else head + tail + "x"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def _functions(conn: asyncpg.Connection) -> list[Function]:
    rows = await conn.fetch(
        "SELECT n.nspname, p.proname,"
        " array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t) AS args"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE p.prokind = 'f' AND has_function_privilege(p.oid, 'execute')"
        " AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname <> current_schema()"
        " AND NOT EXISTS (SELECT 1 FROM unnest(p.proargtypes) t JOIN pg_type ty ON ty.oid = t"
        "                 WHERE ty.typtype = 'p')"  # polymorphic or internal arguments
        " AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype,"
        "                          'internal'::regtype)"
        " ORDER BY 1, 2"
    )
    return [Function(r["nspname"], r["proname"], tuple(r["args"])) for r in rows]


async def _outcome(conn: asyncpg.Connection, expression: str) -> str:
    """'error:<sqlstate>', 'null' or 'value', inside a savepoint that is always rolled back."""
    try:
        async with conn.transaction():
            is_null = await conn.fetchval(f"SELECT ({expression}) IS NULL")
            raise _Rollback("value" if is_null is False else "null")
    except _Rollback as done:
        return str(done)
    except asyncpg.PostgresError as exc:
        if MARKER in str(exc):
            return "ran"
        return f"error:{exc.sqlstate}"
    except (asyncpg.InterfaceError, ArithmeticError, ValueError, UnicodeError) as exc:
        return f"client:{type(exc).__name__}"


class _Rollback(Exception):
    pass


async def _confirmed(
    core: Application, conn: asyncpg.Connection, function: Function, position: int, kind: str
) -> bool:
    """A candidate name oracle answers differently for the same text while an object of that
    name exists and after it is dropped (the owner makes one with a fresh name): the rotated
    names alone let a format string's letters pass for existence (``to_char(interval,
    text)`` on PostgreSQL 15, for some random tenant names)."""
    name = f"p_{secrets.token_hex(6)}"
    text = {
        "schema": name,
        "table": f"{name}.users",
        "role": name,
        "query": f"SELECT * FROM {name}.users",
    }[kind]
    expression = function.expression(position, _literal(text))
    if kind == "role":
        await core.owner_pool.execute(f'CREATE ROLE "{name}"')
    else:
        await core.owner_pool.execute(f'CREATE SCHEMA "{name}"')
        await core.owner_pool.execute(f'CREATE TABLE "{name}".users (id int)')
    try:
        present = await _outcome(conn, expression)
    finally:
        if kind == "role":
            await core.owner_pool.execute(f'DROP ROLE "{name}"')
        else:
            await core.owner_pool.execute(f'DROP SCHEMA "{name}" CASCADE')
    return present != await _outcome(conn, expression)


@dataclass
class Findings:
    runners: list[tuple[Function, int]]
    oracles: list[tuple[Function, int, str]]
    probed: int


# Functions every role may execute by PostgreSQL's defaults (no initial privileges recorded)
# that the service's start-up hardening took from PUBLIC: the probes run them anyway, because
# the guard must refuse them also where the service has no superuser to revoke anything.
_REVOKED_BY_HARDENING = """
SELECT p.oid::regprocedure::text FROM pg_proc p
WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proacl IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM pg_init_privs i
                  WHERE i.classoid = 'pg_proc'::regclass AND i.objoid = p.oid)
  AND NOT EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0)
"""


@pytest.fixture(scope="module")
async def findings(
    core: Application, tenants: Tenants, pg_cluster: PgCluster
) -> AsyncIterator[Findings]:
    revoked = [r[0] for r in await core.owner_pool.fetch(_REVOKED_BY_HARDENING)]
    for function in revoked:
        await core.owner_pool.execute(
            f'GRANT EXECUTE ON FUNCTION {function} TO "{tenants.a.role_name}"'
        )
    conn = await asyncpg.connect(
        pg_cluster.dsn,
        user=tenants.a.role_name,
        password=core.secret_box.open(tenants.a.role_secret),
    )
    try:
        # Listed before the probes' time bound: reading the catalog is not what is measured (on
        # a loaded machine, beside another suite, it took over 2 s on PostgreSQL 15).
        functions = await _functions(conn)
        await conn.execute("SET statement_timeout = '2s'")
        await conn.execute(
            "CREATE OR REPLACE FUNCTION dbsvc_probe() RETURNS text LANGUAGE plpgsql AS"
            f" $$ BEGIN RAISE EXCEPTION '{MARKER}'; END $$"
        )
        probe = f"SELECT {tenants.a.schema_name}.dbsvc_probe()"
        b, b_role = tenants.b.schema_name, tenants.b.role_name
        # For each name of B's, two that do not exist with the same characters in another
        # order: a function whose answer differs between the two absent names reacts to the
        # text itself (to_char's format letters), not to existence, and is not counted.
        pairs = {
            "schema": (b, _shuffled(b), _shuffled(b, 2)),
            "table": (f"{b}.users", f"{b}.sersu", f"{b}.ssuer"),
            "role": (b_role, _shuffled(b_role), _shuffled(b_role, 2)),
            # SQL a function only plans (it names B's table, or a table that does not exist)
            "query": (
                f"SELECT * FROM {b}.users",
                f"SELECT * FROM {b}.sersu",
                f"SELECT * FROM {b}.ssuer",
            ),
        }
        runners: list[tuple[Function, int]] = []
        oracles: list[tuple[Function, int, str]] = []
        probed = 0
        for function in functions:
            for position, arg in enumerate(function.args):
                if arg not in STRING_TYPES:
                    continue
                probed += 1
                if await _outcome(conn, function.expression(position, _literal(probe))) == "ran":
                    runners.append((function, position))
                for kind, (exists, absent, other) in pairs.items():
                    answers = [
                        await _outcome(conn, function.expression(position, _literal(name)))
                        for name in (exists, absent, other)
                    ]
                    if (
                        answers[0] != answers[1]
                        and answers[1] == answers[2]
                        and await _confirmed(core, conn, function, position, kind)
                    ):
                        oracles.append((function, position, kind))
        yield Findings(runners, oracles, probed)
    finally:
        await conn.close()
        for function in revoked:
            await core.owner_pool.execute(
                f'REVOKE EXECUTE ON FUNCTION {function} FROM "{tenants.a.role_name}"'
            )


def test_the_probes_cover_the_catalog_and_find_the_known_cases(findings: Findings) -> None:
    runner_names = {f.name for f, _ in findings.runners}
    oracle_names = {f.name for f, _, _ in findings.oracles}
    print(
        f"\nprobed {findings.probed} string arguments: {len(runner_names)} SQL runners"
        f" ({', '.join(sorted(runner_names))}); {len(oracle_names)} name oracles"
    )
    assert findings.probed > 500
    assert {"ts_stat", "query_to_xml", "ts_rewrite"} <= runner_names
    assert {"to_regnamespace", "to_regrole", "has_table_privilege"} <= oracle_names


def test_nothing_the_guard_allows_runs_sql_or_resolves_names(findings: Findings) -> None:
    runners = {f.name for f, _ in findings.runners if f.schema == "pg_catalog"}
    oracles = {f.name for f, _, _ in findings.oracles if f.schema == "pg_catalog"}
    assert not runners & ALLOWED_FUNCTIONS
    assert not oracles & ALLOWED_FUNCTIONS


async def test_every_sql_runner_is_refused(
    front_end: FrontEnd, findings: Findings, tenants: Tenants
) -> None:
    for function, position in findings.runners:
        sql = function.call(position, _literal(f"SELECT * FROM {tenants.b.schema_name}.users"))
        for variant in (sql, sql.replace(f'"{function.schema}".', "")):
            outcome = await front_end.run(variant)
            assert outcome.refused, (function.label, outcome)
            assert outcome.code in {"sql_rejected", "undefined_function"}, (function.label, outcome)


async def test_every_name_oracle_is_refused(
    front_end: FrontEnd, findings: Findings, tenants: Tenants
) -> None:
    names = {
        "schema": tenants.b.schema_name,
        "table": f"{tenants.b.schema_name}.users",
        "role": tenants.b.role_name,
        "query": f"SELECT * FROM {tenants.b.schema_name}.users",
    }
    for function, position, kind in findings.oracles:
        sql = function.call(position, _literal(names[kind]))
        for variant in (sql, sql.replace(f'"{function.schema}".', "")):
            outcome = await front_end.run(variant)
            assert outcome.refused and outcome.code == "sql_rejected", (function.label, outcome)


async def _name_types(core: Application) -> list[str]:
    rows = await core.owner_pool.fetch(
        "SELECT typname FROM pg_type WHERE typnamespace = 'pg_catalog'::regnamespace"
        " AND typtype = 'b' AND typinput::text ~ '^reg.*in$' ORDER BY 1"
    )
    return [r["typname"] for r in rows]


async def test_every_oid_alias_type_is_known_to_the_guard(core: Application) -> None:
    assert set(await _name_types(core)) <= NAME_TYPES


async def test_no_oid_alias_type_turns_numbers_or_foreign_names_into_answers(
    front_end: FrontEnd, core: Application, tenants: Tenants
) -> None:
    b = tenants.b.schema_name
    for name in await _name_types(core):
        for sql in (
            f"SELECT g::oid::{name} FROM generate_series(1, 20000) g",
            f"SELECT CAST(16384 AS {name})",
            f"SELECT '16384'::{name}",
            f"SELECT '{b}.users'::{name}",
            f"SELECT 'x'::{name} FROM (SELECT '{b}.users'::pg_catalog.{name}) s",
            f"SELECT $1::{name}",
            f"SELECT ARRAY['users']::{name}[]",
            f"CREATE TABLE holds_{name} (x {name})",
        ):
            params = ("users",) if "$1" in sql else ()
            outcome = await front_end.run(sql, *params)
            assert outcome.refused and outcome.code == "sql_rejected", (sql, outcome)
            assert b not in outcome.message and tenants.b.role_name not in outcome.message


async def test_the_allowlist_checks_every_name_argument_and_has_no_definer(
    core: Application,
) -> None:
    rows = await core.owner_pool.fetch(
        "SELECT p.proname, p.pronargs, p.pronargdefaults, p.prosecdef,"
        " array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t) AS args"
        " FROM pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace"
        " AND p.proname = ANY($1::text[])",
        sorted(ALLOWED_FUNCTIONS),
    )
    problems = []
    for row in rows:
        name = row["proname"]
        if row["prosecdef"]:
            problems.append(f"{name} is SECURITY DEFINER")
        # (Overloads taking oid or xid values, like max(oid), are harmless: tenant SQL cannot
        # make such a value from a name or read one of a transaction; the guard refuses those
        # casts and system columns.)
        for position, arg in enumerate(row["args"]):
            base = arg.removesuffix("[]")
            if base in NAME_TYPES:
                arities = range(row["pronargs"] - row["pronargdefaults"], row["pronargs"] + 1)
                for arity in arities:
                    if position < arity and position not in NAME_ARGUMENTS.get(
                        (name, arity), frozenset()
                    ):
                        problems.append(f"{name}/{arity} resolves a name at {position}")
    assert not problems, problems


@pytest.fixture(scope="module")
async def b_objects(core: Application, tenants: Tenants) -> list[str]:
    """Objects of B's own, created by B's role, with names to look for."""
    b = tenants.b.schema_name
    names = [f"bsecret_{what}_{secrets.token_hex(2)}" for what in ("fn", "ty", "dom", "tbl")]
    fn, ty, dom, tbl = names
    async with core.owner_pool.acquire() as conn:
        await conn.execute(f'SET ROLE "{tenants.b.role_name}"')
        try:
            await conn.execute(f"CREATE FUNCTION {b}.{fn}() RETURNS int LANGUAGE sql AS 'SELECT 1'")
            await conn.execute(f"CREATE TYPE {b}.{ty} AS ENUM ('bsecret_label')")
            await conn.execute(f"CREATE DOMAIN {b}.{dom} AS int CHECK (VALUE > 0)")
            await conn.execute(f"CREATE TABLE {b}.{tbl} (x {b}.{dom}, y {b}.{ty})")
            await conn.execute(f"CREATE VIEW {b}.{tbl}_v AS SELECT * FROM {b}.{tbl}")
            await conn.execute(f"CREATE SEQUENCE {b}.{tbl}_seq")
        finally:
            await conn.execute("RESET ROLE")
    return names


async def test_information_schema_shows_nothing_of_another_tenant(
    front_end: FrontEnd, core: Application, tenants: Tenants, b_objects: list[str]
) -> None:
    views = [
        r["table_name"]
        for r in await core.owner_pool.fetch(
            "SELECT table_name FROM information_schema.views"
            " WHERE table_schema = 'information_schema' ORDER BY 1"
        )
    ]
    assert len(views) > 50
    secrets_of_b = [
        tenants.b.tenant_id,
        tenants.b.schema_name,
        tenants.b.role_name,
        "bsecret",
    ]
    pattern = "|".join(re.escape(s) for s in secrets_of_b)
    for view in views:
        outcome = await front_end.run(
            f"SELECT count(*) FROM information_schema.{view} v WHERE v::text ~ $1", pattern
        )
        # Either it answers (and shows nothing of B's) or PostgreSQL refuses A altogether.
        assert outcome.ok or outcome.refused, (view, outcome)
        assert outcome.rows in ([[0]], []), f"information_schema.{view} shows B: {outcome}"


async def test_tenant_names_name_no_customer(core: Application, tenants: Tenants) -> None:
    for record in (tenants.a, tenants.b):
        for name in (record.schema_name, *record.roles):
            assert record.tenant_id not in name
    # Whatever the catalog still shows every role (here as the owner) has no customer id in it.
    names = await core.owner_pool.fetch(
        "SELECT nspname AS name FROM pg_namespace UNION ALL SELECT rolname FROM pg_roles"
    )
    shown = " ".join(r["name"] for r in names)
    assert tenants.b.tenant_id not in shown and tenants.a.tenant_id not in shown
