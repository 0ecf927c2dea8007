"""Tenant A against tenant B through ``execute_multi_db_operation`` and its outbox: gRPC
``MultiDatabase.Execute`` (raw stub: no client-side check in the way) and REST
``POST /api/v1/multi-db``.

A (read, write and admin over itself) names B's company in a part, crafts keys and collection
names that spell B's namespaces, forges outbox rows with its own SQL (through the service, and
over a direct login as its own role), and lists and retries outbox entries as B's or with B's
ids. B's keys, vectors, graph and outbox entries never change and never show; refusals have a
stable code (never a server error). The outbox's administration is REST only (no gRPC RPC), so
those tests are REST only.
"""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import grpc
import httpx
import orjson
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.tenancy import quote_ident
from database_service_client._proto import multidb_pb2 as mpb
from database_service_client._proto.multidb_pb2_grpc import MultiDatabaseStub
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

FRONT_ENDS = ("grpc", "rest")


async def execute(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenant_id: str,
    token: str,
    operation: dict[str, Any],
) -> tuple[int | str, dict[str, Any]]:
    """(status, answer or error) of one operation through ``front_end``."""
    if front_end == "rest":
        response = await http.post(
            "/api/v1/multi-db",
            json={"operation": operation},
            headers={"Authorization": f"Bearer {token}", "X-Tenant-Id": tenant_id},
        )
        return response.status_code, response.json()
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        stub = MultiDatabaseStub(channel)
        try:
            reply = await stub.Execute(
                mpb.MultiDbRequest(operation_json=orjson.dumps(operation)),
                metadata=(("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id)),
            )
        except grpc.aio.AioRpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())
            code = trailing.get("dbsvc-error-code", "")
            return exc.code().name, {"error": {"code": code, "message": exc.details()}}
        return 200, orjson.loads(reply.result_json)


def admin_of(tenant_id: str) -> Principal:
    return Principal(service="mdb-admin", tenants=frozenset({tenant_id}), scopes=frozenset(Scope))


async def victim_state(core: Application, tenants: Tenants) -> dict[str, Any]:
    b = tenants.b.tenant_id
    control = quote_ident(core.settings.control_schema)
    return {
        "kv": await core.key_values.mget(b, ["secret", "x", "stolen"]),
        "outbox": [
            tuple(r)
            for r in await core.owner_pool.fetch(
                f"SELECT id, status, attempts, op FROM {control}.multidb_outbox"
                " WHERE tenant_id = $1 ORDER BY id",
                b,
            )
        ],
    }


@pytest.fixture
async def a_token(core: Application, tenants: Tenants) -> str:
    return await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_a_part_naming_another_company_is_refused_before_anything_runs(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    a_token: str,
) -> None:
    before = await victim_state(core, tenants)
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    for field in ("company_id", "tenant_id"):
        status, answer = await execute(
            front_end,
            core,
            http,
            grpc_target,
            a,
            a_token,
            {
                "postgresql": {"query": "INSERT INTO users VALUES ('mdb-x', 'x@x', 'pro')"},
                "dragonflydb": {"operation": "set", "key": "secret", "value": "x", field: b},
            },
        )
        assert status in (403, "PERMISSION_DENIED"), answer
        assert answer["error"]["code"] == "permission_denied"
    # A's token naming B as the tenant: refused too.
    status, answer = await execute(
        front_end,
        core,
        http,
        grpc_target,
        b,
        a_token,
        {"dragonflydb": {"operation": "get", "key": "secret"}},
    )
    assert status in (403, "PERMISSION_DENIED"), answer
    count = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {tenants.a.schema_name}.users WHERE user_id = 'mdb-x'"
    )
    assert count == 0
    assert await victim_state(core, tenants) == before


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_crafted_keys_and_names_stay_in_the_tenants_namespace(
    front_end: str,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    a_token: str,
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    await core.key_values.set(b, "secret", b"VICTIM")
    before = await victim_state(core, tenants)
    spelled = f"dbsvc:{{{b}}}:kv:secret"
    status, answer = await execute(
        front_end,
        core,
        http,
        grpc_target,
        a,
        a_token,
        {
            "dragonflydb": {"operation": "set", "key": spelled, "value": "from-a"},
        },
    )
    assert status == 200, answer
    assert answer["stores"]["dragonflydb"]["status"] == "applied"
    assert await core.key_values.get(a, spelled) == b"from-a"  # A's own key, verbatim
    # Names of B's objects: a vector collection qualified with B's schema, graph collections
    # with separators; refused as bad input, never a server error, nothing recorded.
    for part in (
        {
            "vector": {
                "operation": "upsert",
                "class": f"{tenants.b.schema_name}.vec_x",
                "objects": [{"vector": [1]}],
            }
        },
        {"vector": {"operation": "delete", "class": "Secrets", "ids": ["not-a-uuid"]}},
        {"graph": {"operation": "upsert", "vertices": [{"collection": "../b", "key": "k"}]}},
        {"graph": {"operation": "delete", "vertex_id": f"{b}/x/y"}},
    ):
        status, answer = await execute(front_end, core, http, grpc_target, a, a_token, part)
        assert status in (400, "INVALID_ARGUMENT"), answer
        assert answer["error"]["code"] in {
            "invalid_request",
            "invalid_parameters",
            "invalid_collection",
        }
    # A's mget of B's spelled-out keys reads A's namespace only.
    status, answer = await execute(
        front_end,
        core,
        http,
        grpc_target,
        a,
        a_token,
        {"dragonflydb": {"operation": "mget", "keys": ["secret", f"dbsvc:{{{b}}}:kv:x"]}},
    )
    assert status == 200, answer
    values = answer["stores"]["dragonflydb"]["result"]
    assert values[0] is None and values[1] is None
    assert await victim_state(core, tenants) == before


async def test_a_tenant_cannot_forge_outbox_entries_for_another_tenant(
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    attacker_conn: asyncpg.Connection,
) -> None:
    before = await victim_state(core, tenants)
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    control = quote_ident(core.settings.control_schema)
    op = json.dumps({"operation": "set", "key": "stolen", "value": "x", "company_id": b})
    # Over a direct login as A's own role (no service, no guard): the table is out of reach.
    for sql in (
        f"INSERT INTO {control}.multidb_outbox (tenant_id, operation_id, store, part, op)"
        f" VALUES ('{b}', gen_random_uuid(), 'dragonflydb', 'dragonflydb', '{op}')",
        f"SELECT * FROM {control}.multidb_outbox",
        f"UPDATE {control}.multidb_outbox SET tenant_id = '{b}'",
        f"DELETE FROM {control}.multidb_outbox",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await attacker_conn.execute(sql)
    # The recording function is callable (it is how A's transactions record), but it takes the
    # tenant from the login: the row is A's, whatever the operation says.
    appliers = core.multidb_outbox.appliers
    entry = await attacker_conn.fetchval(
        f"SELECT {control}.multidb_record(gen_random_uuid(), 'dragonflydb', 'dragonflydb', $1, $2)",
        op,
        appliers.target("dragonflydb"),
    )
    owner = await core.owner_pool.fetchval(
        f"SELECT tenant_id FROM {control}.multidb_outbox WHERE id = $1", entry
    )
    assert owner == a
    applied = await core.multidb_outbox.apply(entry)
    assert applied.status == "applied"
    assert await core.key_values.get(a, "stolen") == b"x"  # in A's namespace
    # A forged entry for a store the applier does not write (or garbage) fails; it runs nothing.
    for store, body in (("clickhouse", '{"query": "SELECT 1"}'), ("vector", '{"x": 1}')):
        forged = await attacker_conn.fetchval(
            f"SELECT {control}.multidb_record(gen_random_uuid(), $1, $1, $2, $3)",
            store,
            body,
            appliers.target(store),
        )
        assert (await core.multidb_outbox.apply(forged)).status == "failed"
    # An entry marked for another instance of a store (another Redis) is not this applier's to
    # apply: it stays pending, for an instance configured alike.
    elsewhere = await attacker_conn.fetchval(
        f"SELECT {control}.multidb_record(gen_random_uuid(), 'dragonflydb', 'dragonflydb', $1,"
        " 'redis:0000000000000000')",
        op,
    )
    assert (await core.multidb_outbox.apply(elsewhere)).status == "pending"
    # Through the service, the guard keeps the function out of tenant SQL altogether.
    response = await tenants.attack(
        http,
        f"SELECT {control}.multidb_record(gen_random_uuid(), 'dragonflydb', 'x', '{{}}', '')",
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "sql_rejected"
    assert await victim_state(core, tenants) == before


async def test_outbox_administration_is_scoped_to_the_callers_tenants(
    core: Application, http: httpx.AsyncClient, tenants: Tenants, a_token: str
) -> None:
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    # B has a failed entry (an increment of a value that is not a number).
    await core.key_values.set(b, "x", b"Missing")
    answer = await core.multidb.execute(
        admin_of(b), TenantContext(b), {"dragonflydb": {"operation": "incr", "key": "x"}}
    )
    b_entry = answer["stores"]["dragonflydb"]["entry_id"]
    assert answer["stores"]["dragonflydb"]["status"] == "failed"
    before = await victim_state(core, tenants)
    a_headers = {"Authorization": f"Bearer {a_token}"}
    listed = await http.get("/api/v1/multi-db/outbox", params={"tenant_id": b}, headers=a_headers)
    assert listed.status_code == 403, listed.text
    assert "Missing" not in listed.text
    retried = await http.post(
        "/api/v1/multi-db/outbox/retry", json={"tenant_id": b, "ids": [b_entry]}, headers=a_headers
    )
    assert retried.status_code == 403, retried.text
    # B's entry id with A's own tenant matches nothing of B's.
    retried = await http.post(
        "/api/v1/multi-db/outbox/retry", json={"tenant_id": a, "ids": [b_entry]}, headers=a_headers
    )
    assert retried.status_code == 200, retried.text
    assert retried.json() == {"retried": []}
    # Ids that are no ids: a clear refusal, never a server error.
    for ids in ([2**63], [-1], [0]):
        bad = await http.post(
            "/api/v1/multi-db/outbox/retry", json={"tenant_id": a, "ids": ids}, headers=a_headers
        )
        assert bad.status_code == 400, bad.text
    bad = await http.get(
        "/api/v1/multi-db/outbox", params={"tenant_id": a, "status": "x"}, headers=a_headers
    )
    assert bad.status_code == 400, bad.text
    own = await http.get("/api/v1/multi-db/outbox", params={"tenant_id": a}, headers=a_headers)
    assert own.status_code == 200
    assert b_entry not in [e["id"] for e in own.json()["entries"]]
    assert await victim_state(core, tenants) == before
    # A platform administrator may list and retry B's.
    platform = await service_token(core, ["*"], (Scope.ADMIN,))
    listed = await http.get(
        "/api/v1/multi-db/outbox",
        params={"tenant_id": b, "status": "failed"},
        headers={"Authorization": f"Bearer {platform}"},
    )
    assert listed.status_code == 200, listed.text
    assert b_entry in [e["id"] for e in listed.json()["entries"]]


@pytest.mark.parametrize("payload", [b"{not json", b"", b"[]", b"\xff\xfe", b'{"postgresql": 1}'])
async def test_bad_operation_json_is_a_clear_refusal(
    grpc_target: str, tenants: Tenants, a_token: str, payload: bytes
) -> None:
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await MultiDatabaseStub(channel).Execute(
                mpb.MultiDbRequest(operation_json=payload),
                metadata=(
                    ("authorization", f"Bearer {a_token}"),
                    ("x-tenant-id", tenants.a.tenant_id),
                ),
            )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata() or ())["dbsvc-error-code"] == "invalid_request"
