"""What a statement filters and sorts on, per table: the raw material of index advice.

Pure functions over pglast's parse tree (no PostgreSQL): for every table a statement reads
(``FROM``, joins, subqueries, the target of an ``UPDATE``/``DELETE``), the columns it compares
with a value (``=``, ``IN``, ``IS NULL``: equality; ``<``, ``>``, ``BETWEEN``: range), the
columns it joins on (equality on both sides), and the columns a single-table ``ORDER BY … LIMIT``
sorts on. Only conjunctions are followed: an ``OR`` makes no single index the answer, so its
branches are left out rather than guessed at. A column is placed by its qualifier (table or
alias); an unqualified one only when its query level reads one table.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pglast
from pglast import ast, enums

__all__ = ["Candidate", "TableUse", "candidates", "table_uses"]

_EQUALITY_OPS = frozenset({"="})
_RANGE_OPS = frozenset({"<", ">", "<=", ">="})
_MAX_COLUMNS = 3  # a wider suggestion is rarely what a slow statement needs


@dataclass(slots=True)
class TableUse:
    """One table as one statement uses it (``schema`` None: unqualified in the text)."""

    schema: str | None
    table: str
    equality: list[str] = field(default_factory=list)
    range: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def add(self, kind: str, column: str) -> None:
        kept = getattr(self, kind)
        if column not in kept:
            kept.append(column)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An index a statement would use: equality columns first, then one range or sort column
    (the column order a B-tree serves both with)."""

    schema: str | None
    table: str
    columns: tuple[str, ...]
    reason: str


def table_uses(sql: str) -> list[TableUse]:
    """The tables ``sql`` reads, with what it filters and sorts each on (an unparsable text:
    none)."""
    try:
        statements = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return []
    uses: list[TableUse] = []
    for raw in statements:
        _statement(raw.stmt, uses)
    return uses


def candidates(sql: str) -> list[Candidate]:
    """The indexes that would serve ``sql``, one per table it filters or sorts."""
    found = []
    for use in table_uses(sql):
        tail = [c for c in (use.range or use.order) if c not in use.equality][:1]
        equality = use.equality[: _MAX_COLUMNS - len(tail)]
        columns = tuple(equality + tail)
        if not columns:
            continue
        parts = []
        if equality:
            parts.append("equality on " + ", ".join(equality))
        if use.range and tail:
            parts.append("range on " + tail[0])
        elif tail:
            parts.append("order by " + tail[0])
        found.append(Candidate(use.schema, use.table, columns, "; ".join(parts)))
    return found


# --- the walk -----------------------------------------------------------------------------


def _statement(node: object, uses: list[TableUse]) -> None:
    if isinstance(node, ast.SelectStmt):
        _select(node, uses)
    elif isinstance(node, ast.UpdateStmt | ast.DeleteStmt):
        scope: dict[str, TableUse] = {}
        if node.relation is None:
            return
        target = _range_var(node.relation, scope, uses)
        for extra in (
            node.fromClause if isinstance(node, ast.UpdateStmt) else node.usingClause
        ) or ():
            _from_item(extra, scope, uses)
        _where(node.whereClause, scope, target if len(scope) == 1 else None, uses)
    elif isinstance(node, ast.ExplainStmt):
        _statement(node.query, uses)


def _select(node: ast.SelectStmt, uses: list[TableUse]) -> None:
    if node.op != enums.SetOperation.SETOP_NONE:  # UNION / INTERSECT / EXCEPT: each branch
        for branch in (node.larg, node.rarg):
            if branch is not None:
                _select(branch, uses)
        return
    for cte in (node.withClause.ctes if node.withClause else None) or ():
        if isinstance(cte.ctequery, ast.SelectStmt):
            _select(cte.ctequery, uses)
    scope: dict[str, TableUse] = {}
    for item in node.fromClause or ():
        _from_item(item, scope, uses)
    single = next(iter(scope.values())) if len(scope) == 1 else None
    _where(node.whereClause, scope, single, uses)
    # ORDER BY … LIMIT on one table: an index in that order stops the scan early.
    if single is not None and node.limitCount is not None:
        for sort in node.sortClause or ():
            column = _column(sort.node, scope, single)
            if column is None:
                break  # an expression: the order is not a column's from here on
            column[0].add("order", column[1])
    for target in node.targetList or ():
        for sub in _sublinks(target):
            _statement(sub, uses)


def _range_var(rv: ast.RangeVar, scope: dict[str, TableUse], uses: list[TableUse]) -> TableUse:
    use = TableUse(rv.schemaname, rv.relname or "")
    uses.append(use)
    scope[(rv.alias.aliasname if rv.alias else None) or use.table] = use
    return use


def _from_item(item: object, scope: dict[str, TableUse], uses: list[TableUse]) -> None:
    if isinstance(item, ast.RangeVar):
        _range_var(item, scope, uses)
    elif isinstance(item, ast.JoinExpr):
        _from_item(item.larg, scope, uses)
        _from_item(item.rarg, scope, uses)
        _where(item.quals, scope, None, uses)
    elif isinstance(item, ast.RangeSubselect) and isinstance(item.subquery, ast.SelectStmt):
        _select(item.subquery, uses)


def _conjuncts(node: object) -> Iterator[object]:
    if isinstance(node, ast.BoolExpr):
        if node.boolop == enums.BoolExprType.AND_EXPR:
            for arg in node.args or ():
                yield from _conjuncts(arg)
        return  # OR / NOT: no single index serves it
    if node is not None:
        yield node


def _where(
    node: object, scope: dict[str, TableUse], single: TableUse | None, uses: list[TableUse]
) -> None:
    for sub in _sublinks(node):  # EXISTS / IN (SELECT …): their own tables
        _statement(sub, uses)
    for conjunct in _conjuncts(node):
        if isinstance(conjunct, ast.NullTest):
            column = _column(conjunct.arg, scope, single)
            if column is not None and conjunct.nulltesttype == enums.NullTestType.IS_NULL:
                column[0].add("equality", column[1])
            continue
        if not isinstance(conjunct, ast.A_Expr):
            continue
        op = conjunct.name[-1].sval if conjunct.name else ""
        kind = conjunct.kind
        left = _column(conjunct.lexpr, scope, single)
        right = _column(conjunct.rexpr, scope, single)
        # A column of an enclosing query (a correlated subquery) is a value for this level.
        left_value = _constant(conjunct.lexpr) or _outer(conjunct.lexpr, scope)
        right_value = _constant(conjunct.rexpr) or _outer(conjunct.rexpr, scope)
        if kind == enums.A_Expr_Kind.AEXPR_OP and op in _EQUALITY_OPS:
            if left and right:  # a join: either side may be the inner of a nested loop
                left[0].add("equality", left[1])
                right[0].add("equality", right[1])
            elif left and right_value:
                left[0].add("equality", left[1])
            elif right and left_value:
                right[0].add("equality", right[1])
        elif kind == enums.A_Expr_Kind.AEXPR_OP and op in _RANGE_OPS:
            if left and right_value:
                left[0].add("range", left[1])
            elif right and left_value:
                right[0].add("range", right[1])
        elif kind == enums.A_Expr_Kind.AEXPR_IN and op == "=" and left:
            left[0].add("equality", left[1])
        elif (
            kind in (enums.A_Expr_Kind.AEXPR_BETWEEN, enums.A_Expr_Kind.AEXPR_BETWEEN_SYM) and left
        ):
            left[0].add("range", left[1])


def _column(
    node: object, scope: dict[str, TableUse], single: TableUse | None
) -> tuple[TableUse, str] | None:
    while isinstance(node, ast.TypeCast):  # col::text = … still filters on col
        node = node.arg
    if not isinstance(node, ast.ColumnRef):
        return None
    fields = node.fields or ()
    names = [f.sval or "" for f in fields if isinstance(f, ast.String)]
    if len(names) != len(fields):
        return None  # t.*
    if len(names) == 1:
        return (single, names[0]) if single is not None else None
    use = scope.get(names[-2])
    return (use, names[-1]) if use is not None else None


def _outer(node: object, scope: dict[str, TableUse]) -> bool:
    """A qualified column whose qualifier this query level does not define."""
    while isinstance(node, ast.TypeCast):
        node = node.arg
    fields = node.fields if isinstance(node, ast.ColumnRef) else None
    if not fields or len(fields) < 2:
        return False
    qualifier = fields[-2]
    return isinstance(qualifier, ast.String) and qualifier.sval not in scope


def _constant(node: object) -> bool:
    """No column anywhere in it: a literal, a parameter, ``now() - interval …``."""
    if isinstance(node, ast.ColumnRef | ast.SubLink):
        return False
    return all(_constant(child) for child in _children(node))


def _sublinks(node: object) -> Iterator[object]:
    """The subqueries inside an expression."""
    if isinstance(node, ast.SubLink):
        yield node.subselect
        return
    for child in _children(node):
        yield from _sublinks(child)


def _children(node: object) -> Iterator[object]:
    if isinstance(node, ast.Node):
        for name in node:
            value = getattr(node, name)
            if isinstance(value, tuple):
                yield from value
            elif isinstance(value, ast.Node):
                yield value
