"""The relationship graph on PostgreSQL (the embedded default), through the use case every front
end calls (``core.graphs``): every operation on a small copy-trading graph with a cycle, checked
by hand and, for shortest paths, against a breadth-first search in Python over the same edges.
The front ends' own translation is tested in test_graph_frontends.py."""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass

import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import (
    DepthOutOfRange,
    GraphCollectionKind,
    GraphCollectionNotFound,
    InvalidFilter,
    InvalidParameters,
    PermissionDenied,
    ResultTooLarge,
    VertexNotFound,
)
from database_service.query import TenantContext
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
)
from database_service.stores.graph.postgres import PostgresGraphStore
from database_service.tenancy import TenantRecord

pytestmark = pytest.mark.integration

USERS = {
    "alice": {"tier": "pro", "exposure": {"EURUSD": 100}},
    "bob": {"tier": "free", "exposure": {"EURUSD": 10}},
    "carol": {"tier": "pro", "exposure": {"EURUSD": 5}},
    "dave": {"tier": "free", "exposure": {"EURUSD": 1, "GBPUSD": 3}},
    "erin": {"tier": "pro"},
}
# (collection, from, to, ratio): who copies whom, with a cycle alice → erin → dave → bob → alice.
EDGES = [
    ("copies", "bob", "alice", 0.5),
    ("copies", "carol", "alice", 1.0),
    ("copies", "dave", "bob", 2),
    ("copies", "erin", "dave", 1),
    ("copies", "alice", "erin", 0.25),
    ("follows", "carol", "bob", None),
]


@dataclass
class Graph:
    tenant: TenantRecord
    principal: Principal
    ctx: TenantContext


def f(field: str, op: str, value: object) -> Filter:
    return Filter.parse({"field": field, "op": op, "value": value})


async def new_graph(core: Application, prefix: str) -> Graph:
    """A new tenant, and a principal that reads and writes it."""
    tenant = await core.tenants.create(f"{prefix}_{secrets.token_hex(4)}")
    principal = Principal(
        service="graph-test",
        tenants=frozenset({tenant.tenant_id}),
        scopes=frozenset({Scope.READ, Scope.WRITE}),
    )
    return Graph(tenant, principal, TenantContext(tenant.tenant_id))


@pytest.fixture(scope="module")
async def graph(core: Application) -> Graph:
    made = await new_graph(core, "graph")
    principal, ctx = made.principal, made.ctx
    g = core.graphs
    written = await g.upsert_vertices(
        principal,
        ctx,
        [Vertex.of("users", k, p) for k, p in USERS.items()] + [Vertex.of("symbols", "EURUSD")],
    )
    assert written == 6
    edges = [
        Edge.of(c, f"users/{a}", f"users/{b}", properties={} if r is None else {"ratio": r})
        for c, a, b, r in EDGES
    ]
    assert await g.upsert_edges(principal, ctx, edges) == len(EDGES)
    return made


def ids(result: object) -> list[str]:
    return [h.vertex.id for h in result.hits]  # type: ignore[attr-defined]


async def test_traversal_follows_direction_and_depth(core: Application, graph: Graph) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    inbound = Traverse("users/alice", Direction.INBOUND, 1, 1, ("copies",))
    assert ids(await g.traverse(p, c, inbound)) == ["users/bob", "users/carol"]
    outbound = Traverse("users/alice", Direction.OUTBOUND, 1, 1, ("copies",))
    assert ids(await g.traverse(p, c, outbound)) == ["users/erin"]
    # Both directions, all edge collections: alice's copiers, whom she copies.
    both = Traverse("users/alice", Direction.ANY, 1, 1)
    assert ids(await g.traverse(p, c, both)) == ["users/bob", "users/carol", "users/erin"]


async def test_traversal_handles_cycles_and_reports_each_vertex_at_its_fewest_steps(
    core: Application, graph: Graph
) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    result = await g.traverse(p, c, Traverse("users/alice", Direction.INBOUND, 1, 10, ("copies",)))
    assert [(h.vertex.id, h.depth) for h in result.hits] == [
        ("users/bob", 1),
        ("users/carol", 1),
        ("users/dave", 2),
        ("users/erin", 3),
    ]
    erin = result.hits[-1]
    assert erin.path == ["users/alice", "users/bob", "users/dave", "users/erin"]
    assert len(erin.edges) == 3 and all(e.startswith("copies/") for e in erin.edges)
    assert erin.vertex.properties == USERS["erin"]
    anyway = await g.traverse(p, c, Traverse("users/alice", Direction.ANY, 0, 10))
    assert sorted(ids(anyway)) == sorted(f"users/{u}" for u in USERS)  # min 0: the start too
    assert not anyway.truncated


async def test_traversal_min_depth_limit_and_filters(core: Application, graph: Graph) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    deep = Traverse("users/alice", Direction.INBOUND, 2, 3, ("copies",))
    assert ids(await g.traverse(p, c, deep)) == ["users/dave", "users/erin"]
    limited = await g.traverse(
        p, c, Traverse("users/alice", Direction.INBOUND, 1, 3, ("copies",), limit=2)
    )
    assert ids(limited) == ["users/bob", "users/carol"] and limited.truncated
    # An edge filter holds for every edge walked: bob copies at 0.5, so nobody behind him.
    strong = Traverse(
        "users/alice", Direction.INBOUND, 1, 3, ("copies",), edge_filters=(f("ratio", "gte", 1),)
    )
    assert ids(await g.traverse(p, c, strong)) == ["users/carol"]
    # A vertex filter selects what is returned, not where the walk goes.
    pros = Traverse(
        "users/alice",
        Direction.INBOUND,
        1,
        3,
        ("copies",),
        vertex_filters=(f("tier", "eq", "pro"),),
    )
    assert ids(await g.traverse(p, c, pros)) == ["users/carol", "users/erin"]
    for flt, expected in [
        (f("exposure.EURUSD", "lt", 10), ["users/carol", "users/dave"]),
        (f("exposure.EURUSD", "in", [1, 10]), ["users/bob", "users/dave"]),
        (f("exposure.EURUSD", "ne", 10), ["users/carol", "users/dave", "users/erin"]),
        (f("exposure.EURUSD", "eq", None), ["users/erin"]),  # missing compares as null
        (f("tier", "gt", "a"), ["users/bob", "users/carol", "users/dave", "users/erin"]),
        (f("tier", "gt", 1), []),  # a string is never compared with a number
    ]:
        q = Traverse("users/alice", Direction.INBOUND, 1, 3, ("copies",), vertex_filters=(flt,))
        assert ids(await g.traverse(p, c, q)) == expected, flt
    users_only = Traverse("users/carol", Direction.ANY, 1, 1, vertex_collections=("users",))
    assert ids(await g.traverse(p, c, users_only)) == ["users/alice", "users/bob"]


async def test_bad_traversals_are_refused_with_stable_codes(
    core: Application, graph: Graph
) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    limit = core.settings.graph_max_depth
    for query, error in [
        (Traverse("users/alice", max_depth=limit + 1), DepthOutOfRange),
        (Traverse("users/alice", min_depth=3, max_depth=2), DepthOutOfRange),
        (Traverse("users/nobody"), VertexNotFound),
        (Traverse("users/alice", edge_collections=("likes",)), GraphCollectionNotFound),
        (Traverse("users/alice", edge_collections=("users",)), GraphCollectionNotFound),
        (Traverse("users/alice", vertex_collections=("copies",)), GraphCollectionNotFound),
        (Traverse("alice"), InvalidParameters),
        (Traverse("users/alice", limit=0), InvalidParameters),
    ]:
        with pytest.raises(error):
            await g.traverse(p, c, query)
    for raw in [
        {"field": "x'; DROP TABLE users; --", "op": "eq", "value": 1},
        {"field": "_key", "op": "eq", "value": 1},
        {"field": "a.b.c.d.e", "op": "eq", "value": 1},
        {"field": "tier", "op": "like", "value": "p%"},
        {"field": "tier", "op": "in", "value": "pro"},
        {"field": "tier", "op": "lt", "value": None},
        {"field": "tier", "op": "eq", "value": {"nested": 1}},
        {"field": "tier", "op": "eq", "value": 1, "extra": 2},
    ]:
        with pytest.raises(InvalidFilter):
            Filter.parse(raw)


def bfs(direction: Direction, start: str, end: str) -> int | None:
    adjacency: dict[str, set[str]] = {}
    for _, a, b, _ in EDGES:
        if direction in (Direction.OUTBOUND, Direction.ANY):
            adjacency.setdefault(a, set()).add(b)
        if direction in (Direction.INBOUND, Direction.ANY):
            adjacency.setdefault(b, set()).add(a)
    seen, queue = {start: 0}, deque([start])
    while queue:
        here = queue.popleft()
        for there in adjacency.get(here, ()):
            if there not in seen:
                seen[there] = seen[here] + 1
                queue.append(there)
    return seen.get(end)


async def test_shortest_paths_match_a_breadth_first_search(core: Application, graph: Graph) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    edges = {
        (await g.get_edge(p, c, e.id)).id: e  # type: ignore[union-attr]
        for e in [Edge.of(col, f"users/{a}", f"users/{b}") for col, a, b, _ in EDGES]
    }
    for direction in Direction:
        for start in USERS:
            for end in USERS:
                q = ShortestPath(f"users/{start}", f"users/{end}", direction, max_depth=10)
                path = await g.shortest_path(p, c, q)
                expected = bfs(direction, start, end)
                assert (path.length if path.found else None) == expected, (direction, start, end)
                if not path.found:
                    continue
                assert path.vertices[0] == q.start and path.vertices[-1] == q.end
                for i, edge_id in enumerate(path.edges):  # each step is an edge of the graph
                    e = edges[edge_id]
                    step = {(e.from_id, e.to_id)}
                    if direction is Direction.ANY:
                        step.add((e.to_id, e.from_id))
                    elif direction is Direction.INBOUND:
                        step = {(e.to_id, e.from_id)}
                    assert (path.vertices[i], path.vertices[i + 1]) in step


async def test_shortest_path_bounds_and_filters(core: Application, graph: Graph) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    far = ShortestPath("users/erin", "users/alice", Direction.OUTBOUND, max_depth=2)
    assert not (await g.shortest_path(p, c, far)).found  # three steps away
    near = ShortestPath("users/erin", "users/alice", Direction.OUTBOUND, max_depth=3)
    assert (await g.shortest_path(p, c, near)).vertices == [
        "users/erin",
        "users/dave",
        "users/bob",
        "users/alice",
    ]
    # carol → bob directly by follows; by copies only: carol, alice, erin, dave, bob.
    follows = ShortestPath("users/carol", "users/bob", Direction.OUTBOUND, 5, ("follows",))
    assert (await g.shortest_path(p, c, follows)).length == 1
    copies = ShortestPath("users/carol", "users/bob", Direction.OUTBOUND, 5, ("copies",))
    assert (await g.shortest_path(p, c, copies)).length == 4
    strong = ShortestPath(
        "users/erin",
        "users/alice",
        Direction.OUTBOUND,
        5,
        ("copies",),
        edge_filters=(f("ratio", "gte", 1),),
    )
    assert not (await g.shortest_path(p, c, strong)).found  # bob → alice is 0.5
    same = await g.shortest_path(p, c, ShortestPath("users/bob", "users/bob"))
    assert same.found and same.vertices == ["users/bob"] and same.edges == []
    with pytest.raises(VertexNotFound):
        await g.shortest_path(p, c, ShortestPath("users/bob", "users/nobody"))
    with pytest.raises(DepthOutOfRange):
        await g.shortest_path(p, c, ShortestPath("users/bob", "users/alice", max_depth=0))


async def test_neighborhood_aggregates_by_hand(core: Application, graph: Graph) -> None:
    """The exposure to EURUSD of everyone who copies alice, directly or through others."""
    g, p, c = core.graphs, graph.principal, graph.ctx

    def exposure(depth: int, function: Aggregate, **kw: object) -> Neighborhood:
        return Neighborhood(
            "users/alice",
            depth,
            Direction.INBOUND,
            ("copies",),
            function=function,
            of_field=("exposure", "EURUSD"),
            **kw,  # type: ignore[arg-type]
        )

    [direct] = await g.neighborhood(p, c, exposure(1, Aggregate.SUM))
    assert (direct.group, direct.count, direct.value) == (None, 2, 15)  # bob 10 + carol 5
    [two] = await g.neighborhood(p, c, exposure(2, Aggregate.SUM))
    assert (two.count, two.value) == (3, 16)  # + dave 1
    [three] = await g.neighborhood(p, c, exposure(3, Aggregate.AVG))
    assert (three.count, three.value) == (4, 16 / 3)  # erin has none: left out of the average
    assert (await g.neighborhood(p, c, exposure(3, Aggregate.MIN)))[0].value == 1
    assert (await g.neighborhood(p, c, exposure(3, Aggregate.MAX)))[0].value == 10
    assert (await g.neighborhood(p, c, exposure(3, Aggregate.COUNT)))[0].value == 3
    by_tier = await g.neighborhood(p, c, exposure(3, Aggregate.SUM, group_by=("tier",)))
    assert [(x.group, x.count, x.value) for x in by_tier] == [("free", 2, 11), ("pro", 2, 5)]
    plain = Neighborhood("users/alice", 3, Direction.INBOUND, ("copies",))
    assert [(x.count, x.value) for x in await g.neighborhood(p, c, plain)] == [(4, 4)]
    ratios = Neighborhood(
        "users/alice",
        1,
        Direction.INBOUND,
        ("copies",),
        function=Aggregate.SUM,
        of_field=("ratio",),
        of_edges=True,
    )
    assert (await g.neighborhood(p, c, ratios))[0].value == 1.5  # 0.5 + 1.0
    with pytest.raises(InvalidFilter):
        await g.neighborhood(p, c, Neighborhood("users/alice", 1, function=Aggregate.SUM))


async def test_writes_replace_delete_and_refuse_dangling_edges(
    core: Application, graph: Graph
) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    await g.upsert_vertices(p, c, [Vertex.of("tmp", "x", {"a": 1}), Vertex.of("tmp", "y")])
    await g.upsert_vertices(p, c, [Vertex.of("tmp", "x", {"b": 2})])
    x = await g.get_vertex(p, c, "tmp/x")
    assert x is not None and x.properties == {"b": 2}  # replaced whole
    assert await g.get_vertex(p, c, "tmp/none") is None
    e1 = Edge.of("links", "tmp/x", "tmp/y", key="e1")
    assert await g.upsert_edges(p, c, [e1, Edge.of("links", "tmp/y", "tmp/x")]) == 2
    with pytest.raises(VertexNotFound):
        await g.upsert_edges(p, c, [Edge.of("links", "tmp/x", "tmp/ghost", key="e2")])
    assert await g.get_edge(p, c, "links/e2") is None  # nothing written
    with pytest.raises(GraphCollectionKind):
        await g.upsert_edges(p, c, [Edge.of("tmp", "tmp/x", "tmp/y")])
    with pytest.raises(GraphCollectionKind):
        await g.upsert_vertices(p, c, [Vertex.of("links", "v")])
    with pytest.raises(InvalidParameters):
        await g.upsert_vertices(p, c, [Vertex("tmp", "k", {"_id": "users/alice"})])
    assert await g.delete_edge(p, c, "links/e1")
    assert not await g.delete_edge(p, c, "links/e1")
    assert await g.delete_vertex(p, c, "tmp/x") == (True, 1)  # its remaining edge went with it
    assert await g.delete_vertex(p, c, "tmp/x") == (False, 0)
    assert await g.get_vertex(p, c, "tmp/y") is not None


async def test_a_tenant_without_a_graph_reads_an_empty_one(core: Application) -> None:
    tenant = await core.tenants.create(f"nograph_{secrets.token_hex(4)}")
    principal = Principal("g", frozenset({tenant.tenant_id}), frozenset({Scope.READ}))
    ctx = TenantContext(tenant.tenant_id)
    assert await core.graphs.get_vertex(principal, ctx, "users/a") is None
    with pytest.raises(VertexNotFound):
        await core.graphs.traverse(principal, ctx, Traverse("users/a"))
    with pytest.raises(PermissionDenied):  # read scope only
        await core.graphs.upsert_vertices(principal, ctx, [Vertex.of("users", "a")])


async def test_a_walk_past_the_visit_bound_is_refused(core: Application, graph: Graph) -> None:
    small = PostgresGraphStore(
        core.pools,
        core.logins,
        core.deadlines,
        GraphLimits(max_visits=3),
        transaction_ms=10_000,
    )
    with pytest.raises(ResultTooLarge):
        await small.traverse(graph.tenant, Traverse("users/alice", Direction.ANY, 1, 10))
    tiny = PostgresGraphStore(
        core.pools,
        core.logins,
        core.deadlines,
        GraphLimits(max_visits=1),
        transaction_ms=10_000,
    )
    with pytest.raises(ResultTooLarge):  # erin's first level is two edges, neither to carol
        await tiny.shortest_path(
            graph.tenant, ShortestPath("users/erin", "users/carol", Direction.ANY, 10)
        )


# --- weighted shortest paths --------------------------------------------------------------


def _least(
    edges: list[tuple[str, str, str, float]], start: str, end: str, direction: Direction, hops: int
) -> tuple[float, int] | None:
    """The least (weight, steps) from start to end in at most ``hops`` edges, by dynamic
    programming over the edge list (the definition, without the store's pruning)."""
    steps: list[tuple[str, str, float]] = []
    for _, a, b, w in edges:
        if direction in (Direction.OUTBOUND, Direction.ANY):
            steps.append((a, b, w))
        if direction in (Direction.INBOUND, Direction.ANY):
            steps.append((b, a, w))
    best: dict[str, tuple[float, int]] = {start: (0.0, 0)}
    for _ in range(hops):
        nxt = dict(best)
        for a, b, w in steps:
            if a in best and b != start:
                candidate = (best[a][0] + w, best[a][1] + 1)
                if b not in nxt or candidate < nxt[b]:
                    nxt[b] = candidate
        best = nxt
    return best.get(end)


@pytest.fixture(scope="module")
async def weighted(core: Application) -> tuple[Graph, list[tuple[str, str, str, float]]]:
    """A random network of 40 traders and 160 edges: most with a ``cost`` (halves and whole
    numbers, exact in binary), some without (they weigh the default)."""
    import random

    rng = random.Random(20261203)
    made = await new_graph(core, "wgraph")
    principal, ctx = made.principal, made.ctx
    await core.graphs.upsert_vertices(
        principal, ctx, [Vertex.of("users", f"u{i}") for i in range(40)]
    )
    edges: list[tuple[str, str, str, float]] = []
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < 160:
        a, b = rng.randrange(40), rng.randrange(40)
        if a != b:
            pairs.add((a, b))
    documents = []
    for a, b in sorted(pairs):
        cost = rng.randrange(0, 20) / 2 if rng.random() < 0.85 else None
        props = {} if cost is None else {"link": {"cost": cost}}
        edge = Edge.of("copies", f"users/u{a}", f"users/u{b}", properties=props)
        documents.append(edge)
        edges.append((edge.id, edge.from_id, edge.to_id, 3.0 if cost is None else cost))
    assert await core.graphs.upsert_edges(principal, ctx, documents) == 160
    return made, edges


async def test_weighted_shortest_paths_match_the_definition(
    core: Application, weighted: tuple[Graph, list[tuple[str, str, str, float]]]
) -> None:
    graph, edges = weighted
    g, p, c = core.graphs, graph.principal, graph.ctx
    by_id = {e[0]: e for e in edges}
    checked = found = 0
    for direction in Direction:
        for hops in (1, 3, 6):
            for start, end in [(0, 1), (5, 17), (12, 3), (39, 20), (7, 7), (25, 30)]:
                q = ShortestPath(
                    f"users/u{start}",
                    f"users/u{end}",
                    direction,
                    max_depth=hops,
                    weight_attribute="link.cost",
                    default_weight=3.0,
                )
                path = await g.shortest_path(p, c, q)
                expected = _least(edges, q.start, q.end, direction, hops)
                checked += 1
                assert (path.found, path.weight is not None) == (expected is not None,) * 2
                if expected is None:
                    continue
                found += 1
                assert (path.weight, path.length) == expected, (direction, hops, start, end)
                assert path.vertices[0] == q.start and path.vertices[-1] == q.end
                total = 0.0
                for i, edge_id in enumerate(path.edges):  # each step is an edge, its weight summed
                    _, a, b, w = by_id[edge_id]
                    allowed = {
                        Direction.OUTBOUND: {(a, b)},
                        Direction.INBOUND: {(b, a)},
                        Direction.ANY: {(a, b), (b, a)},
                    }[direction]
                    assert (path.vertices[i], path.vertices[i + 1]) in allowed
                    total += w
                assert total == path.weight
    assert checked == 54 and found > 20


async def test_weighted_path_prefers_light_long_paths_within_the_depth_bound(
    core: Application, graph: Graph
) -> None:
    """On the small graph, weighted by ``ratio``: carol → bob directly by ``follows`` (it has
    no ratio, so it weighs the default), or by copies through alice, erin and dave
    (1.0 + 0.25 + 1 + 2 = 4.25)."""
    g, p, c = core.graphs, graph.principal, graph.ctx

    def q(max_depth: int, default: float) -> ShortestPath:
        return ShortestPath(
            "users/carol",
            "users/bob",
            Direction.OUTBOUND,
            max_depth,
            weight_attribute="ratio",
            default_weight=default,
        )

    # copies carol→alice 1.0, alice→erin 0.25, erin→dave 1, dave→bob 2: 4.25 in four steps.
    heavy = await g.shortest_path(p, c, q(5, 10.0))
    assert heavy.weight == 4.25 and heavy.length == 4
    light = await g.shortest_path(p, c, q(5, 1.0))
    assert light.weight == 1.0 and light.vertices == ["users/carol", "users/bob"]
    # Four steps are past a depth of three: the heavy direct edge it is.
    bounded = await g.shortest_path(p, c, q(3, 10.0))
    assert bounded.weight == 10.0 and bounded.length == 1
    # A tie (4.25 both ways) goes to the fewer steps.
    tie = await g.shortest_path(p, c, q(5, 4.25))
    assert tie.weight == 4.25 and tie.length == 1
    same = await g.shortest_path(p, c, ShortestPath("users/bob", "users/bob", weight_attribute="x"))
    assert same.found and same.weight == 0.0


async def test_weighted_path_refuses_bad_weights(core: Application, graph: Graph) -> None:
    g, p, c = core.graphs, graph.principal, graph.ctx
    for default in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidParameters):
            await g.shortest_path(
                p,
                c,
                ShortestPath(
                    "users/carol", "users/bob", weight_attribute="ratio", default_weight=default
                ),
            )
    for attribute in ("", "_from", "a..b", "x;drop", "a.b.c.d.e"):
        with pytest.raises(InvalidFilter):
            await g.shortest_path(
                p, c, ShortestPath("users/carol", "users/bob", weight_attribute=attribute)
            )
    # A negative weight in the data is refused when the search meets it, as ArangoDB does.
    negative = await new_graph(core, "neg")
    principal, ctx = negative.principal, negative.ctx
    await g.upsert_vertices(principal, ctx, [Vertex.of("users", k) for k in ("a", "b")])
    await g.upsert_edges(
        principal, ctx, [Edge.of("copies", "users/a", "users/b", properties={"w": -2})]
    )
    with pytest.raises(InvalidParameters, match="weights >= 0"):
        await g.shortest_path(
            principal, ctx, ShortestPath("users/a", "users/b", weight_attribute="w")
        )
