"""The ArangoDB graph's AQL, built as text plus bind variables (pure: unit-tested as text, since
no ArangoDB server can run here).

Everything a caller names is a bind variable: vertex ids and values (``@v0``…), collections
(``@@c0``…, ArangoDB's collection parameters), property names (``doc[@a0][@a1]``: attribute
access by a bound string). The query text only varies in shape. The tenant is not in the text
at all: each tenant has its own database, which the store picks before the query runs.

Semantics match the PostgreSQL store (``sql.py``): a walk never revisits a vertex of its own
path (``uniqueVertices: "path"``), breadth first; an edge failing the edge filters is not
followed (``PRUNE`` stops there, and the vertex it led to is filtered out); the walk is read
through ``LIMIT @visits``, and a walk that reaches it is refused; each vertex is reported once,
at its fewest steps, with the path it was first reached by.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from database_service.stores.graph.model import (
    Aggregate,
    Direction,
    Filter,
    Neighborhood,
    Op,
    ShortestPath,
    Traverse,
)

__all__ = [
    "Aql",
    "missing_vertices",
    "neighborhood",
    "remove_document",
    "remove_edges_of",
    "shortest_path",
    "traverse",
]

_OPS = {Op.EQ: "==", Op.NE: "!=", Op.LT: "<", Op.LTE: "<=", Op.GT: ">", Op.GTE: ">="}


@dataclass
class Aql:
    query: str
    bind_vars: dict[str, Any] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def _name(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return f"{prefix}{n}"

    def value(self, value: Any) -> str:
        name = self._name("v")
        self.bind_vars[name] = value
        return f"@{name}"

    def collection(self, name: str) -> str:
        key = "@" + self._name("c")
        self.bind_vars[key] = name
        return f"@{key}"

    def attribute(self, document: str, path: Sequence[str]) -> str:
        access = document
        for part in path:
            name = self._name("a")
            self.bind_vars[name] = part
            access += f"[@{name}]"
        return access


def compile_filter(document: str, flt: Filter, aql: Aql) -> str:
    """One filter on ``document`` as an AQL condition: a missing attribute is null (eq/ne/in
    compare it as such); order comparisons hold between numbers or between strings only."""
    attr = aql.attribute(document, flt.path)
    if flt.op is Op.IN:
        return f"{attr} IN {aql.value(list(flt.value))}"
    if flt.op in (Op.EQ, Op.NE):
        return f"{attr} {_OPS[flt.op]} {aql.value(flt.value)}"
    kind = "IS_STRING" if isinstance(flt.value, str) else "IS_NUMBER"
    return f"({kind}({attr}) AND {attr} {_OPS[flt.op]} {aql.value(flt.value)})"


def _all(document: str, filters: Sequence[Filter], aql: Aql) -> str:
    return " AND ".join(f"({compile_filter(document, f, aql)})" for f in filters)


def _walk(
    aql: Aql,
    start: str,
    max_depth: int,
    direction: Direction,
    edge_collections: Sequence[str],
    edge_filters: Sequence[Filter],
    max_visits: int,
) -> str:
    """``walked``: every path up to max_depth (its end vertex, last edge, depth, vertex and edge
    ids), at most ``max_visits`` of them, breadth first."""
    colls = ", ".join(aql.collection(c) for c in edge_collections)
    text = (
        f"LET walked = (FOR v, e, p IN 0..{int(max_depth)} {direction.value.upper()}"
        f" {aql.value(start)} {colls}"
        ' OPTIONS {uniqueVertices: "path", order: "bfs"}'
    )
    if edge_filters:
        condition = _all("e", edge_filters, aql)
        text += f" PRUNE e != null AND NOT ({condition})"
        text += f" FILTER e == null OR ({condition})"
    text += (
        f" LIMIT {aql.value(max_visits)}"
        " RETURN {v: v, e: e, depth: LENGTH(p.edges),"
        " path: p.vertices[*]._id, edges: p.edges[*]._id})"
        " LET firsts = (FOR w IN walked COLLECT vid = w.v._id INTO seen = w"
        " RETURN FIRST(FOR h IN seen SORT h.depth RETURN h))"
    )
    return text


def _selected(
    aql: Aql,
    min_depth: int,
    vertex_collections: Sequence[str],
    vertex_filters: Sequence[Filter],
) -> str:
    text = f"FOR f IN firsts FILTER f.depth >= {aql.value(min_depth)}"
    if vertex_collections:
        text += (
            f" FILTER PARSE_IDENTIFIER(f.v._id).collection IN {aql.value(list(vertex_collections))}"
        )
    if vertex_filters:
        text += f" FILTER {_all('f.v', vertex_filters, aql)}"
    return text


def traverse(q: Traverse, edge_collections: Sequence[str], max_visits: int) -> Aql:
    """One row: ``{visits, hits: [{v, depth, path, edges}]}`` with at most ``limit + 1`` hits.
    ``edge_collections``: the query's, or all of the tenant's when it names none."""
    aql = Aql("")
    walk = _walk(
        aql, q.start, q.max_depth, q.direction, edge_collections, q.edge_filters, max_visits
    )
    select = _selected(aql, q.min_depth, q.vertex_collections, q.vertex_filters)
    aql.query = (
        f"{walk} LET hits = ({select} SORT f.depth, f.v._id LIMIT {aql.value(q.limit + 1)}"
        " RETURN {v: f.v, depth: f.depth, path: f.path, edges: f.edges})"
        " RETURN {visits: LENGTH(walked), hits: hits}"
    )
    return aql


def neighborhood(
    q: Neighborhood, edge_collections: Sequence[str], max_visits: int, max_groups: int
) -> Aql:
    """One row: ``{visits, groups: [{group, count, value}]}``, at most ``max_groups + 1``."""
    aql = Aql("")
    walk = _walk(aql, q.start, q.depth, q.direction, edge_collections, q.edge_filters, max_visits)
    select = _selected(aql, 1, q.vertex_collections, q.vertex_filters)
    value = "null"
    if q.of_field is not None:
        value = aql.attribute("f.e" if q.of_edges else "f.v", q.of_field)
    group = "null" if q.group_by is None else aql.attribute("f.v", q.group_by)
    number = f"(IS_NUMBER({value}) ? {value} : null)"
    if q.function is Aggregate.COUNT:
        agg = "COUNT(1)" if q.of_field is None else f"SUM(IS_NUMBER({value}) ? 1 : 0)"
    else:
        agg = f"{q.function.value.upper()}({number})"
    aql.query = (
        f"{walk} LET groups = ({select}"
        f" COLLECT grp = {group} AGGREGATE n = COUNT(1), value = {agg}"
        f" SORT grp LIMIT {aql.value(max_groups + 1)}"
        " RETURN {group: grp, count: n, value: value})"
        " RETURN {visits: LENGTH(walked), groups: groups}"
    )
    return aql


def shortest_path(q: ShortestPath, edge_collections: Sequence[str]) -> Aql:
    """Rows ``{v, e, w}`` from start to end (none: no path), ``w`` the weight of the edge that
    led to ``v`` (0 for the start; 1 per edge when unweighted). Without edge filters, ArangoDB's
    ``SHORTEST_PATH`` (with ``weightAttribute``/``defaultWeight`` when weighted, for a
    top-level weight attribute); with them, or with a nested weight path, a walk: breadth first
    with the first arrival kept when unweighted, every arrival within ``max_depth`` sorted by
    weight then length when weighted."""
    aql = Aql("")
    colls = ", ".join(aql.collection(c) for c in edge_collections)
    direction = q.direction.value.upper()
    weight_path = q.weight_path
    default = aql.value(float(q.default_weight)) if weight_path is not None else "1"
    # The weight of an edge document ``d``: ``d[@a0]…`` bound once, written for ``e`` and ``x``.
    access = aql.attribute("", weight_path) if weight_path is not None else ""

    def weight_of(d: str) -> str:
        if weight_path is None:
            return "1"
        return f"(IS_NUMBER({d}{access}) ? {d}{access} : {default})"

    weight = weight_of("e")
    if not q.edge_filters and (weight_path is None or len(weight_path) == 1):
        options = ""
        if weight_path is not None:
            options = (
                f" OPTIONS {{weightAttribute: {aql.value(weight_path[0])},"
                f" defaultWeight: {default}}}"
            )
        aql.query = (
            f"FOR v, e IN {direction} SHORTEST_PATH {aql.value(q.start)} TO {aql.value(q.end)}"
            f" {colls}{options} RETURN {{v: v._id, e: e._id, w: e == null ? 0 : {weight}}}"
        )
        return aql
    start = aql.value(q.start)
    end = aql.value(q.end)
    prune = f"v._id == {end}"
    accept = f"v._id == {end}"
    if q.edge_filters:
        condition = _all("e", q.edge_filters, aql)
        prune += f" OR (e != null AND NOT ({condition}))"
        accept += f" AND ({condition})"
    each = weight_of("x")  # the same weight, of each edge ``x`` of the path
    if weight_path is None:
        order = ' OPTIONS {uniqueVertices: "path", order: "bfs"}'
        pick = " LIMIT 1"
    else:
        order = ' OPTIONS {uniqueVertices: "path"}'
        pick = (
            f" LET total = SUM(FOR x IN p.edges RETURN {each}) SORT total, LENGTH(p.edges) LIMIT 1"
        )
    aql.query = (
        f"FOR v, e, p IN 1..{int(q.max_depth)} {direction} {start} {colls}{order}"
        f" PRUNE {prune} FILTER {accept}{pick}"
        " FOR i IN 0..LENGTH(p.edges)"
        " LET x = i == 0 ? null : p.edges[i - 1]"
        f" RETURN {{v: p.vertices[i]._id, e: x == null ? null : x._id,"
        f" w: x == null ? 0 : {each}}}"
    )
    return aql


def missing_vertices(ids: Sequence[str]) -> Aql:
    """The ids among ``ids`` that name no document (edges may only join existing vertices)."""
    aql = Aql("")
    aql.query = f"FOR id IN {aql.value(list(ids))} FILTER DOCUMENT(id) == null RETURN id"
    return aql


def remove_edges_of(collection: str, vertex_id: str) -> Aql:
    """Remove the edges of ``collection`` to or from a vertex; one ``1`` per edge removed."""
    aql = Aql("")
    coll = aql.collection(collection)
    vid = aql.value(vertex_id)
    aql.query = (
        f"FOR e IN {coll} FILTER e._from == {vid} OR e._to == {vid} REMOVE e IN {coll} RETURN 1"
    )
    return aql


def remove_document(collection: str, document_id: str) -> Aql:
    """Remove one document by id, if it is there; ``[1]`` when it was."""
    aql = Aql("")
    coll = aql.collection(collection)
    aql.query = (
        f"FOR d IN {coll} FILTER d._id == {aql.value(document_id)} REMOVE d IN {coll} RETURN 1"
    )
    return aql
