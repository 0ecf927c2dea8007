"""The PostgreSQL graph's SQL, built as text plus parameters (pure: unit-tested as text).

Layout, in the tenant's own schema, created and read by the tenant's own role:

- ``_graph_collections (name, kind)`` — which names are vertex and which edge collections;
- ``_graph_vertices (id, collection, props)`` — ``id`` is ``collection/key``;
- ``_graph_edges (id, collection, _from, _to, props)`` — ``_from``/``_to`` reference
  ``_graph_vertices`` (ON DELETE CASCADE: deleting a vertex deletes its edges, and an edge can
  only join two of the tenant's own vertices), indexed on ``(_from, collection)`` and
  ``(_to, collection)`` with the other end and the id included, so a traversal step is an
  index-only scan.

One pair of tables with a collection column rather than a table per collection: a collection is
data, not DDL, so creating one needs no schema change (no lock, no catalog growth per name, no
identifier built from a caller's string), and a traversal over several edge collections is one
index scan, not a UNION over tables.

Everything a caller names is a parameter: ids, collections, property paths (``props #> $n``
with a ``text[]``), values. The only text that varies is the shape (which optional conditions
are present), so prepared statements are reused per shape.

Traversals are recursive CTEs: each path carries its vertices (``path``), and a step never
returns to a vertex already on its path (cycle detection that works on PostgreSQL 14 and later,
without the CYCLE clause's row type). The walk is read through ``LIMIT max_visits``: PostgreSQL
evaluates a recursive CTE on demand, level by level, so the limit stops the work itself, not
only the answer; a walk that reaches it is refused (``result_too_large``) rather than answered
incompletely.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from database_service.stores.graph.model import (
    Aggregate,
    Direction,
    Filter,
    Neighborhood,
    Op,
    Traverse,
)
from database_service.tenancy.ids import quote_ident

__all__ = ["GraphSql", "Params"]


@dataclass
class Params:
    """Positional parameters, numbered as they are added."""

    values: list[Any] = field(default_factory=list)

    def add(self, value: Any, cast: str) -> str:
        self.values.append(value)
        return f"${len(self.values)}::{cast}"


_COMPARE = {Op.LT: "<", Op.LTE: "<=", Op.GT: ">", Op.GTE: ">="}


def compile_filter(alias: str, flt: Filter, params: Params) -> str:
    """One filter on ``alias.props`` as a condition. A missing property compares as JSON null
    (as in AQL); order comparisons hold only between numbers, or between strings (C order)."""
    path = params.add(list(flt.path), "text[]")
    value = f"coalesce({alias}.props #> {path}, 'null'::jsonb)"
    # Values go as JSON text (a JSON null is then a value, not SQL's NULL).
    if flt.op is Op.EQ:
        return f"{value} = {params.add(json.dumps(flt.value), 'text')}::jsonb"
    if flt.op is Op.NE:
        return f"{value} <> {params.add(json.dumps(flt.value), 'text')}::jsonb"
    if flt.op is Op.IN:
        values = params.add([json.dumps(v) for v in flt.value], "text[]")
        return f"{value} = ANY({values}::jsonb[])"
    op = _COMPARE[flt.op]
    if isinstance(flt.value, str):
        text = f"CASE WHEN jsonb_typeof({alias}.props #> {path}) = 'string'"
        text += f" THEN {alias}.props #>> {path} END"
        return f'({text}) COLLATE "C" {op} ({params.add(flt.value, "text")}) COLLATE "C"'
    number = f"CASE WHEN jsonb_typeof({alias}.props #> {path}) = 'number'"
    number += f" THEN ({alias}.props #>> {path})::numeric END"
    return f"({number}) {op} {params.add(Decimal(str(flt.value)), 'numeric')}"


def _conditions(alias: str, filters: Sequence[Filter], params: Params) -> list[str]:
    return [compile_filter(alias, f, params) for f in filters]


class GraphSql:
    """The statements for one tenant schema."""

    def __init__(self, schema: str) -> None:
        s = quote_ident(schema)
        self.vertices = f"{s}._graph_vertices"
        self.edges = f"{s}._graph_edges"
        self.collections = f"{s}._graph_collections"
        self.create = (
            f"CREATE TABLE IF NOT EXISTS {self.collections} ("
            " name text PRIMARY KEY,"
            " kind text NOT NULL CHECK (kind IN ('vertex', 'edge')));"
            f" CREATE TABLE IF NOT EXISTS {self.vertices} ("
            " id text PRIMARY KEY,"
            " collection text NOT NULL,"
            " props jsonb NOT NULL DEFAULT '{}');"
            f" CREATE TABLE IF NOT EXISTS {self.edges} ("
            " id text PRIMARY KEY,"
            " collection text NOT NULL,"
            f" _from text NOT NULL REFERENCES {self.vertices} (id) ON DELETE CASCADE,"
            f" _to text NOT NULL REFERENCES {self.vertices} (id) ON DELETE CASCADE,"
            " props jsonb NOT NULL DEFAULT '{}');"
            f" CREATE INDEX IF NOT EXISTS _graph_edges_from ON {self.edges}"
            " (_from, collection) INCLUDE (_to, id);"
            f" CREATE INDEX IF NOT EXISTS _graph_edges_to ON {self.edges}"
            " (_to, collection) INCLUDE (_from, id);"
            f" CREATE INDEX IF NOT EXISTS _graph_vertices_collection ON {self.vertices}"
            " (collection)"
        )
        self.register = (
            f"WITH n AS (INSERT INTO {self.collections} (name, kind)"
            " SELECT unnest($1::text[]), $2 ON CONFLICT (name) DO NOTHING RETURNING name)"
            f" SELECT name, kind FROM {self.collections} WHERE name = ANY($1::text[])"
        )
        self.kinds = f"SELECT name, kind FROM {self.collections} WHERE name = ANY($1::text[])"
        self.upsert_vertices = (
            f"INSERT INTO {self.vertices} (id, collection, props)"
            " SELECT c || '/' || k, c, p FROM unnest($1::text[], $2::text[], $3::jsonb[])"
            " AS t(c, k, p)"
            " ON CONFLICT (id) DO UPDATE SET props = EXCLUDED.props"
        )
        self.upsert_edges = (
            f"INSERT INTO {self.edges} (id, collection, _from, _to, props)"
            " SELECT c || '/' || k, c, f, t, p"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])"
            " AS x(c, k, f, t, p)"
            " ON CONFLICT (id) DO UPDATE"
            " SET _from = EXCLUDED._from, _to = EXCLUDED._to, props = EXCLUDED.props"
        )
        self.get_vertex = f"SELECT collection, props FROM {self.vertices} WHERE id = $1"
        self.get_edge = f"SELECT collection, _from, _to, props FROM {self.edges} WHERE id = $1"
        self.vertices_exist = f"SELECT id FROM {self.vertices} WHERE id = ANY($1::text[])"
        self.delete_vertex_edges = f"DELETE FROM {self.edges} WHERE _from = $1 OR _to = $1"
        self.delete_vertex = f"DELETE FROM {self.vertices} WHERE id = $1"
        self.delete_edge = f"DELETE FROM {self.edges} WHERE id = $1"

    # --- traversal ----------------------------------------------------------------------

    def _step(
        self,
        direction: Direction,
        edge_collections: Sequence[str],
        edge_filters: Sequence[Filter],
        params: Params,
    ) -> str:
        """The LATERAL subquery of one step from ``w.vid``: (eid, nxt) per edge followed."""
        colls = ""
        if edge_collections:
            colls = f" AND e.collection = ANY({params.add(list(edge_collections), 'text[]')})"
        conds = "".join(f" AND {c}" for c in _conditions("e", edge_filters, params))
        out = f"SELECT e.id AS eid, e._to AS nxt FROM {self.edges} e WHERE e._from = w.vid"
        inb = f"SELECT e.id AS eid, e._from AS nxt FROM {self.edges} e WHERE e._to = w.vid"
        if direction is Direction.OUTBOUND:
            return out + colls + conds
        if direction is Direction.INBOUND:
            return inb + colls + conds
        return f"{out}{colls}{conds} UNION ALL {inb}{colls}{conds}"

    def _walk(
        self,
        start: str,
        max_depth: int,
        direction: Direction,
        edge_collections: Sequence[str],
        edge_filters: Sequence[Filter],
        max_visits: int,
        params: Params,
    ) -> str:
        """``walk`` (every cycle-free path up to max_depth, read through a LIMIT that bounds
        the work) and ``firsts`` (each vertex once, at its fewest steps, with one such path)."""
        s = params.add(start, "text")
        depth = params.add(max_depth, "int")
        step = self._step(direction, edge_collections, edge_filters, params)
        visits = params.add(max_visits, "int")
        return (
            "WITH RECURSIVE walk (vid, depth, path, edges) AS ("
            f" SELECT {s}, 0, ARRAY[{s}], ARRAY[]::text[]"
            " UNION ALL"
            " SELECT n.nxt, w.depth + 1, w.path || n.nxt, w.edges || n.eid"
            f" FROM walk w CROSS JOIN LATERAL ({step}) n"
            f" WHERE w.depth < {depth} AND n.nxt <> ALL (w.path)),"
            f" reached AS MATERIALIZED (SELECT * FROM walk LIMIT {visits}),"
            " firsts AS (SELECT DISTINCT ON (vid) vid, depth, path, edges FROM reached"
            " ORDER BY vid, depth)"
        )

    def traverse(self, q: Traverse, max_visits: int) -> tuple[str, list[Any]]:
        """Rows: found, kinds (the checks: ``_check``), visits (how many paths the walk
        produced: ``max_visits`` means it was cut), then depth, path, edges, id, collection,
        props — NULL in the one row of an empty answer. At most ``limit + 1`` rows (the extra
        one says the answer was truncated)."""
        params = Params()
        walk = self._walk(
            q.start,
            q.max_depth,
            q.direction,
            q.edge_collections,
            q.edge_filters,
            max_visits,
            params,
        )
        where = [f"f.depth >= {params.add(q.min_depth, 'int')}"]
        if q.vertex_collections:
            where.append(f"v.collection = ANY({params.add(list(q.vertex_collections), 'text[]')})")
        where += _conditions("v", q.vertex_filters, params)
        limit = params.add(q.limit + 1, "int")
        check = self._check([q.start], [*q.edge_collections, *q.vertex_collections], params)
        sql = (
            f"{walk}, hits AS (SELECT f.depth, f.path, f.edges, v.id, v.collection, v.props"
            f" FROM firsts f JOIN {self.vertices} v ON v.id = f.vid"
            f" WHERE {' AND '.join(where)}"
            f" ORDER BY f.depth, f.vid LIMIT {limit})"
            f" SELECT c.*, (SELECT count(*) FROM reached) AS visits, h.*"
            f" FROM ({check}) c LEFT JOIN hits h ON true ORDER BY h.depth, h.id"
        )
        return sql, params.values

    def _check(self, ids: Sequence[str], names: Sequence[str], params: Params) -> str:
        """One row answering the checks a read needs, in the read's own statement (one round
        trip): how many of ``ids`` are vertices, and the kinds of the collections named."""
        return (
            f"SELECT (SELECT count(*) FROM {self.vertices}"
            f" WHERE id = ANY({params.add(list(ids), 'text[]')})) AS found,"
            f" (SELECT array_agg(name || ':' || kind) FROM {self.collections}"
            f" WHERE name = ANY({params.add(list(names), 'text[]')})) AS kinds"
        )

    def neighborhood(
        self, q: Neighborhood, max_visits: int, max_groups: int
    ) -> tuple[str, list[Any]]:
        """Rows: found, kinds, visits (as ``traverse``), then grp (jsonb or NULL), n (vertices;
        NULL in the one row of an empty answer), value. At most ``max_groups + 1`` groups."""
        params = Params()
        walk = self._walk(
            q.start, q.depth, q.direction, q.edge_collections, q.edge_filters, max_visits, params
        )
        where = ["f.depth >= 1"]
        if q.vertex_collections:
            where.append(f"v.collection = ANY({params.add(list(q.vertex_collections), 'text[]')})")
        where += _conditions("v", q.vertex_filters, params)
        group = "NULL::jsonb"
        if q.group_by is not None:
            group = f"v.props #> {params.add(list(q.group_by), 'text[]')}"
        value = "NULL::numeric"
        joins = ""
        if q.of_field is not None:
            source = "e" if q.of_edges else "v"
            path = params.add(list(q.of_field), "text[]")
            value = (
                f"CASE WHEN jsonb_typeof({source}.props #> {path}) = 'number'"
                f" THEN ({source}.props #>> {path})::numeric END"
            )
        if q.of_edges:
            # The edge each vertex was first reached by (the last of its path).
            joins = f" JOIN {self.edges} e ON e.id = f.edges[cardinality(f.edges)]"
        if q.function is Aggregate.COUNT:
            agg = "count(*)::numeric" if q.of_field is None else "count(x.val)::numeric"
        else:
            agg = f"{q.function.value}(x.val)"
        limit = params.add(max_groups + 1, "int")
        check = self._check([q.start], [*q.edge_collections, *q.vertex_collections], params)
        sql = (
            f"{walk}, x AS (SELECT {group} AS grp, {value} AS val"
            f" FROM firsts f JOIN {self.vertices} v ON v.id = f.vid{joins}"
            f" WHERE {' AND '.join(where)}),"
            f" groups AS (SELECT x.grp, count(*) AS n, {agg} AS value"
            " FROM x GROUP BY x.grp ORDER BY x.grp NULLS FIRST"
            f" LIMIT {limit})"
            " SELECT c.*, (SELECT count(*) FROM reached) AS visits, g.*"
            f" FROM ({check}) c LEFT JOIN groups g ON true ORDER BY g.grp NULLS FIRST"
        )
        return sql, params.values

    # --- shortest path: one query per BFS level ------------------------------------------

    def expand(
        self,
        forward: bool,
        direction: Direction,
        edge_collections: Sequence[str],
        edge_filters: Sequence[Filter],
        *,
        meeting: bool = False,
    ) -> tuple[str, list[Any]]:
        """The edges leaving a BFS frontier ($1: vertex ids), as (id, here, there): forward
        from the start along ``direction``, backward from the end against it. ``meeting``: only
        those arriving in $2 (the other search's vertices) — asked first, so that the level
        where the searches meet is not read whole (a hub's thousands of copiers)."""
        params = Params()
        params.add(None, "text[]")  # $1: the frontier, set per call
        if meeting:
            params.add(None, "text[]")  # $2: the other side's vertices, set per call
        colls = ""
        if edge_collections:
            colls = f" AND e.collection = ANY({params.add(list(edge_collections), 'text[]')})"
        conds = "".join(f" AND {c}" for c in _conditions("e", edge_filters, params))
        along = direction is Direction.OUTBOUND if forward else direction is Direction.INBOUND
        to_other = " AND e._to = ANY($2::text[])" if meeting else ""
        from_other = " AND e._from = ANY($2::text[])" if meeting else ""
        out = (
            f"SELECT e.id, e._from AS here, e._to AS there FROM {self.edges} e"
            f" WHERE e._from = ANY($1::text[]){to_other}{colls}{conds}"
        )
        inb = (
            f"SELECT e.id, e._to AS here, e._from AS there FROM {self.edges} e"
            f" WHERE e._to = ANY($1::text[]){from_other}{colls}{conds}"
        )
        if direction is Direction.ANY:
            return f"{out} UNION ALL {inb}", params.values
        return (out if along else inb), params.values

    # --- weighted shortest path: one query per round ------------------------------------

    def relax(
        self,
        direction: Direction,
        edge_collections: Sequence[str],
        edge_filters: Sequence[Filter],
        weight_path: Sequence[str],
        default_weight: float,
    ) -> tuple[str, list[Any]]:
        """The edges leaving a frontier ($1: vertex ids) along ``direction``, as
        (id, here, there, weight): the edge's number at ``weight_path``, ``default_weight``
        where it has none (as ArangoDB's ``defaultWeight``)."""
        params = Params()
        params.add(None, "text[]")  # $1: the frontier, set per call
        path = params.add(list(weight_path), "text[]")
        default = params.add(default_weight, "float8")
        weight = (
            f"CASE WHEN jsonb_typeof(e.props #> {path}) = 'number'"
            f" THEN (e.props #>> {path})::float8 ELSE {default} END"
        )
        colls = ""
        if edge_collections:
            colls = f" AND e.collection = ANY({params.add(list(edge_collections), 'text[]')})"
        conds = "".join(f" AND {c}" for c in _conditions("e", edge_filters, params))
        out = (
            f"SELECT e.id, e._from AS here, e._to AS there, {weight} AS weight"
            f" FROM {self.edges} e WHERE e._from = ANY($1::text[]){colls}{conds}"
        )
        inb = (
            f"SELECT e.id, e._to AS here, e._from AS there, {weight} AS weight"
            f" FROM {self.edges} e WHERE e._to = ANY($1::text[]){colls}{conds}"
        )
        if direction is Direction.ANY:
            return f"{out} UNION ALL {inb}", params.values
        return (out if direction is Direction.OUTBOUND else inb), params.values
