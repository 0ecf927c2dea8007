"""Which statements may be cached, decided from PostgreSQL's parse tree (pglast).

A statement is cacheable when running it twice against unchanged relations returns the same
rows: a single plain ``SELECT`` (joins, subqueries, set operations, ``VALUES``, ``WITH``
without data-modifying CTEs), no locking clause, no ``SELECT INTO``, every function a
pg_catalog function whose every overload is IMMUTABLE (``IMMUTABLE_FUNCTIONS_SQL`` loads the
names), no ``current_timestamp``-like keyword (``SQLValueFunction``), no string constant that
a date/time input would read as the clock (``'now'``, ``'today'``, ``'tomorrow'``,
``'yesterday'`` — detected in any string constant, since ``WHERE d = 'now'`` casts implicitly),
no cast to an OID alias type (``'t'::regclass`` resolves names at run time), no ``TABLESAMPLE``
(random unless ``REPEATABLE``; refused either way), no catalog relation. Anything else —
EXPLAIN, SHOW, writes — runs uncached, and ``Cacheability.reason`` says why: a stable short
code (``code``) and a sentence (``reason``).

The relations a result depends on (``relations``) are ``schema.relation`` (PostgreSQL's own
spelling: unquoted names folded to lower case, quoted ones verbatim), resolved like the tenant
role's ``search_path`` (its own schema, then the shared schema): an unqualified name is listed
under **both** schemas, so a write to either invalidates the entry. Two relations whose joined
names coincide (``a."b.c"`` and ``"a.b".c``) share a generation: that only costs misses.

What the tree does not show, and the caller must supply or accept:

- stable operators and casts (``timestamptz + interval``, ``ts::text``) depend only on session
  settings, which the service fixes per login (the guard refuses ``SET``), so they are allowed;
- a view is a relation here: the caller expands views to the relations they read
  (``VIEW_DEPENDENCIES_SQL``, ``expand_relations``) so that writes to those invalidate too; a
  view whose definition calls a volatile function is cached like any other (TTL bounds it);
- a tenant's own functions: a schema-qualified call to any schema but pg_catalog is refused
  (``tenant_function``); unqualified names the tenant defined are refused when the caller passes
  them as ``tenant_functions`` (a tenant overloading ``lower(int)`` with a volatile function is
  otherwise cached: its own rows only, TTL bounds it);
- sequences read as relations (``SELECT last_value FROM s``) change without a write: pass them
  as ``volatile_relations``.

``CachePolicy`` keeps verdicts per (statement text, tenant schema, tenant functions, volatile
relations) in a bounded LRU; ``analyse`` is the pure function underneath.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast
from pglast.enums import SQLValueFunctionOp
from pglast.parser import ParseError
from pglast.visitors import Visitor

from database_service.textmemo import KEPT_CHARS

__all__ = [
    "IMMUTABLE_FUNCTIONS_SQL",
    "VIEW_DEPENDENCIES_SQL",
    "CachePolicy",
    "Cacheability",
    "analyse",
    "expand_relations",
    "parameters_cacheable",
]

# Names of pg_catalog functions every overload of which is IMMUTABLE: a name is only as safe as
# its least safe overload, since the parse tree does not say which overload PostgreSQL picks.
IMMUTABLE_FUNCTIONS_SQL = """
SELECT proname FROM pg_catalog.pg_proc
WHERE pronamespace = 'pg_catalog'::regnamespace
GROUP BY proname
HAVING bool_and(provolatile = 'i')
"""

# (view, relation it reads) for the views of the given schemas ($1: text[]), both as
# "schema.relation": what a cached read of a view must also be invalidated by. Direct
# dependencies only; ``expand_relations`` follows views of views.
VIEW_DEPENDENCIES_SQL = """
SELECT DISTINCT vn.nspname || '.' || v.relname AS view,
       tn.nspname || '.' || t.relname AS relation
FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
     AND d.refclassid = 'pg_catalog.pg_class'::regclass
JOIN pg_catalog.pg_class t ON t.oid = d.refobjid AND t.oid <> v.oid
JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
WHERE v.relkind IN ('v', 'm') AND vn.nspname = ANY($1::text[])
"""

_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "pg_toast"})
# Date/time inputs PostgreSQL reads as the clock ('epoch', 'infinity', 'allballs' are constant).
_CLOCK_WORDS = re.compile(r"\b(now|today|tomorrow|yesterday)\b", re.IGNORECASE)
_OID_ALIAS_TYPES = frozenset(
    {
        "regclass",
        "regcollation",
        "regconfig",
        "regdictionary",
        "regnamespace",
        "regoper",
        "regoperator",
        "regproc",
        "regprocedure",
        "regrole",
        "regtype",
    }
)
_WRITES = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)
_DEFAULT_CACHE_SIZE = 8192


@dataclass(frozen=True, slots=True)
class Cacheability:
    """The verdict: ``code`` is stable (``not_read_only``, ``volatile_function:now``…),
    ``reason`` a sentence for the response; both ``None`` when cacheable."""

    cacheable: bool
    code: str | None
    reason: str | None
    relations: frozenset[str]

    @classmethod
    def ok(cls, relations: frozenset[str]) -> Cacheability:
        return cls(True, None, None, relations)

    @classmethod
    def refused(cls, code: str, reason: str) -> Cacheability:
        return cls(False, code, reason, frozenset())


def _names(nodes: Iterable[Any] | None) -> list[str]:
    return [n.sval or "" for n in nodes or () if isinstance(n, ast.String)]


class _Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Walk(Visitor):
    """Collects relations and stops at the first thing that makes the result unrepeatable."""

    def __init__(
        self,
        *,
        own_schema: str,
        shared_schema: str,
        shared_relations: frozenset[str],
        immutable_functions: frozenset[str],
        tenant_functions: frozenset[str],
        volatile_relations: frozenset[str],
    ) -> None:
        self.own = own_schema
        self.shared = shared_schema
        self.shared_relations = shared_relations
        self.immutable = immutable_functions
        self.tenant_functions = tenant_functions
        self.volatile_relations = volatile_relations
        self.relations: set[str] = set()

    def visit_InsertStmt(self, ancestors: Any, node: Any) -> None:
        raise _Refused("cte_write", "a data-modifying WITH query is not cacheable")

    visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = visit_InsertStmt

    def visit_LockingClause(self, ancestors: Any, node: Any) -> None:
        raise _Refused("locking_clause", "a SELECT with a locking clause (FOR UPDATE/SHARE)")

    def visit_IntoClause(self, ancestors: Any, node: Any) -> None:
        raise _Refused("select_into", "SELECT INTO creates a table")

    def visit_RangeTableSample(self, ancestors: Any, node: Any) -> None:
        raise _Refused("tablesample", "TABLESAMPLE returns a random sample")

    def visit_SQLValueFunction(self, ancestors: Any, node: ast.SQLValueFunction) -> None:
        name = (
            SQLValueFunctionOp(node.op or 0).name.removeprefix("SVFOP_").removesuffix("_N").lower()
        )
        raise _Refused(f"volatile_function:{name}", f"{name} is not immutable")

    def visit_FuncCall(self, ancestors: Any, node: ast.FuncCall) -> None:
        parts = _names(node.funcname)
        name = parts[-1] if parts else ""
        schema = parts[-2] if len(parts) > 1 else None
        if schema is not None and schema != "pg_catalog":
            raise _Refused(
                f"tenant_function:{name}", f"function {schema}.{name} is not PostgreSQL's"
            )
        if schema is None and name in self.tenant_functions:
            raise _Refused(f"tenant_function:{name}", f"function {name} is the tenant's own")
        if name not in self.immutable:
            raise _Refused(f"volatile_function:{name}", f"function {name} is not immutable")

    def visit_A_Const(self, ancestors: Any, node: ast.A_Const) -> None:
        value = node.val
        if isinstance(value, ast.String) and _CLOCK_WORDS.search(value.sval or ""):
            raise _Refused(
                "clock_literal",
                f"the constant {value.sval!r} reads the clock when taken as a date or time",
            )

    def visit_TypeName(self, ancestors: Any, node: ast.TypeName) -> None:
        parts = _names(node.names)
        name = parts[-1].lower() if parts else ""
        if name in _OID_ALIAS_TYPES:
            raise _Refused(f"volatile_cast:{name}", f"a cast to {name} resolves names at run time")

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
        schema, relation = node.schemaname, node.relname or ""
        if node.catalogname is not None:
            raise _Refused("unknown_relation", "a relation of another database")
        if schema in _SYSTEM_SCHEMAS or (schema is None and relation.startswith("pg_")):
            raise _Refused("system_relation", f"catalog relation {relation} is not cacheable")
        if schema is None:
            # Both candidates of the tenant's search_path: a CTE's name lands here too, which
            # only adds a relation that never changes.
            names = {f"{self.own}.{relation}", f"{self.shared}.{relation}"}
        elif schema == self.own:
            names = {f"{self.own}.{relation}"}
        elif schema == self.shared:
            if self.shared_relations and relation not in self.shared_relations:
                raise _Refused("unknown_relation", f"{schema}.{relation} is not a shared table")
            names = {f"{self.shared}.{relation}"}
        else:
            raise _Refused("unknown_relation", f"schema {schema} is neither yours nor shared")
        volatile = names & self.volatile_relations
        if volatile:
            name = min(volatile)
            raise _Refused(f"volatile_relation:{name}", f"{name} changes without a write")
        self.relations |= names


def analyse(
    sql: str,
    *,
    own_schema: str,
    shared_schema: str,
    shared_relations: frozenset[str],
    immutable_functions: frozenset[str],
    tenant_functions: frozenset[str] = frozenset(),
    volatile_relations: frozenset[str] = frozenset(),
) -> Cacheability:
    """Whether ``sql`` may be cached for the tenant whose schema is ``own_schema``, and the
    relations its result depends on. Pure; see ``CachePolicy`` for the cached form."""
    try:
        statements = pglast.parse_sql(sql)
    except ParseError as exc:
        return Cacheability.refused("syntax_error", f"the statement does not parse: {exc}")
    if len(statements) != 1:
        return Cacheability.refused("multiple_statements", "exactly one statement is cacheable")
    stmt = statements[0].stmt
    if isinstance(stmt, _WRITES):
        return Cacheability.refused("not_read_only", "a write is never cached")
    if not isinstance(stmt, ast.SelectStmt):
        kind = type(stmt).__name__.removesuffix("Stmt").upper()
        return Cacheability.refused("not_select", f"only SELECT is cacheable, not {kind}")
    walk = _Walk(
        own_schema=own_schema,
        shared_schema=shared_schema,
        shared_relations=shared_relations,
        immutable_functions=immutable_functions,
        tenant_functions=tenant_functions,
        volatile_relations=volatile_relations,
    )
    try:
        walk(stmt)
    except _Refused as refused:
        return Cacheability.refused(refused.code, refused.reason)
    return Cacheability.ok(frozenset(walk.relations))


def parameters_cacheable(params: Iterable[object]) -> bool:
    """False when a text parameter could be read as the clock (``'now'`` bound to a date)."""
    return not any(isinstance(p, str) and _CLOCK_WORDS.search(p) for p in params)


def expand_relations(
    relations: Iterable[str], dependencies: Mapping[str, Iterable[str]]
) -> frozenset[str]:
    """``relations`` plus every relation the views among them read, transitively
    (``dependencies``: view → relations, as ``VIEW_DEPENDENCIES_SQL`` returns them)."""
    seen: set[str] = set()
    todo = list(relations)
    while todo:
        relation = todo.pop()
        if relation in seen:
            continue
        seen.add(relation)
        todo.extend(dependencies.get(relation, ()))
    return frozenset(seen)


class CachePolicy:
    """``analyse`` with the deployment's fixed inputs and a bounded LRU of verdicts.

    Verdicts are keyed by everything that decides them, the tenant's schema included: a
    verdict never crosses tenants. Thread-safe (the cache is shared by a process's threads)."""

    def __init__(
        self,
        *,
        shared_schema: str,
        shared_relations: frozenset[str],
        immutable_functions: frozenset[str],
        max_entries: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        self.shared_schema = shared_schema
        self.shared_relations = shared_relations
        self.immutable_functions = immutable_functions
        self.max_entries = max_entries
        self._verdicts: OrderedDict[
            tuple[str, str, frozenset[str], frozenset[str]], Cacheability
        ] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def analyse(
        self,
        sql: str,
        own_schema: str,
        *,
        tenant_functions: frozenset[str] = frozenset(),
        volatile_relations: frozenset[str] = frozenset(),
    ) -> Cacheability:
        key = (sql, own_schema, tenant_functions, volatile_relations)
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
                self.hits += 1
                return verdict
            self.misses += 1
        verdict = analyse(
            sql,
            own_schema=own_schema,
            shared_schema=self.shared_schema,
            shared_relations=self.shared_relations,
            immutable_functions=self.immutable_functions,
            tenant_functions=tenant_functions,
            volatile_relations=volatile_relations,
        )
        if len(sql) > KEPT_CHARS:
            return verdict  # bounded by entries, not kept: a caller's text may be megabytes
        with self._lock:
            self._verdicts[key] = verdict
            while len(self._verdicts) > self.max_entries:
                self._verdicts.popitem(last=False)
        return verdict
