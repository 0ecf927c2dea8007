"""Tenant A against tenant B's relationship graph, through every front end that reaches it
(gRPC ``GraphService`` and REST ``/api/v1/graph``).

B has a graph whose properties hold the secret, under ids A also uses and under ids only B
has. A starts traversals, shortest paths and neighbourhoods at B's vertex ids, points edges at
them, names collections after B's schema and tables, writes SQL into filter fields and values,
names B as its tenant with its own token, and writes with a read-only token. A never sees B's
data, never changes it (B's graph tables are compared before and after every test), and is
refused with a stable code, never a server error. The boundary is PostgreSQL: A's statements
run on A's login, which cannot reach B's schema (the last test tries it directly).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf.json_format import MessageToDict

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.stores.graph.model import Edge, Vertex
from database_service_client._proto import graph_pb2 as gpb
from database_service_client._proto.graph_pb2_grpc import GraphServiceStub
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim", "unchanged_victim_graph")

FRONT_ENDS = ("grpc", "rest")
_SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "500"}
_DIRECTIONS = {"outbound": 1, "inbound": 2, "any": 3}


@dataclass
class Outcome:
    ok: bool
    status: str = "OK"
    code: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def server_error(self) -> bool:
        return self.status in _SERVER_ERRORS or (
            self.status.startswith("5") and self.status != "503"
        )


def _filters(raw: list[dict[str, Any]] | None) -> list[gpb.GraphFilter]:
    return [
        gpb.GraphFilter(field=f["field"], op=f.get("op", "eq"), value_json=json.dumps(f["value"]))
        for f in raw or ()
    ]


class GraphDoor:
    """Tenant A's door to the graph through one front end: raw requests, any ids, any tenant,
    any token. Bodies are in the REST API's shape; gRPC gets the same fields."""

    def __init__(
        self, name: str, *, http: httpx.AsyncClient, grpc_target: str, tenant_id: str, token: str
    ) -> None:
        self.name = name
        self.tenant_id = tenant_id
        self.token = token
        self._http = http
        self._target = grpc_target
        self._channel: grpc.aio.Channel | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def call(
        self,
        op: str,
        body: dict[str, Any],
        *,
        tenant_id: str | None = None,
        token: str | None = None,
    ) -> Outcome:
        tenant_id = tenant_id or self.tenant_id
        token = token or self.token
        if self.name == "rest":
            outcome = await self._rest(op, body, tenant_id, token)
        else:
            outcome = await self._grpc(op, body, tenant_id, token)
        assert SECRET not in repr(outcome), f"victim data leaked through {self.name}: {outcome}"
        assert not outcome.server_error, f"{self.name}: a server error: {outcome}"
        return outcome

    async def _rest(self, op: str, body: dict[str, Any], tenant_id: str, token: str) -> Outcome:
        headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id}
        if op in ("get_vertex", "delete_vertex", "delete_edge"):
            kind = "edges" if op == "delete_edge" else "vertices"
            method = "GET" if op == "get_vertex" else "DELETE"
            response = await self._http.request(
                method, f"/api/v1/graph/{kind}/{body['id']}", headers=headers
            )
        else:
            path = {
                "upsert_vertices": "vertices",
                "upsert_edges": "edges",
                "traverse": "traverse",
                "shortest_path": "shortest-path",
                "neighborhood": "neighborhood",
            }[op]
            response = await self._http.post(f"/api/v1/graph/{path}", json=body, headers=headers)
        status = str(response.status_code)
        document = response.json()
        if response.status_code != 200:
            return Outcome(False, status, document.get("error", {}).get("code"), document)
        return Outcome(True, status, data=document)

    async def _grpc(self, op: str, body: dict[str, Any], tenant_id: str, token: str) -> Outcome:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._target)
        stub = GraphServiceStub(self._channel)
        metadata = (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id))
        direction = _DIRECTIONS[body.get("direction", "outbound")]
        try:
            if op == "upsert_vertices":
                request: Any = gpb.UpsertVerticesRequest(
                    vertices=[
                        gpb.GraphVertex(
                            collection=v["collection"],
                            key=v["key"],
                            properties_json=json.dumps(v.get("properties") or {}),
                        )
                        for v in body["vertices"]
                    ]
                )
                response: Any = await stub.UpsertVertices(request, metadata=metadata)
            elif op == "upsert_edges":
                messages = []
                for e in body["edges"]:
                    message = gpb.GraphEdge(collection=e["collection"], to=e["_to"])
                    setattr(message, "from", e["_from"])
                    messages.append(message)
                response = await stub.UpsertEdges(
                    gpb.UpsertEdgesRequest(edges=messages), metadata=metadata
                )
            elif op in ("get_vertex", "delete_vertex", "delete_edge"):
                method = {
                    "get_vertex": stub.GetVertex,
                    "delete_vertex": stub.DeleteVertex,
                    "delete_edge": stub.DeleteEdge,
                }[op]
                response = await method(gpb.GraphDocumentRequest(id=body["id"]), metadata=metadata)
                if op == "get_vertex" and not response.found:
                    return Outcome(False, "NOT_FOUND", "vertex_not_found")
            elif op == "traverse":
                response = await stub.Traverse(
                    gpb.TraverseRequest(
                        start=body["start"],
                        direction=direction,  # type: ignore[arg-type]
                        min_depth=body.get("min_depth", 1),
                        max_depth=body.get("max_depth", 1),
                        edge_collections=body.get("edge_collections", []),
                        vertex_collections=body.get("vertex_collections", []),
                        edge_filters=_filters(body.get("edge_filters")),
                        vertex_filters=_filters(body.get("vertex_filters")),
                    ),
                    metadata=metadata,
                )
            elif op == "shortest_path":
                response = await stub.ShortestPath(
                    gpb.ShortestPathRequest(
                        start=body["start"],
                        end=body["end"],
                        direction=direction,  # type: ignore[arg-type]
                        max_depth=body.get("max_depth", 6),
                        edge_collections=body.get("edge_collections", []),
                        weight_attribute=body.get("weight_attribute", ""),
                    ),
                    metadata=metadata,
                )
            else:
                response = await stub.Neighborhood(
                    gpb.NeighborhoodRequest(
                        start=body["start"],
                        depth=body.get("depth", 1),
                        direction=direction,  # type: ignore[arg-type]
                        aggregate=body.get("aggregate", "count"),
                        field=body.get("field", ""),
                        group_by=body.get("group_by", ""),
                    ),
                    metadata=metadata,
                )
        except grpc.aio.AioRpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())
            code = trailing.get("dbsvc-error-code")
            return Outcome(False, exc.code().name, code if isinstance(code, str) else None)
        data = MessageToDict(
            response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return Outcome(True, data=data)


@pytest.fixture(scope="module")
async def victim_graph(core: Application, tenants: Tenants) -> None:
    """B's graph: the secret in every vertex and edge, under ids A uses too (``users/shared``)
    and ids only B has."""
    b = tenants.b.tenant_id
    principal = Principal("victim-graph", frozenset({b}), frozenset({Scope.READ, Scope.WRITE}))
    ctx = TenantContext(b)
    secret = {"note": SECRET, "exposure": {"EURUSD": 1_000_000}, "tier": "pro"}
    keys = ["shared", "b-only", "b-trader"]
    await core.graphs.upsert_vertices(principal, ctx, [Vertex.of("users", k, secret) for k in keys])
    await core.graphs.upsert_edges(
        principal,
        ctx,
        [
            Edge.of("copies", "users/b-only", "users/b-trader", properties={"note": SECRET}),
            Edge.of("copies", "users/shared", "users/b-trader", key="k1", properties=secret),
        ],
    )


@pytest.fixture
async def unchanged_victim_graph(
    core: Application, tenants: Tenants, victim_graph: None
) -> AsyncIterator[None]:
    schema = tenants.b.schema_name

    async def graph() -> list[Any]:
        return [
            [
                tuple(r)
                for r in await core.owner_pool.fetch(f"SELECT * FROM {schema}.{t} ORDER BY 1")
            ]
            for t in ("_graph_vertices", "_graph_edges", "_graph_collections")
        ]

    before = await graph()
    assert before[0] and before[1]
    yield
    assert await graph() == before, "the victim's graph changed"


@pytest.fixture(scope="module")
async def attacker_graph(core: Application, tenants: Tenants) -> None:
    """A's own graph, with an id B uses too."""
    a = tenants.a.tenant_id
    principal = Principal("attacker-graph", frozenset({a}), frozenset({Scope.READ, Scope.WRITE}))
    ctx = TenantContext(a)
    await core.graphs.upsert_vertices(
        principal, ctx, [Vertex.of("users", "shared", {"tier": "free"}), Vertex.of("users", "a1")]
    )
    await core.graphs.upsert_edges(principal, ctx, [Edge.of("copies", "users/a1", "users/shared")])


@pytest.fixture(params=FRONT_ENDS)
async def door(
    request: pytest.FixtureRequest,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    attacker_graph: None,
) -> AsyncIterator[GraphDoor]:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))
    d = GraphDoor(
        request.param,
        http=http,
        grpc_target=grpc_target,
        tenant_id=tenants.a.tenant_id,
        token=token,
    )
    yield d
    await d.close()


async def test_traversal_never_reaches_another_tenants_vertices(door: GraphDoor) -> None:
    for start in ("users/b-only", "users/b-trader"):
        for op, body in [
            ("traverse", {"start": start, "direction": "any", "max_depth": 5}),
            ("neighborhood", {"start": start, "direction": "any", "depth": 3}),
            ("shortest_path", {"start": "users/a1", "end": start, "direction": "any"}),
            ("shortest_path", {"start": start, "end": "users/a1"}),
            ("shortest_path", {"start": start, "end": "users/a1", "weight_attribute": "ratio"}),
            (
                "shortest_path",
                {"start": "users/a1", "end": start, "direction": "any", "weight_attribute": "w"},
            ),
        ]:
            outcome = await door.call(op, body)
            assert (outcome.ok, outcome.code) == (False, "vertex_not_found"), (op, body)
    # From A's own "users/shared" (B has one too): A's graph only.
    walk = await door.call(
        "traverse", {"start": "users/shared", "direction": "any", "max_depth": 5}
    )
    assert walk.ok and "b-trader" not in repr(walk) and "a1" in repr(walk)
    exposure = await door.call(
        "neighborhood",
        {"start": "users/a1", "depth": 3, "direction": "any", "aggregate": "sum",
         "field": "exposure.EURUSD"},
    )  # fmt: skip
    assert exposure.ok and "1000000" not in repr(exposure)


async def test_reads_by_another_tenants_ids_find_nothing(door: GraphDoor) -> None:
    assert (await door.call("get_vertex", {"id": "users/b-only"})).code == "vertex_not_found"
    shared = await door.call("get_vertex", {"id": "users/shared"})
    assert shared.ok and "free" in repr(shared)  # A's own vertex of that id


async def test_edges_cannot_point_at_another_tenants_vertices(door: GraphDoor) -> None:
    for target in ("users/b-only", "users/b-trader"):
        body = {"edges": [{"collection": "copies", "_from": "users/a1", "_to": target}]}
        outcome = await door.call("upsert_edges", body)
        assert (outcome.ok, outcome.code) == (False, "vertex_not_found")


async def test_deleting_another_tenants_ids_deletes_nothing_of_theirs(door: GraphDoor) -> None:
    gone = await door.call("delete_vertex", {"id": "users/b-only"})
    assert gone.ok and gone.data["deleted"] is False
    edge = await door.call("delete_edge", {"id": "copies/k1"})
    assert edge.ok and edge.data["deleted"] is False


@pytest.mark.parametrize(
    "collection",
    [
        "../users",
        "users/../../x",
        "_graph_vertices",
        "x.y",
        'users"; DROP TABLE users; --',
        "pg_catalog.pg_class",
        "",
        "a" * 65,
    ],
)
async def test_crafted_collection_names_are_refused(
    door: GraphDoor, tenants: Tenants, collection: str
) -> None:
    for op, body in [
        ("traverse", {"start": "users/a1", "edge_collections": [collection]}),
        ("traverse", {"start": f"{collection}/k"}),
        ("upsert_vertices", {"vertices": [{"collection": collection, "key": "k"}]}),
    ]:
        outcome = await door.call(op, body)
        assert not outcome.ok and outcome.code in {"invalid_parameters", "vertex_not_found",
                                                   "graph_collection_not_found"}, (op, outcome)  # fmt: skip
    # B's opaque schema name is a valid collection name for A: A's own (empty) collection.
    outcome = await door.call(
        "traverse", {"start": "users/a1", "edge_collections": [tenants.b.schema_name]}
    )
    assert outcome.code == "graph_collection_not_found"


@pytest.mark.parametrize(
    "flt",
    [
        {"field": "note') OR true --", "op": "eq", "value": 1},
        {"field": "note", "op": "eq'; SELECT 1; --", "value": 1},
        {"field": "note", "op": "in", "value": "x') OR ('1'='1"},
        {"field": "a.b.c.d.e.f", "op": "eq", "value": 1},
    ],
)
async def test_filter_injection_is_refused(door: GraphDoor, flt: dict[str, Any]) -> None:
    for key in ("vertex_filters", "edge_filters"):
        outcome = await door.call("traverse", {"start": "users/a1", key: [flt]})
        assert (outcome.ok, outcome.code) == (False, "invalid_filter"), (key, outcome)


async def test_sql_in_filter_values_is_only_a_value(door: GraphDoor) -> None:
    evil = {"field": "note", "op": "ne", "value": "x' OR 1=1; DROP TABLE users; --"}
    outcome = await door.call(
        "traverse", {"start": "users/a1", "direction": "any", "max_depth": 3,
                     "vertex_filters": [evil]},
    )  # fmt: skip
    assert outcome.ok and "b-trader" not in repr(outcome)


async def test_naming_another_tenant_with_ones_own_token_is_refused(
    door: GraphDoor, tenants: Tenants
) -> None:
    for op, body in [
        ("traverse", {"start": "users/b-only"}),
        ("get_vertex", {"id": "users/b-only"}),
        ("delete_vertex", {"id": "users/b-only"}),
        ("upsert_vertices", {"vertices": [{"collection": "users", "key": "b-only"}]}),
    ]:
        outcome = await door.call(op, body, tenant_id=tenants.b.tenant_id)
        assert not outcome.ok and outcome.status in {"PERMISSION_DENIED", "403"}, (op, outcome)


async def test_a_read_only_service_cannot_write_the_graph(
    door: GraphDoor, core: Application, tenants: Tenants
) -> None:
    reader = await service_token(core, [tenants.a.tenant_id], (Scope.READ,))
    for op, body in [
        ("upsert_vertices", {"vertices": [{"collection": "users", "key": "ro"}]}),
        ("upsert_edges", {"edges": [{"collection": "copies", "_from": "users/a1",
                                     "_to": "users/shared"}]}),
        ("delete_vertex", {"id": "users/a1"}),
        ("delete_edge", {"id": "copies/x"}),
    ]:  # fmt: skip
        outcome = await door.call(op, body, token=reader)
        assert not outcome.ok and outcome.status in {"PERMISSION_DENIED", "403"}, (op, outcome)
    assert (await door.call("get_vertex", {"id": "users/a1"}, token=reader)).ok


async def test_the_attackers_own_login_cannot_reach_the_victims_graph_tables(
    attacker_conn: asyncpg.Connection, tenants: Tenants, attacker_graph: None
) -> None:
    for table in ("_graph_vertices", "_graph_edges", "_graph_collections"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.fetch(f"SELECT * FROM {tenants.b.schema_name}.{table}")
