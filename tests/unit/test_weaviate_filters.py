"""Filters and names for the Weaviate store (stores.vector.filters.weaviate_filter,
stores.vector.weaviate): the caller's filter becomes Weaviate's filter object with SQL's meaning,
every value typed and sent in its type's field; a GraphQL query is made of literals that cannot
end their string; a tenant's class names are its own."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from database_service.stores.vector import Metric, PropertyType, SearchQuery
from database_service.stores.vector.filters import weaviate_filter
from database_service.stores.vector.weaviate import (
    _gql,
    _gql_filter,
    _max_distance,
    _our_distance,
    class_name,
    tenant_key,
)

PROPS = {
    "symbol": PropertyType.TEXT,
    "bars": PropertyType.INT,
    "score": PropertyType.NUMBER,
    "active": PropertyType.BOOL,
    "seen": PropertyType.DATE,
    "ref": PropertyType.UUID,
    "tags": PropertyType.TEXT_ARRAY,
}


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ({"path": "bars", "operator": ">", "value": 3},
         {"path": ["bars"], "operator": "GreaterThan", "valueInt": 3}),
        ({"path": ["score"], "operator": "LessThanEqual", "valueNumber": 2},
         {"path": ["score"], "operator": "LessThanEqual", "valueNumber": 2.0}),
        ({"path": "active", "operator": "Equal", "value": True},
         {"path": ["active"], "operator": "Equal", "valueBoolean": True}),
        ({"path": "seen", "operator": ">=", "value": "2026-01-01T00:00:00"},
         {"path": ["seen"], "operator": "GreaterThanEqual",
          "valueDate": "2026-01-01T00:00:00+00:00"}),
        ({"path": "ref", "operator": "Equal", "value": "00000000-0000-0000-0000-000000000001"},
         {"path": ["ref"], "operator": "Equal",
          "valueText": "00000000-0000-0000-0000-000000000001"}),
        ({"path": "tags", "operator": "Equal", "value": "a"},
         {"path": ["tags"], "operator": "Equal", "valueText": "a"}),
        ({"path": "tags", "operator": "In", "value": ["a", "b"]},
         {"path": ["tags"], "operator": "ContainsAny", "valueTextArray": ["a", "b"]}),
        ({"path": "symbol", "operator": "Like", "value": "EUR_%*"},  # Weaviate's own wildcards
         {"path": ["symbol"], "operator": "Like", "valueText": "EUR_%*"}),
        ({"path": "bars", "operator": "IsNull", "value": False},
         {"path": ["bars"], "operator": "IsNull", "valueBoolean": False}),
    ],
)  # fmt: skip
def test_conditions_take_the_value_field_of_their_propertys_type(
    where: dict[str, Any], expected: dict[str, Any]
) -> None:
    assert weaviate_filter(where, PROPS) == expected


def test_not_equal_on_a_scalar_excludes_nulls_as_sql_does() -> None:
    assert weaviate_filter({"path": "symbol", "operator": "NotEqual", "value": "x"}, PROPS) == {
        "operator": "And",
        "operands": [
            {"path": ["symbol"], "operator": "NotEqual", "valueText": "x"},
            {"path": ["symbol"], "operator": "IsNull", "valueBoolean": False},
        ],
    }
    # On an array, SQL's NOT (x = ANY(...)) keeps nulls, and so does Weaviate's NotEqual.
    assert weaviate_filter({"path": "tags", "operator": "!=", "value": "a"}, PROPS) == {
        "path": ["tags"], "operator": "NotEqual", "valueText": "a"
    }  # fmt: skip


def test_in_on_a_scalar_is_an_or_of_equals() -> None:
    assert weaviate_filter({"path": "bars", "operator": "In", "value": [1, 2]}, PROPS) == {
        "operator": "Or",
        "operands": [
            {"path": ["bars"], "operator": "Equal", "valueInt": 1},
            {"path": ["bars"], "operator": "Equal", "valueInt": 2},
        ],
    }


@pytest.mark.parametrize(
    "text", ['"} } }) { Get { Other', "\\", 'a"b', "line\nbreak", "\x01", "ü€😀", "\\u0022"]
)
def test_a_string_literal_never_ends_early(text: str) -> None:
    """A JSON string is a GraphQL string: it decodes back to exactly the text."""
    literal = _gql(text)
    assert literal.startswith('"') and literal.endswith('"')
    assert json.loads(literal) == text
    inner = literal[1:-1]
    assert '"' not in inner.replace('\\"', "")


def test_a_filter_in_graphql_has_bare_keys_enum_operators_and_literal_values() -> None:
    where = weaviate_filter(
        {"operator": "And", "operands": [
            {"path": "symbol", "operator": "Equal", "value": 'x" }'},
            {"path": "tags", "operator": "In", "value": ["a"]}]},
        PROPS,
    )  # fmt: skip
    assert _gql_filter(where) == (
        '{operator: And, operands: [{path: ["symbol"], operator: Equal, valueText: "x\\" }"},'
        ' {path: ["tags"], operator: ContainsAny, valueText: ["a"]}]}'
    )


def test_class_names_are_the_tenants_own_and_case_insensitive() -> None:
    a = class_name("tenant_a", "TradingPatterns")
    assert a == f"Dbsvc_{tenant_key('tenant_a')}_tradingpatterns"
    assert class_name("tenant_a", "tradingpatterns") == a
    assert class_name("tenant_b", "TradingPatterns") != a
    assert "tenant_a" not in a
    # B's class name as A's collection name is a class of A's.
    b = class_name("tenant_b", "Secrets")
    assert class_name("tenant_a", b).startswith(f"Dbsvc_{tenant_key('tenant_a')}_")


def test_l2_is_weaviates_squared_distance_reported_as_euclidean() -> None:
    assert _max_distance(Metric.L2, SearchQuery([0.0], distance=3.0)) == 9.0
    assert _our_distance(Metric.L2, 9.0) == 3.0
    assert _max_distance(Metric.COSINE, SearchQuery([0.0], certainty=0.8)) == pytest.approx(0.4)
    assert _max_distance(Metric.DOT, SearchQuery([0.0], distance=-2.0)) == -2.0
    assert _max_distance(Metric.L2, SearchQuery([0.0], distance=-1.0)) == -1.0


def test_dates_go_to_weaviate_as_rfc3339() -> None:
    moment = dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    where = weaviate_filter(
        {"path": "seen", "operator": "<", "valueDate": moment.isoformat()}, PROPS
    )
    assert where["valueDate"] == "2026-01-01T12:00:00+00:00"
