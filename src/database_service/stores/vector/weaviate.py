"""Vector collections on a Weaviate server by URL (production: ``DBSVC_WEAVIATE_URL``).

Naming and isolation. Weaviate's class names are global to the server, so a tenant's collection
``TradingPatterns`` cannot simply be the class ``TradingPatterns``: tenant B making its own
``TradingPatterns`` with other properties or another dimension would collide with A's (one
shared class per name with a shard per tenant forces one schema on every tenant that uses the
name, and lets one tenant's drop take everyone's data). So each (tenant, collection) is a class
of its own, ``Dbsvc_<tenant key>_<name in lower case>`` (``class_name``), where the tenant key is
a hash of the tenant id: names stay case-insensitive as on pgvector, and a caller's name is
checked (``model.collection_name``) and always prefixed with the *caller's* key, so nothing a
caller sends names another tenant's class. On top of that every class has Weaviate's native
multi-tenancy on, with exactly one Weaviate tenant, the company (its tenant id), created with
the class; every read and write names it. An object of tenant A therefore lives in A's class,
in A's shard, and a request that somehow named B's class would still ask for the Weaviate tenant
A, which B's class does not have (Weaviate refuses it). The service holds the server's API key;
tenants never reach Weaviate themselves.

Why not weaviate-client v4: it requires protobuf < 7, and this service's generated gRPC code is
on protobuf 7 (the two cannot be installed together). This store speaks Weaviate's REST API
(schema, tenants, batches) and GraphQL (near-vector search, filtered gets, counts) over httpx,
the API the client's own schema calls use; a query's text is built here from checked parts
only: names that passed their patterns, enum operators from a fixed table, numbers from floats
and ints, strings JSON-encoded (a JSON string is a GraphQL string literal).

Distances: cosine (Weaviate's ``cosine``, 1 - cosine similarity), l2 (Weaviate's
``l2-squared``, whose square root is reported, so ``distance`` means the same as on pgvector)
and dot (``dot``, the negative inner product). Certainty, for cosine only, is Weaviate's
``1 - distance / 2``. Object ids are the caller's UUIDs: a class holds one tenant's objects of
one collection, so an id is already unique there and an upsert of the same id replaces the same
object (idempotent) without a mapping to keep.

A batch is checked whole before anything is sent (a bad object writes nothing), then sent in
chunks; Weaviate has no transaction across a batch, so a failure inside Weaviate part way (the
server going away) can leave the earlier chunks written: the error says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Histogram

from database_service.auth import Principal
from database_service.errors import (
    DatabaseServiceError,
    FailedPrecondition,
    InvalidRequest,
    Unavailable,
)
from database_service.observability.audit import AuditEvent, AuditLog
from database_service.query import TenantContext
from database_service.stores.vector.filters import weaviate_filter
from database_service.stores.vector.model import (
    MAX_BATCH,
    CollectionExists,
    CollectionInfo,
    CollectionNotFound,
    Hit,
    Metric,
    PropertyType,
    SearchQuery,
    VectorObject,
    check_vector,
    collection_name,
    json_value,
    object_id,
    object_row,
)
from database_service.tenancy import TenantRegistry

__all__ = ["WeaviateError", "WeaviateUnavailable", "WeaviateVectorStore", "class_name"]

log = logging.getLogger(__name__)

_MARKER = "dbsvc.vector"
_PREFIX = "Dbsvc_"
_DISTANCE = {Metric.COSINE: "cosine", Metric.L2: "l2-squared", Metric.DOT: "dot"}
_METRIC_OF = {v: k for k, v in _DISTANCE.items()}
_DATA_TYPE = {
    PropertyType.TEXT: "text",
    PropertyType.INT: "int",
    PropertyType.NUMBER: "number",
    PropertyType.BOOL: "boolean",
    PropertyType.DATE: "date",
    PropertyType.UUID: "uuid",
    PropertyType.TEXT_ARRAY: "text[]",
}
_PROPERTY_OF = {v: k for k, v in _DATA_TYPE.items()}
_CHUNK = 500  # objects per batch request (a 10,000-object batch of 2,000 floats is ~200 MB)
_INFO_SECONDS = 5.0
# Weaviate's HNSW: ef -1 is its dynamic ef (max(dynamicEfMin 100, 8·limit), at most 500).
_HNSW = {"ef": -1, "efConstruction": 128, "maxConnections": 32}


class WeaviateUnavailable(Unavailable):
    """The Weaviate server did not answer (down, restarting, unreachable): 503, try again."""

    code = "vector_store_unavailable"


class WeaviateError(FailedPrecondition):
    """Weaviate refused a request the service made (not the caller's input, which is checked
    before): its message, bounded."""

    code = "vector_store_error"


def tenant_key(tenant_id: str) -> str:
    """The tenant's part of its class names: not the id itself, so that class names leak no
    tenant id to whoever lists the server's schema, and have a fixed length."""
    return hashlib.sha256(b"dbsvc-weaviate\x00" + tenant_id.encode()).hexdigest()[:20]


def class_name(tenant_id: str, collection: str) -> str:
    """The Weaviate class of a tenant's collection (names case-insensitive, as on pgvector)."""
    return f"{_PREFIX}{tenant_key(tenant_id)}_{collection_name(collection).lower()}"


def _gql(value: Any) -> str:
    """A GraphQL literal: JSON strings, numbers, booleans; objects with bare keys; lists."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidRequest("numbers must be finite")
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_gql(v) for v in value) + "]"
    raise TypeError(f"no GraphQL literal for {type(value).__name__}")


def _gql_filter(node: Mapping[str, Any]) -> str:
    """Weaviate's filter object (``filters.weaviate_filter``'s output) in GraphQL: the operator
    an enum, every other value a literal."""
    parts = []
    for key, value in node.items():
        if key == "operator":
            parts.append(f"operator: {value}")  # from the fixed tables in filters.py
        elif key == "operands":
            parts.append("operands: [" + ", ".join(_gql_filter(o) for o in value) + "]")
        elif key == "valueTextArray":  # REST's name; GraphQL's valueText takes a list
            parts.append(f"valueText: {_gql(value)}")
        else:
            parts.append(f"{key}: {_gql(value)}")
    return "{" + ", ".join(parts) + "}"


def _from_weaviate(kind: PropertyType, value: Any) -> Any:
    """A property value as Weaviate returns it, as the Python value pgvector returns."""
    if value is None:
        return None
    if kind is PropertyType.INT:
        return int(value)
    if kind is PropertyType.NUMBER:
        return float(value)
    if kind is PropertyType.DATE:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if kind is PropertyType.UUID:
        return uuid.UUID(str(value))
    if kind is PropertyType.TEXT_ARRAY:
        return list(value)
    return value


def _to_weaviate(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


class WeaviateVectorStore:
    kind = "weaviate"

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None,
        registry: TenantRegistry,
        audit: AuditLog,
        timeout_seconds: float = 10.0,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        # Every round trip to Weaviate, by what it was and how it ended: an operator sees the
        # server going away (unavailable) or refusing the service's requests (refused) apart
        # from the callers' own mistakes (those never reach it).
        self._requests = Counter(
            "dbsvc_weaviate_requests",
            "Requests the service made to Weaviate, by endpoint and outcome"
            " (ok, refused, unauthorized, unavailable).",
            ["endpoint", "outcome"],
            registry=metrics_registry,
        )
        self._seconds = Histogram(
            "dbsvc_weaviate_request_duration_seconds",
            "Round trips to Weaviate, by endpoint.",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=metrics_registry,
        )
        self._api_key = api_key
        self._registry = registry
        self._audit = audit
        self._timeout = timeout_seconds
        self._http: httpx.AsyncClient | None = None
        self._infos: dict[str, tuple[CollectionInfo, float]] = {}
        self.version: str | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=self._timeout, trust_env=False
        )
        try:
            meta = await self._request("GET", "/v1/meta")
            self.version = meta.get("version")
        except DatabaseServiceError as exc:
            # Not fatal: the service starts, health says unhealthy, requests get a 503 until the
            # server answers.
            log.warning("Weaviate at %s: %s", _without_credentials(self.url), exc.message)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # --- the wire ---------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        missing_ok: bool = False,
    ) -> Any:
        if self._http is None:
            raise WeaviateUnavailable("the Weaviate store is not started")
        endpoint = _endpoint(method, path)
        started = time.perf_counter()
        try:
            response = await self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            self._requests.labels(endpoint, "unavailable").inc()
            # The message reaches callers: no host, port or credentials of the server in it.
            raise WeaviateUnavailable(
                f"the vector store (Weaviate) did not answer ({type(exc).__name__}); try again"
            ) from None
        self._seconds.labels(endpoint).observe(time.perf_counter() - started)
        if response.status_code == 404 and missing_ok:
            self._requests.labels(endpoint, "ok").inc()
            return None
        if response.status_code >= 500:
            self._requests.labels(endpoint, "unavailable").inc()
            log.warning("Weaviate: %s %s: %s", endpoint, response.status_code, response.text[:500])
            raise WeaviateUnavailable(
                f"the vector store (Weaviate) answered {response.status_code}; try again"
            )
        if response.status_code in (401, 403):
            # The service's key, not the caller's request: a store it cannot use (503), which
            # health reports too.
            self._requests.labels(endpoint, "unauthorized").inc()
            log.error("Weaviate refused the service's API key: %s", _message(response))
            raise WeaviateUnavailable(
                "the vector store (Weaviate) refused the service's credentials (an operator must"
                " fix DBSVC_WEAVIATE_API_KEY)"
            )
        if response.status_code >= 400:
            self._requests.labels(endpoint, "refused").inc()
            raise WeaviateError(f"Weaviate refused ({response.status_code}): {_message(response)}")
        self._requests.labels(endpoint, "ok").inc()
        if not response.content:
            return None
        return response.json()

    async def _graphql(self, query: str) -> dict[str, Any]:
        answer = await self._request("POST", "/v1/graphql", body={"query": query})
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if errors:
            text = "; ".join(str(e.get("message", e)) for e in errors)[:300]
            if "Cannot query field" in text or "could not find class" in text:
                self._infos.clear()
                raise CollectionNotFound("no such collection")
            raise WeaviateError(f"Weaviate refused the query: {text}")
        data: dict[str, Any] = answer.get("data") or {}
        return data

    # --- audit ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _op(
        self, principal: Principal, ctx: TenantContext, action: str, kind: str
    ) -> AsyncIterator[list[str]]:
        """One operation for the caller's tenant (active, or refused): audited as
        ``vector.<action>`` however it ends; yields a one-item list for its detail."""
        detail = [""]
        outcome, code = "ok", action
        try:
            await self._registry.get_active(ctx.tenant_id)
            yield detail
        except InvalidRequest as exc:
            outcome, code = "denied", exc.error_code
            raise
        except DatabaseServiceError as exc:
            outcome, code = "error", exc.error_code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome, code = "cancelled", "cancelled"
            raise
        finally:
            event = AuditEvent(
                service=principal.service,
                tenant_id=ctx.tenant_id,
                action=f"vector.{action}",
                statement_class=kind,
                outcome=outcome,
                code=code,
                detail=detail[0] or None,
            )
            await asyncio.shield(self._audit.record(event))

    # --- the schema -------------------------------------------------------------------------

    async def _info(self, tenant_id: str, name: str, *, fresh: bool = False) -> CollectionInfo:
        cls = class_name(tenant_id, name)
        kept = self._infos.get(cls)
        if kept is not None and not fresh and kept[1] > time.monotonic():
            return kept[0]
        schema = await self._request("GET", f"/v1/schema/{cls}", missing_ok=True)
        info = _info_of(schema, tenant_id) if schema else None
        if info is None:
            self._infos.pop(cls, None)
            raise CollectionNotFound(f"collection {name!r} does not exist")
        self._infos[cls] = (info, time.monotonic() + _INFO_SECONDS)
        return info

    async def create_collection(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        dimension: int,
        metric: Metric,
        properties: Mapping[str, PropertyType],
    ) -> CollectionInfo:
        name = collection_name(name)
        async with self._op(principal, ctx, "create_collection", "ddl") as detail:
            detail[0] = name
            await self._create_class(ctx.tenant_id, name, dimension, metric, properties)
        return CollectionInfo(name, dimension, metric, dict(properties), 0)

    async def _create_class(
        self,
        tenant_id: str,
        name: str,
        dimension: int,
        metric: Metric,
        properties: Mapping[str, PropertyType],
    ) -> None:
        """The tenant's collection as a Weaviate class with the tenant as its only Weaviate
        tenant; CollectionExists when it is there."""
        cls = class_name(tenant_id, name)
        if await self._request("GET", f"/v1/schema/{cls}", missing_ok=True):
            raise CollectionExists(f"collection {name!r} exists")
        description = json.dumps(
            {
                "marker": _MARKER,
                "name": name,
                "tenant": tenant_id,
                "dimension": int(dimension),
                "metric": metric.value,
            }
        )
        body = {
            "class": cls,
            "description": description,
            "vectorizer": "none",
            "vectorIndexType": "hnsw",
            "vectorIndexConfig": {"distance": _DISTANCE[metric], **_HNSW},
            # IsNull filters, and NotEqual meaning SQL's (nulls excluded), need null state.
            "invertedIndexConfig": {"indexNullState": True},
            "multiTenancyConfig": {
                "enabled": True,
                "autoTenantCreation": False,
                "autoTenantActivation": True,
            },
            "properties": [
                {
                    "name": p,
                    "dataType": [_DATA_TYPE[k]],
                    # The whole value is the token: Equal and Like compare whole strings,
                    # case-sensitively, as SQL does (Weaviate's default splits words).
                    **(
                        {"tokenization": "field", "indexSearchable": False}
                        if k in (PropertyType.TEXT, PropertyType.TEXT_ARRAY)
                        else {}
                    ),
                    "indexFilterable": True,
                }
                for p, k in properties.items()
            ],
        }
        try:
            await self._request("POST", "/v1/schema", body=body)
        except WeaviateError as exc:
            if "already exists" in exc.message:
                raise CollectionExists(f"collection {name!r} exists") from None
            raise
        try:
            await self._request("POST", f"/v1/schema/{cls}/tenants", body=[{"name": tenant_id}])
        except DatabaseServiceError:
            # A class without its tenant is of no use: do not leave it behind.
            with contextlib.suppress(DatabaseServiceError):
                await self._request("DELETE", f"/v1/schema/{cls}")
            raise
        self._infos.pop(cls, None)

    async def list_collections(
        self, principal: Principal, ctx: TenantContext
    ) -> list[CollectionInfo]:
        async with self._op(principal, ctx, "list_collections", "read") as detail:
            infos = await self.tenant_collections(ctx.tenant_id)
            detail[0] = f"{len(infos)} collections"
        return infos

    async def get_collection(
        self, principal: Principal, ctx: TenantContext, name: str
    ) -> CollectionInfo:
        name = collection_name(name)
        async with self._op(principal, ctx, "get_collection", "read") as detail:
            detail[0] = name
            info = await self._info(ctx.tenant_id, name, fresh=True)
            count = await self._count(ctx.tenant_id, info, None)
        return CollectionInfo(info.name, info.dimension, info.metric, info.properties, count)

    async def drop_collection(self, principal: Principal, ctx: TenantContext, name: str) -> bool:
        name = collection_name(name)
        async with self._op(principal, ctx, "drop_collection", "ddl") as detail:
            detail[0] = name
            try:
                await self._info(ctx.tenant_id, name, fresh=True)
            except CollectionNotFound:
                return False
            cls = class_name(ctx.tenant_id, name)
            await self._request("DELETE", f"/v1/schema/{cls}")
            self._infos.pop(cls, None)
        return True

    async def drop_tenant(self, tenant_id: str) -> int:
        """Drop every collection of a tenant (its deletion); how many there were."""
        prefix = f"{_PREFIX}{tenant_key(tenant_id)}_"
        schema = await self._request("GET", "/v1/schema")
        dropped = 0
        for c in (schema or {}).get("classes") or []:
            cls = str(c.get("class", ""))
            if cls.startswith(prefix) and _info_of(c, tenant_id) is not None:
                await self._request("DELETE", f"/v1/schema/{cls}")
                self._infos.pop(cls, None)
                dropped += 1
        return dropped

    # --- tenant backups ----------------------------------------------------------------------
    # No caller here: the backup use case (``application.tenant_backups``) has authorized the
    # export or restore of the whole tenant and audits it as one operation.

    async def tenant_collections(self, tenant_id: str) -> list[CollectionInfo]:
        """Every collection of the tenant, by name."""
        prefix = f"{_PREFIX}{tenant_key(tenant_id)}_"
        schema = await self._request("GET", "/v1/schema")
        infos = [
            info
            for c in (schema or {}).get("classes") or []
            if str(c.get("class", "")).startswith(prefix)
            and (info := _info_of(c, tenant_id)) is not None
        ]
        return sorted(infos, key=lambda i: i.name.lower())

    async def export_objects(
        self, tenant_id: str, info: CollectionInfo, *, page: int = 500
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The collection's objects, ``page`` at a time, as ``upsert`` takes them (id, vector,
        properties as JSON carries them), in id order by Weaviate's cursor (``after``): each
        page is a request of its own, so a collection of any size is read in bounded memory.
        Weaviate has no snapshots: objects written meanwhile may or may not be included."""
        cls = class_name(tenant_id, info.name)
        after: str | None = None
        while True:
            params = {"class": cls, "tenant": tenant_id, "limit": str(page), "include": "vector"}
            if after is not None:
                params["after"] = after
            answer = await self._request("GET", "/v1/objects", params=params)
            items = (answer or {}).get("objects") or []
            if not items:
                return
            yield [
                {
                    "id": str(item["id"]),
                    "vector": [float(v) for v in item.get("vector") or []],
                    "properties": {
                        p: json_value(_from_weaviate(k, value))
                        for p, k in info.properties.items()
                        if (value := (item.get("properties") or {}).get(p)) is not None
                    },
                }
                for item in items
            ]
            after = str(items[-1]["id"])

    async def restore_collection(self, tenant_id: str, info: CollectionInfo) -> None:
        """The collection as the backup describes it (CollectionExists when it is there)."""
        await self._create_class(
            tenant_id, collection_name(info.name), info.dimension, info.metric, info.properties
        )

    async def restore_objects(
        self, tenant_id: str, info: CollectionInfo, objects: Sequence[Mapping[str, Any]]
    ) -> int:
        """Objects of a backup, checked against the collection as any write is."""
        return await self._write(tenant_id, collection_name(info.name), info, objects)

    # --- objects ----------------------------------------------------------------------------

    async def upsert(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        objects: Sequence[Mapping[str, Any]],
    ) -> int:
        name = collection_name(name)
        if not objects:
            raise InvalidRequest("no objects to write")
        if len(objects) > MAX_BATCH:
            raise InvalidRequest(f"at most {MAX_BATCH} objects per batch")
        async with self._op(principal, ctx, "upsert", "write") as detail:
            detail[0] = f"{name}: {len(objects)} objects"
            info = await self._info(ctx.tenant_id, name)
            return await self._write(ctx.tenant_id, name, info, objects)

    async def _write(
        self,
        tenant_id: str,
        name: str,
        info: CollectionInfo,
        objects: Sequence[Mapping[str, Any]],
    ) -> int:
        """``objects`` checked against the collection and written in batches."""
        names = list(info.properties)
        rows = [object_row(info, names, o, n) for n, o in enumerate(objects, start=1)]
        if len({r[0] for r in rows}) != len(rows):
            raise InvalidRequest("an object id appears twice in the batch")
        cls = class_name(tenant_id, name)
        written = 0
        for start in range(0, len(rows), _CHUNK):
            chunk = rows[start : start + _CHUNK]
            body = {
                "objects": [
                    {
                        "class": cls,
                        "tenant": tenant_id,
                        "id": str(r[0]),
                        "vector": r[1],
                        "properties": {
                            p: _to_weaviate(v)
                            for p, v in zip(names, r[2:], strict=True)
                            if v is not None
                        },
                    }
                    for r in chunk
                ]
            }
            try:
                answer = await self._request(
                    "POST", "/v1/batch/objects", body=body, params={"consistency_level": "ALL"}
                )
            except DatabaseServiceError as exc:
                if written:
                    exc.message += f" ({written} of {len(rows)} objects were written)"
                raise
            failed = [o for o in answer or [] if ((o.get("result") or {}).get("errors") or {})]
            if failed:
                error = (failed[0]["result"]["errors"].get("error") or [{}])[0]
                done = written + len(chunk) - len(failed)
                if not done:
                    await self._gone(cls, tenant_id, name)  # raises if it is
                raise WeaviateError(
                    f"Weaviate refused {len(failed)} objects ({done} of {len(rows)}"
                    f" written): {str(error.get('message', error))[:200]}"
                )
            written += len(chunk)
        return written

    async def _gone(self, cls: str, tenant_id: str, name: str) -> None:
        """After a write Weaviate refused: CollectionNotFound if the collection is no more
        (dropped by another instance since this one read its schema). A server with
        auto-schema on (``AUTOSCHEMA_ENABLED``, its default) makes a class of its own for a
        batch that names a missing one; such a class, in this tenant's namespace and not one
        of its collections, is dropped again."""
        self._infos.pop(cls, None)
        schema = await self._request("GET", f"/v1/schema/{cls}", missing_ok=True)
        if schema and _info_of(schema, tenant_id) is not None:
            return  # still there: the refusal was something else
        if schema:
            log.warning("Weaviate made class %s by auto-schema: dropped again", cls)
            await self._request("DELETE", f"/v1/schema/{cls}")
        raise CollectionNotFound(f"collection {name!r} does not exist")

    def _fields(self, info: CollectionInfo, extra: str) -> str:
        return " ".join([*info.properties, f"_additional {{ id {extra} }}"])

    def _object_of(self, info: CollectionInfo, item: Mapping[str, Any]) -> dict[str, Any]:
        return {p: _from_weaviate(k, item.get(p)) for p, k in info.properties.items()}

    async def get_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        ids: Sequence[uuid.UUID],
        *,
        with_vector: bool,
    ) -> list[VectorObject]:
        name = collection_name(name)
        if not ids or len(ids) > MAX_BATCH:
            raise InvalidRequest(f"1 to {MAX_BATCH} ids")
        wanted = list(dict.fromkeys(object_id(i) for i in ids))
        async with self._op(principal, ctx, "get", "read") as detail:
            info = await self._info(ctx.tenant_id, name)
            cls = class_name(ctx.tenant_id, name)
            where = {
                "path": ["id"],
                "operator": "ContainsAny",
                "valueTextArray": [str(i) for i in wanted],
            }
            fields = self._fields(info, "vector" if with_vector else "")
            data = await self._graphql(
                f"{{ Get {{ {cls}(tenant: {_gql(ctx.tenant_id)}, where: {_gql_filter(where)},"
                f" limit: {len(wanted)}) {{ {fields} }} }} }}"
            )
            items = (data.get("Get") or {}).get(cls) or []
            detail[0] = f"{name}: {len(items)} objects"
        found = {}
        for item in items:
            extra = item.get("_additional") or {}
            oid = uuid.UUID(extra["id"])
            vector = [float(v) for v in extra["vector"]] if with_vector else None
            found[oid] = VectorObject(oid, vector, self._object_of(info, item))
        return [found[i] for i in wanted if i in found]

    async def delete_objects(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        *,
        ids: Sequence[uuid.UUID] | None,
        where: Mapping[str, Any] | None,
    ) -> int:
        name = collection_name(name)
        if (ids is None) == (where is None):
            raise InvalidRequest("delete takes ids or a filter (where), one of them")
        if ids is not None and not 1 <= len(ids) <= MAX_BATCH:
            raise InvalidRequest(f"1 to {MAX_BATCH} ids")
        async with self._op(principal, ctx, "delete", "write") as detail:
            info = await self._info(ctx.tenant_id, name)
            if ids is not None:
                match: dict[str, Any] = {
                    "path": ["id"],
                    "operator": "ContainsAny",
                    "valueTextArray": [str(object_id(i)) for i in ids],
                }
            else:
                assert where is not None
                match = weaviate_filter(where, info.properties)
            cls = class_name(ctx.tenant_id, name)
            deleted = 0
            while True:
                answer = await self._request(
                    "DELETE",
                    "/v1/batch/objects",
                    body={"match": {"class": cls, "where": match}, "output": "minimal"},
                    params={"tenant": ctx.tenant_id, "consistency_level": "ALL"},
                )
                results = (answer or {}).get("results") or {}
                if results.get("failed"):
                    raise WeaviateError(
                        f"Weaviate failed to delete {results['failed']} of"
                        f" {results.get('matches')} objects ({deleted} deleted before)"
                    )
                done = int(results.get("successful") or 0)
                deleted += done
                # One call deletes at most the server's QUERY_MAXIMUM_RESULTS (its "limit"):
                # a filter matching more is deleted in rounds.
                limit = int(results.get("limit") or 0)
                if not done or not limit or int(results.get("matches") or 0) < limit:
                    break
            detail[0] = f"{name}: {deleted} deleted"
        return deleted

    async def _count(
        self, tenant_id: str, info: CollectionInfo, where: Mapping[str, Any] | None
    ) -> int:
        cls = class_name(tenant_id, info.name)
        condition = (
            f", where: {_gql_filter(weaviate_filter(where, info.properties))}" if where else ""
        )
        data = await self._graphql(
            f"{{ Aggregate {{ {cls}(tenant: {_gql(tenant_id)}{condition})"
            " { meta { count } } } }"
        )
        rows = (data.get("Aggregate") or {}).get(cls) or [{}]
        return int(((rows[0] or {}).get("meta") or {}).get("count") or 0)

    async def count(
        self,
        principal: Principal,
        ctx: TenantContext,
        name: str,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        name = collection_name(name)
        async with self._op(principal, ctx, "count", "read") as detail:
            info = await self._info(ctx.tenant_id, name)
            counted = await self._count(ctx.tenant_id, info, where)
            detail[0] = f"{name}: {counted}"
        return counted

    # --- search -----------------------------------------------------------------------------

    async def search(
        self, principal: Principal, ctx: TenantContext, name: str, query: SearchQuery
    ) -> list[Hit]:
        name = collection_name(name)
        async with self._op(principal, ctx, "search", "read") as detail:
            info = await self._info(ctx.tenant_id, name)
            vector = check_vector(query.vector, info.dimension)
            near = f"vector: {_gql(vector)}"
            bound = _max_distance(info.metric, query)
            if bound is not None and bound < 0 and info.metric is not Metric.DOT:
                return []  # no cosine or L2 distance is negative: nothing is that near
            if bound is not None:
                # Weaviate reads a distance of 0 as none given: ask for a hair more, and keep
                # only what is within the bound itself below.
                near += f", distance: {_gql(float(bound) if bound != 0 else 1e-9)}"
            condition = ""
            if query.where:
                condition = f", where: {_gql_filter(weaviate_filter(query.where, info.properties))}"
            cls = class_name(ctx.tenant_id, name)
            fields = self._fields(info, "distance vector" if query.with_vector else "distance")
            data = await self._graphql(
                f"{{ Get {{ {cls}(tenant: {_gql(ctx.tenant_id)}, nearVector: {{ {near} }}"
                f"{condition}, limit: {int(query.limit)}) {{ {fields} }} }} }}"
            )
            items = (data.get("Get") or {}).get(cls) or []
            detail[0] = f"{name}: {len(items)} hits"
        hits = []
        for item in items:
            extra = item.get("_additional") or {}
            if bound == 0 and float(extra["distance"]) > 0:
                continue
            distance = _our_distance(info.metric, float(extra["distance"]))
            hits.append(
                Hit(
                    uuid.UUID(extra["id"]),
                    distance,
                    1.0 - distance / 2.0 if info.metric is Metric.COSINE else None,
                    self._object_of(info, item),
                    [float(v) for v in extra["vector"]] if query.with_vector else None,
                )
            )
        hits.sort(key=lambda h: h.distance)
        return hits

    # --- health -----------------------------------------------------------------------------

    async def check(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "implementation": "weaviate",
            "embedded": False,
            "url": _without_credentials(self.url),
        }
        started = time.perf_counter()
        try:
            async with asyncio.timeout(3):
                await self._request("GET", "/v1/.well-known/ready")
                latency = (time.perf_counter() - started) * 1000
                meta = await self._request("GET", "/v1/meta")
                schema = await self._request("GET", "/v1/schema")
        except (DatabaseServiceError, TimeoutError) as exc:
            message = exc.message if isinstance(exc, DatabaseServiceError) else "timed out (3 s)"
            return {"status": "unhealthy", **details, "ready": False, "error": message}
        self.version = meta.get("version")
        ours = [
            c
            for c in (schema or {}).get("classes") or []
            if str(c.get("class", "")).startswith(_PREFIX)
        ]
        tenants = set()
        for c in ours:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                tenants.add(json.loads(c.get("description") or "{}").get("tenant"))
        return {
            "status": "healthy",
            **details,
            "ready": True,
            "version": self.version,
            "latency_ms": round(latency, 2),
            "multi_tenancy": "native (a class per tenant collection, one Weaviate tenant each)",
            "collections": len(ours),
            "tenants_with_collections": len(tenants - {None}),
        }


def _endpoint(method: str, path: str) -> str:
    """A bounded label: the path without class names (``/v1/schema/{class}/tenants``)."""
    parts = path.strip("/").split("/")
    if len(parts) >= 3 and parts[1] == "schema":
        parts[2] = "{class}"
    return f"{method} /{'/'.join(parts)}"


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    errors = body.get("error") if isinstance(body, dict) else None
    if isinstance(errors, list):
        return "; ".join(str(e.get("message", e)) for e in errors)[:300]
    return str(body)[:300]


def _without_credentials(url: str) -> str:
    parts = httpx.URL(url)
    return str(parts.copy_with(username=None, password=None)) if parts.userinfo else url


def _max_distance(metric: Metric, query: SearchQuery) -> float | None:
    """The largest distance in Weaviate's terms (l2: squared) within certainty and distance."""
    bounds = []
    if query.certainty is not None:
        if metric is not Metric.COSINE:
            raise InvalidRequest("certainty applies to cosine collections; give a distance")
        bounds.append(2.0 * (1.0 - query.certainty))
    if query.distance is not None:
        bounds.append(query.distance)
    if not bounds:
        return None
    bound = min(bounds)
    if metric is Metric.L2:
        return bound * bound if bound >= 0 else bound
    return bound


def _our_distance(metric: Metric, distance: float) -> float:
    return math.sqrt(max(distance, 0.0)) if metric is Metric.L2 else distance


def _info_of(schema: Mapping[str, Any], tenant_id: str) -> CollectionInfo | None:
    """A collection from its class; None for a class that is not one of this tenant's."""
    try:
        meta = json.loads(schema.get("description") or "")
        if meta.get("marker") != _MARKER or meta.get("tenant") != tenant_id:
            return None
        name = collection_name(meta["name"])
        if schema.get("class") != class_name(tenant_id, name):
            return None
        metric = Metric(meta["metric"])
        dimension = int(meta["dimension"])
        properties = {
            p["name"]: _PROPERTY_OF[p["dataType"][0]] for p in schema.get("properties") or []
        }
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, InvalidRequest):
        return None
    return CollectionInfo(name, dimension, metric, properties)
