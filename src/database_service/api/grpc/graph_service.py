"""The ``GraphService`` servicer (proto/database_service/v1/graph.proto): a thin adapter over
``application.graphs``; JSON text fields are parsed here, everything else is checked there."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from database_service.api.grpc.calls import Caller, rpc
from database_service.app import Application
from database_service.application.graphs import GraphOperation as Op
from database_service.errors import InvalidFilter, InvalidParameters
from database_service.observability.notices import Notices
from database_service.stores.graph.model import (
    MAX_FILTERS,
    Direction,
    Edge,
    Filter,
    Neighborhood,
    ShortestPath,
    Traverse,
    Vertex,
    aggregate_of,
    property_path,
)
from database_service_client._proto import graph_pb2 as pb

__all__ = ["GraphService"]

_DIRECTIONS = {
    pb.GRAPH_DIRECTION_UNSPECIFIED: Direction.OUTBOUND,
    pb.GRAPH_DIRECTION_OUTBOUND: Direction.OUTBOUND,
    pb.GRAPH_DIRECTION_INBOUND: Direction.INBOUND,
    pb.GRAPH_DIRECTION_ANY: Direction.ANY,
}


def _json(text: str, what: str, *, empty: Any = None) -> Any:
    if not text:
        return empty
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # nested past the reader's recursion limit too
        raise InvalidParameters(f"{what} is not valid JSON (or nested too deeply)") from None


def _direction(value: int) -> Direction:
    direction: Direction | None = _DIRECTIONS.get(value)  # type: ignore[call-overload]
    if direction is None:
        raise InvalidParameters("direction must be outbound, inbound or any")
    return direction


def _filters(filters: Sequence[pb.GraphFilter]) -> tuple[Filter, ...]:
    parsed = []
    for flt in filters:
        try:
            value = json.loads(flt.value_json) if flt.value_json else None
        except (ValueError, RecursionError):
            raise InvalidFilter(
                "a filter's value_json is not valid JSON (or nested too deeply)"
            ) from None
        parsed.append(Filter.parse({"field": flt.field, "op": flt.op or "eq", "value": value}))
    if len(parsed) > MAX_FILTERS:
        raise InvalidFilter(f"at most {MAX_FILTERS} filters")
    return tuple(parsed)


def _vertex_message(vertex: Vertex) -> pb.GraphVertex:
    return pb.GraphVertex(
        collection=vertex.collection,
        key=vertex.key,
        properties_json=json.dumps(vertex.properties),
    )


class GraphService:
    def __init__(self, core: Application) -> None:
        self.core = core
        self.caller = Caller(core)
        self.notices = Notices(logging.getLogger(__name__))

    @rpc
    async def UpsertVertices(
        self, request: pb.UpsertVerticesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GraphUpsertResponse:
        principal, ctx = await self.caller.tenant(context)
        async with self.core.graphs.reading_request(principal, ctx, Op.UPSERT_VERTICES):
            vertices = [
                Vertex.of(
                    v.collection, v.key, _json(v.properties_json, "properties_json", empty={})
                )
                for v in request.vertices
            ]
        written = await self.core.graphs.upsert_vertices(principal, ctx, vertices)
        return pb.GraphUpsertResponse(written=written)

    @rpc
    async def UpsertEdges(
        self, request: pb.UpsertEdgesRequest, context: grpc.aio.ServicerContext
    ) -> pb.GraphUpsertResponse:
        principal, ctx = await self.caller.tenant(context)
        async with self.core.graphs.reading_request(principal, ctx, Op.UPSERT_EDGES):
            edges = [
                Edge.of(
                    e.collection,
                    getattr(e, "from"),
                    e.to,
                    e.key or None,
                    _json(e.properties_json, "properties_json", empty={}),
                )
                for e in request.edges
            ]
        written = await self.core.graphs.upsert_edges(principal, ctx, edges)
        return pb.GraphUpsertResponse(written=written)

    @rpc
    async def GetVertex(
        self, request: pb.GraphDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVertexResponse:
        principal, ctx = await self.caller.tenant(context)
        vertex = await self.core.graphs.get_vertex(principal, ctx, request.id)
        if vertex is None:
            return pb.GetVertexResponse(found=False)
        return pb.GetVertexResponse(found=True, vertex=_vertex_message(vertex))

    @rpc
    async def GetEdge(
        self, request: pb.GraphDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEdgeResponse:
        principal, ctx = await self.caller.tenant(context)
        edge = await self.core.graphs.get_edge(principal, ctx, request.id)
        if edge is None:
            return pb.GetEdgeResponse(found=False)
        message = pb.GraphEdge(
            collection=edge.collection,
            key=edge.key,
            to=edge.to_id,
            properties_json=json.dumps(edge.properties),
        )
        setattr(message, "from", edge.from_id)
        return pb.GetEdgeResponse(found=True, edge=message)

    @rpc
    async def DeleteVertex(
        self, request: pb.GraphDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GraphDeleteResponse:
        principal, ctx = await self.caller.tenant(context)
        deleted, edges = await self.core.graphs.delete_vertex(principal, ctx, request.id)
        return pb.GraphDeleteResponse(deleted=deleted, edges_deleted=edges)

    @rpc
    async def DeleteEdge(
        self, request: pb.GraphDocumentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GraphDeleteResponse:
        principal, ctx = await self.caller.tenant(context)
        deleted = await self.core.graphs.delete_edge(principal, ctx, request.id)
        return pb.GraphDeleteResponse(deleted=deleted)

    @rpc
    async def Traverse(
        self, request: pb.TraverseRequest, context: grpc.aio.ServicerContext
    ) -> pb.TraverseResponse:
        principal, ctx = await self.caller.tenant(context)
        async with self.core.graphs.reading_request(principal, ctx, Op.TRAVERSE):
            query = Traverse(
                request.start,
                _direction(request.direction),
                request.min_depth,
                request.max_depth or 1,
                tuple(request.edge_collections),
                tuple(request.vertex_collections),
                _filters(request.edge_filters),
                _filters(request.vertex_filters),
                request.limit or 1000,
            )
        result = await self.core.graphs.traverse(principal, ctx, query)
        return pb.TraverseResponse(
            hits=[
                pb.TraversalHit(
                    vertex=_vertex_message(h.vertex), depth=h.depth, path=h.path, edges=h.edges
                )
                for h in result.hits
            ],
            truncated=result.truncated,
        )

    @rpc
    async def ShortestPath(
        self, request: pb.ShortestPathRequest, context: grpc.aio.ServicerContext
    ) -> pb.ShortestPathResponse:
        principal, ctx = await self.caller.tenant(context)
        async with self.core.graphs.reading_request(principal, ctx, Op.SHORTEST_PATH):
            query = ShortestPath(
                request.start,
                request.end,
                _direction(request.direction),
                request.max_depth or 6,
                tuple(request.edge_collections),
                _filters(request.edge_filters),
                request.weight_attribute or None,
                request.default_weight if request.HasField("default_weight") else 1.0,
            )
        path = await self.core.graphs.shortest_path(principal, ctx, query)
        return pb.ShortestPathResponse(
            found=path.found, vertices=path.vertices, edges=path.edges, weight=path.weight
        )

    @rpc
    async def Neighborhood(
        self, request: pb.NeighborhoodRequest, context: grpc.aio.ServicerContext
    ) -> pb.NeighborhoodResponse:
        principal, ctx = await self.caller.tenant(context)
        async with self.core.graphs.reading_request(principal, ctx, Op.NEIGHBORHOOD):
            query = Neighborhood(
                request.start,
                request.depth or 1,
                _direction(request.direction),
                tuple(request.edge_collections),
                tuple(request.vertex_collections),
                _filters(request.edge_filters),
                _filters(request.vertex_filters),
                aggregate_of(request.aggregate or "count"),
                property_path(request.field, what="field") if request.field else None,
                request.of_edges,
                property_path(request.group_by, what="group_by") if request.group_by else None,
            )
        groups = await self.core.graphs.neighborhood(principal, ctx, query)
        return pb.NeighborhoodResponse(
            groups=[
                pb.NeighborhoodGroup(
                    group_json=json.dumps(g.group), count=g.count, value_json=json.dumps(g.value)
                )
                for g in groups
            ]
        )
