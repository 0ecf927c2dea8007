"""Tenant A against tenant B's vector collections, through gRPC ``VectorService`` and REST
``/api/v1/vector/...``, on both stores (``[pgvector]``: tables in the tenants' schemas;
``[weaviate]``: a class per tenant collection on a real Weaviate server, one Weaviate tenant each).

B holds a collection ``Secrets`` whose objects carry the secret in their properties. A (read,
write and admin over itself) names B's collection every way it can — plainly, qualified with
B's schema, with quotes, dots and comment markers, as B's table name — sends filters that try
SQL, asks for B's objects by their ids, names B in ``tenant_filter`` and in the tenant header,
and writes as a read-only service. A never sees B's secret, never changes B's objects, and is
refused with a stable code (never a server error); a direct login as A's own role cannot read
B's table either (PostgreSQL's privileges, not the service's checks, are the boundary). On
Weaviate, B's objects are read back from B's class and shard directly after every attack, and
A naming B's Weaviate class as a collection reaches only a class of A's own.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.stores.vector.pgvector import table_name
from database_service.stores.vector.weaviate import class_name
from database_service.tenancy import quote_ident
from database_service_client._proto import vector_pb2 as vpb
from database_service_client._proto.vector_pb2_grpc import VectorServiceStub
from tests.fix_weaviate import Stack, WeaviateTarget, store_stack
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.usefixtures("unchanged_victim")]
STORES = [
    pytest.param("pgvector", marks=pytest.mark.pgvector),
    pytest.param("weaviate", marks=pytest.mark.weaviate),
]

FRONT_ENDS = ("grpc", "rest")
_SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "500"}
DIM = 4


@dataclass
class Outcome:
    ok: bool
    status: str = "OK"
    code: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def server_error(self) -> bool:
        return self.status in _SERVER_ERRORS or (
            self.status.startswith("5") and self.status != "503"
        )


@dataclass
class Victim:
    principal: Principal
    ctx: TenantContext
    ids: list[str]
    table: str  # pgvector: B's table; weaviate: B's class
    store: str
    core: Application
    weaviate: WeaviateTarget | None = None


class VectorDoor:
    """Tenant A's door to the vector API through one front end (raw requests: any name, any
    tenant, any token)."""

    def __init__(
        self, name: str, *, http: httpx.AsyncClient, grpc_target: str, tenant_id: str, token: str
    ) -> None:
        self.name = name
        self.tenant_id = tenant_id
        self.token = token
        self._http = http
        self._target = grpc_target
        self._channel: grpc.aio.Channel | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def call(
        self,
        operation: str,
        collection: str = "",
        *,
        tenant_id: str | None = None,
        token: str | None = None,
        **fields: Any,
    ) -> Outcome:
        tenant_id = tenant_id or self.tenant_id
        token = token or self.token
        if self.name == "rest":
            outcome = await self._rest(operation, collection, tenant_id, token, fields)
        else:
            outcome = await self._grpc(operation, collection, tenant_id, token, fields)
        assert SECRET not in repr(outcome), f"victim data leaked through {self.name}: {outcome}"
        assert not outcome.server_error, f"{self.name}: a server error: {outcome}"
        return outcome

    async def _rest(
        self, operation: str, name: str, tenant_id: str, token: str, fields: dict[str, Any]
    ) -> Outcome:
        headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id}
        base = "/api/v1/vector/collections"
        path = f"{base}/{name}"
        requests: dict[str, tuple[str, str, Any]] = {
            "create": ("POST", base, {"name": name, "dimension": DIM, **fields}),
            "list": ("GET", base, None),
            "get_collection": ("GET", path, None),
            "drop": ("DELETE", path, None),
            "upsert": ("POST", f"{path}/objects", fields),
            "get": ("POST", f"{path}/objects/get", fields),
            "delete": ("POST", f"{path}/objects/delete", fields),
            "count": ("POST", f"{path}/count", fields),
            "search": ("POST", f"{path}/search", fields),
        }
        method, url, body = requests[operation]
        response = await self._http.request(method, url, headers=headers, json=body)
        status = str(response.status_code)
        document = response.json()
        if response.status_code >= 300:
            return Outcome(False, status, document.get("error", {}).get("code"))
        return Outcome(True, status, data=document)

    async def _grpc(
        self, operation: str, name: str, tenant_id: str, token: str, fields: dict[str, Any]
    ) -> Outcome:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._target)
        stub = VectorServiceStub(self._channel)
        where = json.dumps(fields["where"]) if "where" in fields else ""
        objects = [
            vpb.VectorObject(
                id=o.get("id", ""),
                vector=o["vector"],
                properties_json=json.dumps(o.get("properties", {})),
            )
            for o in fields.get("objects", [])
        ]
        calls: dict[str, tuple[Any, Any]] = {
            "create": (
                stub.CreateCollection,
                vpb.CreateCollectionRequest(
                    name=name, dimension=DIM, properties=fields.get("properties", {})
                ),
            ),
            "list": (stub.ListCollections, vpb.ListCollectionsRequest()),
            "get_collection": (stub.GetCollection, vpb.CollectionRequest(name=name)),
            "drop": (stub.DropCollection, vpb.CollectionRequest(name=name)),
            "upsert": (
                stub.UpsertObjects,
                vpb.UpsertObjectsRequest(collection=name, objects=objects),
            ),
            "get": (
                stub.GetObjects,
                vpb.GetObjectsRequest(collection=name, ids=fields.get("ids", [])),
            ),
            "delete": (
                stub.DeleteObjects,
                vpb.DeleteObjectsRequest(
                    collection=name, ids=fields.get("ids") or [], where_json=where
                ),
            ),
            "count": (
                stub.CountObjects,
                vpb.CountObjectsRequest(collection=name, where_json=where),
            ),
            "search": (
                stub.Search,
                vpb.VectorSearchRequest(
                    collection=name,
                    vector=fields.get("vector", []),
                    limit=fields.get("limit", 10),
                    where_json=where,
                    tenant_filter=fields.get("tenant_filter"),
                ),
            ),
        }
        method, request = calls[operation]
        metadata = (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id))
        try:
            response = await method(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            code = dict(exc.trailing_metadata() or ()).get("dbsvc-error-code")
            return Outcome(False, exc.code().name, code if isinstance(code, str) else None)
        return Outcome(True, data=_grpc_document(response))


def _grpc_document(response: Any) -> dict[str, Any]:
    """The gRPC answer in the REST answer's shape, for assertions written once."""
    if isinstance(response, vpb.ListCollectionsResponse):
        return {"collections": [{"name": c.name} for c in response.collections]}
    if isinstance(response, vpb.GetObjectsResponse):
        return {
            "objects": [
                {"id": o.id, "properties": json.loads(o.properties_json)} for o in response.objects
            ]
        }
    if isinstance(response, vpb.VectorSearchResponse):
        results = [{"id": h.id, "properties": json.loads(h.properties_json)} for h in response.hits]
        return {"results": results, "count": len(results)}
    if isinstance(response, vpb.DeleteObjectsResponse):
        return {"deleted": response.deleted}
    if isinstance(response, vpb.CountObjectsResponse):
        return {"count": response.count}
    if isinstance(response, vpb.UpsertObjectsResponse):
        return {"upserted": response.upserted}
    if isinstance(response, vpb.DropCollectionResponse):
        return {"dropped": response.dropped}
    return {"name": response.name}


def _victim_objects() -> list[dict[str, Any]]:
    return [
        {
            "id": str(uuid.uuid4()),
            "vector": [1.0, float(i), 0.5, -1.0],
            "properties": {"note": f"{SECRET}-{i}", "level": i},
        }
        for i in range(5)
    ]


@pytest.fixture(scope="module", params=STORES)
def vstack(request: pytest.FixtureRequest) -> Stack:
    return store_stack(request)


@pytest.fixture(scope="module")
async def victim(request: pytest.FixtureRequest, vstack: Stack, tenants: Tenants) -> Victim:
    """B's collection Secrets, its objects carrying the secret."""
    core = vstack.core
    b = tenants.b.tenant_id
    principal = Principal(service="victim-vec", tenants=frozenset({b}), scopes=frozenset(Scope))
    ctx = TenantContext(b)
    await core.vectors.create_collection(
        principal, ctx, "Secrets", DIM, "cosine", {"note": "text", "level": "int"}
    )
    objects = _victim_objects()
    await core.vectors.upsert(principal, ctx, "Secrets", objects)
    ids = [o["id"] for o in objects]
    if vstack.store == "weaviate":
        target = request.getfixturevalue("weaviate_target")
        return Victim(principal, ctx, ids, class_name(b, "Secrets"), "weaviate", core, target)
    table = f"{quote_ident(tenants.b.schema_name)}.{quote_ident(table_name('Secrets'))}"
    return Victim(principal, ctx, ids, table, "pgvector", core)


async def _victim_rows(victim: Victim) -> list[tuple[Any, ...]]:
    """B's objects as its store holds them, read around the service."""
    if victim.weaviate is None:
        rows = await victim.core.owner_pool.fetch(
            f"SELECT id, vector::text, note, level FROM {victim.table} ORDER BY id"
        )
        return [tuple(r) for r in rows]
    target = victim.weaviate
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    query = (
        f'{{ Get {{ {victim.table}(tenant: "{victim.ctx.tenant_id}", limit: 100)'
        " { note level _additional { id vector } } } }"
    )
    async with httpx.AsyncClient(base_url=target.url, headers=headers, trust_env=False) as raw:
        answer = (await raw.post("/v1/graphql", json={"query": query})).json()
        schema = (await raw.get(f"/v1/schema/{victim.table}/tenants")).json()
    assert "errors" not in answer, answer
    # B's class has exactly one Weaviate tenant, B: no attack added another.
    assert [t["name"] for t in schema] == [victim.ctx.tenant_id], schema
    items = answer["data"]["Get"][victim.table]
    return sorted(
        (i["_additional"]["id"], str(i["_additional"]["vector"]), i["note"], i["level"])
        for i in items
    )


@pytest.fixture
async def unchanged_vectors(victim: Victim) -> AsyncIterator[Victim]:
    before = await _victim_rows(victim)
    assert len(before) == 5 and all(SECRET in r[2] for r in before)
    yield victim
    assert await _victim_rows(victim) == before, "the victim's vector objects changed"
    core = victim.core
    names = [c.name for c in await core.vectors.list_collections(victim.principal, victim.ctx)]
    assert names == ["Secrets"], "the victim's collections changed"


@pytest.fixture(params=FRONT_ENDS)
async def door(
    request: pytest.FixtureRequest, vstack: Stack, tenants: Tenants, victim: Victim
) -> AsyncIterator[VectorDoor]:
    """Tenant A (read, write and admin over itself only), with no collections of its own."""
    core, http, grpc_target = vstack.core, vstack.http, vstack.grpc_target
    a = tenants.a.tenant_id
    token = await service_token(core, [a], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    principal = Principal(service="attacker-vec", tenants=frozenset({a}), scopes=frozenset(Scope))
    for info in await core.vectors.list_collections(principal, TenantContext(a)):
        await core.vectors.drop_collection(principal, TenantContext(a), info.name)
    door = VectorDoor(request.param, http=http, grpc_target=grpc_target, tenant_id=a, token=token)
    yield door
    await door.close()


async def test_tenant_cannot_reach_another_tenants_collection_by_name(
    door: VectorDoor, unchanged_vectors: Victim
) -> None:
    listed = await door.call("list")
    assert listed.ok and listed.data["collections"] == []
    some_id = unchanged_vectors.ids[0]
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("get_collection", {}),
        ("count", {}),
        ("get", {"ids": unchanged_vectors.ids}),
        ("search", {"vector": [1.0, 0.0, 0.5, -1.0]}),
        ("delete", {"ids": [some_id]}),
        ("delete", {"where": {"path": "level", "operator": "GreaterThan", "value": -1}}),
        ("upsert", {"objects": [{"id": some_id, "vector": [0.0] * DIM}]}),
    ]
    for operation, fields in attempts:
        refused = await door.call(operation, "Secrets", **fields)
        assert not refused.ok and refused.code == "collection_not_found", (operation, refused)
        assert refused.status in ("NOT_FOUND", "404")
    dropped = await door.call("drop", "Secrets")
    assert dropped.ok and dropped.data["dropped"] is False


CRAFTED_NAMES = [
    "tenant_x.Secrets",
    "Secrets.x",
    "public.Secrets",
    '"Secrets"',
    'Secrets"; DROP TABLE x; --',
    "Secrets--",
    "Secrets;",
    "Secrets'",
    "../Secrets",
    "Secrets/../x",
    "Secrets%00",
    " Secrets",
    "Secrets ",
    "Sécrets",
    "_Secrets",
    "1Secrets",
    "S" * 49,
    "vec_secrets\u0000",
]


async def test_crafted_collection_names_are_refused(
    door: VectorDoor, tenants: Tenants, unchanged_vectors: Victim
) -> None:
    names = [
        *CRAFTED_NAMES,
        f"{tenants.b.schema_name}.vec_secrets",
        f"{tenants.b.schema_name}.Secrets",
    ]
    for name in names:
        for operation, fields in [
            ("get_collection", {}),
            ("count", {}),
            ("search", {"vector": [0.1] * DIM}),
            ("get", {"ids": unchanged_vectors.ids[:1]}),
            ("delete", {"ids": unchanged_vectors.ids[:1]}),
            ("upsert", {"objects": [{"vector": [0.1] * DIM}]}),
            ("drop", {}),
            ("create", {}),
        ]:
            if door.name == "rest" and ("/" in name or "%" in name or "\x00" in name):
                continue  # not a path segment a URL carries (REST's router refuses it first)
            refused = await door.call(operation, name, **fields)
            assert not refused.ok, (name, operation, refused)
            assert refused.code in ("invalid_collection", "not_found"), (name, operation, refused)


async def test_bs_table_name_names_only_as_own(door: VectorDoor, unchanged_vectors: Victim) -> None:
    """``vec_secrets`` is a valid collection name: A's own ``vec_vec_secrets``, which A lacks;
    so is B's Weaviate class name (``Dbsvc_<B's key>_secrets``): a class of A's own, which A
    lacks, and which A may make without touching B's."""
    for name in ("vec_secrets", class_name(unchanged_vectors.ctx.tenant_id, "Secrets")):
        refused = await door.call("search", name, vector=[0.1] * DIM)
        assert refused.code == "collection_not_found", (name, refused)
        refused = await door.call("get", name, ids=unchanged_vectors.ids)
        assert refused.code == "collection_not_found", (name, refused)
    own = class_name(unchanged_vectors.ctx.tenant_id, "Secrets")
    assert (await door.call("create", own, properties={"note": "text"})).ok
    found = await door.call("search", own, vector=[1.0, 0.0, 0.5, -1.0], limit=100)
    assert found.ok and found.data["results"] == []
    assert (await door.call("delete", own, ids=unchanged_vectors.ids)).data["deleted"] == 0
    assert (await door.call("drop", own)).data["dropped"] is True


SQL_FILTERS: list[dict[str, Any]] = [
    {"path": "note) OR (1=1", "operator": "Equal", "value": "x"},
    {"path": 'note" OR true --', "operator": "Equal", "value": "x"},
    {"path": ["note", "level"], "operator": "Equal", "value": "x"},
    {"path": "note", "operator": "= 'x' OR 1=1 --", "value": "x"},
    {"path": "note", "operator": "Equal", "value": "x' OR '1'='1"},
    {"path": "note", "operator": "Like", "value": "%' OR 1=1 --"},
    {"path": "note", "operator": "In", "value": ["x') OR true --"]},
    {"path": "level", "operator": "Equal", "value": "1 OR 1=1"},
    {"operator": "And; DROP TABLE x", "operands": []},
    {"operator": "Or", "operands": [{"path": "note", "operator": "IsNull", "value": "true"}]},
    {"path": "id", "operator": "Equal", "value": "x"},
    {"path": "vector", "operator": "IsNull", "value": False},
]


async def test_filters_that_try_sql_are_refused_or_inert(
    door: VectorDoor, unchanged_vectors: Victim
) -> None:
    made = await door.call("create", "Secrets", properties={"note": "text", "level": "int"})
    assert made.ok, made
    mine = {"id": str(uuid.uuid4()), "vector": [1.0, 0.0, 0.5, -1.0],
            "properties": {"note": "mine", "level": 1}}  # fmt: skip
    assert (await door.call("upsert", "Secrets", objects=[mine])).ok
    for where in SQL_FILTERS:
        for operation, fields in [
            ("search", {"vector": [0.1] * DIM, "where": where}),
            ("count", {"where": where}),
            ("delete", {"where": where}),
        ]:
            outcome = await door.call(operation, "Secrets", **fields)
            if outcome.ok:  # a value compared as a value: nothing matches it
                assert outcome.data.get("count", 0) == 0 and outcome.data.get("deleted", 0) == 0
                assert outcome.data.get("results", []) == [], (where, outcome)
            else:
                assert outcome.code == "invalid_filter", (where, operation, outcome)
    assert (await door.call("count", "Secrets")).data["count"] == 1  # A's own object is there


async def test_ids_of_another_tenants_objects_reach_only_own_collection(
    door: VectorDoor, unchanged_vectors: Victim
) -> None:
    """A's own collection of B's name: B's ids are A's to use, and reach A's objects only."""
    assert (await door.call("create", "Secrets", properties={"note": "text"})).ok
    ids = unchanged_vectors.ids
    got = await door.call("get", "Secrets", ids=ids)
    assert got.ok and got.data["objects"] == []
    deleted = await door.call("delete", "Secrets", ids=ids)
    assert deleted.ok and deleted.data["deleted"] == 0
    objects = [{"id": i, "vector": [0.1, 0.2, 0.3, 0.4], "properties": {"note": "A's"}}
               for i in ids]  # fmt: skip
    assert (await door.call("upsert", "Secrets", objects=objects)).data["upserted"] == len(ids)
    found = await door.call("search", "Secrets", vector=[1.0, 0.0, 0.5, -1.0], limit=100)
    assert {r["properties"]["note"] for r in found.data["results"]} == {"A's"}
    assert (await door.call("delete", "Secrets", ids=ids)).data["deleted"] == len(ids)


async def test_tenant_filter_naming_another_tenant_is_refused(
    door: VectorDoor, tenants: Tenants, unchanged_vectors: Victim
) -> None:
    assert (await door.call("create", "Secrets")).ok
    for tenant_filter in (tenants.b.tenant_id, "*", "", tenants.b.schema_name):
        refused = await door.call("search", "Secrets", vector=[0.1] * DIM,
                                  tenant_filter=tenant_filter)  # fmt: skip
        assert refused.code == "permission_denied", (tenant_filter, refused)
    own = await door.call("search", "Secrets", vector=[0.1] * DIM, tenant_filter=door.tenant_id)
    assert own.ok


async def test_naming_another_tenant_in_the_header_is_refused(
    door: VectorDoor, tenants: Tenants, unchanged_vectors: Victim
) -> None:
    b = tenants.b.tenant_id
    for operation, fields in [
        ("list", {}),
        ("get_collection", {}),
        ("search", {"vector": [1.0, 0.0, 0.5, -1.0]}),
        ("get", {"ids": unchanged_vectors.ids}),
        ("count", {}),
        ("delete", {"ids": unchanged_vectors.ids}),
        ("upsert", {"objects": [{"vector": [0.0] * DIM}]}),
        ("drop", {}),
        ("create", {}),
    ]:
        refused = await door.call(operation, "Secrets", tenant_id=b, **fields)
        assert refused.code == "permission_denied", (operation, refused)


async def test_a_read_only_service_cannot_write(
    door: VectorDoor, core: Application, tenants: Tenants, unchanged_vectors: Victim
) -> None:
    assert (await door.call("create", "Mine", properties={"n": "int"})).ok
    reader = await service_token(core, [tenants.a.tenant_id], (Scope.READ,))
    writer = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))
    obj = {"vector": [0.1] * DIM, "properties": {"n": 1}}
    for operation, fields in [
        ("upsert", {"objects": [obj]}),
        ("delete", {"where": {"path": "n", "operator": "Equal", "value": 1}}),
        ("drop", {}),
        ("create", {}),
    ]:
        refused = await door.call(operation, "Mine", token=reader, **fields)
        assert refused.code == "permission_denied", (operation, refused)
    assert (await door.call("search", "Mine", token=reader, vector=[0.1] * DIM)).ok
    # Collections are DDL: write alone does not make or drop them.
    assert (await door.call("upsert", "Mine", token=writer, objects=[obj])).ok
    for operation in ("create", "drop"):
        refused = await door.call(operation, "Mine", token=writer)
        assert refused.code == "permission_denied", (operation, refused)
    assert (await door.call("count", "Mine")).data["count"] == 1


@pytest.mark.parametrize("vstack", [STORES[0]], indirect=True)
async def test_a_direct_login_cannot_read_another_tenants_collection(
    attacker_conn: asyncpg.Connection, unchanged_vectors: Victim
) -> None:
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await attacker_conn.fetch(f"SELECT * FROM {unchanged_vectors.table}")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await attacker_conn.execute(f"DELETE FROM {unchanged_vectors.table}")


async def test_a_secret_in_a_name_never_reaches_b(
    door: VectorDoor, unchanged_vectors: Victim
) -> None:
    """A name A makes up is A's alone: B's list shows B's collection only (checked after)."""
    name = f"X{secrets.token_hex(4)}"
    assert (await door.call("create", name)).ok
    assert (await door.call("drop", name)).data["dropped"] is True
