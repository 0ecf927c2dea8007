"""Vector collections (the seed's Weaviate) for ``MultiDatabaseClient``: ``vector_*`` methods over
gRPC ``VectorService``, and the seed's ``weaviate_query``.

Objects are ``{"id", "vector", "properties"}`` mappings; answers are plain dicts (ids as text,
property values as JSON has them: dates ISO 8601 text). Reads are retried on UNAVAILABLE like
every read of this client; writes are not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from database_service_client._proto import vector_pb2 as vpb
from database_service_client._proto.vector_pb2_grpc import VectorServiceStub

if TYPE_CHECKING:
    from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub

__all__ = ["VectorMethods"]

_SEED_FIELDS = frozenset(
    {
        "operation",
        "class",
        "vector",
        "tenant_filter",
        "limit",
        "certainty",
        "distance",
        "where",
        "with_vector",
    }
)


def _floats(vector: Sequence[float]) -> list[float]:
    """A vector as floats (any sequence of numbers: a list, a tuple, a numpy array)."""
    if isinstance(vector, str | bytes):
        raise TypeError("a vector is a sequence of numbers")
    return [float(v) for v in vector]


def _json(value: Mapping[str, Any] | None) -> str:
    return "" if value is None else json.dumps(value, default=str, allow_nan=False)


def _collection(message: vpb.VectorCollection) -> dict[str, Any]:
    document: dict[str, Any] = {
        "name": message.name,
        "dimension": message.dimension,
        "metric": message.metric,
        "properties": dict(message.properties),
    }
    if message.HasField("count"):
        document["count"] = message.count
    return document


def _object(message: vpb.VectorObject) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": message.id,
        "properties": json.loads(message.properties_json or "{}"),
    }
    if len(message.vector):
        document["vector"] = list(message.vector)
    return document


def _hit(message: vpb.VectorHit) -> dict[str, Any]:
    document: dict[str, Any] = {
        "id": message.id,
        "distance": message.distance,
        "certainty": message.certainty if message.HasField("certainty") else None,
        "properties": json.loads(message.properties_json or "{}"),
    }
    if len(message.vector):
        document["vector"] = list(message.vector)
    return document


class VectorMethods:
    """Mixed into ``MultiDatabaseClient`` (which provides the channels and ``_unary``)."""

    if TYPE_CHECKING:
        tenant_id: str
        _channels: list[grpc.aio.Channel]
        _stubs: list[DatabaseServiceStub]

        @property
        def stub(self) -> DatabaseServiceStub: ...

        async def _unary(
            self, call: Callable[..., Any], request: Any, *, retry: bool, timeout: float | None
        ) -> Any: ...

    _vector_stubs: dict[grpc.aio.Channel, VectorServiceStub] | None = None

    @property
    def vector_stub(self) -> VectorServiceStub:
        """The VectorService stub of the next connection (round robin, as ``stub``)."""
        index = self._stubs.index(self.stub)
        channel = self._channels[index]
        stubs = self._vector_stubs
        if stubs is None or any(c not in self._channels for c in stubs):
            stubs = self._vector_stubs = {}  # a closed client opened again: new channels
        stub = stubs.get(channel)
        if stub is None:
            stub = stubs[channel] = VectorServiceStub(channel)
        return stub

    async def _vector_call(
        self, name: str, request: Any, *, retry: bool, timeout: float | None
    ) -> Any:
        return await self._unary(
            getattr(self.vector_stub, name), request, retry=retry, timeout=timeout
        )

    async def vector_create_collection(
        self,
        name: str,
        dimension: int,
        *,
        metric: str = "cosine",
        properties: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A collection (Weaviate's class) of ``dimension``-dimensional vectors with an HNSW
        index for ``metric`` (cosine, l2, dot) and typed ``properties`` (text, int, number, bool,
        date, uuid, text[]). Needs the ``admin`` scope (it is DDL)."""
        request = vpb.CreateCollectionRequest(
            name=name, dimension=dimension, metric=metric, properties=dict(properties or {})
        )
        return _collection(
            await self._vector_call("CreateCollection", request, retry=False, timeout=timeout)
        )

    async def vector_list_collections(
        self, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        response = await self._vector_call(
            "ListCollections", vpb.ListCollectionsRequest(), retry=True, timeout=timeout
        )
        return [_collection(c) for c in response.collections]

    async def vector_get_collection(
        self, name: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """The collection's schema and its object count."""
        request = vpb.CollectionRequest(name=name)
        return _collection(
            await self._vector_call("GetCollection", request, retry=True, timeout=timeout)
        )

    async def vector_drop_collection(self, name: str, *, timeout: float | None = None) -> bool:
        """Drop the collection and its objects; whether it existed."""
        request = vpb.CollectionRequest(name=name)
        response = await self._vector_call("DropCollection", request, retry=False, timeout=timeout)
        return bool(response.dropped)

    async def vector_upsert(
        self,
        collection: str,
        objects: Sequence[Mapping[str, Any]],
        *,
        timeout: float | None = None,
    ) -> int:
        """Insert or replace objects (``{"id": uuid (optional), "vector": [...],
        "properties": {...}}``), at most 10,000 per call, all or none; how many."""
        messages = []
        for obj in objects:
            message = vpb.VectorObject(
                vector=_floats(obj["vector"]), properties_json=_json(obj.get("properties"))
            )
            if obj.get("id") is not None:
                message.id = str(obj["id"])
            messages.append(message)
        request = vpb.UpsertObjectsRequest(collection=collection, objects=messages)
        response = await self._vector_call("UpsertObjects", request, retry=False, timeout=timeout)
        return int(response.upserted)

    async def vector_get(
        self,
        collection: str,
        ids: Sequence[Any],
        *,
        with_vector: bool = False,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """The objects of ``ids`` that exist, in the order asked."""
        request = vpb.GetObjectsRequest(
            collection=collection, ids=[str(i) for i in ids], with_vector=with_vector
        )
        response = await self._vector_call("GetObjects", request, retry=True, timeout=timeout)
        return [_object(o) for o in response.objects]

    async def vector_delete(
        self,
        collection: str,
        *,
        ids: Sequence[Any] | None = None,
        where: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Delete objects by ``ids`` or by a filter ``where`` (one of them); how many."""
        request = vpb.DeleteObjectsRequest(
            collection=collection, ids=[str(i) for i in ids or ()], where_json=_json(where)
        )
        response = await self._vector_call("DeleteObjects", request, retry=False, timeout=timeout)
        return int(response.deleted)

    async def vector_count(
        self,
        collection: str,
        where: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        request = vpb.CountObjectsRequest(collection=collection, where_json=_json(where))
        response = await self._vector_call("CountObjects", request, retry=True, timeout=timeout)
        return int(response.count)

    async def vector_search(
        self,
        collection: str,
        vector: Sequence[float],
        *,
        limit: int = 10,
        certainty: float | None = None,
        distance: float | None = None,
        where: Mapping[str, Any] | None = None,
        with_vector: bool = False,
        tenant_filter: str | None = None,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """The ``limit`` objects nearest ``vector``, nearest first: ``{"id", "distance",
        "certainty" (cosine collections), "properties"}`` — those with at least ``certainty``
        and at most ``distance``, passing the filter ``where``."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit is a positive integer")
        request = vpb.VectorSearchRequest(
            collection=collection,
            vector=_floats(vector),
            limit=limit,
            where_json=_json(where),
            with_vector=with_vector,
        )
        for name, value in (("certainty", certainty), ("distance", distance)):
            if value is not None:
                if not math.isfinite(value):
                    raise ValueError(f"{name} must be finite")
                setattr(request, name, value)
        if tenant_filter is not None:
            request.tenant_filter = tenant_filter
        response = await self._vector_call("Search", request, retry=True, timeout=timeout)
        return [_hit(h) for h in response.hits]

    async def weaviate_query(self, query: Mapping[str, Any]) -> dict[str, Any]:
        """The seed's call, as written: ``{"operation": "similarity_search", "class":
        "TradingPatterns", "vector": [...], "tenant_filter": company_id, "limit": 10,
        "certainty": 0.8}`` (``distance``, ``where`` and ``with_vector`` too). Runs for this
        client's tenant; a ``tenant_filter`` naming another tenant is refused by the service
        (PermissionDenied). Returns ``{"class", "results": [hits as vector_search], "count"}``.
        """
        operation = query.get("operation", "similarity_search")
        if operation != "similarity_search":
            raise ValueError("weaviate_query runs the similarity_search operation")
        extra = set(query) - _SEED_FIELDS
        if extra:
            raise ValueError(f"weaviate_query does not take {', '.join(sorted(extra))}")
        if "class" not in query or "vector" not in query:
            raise ValueError("weaviate_query needs 'class' and 'vector'")
        tenant = query.get("tenant_filter")
        hits = await self.vector_search(
            str(query["class"]),
            query["vector"],
            limit=query.get("limit", 10),
            certainty=query.get("certainty"),
            distance=query.get("distance"),
            where=query.get("where"),
            with_vector=bool(query.get("with_vector", False)),
            tenant_filter=None if tenant is None else str(tenant),
        )
        return {"class": query["class"], "results": hits, "count": len(hits)}
