"""Property filters (Weaviate's ``where``) checked against a collection's schema and compiled to
parameterised SQL (pgvector) or to Weaviate's own filter object (``weaviate_filter``).

A filter is a condition ``{"path": "symbol", "operator": "Equal", "value": "EURUSD"}`` (``path``
may be a one-element list, and the value may come as Weaviate's ``valueText``, ``valueInt``,
``valueNumber``, ``valueBoolean``, ``valueDate`` or ``valueTextArray``), or a combination
``{"operator": "And" | "Or", "operands": [...]}``. Operators: Equal, NotEqual, LessThan,
LessThanEqual, GreaterThan, GreaterThanEqual, Like (``*`` any run, ``?`` one character), In
(any of a list), IsNull (``value`` true or false); also their symbols ``= != < <= > >=``.

The only text of the caller's that reaches the SQL is a property name, and only once it is one
of the collection's properties (which passed ``model.property_name`` when the collection was
made); every value is a bind parameter, typed from the property's type.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from database_service.stores.vector.model import (
    InvalidFilter,
    PropertyType,
    property_value,
)
from database_service.tenancy import quote_ident

__all__ = ["MAX_CONDITIONS", "MAX_DEPTH", "compile_filter", "weaviate_filter"]

MAX_DEPTH = 8
MAX_CONDITIONS = 64
_OPERATORS = {
    "equal": "=",
    "=": "=",
    "==": "=",
    "notequal": "<>",
    "!=": "<>",
    "<>": "<>",
    "lessthan": "<",
    "<": "<",
    "lessthanequal": "<=",
    "<=": "<=",
    "greaterthan": ">",
    ">": ">",
    "greaterthanequal": ">=",
    ">=": ">=",
    "like": "like",
    "in": "in",
    "isnull": "isnull",
}
_ORDERED = frozenset({"<", "<=", ">", ">="})
_ORDERED_TYPES = frozenset(
    {PropertyType.TEXT, PropertyType.INT, PropertyType.NUMBER, PropertyType.DATE}
)
_VALUE_KEYS = frozenset(
    {
        "value",
        "valueText",
        "valueString",
        "valueInt",
        "valueNumber",
        "valueBoolean",
        "valueDate",
        "valueUuid",
        "valueTextArray",
    }
)


def _operator(node: Mapping[str, Any]) -> str:
    raw = node.get("operator")
    if not isinstance(raw, str):
        raise InvalidFilter("every filter node needs an 'operator'")
    return raw.replace("_", "").lower()


def compile_filter(
    where: Mapping[str, Any], properties: Mapping[str, PropertyType], params: list[Any]
) -> str:
    """The SQL condition for ``where`` over the columns of ``properties`` (as ``t."name"``);
    its values appended to ``params`` (the first becomes ``$len(params)+1``)."""
    count = [0]
    return _node(where, properties, params, 1, count)


def _node(
    node: object,
    properties: Mapping[str, PropertyType],
    params: list[Any],
    depth: int,
    count: list[int],
) -> str:
    if not isinstance(node, Mapping):
        raise InvalidFilter("a filter is an object")
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"filters nest at most {MAX_DEPTH} deep")
    op = _operator(node)
    if op in ("and", "or"):
        extra = set(node) - {"operator", "operands"}
        if extra:
            raise InvalidFilter(f"an {op} takes operands only, not {', '.join(sorted(extra))}")
        operands = node.get("operands")
        if not isinstance(operands, list) or not operands:
            raise InvalidFilter(f"{op} needs a non-empty list of operands")
        parts = [_node(o, properties, params, depth + 1, count) for o in operands]
        return "(" + f" {op.upper()} ".join(parts) + ")"
    count[0] += 1
    if count[0] > MAX_CONDITIONS:
        raise InvalidFilter(f"at most {MAX_CONDITIONS} conditions")
    return _condition(node, op, properties, params)


def _condition(
    node: Mapping[str, Any], op: str, properties: Mapping[str, PropertyType], params: list[Any]
) -> str:
    sql_op = _OPERATORS.get(op)
    if sql_op is None:
        raise InvalidFilter(f"unknown operator {str(node.get('operator'))[:40]!r}")
    extra = set(node) - {"operator", "path"} - _VALUE_KEYS
    if extra:
        raise InvalidFilter(f"unknown filter fields {', '.join(sorted(extra))[:80]}")
    path = node.get("path")
    if isinstance(path, list) and len(path) == 1:
        path = path[0]
    if not isinstance(path, str) or path not in properties:
        # Never echo more than a bounded piece of what the caller sent.
        raise InvalidFilter(f"the collection has no property {str(path)[:60]!r}")
    values = [k for k in _VALUE_KEYS if k in node]
    if len(values) != 1:
        raise InvalidFilter("a condition takes exactly one value")
    value = node[values[0]]
    kind = properties[path]
    column = f"t.{quote_ident(path)}"
    what = f"filter on {path!r}"

    def bind(item: Any) -> str:
        params.append(item)
        return f"${len(params)}"

    if sql_op == "isnull":
        if not isinstance(value, bool):
            raise InvalidFilter(f"{what}: IsNull takes true or false")
        return f"{column} IS {'' if value else 'NOT '}NULL"
    if value is None:
        raise InvalidFilter(f"{what}: null is not a value to compare (use IsNull)")
    if kind is PropertyType.TEXT_ARRAY:
        # Weaviate's semantics on an array property: Equal matches when one element is equal.
        if sql_op == "in":
            return f"{column} && {bind(property_value(kind, value, what))}"
        if sql_op not in ("=", "<>"):
            raise InvalidFilter(f"{what}: a text[] property takes Equal, NotEqual or In")
        element = property_value(PropertyType.TEXT, value, what)
        if sql_op == "=":
            return f"{bind(element)} = ANY({column})"
        return f"NOT ({bind(element)} = ANY(coalesce({column}, '{{}}')))"
    if sql_op == "in":
        if not isinstance(value, list) or not value:
            raise InvalidFilter(f"{what}: In takes a non-empty list")
        if len(value) > 1000:
            raise InvalidFilter(f"{what}: In takes at most 1000 values")
        items = [property_value(kind, v, what) for v in value]
        return f"{column} = ANY({bind(items)})"
    if sql_op == "like":
        if kind is not PropertyType.TEXT or not isinstance(value, str):
            raise InvalidFilter(f"{what}: Like applies to text properties, with a text pattern")
        return f"{column} LIKE {bind(like_pattern(value))}"
    if sql_op in _ORDERED and kind not in _ORDERED_TYPES:
        raise InvalidFilter(f"{what}: {kind.value} properties are not ordered")
    return f"{column} {sql_op} {bind(property_value(kind, value, what))}"


def like_pattern(pattern: str) -> str:
    """Weaviate's wildcards (``*`` any run, ``?`` one character) as LIKE's, with LIKE's own
    special characters taken literally."""
    if "\x00" in pattern:
        raise InvalidFilter("a Like pattern cannot hold NUL")
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


# --- Weaviate ------------------------------------------------------------------------------------

_WEAVIATE_OPERATORS = {
    "=": "Equal",
    "<>": "NotEqual",
    "<": "LessThan",
    "<=": "LessThanEqual",
    ">": "GreaterThan",
    ">=": "GreaterThanEqual",
    "like": "Like",
}
_WEAVIATE_VALUE = {
    PropertyType.TEXT: "valueText",
    PropertyType.INT: "valueInt",
    PropertyType.NUMBER: "valueNumber",
    PropertyType.BOOL: "valueBoolean",
    PropertyType.DATE: "valueDate",
    PropertyType.UUID: "valueText",
    PropertyType.TEXT_ARRAY: "valueText",
}


def weaviate_filter(
    where: Mapping[str, Any], properties: Mapping[str, PropertyType]
) -> dict[str, Any]:
    """``where`` as Weaviate's filter (its REST ``where`` object), checked exactly as
    ``compile_filter`` checks it, with the same meaning: SQL's, where Weaviate's differs.

    - NotEqual on a scalar excludes objects whose property is null (SQL's ``<>``), which
      Weaviate's NotEqual keeps: it becomes NotEqual AND NOT IsNull (the collections index null
      state for it); on a text[] it keeps them, as the SQL does.
    - In on a scalar is an Or of Equals (Weaviate's ContainsAny is for arrays).
    - Like: Weaviate's own wildcards, on text tokenized as the whole field (case-sensitive).
    Every value is typed from the property's type (``property_value``), then sent in the value
    field of that type; a property name is one of the collection's."""
    return _weaviate_node(where, properties, 1, [0])


def _weaviate_node(
    node: object, properties: Mapping[str, PropertyType], depth: int, count: list[int]
) -> dict[str, Any]:
    if not isinstance(node, Mapping):
        raise InvalidFilter("a filter is an object")
    if depth > MAX_DEPTH:
        raise InvalidFilter(f"filters nest at most {MAX_DEPTH} deep")
    op = _operator(node)
    if op in ("and", "or"):
        extra = set(node) - {"operator", "operands"}
        if extra:
            raise InvalidFilter(f"an {op} takes operands only, not {', '.join(sorted(extra))}")
        operands = node.get("operands")
        if not isinstance(operands, list) or not operands:
            raise InvalidFilter(f"{op} needs a non-empty list of operands")
        return {
            "operator": op.capitalize(),
            "operands": [_weaviate_node(o, properties, depth + 1, count) for o in operands],
        }
    count[0] += 1
    if count[0] > MAX_CONDITIONS:
        raise InvalidFilter(f"at most {MAX_CONDITIONS} conditions")
    return _weaviate_condition(node, op, properties)


def _weaviate_condition(
    node: Mapping[str, Any], op: str, properties: Mapping[str, PropertyType]
) -> dict[str, Any]:
    sql_op = _OPERATORS.get(op)
    if sql_op is None:
        raise InvalidFilter(f"unknown operator {str(node.get('operator'))[:40]!r}")
    extra = set(node) - {"operator", "path"} - _VALUE_KEYS
    if extra:
        raise InvalidFilter(f"unknown filter fields {', '.join(sorted(extra))[:80]}")
    path = node.get("path")
    if isinstance(path, list) and len(path) == 1:
        path = path[0]
    if not isinstance(path, str) or path not in properties:
        raise InvalidFilter(f"the collection has no property {str(path)[:60]!r}")
    values = [k for k in _VALUE_KEYS if k in node]
    if len(values) != 1:
        raise InvalidFilter("a condition takes exactly one value")
    value = node[values[0]]
    kind = properties[path]
    what = f"filter on {path!r}"

    def cond(operator: str, item: Any, key: str | None = None) -> dict[str, Any]:
        return {"path": [path], "operator": operator, key or _WEAVIATE_VALUE[kind]: _wire(item)}

    def not_null() -> dict[str, Any]:
        return {"path": [path], "operator": "IsNull", "valueBoolean": False}

    if sql_op == "isnull":
        if not isinstance(value, bool):
            raise InvalidFilter(f"{what}: IsNull takes true or false")
        return {"path": [path], "operator": "IsNull", "valueBoolean": value}
    if value is None:
        raise InvalidFilter(f"{what}: null is not a value to compare (use IsNull)")
    if kind is PropertyType.TEXT_ARRAY:
        if sql_op == "in":
            items = property_value(kind, value, what)
            if not items:
                raise InvalidFilter(f"{what}: In takes a non-empty list")
            return cond("ContainsAny", items, "valueTextArray")
        if sql_op not in ("=", "<>"):
            raise InvalidFilter(f"{what}: a text[] property takes Equal, NotEqual or In")
        element = property_value(PropertyType.TEXT, value, what)
        return cond(_WEAVIATE_OPERATORS[sql_op], element)
    if sql_op == "in":
        if not isinstance(value, list) or not value:
            raise InvalidFilter(f"{what}: In takes a non-empty list")
        if len(value) > 1000:
            raise InvalidFilter(f"{what}: In takes at most 1000 values")
        items = [property_value(kind, v, what) for v in value]
        if len(items) == 1:
            return cond("Equal", items[0])
        return {"operator": "Or", "operands": [cond("Equal", v) for v in items]}
    if sql_op == "like":
        if kind is not PropertyType.TEXT or not isinstance(value, str):
            raise InvalidFilter(f"{what}: Like applies to text properties, with a text pattern")
        if "\x00" in value:
            raise InvalidFilter("a Like pattern cannot hold NUL")
        return cond("Like", value)
    if sql_op in _ORDERED and kind not in _ORDERED_TYPES:
        raise InvalidFilter(f"{what}: {kind.value} properties are not ordered")
    condition = cond(_WEAVIATE_OPERATORS[sql_op], property_value(kind, value, what))
    if sql_op == "<>":
        return {"operator": "And", "operands": [condition, not_null()]}
    return condition


def _wire(value: Any) -> Any:
    """A typed value as Weaviate takes it in JSON (dates RFC 3339, UUIDs as text)."""
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value
