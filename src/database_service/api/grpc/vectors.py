"""gRPC ``VectorService`` (proto/database_service/v1/vector.proto): vector collections of the
tenant named by the call's ``x-tenant-id``, through ``application.vectors``.

Property values and filters come as JSON text; bad JSON is ``invalid_request`` (or
``invalid_filter``), like any other bad input, before anything runs."""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc

from database_service.api.grpc.calls import Caller, rpc
from database_service.app import Application
from database_service.errors import InvalidRequest
from database_service.observability.notices import Notices
from database_service.stores.vector import (
    CollectionInfo,
    InvalidFilter,
    SearchQuery,
    VectorObject,
    json_value,
)
from database_service_client._proto import vector_pb2 as pb
from database_service_client._proto.vector_pb2_grpc import VectorServiceServicer

__all__ = ["VECTOR_SERVICE", "VectorServicer"]

log = logging.getLogger(__name__)

VECTOR_SERVICE = pb.DESCRIPTOR.services_by_name["VectorService"].full_name


def _json_object(text: str, what: str, error: type[InvalidRequest] = InvalidRequest) -> Any:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # nested past the reader's recursion limit too
        raise error(f"{what} is not valid JSON (or nested too deeply)") from None
    if not isinstance(value, dict):
        raise error(f"{what} is a JSON object")
    return value


def _properties_json(properties: dict[str, Any]) -> str:
    return json.dumps({k: json_value(v) for k, v in properties.items()}, separators=(",", ":"))


def _collection(info: CollectionInfo) -> pb.VectorCollection:
    message = pb.VectorCollection(
        name=info.name,
        dimension=info.dimension,
        metric=info.metric.value,
        properties={k: v.value for k, v in info.properties.items()},
    )
    if info.count is not None:
        message.count = info.count
    return message


def _object(obj: VectorObject) -> pb.VectorObject:
    return pb.VectorObject(
        id=str(obj.id), vector=obj.vector or [], properties_json=_properties_json(obj.properties)
    )


class VectorServicer(VectorServiceServicer):
    def __init__(self, core: Application) -> None:
        self.core = core
        self.caller = Caller(core)
        self.notices = Notices(log)

    @rpc
    async def CreateCollection(
        self, request: pb.CreateCollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.VectorCollection:
        principal, ctx = await self.caller.tenant(context)
        info = await self.core.vectors.create_collection(
            principal,
            ctx,
            request.name,
            request.dimension,
            request.metric or "cosine",
            dict(request.properties),
        )
        return _collection(info)

    @rpc
    async def ListCollections(
        self, request: pb.ListCollectionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCollectionsResponse:
        principal, ctx = await self.caller.tenant(context)
        infos = await self.core.vectors.list_collections(principal, ctx)
        return pb.ListCollectionsResponse(collections=[_collection(i) for i in infos])

    @rpc
    async def GetCollection(
        self, request: pb.CollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.VectorCollection:
        principal, ctx = await self.caller.tenant(context)
        return _collection(await self.core.vectors.get_collection(principal, ctx, request.name))

    @rpc
    async def DropCollection(
        self, request: pb.CollectionRequest, context: grpc.aio.ServicerContext
    ) -> pb.DropCollectionResponse:
        principal, ctx = await self.caller.tenant(context)
        dropped = await self.core.vectors.drop_collection(principal, ctx, request.name)
        return pb.DropCollectionResponse(dropped=dropped)

    @rpc
    async def UpsertObjects(
        self, request: pb.UpsertObjectsRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpsertObjectsResponse:
        principal, ctx = await self.caller.tenant(context)
        objects = []
        for number, message in enumerate(request.objects, start=1):
            obj: dict[str, Any] = {"vector": list(message.vector)}
            if message.id:
                obj["id"] = message.id
            properties = _json_object(message.properties_json, f"object {number}'s properties")
            if properties:
                obj["properties"] = properties
            objects.append(obj)
        written = await self.core.vectors.upsert(principal, ctx, request.collection, objects)
        return pb.UpsertObjectsResponse(upserted=written)

    @rpc
    async def GetObjects(
        self, request: pb.GetObjectsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetObjectsResponse:
        principal, ctx = await self.caller.tenant(context)
        found = await self.core.vectors.get_objects(
            principal, ctx, request.collection, list(request.ids), with_vector=request.with_vector
        )
        return pb.GetObjectsResponse(objects=[_object(o) for o in found])

    @rpc
    async def DeleteObjects(
        self, request: pb.DeleteObjectsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteObjectsResponse:
        principal, ctx = await self.caller.tenant(context)
        where = _json_object(request.where_json, "where_json", InvalidFilter)
        deleted = await self.core.vectors.delete_objects(
            principal,
            ctx,
            request.collection,
            ids=list(request.ids) if request.ids else None,
            where=where,
        )
        return pb.DeleteObjectsResponse(deleted=deleted)

    @rpc
    async def CountObjects(
        self, request: pb.CountObjectsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountObjectsResponse:
        principal, ctx = await self.caller.tenant(context)
        where = _json_object(request.where_json, "where_json", InvalidFilter)
        count = await self.core.vectors.count(principal, ctx, request.collection, where)
        return pb.CountObjectsResponse(count=count)

    @rpc
    async def Search(
        self, request: pb.VectorSearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.VectorSearchResponse:
        principal, ctx = await self.caller.tenant(context)
        query = SearchQuery(
            vector=request.vector,
            limit=request.limit or 10,
            certainty=request.certainty if request.HasField("certainty") else None,
            distance=request.distance if request.HasField("distance") else None,
            where=_json_object(request.where_json, "where_json", InvalidFilter),
            with_vector=request.with_vector,
        )
        hits = await self.core.vectors.search(
            principal,
            ctx,
            request.collection,
            query,
            tenant_filter=request.tenant_filter if request.HasField("tenant_filter") else None,
        )
        return pb.VectorSearchResponse(
            hits=[
                pb.VectorHit(
                    id=str(h.id),
                    distance=h.distance,
                    certainty=h.certainty,
                    properties_json=_properties_json(h.properties),
                    vector=h.vector or [],
                )
                for h in hits
            ]
        )
