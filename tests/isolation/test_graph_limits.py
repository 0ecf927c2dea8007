"""Tenant A's own graph, made large on purpose, against everyone else's latency: a hub vertex
with hundreds of thousands of edges, searched by shortest path (weighted and not) and
traversal through REST and gRPC, while B's SQL is timed and the event loop's lag measured.

The searches that walk in Python (shortest paths: one query per level) must read no more than
``DBSVC_GRAPH_MAX_VISITS`` edges in all — never a whole level first and the bound after — and
must not hold the event loop while they work through a level. Rows a tenant planted in its own
graph tables (it owns them) come back as answers or clear errors, never a server error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.stores.graph.model import Edge, Vertex
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd, service_token
from tests.isolation.test_graph_attacks import GraphDoor

pytestmark = pytest.mark.usefixtures("unchanged_victim")

FRONT_ENDS = ("grpc", "rest")
FAN_OUT = 300_000  # edges leaving A's hub


@pytest.fixture(scope="module")
async def a_hub(core: Application, tenants: Tenants) -> str:
    """A's graph: ``v/hub`` with FAN_OUT edges to as many vertices, ``v/lonely`` reached by none
    (a search for it reads everything), planted in bulk in A's own tables."""
    a = tenants.a.tenant_id
    principal = Principal("hub", frozenset({a}), frozenset({Scope.READ, Scope.WRITE}))
    ctx = TenantContext(a)
    await core.graphs.upsert_vertices(
        principal, ctx, [Vertex.of("v", "hub"), Vertex.of("v", "lonely"), Vertex.of("v", "x")]
    )
    await core.graphs.upsert_edges(principal, ctx, [Edge.of("e", "v/hub", "v/x", "hx")])
    schema = tenants.a.schema_name
    async with core.owner_pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {schema}._graph_vertices (id, collection, props)"
            " SELECT 'v/n' || i, 'v', jsonb_build_object('w', i % 7) FROM generate_series(1, $1) i",
            FAN_OUT,
        )
        await conn.execute(
            f"INSERT INTO {schema}._graph_edges (id, collection, _from, _to, props)"
            " SELECT 'e/h' || i, 'e', 'v/hub', 'v/n' || i, jsonb_build_object('w', i % 5)"
            " FROM generate_series(1, $1) i",
            FAN_OUT,
        )
        await conn.execute(f"ANALYZE {schema}._graph_vertices, {schema}._graph_edges")
    return "v/hub"


@pytest.fixture(params=FRONT_ENDS)
async def door(
    request: pytest.FixtureRequest,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
) -> AsyncIterator[GraphDoor]:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))
    d = GraphDoor(
        request.param, http=http, grpc_target=grpc_target, tenant_id=tenants.a.tenant_id,
        token=token,
    )  # fmt: skip
    yield d
    await d.close()


SEARCHES: dict[str, tuple[str, dict[str, Any]]] = {
    "shortest_path": ("shortest_path", {"end": "v/lonely", "max_depth": 3}),
    "shortest_path_weighted": (
        "shortest_path",
        {"end": "v/lonely", "max_depth": 3, "weight_attribute": "w"},
    ),
    "shortest_path_any": ("shortest_path", {"end": "v/lonely", "max_depth": 4, "direction": "any"}),
    "traverse_deep": ("traverse", {"max_depth": 3, "direction": "any"}),
}


@pytest.mark.parametrize("search", sorted(SEARCHES))
async def test_a_search_of_a_huge_graph_does_not_stall_other_tenants(
    door: GraphDoor,
    search: str,
    core: Application,
    tenants: Tenants,
    a_hub: str,
    front_end_b: FrontEnd,
) -> None:
    op, body = SEARCHES[search]
    stop = asyncio.Event()
    gaps: list[float] = []
    latencies: list[float] = []

    async def ticker() -> None:  # how late the event loop wakes a 10 ms sleeper
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            gaps.append(time.perf_counter() - before - 0.01)

    async def victim() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            outcome = await front_end_b.run("SELECT count(*) FROM users")
            assert outcome.ok, outcome
            latencies.append(time.perf_counter() - before)
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(victim())]
    started = time.perf_counter()
    try:
        await asyncio.sleep(0.1)
        outcome = await door.call(op, {"start": a_hub, **body})
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    took = time.perf_counter() - started
    print(
        f"\n{door.name} {search}: {outcome.status} {outcome.code} in {took:.2f} s; B's reads:"
        f" {len(latencies)}, median {statistics.median(latencies) * 1000:.1f} ms,"
        f" max {max(latencies) * 1000:.1f} ms; event-loop lag max {max(gaps) * 1000:.1f} ms"
    )
    assert outcome.ok or outcome.code in {"result_too_large", "query_timeout", "query_canceled"}
    assert max(gaps) < 1.0, "a graph search held the event loop"
    assert max(latencies) < 3, "B's reads stalled behind A's graph search"


@pytest.fixture
async def front_end_b(
    core: Application, http: httpx.AsyncClient, grpc_target: str, tenants: Tenants
) -> AsyncIterator[FrontEnd]:
    """B reading its own table over REST (the victim's door, for timing only)."""
    token = await service_token(core, [tenants.b.tenant_id], (Scope.READ,))
    door = FrontEnd(
        "rest", http=http, grpc_target=grpc_target, tenant_id=tenants.b.tenant_id, token=token
    )
    yield door
    await door.close()


@pytest.mark.parametrize("weighted", [False, True], ids=["fewest_steps", "weighted"])
async def test_a_shortest_path_reads_no_more_than_its_bound_of_edges(
    door: GraphDoor, core: Application, a_hub: str, weighted: bool
) -> None:
    """Past DBSVC_GRAPH_MAX_VISITS the search answers result_too_large having read one edge
    more, not the hub's whole level first (a level is read through a cursor, with a LIMIT)."""
    store: Any = core.graphs.store
    kept = store.limits
    store.limits = dataclasses.replace(kept, max_visits=1_000)
    try:
        body: dict[str, Any] = {"start": a_hub, "end": "v/lonely", "max_depth": 3}
        if weighted:
            body["weight_attribute"] = "w"
        started = time.perf_counter()
        outcome = await door.call("shortest_path", body)
        took = time.perf_counter() - started
    finally:
        store.limits = kept
    assert (outcome.ok, outcome.code) == (False, "result_too_large"), outcome
    print(f"\n{door.name}: refused in {took * 1000:.0f} ms")  # ~10 ms; the whole level: ~1 s


# Rows A writes into its own graph tables with its own SQL (it owns them), as no graph write
# would: the reads answer them or refuse them clearly.
PLANTED = {
    "props_not_an_object": "INSERT INTO _graph_vertices VALUES ('p/array', 'p', '[1, 2]'),"
    " ('p/number', 'p', '7'), ('p/text', 'p', '\"x\"'), ('p/null', 'p', 'null')",
    "props_deep": "INSERT INTO _graph_vertices VALUES ('p/deep', 'p', ('{\"a\":' ||"
    " repeat('[', 600) || '1' || repeat(']', 600) || '}')::jsonb)",
    "props_too_deep": "INSERT INTO _graph_vertices VALUES ('p/deeper', 'p', ('{\"a\":' ||"
    " repeat('[', 3000) || '1' || repeat(']', 3000) || '}')::jsonb)",
    "props_big_number": "INSERT INTO _graph_vertices VALUES ('p/big', 'p',"
    ' \'{"n": 100000000000000000000000000000, "w": 1e300}\')',
    "id_without_collection": "INSERT INTO _graph_vertices VALUES ('nocollection', 'p', '{}')",
    "id_of_another_collection": "INSERT INTO _graph_vertices VALUES ('q/k', 'p', '{}')",
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
async def test_rows_a_tenant_planted_in_its_graph_tables_read_back_or_are_refused(
    door: GraphDoor, core: Application, tenants: Tenants, a_hub: str, planted: str
) -> None:
    sql = PLANTED[planted]
    schema = tenants.a.schema_name
    async with core.owner_pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL search_path = {schema}")
        await conn.execute(
            "INSERT INTO _graph_collections VALUES ('p', 'vertex'), ('pe', 'edge')"
            " ON CONFLICT DO NOTHING"
        )
        await conn.execute(sql)
        ids = [
            r["id"]
            for r in await conn.fetch("SELECT id FROM _graph_vertices WHERE collection = 'p'")
        ]
        for i in ids:
            await conn.execute(
                "INSERT INTO _graph_edges VALUES ($1, 'pe', 'v/x', $2, '{\"w\": 2}')",
                f"pe/{i.replace('/', '_')}",
                i,
            )
    try:
        for vertex in ids:
            if "/" in vertex:
                await door.call("get_vertex", {"id": vertex})
        for op, body in (
            ("traverse", {"start": "v/x", "max_depth": 1}),
            ("traverse", {"start": "v/x", "max_depth": 1, "vertex_filters": [
                {"field": "a", "op": "eq", "value": 1}]}),
            ("neighborhood", {"start": "v/x", "depth": 1, "aggregate": "sum", "field": "n"}),
            ("shortest_path", {"start": "v/x", "end": ids[0], "weight_attribute": "w"}),
        ):  # fmt: skip
            await door.call(op, body)  # never a server error (GraphDoor asserts it)
    finally:
        async with core.owner_pool.acquire() as conn:
            await conn.execute(f"DELETE FROM {schema}._graph_vertices WHERE collection = 'p'")
