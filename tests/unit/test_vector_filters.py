"""Vector filters compile to parameterised SQL over the collection's own columns; names and
vectors are checked before any SQL is made (stores.vector.model, stores.vector.filters)."""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Any

import pytest

from database_service.errors import InvalidRequest
from database_service.stores.vector import (
    CollectionInfo,
    InvalidCollection,
    InvalidFilter,
    InvalidVector,
    Metric,
    PropertyType,
    SearchQuery,
    check_vector,
    collection_name,
    parse_properties,
    property_name,
)
from database_service.stores.vector.filters import (
    MAX_CONDITIONS,
    compile_filter,
    like_pattern,
    weaviate_filter,
)
from database_service.stores.vector.pgvector import PgVectorStore

PROPS = {
    "symbol": PropertyType.TEXT,
    "bars": PropertyType.INT,
    "score": PropertyType.NUMBER,
    "active": PropertyType.BOOL,
    "seen": PropertyType.DATE,
    "ref": PropertyType.UUID,
    "tags": PropertyType.TEXT_ARRAY,
}


def compiled(where: dict[str, Any]) -> tuple[str, list[Any]]:
    params: list[Any] = ["query-vector"]
    return compile_filter(where, PROPS, params), params[1:]


def test_a_condition_binds_its_value_after_the_parameters_already_there() -> None:
    assert compiled({"path": "symbol", "operator": "Equal", "value": "EURUSD"}) == (
        't."symbol" = $2',
        ["EURUSD"],
    )


def test_weaviates_value_keys_and_one_element_paths_are_understood() -> None:
    sql, params = compiled({"path": ["bars"], "operator": "GreaterThanEqual", "valueInt": 5})
    assert (sql, params) == ('t."bars" >= $2', [5])


@pytest.mark.parametrize(
    ("operator", "sql"),
    [("NotEqual", "<>"), ("LessThan", "<"), ("LessThanEqual", "<="), ("GreaterThan", ">"),
     ("!=", "<>"), ("<", "<"), ("greater_than", ">")],
)  # fmt: skip
def test_comparison_operators(operator: str, sql: str) -> None:
    assert compiled({"path": "score", "operator": operator, "value": 1})[0] == f't."score" {sql} $2'


def test_and_or_nest_with_parameters_in_order() -> None:
    sql, params = compiled(
        {
            "operator": "And",
            "operands": [
                {"path": "active", "operator": "Equal", "value": True},
                {
                    "operator": "Or",
                    "operands": [
                        {"path": "bars", "operator": "In", "value": [1, 2]},
                        {"path": "symbol", "operator": "Like", "value": "EUR*"},
                    ],
                },
            ],
        }
    )
    assert sql == '(t."active" = $2 AND (t."bars" = ANY($3) OR t."symbol" LIKE $4))'
    assert params == [True, [1, 2], "EUR%"]


def test_values_are_typed_by_the_property() -> None:
    moment = "2026-01-01T10:00:00"
    _, params = compiled({"path": "seen", "operator": "<", "value": moment})
    assert params == [dt.datetime(2026, 1, 1, 10, tzinfo=dt.UTC)]
    ref = uuid.uuid4()
    assert compiled({"path": "ref", "operator": "Equal", "value": str(ref)})[1] == [ref]
    assert compiled({"path": "score", "operator": "Equal", "value": 2})[1] == [2.0]


def test_array_properties_match_on_one_element() -> None:
    assert compiled({"path": "tags", "operator": "Equal", "value": "a"})[0] == '$2 = ANY(t."tags")'
    assert compiled({"path": "tags", "operator": "In", "value": ["a", "b"]}) == (
        't."tags" && $2',
        [["a", "b"]],
    )


def test_is_null() -> None:
    assert compiled({"path": "bars", "operator": "IsNull", "value": True})[0] == 't."bars" IS NULL'
    assert compiled({"path": "bars", "operator": "IsNull", "value": False})[0] == (
        't."bars" IS NOT NULL'
    )


def test_like_takes_weaviates_wildcards_and_escapes_likes_own() -> None:
    assert like_pattern("EUR*") == "EUR%"
    assert like_pattern("E?R") == "E_R"
    assert like_pattern("50%_\\*") == "50\\%\\_\\\\%"


@pytest.mark.parametrize(
    "where",
    [
        {"path": "nope", "operator": "Equal", "value": 1},
        {"path": 'symbol" OR 1=1 --', "operator": "Equal", "value": 1},
        {"path": "symbol", "operator": "Equal; DROP", "value": 1},
        {"path": "bars", "operator": "Equal", "value": "1"},
        {"path": "bars", "operator": "Equal", "value": True},
        {"path": "bars", "operator": "Equal", "value": 2**63},
        {"path": "score", "operator": "Equal", "value": math.nan},
        {"path": "active", "operator": "GreaterThan", "value": True},
        {"path": "ref", "operator": "Equal", "value": "not-a-uuid"},
        {"path": "seen", "operator": "Equal", "value": "tomorrow"},
        {"path": "symbol", "operator": "Equal", "value": "a\x00"},
        {"path": "bars", "operator": "Like", "value": "1*"},
        {"path": "tags", "operator": "LessThan", "value": "a"},
        {"path": "bars", "operator": "In", "value": []},
        {"path": "bars", "operator": "In", "value": 3},
        {"path": "bars", "operator": "IsNull", "value": "yes"},
        {"path": "bars", "operator": "Equal", "value": None},
        {"path": "bars", "operator": "Equal"},
        {"path": "bars", "operator": "Equal", "value": 1, "valueInt": 1},
        {"path": "bars", "operator": "Equal", "value": 1, "extra": 1},
        {"operator": "And", "operands": []},
        {"operator": "And", "operands": [{"path": "bars"}], "path": "x"},
        {"path": "bars", "value": 1},
        "bars = 1",
    ],
)
def test_bad_filters_are_refused(where: Any) -> None:
    with pytest.raises(InvalidFilter):
        compile_filter(where, PROPS, [])
    with pytest.raises(InvalidFilter):  # the same checks, for Weaviate
        weaviate_filter(where, PROPS)


def test_filters_are_bounded_in_depth_and_size() -> None:
    deep: dict[str, Any] = {"path": "bars", "operator": "Equal", "value": 1}
    for _ in range(8):
        deep = {"operator": "And", "operands": [deep]}
    with pytest.raises(InvalidFilter, match="nest"):
        compile_filter(deep, PROPS, [])
    wide = {"operator": "Or", "operands": [{"path": "bars", "operator": "Equal", "value": i}
                                           for i in range(MAX_CONDITIONS + 1)]}  # fmt: skip
    with pytest.raises(InvalidFilter, match="at most"):
        compile_filter(wide, PROPS, [])
    for where, match in ((deep, "nest"), (wide, "at most")):
        with pytest.raises(InvalidFilter, match=match):
            weaviate_filter(where, PROPS)


@pytest.mark.parametrize(
    "name", ["a.b", "a b", '"a"', "a;", "1a", "_a", "", "a" * 49, "é", "a-b", "a\x00", None, 5]
)
def test_collection_names_are_strict(name: Any) -> None:
    with pytest.raises(InvalidCollection):
        collection_name(name)


def test_collection_names_allowed() -> None:
    assert collection_name("TradingPatterns") == "TradingPatterns"
    assert collection_name("a" * 48) == "a" * 48


@pytest.mark.parametrize("name", ["Upper", "id", "vector", "distance", "a.b", "a b", "_x", ""])
def test_property_names_are_strict_and_not_reserved(name: str) -> None:
    with pytest.raises(InvalidCollection):
        property_name(name)


def test_property_types_are_known() -> None:
    assert parse_properties({"tags": "text[]"}) == {"tags": PropertyType.TEXT_ARRAY}
    with pytest.raises(InvalidCollection):
        parse_properties({"x": "json"})


@pytest.mark.parametrize(
    "vector",
    [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [math.nan, 1, 2], [1, math.inf, 2], "abc", [1, "x", 2],
     [True, 1, 2], None],
)  # fmt: skip
def test_vectors_are_checked_for_dimension_and_finite_values(vector: Any) -> None:
    with pytest.raises(InvalidVector):
        check_vector(vector, 3)


def test_search_sql_binds_the_vector_first_and_bounds_by_certainty() -> None:
    info = CollectionInfo("P", 3, Metric.COSINE, PROPS)
    query = SearchQuery(
        [1, 0, 0], 5, certainty=0.8, where={"path": "bars", "operator": ">", "value": 1}
    )
    sql, params = PgVectorStore.search_sql(info, query, '"s"."vec_p"', '"public"')
    assert params == [[1.0, 0.0, 0.0], 1, 5, pytest.approx(0.4)]
    assert 't.vector OPERATOR("public".<=>) $1::real[]::"public".vector' in sql
    assert 'WHERE t."bars" > $2' in sql and "LIMIT $3" in sql and "s.distance <= $4" in sql


def test_certainty_is_for_cosine_collections_only() -> None:
    info = CollectionInfo("P", 3, Metric.L2, {})
    with pytest.raises(InvalidRequest):
        PgVectorStore.search_sql(info, SearchQuery([1, 0, 0], certainty=0.5), "t", "e")


def test_the_migrations_search_default_is_the_stores() -> None:
    """Control migration 0013 makes EF_SEARCH the database's default (a search then needs no
    SET of its own); the two must agree or every search pays for a transaction."""
    from database_service.stores.vector.pgvector import EF_SEARCH
    from database_service.tenancy.migrations import load_migrations

    (migration,) = [m for m in load_migrations("control") if m.name == "pgvector"]
    assert f"SET hnsw.ef_search = {EF_SEARCH}'" in migration.sql
