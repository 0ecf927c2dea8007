"""The SQL guard: the second isolation layer, in front of PostgreSQL's own.

PostgreSQL is the boundary: every statement runs as the tenant's own login role, which owns
nothing outside its schema and meets forced row-level security on the shared tables. The guard
narrows what reaches it, so that what PostgreSQL would let any role see — the catalog, plan
estimates, statistics, the cluster's activity — never reaches a tenant. Every statement is parsed
by PostgreSQL's own parser (pglast), never matched with regexes, then:

1. the text is bounded before parsing: valid Unicode without NUL, at most ``max_sql_bytes``
   bytes and about ``max_sql_tokens`` tokens (a 240 KB list of constants would otherwise keep the
   parser busy for seconds); ``classify_async`` parses large statements off the event loop;
2. exactly one statement is allowed, classified READ (SELECT/VALUES/TABLE without locking or
   INTO, SHOW, EXPLAIN with COSTS OFF), WRITE (INSERT/UPDATE/DELETE/MERGE, locking SELECTs,
   data-modifying CTEs) or DDL (objects in the tenant's own schema); everything else —
   transaction control, SET/RESET, roles, DO, COPY, LISTEN/NOTIFY, PREPARE, cursors, GRANT,
   extensions, EXPLAIN ANALYZE… — is refused;
3. the whole tree is walked, deny by default: a function of PostgreSQL's is callable only when
   ``functions.ALLOWED_FUNCTIONS`` lists it (nothing there runs SQL text, reads the catalog or
   reports on the cluster); OID alias types (``regclass``…) and transaction ids appear only as
   string constants naming the tenant's own, the shared or pg_catalog objects; catalog relations
   are refused but for three global ones; system columns (``ctid``, ``xmin``…) that reveal where
   other tenants' rows lie are refused; schemas other than the tenant's own, the shared schemas,
   ``pg_catalog`` and ``information_schema`` are refused;
4. DDL may only target the tenant's own schema, never with SECURITY DEFINER or SET, never in an
   untrusted language, never touching row-level security or ownership; the body of a function is
   checked by the same rules (SQL bodies parsed, PL/pgSQL bodies through PostgreSQL's PL/pgSQL
   parser), and PL/pgSQL may not EXECUTE a string computed at run time.

Verdicts are cached per (statement text, tenant schema): a verdict never crosses tenants.
``classify_shape`` also shares one verdict among texts that differ only in their constants
(see there): every ``-M simple`` statement of a driver that inlines its values has new text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import pglast
from pglast import ast
from pglast.enums import AlterTableType
from pglast.parser import ParseError, parse_plpgsql_json
from pglast.visitors import Visitor

from database_service.errors import InvalidText, PayloadTooLarge, SqlRejected, SqlSyntaxError
from database_service.results import StatementKind
from database_service.sqlguard.functions import (
    ALLOWED_FUNCTIONS,
    NAME_ARGUMENTS,
    NAME_TYPES,
    TRANSACTION_ID_TYPES,
)
from database_service.textmemo import KEPT_CHARS

__all__ = ["Classification", "SqlGuard", "StatementKind", "packaged_catalog_functions"]


@dataclass(frozen=True, slots=True)
class Classification:
    kind: StatementKind
    tag: str
    # Running it twice changes nothing (a read calling no function that writes: no sequence
    # function, no function of the tenant's). The query core may then read the first rows
    # outside a transaction and, when the result turns out larger, read it again by cursor.
    repeatable: bool = False
    # pg_query's fingerprint of the text (literals, parameter numbers and formatting do not
    # change it) and the text with its literals replaced by $n: computed once, when the text is
    # first classified, so the statement statistics never parse on the request path. Not part
    # of the verdict: two verdicts are equal whatever texts they came from.
    fingerprint: str = dataclasses.field(default="", compare=False)
    normalized: str = dataclasses.field(default="", compare=False)

    @property
    def readonly(self) -> bool:
        return self.kind is StatementKind.READ


# Allowed catalog functions that change something a second run would change again.
_WRITING_FUNCTIONS = frozenset({"nextval", "setval"})
_WRITES = {
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
}
_DDL = {
    "CreateStmt": "CREATE TABLE",
    "CreateTableAsStmt": "CREATE TABLE AS",
    "IndexStmt": "CREATE INDEX",
    "ViewStmt": "CREATE VIEW",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "AlterSeqStmt": "ALTER SEQUENCE",
    "CompositeTypeStmt": "CREATE TYPE",
    "CreateEnumStmt": "CREATE TYPE",
    "CreateDomainStmt": "CREATE DOMAIN",
    "CreateFunctionStmt": "CREATE FUNCTION",
    "CreateTrigStmt": "CREATE TRIGGER",
    "AlterTableStmt": "ALTER TABLE",
    "DropStmt": "DROP",
    "TruncateStmt": "TRUNCATE",
    "CommentStmt": "COMMENT",
    "RenameStmt": "ALTER ... RENAME",
}
# Statements refused outright, with the reason a caller can act on.
_REFUSED = {
    "TransactionStmt": "transaction control is not allowed: the service owns transactions",
    "VariableSetStmt": "SET/RESET is not allowed: the service owns the session's settings",
    "DiscardStmt": "DISCARD is not allowed: the service owns the session",
    "ListenStmt": "LISTEN is not allowed",
    "UnlistenStmt": "UNLISTEN is not allowed",
    "NotifyStmt": "NOTIFY is not allowed",
    "PrepareStmt": "PREPARE is not allowed: send parameters with the query instead",
    "ExecuteStmt": "EXECUTE is not allowed: send parameters with the query instead",
    "DeallocateStmt": "DEALLOCATE is not allowed",
    "DeclareCursorStmt": "cursors are not allowed: results are streamed by the service",
    "FetchStmt": "cursors are not allowed: results are streamed by the service",
    "ClosePortalStmt": "cursors are not allowed",
    "DoStmt": "DO blocks are not allowed",
    "CallStmt": "CALL is not allowed",
    "LoadStmt": "LOAD is not allowed",
    "CopyStmt": "COPY is not allowed: use the bulk API",
    "VacuumStmt": "VACUUM/ANALYZE is not allowed: maintenance is the service's job",
    "ClusterStmt": "CLUSTER is not allowed",
    "ReindexStmt": "REINDEX is not allowed",
    "CheckPointStmt": "CHECKPOINT is not allowed",
    "LockStmt": "LOCK is not allowed",
    "AlterSystemStmt": "ALTER SYSTEM is not allowed",
    "GrantStmt": "GRANT/REVOKE is not allowed",
    "GrantRoleStmt": "GRANT/REVOKE of roles is not allowed",
    "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES is not allowed",
    "CreateRoleStmt": "role management is not allowed",
    "AlterRoleStmt": "role management is not allowed",
    "AlterRoleSetStmt": "role management is not allowed",
    "DropRoleStmt": "role management is not allowed",
    "ReassignOwnedStmt": "REASSIGN OWNED is not allowed",
    "DropOwnedStmt": "DROP OWNED is not allowed",
    "AlterOwnerStmt": "changing ownership is not allowed",
    "AlterObjectSchemaStmt": "moving objects between schemas is not allowed",
    "AlterFunctionStmt": "ALTER FUNCTION is not allowed: replace the function instead",
    "CreateSchemaStmt": "schemas are created by the service",
    "CreatedbStmt": "database management is not allowed",
    "DropdbStmt": "database management is not allowed",
    "AlterDatabaseStmt": "database management is not allowed",
    "AlterDatabaseSetStmt": "database management is not allowed",
    "CreateExtensionStmt": "extensions are managed by the service",
    "AlterExtensionStmt": "extensions are managed by the service",
    "CreatePLangStmt": "languages are managed by the service",
    "CreateForeignServerStmt": "foreign servers are not allowed",
    "CreateFdwStmt": "foreign data wrappers are not allowed",
    "CreateUserMappingStmt": "user mappings are not allowed",
    "CreateForeignTableStmt": "foreign tables are not allowed",
    "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA is not allowed",
    "CreateEventTrigStmt": "event triggers are not allowed",
    "CreatePublicationStmt": "publications are not allowed",
    "CreateSubscriptionStmt": "subscriptions are not allowed",
    "SecLabelStmt": "SECURITY LABEL is not allowed",
    "RuleStmt": "rules are not allowed",
    "CreatePolicyStmt": "row-level security policies are managed by the service",
    "AlterPolicyStmt": "row-level security policies are managed by the service",
    "CreateTableSpaceStmt": "tablespaces are not allowed",
    "CreateStatsStmt": "extended statistics are managed by the service",
}
_RLS_SUBCOMMANDS = {
    AlterTableType.AT_EnableRowSecurity,
    AlterTableType.AT_DisableRowSecurity,
    AlterTableType.AT_ForceRowSecurity,
    AlterTableType.AT_NoForceRowSecurity,
    AlterTableType.AT_ChangeOwner,
    AlterTableType.AT_AddInherit,
}
# Catalog relations a tenant may read: global facts with nothing of any tenant in them.
_CATALOG_ALLOWED = {"pg_am", "pg_timezone_names", "pg_timezone_abbrevs"}
# information_schema views a tenant may read: each shows only objects the reader holds a
# privilege on (its schema, the shared tables). Not listed: udt_privileges (PostgreSQL grants
# USAGE on every table's row type to PUBLIC, so it names every tenant's tables), the foreign-data
# and user-mapping views, and any view a later PostgreSQL adds until it is reviewed.
# tests/isolation/test_catalog_systematic.py reads every view as one tenant and looks for
# another's names.
_INFORMATION_SCHEMA_ALLOWED = frozenset(
    [
        "applicable_roles",
        "attributes",
        "character_sets",
        "check_constraints",
        "collations",
        "collation_character_set_applicability",
        "column_domain_usage",
        "column_privileges",
        "column_udt_usage",
        "columns",
        "constraint_column_usage",
        "constraint_table_usage",
        "data_type_privileges",
        "domain_constraints",
        "domain_udt_usage",
        "domains",
        "element_types",
        "enabled_roles",
        "information_schema_catalog_name",
        "key_column_usage",
        "parameters",
        "referential_constraints",
        "role_column_grants",
        "role_routine_grants",
        "role_table_grants",
        "routine_privileges",
        "routines",
        "schemata",
        "sequences",
        "table_constraints",
        "table_privileges",
        "tables",
        "triggered_update_columns",
        "triggers",
        "view_column_usage",
        "view_routine_usage",
        "view_table_usage",
        "views",
    ]
)
_ALWAYS_ALLOWED_SCHEMAS = {"pg_catalog", "information_schema"}
_TRUSTED_LANGUAGES = {"sql", "plpgsql"}
# ctid is where a row lies among every tenant's rows of a shared table; xmin/xmax/cmin/cmax are
# transaction ids, a counter of every tenant's writes.
_SYSTEM_COLUMNS = {"ctid", "xmin", "xmax", "cmin", "cmax"}
# Schemas and roles have no schema to qualify them with: any name given is looked up everywhere.
_UNQUALIFIED_NAME_TYPES = {"regnamespace", "regrole"}
# Trigger functions of PostgreSQL's a tenant's trigger may name.
_CATALOG_TRIGGER_FUNCTIONS = {"suppress_redundant_updates_trigger"}
_EXPLAIN_REFUSED = {
    "analyze": "EXPLAIN ANALYZE is not available: its row counts include the rows of other"
    " tenants that row-level security filtered out",
    "buffers": "EXPLAIN BUFFERS is not available: buffer counts measure every tenant's rows",
    "wal": "EXPLAIN WAL is not available",
    "serialize": "EXPLAIN SERIALIZE is not available",
    "timing": "EXPLAIN TIMING is not available",
}
# A qualifier inside a name given as text ("schema".name, schema.name(...)).
_QUALIFIER = re.compile(r'("(?:[^"]|"")+"|[^\s".(),\[\]]+)\s*\.')
# A cheap upper bound of the token count, checked before anything is parsed.
_TOKEN = re.compile(r"\w+|[^\w\s]")
_INLINE_BYTES = 2048  # statements up to this size are classified on the caller's thread
_VERDICT_ERRORS: dict[str, type[SqlRejected | PayloadTooLarge | InvalidText]] = {
    cls.__name__: cls for cls in (SqlRejected, SqlSyntaxError, PayloadTooLarge, InvalidText)
}


# A statement's text as the statistics and the slow-query log keep it (the normalised text of a
# 100 KB statement is not worth keeping whole).
_NORMALIZED_CHARS = 2000


def _identity(sql: str) -> tuple[str, str]:
    """The fingerprint and normalised text of a statement the parser accepted (two more passes
    of PostgreSQL's parser, once per text: the classification is cached)."""
    try:
        fingerprint = pglast.parser.fingerprint(sql)
        normalized = pglast.parser.normalize(sql)
    except ParseError:  # cannot happen for a text parse_sql accepted; never fail the verdict
        return "", sql[:_NORMALIZED_CHARS]
    return fingerprint, normalized.strip()[:_NORMALIZED_CHARS]


def packaged_catalog_functions() -> frozenset[str]:
    """pg_catalog's function names of PostgreSQL 15 and 18, shipped with the package."""
    text = resources.files(__package__).joinpath("pg_catalog_functions.txt").read_text()
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def _names(parts: Iterable[Any] | None) -> list[str]:
    """String values of a qualified name (pglast tuples of ast.String)."""
    return [p.sval for p in parts or () if isinstance(p, ast.String) and p.sval is not None]


def _option_on(option: ast.DefElem) -> bool:
    arg = option.arg
    if arg is None:
        return True
    if isinstance(arg, ast.Boolean):
        return bool(arg.boolval)
    if isinstance(arg, ast.Integer):
        return bool(arg.ival)
    if isinstance(arg, ast.String):
        return (arg.sval or "").lower() not in {"off", "false", "0", "no"}
    return True


def _string_constant(node: Any) -> str | None:
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.String):
        return node.val.sval
    return None


def _refuse(message: str) -> SqlRejected:
    return SqlRejected(message, sqlstate="42501")


@dataclass(frozen=True, slots=True)
class _Scope:
    own: str
    shared: frozenset[str]
    catalog: frozenset[str]

    @property
    def schemas(self) -> frozenset[str]:
        return frozenset(_ALWAYS_ALLOWED_SCHEMAS) | self.shared | {self.own}

    @property
    def name_schemas(self) -> frozenset[str]:
        """Schemas a name given as text may be qualified with."""
        return self.shared | {self.own, "pg_catalog"}


class _Walk(Visitor):
    """Collects the statement's shape and applies the tree rules, in one pass."""

    def __init__(self, scope: _Scope) -> None:
        self.scope = scope
        self.writes = False
        self.locking = False
        self.into = False
        self.side_effects = False  # calls a function that may write (see Classification)
        # The first rule broken; raised after the statement-level checks, whose reasons are
        # the more useful ones ("DDL may only change your own schema" before "schema x").
        self.problem: SqlRejected | None = None

    def fail(self, message: str) -> None:
        if self.problem is None:
            self.problem = _refuse(message)

    def visit_InsertStmt(self, ancestors: Any, node: Any) -> None:
        self.writes = True

    visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = visit_InsertStmt

    def visit_LockingClause(self, ancestors: Any, node: Any) -> None:
        self.locking = True

    def visit_IntoClause(self, ancestors: Any, node: Any) -> None:
        self.into = True

    def visit_VariableSetStmt(self, ancestors: Any, node: Any) -> None:
        self.fail(
            "SET is not allowed anywhere in a statement: the service owns the session's settings"
        )

    def visit_FuncCall(self, ancestors: Any, node: ast.FuncCall) -> None:
        parts = _names(node.funcname)
        schema = parts[-2] if len(parts) > 1 else None
        function = parts[-1].lower()
        if schema is not None and schema not in self.scope.schemas:
            self.fail(f"reference to schema {schema} is not allowed")
            return
        catalog = schema == "pg_catalog" or (
            schema is None and (function in self.scope.catalog or function.startswith("pg_"))
        )
        if not catalog or function in _WRITING_FUNCTIONS:
            self.side_effects = True
        if schema == "information_schema" or (catalog and function not in ALLOWED_FUNCTIONS):
            self.fail(
                f"function {function} is not allowed: PostgreSQL's functions that run SQL given as"
                " text, read the catalog or report on the cluster are refused"
            )
            return
        if catalog:
            positions = NAME_ARGUMENTS.get((function, len(node.args or ())), frozenset())
            for index, arg in enumerate(node.args or ()):
                if index in positions or isinstance(arg, ast.NamedArgExpr):
                    self._name_argument(function, arg)

    def _name_argument(self, function: str, arg: Any) -> None:
        """An argument PostgreSQL resolves as an object's name: only a checked constant."""
        if isinstance(arg, ast.NamedArgExpr):
            arg = arg.arg
        if isinstance(arg, ast.TypeCast):
            arg = arg.arg
        text = _string_constant(arg)
        if text is None or not self._own_name(text):
            self.fail(
                f"the name argument of {function} must be a string constant naming your own"
                " object (unqualified, or qualified with your schema)"
            )

    def _own_name(self, text: str) -> bool:
        if not text or not (text[0].isalpha() or text[0] in '_"'):
            return False  # a number would be taken as an OID
        for match in _QUALIFIER.finditer(text):
            qualifier = match.group(1)
            if qualifier.startswith('"'):
                qualifier = qualifier[1:-1].replace('""', '"')
            else:
                qualifier = qualifier.lower()
            if qualifier not in self.scope.name_schemas:
                return False
        return True

    def visit_TypeName(self, ancestors: Any, node: ast.TypeName) -> None:
        parts = _names(node.names)
        if len(parts) > 1 and parts[-2] not in self.scope.schemas:
            self.fail(f"reference to schema {parts[-2]} is not allowed")
            return
        name = parts[-1].lower() if parts else ""
        if name in TRANSACTION_ID_TYPES:
            self.fail(f"type {name} is not allowed: transaction ids count every tenant's writes")
            return
        if name not in NAME_TYPES:
            return
        parent = ancestors.node
        if (
            name not in _UNQUALIFIED_NAME_TYPES
            and isinstance(parent, ast.TypeCast)
            and not node.arrayBounds
            and _string_constant(parent.arg) is not None
            and self._own_name(_string_constant(parent.arg) or "")
        ):
            return
        self.fail(
            f"type {name} is allowed only as a cast of a string constant naming your own object:"
            " it resolves names and OIDs in every schema"
        )

    def visit_ColumnRef(self, ancestors: Any, node: ast.ColumnRef) -> None:
        fields = node.fields or ()
        last = fields[-1] if fields else None
        if isinstance(last, ast.String) and (last.sval or "").lower() in _SYSTEM_COLUMNS:
            self.fail(
                f"system column {last.sval} is not allowed: it reveals where and when other"
                " tenants' rows were written"
            )

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
        schema, relation = node.schemaname, node.relname or ""
        if schema is not None and schema not in self.scope.schemas:
            self.fail(f"reference to schema {schema} is not allowed")
            return
        if schema == "information_schema" and relation not in _INFORMATION_SCHEMA_ALLOWED:
            self.fail(
                f"information_schema.{relation} is not allowed: it names other tenants' objects"
            )
            return
        catalog = schema == "pg_catalog" or (schema is None and relation.startswith("pg_"))
        if catalog and relation not in _CATALOG_ALLOWED:
            self.fail(
                f"catalog relation {relation} is not allowed: it exposes other tenants' objects"
            )


class SqlGuard:
    def __init__(
        self,
        *,
        max_sql_bytes: int = 1_048_576,
        max_sql_tokens: int = 20_000,
        cache_size: int = 4096,
        catalog_functions: Iterable[str] | None = None,
    ) -> None:
        self._max_bytes = max_sql_bytes
        self._max_tokens = max_sql_tokens
        self._cache_size = cache_size
        self._catalog = packaged_catalog_functions() | frozenset(catalog_functions or ())
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...]], Classification | SqlRejected] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        # classify_shape: pg_query's normalised text (constants as $n) and scope -> the verdict
        # every text of that shape gets, or False when its texts are classified one by one.
        self._shapes: OrderedDict[
            tuple[str, str, tuple[str, ...]], Classification | Literal[False]
        ] = OrderedDict()

    def add_catalog_functions(self, names: Iterable[str]) -> None:
        """Add the live catalog's function names (an extension may have added some)."""
        self._catalog = self._catalog | frozenset(names)
        with self._lock:
            self._cache.clear()
            self._shapes.clear()

    @property
    def catalog_functions(self) -> frozenset[str]:
        return self._catalog

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def classify_async(
        self, sql: str, *, own_schema: str, shared_schemas: Collection[str] = ("shared",)
    ) -> Classification:
        """``classify``, with large statements checked in a worker process: a big statement
        costs its sender time, never the event loop (nor the GIL) every other request needs.
        Parsing builds a Python object per node, so a thread would still hold the GIL for most
        of it (about 0.2 s for 18,000 tokens)."""
        key = (sql, own_schema, tuple(shared_schemas))
        with self._lock:  # the usual case, one lookup: a verdict kept for this text and schema
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if isinstance(cached, Classification):
            return cached
        if cached is not None or len(sql) <= _INLINE_BYTES:
            return self.classify(sql, own_schema=own_schema, shared_schemas=shared_schemas)
        if len(sql) > self._max_bytes:
            self._check_text(sql)  # refused at once, whatever the size
        shared = tuple(shared_schemas)
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            # Starting the worker (spawning a process) happens off the event loop too.
            worker = self._executor or await loop.run_in_executor(None, self._worker)
            try:
                verdict = await loop.run_in_executor(
                    worker, _classify_in_worker, sql, own_schema, shared
                )
                break
            except BrokenProcessPool:  # the worker died (killed, out of memory): a new one
                self.close()
                if attempt == 2:
                    raise
        result: Classification | SqlRejected
        if verdict[0] == "ok":
            result = Classification(
                StatementKind(verdict[1]), verdict[2], verdict[3], verdict[4], verdict[5]
            )
        else:
            error = _VERDICT_ERRORS[verdict[1]](
                verdict[2], sqlstate=verdict[3], position=verdict[4]
            )
            if not isinstance(error, SqlRejected):
                raise error  # the text itself: not cached
            result = error
        self._keep((sql, own_schema, shared), result)
        return self._answer(result)

    async def classify_shape_async(
        self, sql: str, *, own_schema: str, shared_schemas: Collection[str] = ("shared",)
    ) -> Classification:
        """``classify_shape``; a large statement as ``classify_async`` (its exact text, off the
        event loop)."""
        if len(sql) > _INLINE_BYTES:
            return await self.classify_async(
                sql, own_schema=own_schema, shared_schemas=shared_schemas
            )
        return self.classify_shape(sql, own_schema=own_schema, shared_schemas=shared_schemas)

    def classify_shape(
        self, sql: str, *, own_schema: str, shared_schemas: Collection[str] = ("shared",)
    ) -> Classification:
        """``classify``, with one verdict for every text of the same shape: texts whose
        pg_query normalisation (each constant replaced by a parameter ``$n``, in PostgreSQL's
        own parser, a few microseconds) is the same, when that verdict cannot depend on the
        constants' values.

        Why it cannot: the shape's verdict is the guard's verdict on the normalised text
        itself, whose tree is the text's tree with a ParamRef where each constant was. Every
        rule that reads a constant's value (a name argument of ``nextval``..., a cast of a
        string to an OID alias type such as ``regclass``) accepts only a string *constant* and
        refuses a parameter, so a shape that holds such a position is refused and its texts
        are classified one by one, exactly as ``classify`` does. A shape that is accepted
        therefore has no rule looking at any constant: every text of it gets the same verdict
        from ``classify`` (the same statement, functions, relations and schemas). Only READ
        and WRITE shapes are shared; DDL (function bodies are string constants checked by
        their content) and everything refused always go by exact text. A text that does not
        normalise, or has no constant, goes by exact text too."""
        shared = tuple(shared_schemas)
        self._check_text(sql)
        try:
            normalized = pglast.parser.normalize(sql)
        except ParseError:
            normalized = sql
        if normalized == sql:
            return self.classify(sql, own_schema=own_schema, shared_schemas=shared)
        key = (normalized, own_schema, shared)
        with self._lock:
            shape = self._shapes.get(key)
            if shape is not None:
                self._shapes.move_to_end(key)
        if shape is None:
            shape = self._shape(sql, normalized, own_schema, shared)
            with self._lock:
                self._shapes[key] = shape
                if len(self._shapes) > self._cache_size:
                    self._shapes.popitem(last=False)
        if shape is False:
            return self.classify(sql, own_schema=own_schema, shared_schemas=shared)
        return shape

    def shape_known(
        self, normalized: str, own_schema: str, shared_schemas: Collection[str]
    ) -> bool:
        """Whether ``classify_shape`` holds one verdict for every text of this normalised
        shape now (not "by exact text"): the wire port's relay (pgwire/relay.py) runs such
        texts without asking again."""
        with self._lock:
            shape = self._shapes.get((normalized, own_schema, tuple(shared_schemas)))
        return isinstance(shape, Classification)

    def _shape(
        self, sql: str, normalized: str, own_schema: str, shared: tuple[str, ...]
    ) -> Classification | Literal[False]:
        """The verdict every text of ``normalized``'s shape gets, or False: by exact text."""
        try:
            verdict = self.classify(normalized, own_schema=own_schema, shared_schemas=shared)
        except (SqlRejected, SqlSyntaxError, PayloadTooLarge, InvalidText):
            return False
        if verdict.kind not in (StatementKind.READ, StatementKind.WRITE):
            return False
        # The statistics' identity of the texts (the same for every text of the shape).
        fingerprint, text = _identity(sql)
        return dataclasses.replace(verdict, fingerprint=fingerprint, normalized=text)

    def _worker(self) -> ProcessPoolExecutor:
        with self._lock:
            return self._start_worker()

    async def start_worker(self) -> None:
        """Start the worker process now (the composition root does, at start), off the event
        loop: its start-up (a Python importing pglast) is not the first large statement's."""
        await asyncio.get_running_loop().run_in_executor(None, self._worker)

    def _start_worker(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn, not fork: the service's process holds threads (gRPC) a fork would copy.
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(self._max_bytes, self._max_tokens, self._catalog),
            )
            # Started now (on this thread), not on the first submit (on the event loop's).
            self._executor.submit(int).result()
        return self._executor

    def _cached(
        self, sql: str, own_schema: str, shared_schemas: Collection[str]
    ) -> Classification | SqlRejected | None:
        with self._lock:
            return self._cache.get((sql, own_schema, tuple(shared_schemas)))

    def classify(
        self, sql: str, *, own_schema: str, shared_schemas: Collection[str] = ("shared",)
    ) -> Classification:
        key = (sql, own_schema, tuple(shared_schemas))
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            try:
                self._check_text(sql)
                cached = self._classify(
                    sql, _Scope(own_schema, frozenset(shared_schemas), self._catalog)
                )
            except (SqlRejected, SqlSyntaxError) as exc:
                cached = exc
            except (PayloadTooLarge, InvalidText):
                raise  # not cached: the text itself is refused before any work
            self._keep(key, cached)
        return self._answer(cached)

    def _keep(
        self, key: tuple[str, str, tuple[str, ...]], verdict: Classification | SqlRejected
    ) -> None:
        """Keep a text's verdict, unless the text is long: the cache is bounded by entries, and
        a caller's texts may be up to ``max_sql_bytes`` each (4,096 of 1 MiB would be 4 GiB)."""
        if len(key[0]) > KEPT_CHARS:
            return
        with self._lock:
            self._cache[key] = verdict
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    @staticmethod
    def _answer(verdict: Classification | SqlRejected) -> Classification:
        if isinstance(verdict, SqlRejected):
            # A fresh exception each time: raising the cached one would grow its traceback.
            raise type(verdict)(
                verdict.message, sqlstate=verdict.sqlstate, position=verdict.position
            )
        return verdict

    @property
    def cached(self) -> int:
        return len(self._cache)

    def _check_text(self, sql: str) -> None:
        if len(sql) > self._max_bytes:
            raise PayloadTooLarge(
                f"SQL of {len(sql)} characters exceeds the limit of {self._max_bytes} bytes"
            )
        try:
            size = len(sql.encode())
        except UnicodeEncodeError as exc:
            raise InvalidText(
                f"SQL is not valid Unicode text: {exc.reason} at character {exc.start}",
                sqlstate="22021",
            ) from None
        if size > self._max_bytes:
            raise PayloadTooLarge(
                f"SQL of {size} bytes exceeds the limit of {self._max_bytes} bytes"
            )
        if "\x00" in sql:
            raise InvalidText(
                f"SQL contains a NUL character at {sql.index(chr(0))}", sqlstate="22021"
            )
        if size > self._max_tokens:  # fewer bytes than the limit cannot hold more tokens
            tokens = _TOKEN.subn("", sql)[1]
            if tokens > self._max_tokens:
                raise PayloadTooLarge(
                    f"SQL of about {tokens} tokens exceeds the limit of {self._max_tokens}: send"
                    " values as parameters (an array parameter holds any number) or use the bulk"
                    " API"
                )

    def _parse(self, sql: str) -> list[Any]:
        try:
            return list(pglast.parse_sql(sql))
        except ParseError as exc:
            message, index = (*exc.args, None)[:2] if exc.args else (str(exc), None)
            raise SqlSyntaxError(
                str(message),
                sqlstate="42601",
                position=index + 1 if isinstance(index, int) else None,
            ) from None

    def _classify(self, sql: str, scope: _Scope) -> Classification:
        tree = self._parse(sql)
        if not tree:
            raise SqlSyntaxError("empty statement", sqlstate="42601")
        if len(tree) > 1:
            raise SqlRejected(
                f"multiple statements in one request are not allowed (found {len(tree)})",
                sqlstate="42501",
            )
        verdict = self._check_statement(tree[0], scope, sql)
        fingerprint, normalized = _identity(sql)
        return dataclasses.replace(verdict, fingerprint=fingerprint, normalized=normalized)

    def _check_statement(self, raw: Any, scope: _Scope, sql: str) -> Classification:
        name = type(raw.stmt).__name__
        if name in _REFUSED:
            raise _refuse(_REFUSED[name])
        walk = _Walk(scope)
        walk(raw)
        verdict = self._statement(raw.stmt, walk, scope, sql)
        if walk.problem is not None:
            raise walk.problem
        return verdict

    def _statement(self, stmt: Any, walk: _Walk, scope: _Scope, sql: str) -> Classification:
        name = type(stmt).__name__
        if name == "ExplainStmt":
            costs = True
            for option in stmt.options or ():
                defname = (option.defname or "").lower()
                if defname in _EXPLAIN_REFUSED and _option_on(option):
                    raise _refuse(_EXPLAIN_REFUSED[defname])
                if defname == "costs":
                    costs = _option_on(option)
            if costs:
                raise _refuse(
                    "EXPLAIN needs COSTS OFF: plan estimates are computed from every tenant's"
                    " rows of the shared tables"
                )
            inner = self._statement(stmt.query, walk, scope, sql)
            if inner.kind is StatementKind.DDL:
                raise _refuse("EXPLAIN of DDL is not allowed")
            return Classification(StatementKind.READ, "EXPLAIN", repeatable=True)  # runs nothing
        if name == "SelectStmt":
            if walk.into:
                self._ddl_targets([stmt.intoClause.rel], scope)
                return Classification(StatementKind.DDL, "SELECT INTO")
            if walk.writes or walk.locking:
                return Classification(StatementKind.WRITE, "SELECT")
            return Classification(StatementKind.READ, "SELECT", repeatable=not walk.side_effects)
        if name == "VariableShowStmt":
            return Classification(StatementKind.READ, "SHOW", repeatable=True)
        if name in _WRITES:
            return Classification(StatementKind.WRITE, _WRITES[name])
        if name in _DDL:
            self._check_ddl(stmt, name, scope, sql)
            return Classification(StatementKind.DDL, _DDL[name])
        if name in _REFUSED:
            raise _refuse(_REFUSED[name])
        statement = name.removesuffix("Stmt")
        raise _refuse(f"{statement} statements are not allowed")

    def _check_ddl(self, stmt: Any, name: str, scope: _Scope, sql: str) -> None:
        own = scope.own
        targets: list[Any] = []
        for attr in ("relation", "view", "sequence", "typevar"):
            value = getattr(stmt, attr, None)
            if isinstance(value, ast.RangeVar):
                targets.append(value)
        if name == "CreateTableAsStmt":
            targets.append(stmt.into.rel)
        if name == "TruncateStmt":
            targets.extend(stmt.relations or ())
        if name == "CreateStmt":
            # A child of another schema's table would put rows into that table's scans.
            targets.extend(stmt.inhRelations or ())
        qualified: list[list[str]] = []
        if name == "DropStmt":
            for obj in stmt.objects or ():
                if isinstance(obj, ast.TypeName):
                    qualified.append(_names(obj.names))
                elif isinstance(obj, ast.ObjectWithArgs):
                    qualified.append(_names(obj.objname))
                elif isinstance(obj, tuple):
                    qualified.append(_names(obj))
        if name == "CreateFunctionStmt":
            qualified.append(_names(stmt.funcname))
            self._check_function(stmt, scope, sql)
        if name == "CreateTrigStmt":
            parts = _names(stmt.funcname)
            schema = parts[-2] if len(parts) > 1 else None
            function = parts[-1].lower() if parts else ""
            catalog = schema == "pg_catalog" or (schema is None and function in scope.catalog)
            if (schema is not None and schema not in {own, "pg_catalog"}) or (
                catalog and function not in _CATALOG_TRIGGER_FUNCTIONS
            ):
                raise _refuse(f"a trigger may only run your own functions, not {function}")
        if name in ("CreateEnumStmt", "CreateDomainStmt"):
            qualified.append(_names(stmt.typeName if name == "CreateEnumStmt" else stmt.domainname))
        if name == "AlterTableStmt":
            for cmd in stmt.cmds or ():
                if cmd.subtype in _RLS_SUBCOMMANDS:
                    raise _refuse(
                        "row-level security, ownership and inheritance are managed by the service"
                    )
        self._ddl_targets(targets, scope)
        for parts in qualified:
            if len(parts) > 1 and parts[-2] != own:
                raise _refuse(f"DDL may only change your own schema {own}, not {parts[-2]}")

    def _ddl_targets(self, targets: Iterable[Any], scope: _Scope) -> None:
        for target in targets:
            schema = getattr(target, "schemaname", None)
            if schema is not None and schema != scope.own:
                raise _refuse(f"DDL may only change your own schema {scope.own}, not {schema}")
            if getattr(target, "relpersistence", "p") == "t":
                raise _refuse("temporary objects are not allowed")

    # --- function bodies -------------------------------------------------------------------

    def _check_function(self, stmt: Any, scope: _Scope, sql: str) -> None:
        language = "sql"
        body: str | None = None
        for option in stmt.options or ():
            if option.defname == "security" and getattr(option.arg, "boolval", False):
                raise _refuse("SECURITY DEFINER functions are not allowed")
            if option.defname == "language":
                language = option.arg.sval.lower()
            if option.defname == "set":
                raise _refuse("functions may not SET configuration")
            if option.defname == "as":
                parts = _names(option.arg)
                body = parts[0] if parts else None
        if language not in _TRUSTED_LANGUAGES:
            raise _refuse(f"functions in language {language} are not allowed (use sql or plpgsql)")
        if language == "sql":
            if body is not None:  # BEGIN ATOMIC / RETURN bodies are part of the tree already
                self._check_sql_body(body, scope)
            return
        self._check_plpgsql(sql, scope)

    def _check_sql_body(self, body: str, scope: _Scope) -> None:
        for raw in self._parse(body):
            verdict = self._check_statement(raw, scope, body)
            if verdict.kind is StatementKind.DDL:
                raise _refuse("DDL is not allowed in a function body")

    def _check_plpgsql(self, sql: str, scope: _Scope) -> None:
        try:
            tree = json.loads(parse_plpgsql_json(sql))
        except ParseError as exc:
            message = exc.args[0] if exc.args else exc
            raise SqlSyntaxError(f"PL/pgSQL: {message}", sqlstate="42601") from None
        self._plpgsql_node(tree, scope)

    _DYNAMIC = {
        "PLpgSQL_stmt_dynexecute": "query",
        "PLpgSQL_stmt_dynfors": "query",
        "PLpgSQL_stmt_return_query": "dynquery",
        "PLpgSQL_stmt_open": "dynquery",
    }

    def _plpgsql_node(self, node: Any, scope: _Scope) -> None:
        if isinstance(node, list):
            for item in node:
                self._plpgsql_node(item, scope)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if key == "PLpgSQL_expr":
                self._plpgsql_expr(value, scope)
                continue
            if key == "PLpgSQL_type":
                self._plpgsql_type(value.get("typname", ""), scope)
            dynamic = self._DYNAMIC.get(key)
            rest = value
            if dynamic is not None and isinstance(value, dict) and dynamic in value:
                self._plpgsql_dynamic(value[dynamic].get("PLpgSQL_expr", {}), scope)
                rest = {k: v for k, v in value.items() if k != dynamic}
            self._plpgsql_node(rest, scope)

    def _plpgsql_type(self, typname: str, scope: _Scope) -> None:
        name = typname.strip().rstrip("[]").strip().lower()
        parts = [p.strip('" ') for p in name.split(".")]
        if len(parts) > 1 and parts[-2] not in scope.schemas:
            raise _refuse(f"reference to schema {parts[-2]} is not allowed")
        if parts[-1] in NAME_TYPES or parts[-1] in TRANSACTION_ID_TYPES:
            raise _refuse(f"variables of type {parts[-1]} are not allowed")

    def _plpgsql_expr(self, expr: dict[str, Any], scope: _Scope) -> None:
        query = expr.get("query", "")
        mode = expr.get("parseMode", 0)
        if mode == 0:  # a whole statement
            for raw in self._parse(query):
                self._check_statement(raw, scope, query)
            return
        if mode in (3, 4, 5):  # "target := expression"
            for separator in (":=", "="):
                if separator in query:
                    query = query.split(separator, 1)[1]
                    break
        for raw in self._parse(f"SELECT {query}"):
            self._check_statement(raw, scope, query)

    def _plpgsql_dynamic(self, expr: dict[str, Any], scope: _Scope) -> None:
        """EXECUTE of a string: checked when it is a constant, refused when computed."""
        tree = self._parse(f"SELECT {expr.get('query', '')}")
        target = tree[0].stmt.targetList if tree else None
        text = _string_constant(target[0].val) if target and len(target) == 1 else None
        if text is None:
            raise _refuse(
                "EXECUTE of a string computed at run time is not allowed in functions: the"
                " service cannot check SQL it never sees; use static SQL with variables"
            )
        for raw in self._parse(text):
            self._check_statement(raw, scope, text)


# --- the worker process ------------------------------------------------------------------------

_worker_guard: SqlGuard | None = None  # one per worker process, made by its initializer


def _start_worker(max_bytes: int, max_tokens: int, catalog: frozenset[str]) -> None:
    global _worker_guard  # noqa: PLW0603 - the worker process's own guard
    _worker_guard = SqlGuard(
        max_sql_bytes=max_bytes, max_sql_tokens=max_tokens, catalog_functions=catalog
    )
    # A service killed outright (SIGKILL, OOM) cannot shut its worker down: the worker leaves
    # by itself when its parent is gone.
    parent = os.getppid()

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=orphaned, name="sqlguard-parent", daemon=True).start()


def _classify_in_worker(
    sql: str, own_schema: str, shared_schemas: tuple[str, ...]
) -> tuple[Any, ...]:
    """A verdict as plain values (exceptions with keyword arguments do not pickle whole)."""
    assert _worker_guard is not None
    try:
        verdict = _worker_guard.classify(sql, own_schema=own_schema, shared_schemas=shared_schemas)
    except (SqlRejected, PayloadTooLarge, InvalidText) as exc:
        return ("error", type(exc).__name__, exc.message, exc.sqlstate, exc.position)
    return (
        "ok",
        verdict.kind.value,
        verdict.tag,
        verdict.repeatable,
        verdict.fingerprint,
        verdict.normalized,
    )
