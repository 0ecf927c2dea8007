"""Bad input to ``execute_multi_db_operation`` through both front ends (gRPC
``MultiDatabase.Execute``, raw stub; REST ``POST /api/v1/multi-db``, raw bytes so that what
Python's JSON reader accepts and orjson does not — ``NaN``, ``Infinity``, integers past 64
bits — reaches the service as a caller could send it).

Every case is refused with a stable code, or runs as asked; never a server error, and a
refused operation leaves nothing behind: no key-value key, no outbox entry, no vector object,
no graph vertex of A's. Entries a tenant forges in the outbox (over a direct login as its own
role, where ``multidb_record`` is callable by design) can poison nothing: the applier fails
them on their own and goes on with every other tenant's entries.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import grpc
import httpx
import orjson
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import quote_ident
from database_service_client._proto import multidb_pb2 as mpb
from database_service_client._proto.multidb_pb2_grpc import MultiDatabaseStub
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.usefixtures("unchanged_victim"), pytest.mark.pgvector]

FRONT_ENDS = ("grpc", "rest")
_SERVER = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


def _kv(extra: str) -> str:
    return '{"dragonflydb": {"operation": "set", "key": "probe", ' + extra + "}}"


# Each case: the operation as JSON text (what a caller sends), by what it attacks.
CASES: dict[str, str] = {
    # Numbers no JSON reader should turn into a TTL.
    "kv_ttl_nan": _kv('"value": "v", "ttl": NaN'),
    "kv_ttl_infinity": _kv('"value": "v", "ttl": Infinity'),
    "kv_ttl_minus_infinity": _kv('"value": "v", "ttl": -Infinity'),
    "kv_ttl_huge_float": _kv('"value": "v", "ttl": 1e308'),
    "kv_ttl_huge_int": _kv('"value": "v", "ttl": 100000000000000000000000000000'),
    "kv_ttl_zero": _kv('"value": "v", "ttl": 0'),
    "kv_ttl_negative": _kv('"value": "v", "ttl": -5'),
    "kv_ttl_tiny": _kv('"value": "v", "ttl": 1e-300, "ttl_ms": null'),
    "kv_ttl_ms_huge": _kv('"value": "v", "ttl_ms": 100000000000000000000000000000'),
    "kv_ttl_ms_float": _kv('"value": "v", "ttl_ms": 1.5'),
    "kv_ttl_bool": _kv('"value": "v", "ttl": true'),
    "kv_by_past_64_bits": '{"dragonflydb": {"operation": "incr", "key": "probe",'
    ' "by": 100000000000000000000000000000}}',
    "kv_by_string": '{"dragonflydb": {"operation": "incr", "key": "probe", "by": "1"}}',
    # Values the service turns into JSON text itself (the seed passes a dict).
    "kv_value_nested_deep": _kv('"value": ' + _nested(400)),
    "kv_value_nested_past_orjson": _kv('"value": ' + _nested(260)),
    "kv_value_big_int": _kv('"value": {"n": 100000000000000000000000000000}'),
    "kv_value_nan": _kv('"value": {"n": NaN}'),
    "kv_value_lone_surrogate": _kv('"value": "\\ud800"'),
    "kv_key_lone_surrogate": '{"dragonflydb": {"operation": "set", "key": "\\udc00",'
    ' "value": "v"}}',
    "kv_key_empty": '{"dragonflydb": {"operation": "set", "key": "", "value": "v"}}',
    "kv_key_huge": '{"dragonflydb": {"operation": "set", "key": "' + "k" * 70_000 + '",'
    ' "value": "v"}}',
    "kv_keys_too_many": '{"dragonflydb": {"operation": "mget", "keys": ['
    + ",".join(f'"k{i}"' for i in range(5000))
    + "]}}",
    "kv_key_base64_bad": '{"dragonflydb": {"operation": "get", "key_base64": "!!"}}',
    "kv_wrong_type_key": '{"dragonflydb": {"operation": "get", "key": ["a"]}}',
    "kv_operation_unknown": '{"dragonflydb": {"operation": "flushall", "key": "x"}}',
    "kv_part_not_object": '{"dragonflydb": "set probe v"}',
    # Vector parts: numbers and sizes.
    "vector_nan_component": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": [NaN, 1]}]}}',
    "vector_infinite_component": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": [Infinity, 1]}]}}',
    "vector_huge_component": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": [1e308, 1e308]}]}}',
    "vector_big_int_component": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": [100000000000000000000000000000, 1]}]}}',
    "vector_empty": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": []}]}}',
    "vector_property_big_int": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": [1, 2], "properties": {"n": 100000000000000000000000000000}}]}}',
    "vector_property_nested_deep": '{"vector": {"operation": "upsert", "class": "Probe",'
    ' "objects": [{"vector": [1, 2], "properties": {"n": ' + _nested(300) + "}}]}}",
    "vector_search_limit_negative": '{"vector": {"operation": "similarity_search",'
    ' "class": "Probe", "vector": [1, 2], "limit": -1}}',
    "vector_search_limit_huge": '{"vector": {"operation": "similarity_search",'
    ' "class": "Probe", "vector": [1, 2], "limit": 100000000000000000000}}',
    "vector_search_certainty_nan": '{"vector": {"operation": "similarity_search",'
    ' "class": "Probe", "vector": [1, 2], "certainty": NaN}}',
    "vector_search_distance_infinite": '{"vector": {"operation": "similarity_search",'
    ' "class": "Probe", "vector": [1, 2], "distance": Infinity}}',
    "vector_search_nan_vector": '{"vector": {"operation": "similarity_search",'
    ' "class": "Probe", "vector": [NaN, 1]}}',
    "vector_delete_where_deep": '{"vector": {"operation": "delete", "class": "Probe",'
    ' "where": ' + ('{"operator": "And", "operands": [' * 200) + "{}" + ("]}" * 200) + "}}",
    "vector_class_nul": '{"vector": {"operation": "upsert", "class": "Pro\\u0000be",'
    ' "objects": [{"vector": [1, 2]}]}}',
    # Graph parts: counts, depths and numbers.
    "graph_traverse_depth_negative": '{"graph": {"operation": "traverse", "start": "v/a",'
    ' "min_depth": -1, "max_depth": -5}}',
    "graph_traverse_depth_huge": '{"graph": {"operation": "traverse", "start": "v/a",'
    ' "max_depth": 100000000000000000000}}',
    "graph_traverse_limit_zero": '{"graph": {"operation": "traverse", "start": "v/a", "limit": 0}}',
    "graph_traverse_limit_huge": '{"graph": {"operation": "traverse", "start": "v/a",'
    ' "limit": 100000000000000000000}}',
    "graph_traverse_start_nul": '{"graph": {"operation": "traverse", "start": "v/a\\u0000"}}',
    "graph_traverse_direction_bad": '{"graph": {"operation": "traverse", "start": "v/a",'
    ' "direction": "sideways"}}',
    "graph_property_big_int": '{"graph": {"operation": "upsert", "vertices": [{"collection":'
    ' "v", "_key": "big", "properties": {"n": 100000000000000000000000000000}}]}}',
    "graph_property_nan": '{"graph": {"operation": "upsert", "vertices": [{"collection":'
    ' "v", "_key": "nan", "properties": {"n": NaN}}]}}',
    "graph_property_nested_deep": '{"graph": {"operation": "upsert", "vertices":'
    ' [{"collection": "v", "_key": "deep", "properties": {"n": ' + _nested(300) + "}}]}}",
    "graph_property_nul": '{"graph": {"operation": "upsert", "vertices": [{"collection":'
    ' "v", "_key": "nul", "properties": {"n": "a\\u0000b"}}]}}',
    "graph_property_key_nul": '{"graph": {"operation": "upsert", "vertices": [{"collection":'
    ' "v", "_key": "nulkey", "properties": {"a\\u0000b": 1}}]}}',
    "graph_key_lone_surrogate": '{"graph": {"operation": "upsert", "vertices": [{"collection":'
    ' "v", "_key": "\\ud800"}]}}',
    # PostgreSQL parts.
    "postgres_params_big_int": '{"postgresql": {"query": "SELECT $1::numeric",'
    ' "params": [100000000000000000000000000000]}}',
    "postgres_params_nan": '{"postgresql": {"query": "SELECT $1::float8", "params": [NaN]}}',
    "postgres_params_deep": '{"postgresql": {"query": "SELECT $1::jsonb", "params": ['
    + _nested(300)
    + "]}}",
    "postgres_result_jsonb_big_int": '{"postgresql": {"query":'
    ' "SELECT \'{\\"n\\": 100000000000000000000000000000}\'::jsonb AS j"}}',
    "postgres_result_jsonb_deep": '{"postgresql": {"query": "SELECT (repeat(\'[\', 600)'
    " || '1' || repeat(']', 600))::jsonb AS j\"}}",
    "postgres_named_params_missing": '{"postgresql": {"query": "SELECT :a", "params": {}}}',
    "postgres_statements_wrong_type": '{"postgresql": {"statements": [1, 2]}}',
    "postgres_statements_many": '{"postgresql": {"statements": ['
    + ",".join(['"SELECT 1"'] * 20_000)
    + "]}}",
    "postgres_query_nul": '{"postgresql": {"query": "SELECT 1\\u0000"}}',
    "postgres_query_lone_surrogate": '{"postgresql": {"query": "SELECT \'\\ud800\'"}}',
    "postgres_and_kv_value_big_int": '{"postgresql": {"query": "SELECT 1"}, "redis":'
    ' {"operation": "set", "key": "probe", "value": {"n": 100000000000000000000000000000}}}',
    # The operation itself.
    "operation_duplicate_part": '{"redis": {"operation": "get", "key": "a"},'
    ' "redis": {"operation": "set", "key": "probe", "value": "v"}}',
    "operation_alias_twice": '{"redis": {"operation": "get", "key": "a"},'
    ' "dragonflydb": {"operation": "get", "key": "a"}}',
    "operation_store_nul": '{"postgre\\u0000sql": {"query": "SELECT 1"}}',
    "clickhouse_not_configured": '{"clickhouse": {"query": "SELECT 1"}}',
}


async def call(
    front_end: str,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenant_id: str,
    token: str,
    operation_text: str,
) -> tuple[str, dict[str, Any]]:
    """(status, answer or error document) of one operation, sent as the caller wrote it."""
    if front_end == "rest":
        response = await http.post(
            "/api/v1/multi-db",
            content=b'{"operation": ' + operation_text.encode("utf-8", "surrogatepass") + b"}",
            headers={
                "Authorization": f"Bearer {token}",
                "X-Tenant-Id": tenant_id,
                "Content-Type": "application/json",
            },
        )
        try:
            document = response.json()
        except ValueError:
            document = {"error": {"code": None, "message": response.text[:300]}}
        return str(response.status_code), document
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        try:
            reply = await MultiDatabaseStub(channel).Execute(
                mpb.MultiDbRequest(operation_json=operation_text.encode("utf-8", "surrogatepass")),
                metadata=(("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id)),
            )
        except grpc.aio.AioRpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())
            code = trailing.get("dbsvc-error-code")
            return exc.code().name, {"error": {"code": code, "message": exc.details()}}
        return "200", orjson.loads(reply.result_json)


def _server_error(status: str, document: dict[str, Any]) -> bool:
    if status in _SERVER or (status.startswith("5") and status != "503"):
        return True
    code = document.get("error", {}).get("code")
    if code in {"internal", None} and status != "200":
        return True
    # A part the service ran and then failed with its own bug.
    return any(
        isinstance(p, dict) and p.get("code") == "internal"
        for p in document.get("stores", {}).values()
    )


async def a_traces(core: Application, tenants: Tenants) -> dict[str, Any]:
    """What A's refused calls must not have left: the probe key, outbox entries, graph
    vertices (the embedded graph is a table of A's schema, once written)."""
    a = tenants.a.tenant_id
    control = quote_ident(core.settings.control_schema)
    schema = quote_ident(tenants.a.schema_name)
    vertices = await core.owner_pool.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{schema}._graph_vertices"
    )
    return {
        "probe": await core.key_values.get(a, "probe"),
        "outbox": await core.owner_pool.fetchval(
            f"SELECT count(*) FROM {control}.multidb_outbox WHERE tenant_id = $1", a
        ),
        "vertices": (
            await core.owner_pool.fetchval(f"SELECT count(*) FROM {schema}._graph_vertices")
            if vertices
            else 0
        ),
    }


@pytest.fixture
async def a_token(core: Application, tenants: Tenants) -> str:
    return await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_parts_are_refused_with_a_stable_code_and_change_nothing(
    front_end: str,
    case: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    a_token: str,
) -> None:
    before = await a_traces(core, tenants)
    status, document = await call(
        front_end, http, grpc_target, tenants.a.tenant_id, a_token, CASES[case]
    )
    assert not _server_error(status, document), (status, str(document)[:500])
    if status != "200":
        assert await a_traces(core, tenants) == before
    await core.key_values.delete(tenants.a.tenant_id, "probe")


async def test_a_forged_outbox_entry_that_cannot_apply_holds_up_no_other_tenant(
    core: Application,
    tenants: Tenants,
    attacker_conn: asyncpg.Connection,
    new_tenant: Any,
) -> None:
    """A's direct login records entries no request could (``multidb_record`` takes any JSON):
    the applier fails each on its own and still applies a bystander's entry after them."""
    bystander = await new_tenant("bystander")
    control = quote_ident(core.settings.control_schema)
    outbox = core.multidb_outbox
    target = outbox.appliers.target("dragonflydb")
    poisons = {
        "value nested past every writer": '{"operation": "set", "key": "p1", "value": '
        + _nested(300)
        + "}",
        "ttl past any clock": '{"operation": "set", "key": "p2", "value": "v", "ttl": 1e300}',
        "increment past 64 bits": '{"operation": "incr", "key": "p3",'
        ' "by": 100000000000000000000000000000}',
        "operation nested past the reader": '{"operation": "set", "key": "p4", "value": "v",'
        ' "x": ' + _nested(5000) + "}",
        "not an object": "[1, 2, 3]",
    }
    forged = []
    for op in poisons.values():
        forged.append(
            await attacker_conn.fetchval(
                f"SELECT {control}.multidb_record(gen_random_uuid(), 'dragonflydb',"
                " 'dragonflydb', $1::text::jsonb, $2)",
                op,
                target,
            )
        )
    # The bystander's entry, recorded after them (as the owner: a leftover of a crash).
    await core.owner_pool.execute(
        f"INSERT INTO {control}.multidb_outbox (tenant_id, operation_id, store, part, op, target)"
        " VALUES ($1, gen_random_uuid(), 'dragonflydb', 'dragonflydb', $2::text::jsonb, $3)",
        bystander.tenant_id,
        '{"operation": "set", "key": "after", "value": "applied"}',
        target,
    )
    # Due now (a recorded entry waits a few seconds for the request that recorded it).
    await core.owner_pool.execute(
        f"UPDATE {control}.multidb_outbox SET next_attempt_at = clock_timestamp()"
        " WHERE id = ANY($1::bigint[])",
        forged,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        await outbox.apply_due()  # the background applier may be at it too: either applies
        if await core.key_values.get(bystander.tenant_id, "after") == b"applied":
            break
        await asyncio.sleep(0.2)
    assert await core.key_values.get(bystander.tenant_id, "after") == b"applied"
    statuses = dict(
        await core.owner_pool.fetch(
            f"SELECT id, status FROM {control}.multidb_outbox WHERE id = ANY($1::bigint[])",
            forged,
        )
    )
    assert all(statuses[i] == "failed" for i in forged), statuses
    for key in ("p1", "p2", "p3", "p4"):
        assert await core.key_values.get(tenants.a.tenant_id, key) is None


async def test_an_entry_applied_elsewhere_answers_its_first_outcome(
    core: Application, tenants: Tenants, attacker_conn: asyncpg.Connection
) -> None:
    """The request that recorded an entry may find it applied already (the background applier
    got there first): it answers the entry's outcome, never a server error."""
    control = quote_ident(core.settings.control_schema)
    outbox = core.multidb_outbox
    entry = await attacker_conn.fetchval(
        f"SELECT {control}.multidb_record(gen_random_uuid(), 'dragonflydb', 'dragonflydb',"
        " $1::text::jsonb, $2)",
        '{"operation": "incr", "key": "twice", "by": 2}',
        outbox.appliers.target("dragonflydb"),
    )
    first = await outbox.apply(entry)
    again = await outbox.apply(entry)
    assert first.status == again.status == "applied"
    assert again.document() == first.document()
    assert await core.key_values.get(tenants.a.tenant_id, "twice") == b"2"
