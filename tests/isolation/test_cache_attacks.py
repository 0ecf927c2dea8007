"""Tenant A against tenant B through the key-value store and the result cache, through every
front end that reaches them (gRPC and REST).

Key-value: B holds its secret under every key an attacker might spell — separators, glob
characters, braces, NUL, binary, the longest key allowed, B's own namespaced key — and A tries
every operation on every one of those keys, names B as its tenant every way a request can,
and sends keys too long to store. A never sees B's values, never changes them, and is refused
with a stable code (never a server error).

Result cache: A and B each have a table ``cache_probe`` and rows of their own; the same SQL and
parameters from both, and from two users of one tenant, never share an entry (B's first read is
a miss even after A cached it, and every answer holds the reader's own rows); A's writes — its
own table, the shared tables, refused attempts at B's, notifications — never invalidate B's
entries; a read-only caller gets cached answers, and its writes are refused as ever.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from database_service.api.http.app import create_http_app
from database_service.app import Application
from database_service.application import KeyValueOps
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.tenancy import quote_ident
from database_service_client import DatabaseServiceError, MultiDatabaseClient
from database_service_client import PermissionDenied as ClientPermissionDenied
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

FRONT_ENDS = ("grpc", "rest")
_SERVER_ERRORS = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "500"}
VICTIM_VALUE = f"{SECRET}-kv".encode()


def attack_keys(victim: str) -> list[bytes]:
    """Keys B stores its secret under, and A then tries."""
    keys: list[bytes | str] = [
        "k",
        "K",
        " k",
        "k:",
        ":k",
        "k:*",
        "*",
        "k*",
        "?",
        "[a-z]*",
        "{",
        "}",
        "{}",
        f"{{{victim}}}",
        f"{{{victim}}}:kv:k",
        "}:kv:k",
        f"{victim}}}:kv:k",
        f"dbsvc:{{{victim}}}:kv:k",
        f"dbsvc:{{{victim}}}:gen",
        f"dbsvc:{{{victim}}}:*",
        "\x00",
        "k\x00",
        "\x00k",
        b"\xff\xfe\x00k",
        b"\xc0\x80",  # an overlong NUL: not UTF-8
        "ключ",
        "k" * 1024,  # the longest key allowed
        b"\x00" * 1024,
    ]
    return [k.encode("utf-8") if isinstance(k, str) else k for k in keys]


TOO_LONG = [b"k" * 1025, b"k" * 10_240, b"\x00" * 10_240]


@dataclass
class KvOutcome:
    ok: bool
    status: str = "OK"  # gRPC status name, or the HTTP status
    code: str | None = None
    found: bool = False
    value: bytes | None = None
    number: int | None = None
    values: list[bytes | None] = field(default_factory=list)

    @property
    def server_error(self) -> bool:
        return self.status in _SERVER_ERRORS or (
            self.status.startswith("5") and self.status != "503"
        )


def _assert_no_secret(outcome: Any) -> None:
    assert SECRET.encode() not in repr(outcome).encode(), f"victim data leaked: {outcome}"


class KvDoor:
    """Tenant A's door to the key-value store through one front end (raw requests: any key,
    any tenant, any token)."""

    def __init__(
        self,
        name: str,
        *,
        http: httpx.AsyncClient,
        grpc_target: str,
        tenant_id: str,
        token: str,
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
        *,
        key: bytes | None = None,
        value: bytes | None = None,
        ttl_ms: int | None = None,
        by: int | None = None,
        keys: Sequence[bytes] | None = None,
        tenant_id: str | None = None,
        token: str | None = None,
        body_tenant: dict[str, str] | None = None,
    ) -> KvOutcome:
        # The header names the tenant unless the test puts it in the body alone.
        header = tenant_id or self.tenant_id if tenant_id or body_tenant is None else None
        tenant_id = tenant_id or self.tenant_id
        token = token or self.token
        fields = {"key": key, "value": value, "ttl_ms": ttl_ms, "by": by, "keys": keys}
        given = {k: v for k, v in fields.items() if v is not None}
        if self.name == "rest":
            outcome = await self._rest(operation, given, header, token, body_tenant)
        else:
            outcome = await self._grpc(operation, given, tenant_id, token)
        _assert_no_secret(outcome)
        assert not outcome.server_error, f"{self.name}: a server error: {outcome}"
        return outcome

    async def _rest(
        self,
        operation: str,
        given: dict[str, Any],
        header: str | None,
        token: str,
        body_tenant: dict[str, str] | None,
    ) -> KvOutcome:
        def b64(raw: bytes) -> str:
            return base64.b64encode(raw).decode()

        body: dict[str, Any] = {"encoding": "base64", **(body_tenant or {})}
        for name, item in given.items():
            if name in ("key", "value"):
                body[name] = b64(item)
            elif name == "keys":
                body[name] = [b64(k) for k in item]
            else:
                body[name] = item
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        if header is not None:
            headers["X-Tenant-Id"] = header
        response = await self._http.post(
            f"/api/v1/kv/{operation}", content=json.dumps(body).encode(), headers=headers
        )
        status = str(response.status_code)
        document = response.json()
        if response.status_code != 200:
            return KvOutcome(False, status, document.get("error", {}).get("code"))
        assert document["encoding"] == "base64"

        def raw(text: str | None) -> bytes | None:
            return None if text is None else base64.b64decode(text)

        return KvOutcome(
            True,
            status,
            found=document["found"],
            value=raw(document.get("value")),
            number=document.get("number"),
            values=[raw(v) for v in document.get("values") or []],
        )

    async def _grpc(
        self, operation: str, given: dict[str, Any], tenant_id: str, token: str
    ) -> KvOutcome:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._target)
        stub = DatabaseServiceStub(self._channel)
        request = pb.KeyValueRequest(
            operation=getattr(pb, f"KEY_VALUE_OPERATION_{operation.upper()}"), **given
        )
        metadata = (("authorization", f"Bearer {token}"), ("x-tenant-id", tenant_id))
        try:
            response = await stub.KeyValue(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())
            code = trailing.get("dbsvc-error-code")
            return KvOutcome(False, exc.code().name, code if isinstance(code, str) else None)
        return KvOutcome(
            True,
            found=response.found,
            value=response.value if response.found else None,
            number=response.number,
            values=[i.value if i.found else None for i in response.items],
        )


@dataclass
class Victim:
    keys: list[bytes]
    principal: Principal
    ctx: TenantContext


@pytest.fixture(scope="module")
async def victim_keys(core: Application, tenants: Tenants) -> Victim:
    """B's secret under every attack key (with no TTL)."""
    b = tenants.b.tenant_id
    principal = Principal(
        service="victim-kv", tenants=frozenset({b}), scopes=frozenset({Scope.READ, Scope.WRITE})
    )
    ctx = TenantContext(b)
    keys = attack_keys(b)
    for key in keys:
        await core.key_value.set(principal, ctx, key, VICTIM_VALUE)
    await core.key_value.set(principal, ctx, "counter", "100")
    return Victim(keys, principal, ctx)


@pytest.fixture
async def unchanged_victim_keys(core: Application, victim_keys: Victim) -> AsyncIterator[Victim]:
    """B's keys as they were, after the test too (and with no TTL A could have set: they are
    read again after every TTL A set has run out)."""
    ops = core.key_value
    assert await ops.mget(victim_keys.principal, victim_keys.ctx, victim_keys.keys) == [
        VICTIM_VALUE
    ] * len(victim_keys.keys)
    yield victim_keys
    await asyncio.sleep(0.05)  # past every TTL A set (1 ms)
    after = await ops.mget(victim_keys.principal, victim_keys.ctx, victim_keys.keys)
    assert after == [VICTIM_VALUE] * len(victim_keys.keys), "the victim's keys changed"
    assert await ops.get(victim_keys.principal, victim_keys.ctx, "counter") == b"100"


@pytest.fixture(params=FRONT_ENDS)
async def kv_door(
    request: pytest.FixtureRequest,
    core: Application,
    http: httpx.AsyncClient,
    grpc_target: str,
    tenants: Tenants,
    victim_keys: Victim,
) -> AsyncIterator[KvDoor]:
    """Tenant A (read, write and admin over itself only), its attack keys cleared first."""
    a = tenants.a.tenant_id
    token = await service_token(core, [a], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    principal = Principal(service="attacker-kv", tenants=frozenset({a}), scopes=frozenset(Scope))
    for key in [*victim_keys.keys, b"counter"]:
        await core.key_value.delete(principal, TenantContext(a), key)
    door = KvDoor(request.param, http=http, grpc_target=grpc_target, tenant_id=a, token=token)
    yield door
    await door.close()


# -- key-value --------------------------------------------------------------------------------


async def test_a_cannot_read_bs_keys(kv_door: KvDoor, unchanged_victim_keys: Victim) -> None:
    for key in unchanged_victim_keys.keys:
        got = await kv_door.call("get", key=key)
        assert got.ok and not got.found and got.value is None, (key, got)
    everything = await kv_door.call("mget", keys=[*unchanged_victim_keys.keys, b"counter"])
    assert everything.ok and everything.values == [None] * (len(unchanged_victim_keys.keys) + 1)


async def test_a_cannot_change_bs_keys(kv_door: KvDoor, unchanged_victim_keys: Victim) -> None:
    for key in unchanged_victim_keys.keys:
        expired = await kv_door.call("expire", key=key, ttl_ms=1)
        assert expired.ok and not expired.found, (key, expired)
        deleted = await kv_door.call("delete", key=key)
        assert deleted.ok and not deleted.found, (key, deleted)
        counted = await kv_door.call("incr", key=key, by=7)
        assert counted.ok and counted.number == 7, (key, counted)  # A's own key, from 0
        stored = await kv_door.call("set", key=key, value=b"A-OVERWRITE", ttl_ms=60_000)
        assert stored.ok, (key, stored)
        mine = await kv_door.call("get", key=key)
        assert mine.value == b"A-OVERWRITE", (key, mine)  # A's own, in A's namespace
        assert (await kv_door.call("expire", key=key, ttl_ms=1)).found
        assert (await kv_door.call("delete", key=b"counter")).ok
    assert (await kv_door.call("incr", key=b"counter", by=-100)).number == -100


async def test_keys_too_long_are_refused_cleanly(
    kv_door: KvDoor, unchanged_victim_keys: Victim
) -> None:
    for key in TOO_LONG:
        for operation, extra in [
            ("get", {}),
            ("set", {"value": b"x"}),
            ("delete", {}),
            ("incr", {}),
            ("expire", {"ttl_ms": 1}),
        ]:
            refused = await kv_door.call(operation, key=key, **extra)
            assert not refused.ok and refused.code == "invalid_parameters", (operation, refused)
            assert refused.status in ("400", "INVALID_ARGUMENT"), refused
        refused = await kv_door.call("mget", keys=[b"k", key])
        assert (refused.ok, refused.code) == (False, "invalid_parameters")
    refused = await kv_door.call("get", key=b"")
    assert (refused.ok, refused.code) == (False, "invalid_parameters")


async def test_naming_b_as_the_tenant_is_refused(
    kv_door: KvDoor, tenants: Tenants, unchanged_victim_keys: Victim
) -> None:
    b = tenants.b.tenant_id
    operations: list[tuple[str, dict[str, Any]]] = [
        ("get", {"key": b"k"}),
        ("mget", {"keys": [b"k", b"counter"]}),
        ("set", {"key": b"k", "value": b"A"}),
        ("delete", {"key": b"k"}),
        ("incr", {"key": b"counter"}),
        ("expire", {"key": b"k", "ttl_ms": 1}),
    ]
    ways: list[dict[str, Any]] = [{"tenant_id": b}]  # x-tenant-id / X-Tenant-Id
    if kv_door.name == "rest":
        ways += [
            {"body_tenant": {"tenant_id": b}},
            {"body_tenant": {"company_id": b}},
            {"body_tenant": {"tenant_id": b, "company_id": b}},
        ]
    for way in ways:
        for operation, fields in operations:
            refused = await kv_door.call(operation, **fields, **way)
            assert (refused.ok, refused.code) == (False, "permission_denied"), (way, refused)
            assert refused.status in ("403", "PERMISSION_DENIED")
    if kv_door.name == "rest":
        # A's tenant in one place and B's in another is not "A's".
        for body_tenant in [
            {"tenant_id": tenants.a.tenant_id, "company_id": b},
            {"company_id": tenants.a.tenant_id, "tenant_id": b},
        ]:
            mixed = await kv_door.call("get", key=b"k", body_tenant=body_tenant)
            assert (mixed.ok, mixed.status) == (False, "400"), mixed
        mixed = await kv_door.call(
            "get", key=b"k", tenant_id=b, body_tenant={"tenant_id": tenants.a.tenant_id}
        )
        assert not mixed.ok


async def test_a_token_for_b_does_not_open_bs_keys_to_a(
    kv_door: KvDoor, core: Application, tenants: Tenants, unchanged_victim_keys: Victim
) -> None:
    """B's own token for A's tenant is refused too: the token and the tenant must agree."""
    b_token = await service_token(core, [tenants.b.tenant_id], (Scope.READ, Scope.WRITE))
    refused = await kv_door.call("get", key=b"k", token=b_token)
    assert (refused.ok, refused.code) == (False, "permission_denied")


async def test_a_read_only_service_cannot_write(
    kv_door: KvDoor, core: Application, tenants: Tenants, unchanged_victim_keys: Victim
) -> None:
    a = tenants.a.tenant_id
    assert (await kv_door.call("set", key=b"ro", value=b"v")).ok
    reader = await service_token(core, [a], (Scope.READ,))
    assert (await kv_door.call("get", key=b"ro", token=reader)).value == b"v"
    assert (await kv_door.call("mget", keys=[b"ro"], token=reader)).values == [b"v"]
    for operation, fields in [
        ("set", {"key": b"ro", "value": b"x"}),
        ("delete", {"key": b"ro"}),
        ("incr", {"key": b"n"}),
        ("expire", {"key": b"ro", "ttl_ms": 1}),
    ]:
        refused = await kv_door.call(operation, **fields, token=reader)
        assert (refused.ok, refused.code) == (False, "permission_denied"), refused
    assert (await kv_door.call("get", key=b"ro")).value == b"v"
    # Nor can A's read-only service touch B.
    refused = await kv_door.call(
        "set", key=b"k", value=b"x", token=reader, tenant_id=tenants.b.tenant_id
    )
    assert (refused.ok, refused.code) == (False, "permission_denied")


async def test_the_seeds_shape_naming_b_is_refused_before_anything_is_sent(
    core: Application,
    grpc_target: str,
    tenants: Tenants,
    unchanged_victim_keys: Victim,
) -> None:
    a = tenants.a.tenant_id
    token = await service_token(core, [a], (Scope.READ, Scope.WRITE))
    async with MultiDatabaseClient(grpc_target, a, token, retries=0) as client:
        for name in ("company_id", "tenant_id"):
            with pytest.raises(ClientPermissionDenied):
                await client.execute_multi_db_operation(
                    {
                        "dragonflydb": {
                            "operation": "set",
                            "key": "k",
                            "value": "x",
                            name: tenants.b.tenant_id,
                        }
                    }
                )
        assert await client.kv_get("k") is None
        # A client for B holding A's token is refused by the service.
        async with MultiDatabaseClient(grpc_target, tenants.b.tenant_id, token, retries=0) as wrong:
            with pytest.raises(ClientPermissionDenied):
                await wrong.execute_multi_db_operation(
                    {"dragonflydb": {"operation": "get", "key": "k"}}
                )


async def test_a_deleted_tenants_keys_do_not_outlive_it(core: Application, client_for: Any) -> None:
    """A tenant deleted (``delete --confirm``: its schema, roles and shared rows dropped) and a
    tenant created again under the same id must not find the old tenant's keys."""
    tenant_id = f"kvdel_{secrets.token_hex(4)}"
    await core.tenants.create(tenant_id)
    principal = Principal(service="kv-del", tenants=frozenset({tenant_id}), scopes=frozenset(Scope))
    ctx = TenantContext(tenant_id)
    await core.key_value.set(principal, ctx, "balance", "OLD-TENANT")
    await core.tenants.delete(tenant_id, confirm=True)
    core.registry.invalidate(tenant_id)
    await core.tenants.create(tenant_id)
    core.registry.invalidate(tenant_id)
    try:
        assert await core.key_value.get(principal, ctx, "balance") is None, (
            "the key-value store kept a deleted tenant's keys, and a new tenant of that id reads"
            " them"
        )
    finally:
        await core.tenants.delete(tenant_id, confirm=True)


# -- result cache -----------------------------------------------------------------------------

TTL_MS = 60_000
POINT = "SELECT id, owner FROM cache_probe WHERE id = $1"
SCAN = "SELECT owner FROM cache_probe ORDER BY id"
COUNT = "SELECT count(*) FROM cache_probe"
SHARED = "SELECT symbol FROM market_data WHERE symbol LIKE 'C%' ORDER BY 1"
USERS = "SELECT symbol FROM market_data WHERE symbol IN ('CU1SYM', 'CU2SYM', 'CALLSYM') ORDER BY 1"
READS: list[tuple[str, list[Any]]] = [(POINT, [1]), (SCAN, []), (COUNT, []), (SHARED, [])]


@dataclass
class CacheOutcome:
    ok: bool
    rows: list[list[Any]] = field(default_factory=list)
    cache: str = ""
    code: str | None = None
    status: str = "OK"


class CacheDoor:
    """A tenant's reads and writes with the result cache asked, through one front end."""

    def __init__(
        self, name: str, *, http: httpx.AsyncClient, grpc_target: str, victim: bool = False
    ) -> None:
        self.name = name
        self._http = http
        self._target = grpc_target
        self._victim = victim
        self._clients: dict[tuple[str, str | None, str], MultiDatabaseClient] = {}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    async def run(
        self,
        tenant_id: str,
        token: str,
        sql: str,
        params: Sequence[Any] = (),
        *,
        user_id: str | None = None,
        cache: bool = True,
    ) -> CacheOutcome:
        if self.name == "rest":
            outcome = await self._rest(tenant_id, token, sql, params, user_id, cache)
        else:
            outcome = await self._grpc(tenant_id, token, sql, params, user_id, cache)
        if not self._victim:
            _assert_no_secret(outcome)
        assert outcome.status not in _SERVER_ERRORS, outcome
        return outcome

    async def _rest(
        self,
        tenant_id: str,
        token: str,
        sql: str,
        params: Sequence[Any],
        user_id: str | None,
        cache: bool,
    ) -> CacheOutcome:
        body: dict[str, Any] = {"sql": sql, "params": list(params), "tenant_id": tenant_id}
        if cache:
            body["cache_ttl_ms"] = TTL_MS
        if user_id is not None:
            body["user_id"] = user_id
        response = await self._http.post(
            "/api/v1/query", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        document = response.json()
        if response.status_code != 200:
            error = document.get("error", {})
            return CacheOutcome(False, code=error.get("code"), status=str(response.status_code))
        info = document.get("cache") or {}
        assert response.headers.get("x-cache", "") == info.get("status", "")
        return CacheOutcome(True, document["rows"], info.get("status", ""))

    async def _grpc(
        self,
        tenant_id: str,
        token: str,
        sql: str,
        params: Sequence[Any],
        user_id: str | None,
        cache: bool,
    ) -> CacheOutcome:
        key = (tenant_id, user_id, token)
        if key not in self._clients:
            context = {"company_id": tenant_id, **({"user_id": user_id} if user_id else {})}
            self._clients[key] = MultiDatabaseClient(
                self._target, context, token, timeout=60, retries=0
            )
        client = self._clients[key]
        try:
            result = await client.fetch_all(
                sql, list(params), cache=dt.timedelta(milliseconds=TTL_MS) if cache else None
            )
        except DatabaseServiceError as exc:
            return CacheOutcome(False, code=exc.code, status=exc.status.name)
        return CacheOutcome(True, [list(r) for r in result.rows], result.cache)


@dataclass
class Probe:
    a_token: str  # read, write, admin over A
    b_token: str  # read, write over B
    a_reader: str  # read over A
    a: str
    b: str


@pytest.fixture(scope="module")
async def probe(core: Application, tenants: Tenants) -> Probe:
    """``cache_probe`` in A's schema and in B's, the same name, different rows; A's users' rows
    in the shared ``market_data``."""
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    for tenant, owner in ((a, "A-ROW"), (b, f"B-ROW-{SECRET}")):
        admin = Principal(
            service="probe-setup", tenants=frozenset({tenant}), scopes=frozenset(Scope)
        )
        ctx = TenantContext(tenant)
        await core.executor.execute(
            admin, ctx, "CREATE TABLE cache_probe (id int PRIMARY KEY, owner text)", []
        )
        await core.executor.execute(
            admin, ctx, "INSERT INTO cache_probe VALUES (1, $1), (2, $1 || '-2')", [owner]
        )
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, user_id, symbol)"
        " VALUES ($1, 'u1', 'CU1SYM'), ($1, 'u2', 'CU2SYM'), ($1, NULL, 'CALLSYM')",
        a,
    )
    await core.owner_pool.execute(
        f"INSERT INTO {tenants.shared}.market_data (company_id, user_id, symbol)"
        " VALUES ($1, NULL, 'CBSYM')",
        b,
    )
    # PostgreSQL's notifications of these writes arrive a moment later: let them land.
    await asyncio.sleep(0.3)
    return Probe(
        a_token=await service_token(core, [a], (Scope.READ, Scope.WRITE, Scope.ADMIN)),
        b_token=await service_token(core, [b], (Scope.READ, Scope.WRITE)),
        a_reader=await service_token(core, [a], (Scope.READ,)),
        a=a,
        b=b,
    )


@pytest.fixture(params=FRONT_ENDS)
async def cache_door(
    request: pytest.FixtureRequest,
    http: httpx.AsyncClient,
    grpc_target: str,
    core: Application,
    tenants: Tenants,
    probe: Probe,
) -> AsyncIterator[tuple[CacheDoor, CacheDoor]]:
    """(A's door, B's door) through one front end, with every cached entry of both forgotten
    first (the cache's epoch moved on), so each test starts from misses."""
    await core.result_cache.generations.bump_epoch()
    a = CacheDoor(request.param, http=http, grpc_target=grpc_target)
    b = CacheDoor(request.param, http=http, grpc_target=grpc_target, victim=True)
    yield a, b
    await a.close()
    await b.close()


A_ROWS: dict[str, list[list[Any]]] = {
    POINT: [[1, "A-ROW"]],
    SCAN: [["A-ROW"], ["A-ROW-2"]],
    COUNT: [[2]],
    SHARED: [["CALLSYM"], ["CU1SYM"], ["CU2SYM"]],
}
B_ROWS: dict[str, list[list[Any]]] = {
    POINT: [[1, f"B-ROW-{SECRET}"]],
    SCAN: [[f"B-ROW-{SECRET}"], [f"B-ROW-{SECRET}-2"]],
    COUNT: [[2]],
    SHARED: [["CBSYM"]],
}


async def test_the_cache_is_working(cache_door: tuple[CacheDoor, CacheDoor], probe: Probe) -> None:
    """The premise: every read here is cached (a miss, then a hit)."""
    a, _ = cache_door
    for sql, params in READS:
        first = await a.run(probe.a, probe.a_token, sql, params)
        again = await a.run(probe.a, probe.a_token, sql, params)
        assert (first.cache, again.cache) == ("miss", "hit"), (sql, first, again)
        assert first.rows == again.rows == A_ROWS[sql]


@pytest.mark.parametrize("first", ["a", "b"])
async def test_the_same_sql_from_two_tenants_never_shares_an_entry(
    cache_door: tuple[CacheDoor, CacheDoor], probe: Probe, first: str
) -> None:
    a, b = cache_door
    order = [(a, probe.a, probe.a_token, A_ROWS), (b, probe.b, probe.b_token, B_ROWS)]
    if first == "b":
        order.reverse()
    for sql, params in READS:
        (door1, t1, tok1, rows1), (door2, t2, tok2, rows2) = order
        one = await door1.run(t1, tok1, sql, params)
        one_again = await door1.run(t1, tok1, sql, params)
        assert (one.cache, one_again.cache, one.rows) == ("miss", "hit", rows1[sql]), sql
        # The other tenant, the same SQL and parameters: its own rows, a miss first.
        two = await door2.run(t2, tok2, sql, params)
        assert (two.cache, two.rows) == ("miss", rows2[sql]), (sql, two)
        two_again = await door2.run(t2, tok2, sql, params)
        assert (two_again.cache, two_again.rows) == ("hit", rows2[sql]), (sql, two_again)
        # And the first tenant still gets its own.
        back = await door1.run(t1, tok1, sql, params)
        assert (back.cache, back.rows) == ("hit", rows1[sql]), (sql, back)


async def test_two_users_of_one_tenant_never_share_an_entry(
    cache_door: tuple[CacheDoor, CacheDoor], probe: Probe
) -> None:
    a, _ = cache_door
    expected = {
        "u1": [["CALLSYM"], ["CU1SYM"]],
        "u2": [["CALLSYM"], ["CU2SYM"]],
        None: [["CALLSYM"], ["CU1SYM"], ["CU2SYM"]],
        "u3": [["CALLSYM"]],
    }
    for user, rows in expected.items():
        got = await a.run(probe.a, probe.a_token, USERS, user_id=user)
        assert (got.cache, got.rows) == ("miss", rows), (user, got)
    for user in reversed(list(expected)):
        got = await a.run(probe.a, probe.a_token, USERS, user_id=user)
        assert (got.cache, got.rows) == ("hit", expected[user]), (user, got)
    # A user id that only looks like another ("u1 ", "U1") is another user.
    for lookalike in ("U1", "u1.", "u10"):
        got = await a.run(probe.a, probe.a_token, USERS, user_id=lookalike)
        assert (got.cache, got.rows) == ("miss", [["CALLSYM"]]), (lookalike, got)


WRITES_OF_A = [
    "UPDATE cache_probe SET owner = owner WHERE id = 1",
    "UPDATE cache_probe SET owner = owner",
    "INSERT INTO cache_probe VALUES (3, 'A-3') ON CONFLICT (id) DO UPDATE SET owner = 'A-3'",
    "DELETE FROM cache_probe WHERE id = 3",
    "INSERT INTO market_data (symbol) VALUES ('CA-NEW')",
    "DELETE FROM market_data WHERE symbol = 'CA-NEW'",
]


async def test_a_tenant_cannot_invalidate_another_tenants_entries(
    cache_door: tuple[CacheDoor, CacheDoor], core: Application, tenants: Tenants, probe: Probe
) -> None:
    a, b = cache_door
    for sql, params in READS:
        await b.run(probe.b, probe.b_token, sql, params)
        assert (await b.run(probe.b, probe.b_token, sql, params)).cache == "hit"
    b_schema = tenants.b.schema_name
    attempts = [
        *WRITES_OF_A,
        # B's table by name, B's rows of the shared table, and invalidation by hand: refused.
        f"UPDATE {b_schema}.cache_probe SET owner = 'X' WHERE id = 1",
        f"INSERT INTO market_data (company_id, symbol) VALUES ('{probe.b}', 'CFORGED')",
        f"SELECT pg_notify('dbsvc_invalidate', '{probe.b}|{b_schema}.cache_probe|1|0')",
        f"NOTIFY dbsvc_invalidate, '{probe.b}|{b_schema}.cache_probe|1|0'",
        f"SELECT pg_notify('dbsvc_invalidate', '*|{tenants.shared}.market_data|1|0')",
    ]
    for sql in attempts:
        done = await a.run(probe.a, probe.a_token, sql, cache=False)
        assert done.ok is (sql in WRITES_OF_A), (sql, done)
    # B's rows of a shared table: row-level security shows A none, so A writes none.
    none = await a.run(
        probe.a,
        probe.a_token,
        f"UPDATE market_data SET symbol = symbol WHERE company_id = '{probe.b}' RETURNING 1",
        cache=False,
    )
    assert (none.ok, none.rows) == (True, [])
    # A's own table written straight into PostgreSQL (the notification path), then emptied.
    await core.owner_pool.execute(
        f"UPDATE {tenants.a.schema_name}.cache_probe SET owner = owner WHERE id = 2"
    )
    assert (await a.run(probe.a, probe.a_token, "TRUNCATE cache_probe", cache=False)).ok
    # A's writes reached A's entries (the premise), not B's.
    assert (await a.run(probe.a, probe.a_token, COUNT)).rows == [[0]]
    await asyncio.sleep(0.3)  # notifications of direct writes have been applied by now
    for sql, params in READS:
        got = await b.run(probe.b, probe.b_token, sql, params)
        assert (got.cache, got.rows) == ("hit", B_ROWS[sql]), (sql, got)
    # Put A's rows back for the next test.
    admin = Principal(service="probe-setup", tenants=frozenset({probe.a}), scopes=frozenset(Scope))
    await core.executor.execute(
        admin,
        TenantContext(probe.a),
        "INSERT INTO cache_probe VALUES (1, 'A-ROW'), (2, 'A-ROW-2')",
        [],
    )


async def test_a_tenant_cannot_invalidate_through_a_function_it_writes(
    cache_door: tuple[CacheDoor, CacheDoor], tenants: Tenants, probe: Probe
) -> None:
    """A function or trigger body that notifies is refused like the statement itself."""
    a, b = cache_door
    await b.run(probe.b, probe.b_token, SCAN)
    payload = f"{probe.b}|{tenants.b.schema_name}.cache_probe|1|0"
    name = f"notify_{secrets.token_hex(3)}"
    for body in (
        f"PERFORM pg_notify('dbsvc_invalidate', '{payload}');",
        f"NOTIFY dbsvc_invalidate, '{payload}';",
        f"EXECUTE 'NOTIFY dbsvc_invalidate, ''{payload}''';",
    ):
        created = await a.run(
            probe.a,
            probe.a_token,
            f"CREATE FUNCTION {name}() RETURNS void LANGUAGE plpgsql AS $f$ BEGIN {body} END $f$",
            cache=False,
        )
        if created.ok:
            await a.run(probe.a, probe.a_token, f"SELECT {name}()", cache=False)
            await a.run(probe.a, probe.a_token, f"DROP FUNCTION {name}()", cache=False)
    await asyncio.sleep(0.3)
    got = await b.run(probe.b, probe.b_token, SCAN)
    assert (got.cache, got.rows) == ("hit", B_ROWS[SCAN]), got


async def test_a_read_only_caller_gets_cached_answers_and_cannot_write(
    cache_door: tuple[CacheDoor, CacheDoor], probe: Probe
) -> None:
    a, _ = cache_door
    first = await a.run(probe.a, probe.a_reader, POINT, [1])
    assert (first.cache, first.rows) == ("miss", A_ROWS[POINT])
    again = await a.run(probe.a, probe.a_reader, POINT, [1])
    assert (again.cache, again.rows) == ("hit", A_ROWS[POINT])
    # An entry a read-write caller of the same tenant stored answers it too (the same rows).
    await a.run(probe.a, probe.a_token, SCAN)
    assert (await a.run(probe.a, probe.a_reader, SCAN)).cache == "hit"
    for write in (
        "UPDATE cache_probe SET owner = 'RO' WHERE id = 1",
        "WITH u AS (UPDATE cache_probe SET owner = 'RO' RETURNING owner) SELECT owner FROM u",
        "INSERT INTO market_data (symbol) VALUES ('CRO')",
        "DELETE FROM cache_probe",
    ):
        for cached in (True, False):
            refused = await a.run(probe.a, probe.a_reader, write, cache=cached)
            assert (refused.ok, refused.code) == (False, "permission_denied"), (write, refused)
    # Nothing changed: the cached answers are still hits, and still right.
    for sql, params in ((POINT, [1]), (SCAN, [])):
        got = await a.run(probe.a, probe.a_token, sql, params)
        assert (got.cache, got.rows) == ("hit", A_ROWS[sql]), got
    fresh = await a.run(probe.a, probe.a_token, SCAN, cache=False)
    assert fresh.rows == A_ROWS[SCAN]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT owner FROM cache_probe WHERE id = 1 FOR UPDATE",
        "SELECT owner FROM cache_probe FOR SHARE",
        "UPDATE cache_probe SET owner = owner WHERE id = 2",
        "WITH u AS (UPDATE cache_probe SET owner = owner RETURNING id) SELECT count(*) FROM u",
    ],
)
async def test_a_write_asked_to_be_cached_runs_uncached(
    cache_door: tuple[CacheDoor, CacheDoor], probe: Probe, statement: str
) -> None:
    """A statement that writes or takes row locks is never answered from the cache, whatever
    the request asked: a read-write caller runs it (uncached), a read-only caller is refused
    (it is not a read it may run), and neither is a server error."""
    a, _ = cache_door
    for _ in range(2):
        writer = await a.run(probe.a, probe.a_token, statement)
        assert writer.ok and writer.cache in ("", "bypass"), writer
    reader = await a.run(probe.a, probe.a_reader, statement)
    assert (reader.ok, reader.code) == (False, "permission_denied"), reader


async def test_a_notification_from_a_direct_login_does_not_invalidate_b(
    core: Application,
    cache_door: tuple[CacheDoor, CacheDoor],
    tenants: Tenants,
    probe: Probe,
    attacker_conn: Any,
) -> None:
    """Outside the threat model (only the service holds a tenant's password, SECURITY.md), and
    still refused: A's own login, connected straight to PostgreSQL, sends the invalidation
    channel a notification naming B's table — unsigned, with a made-up signature, and asking
    the control plane to sign it."""
    _, b = cache_door
    await b.run(probe.b, probe.b_token, SCAN)
    assert (await b.run(probe.b, probe.b_token, SCAN)).cache == "hit"
    control = quote_ident(core.settings.control_schema)
    payload = f"{probe.b}|{tenants.b.schema_name}.cache_probe|1|0"
    await attacker_conn.execute("SELECT pg_notify('dbsvc_invalidate', $1)", payload)
    await attacker_conn.execute("SELECT pg_notify('dbsvc_invalidate', $1)", payload + "|0" * 16)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await attacker_conn.execute(f"SELECT {control}.cache_signed($1)", payload)
    await asyncio.sleep(0.3)
    got = await b.run(probe.b, probe.b_token, SCAN)
    assert got.rows == B_ROWS[SCAN]
    assert got.cache == "hit", "a tenant's own login can invalidate another tenant's entries"


# -- eviction ---------------------------------------------------------------------------------


async def test_a_tenant_cannot_evict_another_tenants_keys(
    core: Application, tenants: Tenants
) -> None:
    """The embedded default (PostgreSQL's table) evicts nothing; Redis's eviction is its
    deployment's ``maxmemory-policy`` (documented: ``noeviction`` for key-value use)."""
    store = core.key_values
    ops = KeyValueOps(core.access, store, core.registry, core.audit)
    a, b = tenants.a.tenant_id, tenants.b.tenant_id
    b_principal = Principal(service="b", tenants=frozenset({b}), scopes=frozenset(Scope))
    a_principal = Principal(service="a", tenants=frozenset({a}), scopes=frozenset(Scope))
    await ops.set(b_principal, TenantContext(b), "balance", VICTIM_VALUE)
    for i in range(40):  # 40 x 16 KiB: far less than any sane service would write
        await ops.set(a_principal, TenantContext(a), f"fill-{i}", b"x" * 16 * 1024)
    assert await ops.get(b_principal, TenantContext(b), "balance") == VICTIM_VALUE, (
        "tenant A's writes evicted tenant B's key"
    )


async def test_a_tenant_cannot_evict_another_tenants_entries(
    pg_cluster: PgCluster, tmp_path: Path, tenants: Tenants, probe: Probe
) -> None:
    settings = make_settings(pg_cluster, tmp_path / "data", cache_l1_bytes=256 * 1024)
    async with Application(settings, start_nats=False, maintain_partitions=False) as small:
        transport = httpx.ASGITransport(app=create_http_app(small))
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            door_a = CacheDoor("rest", http=http, grpc_target="")
            door_b = CacheDoor("rest", http=http, grpc_target="", victim=True)
            # Warm until B's entry is a hit: an invalidation of the fixtures' writes may still
            # reach this new instance's listener and cost a miss (not what this test is about).
            for _ in range(20):
                if (await door_b.run(probe.b, probe.b_token, POINT, [1])).cache == "hit":
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("B's entry never became a hit")
            for i in range(40):
                filled = await door_a.run(
                    probe.a,
                    probe.a_token,
                    "SELECT repeat('x', 16384) FROM cache_probe WHERE id = $1 AND $2::int >= 0",
                    [1, i],
                )
                assert filled.cache == "miss", filled
            got = await door_b.run(probe.b, probe.b_token, POINT, [1])
            assert got.rows == B_ROWS[POINT]
            assert got.cache == "hit", "tenant A's reads evicted tenant B's cached entry"


# -- answers replayed: a cached read asked again and again ------------------------------------
# gRPC answers a cached read it answered before from L1 without its checks' coroutines once
# everything they found still holds (``query.replays``). From the third read of a kind on, the
# reads below are such replays; REST runs the same tests (its reads go the whole way).

REPEATS = 5


async def _repeated(
    door: CacheDoor, tenant: str, token: str, sql: str, params: Sequence[Any], **kw: Any
) -> list[CacheOutcome]:
    return [await door.run(tenant, token, sql, params, **kw) for _ in range(REPEATS)]


def _replays(core: Application) -> float:
    core.executor.book()
    value = core.metrics.registry.get_sample_value("dbsvc_cache_replays_total")
    return value or 0.0


async def test_replayed_answers_keep_to_their_tenant_and_user(
    cache_door: tuple[CacheDoor, CacheDoor], core: Application, probe: Probe
) -> None:
    a, b = cache_door
    replays = _replays(core)
    for got in await _repeated(a, probe.a, probe.a_token, POINT, [1]):
        assert got.rows == A_ROWS[POINT], got
    # B, after A's read is replayed: its own rows, its own entry (a miss first).
    got_b = await _repeated(b, probe.b, probe.b_token, POINT, [1])
    assert [g.cache for g in got_b] == ["miss"] + ["hit"] * (REPEATS - 1)
    assert all(g.rows == B_ROWS[POINT] for g in got_b), got_b
    # Users of A, each replayed in turn, then again interleaved: never another user's rows.
    expected = {"u1": [["CALLSYM"], ["CU1SYM"]], "u2": [["CALLSYM"], ["CU2SYM"]]}
    for user, rows in expected.items():
        for got in await _repeated(a, probe.a, probe.a_token, USERS, [], user_id=user):
            assert got.rows == rows, (user, got)
    for _ in range(REPEATS):
        for user, rows in expected.items():
            got = await a.run(probe.a, probe.a_token, USERS, user_id=user)
            assert (got.cache, got.rows) == ("hit", rows), (user, got)
    # A's token naming B, and B's token naming A, once each read is replayed: refused as ever.
    for tenant, token in ((probe.b, probe.a_token), (probe.a, probe.b_token)):
        refused = await a.run(tenant, token, POINT, [1])
        assert (refused.ok, refused.code) == (False, "permission_denied"), refused
    if a.name == "grpc":  # the premise: these were replays
        assert _replays(core) - replays >= 4 * (REPEATS - 2), "no read was replayed"


async def test_a_write_is_seen_by_the_next_read_after_replays(
    cache_door: tuple[CacheDoor, CacheDoor], probe: Probe
) -> None:
    """The contract: never a result older than the instance's own acknowledged write — here
    after the read was replayed, and B's replayed entry is left alone."""
    a, b = cache_door
    await _repeated(a, probe.a, probe.a_token, POINT, [1])
    await _repeated(b, probe.b, probe.b_token, POINT, [1])
    update = "UPDATE cache_probe SET owner = $1 WHERE id = 1"
    try:
        assert (await a.run(probe.a, probe.a_token, update, ["A-NEW"], cache=False)).ok
        got = await a.run(probe.a, probe.a_token, POINT, [1])
        assert (got.cache, got.rows) == ("miss", [[1, "A-NEW"]]), got
        assert (await a.run(probe.a, probe.a_token, POINT, [1])).rows == [[1, "A-NEW"]]
    finally:
        assert (await a.run(probe.a, probe.a_token, update, ["A-ROW"], cache=False)).ok
    got_b = await b.run(probe.b, probe.b_token, POINT, [1])
    assert (got_b.cache, got_b.rows) == ("hit", B_ROWS[POINT]), got_b


# Statements checked before (``QueryExecutor.checked``): a caller's uncached read asked again
# skips the checks' coroutines when its credential, tenant and schema are as they were; the same
# expectations hold on REST, which always checks.


def _checked(core: Application) -> int:
    return len(core.executor._checked)


async def test_statements_checked_before_keep_to_their_tenant_and_user(
    cache_door: tuple[CacheDoor, CacheDoor], core: Application, probe: Probe
) -> None:
    a, b = cache_door
    kept = _checked(core)
    for got in await _repeated(a, probe.a, probe.a_token, POINT, [1], cache=False):
        assert got.ok and got.rows == A_ROWS[POINT], got
    # B, after A's checks were kept: the same text, its own rows.
    for got in await _repeated(b, probe.b, probe.b_token, POINT, [1], cache=False):
        assert got.ok and got.rows == B_ROWS[POINT], got
    # The same text under another parameter is still the caller's own read.
    got = await a.run(probe.a, probe.a_token, POINT, [2], cache=False)
    assert got.rows == [[2, "A-ROW-2"]], got
    expected = {"u1": [["CALLSYM"], ["CU1SYM"]], "u2": [["CALLSYM"], ["CU2SYM"]]}
    for user, rows in expected.items():
        for got in await _repeated(a, probe.a, probe.a_token, USERS, [], user_id=user, cache=False):
            assert got.rows == rows, (user, got)
    for _ in range(REPEATS):
        for user, rows in expected.items():
            got = await a.run(probe.a, probe.a_token, USERS, user_id=user, cache=False)
            assert (got.ok, got.rows) == (True, rows), (user, got)
    # A's token naming B, and B's naming A, after their own statements' checks were kept.
    for tenant, token in ((probe.b, probe.a_token), (probe.a, probe.b_token)):
        refused = await a.run(tenant, token, POINT, [1], cache=False)
        assert (refused.ok, refused.code) == (False, "permission_denied"), refused
    if a.name == "grpc":  # the premise: checks were kept for A, B and both users
        assert _checked(core) - kept >= 4, "no statement's checks were kept"


# What a gRPC caller's earlier requests left kept: a cached read's replay, or (uncached) its
# statement's checks.
KEPT = {"replayed": True, "checked": False}


@pytest.mark.parametrize("kept", KEPT)
@pytest.mark.parametrize("taken", ["token revoked", "service disabled"])
async def test_a_credential_taken_away_gets_nothing_from_what_was_kept(
    cache_door: tuple[CacheDoor, CacheDoor],
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    probe: Probe,
    taken: str,
    kept: str,
) -> None:
    a, _ = cache_door
    cache = KEPT[kept]
    name = f"rp-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=[probe.a], scopes=[Scope.READ], with_secret=False)
    token = core.tokens.issue(name, tenants=[probe.a], scopes=[Scope.READ], ttl_seconds=600)
    assert all(g.ok for g in await _repeated(a, probe.a, token, POINT, [1], cache=cache))
    if taken == "token revoked":
        revoked = await http.post(
            "/api/v1/admin/tokens/revoke", json={"token": token}, headers=tenants.a_headers
        )
        assert revoked.status_code == 200, revoked.text
    else:
        admin = Principal(service="rp-admin", tenants=frozenset({probe.a}), scopes=frozenset(Scope))
        await core.service_admin.set_active(admin, name, False)
    refused = await a.run(probe.a, token, POINT, [1], cache=cache)
    assert (refused.ok, refused.code) == (False, "unauthenticated"), refused


@pytest.mark.parametrize("kept", KEPT)
async def test_a_credential_taken_away_during_calls_at_once_gets_nothing_kept(
    cache_door: tuple[CacheDoor, CacheDoor],
    core: Application,
    http: httpx.AsyncClient,
    tenants: Tenants,
    probe: Probe,
    kept: str,
) -> None:
    """Calls that check one credential at once end with one principal object for it (what
    replays are kept under) only while it is unchanged: revoked while they are in flight,
    each is refused, as is every call after them, and nothing kept answers."""
    a, _ = cache_door
    cache = KEPT[kept]
    name = f"rc-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=[probe.a], scopes=[Scope.READ], with_secret=False)
    token = core.tokens.issue(name, tenants=[probe.a], scopes=[Scope.READ], ttl_seconds=600)
    for _ in range(2):  # checked again by calls at once: still answered, from what was kept
        answers = await asyncio.gather(
            *(a.run(probe.a, token, POINT, [1], cache=cache) for _ in range(12))
        )
        assert all(g.ok and g.rows == A_ROWS[POINT] for g in answers), answers
    in_flight = [
        asyncio.ensure_future(a.run(probe.a, token, POINT, [1], cache=cache)) for _ in range(12)
    ]
    revoked = await http.post(
        "/api/v1/admin/tokens/revoke", json={"token": token}, headers=tenants.a_headers
    )
    assert revoked.status_code == 200, revoked.text
    for got in await asyncio.gather(*in_flight):  # before or after: A's own rows or refused
        assert (got.ok and got.rows == A_ROWS[POINT]) or got.code == "unauthenticated", got
    after = await asyncio.gather(
        *(a.run(probe.a, token, POINT, [1], cache=cache) for _ in range(12))
    )
    assert all((g.ok, g.code) == (False, "unauthenticated") for g in after), after


@pytest.mark.parametrize("kept", KEPT)
async def test_a_suspended_tenant_gets_nothing_from_what_was_kept(
    cache_door: tuple[CacheDoor, CacheDoor], core: Application, probe: Probe, kept: str
) -> None:
    a, _ = cache_door
    cache = KEPT[kept]
    assert all(g.ok for g in await _repeated(a, probe.a, probe.a_token, POINT, [1], cache=cache))
    await core.tenants.suspend(probe.a)
    try:
        refused = await a.run(probe.a, probe.a_token, POINT, [1], cache=cache)
        assert (refused.ok, refused.code) == (False, "tenant_suspended"), refused
    finally:
        await core.tenants.resume(probe.a)
    again = await a.run(probe.a, probe.a_token, POINT, [1], cache=cache)
    assert again.ok and again.rows == A_ROWS[POINT], again


async def test_a_checked_statement_follows_ddl_made_outside_the_service(
    cache_door: tuple[CacheDoor, CacheDoor], core: Application, tenants: Tenants, probe: Probe
) -> None:
    """A table altered behind the service's back (an operator's psql): the statement kept on
    the pooled connections is refused by PostgreSQL, and the read is answered in the table's
    new shape, not failed."""
    a, _ = cache_door
    table = f"{quote_ident(tenants.a.schema_name)}.cs_probe"
    await core.owner_pool.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    await core.owner_pool.execute(f"INSERT INTO {table} VALUES (1, 'one')")
    await core.owner_pool.execute(f"GRANT SELECT ON {table} TO {quote_ident(tenants.a.role_name)}")
    read = "SELECT * FROM cs_probe WHERE id = $1"
    try:
        for got in await _repeated(a, probe.a, probe.a_token, read, [1], cache=False):
            assert (got.ok, got.rows) == (True, [[1, "one"]]), got
        await core.owner_pool.execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7")
        for got in await _repeated(a, probe.a, probe.a_token, read, [1], cache=False):
            assert (got.ok, got.rows) == (True, [[1, "one", 7]]), got
    finally:
        await core.owner_pool.execute(f"DROP TABLE {table}")
