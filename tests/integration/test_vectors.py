"""Vector collections through every front end, on both stores: the embedded PostgreSQL's
pgvector and a real Weaviate server (``[pgvector]``/``[weaviate]``): gRPC ``VectorService`` (the
client's ``vector_*`` and ``weaviate_query``) and REST ``/api/v1/vector/...``. Every operation
once, typed properties and every filter operator against what Python computes from the same
objects, certainty and distance per metric, HNSW recall against exact search on the same data,
health and metrics. What only one store has (pgvector's tables, catalog and index; Weaviate's
classes, restart) is tested on that store."""

from __future__ import annotations

import datetime as dt
import math
import random
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.stores.vector import SearchQuery
from database_service.stores.vector.pgvector import (
    PgVectorStore,
    VectorStoreUnavailable,
    table_name,
)
from database_service.tenancy import TenantRecord, quote_ident
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from tests.fix_pg import PgCluster, with_database
from tests.fix_weaviate import Stack, store_stack
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.integration]
STORES = [
    pytest.param("pgvector", marks=pytest.mark.pgvector),
    pytest.param("weaviate", marks=pytest.mark.weaviate),
]
PGVECTOR = pytest.mark.parametrize("stack", [STORES[0]], indirect=True)

PROPERTIES = {
    "symbol": "text",
    "bars": "int",
    "score": "number",
    "active": "bool",
    "seen": "date",
    "ref": "uuid",
    "tags": "text[]",
}
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@dataclass
class Setup:
    store: str
    core: Application
    tenant: TenantRecord
    client: MultiDatabaseClient
    http: httpx.AsyncClient
    headers: dict[str, str]
    objects: list[dict[str, Any]]


def _unit(rng: random.Random, dim: int) -> list[float]:
    v = [rng.gauss(0, 1) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _objects(n: int, dim: int) -> list[dict[str, Any]]:
    rng = random.Random(7)
    symbols = ["EURUSD", "GBPUSD", "USDJPY", "EUR_X", "EUR%Y"]
    objects = []
    for i in range(n):
        objects.append(
            {
                "id": str(uuid.UUID(int=i + 1)),
                "vector": _unit(rng, dim),
                "properties": {
                    "symbol": symbols[i % len(symbols)],
                    "bars": i,
                    "score": i / 10,
                    "active": i % 2 == 0,
                    "seen": (BASE + dt.timedelta(hours=i)).isoformat(),
                    "ref": str(uuid.UUID(int=1000 + i)),
                    "tags": ["a", "b"] if i % 3 == 0 else ["c"],
                }
                if i % 7 != 6
                else {"symbol": None},  # an object with null properties
            }
        )
    return objects


@pytest.fixture(scope="module", params=STORES)
def stack(request: pytest.FixtureRequest) -> Stack:
    """The service on each store in turn (pgvector: the session's own service)."""
    return store_stack(request)


@pytest.fixture(scope="module")
async def setup(stack: Stack) -> AsyncIterator[Setup]:
    core = stack.core
    tenant = await core.tenants.create(f"vec_{secrets.token_hex(4)}")
    token = await service_token(core, [tenant.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    client = MultiDatabaseClient(stack.grpc_target, tenant.tenant_id, token, retries=0)
    await client.vector_create_collection("Patterns", 8, properties=PROPERTIES)
    objects = _objects(60, 8)
    assert await client.vector_upsert("Patterns", objects) == 60
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant.tenant_id}
    yield Setup(stack.store, core, tenant, client, stack.http, headers, objects)
    await client.close()


def _props(obj: dict[str, Any]) -> dict[str, Any]:
    full = dict.fromkeys(PROPERTIES)
    full.update(obj["properties"])
    return full


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# -- collections --------------------------------------------------------------------------------


async def test_a_collection_is_created_listed_read_and_dropped(setup: Setup) -> None:
    client = setup.client
    made = await client.vector_create_collection("Temp_1", 3, metric="l2", properties={"x": "int"})
    assert made == {"name": "Temp_1", "dimension": 3, "metric": "l2", "properties": {"x": "int"},
                    "count": 0}  # fmt: skip
    with pytest.raises(DatabaseServiceError) as exists:
        await client.vector_create_collection("temp_1", 3)  # names are case-insensitive
    assert exists.value.code == "collection_exists"
    names = {c["name"] for c in await client.vector_list_collections()}
    assert names == {"Patterns", "Temp_1"}
    got = await client.vector_get_collection("Temp_1")
    assert got["count"] == 0 and got["properties"] == {"x": "int"}
    assert await client.vector_drop_collection("Temp_1") is True
    assert await client.vector_drop_collection("Temp_1") is False
    with pytest.raises(DatabaseServiceError) as gone:
        await client.vector_get_collection("Temp_1")
    assert gone.value.code == "collection_not_found" and gone.value.status.name == "NOT_FOUND"


async def test_the_collection_schema_is_read_back_from_the_catalog(setup: Setup) -> None:
    info = await setup.client.vector_get_collection("Patterns")
    assert info == {
        "name": "Patterns",
        "dimension": 8,
        "metric": "cosine",
        "properties": PROPERTIES,
        "count": 60,
    }


@PGVECTOR
async def test_the_collection_is_a_table_of_the_tenants_own_role(
    core: Application, setup: Setup
) -> None:
    row = await core.owner_pool.fetchrow(
        "SELECT pg_get_userbyid(c.relowner) AS owner, n.nspname,"
        " (SELECT amname FROM pg_am JOIN pg_class i ON i.relam = pg_am.oid"
        "  JOIN pg_index x ON x.indexrelid = i.oid WHERE x.indrelid = c.oid AND amname = 'hnsw')"
        " AS am FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relname = $1 AND n.nspname = $2",
        table_name("Patterns"),
        setup.tenant.schema_name,
    )
    assert row is not None
    assert (row["owner"], row["am"]) == (setup.tenant.role_name, "hnsw")


@PGVECTOR
async def test_a_collection_without_its_comment_is_known_by_its_table_and_index(
    core: Application, setup: Setup
) -> None:
    """As after a tenant export and restore (exports carry no comments): the name in lower
    case, the metric from the HNSW index."""
    client = setup.client
    await client.vector_create_collection("Bare", 3, metric="dot", properties={"n": "int"})
    try:
        table = f"{quote_ident(setup.tenant.schema_name)}.{quote_ident(table_name('Bare'))}"
        await core.owner_pool.execute(f"COMMENT ON TABLE {table} IS NULL")
        info = await client.vector_get_collection("Bare")
        assert (info["name"], info["metric"], info["properties"]) == ("bare", "dot", {"n": "int"})
    finally:
        await client.vector_drop_collection("Bare")


@PGVECTOR
async def test_a_tenant_export_restored_keeps_its_collections(
    core: Application, setup: Setup, tmp_path: Path
) -> None:
    """Per-tenant export and restore into another tenant id: the collection comes back as a
    table with its vectors, properties and HNSW index, and is searched like the original."""
    from database_service.auth.tokens import everything

    operator = everything(service="vector-test-operator")
    file = tmp_path / "vectors.dbsvc-backup"
    await core.tenant_backups.export(operator, setup.tenant.tenant_id, file)
    copy_id = f"vcopy_{secrets.token_hex(4)}"
    await core.tenant_backups.restore(operator, file, into=copy_id)
    principal = Principal("copy-reader", frozenset({copy_id}), frozenset(Scope))
    info = await core.vectors.get_collection(principal, TenantContext(copy_id), "Patterns")
    assert (info.dimension, info.metric.value, info.count) == (8, "cosine", 60)
    assert {k: v.value for k, v in info.properties.items()} == PROPERTIES
    query = SearchQuery(setup.objects[5]["vector"], 3)
    hits = await core.vectors.search(principal, TenantContext(copy_id), "Patterns", query)
    assert str(hits[0].id) == setup.objects[5]["id"]


# -- objects ------------------------------------------------------------------------------------


async def test_objects_come_back_with_their_typed_properties(setup: Setup) -> None:
    wanted = [setup.objects[3]["id"], setup.objects[6]["id"], str(uuid.uuid4())]
    got = await setup.client.vector_get("Patterns", wanted, with_vector=True)
    assert [o["id"] for o in got] == wanted[:2]  # the unknown id is simply absent
    first = got[0]
    assert first["properties"] == {
        "symbol": "EUR_X",
        "bars": 3,
        "score": 0.3,
        "active": False,
        "seen": (BASE + dt.timedelta(hours=3)).isoformat(),
        "ref": str(uuid.UUID(int=1003)),
        "tags": ["a", "b"],
    }
    assert first["vector"] == pytest.approx(setup.objects[3]["vector"], rel=1e-6)
    assert got[1]["properties"] == dict.fromkeys(PROPERTIES)


async def test_an_upsert_replaces_and_deletes_by_id_and_by_filter(setup: Setup) -> None:
    client = setup.client
    await client.vector_create_collection("Scratch", 2, metric="dot", properties={"n": "int"})
    try:
        ids = [str(uuid.uuid4()) for _ in range(4)]
        objs = [{"id": i, "vector": [k, 1.0], "properties": {"n": k}} for k, i in enumerate(ids)]
        assert await client.vector_upsert("Scratch", objs) == 4
        assert await client.vector_upsert("Scratch", [{"id": ids[0], "vector": [9, 9]}]) == 1
        (replaced,) = await client.vector_get("Scratch", [ids[0]], with_vector=True)
        assert replaced["vector"] == [9.0, 9.0] and replaced["properties"] == {"n": None}
        assert await client.vector_count("Scratch") == 4
        assert await client.vector_count("Scratch", {"path": "n", "operator": "GreaterThan",
                                                      "value": 1}) == 2  # fmt: skip
        assert await client.vector_delete("Scratch", ids=[ids[1], str(uuid.uuid4())]) == 1
        where = {"path": ["n"], "operator": "Equal", "valueInt": 3}
        assert await client.vector_delete("Scratch", where=where) == 1
        assert await client.vector_count("Scratch") == 2
        new = await client.vector_upsert("Scratch", [{"vector": [0.5, 0.5]}])  # id made for it
        assert new == 1 and await client.vector_count("Scratch") == 3
    finally:
        await client.vector_drop_collection("Scratch")


async def test_a_bad_object_in_a_batch_writes_nothing(setup: Setup) -> None:
    before = await setup.client.vector_count("Patterns")
    batch = [
        {"id": str(uuid.uuid4()), "vector": [0.1] * 8},
        {"id": str(uuid.uuid4()), "vector": [0.1] * 7},
    ]
    with pytest.raises(DatabaseServiceError) as refused:
        await setup.client.vector_upsert("Patterns", batch)
    assert refused.value.code == "invalid_vector" and "object 2" in refused.value.message
    assert await setup.client.vector_count("Patterns") == before


@pytest.mark.parametrize(
    ("objects", "code"),
    [
        ([{"vector": [math.nan] * 8}], "invalid_vector"),
        ([{"vector": [math.inf] + [0.0] * 7}], "invalid_vector"),
        ([{"vector": [0.0] * 9}], "invalid_vector"),
        ([{"vector": [0.0] * 8, "properties": {"nope": 1}}], "invalid_request"),
        ([{"vector": [0.0] * 8, "properties": {"bars": "seven"}}], "invalid_request"),
        ([{"vector": [0.0] * 8, "properties": {"bars": True}}], "invalid_request"),
        ([{"vector": [0.0] * 8, "properties": {"bars": 2**63}}], "invalid_request"),
        ([{"vector": [0.0] * 8, "properties": {"symbol": "a\x00b"}}], "invalid_request"),
        ([{"vector": [0.0] * 8, "properties": {"seen": "yesterday"}}], "invalid_request"),
        ([{"id": "not-a-uuid", "vector": [0.0] * 8}], "invalid_request"),
    ],
)
async def test_bad_objects_are_refused_with_stable_codes(
    setup: Setup, objects: list[dict[str, Any]], code: str
) -> None:
    with pytest.raises(DatabaseServiceError) as refused:
        await setup.client.vector_upsert("Patterns", objects)
    assert refused.value.code == code
    assert refused.value.status.name == "INVALID_ARGUMENT"


# -- search -------------------------------------------------------------------------------------


async def test_search_orders_by_cosine_distance_with_weaviates_certainty(setup: Setup) -> None:
    query = setup.objects[5]["vector"]
    hits = await setup.client.vector_search("Patterns", query, limit=60)
    expected = sorted(setup.objects, key=lambda o: 1 - _cos(query, o["vector"]))
    assert [h["id"] for h in hits[:10]] == [o["id"] for o in expected[:10]]
    assert hits[0]["id"] == setup.objects[5]["id"]
    for hit in hits:
        obj = next(o for o in setup.objects if o["id"] == hit["id"])
        cos = _cos(query, obj["vector"])
        assert hit["distance"] == pytest.approx(1 - cos, abs=1e-5)
        assert hit["certainty"] == pytest.approx((1 + cos) / 2, abs=1e-5)
        assert hit["properties"] == _props(obj)
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)


async def test_certainty_and_distance_thresholds_keep_the_near_ones(setup: Setup) -> None:
    query = setup.objects[0]["vector"]
    everything = await setup.client.vector_search("Patterns", query, limit=60)
    median = everything[30]["certainty"]
    near = await setup.client.vector_search("Patterns", query, limit=60, certainty=median)
    assert near and all(h["certainty"] >= median - 1e-9 for h in near)
    assert len(near) == sum(1 for h in everything if h["certainty"] >= median - 1e-9)
    close = await setup.client.vector_search("Patterns", query, limit=5, distance=0.5)
    assert all(h["distance"] <= 0.5 for h in close)


async def test_thresholds_at_their_edges_keep_only_what_is_that_near(setup: Setup) -> None:
    """Certainty 1 (distance 0) keeps at most the identical vector (Weaviate reads a distance of
    0 as none given: the store asks for a hair more and keeps only what is within); a negative
    cosine distance keeps nothing."""
    query = setup.objects[5]["vector"]
    exact = await setup.client.vector_search("Patterns", query, limit=60, certainty=1.0)
    assert {h["id"] for h in exact} <= {setup.objects[5]["id"]}
    assert await setup.client.vector_search("Patterns", query, limit=5, distance=-0.1) == []


@pytest.mark.parametrize("metric", ["l2", "dot"])
async def test_l2_and_dot_distances_are_euclidean_and_negative_inner_product(
    setup: Setup, metric: str
) -> None:
    name = f"M_{metric}"
    await setup.client.vector_create_collection(name, 3, metric=metric)
    try:
        vectors = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 3.0, 3.0]]
        await setup.client.vector_upsert(name, [{"vector": v} for v in vectors])
        query = [1.0, 1.0, 0.0]
        hits = await setup.client.vector_search(name, query, limit=3)

        def distance(v: list[float]) -> float:
            if metric == "l2":
                return math.dist(v, query)
            return -sum(x * y for x, y in zip(v, query, strict=True))

        assert [h["distance"] for h in hits] == pytest.approx(sorted(map(distance, vectors)))
        assert all(h["certainty"] is None for h in hits)
        with pytest.raises(DatabaseServiceError) as refused:
            await setup.client.vector_search(name, query, certainty=0.5)
        assert refused.value.code == "invalid_request"
    finally:
        await setup.client.vector_drop_collection(name)


def _where_cases() -> list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]]:
    seen = BASE + dt.timedelta(hours=20)
    return [
        ({"path": "symbol", "operator": "Equal", "value": "EURUSD"},
         lambda p: p["symbol"] == "EURUSD"),
        ({"path": "symbol", "operator": "NotEqual", "value": "EURUSD"},
         lambda p: p["symbol"] is not None and p["symbol"] != "EURUSD"),
        ({"path": "bars", "operator": "LessThan", "valueInt": 10},
         lambda p: p["bars"] is not None and p["bars"] < 10),
        ({"path": "bars", "operator": "LessThanEqual", "value": 10},
         lambda p: p["bars"] is not None and p["bars"] <= 10),
        ({"path": "score", "operator": "GreaterThan", "valueNumber": 4.5},
         lambda p: p["score"] is not None and p["score"] > 4.5),
        ({"path": "score", "operator": ">=", "value": 4},
         lambda p: p["score"] is not None and p["score"] >= 4),
        ({"path": "active", "operator": "Equal", "valueBoolean": True},
         lambda p: p["active"] is True),
        ({"path": "seen", "operator": "GreaterThanEqual", "valueDate": seen.isoformat()},
         lambda p: p["seen"] is not None and dt.datetime.fromisoformat(p["seen"]) >= seen),
        ({"path": "ref", "operator": "Equal", "value": str(uuid.UUID(int=1004))},
         lambda p: p["ref"] == str(uuid.UUID(int=1004))),
        ({"path": "symbol", "operator": "Like", "value": "EUR*"},
         lambda p: (p["symbol"] or "").startswith("EUR")),
        ({"path": "symbol", "operator": "Like", "value": "EUR_?"},  # _ is literal, ? one char
         lambda p: p["symbol"] == "EUR_X"),
        ({"path": "symbol", "operator": "Like", "value": "EUR%*"},  # % is literal
         lambda p: p["symbol"] == "EUR%Y"),
        ({"path": "bars", "operator": "In", "value": [1, 2, 3, 40]},
         lambda p: p["bars"] in (1, 2, 3, 40)),
        ({"path": "tags", "operator": "Equal", "value": "a"},
         lambda p: "a" in (p["tags"] or [])),
        ({"path": "tags", "operator": "NotEqual", "value": "a"},
         lambda p: "a" not in (p["tags"] or [])),
        ({"path": "tags", "operator": "In", "valueTextArray": ["b", "c"]},
         lambda p: bool({"b", "c"} & set(p["tags"] or []))),
        ({"path": "bars", "operator": "IsNull", "value": True}, lambda p: p["bars"] is None),
        ({"operator": "And", "operands": [
            {"path": "active", "operator": "Equal", "value": True},
            {"operator": "Or", "operands": [
                {"path": "symbol", "operator": "Equal", "value": "GBPUSD"},
                {"path": "bars", "operator": "GreaterThan", "value": 50}]}]},
         lambda p: p["active"] is True and (p["symbol"] == "GBPUSD" or (p["bars"] or 0) > 50)),
    ]  # fmt: skip


@pytest.mark.parametrize(("where", "keep"), _where_cases())
async def test_every_filter_operator_selects_what_python_would(
    setup: Setup, where: dict[str, Any], keep: Callable[[dict[str, Any]], bool]
) -> None:
    expected = {o["id"] for o in setup.objects if keep(_props(o))}
    assert expected, "a filter case that selects nothing proves little"
    hits = await setup.client.vector_search(
        "Patterns", setup.objects[0]["vector"], limit=100, where=where
    )
    assert {h["id"] for h in hits} == expected
    assert await setup.client.vector_count("Patterns", where) == len(expected)


@pytest.mark.parametrize(
    "where",
    [
        {"path": "nope", "operator": "Equal", "value": 1},
        {"path": "bars", "operator": "Equal", "value": "1; DROP TABLE x"},
        {"path": "bars", "operator": "Like", "value": "1*"},
        {"path": "active", "operator": "LessThan", "value": True},
        {"path": "tags", "operator": "GreaterThan", "value": "a"},
        {"path": "bars", "operator": "Between", "value": 1},
        {"path": "bars", "operator": "Equal"},
        {"path": "bars", "operator": "Equal", "value": 1, "valueInt": 1},
        {"path": "bars", "operator": "In", "value": []},
        {"path": "bars", "operator": "Equal", "value": None},
        {"operator": "And", "operands": []},
        {"operator": "Or", "operands": "x"},
        {"path": 'bars" OR true --', "operator": "Equal", "value": 1},
    ],
)
async def test_bad_filters_are_refused_as_invalid_filter(
    setup: Setup, where: dict[str, Any]
) -> None:
    with pytest.raises(DatabaseServiceError) as refused:
        await setup.client.vector_search("Patterns", [0.1] * 8, where=where)
    assert refused.value.code == "invalid_filter", refused.value.message


async def test_bad_searches_are_refused_with_stable_codes(setup: Setup) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"vector": [0.1] * 7}, "invalid_vector"),
        ({"vector": [math.nan] * 8}, "invalid_vector"),
        ({"vector": [0.1] * 8, "limit": 1001}, "invalid_request"),
        ({"vector": [0.1] * 8, "certainty": 1.5}, "invalid_request"),
    ]
    for arguments, code in cases:
        vector = arguments.pop("vector")
        with pytest.raises(DatabaseServiceError) as refused:
            await setup.client.vector_search("Patterns", vector, **arguments)
        assert refused.value.code == code, arguments
    with pytest.raises(DatabaseServiceError) as missing:
        await setup.client.vector_search("Nope", [0.1] * 8)
    assert missing.value.code == "collection_not_found"
    with pytest.raises(DatabaseServiceError) as bad_name:
        await setup.client.vector_search("a.b", [0.1] * 8)
    assert bad_name.value.code == "invalid_collection"


async def test_the_seeds_weaviate_query_runs_as_written(setup: Setup) -> None:
    trading_pattern = {"embedding": setup.objects[9]["vector"]}
    tenant_context = {"company_id": setup.tenant.tenant_id}
    result = await setup.client.weaviate_query(
        {
            "operation": "similarity_search",
            "class": "Patterns",
            "vector": trading_pattern["embedding"],
            "tenant_filter": tenant_context["company_id"],
            "limit": 10,
            "certainty": 0.8,
        }
    )
    assert result["class"] == "Patterns" and result["count"] == len(result["results"]) >= 1
    assert result["results"][0]["id"] == setup.objects[9]["id"]
    assert all(h["certainty"] >= 0.8 for h in result["results"])


@PGVECTOR
async def test_hnsw_search_recalls_what_exact_search_finds(core: Application, setup: Setup) -> None:
    """5,000 random 64-dimensional vectors: the service's search (HNSW) against an exact scan
    of the same table (index scans off), recall@10 over 40 queries."""
    client = setup.client
    await client.vector_create_collection("Recall", 64, properties={"bucket": "int"})
    try:
        rng = random.Random(11)
        for _ in range(5):
            batch = [
                {"vector": _unit(rng, 64), "properties": {"bucket": i % 20}} for i in range(1000)
            ]
            await client.vector_upsert("Recall", batch)
        table = f"{quote_ident(setup.tenant.schema_name)}.{quote_ident(table_name('Recall'))}"
        found = total = 0
        async with core.owner_pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_indexscan = off")
            for _ in range(40):
                query = _unit(rng, 64)
                hits = await client.vector_search("Recall", query, limit=10)
                exact = await conn.fetch(
                    f"SELECT id FROM {table} ORDER BY vector <=> $1::real[]::vector LIMIT 10",
                    query,
                )
                found += len({h["id"] for h in hits} & {str(r["id"]) for r in exact})
                total += 10
            # A filter keeping 5% of the rows: the iterative scan still finds 10 of them.
            where = {"path": "bucket", "operator": "Equal", "value": 3}
            filtered_found = 0
            for _ in range(10):
                query = _unit(rng, 64)
                hits = await client.vector_search("Recall", query, limit=10, where=where)
                assert len(hits) == 10 and {h["properties"]["bucket"] for h in hits} == {3}
                exact = await conn.fetch(
                    f"SELECT id FROM {table} WHERE bucket = 3"
                    " ORDER BY vector <=> $1::real[]::vector LIMIT 10",
                    query,
                )
                filtered_found += len({h["id"] for h in hits} & {str(r["id"]) for r in exact})
        assert found / total >= 0.95, found / total
        assert filtered_found / 100 >= 0.9, filtered_found / 100
    finally:
        await client.vector_drop_collection("Recall")


@pytest.mark.pgvector
async def test_search_settings_are_the_databases_defaults(core: Application) -> None:
    """Control migration 0013 set them: a search is one round trip, with no SET."""
    assert core.vector_store.defaults_set


@PGVECTOR
async def test_a_search_uses_the_hnsw_index(core: Application, setup: Setup) -> None:
    from database_service.stores.vector import CollectionInfo, Metric, PropertyType, SearchQuery

    store = core.vector_store
    info = CollectionInfo(
        "Patterns", 8, Metric.COSINE, {k: PropertyType(v) for k, v in PROPERTIES.items()}
    )
    table = f"{quote_ident(setup.tenant.schema_name)}.{quote_ident(table_name('Patterns'))}"
    for where in (None, {"path": "active", "operator": "Equal", "value": True}):
        sql, params = store.search_sql(
            info, SearchQuery([0.1] * 8, 10, where=where), table, "public"
        )
        async with core.owner_pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")  # 60 rows: a scan is cheaper
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", *params))
        assert f"Index Scan using {table_name('Patterns')}_hnsw" in plan, plan


# -- REST ---------------------------------------------------------------------------------------


async def test_every_rest_route_works(setup: Setup) -> None:
    http = setup.http
    h = setup.headers
    base = "/api/v1/vector/collections"
    made = await http.post(base, headers=h, json={"name": "Rest", "dimension": 2,
                                                  "properties": {"label": "text"}})  # fmt: skip
    assert made.status_code == 201, made.text
    assert made.json()["properties"] == {"label": "text"}
    listed = await http.get(base, headers=h)
    assert "Rest" in {c["name"] for c in listed.json()["collections"]}
    oid = str(uuid.uuid4())
    put = await http.put(f"{base}/Rest/objects/{oid}", headers=h,
                         json={"vector": [1, 0], "properties": {"label": "x"}})  # fmt: skip
    assert put.json() == {"upserted": 1}
    batch = await http.post(f"{base}/Rest/objects", headers=h,
                            json={"objects": [{"vector": [0, 1]}, {"vector": [1, 1]}]})  # fmt: skip
    assert batch.json() == {"upserted": 2}
    got = await http.get(f"{base}/Rest/objects/{oid}", headers=h, params={"with_vector": True})
    assert got.json() == {"id": oid, "properties": {"label": "x"}, "vector": [1.0, 0.0]}
    many = await http.post(f"{base}/Rest/objects/get", headers=h, json={"ids": [oid]})
    assert [o["id"] for o in many.json()["objects"]] == [oid]
    count = await http.post(f"{base}/Rest/count", headers=h, json={})
    assert count.json() == {"count": 3}
    found = await http.post(f"{base}/Rest/search", headers=h, json={"vector": [1, 0], "limit": 2})
    assert found.json()["results"][0]["id"] == oid
    assert found.json()["results"][0]["certainty"] == pytest.approx(1.0)
    seed = await http.post("/api/v1/vector/query", headers=h, json={
        "operation": "similarity_search", "class": "Rest", "vector": [1, 0],
        "tenant_filter": setup.tenant.tenant_id, "limit": 10, "certainty": 0.8})  # fmt: skip
    assert seed.status_code == 200 and seed.json()["results"][0]["id"] == oid
    filtered = await http.post(f"{base}/Rest/objects/delete", headers=h,
                               json={"where": {"path": "label", "operator": "Equal",
                                               "value": "x"}})  # fmt: skip
    assert filtered.json() == {"deleted": 1}
    missing = await http.get(f"{base}/Rest/objects/{oid}", headers=h)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "object_not_found"
    one = await http.delete(f"{base}/Rest/objects/{uuid.uuid4()}", headers=h)
    assert one.json() == {"deleted": 0}
    info = await http.get(f"{base}/Rest", headers=h)
    assert info.json()["count"] == 2
    dropped = await http.delete(f"{base}/Rest", headers=h)
    assert dropped.json() == {"dropped": True}
    gone = await http.get(f"{base}/Rest", headers=h)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "collection_not_found"
    bad = await http.post(f"{base}/Patterns/search", headers=h, json={"vector": [1, 0]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_vector"


@pytest.mark.pgvector
async def test_without_pgvector_vectors_are_not_configured(
    core: Application, pg_cluster: PgCluster
) -> None:
    """PostgreSQL without the extension (Debian's 15): health says not_configured, and every
    operation is refused with a stable code before any SQL."""
    database = f"novec_{secrets.token_hex(3)}"
    admin = await asyncpg.connect(pg_cluster.admin_dsn)
    await admin.execute(f"CREATE DATABASE {database}")
    try:
        pool = await asyncpg.create_pool(
            with_database(pg_cluster.admin_dsn, database), min_size=1, max_size=1
        )
        try:
            store = PgVectorStore(core.executor, pool)
            await store.start()
            health = await store.check()
            assert health["status"] == "not_configured" and "CREATE EXTENSION" in health["note"]
            principal = Principal("svc", frozenset({"t"}), frozenset(Scope))
            with pytest.raises(VectorStoreUnavailable):
                await store.search(principal, TenantContext("t"), "P", SearchQuery([1.0]))
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE {database}")
        await admin.close()


# -- health and metrics -------------------------------------------------------------------------


@PGVECTOR
async def test_health_reports_embedded_pgvector(core: Application, setup: Setup) -> None:
    core.health.invalidate()
    document = await core.health.document(detailed=True)
    weaviate = document["dependencies"]["weaviate"]
    assert weaviate["status"] == "healthy"
    assert weaviate["implementation"] == "embedded pgvector"
    assert weaviate["extension_version"] == "0.8.5"
    assert weaviate["collections"] >= 1 and weaviate["tenants_with_collections"] >= 1


async def test_searches_and_writes_are_counted(setup: Setup, admin_headers: dict[str, str]) -> None:
    await setup.client.vector_search("Patterns", [0.1] * 8)
    with pytest.raises(DatabaseServiceError):
        await setup.client.vector_search("Patterns", [0.1] * 3)
    text = (await setup.http.get("/metrics", headers=admin_headers)).text
    store = setup.store
    assert f'dbsvc_vector_searches_total{{code="ok",store="{store}"}}' in text
    assert f'dbsvc_vector_searches_total{{code="invalid_vector",store="{store}"}}' in text
    assert f'dbsvc_vector_search_duration_seconds_bucket{{le="0.05",store="{store}"}}' in text
    assert f'dbsvc_vector_objects_total{{operation="upsert",store="{store}"}}' in text
