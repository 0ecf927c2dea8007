"""The relationship graph's client methods (``graph_*``), mixed into ``MultiDatabaseClient``.

Answers are plain dicts and lists in the REST API's shapes (``/api/v1/graph/...``), so code
moves between the two without translation. Filters are ``{"field", "op", "value"}`` dicts;
ids are ``"collection/key"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from database_service_client._proto import graph_pb2 as gpb
from database_service_client._proto.graph_pb2_grpc import GraphServiceStub

__all__ = ["GraphMethods"]

_DIRECTIONS = {
    "outbound": gpb.GRAPH_DIRECTION_OUTBOUND,
    "inbound": gpb.GRAPH_DIRECTION_INBOUND,
    "any": gpb.GRAPH_DIRECTION_ANY,
}


def _direction(name: str) -> gpb.GraphDirection.ValueType:
    try:
        return _DIRECTIONS[name.lower()]
    except KeyError:
        raise ValueError("direction must be outbound, inbound or any") from None


def _filters(filters: Sequence[Mapping[str, Any]] | None) -> list[gpb.GraphFilter]:
    return [
        gpb.GraphFilter(
            field=str(f.get("field", "")),
            op=str(f.get("op", "eq")),
            value_json=json.dumps(f.get("value")),
        )
        for f in filters or ()
    ]


def _vertex(message: gpb.GraphVertex) -> dict[str, Any]:
    return {
        "_id": f"{message.collection}/{message.key}",
        "_key": message.key,
        "_collection": message.collection,
        "properties": json.loads(message.properties_json or "{}"),
    }


class GraphMethods:
    """Needs the client's ``_channels``, ``_open`` and ``_unary``."""

    _unary: Callable[..., Any]
    _open: Callable[[], None]
    _channels: list[grpc.aio.Channel]

    def _graph(self, method: str) -> Any:
        if not self._channels:
            self._open()
        channel = self._channels[0]
        stubs: dict[int, GraphServiceStub] = self.__dict__.setdefault("_graph_stubs", {})
        stub = stubs.get(id(channel))
        if stub is None:  # the channels were reopened (after close)
            stubs.clear()
            stub = stubs[id(channel)] = GraphServiceStub(channel)
        return getattr(stub, method)

    async def graph_upsert_vertices(
        self,
        collection: str,
        vertices: Sequence[Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> int:
        """Create or replace vertices of ``collection``: each ``{"_key": ..., **properties}``
        (properties replaced whole). At most 10,000 per call; how many were written."""
        request = gpb.UpsertVerticesRequest(
            vertices=[
                gpb.GraphVertex(
                    collection=collection,
                    key=str(v["_key"]),
                    properties_json=json.dumps({k: x for k, x in v.items() if k != "_key"}),
                )
                for v in vertices
            ]
        )
        response = await self._unary(
            self._graph("UpsertVertices"), request, retry=False, timeout=timeout
        )
        return int(response.written)

    async def graph_upsert_edges(
        self,
        collection: str,
        edges: Sequence[Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> int:
        """Create or replace edges of ``collection``: each ``{"_from": id, "_to": id,
        "_key"?: ..., **properties}`` between vertices the tenant has (without a key, the
        same two ends are the same edge)."""
        messages = []
        for e in edges:
            message = gpb.GraphEdge(
                collection=collection,
                key=str(e.get("_key") or ""),
                to=str(e["_to"]),
                properties_json=json.dumps(
                    {k: x for k, x in e.items() if k not in ("_key", "_from", "_to")}
                ),
            )
            setattr(message, "from", str(e["_from"]))
            messages.append(message)
        response = await self._unary(
            self._graph("UpsertEdges"),
            gpb.UpsertEdgesRequest(edges=messages),
            retry=False,
            timeout=timeout,
        )
        return int(response.written)

    async def graph_get_vertex(
        self, vertex_id: str, *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        response = await self._unary(
            self._graph("GetVertex"),
            gpb.GraphDocumentRequest(id=vertex_id),
            retry=True,
            timeout=timeout,
        )
        return _vertex(response.vertex) if response.found else None

    async def graph_get_edge(
        self, edge_id: str, *, timeout: float | None = None
    ) -> dict[str, Any] | None:
        response = await self._unary(
            self._graph("GetEdge"),
            gpb.GraphDocumentRequest(id=edge_id),
            retry=True,
            timeout=timeout,
        )
        if not response.found:
            return None
        e = response.edge
        return {
            "_id": f"{e.collection}/{e.key}",
            "_key": e.key,
            "_collection": e.collection,
            "_from": getattr(e, "from"),
            "_to": e.to,
            "properties": json.loads(e.properties_json or "{}"),
        }

    async def graph_delete_vertex(
        self, vertex_id: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Delete a vertex and its edges: ``{"deleted": bool, "edges_deleted": n}``."""
        response = await self._unary(
            self._graph("DeleteVertex"),
            gpb.GraphDocumentRequest(id=vertex_id),
            retry=False,
            timeout=timeout,
        )
        return {"deleted": response.deleted, "edges_deleted": int(response.edges_deleted)}

    async def graph_delete_edge(self, edge_id: str, *, timeout: float | None = None) -> bool:
        response = await self._unary(
            self._graph("DeleteEdge"),
            gpb.GraphDocumentRequest(id=edge_id),
            retry=False,
            timeout=timeout,
        )
        return bool(response.deleted)

    async def graph_traverse(
        self,
        start: str,
        *,
        direction: str = "outbound",
        min_depth: int = 1,
        max_depth: int = 1,
        edge_collections: Sequence[str] = (),
        vertex_collections: Sequence[str] = (),
        edge_filters: Sequence[Mapping[str, Any]] | None = None,
        vertex_filters: Sequence[Mapping[str, Any]] | None = None,
        limit: int = 1000,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Vertices reached from ``start`` at min..max steps, each once at its fewest steps:
        ``{"hits": [{"vertex", "depth", "path", "edges"}], "truncated": bool}``."""
        request = gpb.TraverseRequest(
            start=start,
            direction=_direction(direction),
            min_depth=min_depth,
            max_depth=max_depth,
            edge_collections=list(edge_collections),
            vertex_collections=list(vertex_collections),
            edge_filters=_filters(edge_filters),
            vertex_filters=_filters(vertex_filters),
            limit=limit,
        )
        response = await self._unary(self._graph("Traverse"), request, retry=True, timeout=timeout)
        return {
            "hits": [
                {
                    "vertex": _vertex(h.vertex),
                    "depth": h.depth,
                    "path": list(h.path),
                    "edges": list(h.edges),
                }
                for h in response.hits
            ],
            "truncated": response.truncated,
        }

    async def graph_shortest_path(
        self,
        start: str,
        end: str,
        *,
        direction: str = "outbound",
        max_depth: int = 6,
        edge_collections: Sequence[str] = (),
        edge_filters: Sequence[Mapping[str, Any]] | None = None,
        weight_attribute: str | None = None,
        default_weight: float = 1.0,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """``{"found", "vertices", "edges"}``: the fewest steps from start to end; with
        ``weight_attribute`` (an edge property, as ArangoDB's ``weightAttribute``) the least
        total weight instead, given as ``"weight"`` (``default_weight`` for an edge without a
        number there; ties go to fewer steps)."""
        request = gpb.ShortestPathRequest(
            start=start,
            end=end,
            direction=_direction(direction),
            max_depth=max_depth,
            edge_collections=list(edge_collections),
            edge_filters=_filters(edge_filters),
        )
        if weight_attribute is not None:
            request.weight_attribute = weight_attribute
            request.default_weight = default_weight
        response = await self._unary(
            self._graph("ShortestPath"), request, retry=True, timeout=timeout
        )
        answer: dict[str, Any] = {
            "found": response.found,
            "vertices": list(response.vertices),
            "edges": list(response.edges),
        }
        if weight_attribute is not None:
            answer["weight"] = response.weight if response.HasField("weight") else None
        return answer

    async def graph_neighborhood(
        self,
        start: str,
        *,
        depth: int = 1,
        direction: str = "outbound",
        edge_collections: Sequence[str] = (),
        vertex_collections: Sequence[str] = (),
        edge_filters: Sequence[Mapping[str, Any]] | None = None,
        vertex_filters: Sequence[Mapping[str, Any]] | None = None,
        aggregate: str = "count",
        field: str | None = None,
        of_edges: bool = False,
        group_by: str | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """``[{"group", "count", "value"}]``: ``aggregate`` of ``field`` over the vertices
        within 1..depth steps, per ``group_by`` value. E.g. the EURUSD exposure of everyone
        who copies a trader: ``graph_neighborhood("users/t", direction="inbound",
        edge_collections=["copies"], aggregate="sum", field="exposure.EURUSD")``."""
        request = gpb.NeighborhoodRequest(
            start=start,
            depth=depth,
            direction=_direction(direction),
            edge_collections=list(edge_collections),
            vertex_collections=list(vertex_collections),
            edge_filters=_filters(edge_filters),
            vertex_filters=_filters(vertex_filters),
            aggregate=aggregate,
            field=field or "",
            of_edges=of_edges,
            group_by=group_by or "",
        )
        response = await self._unary(
            self._graph("Neighborhood"), request, retry=True, timeout=timeout
        )
        return [
            {
                "group": json.loads(g.group_json or "null"),
                "count": int(g.count),
                "value": json.loads(g.value_json or "null"),
            }
            for g in response.groups
        ]
