"""The relationship graph: per-tenant vertex and edge collections, traversals, shortest paths,
aggregated neighbourhoods.

``GraphStore`` is what the application layer (``application/graphs.py``) uses; the composition
root builds one of:

- ``PostgresGraphStore`` (``postgres.py``, the embedded default): tables in each tenant's own
  schema, recursive CTEs, run as the tenant's own login;
- ``ArangoGraphStore`` (``arango.py``, ``DBSVC_ARANGODB_URL``): one ArangoDB database per tenant,
  AQL with bind parameters (``aql.py``).

Requests are validated once, for both, in ``model.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from database_service.stores.graph.model import (
    Edge,
    GraphLimits,
    Neighborhood,
    NeighborhoodGroup,
    PathResult,
    ShortestPath,
    TraversalResult,
    Traverse,
    Vertex,
)
from database_service.tenancy import TenantRecord

__all__ = ["GraphStore"]


class GraphStore(Protocol):
    name: str  # the store health reports it under: "postgresql" or "arangodb"
    limits: GraphLimits

    async def upsert_vertices(self, tenant: TenantRecord, vertices: Sequence[Vertex]) -> int: ...

    async def upsert_edges(self, tenant: TenantRecord, edges: Sequence[Edge]) -> int: ...

    async def get_vertex(self, tenant: TenantRecord, vertex_id: str) -> Vertex | None: ...

    async def get_edge(self, tenant: TenantRecord, edge_id: str) -> Edge | None: ...

    async def delete_vertex(self, tenant: TenantRecord, vertex_id: str) -> tuple[bool, int]:
        """Whether the vertex existed, and how many of its edges went with it."""
        ...

    async def delete_edge(self, tenant: TenantRecord, edge_id: str) -> bool: ...

    async def traverse(self, tenant: TenantRecord, query: Traverse) -> TraversalResult: ...

    async def shortest_path(self, tenant: TenantRecord, query: ShortestPath) -> PathResult: ...

    async def neighborhood(
        self, tenant: TenantRecord, query: Neighborhood
    ) -> list[NeighborhoodGroup]: ...

    async def check(self) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...
