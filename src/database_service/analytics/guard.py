"""The allow-list guard for tenant SQL on ClickHouse, on ClickHouse's own parse tree.

chDB has no access control (``CREATE USER`` is refused; ``file()`` reads local files even under
``readonly``), so on the embedded path this guard is the wall; on a server it is a first layer
before the tenant's user, grants and row policies.

How: the text is parsed by the engine itself, ``parseQueryToJSON`` — ClickHouse's parser, the
one that will run it, so there is no second grammar to disagree with (sqlglot's ClickHouse
dialect is a re-implementation: whatever it parses differently is a way around a guard built on
it). ``parseQueryToJSON`` also refuses multi-statements outright. On the JSON tree:

- the statement is a ``SELECT`` (with ``UNION``/``INTERSECT``/``EXCEPT``, subqueries, CTEs);
- every node type and every key of a node is on an allow-list, so a construct this guard does not
  know (``SETTINGS``, ``INTO OUTFILE``, ``FORMAT``, ``COMPRESSION``, anything a later ClickHouse
  adds) is refused, not passed;
- tables are named by ``name_parts`` (never by re-splitting text, which quoting can fool): a
  two-part name must be in the tenant's database, a one-part name is a CTE of the query or one
  of the tenant's tables, which the guard qualifies with the tenant's database; a table function
  (``file``, ``url``, ``remote``, ``s3``, ``postgresql``, ``merge``, …) is refused;
- the right side of ``IN`` naming a table is a table reference, checked the same way;
- every function is on an allow-list built from the engine's ``system.functions`` categories
  (arithmetic, aggregates, dates, strings, …); ``file``, ``joinGet``, ``dictGet``, ``getSetting``,
  ``hostName``, introspection and the rest of "Other" are refused unless listed as safe.

The qualified tree is printed back by ClickHouse (``formatQueryFromJSON``), and the printed text
is parsed and checked once more before it runs: what runs is what was checked. Verdicts are cached
per (tenant, text).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from database_service.errors import SqlRejected, SqlSyntaxError
from database_service.stores.clickhouse import ClickHouseError, ClickHouseStore

__all__ = ["AnalyticsGuard", "ExpressionWalk", "FunctionCatalog", "GuardedQuery"]

_NODE_TYPES = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "SelectQuery",
        "ExpressionList",
        "Identifier",
        "Literal",
        "Function",
        "TablesInSelectQuery",
        "TablesInSelectQueryElement",
        "TableExpression",
        "TableIdentifier",
        "TableJoin",
        "ArrayJoin",
        "Subquery",
        "Asterisk",
        "QualifiedAsterisk",
        "ColumnsRegexpMatcher",
        "ColumnsListMatcher",
        "QualifiedColumnsRegexpMatcher",
        "QualifiedColumnsListMatcher",
        "OrderByElement",
        "WithElement",
        "WindowDefinition",
        "WindowListElement",
        "SampleRatio",
        "InterpolateElement",
        "ColumnsTransformerList",
        "ColumnsExceptTransformer",
        "ColumnsReplaceTransformer",
        "ColumnsApplyTransformer",
        "ColumnsReplaceTransformerReplacement",
        "ExpressionElement",
    }
)
# Keys a node of an allowed type may carry. What is missing on purpose: "settings" (SETTINGS),
# "out_file"/"compression"/"format_ast" (INTO OUTFILE, FORMAT), "table_function".
_KEYS = frozenset(
    {
        "type",
        "union_mode",
        "list_of_selects",
        "children",
        "is_outfile_append",
        "is_outfile_truncate",
        "is_into_outfile_with_stdout",
        "list_of_modes",
        "final",  # FINAL on a table (the views make it unnecessary; harmless)
        "select",
        "tables",
        "where",
        "prewhere",
        "group_by",
        "having",
        "order_by",
        "limit_by",
        "limit_by_length",
        "limit_by_offset",
        "limit_length",
        "limit_offset",
        "with",
        "window",
        "qualify",
        "interpolate",
        "distinct",
        "group_by_with_totals",
        "group_by_with_rollup",
        "group_by_with_cube",
        "group_by_with_grouping_sets",
        "group_by_all",
        "order_by_all",
        "limit_with_ties",
        "name",
        "name_parts",
        "alias",
        "value",
        "field_type",
        "arguments",
        "parameters",
        "is_operator",
        "is_window_function",
        "window_name",
        "window_definition",
        "nulls_action",
        "is_lambda_function",
        "database_and_table_name",
        "subquery",
        "table_expression",
        "table_join",
        "array_join",
        "kind",
        "strictness",
        "locality",
        "on_expression",
        "using_expression",
        "using_expression_list",
        "expression_list",
        "sample_size",
        "sample_offset",
        "direction",
        "nulls_direction",
        "nulls_direction_was_explicitly_specified",
        "collation",
        "with_fill",
        "fill_from",
        "fill_to",
        "fill_step",
        "fill_staleness",
        "expression",
        "is_subquery",
        "is_materialized",
        "partition_by",
        "frame_type",
        "frame_begin_type",
        "frame_end_type",
        "frame_begin_offset",
        "frame_end_offset",
        "frame_begin_preceding",
        "frame_end_preceding",
        "parent_window_name",
        "column",
        "pattern",
        "qualifier",
        "transformers",
        "is_strict",
        "prefix",
        "precedence",
        "numerator",
        "denominator",
        "replacements",
        "func_name",
        "column_name",
        "lambda",
        "lambda_arg",
        "definition",  # WINDOW w AS (…)
        "expr",
        "frame_is_default",
    }
)
_REFUSED_KEYS = {
    "settings": "SETTINGS are set by the service, not by the query",
    "out_file": "INTO OUTFILE is not allowed",
    "format_ast": "FORMAT is not allowed (the service chooses the result format)",
    "format": "FORMAT is not allowed (the service chooses the result format)",
    "compression": "INTO OUTFILE is not allowed",
    "table_function": "table functions are not allowed",
}
# Categories of system.functions whose members read nothing but their arguments.
_SAFE_CATEGORIES = frozenset(
    {
        "Aggregate Functions",
        "Type Conversion",
        "Dates and Times",
        "Arrays",
        "String",
        "Hash",
        "String Search",
        "JSON",
        "Mathematical",
        "URL",  # parse URL strings (the url() *table* function is refused as a table function)
        "Arithmetic",
        "Map",
        "IP Address",
        "Comparison",
        "Tuple",
        "Distance",
        "Bit",
        "Encoding",
        "UUID",
        "String Splitting",
        "String Replacement",
        "Null",
        "Rounding",
        "Conditional",
        "Logical",
        "Financial",
        "Random Number",
        "Bitmap",
        "Geo",
        "Geo Polygon",
        "Time Window",
        "Time Series",
        "NumericIndexedVector",
    }
)
# Functions the parser produces or that are pure but filed under "Other"/"Internal".
_SAFE_EXTRA = frozenset(
    {
        "lambda",
        "exists",
        "untuple",
        "caseWithExpression",
        "_CAST",
        "bar",
        "formatReadableSize",
        "formatReadableDecimalSize",
        "formatReadableQuantity",
        "formatReadableTimeDelta",
        "materialize",
        "toTypeName",
        "neighbor",
        "runningDifference",
        "runningDifferenceStartingWithFirstValue",
        "runningAccumulate",
        "finalizeAggregation",
        "initializeAggregation",
        "transform",
        "identity",
        "visibleWidth",
        "countDigits",
        "isConstant",
    }
)
# Refused whatever their category says: they tell about the host, the session or the server.
_REFUSED_FUNCTIONS = frozenset(
    {
        "hostname",
        "fullhostname",
        "fqdn",
        "current_user",
        "currentuser",
        "user",
        "session_user",
        "authuser",
        "connection_id",
        "connectionid",
        "query_id",
        "queryid",
        "initial_query_id",
        "initialqueryid",
        "current_query_id",
        "sleep",
        "sleepeachrow",
        "throwif",
    }
)
_COMBINATORS = (
    "MergeState",
    "SimpleState",
    "OrDefault",
    "Resample",
    "Distinct",
    "ForEach",
    "ArgMin",
    "ArgMax",
    "OrNull",
    "State",
    "Merge",
    "Array",
    "If",
    "Map",
)
_IN_FUNCTIONS = frozenset(
    {
        "in",
        "notIn",
        "globalIn",
        "globalNotIn",
        "nullIn",
        "notNullIn",
        "globalNullIn",
        "globalNotNullIn",
    }
)
_POSITION = re.compile(r"failed at position (\d+)")


@dataclass(frozen=True, slots=True)
class FunctionCatalog:
    """Which functions tenant SQL may call, from the engine's own ``system.functions``."""

    allowed: frozenset[str]  # exact names
    allowed_ci: frozenset[str]  # lower-cased names of case-insensitive functions
    aggregates: frozenset[str]

    @classmethod
    async def load(cls, store: ClickHouseStore) -> FunctionCatalog:
        result = await store.query(
            "SELECT name, case_insensitive, categories, is_aggregate, alias_to"
            " FROM system.functions"
        )
        info = {r[0]: (bool(r[1]), str(r[2]), bool(r[3]), str(r[4])) for r in result.rows}
        allowed: set[str] = set()
        allowed_ci: set[str] = set()
        aggregates: set[str] = set()
        for name, (ci, category, aggregate, alias_to) in info.items():
            target = info.get(alias_to) if alias_to else None
            safe = (
                category in _SAFE_CATEGORIES
                or name in _SAFE_EXTRA
                or (not category and target is not None and target[1] in _SAFE_CATEGORIES)
                or (not category and alias_to in _SAFE_EXTRA)
            )
            if not safe or name.lower() in _REFUSED_FUNCTIONS:
                continue
            allowed.add(name)
            if ci:
                allowed_ci.add(name.lower())
            if aggregate:
                aggregates.add(name)
        allowed |= _SAFE_EXTRA
        return cls(frozenset(allowed), frozenset(allowed_ci), frozenset(aggregates))

    def permits(self, name: str) -> bool:
        if name.lower() in _REFUSED_FUNCTIONS:
            return False
        if name in self.allowed or name.lower() in self.allowed_ci:
            return True
        # Aggregate combinators: sumIf, uniqArrayIf, avgState, …
        base = name
        while True:
            for suffix in _COMBINATORS:
                if base.endswith(suffix) and len(base) > len(suffix):
                    base = base[: -len(suffix)]
                    if base in self.aggregates or base.lower() in {
                        a.lower() for a in self.aggregates if a.lower() in self.allowed_ci
                    }:
                        return True
                    break
            else:
                return False


@dataclass(frozen=True, slots=True)
class GuardedQuery:
    sql: str  # what runs: ClickHouse's printing of the checked, qualified tree
    tables: tuple[str, ...]  # the tenant's tables it reads


def _literal(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class AnalyticsGuard:
    def __init__(
        self, store: ClickHouseStore, catalog: FunctionCatalog, *, cache_size: int = 4096
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._cache: OrderedDict[tuple[str, frozenset[str], str], GuardedQuery | SqlRejected] = (
            OrderedDict()
        )
        self._cache_size = cache_size

    async def check(self, sql: str, *, database: str, tables: Iterable[str]) -> GuardedQuery:
        """The query to run for ``sql`` in ``database`` (whose tables are ``tables``), or
        ``SqlRejected`` saying what is not allowed."""
        allowed = frozenset(tables)
        key = (database, allowed, sql)  # the tenant's own tables come and go
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            if isinstance(cached, SqlRejected):
                raise cached
            return cached
        try:
            verdict: GuardedQuery | SqlRejected = await self._check(sql, database, set(allowed))
        except SqlRejected as exc:
            verdict = exc
        self._cache[key] = verdict
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if isinstance(verdict, SqlRejected):
            raise verdict
        return verdict

    @property
    def catalog(self) -> FunctionCatalog:
        return self._catalog

    async def format_tree(self, tree: dict[str, Any]) -> str:
        """ClickHouse's printing of ``tree``."""
        try:
            formatted = await self._store.query(
                f"SELECT formatQueryFromJSON({_literal(json.dumps(tree))})"
            )
        except ClickHouseError as exc:
            # The tree is several times the text (a 20,000-value IN list): past ClickHouse's
            # max_query_size its printing fails; the caller's query is too large to check.
            if "Max query size exceeded" in str(exc):
                raise SqlRejected(
                    "the query is too large to check (its parse tree passes ClickHouse's"
                    " max_query_size): make it smaller, e.g. fewer IN values"
                ) from None
            raise
        return str(formatted.rows[0][0])

    async def parse(self, sql: str) -> dict[str, Any]:
        try:
            result = await self._store.query(f"SELECT parseQueryToJSON({_literal(sql)})")
        except ClickHouseError as exc:
            message = str(exc)
            if "JSON serialization" in message or "not supported by parseQueryToJSON" in message:
                raise SqlRejected("only SELECT queries are allowed") from None
            if "Multi-statements are not allowed" in message:
                raise SqlRejected(
                    "one statement per query: multi-statements are not allowed"
                ) from None
            m = _POSITION.search(message)
            raise SqlSyntaxError(
                f"syntax error: {message.split('DB::Exception: ', 1)[-1][:300]}",
                position=int(m.group(1)) + 1 if m else None,
            ) from None
        try:
            tree = json.loads(str(result.rows[0][0]))
        except RecursionError:
            raise SqlRejected("the query is nested too deeply to check") from None
        if not isinstance(tree, dict):
            raise SqlRejected("not a query")
        return tree

    async def _check(self, sql: str, database: str, tables: set[str]) -> GuardedQuery:
        if not sql.strip():
            raise SqlRejected("empty query")
        tree = await self.parse(sql)
        if tree.get("type") != "SelectWithUnionQuery":
            raise SqlRejected(f"only SELECT is allowed, not {tree.get('type', 'this statement')}")
        read: set[str] = set()
        _Walk(self._catalog, database, tables, read, qualify=True).node(tree)
        text = await self.format_tree(tree)
        # What runs is what was checked: the printed text parses to a tree that passes with
        # nothing left to qualify.
        again = await self.parse(text)
        _Walk(self._catalog, database, tables, set(), qualify=False).node(again)
        return GuardedQuery(text, tuple(sorted(read)))


class _Walk:
    """Checks a (sub)tree: node types and keys on the allow-lists, functions in the catalog,
    tables only the tenant's."""

    def __init__(
        self,
        catalog: FunctionCatalog,
        database: str,
        tables: set[str],
        read: set[str],
        *,
        qualify: bool,
    ) -> None:
        self.catalog = catalog
        self.database = database
        self.tables = tables
        self.read = read
        self.qualify = qualify
        self.ctes: set[str] = set()

    def node(self, tree: dict[str, Any]) -> None:
        self._collect_ctes(tree)
        self._visit(tree)

    def _collect_ctes(self, value: Any) -> None:
        if isinstance(value, dict):
            if value.get("type") == "WithElement" and isinstance(value.get("name"), str):
                self.ctes.add(value["name"])
            for v in value.values():
                self._collect_ctes(v)
        elif isinstance(value, list):
            for v in value:
                self._collect_ctes(v)

    def _visit(self, value: Any) -> None:
        if isinstance(value, list):
            for v in value:
                self._visit(v)
            return
        if not isinstance(value, dict):
            return
        kind = value.get("type")
        if kind is not None:
            self._check_node(value, str(kind))
        for k, v in value.items():
            if kind == "Literal" and k == "value":
                continue  # a literal's value is data (a string literal may look like a node)
            self._visit(v)

    def _check_node(self, node: dict[str, Any], kind: str) -> None:
        for key in node:
            if key in _REFUSED_KEYS:
                raise SqlRejected(_REFUSED_KEYS[key])
            if key not in _KEYS:
                raise SqlRejected(f"unsupported construct in analytics SQL ({kind}.{key})")
        if kind == "SetQuery":
            raise SqlRejected(_REFUSED_KEYS["settings"])
        if kind not in _NODE_TYPES:
            raise SqlRejected(f"only SELECT queries are allowed ({kind} is not)")
        if kind == "TableIdentifier":
            self._table(node)
        elif kind == "Function":
            name = str(node.get("name", ""))
            if not self.catalog.permits(name):
                raise SqlRejected(f"function {name}() is not allowed in analytics SQL")
            if name in _IN_FUNCTIONS:
                args = (node.get("arguments") or {}).get("children") or []
                if (
                    len(args) == 2
                    and isinstance(args[1], dict)
                    and args[1].get("type") == "Identifier"
                ):
                    self._table(args[1])

    def _table(self, node: dict[str, Any]) -> None:
        parts = node.get("name_parts")
        if not isinstance(parts, list):
            parts = [node.get("name")]
        if not all(isinstance(p, str) and p for p in parts):
            raise SqlRejected("unsupported table name")
        if len(parts) == 2:
            db, table = parts
            if db != self.database:
                raise SqlRejected(
                    f"table {db}.{table} is not readable: only this tenant's tables are"
                    f" ({', '.join(sorted(self.tables))})"
                )
            if table not in self.tables:
                raise SqlRejected(
                    f"unknown table {table}; tables: {', '.join(sorted(self.tables))}"
                )
            self.read.add(table)
            return
        if len(parts) != 1:
            raise SqlRejected("table names have at most two parts: database.table")
        (name,) = parts
        if name in self.ctes:
            # A CTE of this query. Out of its scope the name would resolve in the session's
            # default database, which holds nothing (the store keeps it empty).
            return
        if name not in self.tables:
            raise SqlRejected(f"unknown table {name}; tables: {', '.join(sorted(self.tables))}")
        if not self.qualify:
            raise SqlRejected(f"table {name} was not qualified")  # cannot happen: checked twice
        node["name"] = f"{self.database}.{name}"
        node["name_parts"] = [self.database, name]
        self.read.add(name)


def ExpressionWalk(catalog: FunctionCatalog, database: str) -> _Walk:
    """A walker for an expression that may name no table (a column default, a table key)."""
    return _Walk(catalog, database, set(), set(), qualify=False)
