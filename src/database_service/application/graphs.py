"""The relationship graph for services: upsert and delete vertices and edges, get a vertex,
traverse, shortest path, aggregated neighbourhood — one use case for every front end.

The tenant is the caller's context (``TenantContext.tenant_id``), never part of an id: a vertex
id ``users/alice`` names the caller's tenant's vertex, and the store (``stores/graph``) reaches
that tenant's graph only (PostgreSQL: the tenant's schema, on the tenant's login; ArangoDB: the
tenant's own database). Reads need ``read`` for the tenant, writes ``write``; the tenant must
exist and be active. Every call is audited as ``graph.<operation>`` (``ok``, ``denied`` —
refused before the store did anything — ``error`` or ``cancelled``) and counted in
``dbsvc_graph_operations_total`` / ``dbsvc_graph_operation_seconds``. Audit details hold counts
and depths, never ids or properties.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.errors import DatabaseServiceError, InvalidParameters, InvalidRequest
from database_service.observability.audit import AuditEvent, AuditLog
from database_service.query import TenantContext
from database_service.stores.graph import GraphStore
from database_service.stores.graph.model import (
    MAX_BATCH,
    MAX_PROPERTIES_BYTES,
    Edge,
    GraphLimits,
    Neighborhood,
    NeighborhoodGroup,
    PathResult,
    ShortestPath,
    TraversalResult,
    Traverse,
    Vertex,
    split_id,
)
from database_service.tenancy import TenantRecord, TenantRegistry

__all__ = ["GraphMetrics", "GraphOperation", "Graphs"]

T = TypeVar("T")


class GraphOperation(enum.StrEnum):
    UPSERT_VERTICES = "upsert_vertices"
    UPSERT_EDGES = "upsert_edges"
    GET_VERTEX = "get_vertex"
    GET_EDGE = "get_edge"
    DELETE_VERTEX = "delete_vertex"
    DELETE_EDGE = "delete_edge"
    TRAVERSE = "traverse"
    SHORTEST_PATH = "shortest_path"
    NEIGHBORHOOD = "neighborhood"


_WRITES = frozenset(
    {
        GraphOperation.UPSERT_VERTICES,
        GraphOperation.UPSERT_EDGES,
        GraphOperation.DELETE_VERTEX,
        GraphOperation.DELETE_EDGE,
    }
)


class GraphMetrics:
    """Operations by store, operation and outcome, and their durations."""

    def __init__(self, registry: Any = None) -> None:
        kwargs = {} if registry is None else {"registry": registry}
        self.operations = Counter(
            "dbsvc_graph_operations",
            "Graph operations by store, operation and outcome.",
            ["store", "operation", "outcome"],
            **kwargs,
        )
        self.seconds = Histogram(
            "dbsvc_graph_operation_seconds",
            "Duration of graph operations that reached the store.",
            ["store", "operation"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            **kwargs,
        )


def _check_batch(items: Sequence[Any], what: str) -> None:
    if not items:
        raise InvalidParameters(f"no {what} given")
    if len(items) > MAX_BATCH:
        raise InvalidParameters(f"at most {MAX_BATCH} {what} per call")


def _check_properties(items: Sequence[Vertex] | Sequence[Edge]) -> None:
    for item in items:
        try:
            size = len(json.dumps(item.properties, allow_nan=False))
        except (TypeError, ValueError):
            raise InvalidParameters(
                "properties must be JSON (finite numbers, string keys)"
            ) from None
        if size > MAX_PROPERTIES_BYTES:
            raise InvalidParameters(
                f"a document's properties are over {MAX_PROPERTIES_BYTES} bytes"
            )


class Graphs:
    """The use case: authorize for the tenant, check the request, run on the store, audit."""

    def __init__(
        self,
        access: Access,
        store: GraphStore,
        registry: TenantRegistry,
        audit: AuditLog,
        metrics: GraphMetrics,
    ) -> None:
        self._access = access
        self.store = store
        self._registry = registry
        self._audit = audit
        self._metrics = metrics

    @property
    def limits(self) -> GraphLimits:
        return self.store.limits

    @contextlib.asynccontextmanager
    async def reading_request(
        self, principal: Principal, ctx: TenantContext, op: GraphOperation
    ) -> AsyncIterator[None]:
        """Around a front end's translation of a request (JSON fields, filters, enums): what it
        refuses is audited and counted as a denial of ``op``, like the checks made here."""
        try:
            yield
        except DatabaseServiceError as exc:
            self._metrics.operations.labels(self.store.name, op.value, "denied").inc()
            await self._access.deny(principal, ctx.tenant_id, f"graph.{op.value}", exc)

    async def _run(
        self,
        principal: Principal,
        ctx: TenantContext,
        op: GraphOperation,
        check: Callable[[], None],
        call: Callable[[TenantRecord], Awaitable[T]],
        detail: str | None = None,
    ) -> T:
        tenant_id = ctx.tenant_id
        action = f"graph.{op.value}"
        scope = Scope.WRITE if op in _WRITES else Scope.READ
        store = self.store.name
        await self._access.require(principal, scope, action, tenant_id)
        try:
            check()
            tenant = await self._registry.get_active(tenant_id)
        except DatabaseServiceError as exc:
            self._metrics.operations.labels(store, op.value, "denied").inc()
            await self._access.deny(principal, tenant_id, action, exc)
        started = time.perf_counter()
        try:
            result = await call(tenant)
        except InvalidRequest as exc:
            self._metrics.operations.labels(store, op.value, "denied").inc()
            await self._access.deny(principal, tenant_id, action, exc)
        except DatabaseServiceError as exc:
            self._metrics.operations.labels(store, op.value, "error").inc()
            await self._record(principal, tenant_id, action, op, "error", exc.error_code, detail)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            await asyncio.shield(
                self._record(principal, tenant_id, action, op, "cancelled", "cancelled", detail)
            )
            raise
        self._metrics.seconds.labels(store, op.value).observe(time.perf_counter() - started)
        self._metrics.operations.labels(store, op.value, "ok").inc()
        await self._record(principal, tenant_id, action, op, "ok", None, detail)
        return result

    async def _record(
        self,
        principal: Principal,
        tenant_id: str,
        action: str,
        op: GraphOperation,
        outcome: str,
        code: str | None,
        detail: str | None,
    ) -> None:
        await self._audit.record(
            AuditEvent(
                service=principal.service,
                tenant_id=tenant_id,
                action=action,
                statement_class="write" if op in _WRITES else "read",
                outcome=outcome,
                code=code or op.value,
                detail=detail,
            )
        )

    # --- writes ---------------------------------------------------------------------------

    async def upsert_vertices(
        self, principal: Principal, ctx: TenantContext, vertices: Sequence[Vertex]
    ) -> int:
        """Create or replace vertices (their properties replaced whole); creates their
        collections as vertex collections. Returns how many were written."""

        def check() -> None:
            _check_batch(vertices, "vertices")
            for v in vertices:  # a Python caller's own Vertex(...): checked like a request's
                Vertex.of(v.collection, v.key, v.properties)
            _check_properties(vertices)

        return await self._run(
            principal,
            ctx,
            GraphOperation.UPSERT_VERTICES,
            check,
            lambda t: self.store.upsert_vertices(t, vertices),
            f"{len(vertices)} vertices",
        )

    async def upsert_edges(
        self, principal: Principal, ctx: TenantContext, edges: Sequence[Edge]
    ) -> int:
        """Create or replace edges between existing vertices of the tenant (an edge written
        without a key gets one from its ends: the same pair, the same edge)."""

        def check() -> None:
            _check_batch(edges, "edges")
            for e in edges:
                Edge.of(e.collection, e.from_id, e.to_id, e.key, e.properties)
            _check_properties(edges)

        return await self._run(
            principal,
            ctx,
            GraphOperation.UPSERT_EDGES,
            check,
            lambda t: self.store.upsert_edges(t, edges),
            f"{len(edges)} edges",
        )

    async def delete_vertex(
        self, principal: Principal, ctx: TenantContext, vertex_id: str
    ) -> tuple[bool, int]:
        return await self._run(
            principal,
            ctx,
            GraphOperation.DELETE_VERTEX,
            lambda: split_id(vertex_id) and None,
            lambda t: self.store.delete_vertex(t, vertex_id),
        )

    async def delete_edge(self, principal: Principal, ctx: TenantContext, edge_id: str) -> bool:
        return await self._run(
            principal,
            ctx,
            GraphOperation.DELETE_EDGE,
            lambda: split_id(edge_id) and None,
            lambda t: self.store.delete_edge(t, edge_id),
        )

    # --- reads ----------------------------------------------------------------------------

    async def get_vertex(
        self, principal: Principal, ctx: TenantContext, vertex_id: str
    ) -> Vertex | None:
        return await self._run(
            principal,
            ctx,
            GraphOperation.GET_VERTEX,
            lambda: split_id(vertex_id) and None,
            lambda t: self.store.get_vertex(t, vertex_id),
        )

    async def get_edge(self, principal: Principal, ctx: TenantContext, edge_id: str) -> Edge | None:
        return await self._run(
            principal,
            ctx,
            GraphOperation.GET_EDGE,
            lambda: split_id(edge_id) and None,
            lambda t: self.store.get_edge(t, edge_id),
        )

    async def traverse(
        self, principal: Principal, ctx: TenantContext, query: Traverse
    ) -> TraversalResult:
        return await self._run(
            principal,
            ctx,
            GraphOperation.TRAVERSE,
            lambda: query.check(self.limits),
            lambda t: self.store.traverse(t, query),
            f"{query.direction.value} {query.min_depth}..{query.max_depth}",
        )

    async def shortest_path(
        self, principal: Principal, ctx: TenantContext, query: ShortestPath
    ) -> PathResult:
        return await self._run(
            principal,
            ctx,
            GraphOperation.SHORTEST_PATH,
            lambda: query.check(self.limits),
            lambda t: self.store.shortest_path(t, query),
            f"{query.direction.value} ..{query.max_depth}",
        )

    async def neighborhood(
        self, principal: Principal, ctx: TenantContext, query: Neighborhood
    ) -> list[NeighborhoodGroup]:
        return await self._run(
            principal,
            ctx,
            GraphOperation.NEIGHBORHOOD,
            lambda: query.check(self.limits),
            lambda t: self.store.neighborhood(t, query),
            f"{query.function.value} {query.direction.value} 1..{query.depth}",
        )
