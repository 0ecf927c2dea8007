"""Tenant-writable ClickHouse tables: the guard for ``CREATE TABLE``, ``DROP TABLE`` and
``INSERT`` in a tenant's own ClickHouse database.

A tenant's database (``tenant_<id>``) holds the views of its replicated rows (read-only: a view
takes no insert) and the tables it creates itself. Like the SELECT guard (``analytics.guard``),
every check runs on ClickHouse's own parse tree (``parseQueryToJSON``), allow-list style: a key
or node this module does not know is refused, not passed.

``CREATE TABLE``
    a MergeTree family engine only (``MergeTree``, ``ReplacingMergeTree``, ``SummingMergeTree``,
    ``AggregatingMergeTree``, ``CollapsingMergeTree``, ``VersionedCollapsingMergeTree``) — no
    engine that reaches outside the table (File, URL, S3, PostgreSQL, MySQL, Distributed, Merge,
    Dictionary, Buffer, Join, Set, …, nor the Replicated/Shared variants that name a keeper path);
    no ``AS SELECT``, ``AS other_table``, ``AS table_function()``, ``CLONE AS``, views,
    dictionaries, ``ATTACH``, temporary tables or ``OR REPLACE``; no settings of the caller's
    (the service sets ``non_replicated_deduplication_window``, which makes
    ``insert_deduplication_token`` work on a non-replicated table); no projections; TTL only as
    ``DELETE``. Expressions (defaults, keys, TTL, constraints, index expressions) pass the SELECT
    guard's function allow-list and may name no table. The table lands in the tenant's database
    whatever database the text named (another one is refused).
``DROP TABLE``
    one of the tenant's own tables, never a view of its replicated rows.
``INSERT``
    ``INSERT INTO <own table> (col, …) VALUES (<placeholder>, …)``, one row, every value a
    placeholder: ``$1``, ``$2`` … with a sequence of parameters, or ``:name`` / ``%(name)s`` with
    a mapping. ClickHouse parses the target and the column list; the service then builds the
    insert itself from those checked names, and the values travel as one JSONEachRow line — data
    ClickHouse's input format parses, never SQL text.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from database_service.analytics.guard import AnalyticsGuard, ExpressionWalk
from database_service.errors import InvalidParameters, SqlRejected

__all__ = [
    "DEDUP_WINDOW",
    "MERGE_TREE_ENGINES",
    "CheckedCreate",
    "CheckedDrop",
    "CheckedInsert",
    "TableGuard",
    "is_table_ddl",
    "row_json",
]

MERGE_TREE_ENGINES = frozenset(
    {
        "MergeTree",
        "ReplacingMergeTree",
        "SummingMergeTree",
        "AggregatingMergeTree",
        "CollapsingMergeTree",
        "VersionedCollapsingMergeTree",
    }
)
DEDUP_WINDOW = 1000  # recent insert tokens a tenant table remembers
MAX_COLUMNS = 500
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DDL = re.compile(r"^\s*(CREATE|DROP)\b", re.IGNORECASE)
_INSERT = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<head>.+?)\s*VALUES\s*\((?P<values>(?:[^()]|%\([A-Za-z0-9_]*\))*)\)\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_POSITIONAL = re.compile(r"^\$([1-9][0-9]{0,3})$")
_NAMED = re.compile(r"^(?::([A-Za-z_][A-Za-z0-9_]*)|%\(([A-Za-z_][A-Za-z0-9_]*)\)s)$")
_OUTFILE_FLAGS = ("is_outfile_append", "is_outfile_truncate", "is_into_outfile_with_stdout")
# CREATE keys that must be absent or false: each makes the statement something else than a new
# MergeTree table of the tenant's own (a view, a dictionary, a copy of another table, …).
_CREATE_FALSE = (
    "attach",
    "is_ordinary_view",
    "is_materialized_view",
    "is_time_series_table",
    "is_populate",
    "is_create_empty",
    "is_clone_as",
    "replace_view",
    "has_uuid",
    "has_uuid_clause",
    "has_inner_uuid_clause",
    "is_dictionary",
    "replace_table",
    "create_or_replace",
    "has_attach_from_path",
    "is_temporary",
    *_OUTFILE_FLAGS,
)
_CREATE_KEYS = frozenset(
    {"type", "database", "table", "database_ast", "table_ast", "if_not_exists"}
    | {"columns_list", "storage", "comment"}
    | set(_CREATE_FALSE)
)
_CREATE_REFUSED = {
    "select": "CREATE TABLE … AS SELECT is not allowed: create the table, then insert",
    "as_table": "CREATE TABLE … AS another table is not allowed: list the columns",
    "as_database": "CREATE TABLE … AS another table is not allowed: list the columns",
    "as_table_function": "CREATE TABLE … AS a table function is not allowed",
    "to_table_id": "materialized views are not allowed",
    "to_table": "materialized views are not allowed",
    "dictionary": "dictionaries are not allowed",
    "dictionary_attributes_list": "dictionaries are not allowed",
    "uuid": "CREATE TABLE … UUID is not allowed",
    "cluster": "ON CLUSTER is not allowed",
}
_COLUMN_KEYS = frozenset(
    {
        "type",
        "name",
        "default_specifier",
        "ephemeral_default",
        "primary_key_specifier",
        "data_type",
        "default_expression",
        "codec",
        "comment",
        "null_modifier",
    }
)
_DATA_TYPE_NODES = frozenset(
    {"DataType", "EnumDataType", "TupleDataType", "NameTypePair", "ExpressionList", "Literal"}
)
_DATA_TYPE_KEYS = frozenset(
    {"type", "name", "arguments", "children", "values", "value", "element_names", "name_type"}
    | {"field_type"}
)
_CODECS = frozenset(
    {"NONE", "LZ4", "LZ4HC", "ZSTD", "Delta", "DoubleDelta", "Gorilla", "T64", "FPC", "GCD"}
)
_INDEX_TYPES = frozenset(
    {"minmax", "set", "bloom_filter", "ngrambf_v1", "tokenbf_v1", "text"}
)  # skipping indexes over the table's own columns
_STORAGE_KEYS = frozenset(
    {"type", "engine", "partition_by", "order_by", "primary_key", "sample_by", "ttl_table"}
)


def is_table_ddl(sql: str) -> bool:
    """``CREATE …``/``DROP …``: the analytics query API's table statements (the rest is SELECT).
    Only routing: the statement is checked on its parse tree."""
    return _DDL.match(sql) is not None


@dataclass(frozen=True, slots=True)
class CheckedCreate:
    table: str
    if_not_exists: bool
    sql: str  # what runs: ClickHouse's printing of the checked tree, in the tenant's database


@dataclass(frozen=True, slots=True)
class CheckedDrop:
    table: str
    if_exists: bool


@dataclass(frozen=True, slots=True)
class CheckedInsert:
    table: str
    columns: tuple[str, ...]
    placeholders: tuple[str | int, ...]  # parameter names, or 0-based positions

    def row(self, params: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
        """The row to insert: each column's value from ``params``."""
        if isinstance(params, Mapping):
            if any(isinstance(p, int) for p in self.placeholders):
                raise InvalidParameters(
                    "this INSERT uses $n placeholders: pass the parameters as a list"
                )
            missing = [p for p in self.placeholders if p not in params]
            if missing:
                raise InvalidParameters(f"no value for parameter(s) {', '.join(map(str, missing))}")
            return {c: params[str(p)] for c, p in zip(self.columns, self.placeholders, strict=True)}
        if isinstance(params, str | bytes) or not isinstance(params, Sequence):
            raise InvalidParameters("parameters are a list ($n) or an object (:name)")
        if any(isinstance(p, str) for p in self.placeholders):
            raise InvalidParameters(
                "this INSERT uses named placeholders: pass the parameters as an object"
            )
        positions = [int(p) for p in self.placeholders]
        if max(positions) >= len(params):
            raise InvalidParameters(
                f"the INSERT uses ${max(positions) + 1} but {len(params)} parameter(s) were given"
            )
        return {c: params[p] for c, p in zip(self.columns, positions, strict=True)}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidParameters("NaN and infinite numbers cannot be inserted")
        return value
    if isinstance(value, Decimal):
        return str(value)  # exact: ClickHouse reads a quoted number into a Decimal column
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    raise InvalidParameters(f"a value of type {type(value).__name__} cannot be inserted")


def row_json(row: Mapping[str, Any]) -> str:
    """One JSONEachRow line (datetimes in UTC, decimals exact)."""
    return json.dumps({k: _json_value(v) for k, v in row.items()}, separators=(",", ":"))


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise SqlRejected(
            f"{what} {str(value)[:80]!r}: use letters, digits and '_' (at most 63, not first digit)"
        )
    return value


def _identifier_parts(node: Any) -> list[str]:
    if not isinstance(node, dict) or node.get("type") not in {"Identifier", "TableIdentifier"}:
        raise SqlRejected("unsupported table name")
    parts = node.get("name_parts")
    if not isinstance(parts, list):
        parts = [node.get("name")]
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise SqlRejected("unsupported table name")
    return parts


class TableGuard:
    """Checks a tenant's table statements; ``guard`` lends its parser and function allow-list."""

    def __init__(self, guard: AnalyticsGuard) -> None:
        self._guard = guard

    def _database(self, named: str, database: str) -> None:
        if named and named != database:
            raise SqlRejected(
                f"tables are created, dropped and written in this tenant's own database only,"
                f" not {named[:80]}"
            )

    def _expression(self, node: Any, database: str) -> None:
        """A column default, key, TTL or constraint: functions on the allow-list, no table."""
        ExpressionWalk(self._guard.catalog, database).node(node)

    # -- CREATE TABLE -------------------------------------------------------------------------

    async def check_create(
        self, sql: str, *, database: str, reserved: Iterable[str]
    ) -> CheckedCreate:
        tree = await self._guard.parse(sql)
        table = self._create_tree(tree, database, set(reserved))
        tree["database"] = database
        tree["database_ast"] = {"type": "Identifier", "name": database}
        tree["storage"]["settings"] = {
            "type": "SetQuery",
            "changes": [
                {
                    "name": "non_replicated_deduplication_window",
                    "value": {"field_type": "UInt64", "value": DEDUP_WINDOW},
                }
            ],
        }
        text = await self._guard.format_tree(tree)
        # What runs is what was checked: the printed text, parsed again, passes again with the
        # service's one setting.
        again = await self._guard.parse(text)
        settings = again.get("storage", {}).pop("settings", None)
        if (
            settings != tree["storage"]["settings"]
            or self._create_tree(again, database, set(reserved)) != table
        ):
            raise SqlRejected("the table definition did not survive a round trip")
        return CheckedCreate(table, bool(tree.get("if_not_exists")), text)

    def _create_tree(self, tree: dict[str, Any], database: str, reserved: set[str]) -> str:
        if tree.get("type") != "CreateQuery":
            raise SqlRejected("only CREATE TABLE is allowed here")
        for key, value in tree.items():
            if key in _CREATE_REFUSED:
                raise SqlRejected(_CREATE_REFUSED[key])
            if key not in _CREATE_KEYS:
                raise SqlRejected(f"unsupported construct in CREATE TABLE ({key})")
            if key in _CREATE_FALSE and value:
                raise SqlRejected(
                    f"only CREATE TABLE [IF NOT EXISTS] name (columns) ENGINE = …MergeTree is"
                    f" allowed ({key.removeprefix('is_').replace('_', ' ')})"
                )
        self._database(str(tree.get("database") or ""), database)
        table = _name(tree.get("table"), "table name")
        if table in reserved:
            raise SqlRejected(
                f"{table} is a replicated table of this tenant (read-only): choose another name"
            )
        columns = tree.get("columns_list")
        if not isinstance(columns, dict):
            raise SqlRejected("CREATE TABLE needs a column list")
        self._columns(columns, database)
        storage = tree.get("storage")
        if not isinstance(storage, dict):
            raise SqlRejected("CREATE TABLE needs ENGINE = a MergeTree family engine")
        self._storage(storage, database)
        comment = tree.get("comment")
        if comment is not None and not (
            isinstance(comment, dict) and comment.get("type") == "Literal"
        ):
            raise SqlRejected("COMMENT takes a string")
        return table

    def _columns(self, node: dict[str, Any], database: str) -> None:
        for key in node:
            if key == "projections":
                raise SqlRejected("projections are not allowed in tenant tables")
            if key not in {"type", "columns", "indices", "constraints"}:
                raise SqlRejected(f"unsupported construct in CREATE TABLE ({key})")
        declared = (node.get("columns") or {}).get("children") or []
        if not declared:
            raise SqlRejected("CREATE TABLE needs at least one column")
        if len(declared) > MAX_COLUMNS:
            raise SqlRejected(f"at most {MAX_COLUMNS} columns a table")
        for column in declared:
            if not isinstance(column, dict) or column.get("type") != "ColumnDeclaration":
                raise SqlRejected("unsupported column definition")
            for key in column:
                if key not in _COLUMN_KEYS:
                    raise SqlRejected(f"unsupported construct in a column definition ({key})")
            _name(column.get("name"), "column name")
            self._data_type(column.get("data_type"))
            if "default_expression" in column:
                self._expression(column["default_expression"], database)
            if "codec" in column:
                self._codec(column["codec"])
        for index in (node.get("indices") or {}).get("children") or []:
            if not isinstance(index, dict) or index.get("type") != "IndexDeclaration":
                raise SqlRejected("unsupported index definition")
            kind = index.get("index_type") or {}
            if kind.get("type") != "Function" or kind.get("name") not in _INDEX_TYPES:
                raise SqlRejected(f"index types: {', '.join(sorted(_INDEX_TYPES))}")
            for arg in (kind.get("arguments") or {}).get("children") or []:
                if not isinstance(arg, dict) or arg.get("type") != "Literal":
                    raise SqlRejected("index type arguments are numbers")
            if set(index) - {"type", "name", "granularity", "expression", "index_type"}:
                raise SqlRejected("unsupported construct in an index definition")
            _name(index.get("name"), "index name")
            self._expression(index.get("expression"), database)
        for constraint in (node.get("constraints") or {}).get("children") or []:
            if not isinstance(constraint, dict) or constraint.get("type") != (
                "ConstraintDeclaration"
            ):
                raise SqlRejected("unsupported constraint definition")
            if set(constraint) - {"type", "name", "constraint_type", "expr"}:
                raise SqlRejected("unsupported construct in a constraint")
            _name(constraint.get("name"), "constraint name")
            self._expression(constraint.get("expr"), database)

    def _data_type(self, node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                self._data_type(v)
            return
        if not isinstance(node, dict):
            return
        kind = node.get("type")
        if kind is not None and kind not in _DATA_TYPE_NODES:
            raise SqlRejected(f"unsupported column type ({kind})")
        if kind is None and set(node) - {"name", "value"}:  # an Enum value
            raise SqlRejected("unsupported column type")
        for key, value in node.items():
            if kind is not None and key not in _DATA_TYPE_KEYS:
                raise SqlRejected(f"unsupported column type ({key})")
            if key in {"arguments", "children", "values", "name_type"}:
                self._data_type(value)
        if node.get("type") == "DataType" and str(node.get("name", "")).startswith("Object"):
            raise SqlRejected("the Object type is not allowed (use JSON)")

    def _codec(self, node: Any) -> None:
        if not isinstance(node, dict) or node.get("name") != "CODEC":
            raise SqlRejected("unsupported codec")
        for codec in (node.get("arguments") or {}).get("children") or []:
            if not isinstance(codec, dict) or codec.get("name") not in _CODECS:
                raise SqlRejected(f"codecs: {', '.join(sorted(_CODECS))}")
            for arg in (codec.get("arguments") or {}).get("children") or []:
                if not isinstance(arg, dict) or arg.get("type") != "Literal":
                    raise SqlRejected("codec arguments are numbers")

    def _storage(self, node: dict[str, Any], database: str) -> None:
        for key in node:
            if key == "settings":
                raise SqlRejected("table SETTINGS are set by the service, not by the statement")
            if key not in _STORAGE_KEYS:
                raise SqlRejected(f"unsupported construct in CREATE TABLE ({key})")
        engine = node.get("engine")
        name = engine.get("name") if isinstance(engine, dict) else None
        if name not in MERGE_TREE_ENGINES:
            raise SqlRejected(
                f"engine {str(name)[:60]} is not allowed: use one of"
                f" {', '.join(sorted(MERGE_TREE_ENGINES))}"
            )
        assert isinstance(engine, dict)
        if set(engine) - {"type", "name", "arguments", "no_empty_args", "kind"}:
            raise SqlRejected("unsupported engine clause")
        if "arguments" in engine:
            self._expression(engine["arguments"], database)
        if "order_by" not in node:
            raise SqlRejected("a MergeTree table needs ORDER BY")
        for key in ("partition_by", "order_by", "primary_key", "sample_by"):
            if key in node:
                self._expression(node[key], database)
        for ttl in (node.get("ttl_table") or {}).get("children") or []:
            if not isinstance(ttl, dict) or ttl.get("type") != "TTLElement":
                raise SqlRejected("unsupported TTL")
            if ttl.get("mode") != "DELETE" or ttl.get("destination_type") != "DELETE":
                raise SqlRejected("TTL may only delete rows (no TO DISK/VOLUME, no GROUP BY)")
            if set(ttl) - {"type", "mode", "destination_type", "if_exists", "ttl_expr", "where"}:
                raise SqlRejected("unsupported TTL clause")
            self._expression(ttl.get("ttl_expr"), database)
            if "where" in ttl:
                self._expression(ttl["where"], database)

    # -- DROP TABLE ---------------------------------------------------------------------------

    async def check_drop(self, sql: str, *, database: str, own: Iterable[str]) -> CheckedDrop:
        tree = await self._guard.parse(sql)
        if tree.get("type") != "DropQuery" or tree.get("kind") != "Drop":
            raise SqlRejected("only DROP TABLE is allowed here")
        allowed = {"type", "database", "table", "kind", "if_exists", "database_ast", "table_ast"}
        flags = {
            "if_empty",
            "has_all",
            "has_tables",
            "not_like",
            "case_insensitive_like",
            "is_dictionary",
            "is_view",
            "sync",
            "permanently",
            *_OUTFILE_FLAGS,
        }
        for key, value in tree.items():
            if key in flags:
                if value and key != "sync":
                    raise SqlRejected("only DROP TABLE [IF EXISTS] name is allowed")
            elif key == "database_and_tables":
                raise SqlRejected("one table per DROP")
            elif key not in allowed:
                raise SqlRejected(f"unsupported construct in DROP TABLE ({key})")
        self._database(str(tree.get("database") or ""), database)
        table = _name(tree.get("table"), "table name")
        if table not in set(own):
            if tree.get("if_exists"):
                return CheckedDrop(table, True)
            raise SqlRejected(
                f"{table} is not one of this tenant's own tables (the replicated ones are"
                " read-only)"
            )
        return CheckedDrop(table, bool(tree.get("if_exists")))

    # -- INSERT -------------------------------------------------------------------------------

    async def check_insert(self, sql: str, *, database: str) -> CheckedInsert:
        """The target table and columns, and each column's placeholder (the table is checked
        against the tenant's own tables by the caller)."""
        m = _INSERT.match(sql)
        if m is None:
            raise SqlRejected(
                "write INSERT INTO table (col, …) VALUES ($1, …) — one row, every value a"
                " placeholder ($n, :name or %(name)s)"
            )
        placeholders: list[str | int] = []
        for raw in m.group("values").split(","):
            token = raw.strip()
            if (p := _POSITIONAL.match(token)) is not None:
                placeholders.append(int(p.group(1)) - 1)
            elif (n := _NAMED.match(token)) is not None:
                placeholders.append(n.group(1) or n.group(2))
            else:
                raise SqlRejected(
                    f"VALUES takes placeholders only ($n, :name or %(name)s), not"
                    f" {token[:40]!r}: values are bound as parameters"
                )
        if len({type(p) for p in placeholders}) > 1:
            raise SqlRejected("use either $n or named placeholders, not both")
        # ClickHouse's parser reads the target and the columns: the same head with a SELECT of
        # NULLs in place of the inline VALUES (which parseQueryToJSON does not take).
        head = m.group("head")
        nulls = ", ".join("NULL" for _ in placeholders)
        tree = await self._guard.parse(f"INSERT INTO {head} SELECT {nulls}")
        if tree.get("type") != "InsertQuery":
            raise SqlRejected("not an INSERT")
        for key in tree:
            if key == "table_function":
                raise SqlRejected("INSERT INTO FUNCTION is not allowed")
            if key not in {"type", "database", "table", "columns", "select", *_OUTFILE_FLAGS}:
                raise SqlRejected(f"unsupported construct in INSERT ({key})")
        if any(tree.get(f) for f in _OUTFILE_FLAGS):
            raise SqlRejected("unsupported construct in INSERT")
        if "database" in tree:
            parts = _identifier_parts(tree["database"])
            self._database(".".join(parts), database)
        table_parts = _identifier_parts(tree.get("table"))
        if len(table_parts) == 2:
            self._database(table_parts[0], database)
        elif len(table_parts) != 1:
            raise SqlRejected("table names have at most two parts: database.table")
        table = _name(table_parts[-1], "table name")
        children = (tree.get("columns") or {}).get("children") or []
        if not children:
            raise SqlRejected("name the columns: INSERT INTO table (col, …) VALUES (…)")
        columns = []
        for child in children:
            parts = _identifier_parts(child)
            if len(parts) != 1:
                raise SqlRejected("column names have one part")
            columns.append(_name(parts[0], "column name"))
        if len(set(columns)) != len(columns):
            raise SqlRejected("a column is named twice")
        if len(columns) != len(placeholders):
            raise SqlRejected(
                f"{len(columns)} column(s) but {len(placeholders)} value(s) in the INSERT"
            )
        return CheckedInsert(table, tuple(columns), tuple(placeholders))
