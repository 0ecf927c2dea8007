"""The SQL guard: the second isolation layer, in front of PostgreSQL's own.

Every statement is parsed by PostgreSQL's parser (pglast), never matched with regexes, then:

1. exactly one statement is allowed;
2. it is classified as READ (SELECT/VALUES/TABLE without locking or INTO, SHOW, EXPLAIN of a
   read), WRITE (INSERT/UPDATE/DELETE/MERGE, locking SELECTs, data-modifying CTEs, EXPLAIN
   ANALYZE of a write) or DDL (objects in the tenant's own schema); everything else — transaction
   control, SET/RESET, roles, DO, COPY, LISTEN/NOTIFY, PREPARE, cursors, GRANT, extensions… — is
   rejected;
3. the whole tree is walked: functions that reach outside the tenant (files, advisory locks,
   other sessions, dynamic SQL in XML helpers, catalog definitions) are rejected, as are most
   ``pg_*`` functions (deny by default); references to schemas other than the tenant's own, the
   shared schemas, ``pg_catalog`` and ``information_schema`` are rejected, and so are catalog
   relations that expose other tenants' objects;
4. DDL may only target the tenant's own schema, never with SECURITY DEFINER, never in an
   untrusted language, never touching row-level security or ownership.

PostgreSQL stays the authority: whatever passes here still runs as the tenant's own role.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast
from pglast.enums import AlterTableType
from pglast.parser import ParseError
from pglast.visitors import Visitor

from database_service.errors import PayloadTooLarge, SqlRejected, SqlSyntaxError

__all__ = ["Classification", "SqlGuard", "StatementKind"]


class StatementKind(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    DDL = "ddl"


@dataclass(frozen=True, slots=True)
class Classification:
    kind: StatementKind
    tag: str

    @property
    def readonly(self) -> bool:
        return self.kind is StatementKind.READ


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
}
_RLS_SUBCOMMANDS = {
    AlterTableType.AT_EnableRowSecurity,
    AlterTableType.AT_DisableRowSecurity,
    AlterTableType.AT_ForceRowSecurity,
    AlterTableType.AT_NoForceRowSecurity,
    AlterTableType.AT_ChangeOwner,
}

# pg_* functions a tenant may call; every other pg_* function is refused (deny by default).
_PG_FUNCTIONS_ALLOWED = {
    "pg_sleep", "pg_sleep_for", "pg_sleep_until", "pg_typeof", "pg_column_size",
    "pg_size_pretty", "pg_size_bytes", "pg_input_is_valid", "pg_input_error_info",
    "pg_current_xact_id", "pg_backend_pid",
}  # fmt: skip
_FUNCTIONS_DENIED = {"set_config", "dblink", "current_setting_set"}
_FUNCTION_PREFIXES_DENIED = (
    "lo_", "dblink", "query_to_xml", "cursor_to_xml", "table_to_xml", "schema_to_xml",
    "database_to_xml", "query_to_xmlschema", "cursor_to_xmlschema", "table_to_xmlschema",
)  # fmt: skip
# Catalog relations with nothing of other tenants in them.
_CATALOG_ALLOWED = {
    "pg_type", "pg_enum", "pg_range", "pg_am", "pg_collation", "pg_operator", "pg_opclass",
    "pg_timezone_names", "pg_timezone_abbrevs",
}  # fmt: skip
_ALWAYS_ALLOWED_SCHEMAS = {"pg_catalog", "information_schema"}
_TRUSTED_LANGUAGES = {"sql", "plpgsql"}


def _names(parts: Iterable[Any] | None) -> list[str]:
    """String values of a qualified name (pglast tuples of ast.String)."""
    return [p.sval for p in parts or () if isinstance(p, ast.String) and p.sval is not None]


class _Walk(Visitor):
    """Collects what the rules look at, in one pass over the tree."""

    def __init__(self) -> None:
        self.functions: list[tuple[str | None, str]] = []
        self.relations: list[tuple[str | None, str]] = []
        self.type_schemas: list[str] = []
        self.writes = False
        self.locking = False
        self.into = False
        self.variable_sets = False

    def visit_FuncCall(self, ancestors: Any, node: ast.FuncCall) -> None:
        parts = _names(node.funcname)
        self.functions.append((parts[-2] if len(parts) > 1 else None, parts[-1].lower()))

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> None:
        self.relations.append((node.schemaname, node.relname or ""))

    def visit_TypeName(self, ancestors: Any, node: ast.TypeName) -> None:
        parts = _names(node.names)
        if len(parts) > 1:
            self.type_schemas.append(parts[-2])

    def visit_InsertStmt(self, ancestors: Any, node: Any) -> None:
        self.writes = True

    visit_UpdateStmt = visit_DeleteStmt = visit_MergeStmt = visit_InsertStmt

    def visit_LockingClause(self, ancestors: Any, node: Any) -> None:
        self.locking = True

    def visit_IntoClause(self, ancestors: Any, node: Any) -> None:
        self.into = True

    def visit_VariableSetStmt(self, ancestors: Any, node: Any) -> None:
        self.variable_sets = True


class SqlGuard:
    def __init__(self, *, max_sql_bytes: int = 1_048_576, cache_size: int = 4096) -> None:
        self._max_bytes = max_sql_bytes
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...]], Classification | SqlRejected] = (
            OrderedDict()
        )

    def classify(
        self, sql: str, *, own_schema: str, shared_schemas: Collection[str] = ("shared",)
    ) -> Classification:
        if len(sql) > self._max_bytes or len(sql.encode()) > self._max_bytes:
            raise PayloadTooLarge(
                f"SQL of {len(sql.encode())} bytes exceeds the limit of {self._max_bytes} bytes"
            )
        key = (sql, own_schema, tuple(shared_schemas))
        cached = self._cache.get(key)
        if cached is None:
            try:
                cached = self._classify(sql, own_schema, frozenset(shared_schemas))
            except (SqlRejected, SqlSyntaxError) as exc:
                cached = exc
            self._cache[key] = cached
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if isinstance(cached, SqlRejected):
            # A fresh exception each time: raising the cached one would grow its traceback.
            raise type(cached)(cached.message, sqlstate=cached.sqlstate, position=cached.position)
        return cached

    @property
    def cached(self) -> int:
        return len(self._cache)

    def _classify(self, sql: str, own: str, shared: frozenset[str]) -> Classification:
        try:
            tree = pglast.parse_sql(sql)
        except ParseError as exc:
            message, index = (*exc.args, None)[:2] if exc.args else (str(exc), None)
            raise SqlSyntaxError(
                str(message),
                sqlstate="42601",
                position=index + 1 if isinstance(index, int) else None,
            ) from None
        if not tree:
            raise SqlSyntaxError("empty statement", sqlstate="42601")
        if len(tree) > 1:
            raise SqlRejected(
                f"multiple statements in one request are not allowed (found {len(tree)})",
                sqlstate="42501",
            )
        stmt = tree[0].stmt
        walk = _Walk()
        walk(tree[0])
        verdict = self._statement(stmt, walk, own, shared)
        self._check_tree(walk, own, shared)
        return verdict

    def _statement(
        self, stmt: Any, walk: _Walk, own: str, shared: frozenset[str]
    ) -> Classification:
        name = type(stmt).__name__
        if name == "ExplainStmt":
            analyze = any(
                isinstance(o, ast.DefElem) and o.defname == "analyze" for o in stmt.options or ()
            )
            inner = self._statement(stmt.query, walk, own, shared)
            if inner.kind is StatementKind.DDL:
                raise SqlRejected("EXPLAIN of DDL is not allowed", sqlstate="42501")
            return Classification(inner.kind if analyze else StatementKind.READ, "EXPLAIN")
        if name == "SelectStmt":
            if walk.into:
                self._ddl_targets([stmt.intoClause.rel], own, shared)
                return Classification(StatementKind.DDL, "SELECT INTO")
            kind = StatementKind.WRITE if walk.writes or walk.locking else StatementKind.READ
            return Classification(kind, "SELECT")
        if name == "VariableShowStmt":
            return Classification(StatementKind.READ, "SHOW")
        if name in _WRITES:
            return Classification(StatementKind.WRITE, _WRITES[name])
        if name in _DDL:
            self._check_ddl(stmt, name, own, shared)
            return Classification(StatementKind.DDL, _DDL[name])
        if name in _REFUSED:
            raise SqlRejected(_REFUSED[name], sqlstate="42501")
        statement = name.removesuffix("Stmt")
        raise SqlRejected(f"{statement} statements are not allowed", sqlstate="42501")

    def _check_ddl(self, stmt: Any, name: str, own: str, shared: frozenset[str]) -> None:
        targets: list[Any] = []
        for attr in ("relation", "view", "sequence", "typevar"):
            value = getattr(stmt, attr, None)
            if isinstance(value, ast.RangeVar):
                targets.append(value)
        if name == "CreateTableAsStmt":
            targets.append(stmt.into.rel)
        if name == "TruncateStmt":
            targets.extend(stmt.relations or ())
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
            for option in stmt.options or ():
                if option.defname == "security" and getattr(option.arg, "boolval", False):
                    raise SqlRejected(
                        "SECURITY DEFINER functions are not allowed", sqlstate="42501"
                    )
                if option.defname == "language":
                    language = option.arg.sval.lower()
                    if language not in _TRUSTED_LANGUAGES:
                        raise SqlRejected(
                            f"functions in language {language} are not allowed"
                            " (use sql or plpgsql)",
                            sqlstate="42501",
                        )
                if option.defname == "set":
                    raise SqlRejected("functions may not SET configuration", sqlstate="42501")
        if name in ("CreateEnumStmt", "CreateDomainStmt"):
            qualified.append(_names(stmt.typeName if name == "CreateEnumStmt" else stmt.domainname))
        if name == "AlterTableStmt":
            for cmd in stmt.cmds or ():
                if cmd.subtype in _RLS_SUBCOMMANDS:
                    raise SqlRejected(
                        "row-level security and ownership are managed by the service",
                        sqlstate="42501",
                    )
        self._ddl_targets(targets, own, shared)
        for parts in qualified:
            if len(parts) > 1 and parts[-2] != own:
                raise SqlRejected(
                    f"DDL may only change your own schema {own}, not {parts[-2]}", sqlstate="42501"
                )

    def _ddl_targets(self, targets: Iterable[Any], own: str, shared: frozenset[str]) -> None:
        for target in targets:
            schema = getattr(target, "schemaname", None)
            if schema is not None and schema != own:
                raise SqlRejected(
                    f"DDL may only change your own schema {own}, not {schema}", sqlstate="42501"
                )
            if getattr(target, "relpersistence", "p") == "t":
                raise SqlRejected("temporary objects are not allowed", sqlstate="42501")

    def _check_tree(self, walk: _Walk, own: str, shared: frozenset[str]) -> None:
        if walk.variable_sets:
            raise SqlRejected(
                "SET is not allowed anywhere in a statement: the service owns the session's"
                " settings",
                sqlstate="42501",
            )
        allowed = _ALWAYS_ALLOWED_SCHEMAS | shared | {own}
        for schema, function in walk.functions:
            if schema is not None and schema not in allowed:
                raise SqlRejected(f"reference to schema {schema} is not allowed", sqlstate="42501")
            denied = (
                function in _FUNCTIONS_DENIED
                or function.startswith(_FUNCTION_PREFIXES_DENIED)
                or (function.startswith("pg_") and function not in _PG_FUNCTIONS_ALLOWED)
            )
            if denied:
                raise SqlRejected(f"function {function} is not allowed", sqlstate="42501")
        for schema, relation in walk.relations:
            if schema is not None and schema not in allowed:
                raise SqlRejected(f"reference to schema {schema} is not allowed", sqlstate="42501")
            catalog = schema == "pg_catalog" or (schema is None and relation.startswith("pg_"))
            if catalog and relation not in _CATALOG_ALLOWED:
                raise SqlRejected(
                    f"catalog relation {relation} is not allowed: it exposes other tenants'"
                    " objects",
                    sqlstate="42501",
                )
        for schema in walk.type_schemas:
            if schema not in allowed:
                raise SqlRejected(f"reference to schema {schema} is not allowed", sqlstate="42501")
