"""``/api/v1/vector/...``: vector collections of the caller's tenant (the seed's Weaviate) —
collections created, listed, read and dropped; objects upserted (one or a batch), read, deleted
(by id or by filter), counted; near-vector search; and the seed's ``similarity_search`` call as
it is written (``POST /api/v1/vector/query``).

The tenant is the X-Tenant-Id header (or ``tenant_id`` in a body; both must agree when both
are given). Property values are JSON: dates as ISO 8601 text, UUIDs as text. Filters
(``where``) are described in ``stores.vector.filters``.
"""

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from database_service.api.http.deps import Authenticated, Core, TenantHeader, tenant_context
from database_service.stores.vector import (
    CollectionInfo,
    Hit,
    ObjectNotFound,
    SearchQuery,
    VectorObject,
)
from database_service.stores.vector.model import json_value

router = APIRouter(tags=["vector"])

_BASE = "/api/v1/vector/collections"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")


class CreateCollection(_Body):
    name: StrictStr = Field(description="A letter, then letters, digits, _ (48 at most)")
    dimension: StrictInt = Field(description="1 to 2000")
    metric: StrictStr = Field(default="cosine", description="cosine, l2 or dot")
    properties: dict[str, StrictStr] = Field(
        default_factory=dict,
        description="name → text, int, number, bool, date, uuid or text[]",
    )


class ObjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = Field(default=None, description="A UUID (new when absent)")
    vector: list[float]
    properties: dict[str, Any] = Field(default_factory=dict)


class Upsert(_Body):
    objects: list[ObjectIn] = Field(description="At most 10,000; all written or none")


class ObjectBody(_Body):
    vector: list[float]
    properties: dict[str, Any] = Field(default_factory=dict)


class GetObjects(_Body):
    ids: list[StrictStr]
    with_vector: StrictBool = False


class DeleteObjects(_Body):
    ids: list[StrictStr] | None = None
    where: dict[str, Any] | None = Field(default=None, description="A filter (or ids)")


class Count(_Body):
    where: dict[str, Any] | None = None


class Search(_Body):
    vector: list[float]
    limit: StrictInt = Field(default=10, description="1 to 1000")
    certainty: float | None = Field(default=None, description="At least (cosine: 0 to 1)")
    distance: float | None = Field(default=None, description="At most")
    where: dict[str, Any] | None = None
    with_vector: StrictBool = False
    tenant_filter: StrictStr | None = Field(
        default=None, description="The seed's: must be the caller's tenant when given"
    )


class SeedQuery(_Body):
    """The seed's ``weaviate_query`` argument."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    operation: StrictStr = "similarity_search"
    class_: StrictStr = Field(alias="class")
    vector: list[float]
    tenant_filter: StrictStr | None = None
    limit: StrictInt = 10
    certainty: float | None = None
    distance: float | None = None
    where: dict[str, Any] | None = None
    with_vector: StrictBool = False


def collection_document(info: CollectionInfo) -> dict[str, Any]:
    return info.to_dict()


def object_document(obj: VectorObject) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": str(obj.id),
        "properties": {k: json_value(v) for k, v in obj.properties.items()},
    }
    if obj.vector is not None:
        document["vector"] = obj.vector
    return document


def hit_document(hit: Hit) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": str(hit.id),
        "distance": hit.distance,
        "certainty": hit.certainty,
        "properties": {k: json_value(v) for k, v in hit.properties.items()},
    }
    if hit.vector is not None:
        document["vector"] = hit.vector
    return document


@router.post(_BASE, status_code=201)
async def create_collection(
    body: CreateCollection,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """A collection with an HNSW index of its metric (the ``admin`` scope: it is DDL)."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    info = await core.vectors.create_collection(
        principal, ctx, body.name, body.dimension, body.metric, body.properties
    )
    return collection_document(info)


@router.get(_BASE)
async def list_collections(
    request: Request, core: Core, principal: Authenticated, x_tenant_id: TenantHeader = None
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    infos = await core.vectors.list_collections(principal, ctx)
    return {"collections": [collection_document(i) for i in infos]}


@router.get(_BASE + "/{name}")
async def get_collection(
    name: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """The collection's schema and its object count."""
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    return collection_document(await core.vectors.get_collection(principal, ctx, name))


@router.delete(_BASE + "/{name}")
async def drop_collection(
    name: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    return {"dropped": await core.vectors.drop_collection(principal, ctx, name)}


@router.post(_BASE + "/{name}/objects")
async def upsert_objects(
    name: str,
    body: Upsert,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """Insert or replace objects, all or none."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    objects = [o.model_dump(exclude_none=True) for o in body.objects]
    return {"upserted": await core.vectors.upsert(principal, ctx, name, objects)}


@router.put(_BASE + "/{name}/objects/{object_id}")
async def put_object(
    name: str,
    object_id: str,
    body: ObjectBody,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    obj = {"id": object_id, "vector": body.vector, "properties": body.properties}
    return {"upserted": await core.vectors.upsert(principal, ctx, name, [obj])}


@router.get(_BASE + "/{name}/objects/{object_id}")
async def get_object(
    name: str,
    object_id: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    with_vector: bool = Query(default=False),
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """One object, or 404 ``object_not_found``."""
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    found = await core.vectors.get_objects(
        principal, ctx, name, [object_id], with_vector=with_vector
    )
    if not found:
        raise ObjectNotFound(f"no object {object_id[:60]!r} in collection {name[:60]!r}")
    return object_document(found[0])


@router.post(_BASE + "/{name}/objects/get")
async def get_objects(
    name: str,
    body: GetObjects,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """The objects of ``ids`` that exist (in the order asked)."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    found = await core.vectors.get_objects(
        principal, ctx, name, body.ids, with_vector=body.with_vector
    )
    return {"objects": [object_document(o) for o in found]}


@router.delete(_BASE + "/{name}/objects/{object_id}")
async def delete_object(
    name: str,
    object_id: str,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, None, header=x_tenant_id)
    return {"deleted": await core.vectors.delete_objects(principal, ctx, name, ids=[object_id])}


@router.post(_BASE + "/{name}/objects/delete")
async def delete_objects(
    name: str,
    body: DeleteObjects,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """Delete by ``ids`` or by a filter ``where`` (one of them)."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    deleted = await core.vectors.delete_objects(
        principal, ctx, name, ids=body.ids, where=body.where
    )
    return {"deleted": deleted}


@router.post(_BASE + "/{name}/count")
async def count_objects(
    name: str,
    body: Count,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    return {"count": await core.vectors.count(principal, ctx, name, body.where)}


@router.post(_BASE + "/{name}/search")
async def search(
    name: str,
    body: Search,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """The ``limit`` nearest objects to ``vector`` (within ``certainty``/``distance``, passing
    ``where``), nearest first."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    query = SearchQuery(
        body.vector, body.limit, body.certainty, body.distance, body.where, body.with_vector
    )
    hits = await core.vectors.search(principal, ctx, name, query, tenant_filter=body.tenant_filter)
    return {"results": [hit_document(h) for h in hits], "count": len(hits)}


@router.post("/api/v1/vector/query")
async def seed_query(
    body: SeedQuery,
    request: Request,
    core: Core,
    principal: Authenticated,
    x_tenant_id: TenantHeader = None,
) -> dict[str, Any]:
    """The seed's ``{"operation": "similarity_search", "class", "vector", "tenant_filter",
    "limit", "certainty"}``; ``tenant_filter`` must be the caller's tenant."""
    ctx = tenant_context(request, principal, body.tenant_id, header=x_tenant_id)
    request_body = body.model_dump(by_alias=True, exclude={"tenant_id"}, exclude_none=True)
    answer = await core.vectors.similarity_search(principal, ctx, request_body)
    return {**answer, "results": [hit_document(h) for h in answer["results"]]}
