"""The one interface every vector store implements (embedded: pgvector in the service's
PostgreSQL; production: Weaviate by URL).

Every method acts for one tenant, the caller's (``ctx.tenant_id``), and for a principal the
application layer has already authorized; an implementation runs as that tenant's own identity
in its back end (pgvector: the tenant's login role, in its own schema; Weaviate: the tenant's
own classes and its own Weaviate tenant in them), so that what isolates tenants is the back end,
not this code. Inputs reach a store checked (``model``): names,
vectors, property values; filters are the store's to compile, against its own schema.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from database_service.auth import Principal
from database_service.query import TenantContext
from database_service.stores.vector.model import (
    CollectionInfo,
    Hit,
    Metric,
    PropertyType,
    SearchQuery,
    VectorObject,
)

__all__ = ["VectorStore"]


class VectorStore(Protocol):
    kind: str  # "pgvector", "weaviate"

    async def create_collection(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        dimension: int,
        metric: Metric,
        properties: Mapping[str, PropertyType],
    ) -> CollectionInfo: ...

    async def list_collections(
        self, principal: Principal, ctx: TenantContext
    ) -> list[CollectionInfo]: ...

    async def get_collection(
        self, principal: Principal, ctx: TenantContext, name: str
    ) -> CollectionInfo: ...

    async def drop_collection(
        self, principal: Principal, ctx: TenantContext, name: str
    ) -> bool: ...

    async def upsert(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        objects: Sequence[Mapping[str, Any]],
    ) -> int: ...

    async def get_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        ids: Sequence[uuid.UUID],
        *,
        with_vector: bool,
    ) -> list[VectorObject]: ...

    async def delete_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        *,
        ids: Sequence[uuid.UUID] | None,
        where: Mapping[str, Any] | None,
    ) -> int: ...

    async def count(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        where: Mapping[str, Any] | None = None,
    ) -> int: ...

    async def search(
        self, principal: Principal, ctx: TenantContext, name: str, query: SearchQuery
    ) -> list[Hit]: ...

    async def check(self) -> dict[str, Any]:
        """The health entry (``dependencies.weaviate``)."""
        ...
