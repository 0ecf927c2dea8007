"""The relationship graph through every front end: gRPC ``GraphService`` (the client's
``graph_*``) and REST ``/api/v1/graph/...`` run every operation with the same answers; errors
carry stable codes; health reports the graph under ``dependencies.arangodb`` and metrics count
its operations."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from database_service_client import InvalidArgument, MultiDatabaseClient, NotFound
from database_service_client import PermissionDenied as ClientPermissionDenied
from tests.fix_service import ClientFactory, TenantFactory, TokenFactory

pytestmark = pytest.mark.integration


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("graphfe")


@pytest.fixture
async def client(client_for: ClientFactory, tenant: TenantRecord) -> MultiDatabaseClient:
    return await client_for(tenant, (Scope.READ, Scope.WRITE))


async def test_the_client_runs_every_operation(client: MultiDatabaseClient) -> None:
    traders = [{"_key": "t1", "tier": "pro"}, {"_key": "c1", "exposure": {"EURUSD": 2.5}}]
    assert await client.graph_upsert_vertices("users", traders) == 2
    await client.graph_upsert_vertices("users", [{"_key": "c2", "exposure": {"EURUSD": 4}}])
    copies = [
        {"_from": "users/c1", "_to": "users/t1", "ratio": 1},
        {"_from": "users/c2", "_to": "users/c1", "_key": "c2-c1"},
    ]
    assert await client.graph_upsert_edges("copies", copies) == 2
    assert await client.graph_get_vertex("users/t1") == {
        "_id": "users/t1",
        "_key": "t1",
        "_collection": "users",
        "properties": {"tier": "pro"},
    }
    assert await client.graph_get_vertex("users/none") is None
    edge = await client.graph_get_edge("copies/c2-c1")
    assert edge is not None and (edge["_from"], edge["_to"]) == ("users/c2", "users/c1")
    walk = await client.graph_traverse(
        "users/t1", direction="inbound", max_depth=2, edge_collections=["copies"]
    )
    assert [(h["vertex"]["_id"], h["depth"]) for h in walk["hits"]] == [
        ("users/c1", 1),
        ("users/c2", 2),
    ]
    assert walk["hits"][1]["path"] == ["users/t1", "users/c1", "users/c2"]
    filtered = await client.graph_traverse(
        "users/t1",
        direction="inbound",
        max_depth=2,
        vertex_filters=[{"field": "exposure.EURUSD", "op": "gt", "value": 3}],
    )
    assert [h["vertex"]["_id"] for h in filtered["hits"]] == ["users/c2"]
    path = await client.graph_shortest_path("users/c2", "users/t1")
    assert path == {
        "found": True,
        "vertices": ["users/c2", "users/c1", "users/t1"],
        "edges": [edge["_id"], walk["hits"][0]["edges"][0]],
    }
    weighted = await client.graph_shortest_path(
        "users/c2", "users/t1", weight_attribute="cost", default_weight=2.5
    )
    assert weighted == {**path, "weight": 5.0}  # two edges without a cost: 2.5 each
    with pytest.raises(InvalidArgument):
        await client.graph_shortest_path(
            "users/c2", "users/t1", weight_attribute="cost", default_weight=-1
        )
    exposure = await client.graph_neighborhood(
        "users/t1",
        depth=2,
        direction="inbound",
        edge_collections=["copies"],
        aggregate="sum",
        field="exposure.EURUSD",
    )
    assert exposure == [{"group": None, "count": 2, "value": 6.5}]
    assert await client.graph_delete_edge("copies/c2-c1")
    assert await client.graph_delete_vertex("users/c1") == {"deleted": True, "edges_deleted": 1}


async def test_rest_runs_every_operation(
    http: httpx.AsyncClient, tenant: TenantRecord, service_headers: TokenFactory
) -> None:
    headers = await service_headers([tenant.tenant_id], **{"X-Tenant-Id": tenant.tenant_id})

    async def post(path: str, body: dict[str, Any]) -> Any:
        response = await http.post(f"/api/v1/graph/{path}", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    vertices = [{"collection": "users", "key": k} for k in ("a", "b", "c")]
    vertices[0]["properties"] = {"tier": "pro", "exposure": {"EURUSD": 7}}  # type: ignore[assignment]
    assert await post("vertices", {"vertices": vertices}) == {"written": 3}
    edges = [
        {"collection": "follows", "_from": "users/b", "_to": "users/a"},
        {"collection": "follows", "_from": "users/c", "_to": "users/b", "key": "cb"},
    ]
    assert await post("edges", {"edges": edges}) == {"written": 2}
    got = await http.get("/api/v1/graph/vertices/users/a", headers=headers)
    assert got.json()["properties"] == {"tier": "pro", "exposure": {"EURUSD": 7}}
    missing = await http.get("/api/v1/graph/vertices/users/zz", headers=headers)
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "vertex_not_found")
    edge = await http.get("/api/v1/graph/edges/follows/cb", headers=headers)
    assert edge.json()["_from"] == "users/c"
    walk = await post("traverse", {"start": "users/c", "max_depth": 3})
    assert [h["vertex"]["_id"] for h in walk["hits"]] == ["users/b", "users/a"]
    path = await post("shortest-path", {"start": "users/a", "end": "users/c", "direction": "any"})
    assert path["vertices"] == ["users/a", "users/b", "users/c"]
    assert "weight" not in path
    weighted = await post(
        "shortest-path",
        {"start": "users/a", "end": "users/c", "direction": "any", "weight_attribute": "w"},
    )
    assert (weighted["vertices"], weighted["weight"]) == (["users/a", "users/b", "users/c"], 2.0)
    bad = await http.post(
        "/api/v1/graph/shortest-path",
        json={"start": "users/a", "end": "users/c", "weight_attribute": "w", "default_weight": "x"},
        headers=headers,
    )
    assert bad.status_code == 400, bad.text
    groups = await post(
        "neighborhood",
        {"start": "users/c", "depth": 2, "group_by": "tier", "aggregate": "count"},
    )
    assert groups == {
        "groups": [
            {"group": None, "count": 1, "value": 1},
            {"group": "pro", "count": 1, "value": 1},
        ]
    }
    deleted = await http.delete("/api/v1/graph/vertices/users/b", headers=headers)
    assert deleted.json() == {"deleted": True, "edges_deleted": 2}
    gone = await http.delete("/api/v1/graph/edges/follows/cb", headers=headers)
    assert gone.json()["deleted"] is False


async def test_errors_have_stable_codes_through_both_front_ends(
    core: Application,
    http: httpx.AsyncClient,
    client: MultiDatabaseClient,
    tenant: TenantRecord,
    service_headers: TokenFactory,
) -> None:
    await client.graph_upsert_vertices("users", [{"_key": "x"}])
    headers = await service_headers([tenant.tenant_id], **{"X-Tenant-Id": tenant.tenant_id})
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("traverse", {"start": "users/x", "max_depth": 99}, 400, "depth_out_of_range"),
        ("traverse", {"start": "users/nobody"}, 404, "vertex_not_found"),
        ("traverse", {"start": "users/x", "edge_collections": ["nope"]}, 404,
         "graph_collection_not_found"),
        ("traverse", {"start": "users/x", "vertex_filters": [{"field": "a;b", "value": 1}]}, 400,
         "invalid_filter"),
        ("traverse", {"start": "../x"}, 400, "invalid_parameters"),
        ("edges", {"edges": [{"collection": "e", "_from": "users/x", "_to": "users/ghost"}]}, 404,
         "vertex_not_found"),
        ("edges", {"edges": [{"collection": "users", "_from": "users/x", "_to": "users/x"}]}, 409,
         "graph_collection_kind"),
        ("neighborhood", {"start": "users/x", "aggregate": "median", "field": "a"}, 400,
         "invalid_filter"),
    ]  # fmt: skip
    for path, body, status, code in cases:
        response = await http.post(f"/api/v1/graph/{path}", json=body, headers=headers)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), body
    with pytest.raises(InvalidArgument) as info:
        await client.graph_traverse("users/x", max_depth=99)
    assert info.value.code == "depth_out_of_range"
    with pytest.raises(NotFound) as missing:
        await client.graph_traverse("users/nobody")
    assert missing.value.code == "vertex_not_found"
    labels = {"store": "postgresql", "operation": "traverse", "outcome": "denied"}
    denied = core.metrics.registry.get_sample_value("dbsvc_graph_operations_total", labels)
    with pytest.raises(InvalidArgument) as bad:
        await client.graph_traverse("users/x", vertex_filters=[{"field": "_id", "value": "x"}])
    assert bad.value.code == "invalid_filter"
    # A refusal while the request is read is a denial of the operation, like any other.
    after = core.metrics.registry.get_sample_value("dbsvc_graph_operations_total", labels)
    assert after == (denied or 0) + 1


async def test_a_read_only_service_cannot_write(
    client_for: ClientFactory, tenant: TenantRecord
) -> None:
    reader = await client_for(tenant, (Scope.READ,))
    with pytest.raises(ClientPermissionDenied):
        await reader.graph_upsert_vertices("users", [{"_key": "r"}])
    assert await reader.graph_get_vertex("users/r") is None


async def test_health_and_metrics_report_the_graph(
    core: Application, client: MultiDatabaseClient
) -> None:
    await client.graph_upsert_vertices("users", [{"_key": "m"}])
    document = await client.health()
    graph = document["dependencies"]["arangodb"]
    assert graph["status"] == "healthy" and graph["embedded"] is True
    labels = {"store": "postgresql", "operation": "upsert_vertices", "outcome": "ok"}
    counted = core.metrics.registry.get_sample_value("dbsvc_graph_operations_total", labels)
    assert counted is not None and counted >= 1
