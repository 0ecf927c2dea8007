"""Vector similarity for services (the seed's "Kategori C", Weaviate's classes): collections with
typed properties and a vector per object, upserts and deletes, near-vector search — one use case
for every front end.

The tenant is always the caller's context (``ctx.tenant_id``); the seed's ``tenant_filter``, when
given, must name that same tenant (anything else is refused, ``permission_denied``): it is a
check, never a selector. Scopes: reads (list, get, count, search) need ``read``, object writes
``write``, and a collection's creation or drop ``admin`` — the rule of DDL everywhere in the
service. Every call is audited as ``vector.<operation>`` (by the store's session for pgvector;
refusals here), and counted: searches, their latency, objects written and deleted.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from prometheus_client import Counter, Histogram

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.errors import DatabaseServiceError, InvalidRequest, PermissionDenied
from database_service.observability.metrics import Metrics
from database_service.query import TenantContext
from database_service.stores.vector import (
    MAX_LIMIT,
    CollectionInfo,
    Hit,
    SearchQuery,
    VectorObject,
    VectorStore,
    check_dimension,
    collection_name,
    metric_of,
    object_id,
    parse_properties,
)

__all__ = ["VectorMetrics", "VectorOps"]

_SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class VectorMetrics:
    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self.searches = Counter(
            "dbsvc_vector_searches",
            "Vector searches, by store and outcome code ('ok' on success).",
            ["store", "code"],
            registry=registry,
        )
        self.search_seconds = Histogram(
            "dbsvc_vector_search_duration_seconds",
            "Vector search latency in the service (authorization to last row), by store.",
            ["store"],
            buckets=_SEARCH_BUCKETS,
            registry=registry,
        )
        self.objects = Counter(
            "dbsvc_vector_objects",
            "Vector objects written (upserted) and deleted, by store and operation.",
            ["store", "operation"],
            registry=registry,
        )


class VectorOps:
    def __init__(self, access: Access, store: VectorStore, metrics: VectorMetrics) -> None:
        self._access = access
        self.store = store
        self._metrics = metrics

    async def _require(
        self, principal: Principal, ctx: TenantContext, scope: Scope, operation: str
    ) -> None:
        await self._access.require(principal, scope, f"vector.{operation}", ctx.tenant_id)

    async def _refuse(
        self, principal: Principal, ctx: TenantContext, operation: str, exc: DatabaseServiceError
    ) -> NoReturn:
        await self._access.deny(principal, ctx.tenant_id, f"vector.{operation}", exc)

    # --- collections ------------------------------------------------------------------------

    async def create_collection(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        dimension: int,
        metric: str = "cosine",
        properties: Mapping[str, str] | None = None,
    ) -> CollectionInfo:
        await self._require(principal, ctx, Scope.ADMIN, "create_collection")
        try:
            checked = (
                collection_name(name),
                check_dimension(dimension),
                metric_of(metric),
                parse_properties(properties or {}),
            )
        except InvalidRequest as exc:
            await self._refuse(principal, ctx, "create_collection", exc)
        return await self.store.create_collection(principal, ctx, *checked)

    async def list_collections(
        self, principal: Principal, ctx: TenantContext
    ) -> list[CollectionInfo]:
        await self._require(principal, ctx, Scope.READ, "list_collections")
        return await self.store.list_collections(principal, ctx)

    async def get_collection(
        self, principal: Principal, ctx: TenantContext, name: str
    ) -> CollectionInfo:
        await self._require(principal, ctx, Scope.READ, "get_collection")
        return await self.store.get_collection(
            principal, ctx, await self._name(principal, ctx, name, "get_collection")
        )

    async def drop_collection(self, principal: Principal, ctx: TenantContext, name: str) -> bool:
        await self._require(principal, ctx, Scope.ADMIN, "drop_collection")
        name = await self._name(principal, ctx, name, "drop_collection")
        return await self.store.drop_collection(principal, ctx, name)

    async def _name(
        self, principal: Principal, ctx: TenantContext, name: str, operation: str
    ) -> str:
        try:
            return collection_name(name)
        except InvalidRequest as exc:
            await self._refuse(principal, ctx, operation, exc)

    # --- objects ----------------------------------------------------------------------------

    async def upsert(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        objects: Sequence[Mapping[str, Any]],
    ) -> int:
        await self._require(principal, ctx, Scope.WRITE, "upsert")
        name = await self._name(principal, ctx, name, "upsert")
        written = await self.store.upsert(principal, ctx, name, objects)
        self._metrics.objects.labels(self.store.kind, "upsert").inc(written)
        return written

    async def get_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        ids: Sequence[str | uuid.UUID],
        *,
        with_vector: bool = False,
    ) -> list[VectorObject]:
        await self._require(principal, ctx, Scope.READ, "get")
        name = await self._name(principal, ctx, name, "get")
        try:
            checked = [object_id(i) for i in ids]
        except InvalidRequest as exc:
            await self._refuse(principal, ctx, "get", exc)
        return await self.store.get_objects(principal, ctx, name, checked, with_vector=with_vector)

    async def delete_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        *,
        ids: Sequence[str | uuid.UUID] | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        await self._require(principal, ctx, Scope.WRITE, "delete")
        name = await self._name(principal, ctx, name, "delete")
        try:
            checked = None if ids is None else [object_id(i) for i in ids]
        except InvalidRequest as exc:
            await self._refuse(principal, ctx, "delete", exc)
        deleted = await self.store.delete_objects(principal, ctx, name, ids=checked, where=where)
        self._metrics.objects.labels(self.store.kind, "delete").inc(deleted)
        return deleted

    async def count(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        await self._require(principal, ctx, Scope.READ, "count")
        name = await self._name(principal, ctx, name, "count")
        return await self.store.count(principal, ctx, name, where)

    # --- search -----------------------------------------------------------------------------

    async def search(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        query: SearchQuery,
        *,
        tenant_filter: str | None = None,
    ) -> list[Hit]:
        """The ``query.limit`` objects nearest ``query.vector`` (those within ``certainty`` /
        ``distance`` and passing ``where``), nearest first."""
        started = time.perf_counter()
        kind = self.store.kind
        try:
            await self._require(principal, ctx, Scope.READ, "search")
            try:
                if tenant_filter is not None and tenant_filter != ctx.tenant_id:
                    raise PermissionDenied(
                        "tenant_filter names another tenant: a search runs for the caller's"
                        " tenant only"
                    )
                name = collection_name(name)
                _check_query(query)
            except DatabaseServiceError as exc:
                await self._refuse(principal, ctx, "search", exc)
            hits = await self.store.search(principal, ctx, name, query)
        except DatabaseServiceError as exc:
            self._metrics.searches.labels(kind, exc.error_code).inc()
            raise
        self._metrics.searches.labels(kind, "ok").inc()
        self._metrics.search_seconds.labels(kind).observe(time.perf_counter() - started)
        return hits

    async def similarity_search(
        self, principal: Principal, ctx: TenantContext, request: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The seed's ``weaviate_query({"operation": "similarity_search", "class", "vector",
        "tenant_filter", "limit", "certainty"})``, answered as ``{"class", "results":
        [{"id", "certainty", "distance", "properties"}], "count"}``."""
        operation = request.get("operation", "similarity_search")
        if operation != "similarity_search":
            raise InvalidRequest("the operation is similarity_search")
        extra = set(request) - {
            "operation", "class", "vector", "tenant_filter", "limit", "certainty", "distance",
            "where", "with_vector",
        }  # fmt: skip
        if extra:
            raise InvalidRequest(f"unknown fields {', '.join(sorted(extra))[:80]}")
        query = SearchQuery(
            vector=request.get("vector") or [],
            limit=request.get("limit", 10),
            certainty=request.get("certainty"),
            distance=request.get("distance"),
            where=request.get("where"),
            with_vector=bool(request.get("with_vector", False)),
        )
        hits = await self.search(
            principal,
            ctx,
            str(request.get("class", "")),
            query,
            tenant_filter=request.get("tenant_filter"),
        )
        return {"class": request.get("class"), "results": hits, "count": len(hits)}


def _check_query(query: SearchQuery) -> None:
    limit = query.limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be 1 to {MAX_LIMIT}")
    if query.certainty is not None and not (
        _number(query.certainty) and 0.0 <= query.certainty <= 1.0
    ):
        raise InvalidRequest("certainty must be a number from 0 to 1")
    if query.distance is not None and not _number(query.distance):
        raise InvalidRequest("distance must be a finite number")
    if query.where is not None and not isinstance(query.where, Mapping):
        raise InvalidRequest("where is a filter object")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
