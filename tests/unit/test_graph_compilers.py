"""The graph's query compilers as text: PostgreSQL (``stores/graph/sql.py``) and ArangoDB
(``stores/graph/aql.py``). No ArangoDB server can be installed here, so the AQL and its bind
variables are checked exactly; the SQL runs against PostgreSQL in tests/integration/test_graph.py.

What matters most: nothing a caller names — ids, collections, property names, values — ever
appears in the query text; it travels as a parameter or bind variable."""

from __future__ import annotations

from decimal import Decimal

import pytest

from database_service.errors import DepthOutOfRange, InvalidFilter, InvalidParameters
from database_service.stores.graph import aql
from database_service.stores.graph.model import (
    Aggregate,
    Direction,
    Edge,
    Filter,
    GraphLimits,
    Neighborhood,
    ShortestPath,
    Traverse,
    Vertex,
    edge_key,
    split_id,
)
from database_service.stores.graph.sql import GraphSql, Params, compile_filter

EVIL = "x') OR 1=1; DROP TABLE users; --"


def f(field: str, op: str, value: object) -> Filter:
    return Filter.parse({"field": field, "op": op, "value": value})


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["users", "users/a/b", "/a", "users/", "_system/a", "us ers/a", f"users/{EVIL}", "1users/a"],
)
def test_ids_that_are_not_collection_slash_key_are_refused(bad: str) -> None:
    with pytest.raises(InvalidParameters):
        split_id(bad)


def test_edges_without_a_key_get_one_from_their_ends() -> None:
    a = Edge.of("copies", "users/a", "users/b")
    assert a.key == edge_key("users/a", "users/b") == Edge.of("copies", "users/a", "users/b").key
    assert a.key != Edge.of("copies", "users/b", "users/a").key


def test_properties_may_not_shadow_the_stores_own_attributes() -> None:
    for props in ({"_id": "users/x"}, {"_from": "x"}, {"": 1}, []):
        with pytest.raises(InvalidParameters):
            Vertex.of("users", "a", props)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"field": EVIL, "value": 1}, "filter field"),
        ({"field": "a.b.c.d.e", "value": 1}, "filter field"),
        ({"field": "_key", "value": 1}, "filter field"),
        ({"field": "a", "op": "~", "value": 1}, "op must be"),
        ({"field": "a", "op": "in", "value": []}, "list of 1"),
        ({"field": "a", "op": "lt", "value": True}, "compares numbers or strings"),
        ({"field": "a", "value": float("nan")}, "finite"),
        ({"field": "a", "value": [1]}, "string, number"),
        ("a = 1", "is an object"),
    ],
)
def test_bad_filters_are_refused_with_invalid_filter(raw: object, message: str) -> None:
    with pytest.raises(InvalidFilter, match=message):
        Filter.parse(raw)  # type: ignore[arg-type]


def test_depth_is_bounded_by_the_setting() -> None:
    limits = GraphLimits(max_depth=4)
    Traverse("users/a", min_depth=0, max_depth=4).check(limits)
    for lo, hi in [(0, 5), (-1, 2), (3, 2)]:
        with pytest.raises(DepthOutOfRange):
            Traverse("users/a", min_depth=lo, max_depth=hi).check(limits)
    with pytest.raises(DepthOutOfRange):
        ShortestPath("users/a", "users/b", max_depth=5).check(limits)
    with pytest.raises(DepthOutOfRange):
        Neighborhood("users/a", depth=0).check(limits)


# --- SQL -------------------------------------------------------------------------------------


def test_sql_filters_are_parameters_only() -> None:
    params = Params()
    text = compile_filter("v", f("exposure.EURUSD", "gte", 1.5), params)
    assert text == (
        "(CASE WHEN jsonb_typeof(v.props #> $1::text[]) = 'number'"
        " THEN (v.props #>> $1::text[])::numeric END) >= $2::numeric"
    )
    assert params.values == [["exposure", "EURUSD"], Decimal("1.5")]
    params = Params()
    assert compile_filter("e", f("tier", "in", ["pro", None]), params) == (
        "coalesce(e.props #> $1::text[], 'null'::jsonb) = ANY($2::text[]::jsonb[])"
    )
    assert params.values == [["tier"], ['"pro"', "null"]]
    params = Params()
    assert compile_filter("v", f("name", "lt", "m"), params).endswith(
        '''COLLATE "C" < ($2::text) COLLATE "C"'''
    )


def test_traversal_sql_binds_everything_the_caller_named() -> None:
    sql = GraphSql("t_0123abcd")
    q = Traverse(
        "users/a",
        Direction.ANY,
        2,
        3,
        ("copies",),
        ("users",),
        (f("ratio", "gte", 1),),
        (f("grade", "eq", "PLATINUM"),),
        limit=10,
    )
    text, args = sql.traverse(q, 1000)
    assert '"t_0123abcd"._graph_edges' in text or "t_0123abcd._graph_edges" in text
    for named in ("users/a", "copies", "ratio", "grade", "PLATINUM"):
        assert named not in text
    assert "UNION ALL" in text  # any: both directions
    assert "n.nxt <> ALL (w.path)" in text  # cycle detection on the path
    assert "LIMIT $" in text
    assert args[0] == "users/a" and 1000 in args and 11 in args  # limit + 1: truncation
    assert ["copies"] in args and ["users"] in args


def test_shortest_path_expansion_follows_the_direction() -> None:
    sql = GraphSql("s")
    forward, _ = sql.expand(True, Direction.OUTBOUND, (), ())
    backward, _ = sql.expand(False, Direction.OUTBOUND, (), ())
    assert "e._from = ANY($1::text[])" in forward and "e._to = ANY($1::text[])" in backward
    inbound, _ = sql.expand(True, Direction.INBOUND, (), ())
    assert "e._to = ANY($1::text[])" in inbound
    both, args = sql.expand(True, Direction.ANY, ("follows",), (f("w", "gt", 0),))
    assert "UNION ALL" in both and args[1:] == [["follows"], ["w"], Decimal(0)]


# --- AQL -------------------------------------------------------------------------------------


def test_aql_traversal_is_exact() -> None:
    q = Traverse(
        "users/a",
        Direction.INBOUND,
        1,
        3,
        ("copies",),
        edge_filters=(f("ratio", "gte", 1),),
        vertex_filters=(f("exposure.EURUSD", "in", [1, 2]),),
        limit=5,
    )
    query = aql.traverse(q, ["copies"], 1000)
    cond = "((IS_NUMBER(e[@a0]) AND e[@a0] >= @v1))"
    assert query.query == (
        "LET walked = (FOR v, e, p IN 0..3 INBOUND @v0 @@c0"
        ' OPTIONS {uniqueVertices: "path", order: "bfs"}'
        f" PRUNE e != null AND NOT ({cond}) FILTER e == null OR ({cond})"
        " LIMIT @v2 RETURN {v: v, e: e, depth: LENGTH(p.edges),"
        " path: p.vertices[*]._id, edges: p.edges[*]._id})"
        " LET firsts = (FOR w IN walked COLLECT vid = w.v._id INTO seen = w"
        " RETURN FIRST(FOR h IN seen SORT h.depth RETURN h))"
        " LET hits = (FOR f IN firsts FILTER f.depth >= @v3 FILTER (f.v[@a1][@a2] IN @v4)"
        " SORT f.depth, f.v._id LIMIT @v5"
        " RETURN {v: f.v, depth: f.depth, path: f.path, edges: f.edges})"
        " RETURN {visits: LENGTH(walked), hits: hits}"
    )
    assert query.bind_vars == {
        "v0": "users/a",
        "@c0": "copies",
        "a0": "ratio",
        "v1": 1,
        "v2": 1000,
        "v3": 1,
        "a1": "exposure",
        "a2": "EURUSD",
        "v4": [1, 2],
        "v5": 6,
    }


def test_aql_never_carries_a_callers_names_in_its_text() -> None:
    q = Traverse(
        "users/k'", Direction.ANY, 0, 2, ("e-v-i-l",), ("users",), (), (f("quote", "eq", EVIL),)
    )
    query = aql.traverse(q, ["e-v-i-l"], 10)
    for named in ("users/k'", "e-v-i-l", "quote", EVIL, "users"):
        assert named not in query.query
    assert query.bind_vars["@c0"] == "e-v-i-l"
    assert EVIL in query.bind_vars.values()


def test_aql_neighborhood_aggregates_with_collect() -> None:
    q = Neighborhood(
        "users/t",
        2,
        Direction.INBOUND,
        ("copies",),
        function=Aggregate.SUM,
        of_field=("exposure", "EURUSD"),
        group_by=("tier",),
    )
    query = aql.neighborhood(q, ["copies"], 500, 100)
    value = "f.v[@a0][@a1]"
    assert (
        f" COLLECT grp = f.v[@a2] AGGREGATE n = COUNT(1),"
        f" value = SUM((IS_NUMBER({value}) ? {value} : null))"
        " SORT grp LIMIT @v3 RETURN {group: grp, count: n, value: value})"
        " RETURN {visits: LENGTH(walked), groups: groups}"
    ) in query.query
    assert query.bind_vars["a2"] == "tier" and query.bind_vars["v3"] == 101
    edges = Neighborhood("users/t", 1, of_edges=True, function=Aggregate.AVG, of_field=("ratio",))
    assert (
        "AVG((IS_NUMBER(f.e[@a0]) ? f.e[@a0] : null))"
        in aql.neighborhood(edges, ["copies"], 10, 10).query
    )


def test_aql_shortest_path_uses_shortest_path_unless_edges_are_filtered() -> None:
    plain = aql.shortest_path(
        ShortestPath("users/a", "users/b", Direction.ANY), ["copies", "follows"]
    )
    assert plain.query == (
        "FOR v, e IN ANY SHORTEST_PATH @v0 TO @v1 @@c0, @@c1"
        " RETURN {v: v._id, e: e._id, w: e == null ? 0 : 1}"
    )
    assert plain.bind_vars == {
        "@c0": "copies",
        "@c1": "follows",
        "v0": "users/a",
        "v1": "users/b",
    }
    filtered = aql.shortest_path(
        ShortestPath("users/a", "users/b", max_depth=4, edge_filters=(f("ratio", "gt", 0),)),
        ["copies"],
    )
    assert filtered.query.startswith("FOR v, e, p IN 1..4 OUTBOUND @v0 @@c0")
    assert "PRUNE v._id == @v1 OR (e != null AND NOT" in filtered.query
    assert "LIMIT 1" in filtered.query


def test_aql_weighted_shortest_path_binds_the_weight_attribute() -> None:
    top = aql.shortest_path(
        ShortestPath("users/a", "users/b", weight_attribute="cost", default_weight=2.5),
        ["copies"],
    )
    assert top.query == (
        "FOR v, e IN OUTBOUND SHORTEST_PATH @v2 TO @v3 @@c0"
        " OPTIONS {weightAttribute: @v1, defaultWeight: @v0}"
        " RETURN {v: v._id, e: e._id, w: e == null ? 0 :"
        " (IS_NUMBER(e[@a0]) ? e[@a0] : @v0)}"
    )
    assert top.bind_vars["v1"] == "cost" and top.bind_vars["v0"] == 2.5
    assert top.bind_vars["a0"] == "cost"
    # A nested weight, or edge filters: every path within the depth, the lightest first.
    for query in (
        ShortestPath("users/a", "users/b", max_depth=3, weight_attribute="link.cost"),
        ShortestPath(
            "users/a",
            "users/b",
            max_depth=3,
            weight_attribute="cost",
            edge_filters=(f("ratio", "gt", 0),),
        ),
    ):
        walk = aql.shortest_path(query, ["copies"])
        assert walk.query.startswith("FOR v, e, p IN 1..3 OUTBOUND")
        assert 'OPTIONS {uniqueVertices: "path"}' in walk.query
        assert "SORT total, LENGTH(p.edges) LIMIT 1" in walk.query
        assert "x[@a0]" in walk.query and "cost" in walk.bind_vars.values()
        assert "link" not in walk.query and "cost" not in walk.query.replace("total", "")


def test_aql_writes_bind_their_collections() -> None:
    removal = aql.remove_edges_of("copies", "users/a")
    assert removal.query == (
        "FOR e IN @@c0 FILTER e._from == @v0 OR e._to == @v0 REMOVE e IN @@c0 RETURN 1"
    )
    assert removal.bind_vars == {"@c0": "copies", "v0": "users/a"}
    missing = aql.missing_vertices(["users/a", "users/b"])
    assert missing.bind_vars == {"v0": ["users/a", "users/b"]}


def test_shortest_path_asks_for_a_meeting_before_reading_a_level() -> None:
    sql = GraphSql("s")
    meet, args = sql.expand(True, Direction.OUTBOUND, ("copies",), (), meeting=True)
    assert (
        "WHERE e._from = ANY($1::text[]) AND e._to = ANY($2::text[])"
        " AND e.collection = ANY($3::text[])"
    ) in meet
    assert args == [None, None, ["copies"]]
    back, _ = sql.expand(False, Direction.OUTBOUND, (), (), meeting=True)
    assert "e._to = ANY($1::text[]) AND e._from = ANY($2::text[])" in back
