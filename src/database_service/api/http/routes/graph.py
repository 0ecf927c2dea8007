"""``/api/v1/graph/...``: the relationship graph for the caller's tenant (``application.graphs``).

- ``POST /api/v1/graph/vertices``, ``POST /api/v1/graph/edges``: create or replace (upsert);
- ``GET`` / ``DELETE /api/v1/graph/vertices/{collection}/{key}`` (a vertex's delete takes its
  edges), ``GET`` / ``DELETE /api/v1/graph/edges/{collection}/{key}``;
- ``POST /api/v1/graph/traverse``, ``POST /api/v1/graph/shortest-path``,
  ``POST /api/v1/graph/neighborhood``.

The tenant is the body's ``tenant_id`` or the ``X-Tenant-Id`` header (GET and DELETE: the
header). Reads need ``read``, writes ``write``. Properties are JSON objects; filters are
``{"field": "exposure.EURUSD", "op": "gte", "value": 10}`` (op: eq, ne, lt, lte, gt, gte, in).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from database_service.api.http.answers import json_answer
from database_service.api.http.deps import Authenticated, Core, TenantHeader, tenant_context
from database_service.application.graphs import GraphOperation as Op
from database_service.errors import EdgeNotFound, VertexNotFound
from database_service.stores.graph.model import (
    Edge,
    Neighborhood,
    ShortestPath,
    Traverse,
    Vertex,
    aggregate_of,
    direction_of,
    parse_filters,
    property_path,
)

router = APIRouter(tags=["graph"])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")


class VertexIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    collection: StrictStr
    key: StrictStr
    properties: dict[str, Any] | None = None


class EdgeIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    collection: StrictStr
    key: StrictStr | None = Field(default=None, description="Absent: derived from the ends")
    from_: StrictStr = Field(alias="_from", description="A vertex id, collection/key")
    to: StrictStr = Field(alias="_to")
    properties: dict[str, Any] | None = None


class VerticesRequest(_Body):
    vertices: list[VertexIn] = Field(description="At most 10,000")


class EdgesRequest(_Body):
    edges: list[EdgeIn] = Field(description="At most 10,000")


class _Walk(_Body):
    start: StrictStr = Field(description="A vertex id, collection/key")
    direction: StrictStr = Field(default="outbound", description="outbound, inbound or any")
    edge_collections: list[StrictStr] = Field(default_factory=list, description="[]: all")
    edge_filters: list[dict[str, Any]] = Field(
        default_factory=list, description="Every edge walked satisfies them"
    )


class TraverseRequest(_Walk):
    min_depth: StrictInt = 1
    max_depth: StrictInt = 1
    vertex_collections: list[StrictStr] = Field(default_factory=list)
    vertex_filters: list[dict[str, Any]] = Field(
        default_factory=list, description="The vertices returned satisfy them"
    )
    limit: StrictInt = 1000


class ShortestPathRequest(_Walk):
    end: StrictStr
    max_depth: StrictInt = 6
    weight_attribute: StrictStr | None = Field(
        None,
        description="Weighted: the least sum of this edge property (a dotted path), as"
        " ArangoDB's weightAttribute; absent: the fewest steps",
    )
    default_weight: StrictFloat | StrictInt = Field(
        1.0, description="The weight of an edge without a number at weight_attribute"
    )


class NeighborhoodRequest(_Walk):
    depth: StrictInt = 1
    vertex_collections: list[StrictStr] = Field(default_factory=list)
    vertex_filters: list[dict[str, Any]] = Field(default_factory=list)
    aggregate: StrictStr = Field(default="count", description="count, sum, avg, min, max")
    field: StrictStr | None = Field(default=None, description="The property aggregated")
    of_edges: StrictBool = Field(
        default=False, description="field is a property of the edge each vertex was reached by"
    )
    group_by: StrictStr | None = Field(default=None, description="A vertex property")


@router.post("/api/v1/graph/vertices")
async def upsert_vertices(
    body: VerticesRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """Create or replace vertices (properties replaced whole)."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    async with core.graphs.reading_request(principal, ctx, Op.UPSERT_VERTICES):
        vertices = [Vertex.of(v.collection, v.key, v.properties) for v in body.vertices]
    return {"written": await core.graphs.upsert_vertices(principal, ctx, vertices)}


@router.post("/api/v1/graph/edges")
async def upsert_edges(
    body: EdgesRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """Create or replace edges between vertices the tenant has."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    async with core.graphs.reading_request(principal, ctx, Op.UPSERT_EDGES):
        edges = [Edge.of(e.collection, e.from_, e.to, e.key, e.properties) for e in body.edges]
    return {"written": await core.graphs.upsert_edges(principal, ctx, edges)}


@router.get("/api/v1/graph/vertices/{collection}/{key}")
async def get_vertex(
    collection: str,
    key: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> Response:
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    vertex = await core.graphs.get_vertex(principal, ctx, f"{collection}/{key}")
    if vertex is None:
        raise VertexNotFound(f"no vertex {collection}/{key}")
    return json_answer(vertex.to_dict())


@router.get("/api/v1/graph/edges/{collection}/{key}")
async def get_edge(
    collection: str,
    key: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> Response:
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    edge = await core.graphs.get_edge(principal, ctx, f"{collection}/{key}")
    if edge is None:
        raise EdgeNotFound(f"no edge {collection}/{key}")
    return json_answer(edge.to_dict())


@router.delete("/api/v1/graph/vertices/{collection}/{key}")
async def delete_vertex(
    collection: str,
    key: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """Delete a vertex and every edge to or from it."""
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    deleted, edges = await core.graphs.delete_vertex(principal, ctx, f"{collection}/{key}")
    return {"deleted": deleted, "edges_deleted": edges}


@router.delete("/api/v1/graph/edges/{collection}/{key}")
async def delete_edge(
    collection: str,
    key: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    deleted = await core.graphs.delete_edge(principal, ctx, f"{collection}/{key}")
    return {"deleted": deleted, "edges_deleted": 0}


@router.post("/api/v1/graph/traverse")
async def traverse(
    body: TraverseRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> Response:
    """Vertices reached from ``start`` at min..max steps, each once at its fewest steps."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    async with core.graphs.reading_request(principal, ctx, Op.TRAVERSE):
        query = Traverse(
            body.start,
            direction_of(body.direction),
            body.min_depth,
            body.max_depth,
            tuple(body.edge_collections),
            tuple(body.vertex_collections),
            parse_filters(body.edge_filters),
            parse_filters(body.vertex_filters),
            body.limit,
        )
    result = await core.graphs.traverse(principal, ctx, query)
    return json_answer({"hits": [h.to_dict() for h in result.hits], "truncated": result.truncated})


@router.post("/api/v1/graph/shortest-path")
async def shortest_path(
    body: ShortestPathRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """The fewest steps from ``start`` to ``end``, or with ``weight_attribute`` the least total
    weight (``weight`` in the answer); ``found`` false when none within ``max_depth`` edges."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    async with core.graphs.reading_request(principal, ctx, Op.SHORTEST_PATH):
        query = ShortestPath(
            body.start,
            body.end,
            direction_of(body.direction),
            body.max_depth,
            tuple(body.edge_collections),
            parse_filters(body.edge_filters),
            body.weight_attribute,
            body.default_weight,
        )
    path = await core.graphs.shortest_path(principal, ctx, query)
    answer: dict[str, Any] = {"found": path.found, "vertices": path.vertices, "edges": path.edges}
    if query.weight_attribute is not None:
        answer["weight"] = path.weight
    return answer


@router.post("/api/v1/graph/neighborhood")
async def neighborhood(
    body: NeighborhoodRequest,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> Response:
    """An aggregate over the vertices within 1..depth steps, per group."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    async with core.graphs.reading_request(principal, ctx, Op.NEIGHBORHOOD):
        query = Neighborhood(
            body.start,
            body.depth,
            direction_of(body.direction),
            tuple(body.edge_collections),
            tuple(body.vertex_collections),
            parse_filters(body.edge_filters),
            parse_filters(body.vertex_filters),
            aggregate_of(body.aggregate),
            None if body.field is None else property_path(body.field, what="field"),
            body.of_edges,
            None if body.group_by is None else property_path(body.group_by, what="group_by"),
        )
    groups = await core.graphs.neighborhood(principal, ctx, query)
    return json_answer({"groups": [g.to_dict() for g in groups]})
