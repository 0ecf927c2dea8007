"""Primary-key reads and writes, from PostgreSQL's parse tree: what lets the result cache
invalidate one row's cached reads instead of every read of its table.

A *point read* is a SELECT from one table whose WHERE clause fixes every column of its primary
key to a parameter or a constant (``... WHERE user_id = $1``); it returns at most the rows of
that key. A *keyed write* is an INSERT of rows whose primary key is given, or an UPDATE or
DELETE whose WHERE fixes the whole key (an UPDATE not setting a key column): it writes only the
rows of those keys, unless a trigger of the tenant's writes elsewhere (PostgreSQL's
notifications cover those, see control migration 0009).

The names the cache's generations are kept under, for a table ``s.t``:

- ``s.t``: every write bumps it; every read but a point read depends on it;
- ``s.t#row:<md5>``: a keyed write bumps it for each key; a point read of that key depends on it;
- ``s.t#keyed``: a write whose keys are not known bumps it; every point read depends on it.

The key's text is what PostgreSQL prints for each key column (``col::text``) joined by U+001F,
hashed with MD5 — computed the same way by the triggers. Only key columns whose printed form
Python reproduces exactly take part (text, varchar, the integers, uuid); any other table's
reads and writes stay per table.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pglast
from pglast import ast
from pglast.enums import BoolExprType
from pglast.visitors import Visitor

from database_service.textmemo import short_text_cache

__all__ = [
    "KEYED",
    "KEY_TYPES",
    "KeyedWrite",
    "PointRead",
    "key_text",
    "keyed_write",
    "point_read",
    "row_name",
]

KEYED = "#keyed"
# Key column types whose ``::text`` Python writes the same way (format_type names).
KEY_TYPES = frozenset({"text", "character varying", "smallint", "integer", "bigint", "uuid"})
_INTEGERS = frozenset({"smallint", "integer", "bigint"})
_MAX_KEYED_ROWS = 16  # as the triggers: past it, a write's keys are not listed


@dataclass(frozen=True, slots=True)
class _Param:
    number: int  # $1 is 1


@dataclass(frozen=True, slots=True)
class _Const:
    value: object


Ref = _Param | _Const


@dataclass(frozen=True, slots=True)
class PointRead:
    schema: str | None
    table: str
    equal: Mapping[str, Ref]  # column -> what it is fixed to


@dataclass(frozen=True, slots=True)
class KeyedWrite:
    schema: str | None
    table: str
    rows: Sequence[Mapping[str, Ref]]  # each written row's key columns
    set_columns: frozenset[str]  # an UPDATE's SET columns
    # INSERT ... ON CONFLICT (columns) DO UPDATE: it updates the row holding those values,
    # which is the inserted key's row only when they are the key.
    conflict_arbiter: frozenset[str] | None = None


def _ref(node: Any) -> Ref | None:
    if isinstance(node, ast.ParamRef):
        return _Param(int(node.number or 0))
    if isinstance(node, ast.A_Const) and not node.isnull:
        val = node.val
        if isinstance(val, ast.String):
            return _Const(val.sval)
        if isinstance(val, ast.Integer):
            return _Const(val.ival)
    return None


def _column(node: Any, names: frozenset[str]) -> str | None:
    """A column reference unqualified or qualified by the table's name or alias."""
    if not isinstance(node, ast.ColumnRef):
        return None
    fields = node.fields or ()
    if not all(isinstance(f, ast.String) for f in fields):
        return None
    parts = [f.sval for f in fields]
    if len(parts) == 1:
        return str(parts[0])
    if len(parts) == 2 and parts[0] in names:
        return str(parts[1])
    return None


def _equalities(where: Any, names: frozenset[str]) -> dict[str, Ref]:
    """``column = value`` terms of a conjunction (other terms only narrow it further)."""
    found: dict[str, Ref] = {}
    terms = [where]
    while terms:
        term = terms.pop()
        if isinstance(term, ast.BoolExpr) and term.boolop == BoolExprType.AND_EXPR:
            terms.extend(term.args or ())
            continue
        if not (isinstance(term, ast.A_Expr) and term.kind == 0):  # AEXPR_OP
            continue
        if [getattr(n, "sval", None) for n in term.name or ()] != ["="]:
            continue
        for left, right in ((term.lexpr, term.rexpr), (term.rexpr, term.lexpr)):
            column, ref = _column(left, names), _ref(right)
            if column is not None and ref is not None and column not in found:
                found[column] = ref
                break
    return found


def _single(sql: str) -> Any | None:
    try:
        tree = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return None
    return tree[0].stmt if len(tree) == 1 else None


def _names(rel: ast.RangeVar) -> frozenset[str]:
    alias = rel.alias.aliasname if rel.alias is not None else None
    return frozenset(n for n in (rel.relname, alias) if n)


@short_text_cache(maxsize=4096)  # a statement is parsed once (a parse costs ~0.3 ms)
def point_read(sql: str) -> PointRead | None:
    """The table and the column equalities of a plain one-table SELECT, or None."""
    stmt = _single(sql)
    if not isinstance(stmt, ast.SelectStmt) or stmt.op != 0:  # SETOP_NONE
        return None
    if stmt.withClause or stmt.lockingClause or stmt.intoClause or stmt.whereClause is None:
        return None
    if stmt.groupClause or stmt.havingClause or stmt.distinctClause is not None:
        return None  # not needed for one row, and keeps the shape simple
    sources: Any = stmt.fromClause or ()
    if len(sources) != 1 or not isinstance(sources[0], ast.RangeVar):
        return None
    if _has_subquery(stmt):
        return None
    rel: Any = sources[0]
    if not rel.inh:  # ONLY t: a partitioned or inherited table's parent alone
        return None
    return PointRead(rel.schemaname, rel.relname, _equalities(stmt.whereClause, _names(rel)))


def _has_subquery(stmt: Any) -> bool:
    found = False

    class _Find(Visitor):
        def visit_SubLink(self, ancestors: Any, node: Any) -> None:
            nonlocal found
            found = True

    _Find()(stmt)
    return found


@short_text_cache(maxsize=4096)
def keyed_write(sql: str) -> KeyedWrite | None:
    """The target and the key columns of each row an INSERT, UPDATE or DELETE writes, when the
    statement says them; None for any other shape (its writes are not keyed)."""
    stmt = _single(sql)
    if isinstance(stmt, ast.InsertStmt):
        return _insert(stmt)
    if isinstance(stmt, ast.UpdateStmt | ast.DeleteStmt):
        if stmt.withClause or stmt.whereClause is None or _has_subquery(stmt):
            return None
        if isinstance(stmt, ast.UpdateStmt) and stmt.fromClause:
            return None
        if isinstance(stmt, ast.DeleteStmt) and stmt.usingClause:
            return None
        rel: Any = stmt.relation
        set_columns: frozenset[str] = frozenset()
        if isinstance(stmt, ast.UpdateStmt):
            targets = stmt.targetList or ()
            if not all(isinstance(t, ast.ResTarget) and t.name for t in targets):
                return None
            set_columns = frozenset(t.name for t in targets)
        rows = [_equalities(stmt.whereClause, _names(rel))]
        return KeyedWrite(rel.schemaname, rel.relname, rows, set_columns)
    return None


def _insert(stmt: Any) -> KeyedWrite | None:
    if stmt.withClause or not stmt.cols:
        return None
    columns = [c.name for c in stmt.cols]
    select = stmt.selectStmt
    if not isinstance(select, ast.SelectStmt) or not select.valuesLists:
        return None  # INSERT ... SELECT: the keys are in the data
    if len(select.valuesLists) > _MAX_KEYED_ROWS:
        return None
    rows = []
    for values in select.valuesLists:
        row: dict[str, Ref] = {}
        for column, node in zip(columns, values, strict=False):
            ref = _ref(node)
            if ref is not None:
                row[column] = ref
        rows.append(row)
    arbiter: frozenset[str] | None = None
    conflict = stmt.onConflictClause
    if conflict is not None and conflict.action == 2:  # ONCONFLICT_UPDATE
        infer = conflict.infer
        if infer is None or not infer.indexElems:
            return None  # ON CONSTRAINT name: which one is not read here
        arbiter = frozenset(str(e.name) for e in infer.indexElems if isinstance(e, ast.IndexElem))
    return KeyedWrite(stmt.relation.schemaname, stmt.relation.relname, rows, frozenset(), arbiter)


def key_text(
    key: Sequence[tuple[str, str]], refs: Mapping[str, Ref], params: Sequence[Any]
) -> str | None:
    """The key's printed form (``col::text`` joined by U+001F), from what the statement fixes
    each key column to; None when a value is not one whose printed form is certain."""
    parts = []
    for column, type_name in key:
        ref = refs.get(column)
        if ref is None:
            return None
        if isinstance(ref, _Param):
            if not 1 <= ref.number <= len(params):
                return None
            value = params[ref.number - 1]
        else:
            value = ref.value
        text = _printed(value, type_name)
        if text is None:
            return None
        parts.append(text)
    return "\x1f".join(parts)


def _printed(value: object, type_name: str) -> str | None:
    if type_name in _INTEGERS:
        return str(value) if type(value) is int else None
    if type_name == "uuid":
        try:
            return str(uuid.UUID(str(value))) if isinstance(value, str | uuid.UUID) else None
        except ValueError:
            return None
    if type_name in ("text", "character varying"):
        return value if type(value) is str else None
    return None


def row_name(relation: str, text: str) -> str:
    """The generation name of one key's rows of ``relation`` (``schema.table``)."""
    return f"{relation}#row:{hashlib.md5(text.encode()).hexdigest()}"  # noqa: S324 - a name
