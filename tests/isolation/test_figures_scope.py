"""Figures that describe other tenants: health, Prometheus metrics, performance figures and the
shared partitions' sizes. Without credentials the service names no tenant, role, schema, pool or
count; a tenant's token sees its own figures only; the whole picture is for the platform (a
principal over every tenant holding ``metrics`` or ``admin``). Each check runs over REST and gRPC
where both front ends have the endpoint.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service_client import MultiDatabaseClient
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.fix_service import ADMIN_TOKEN, TenantFactory
from tests.isolation.fix_attack import SECRET, Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

FRONT_ENDS = ("rest", "grpc")
SMALL_HEALTH = {"service_name", "status", "version", "timestamp", "dependencies"}
RWA = (Scope.READ, Scope.WRITE, Scope.ADMIN)
SERVICE_WIDE = ("audit_events_written", "audit_queue_depth", "pool_global_max")


@dataclass
class Reply:
    code: str  # "ok", or the service's stable error code
    document: dict[str, Any]
    text: str


class Figures:
    """Health and performance figures through either front end, with exactly the credentials
    given (none, a token, a tenant header), so absent credentials can be tested too."""

    def __init__(self, http: httpx.AsyncClient, target: str) -> None:
        self.http = http
        self.target = target

    @staticmethod
    def _headers(token: str | None, tenant_id: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return {**headers, **({"X-Tenant-Id": tenant_id} if tenant_id else {})}

    async def _rest(self, path: str, token: str | None, tenant_id: str | None) -> Reply:
        response = await self.http.get(path, headers=self._headers(token, tenant_id))
        document = response.json()
        if response.status_code in {200, 503} and "error" not in document:
            return Reply("ok", document, response.text)
        return Reply(document["error"]["code"], document, response.text)

    async def _grpc(self, method: str, token: str | None, tenant_id: str | None) -> Reply:
        metadata = tuple((k.lower(), v) for k, v in self._headers(token, tenant_id).items())
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = DatabaseServiceStub(channel)
            request = pb.HealthRequest() if method == "HealthCheck" else pb.MetricsRequest()
            try:
                reply = await getattr(stub, method)(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                trailing = dict(exc.trailing_metadata() or ())
                code = trailing.get("dbsvc-error-code") or exc.code().name.lower()
                return Reply(str(code), {}, exc.details() or "")
        return Reply("ok", json.loads(reply.document_json), f"{reply}")

    async def performance(
        self, front_end: str, token: str | None, tenant_id: str | None = None
    ) -> Reply:
        if front_end == "rest":
            reply = await self._rest("/api/v1/metrics/performance", token, tenant_id)
        else:
            reply = await self._grpc("GetPerformanceMetrics", token, tenant_id)
        assert SECRET not in reply.text
        return reply

    async def health(
        self, front_end: str, token: str | None, tenant_id: str | None = None
    ) -> Reply:
        if front_end == "rest":
            reply = await self._rest("/api/v1/health", token, tenant_id)
        else:
            reply = await self._grpc("HealthCheck", token, tenant_id)
        assert SECRET not in reply.text
        return reply


@pytest.fixture
def figures(http: httpx.AsyncClient, grpc_target: str) -> Figures:
    return Figures(http, grpc_target)


@pytest.fixture
async def both_active(http: httpx.AsyncClient, tenants: Tenants) -> None:
    """A and B both ran a request just now, so both have pools and request figures."""
    assert (await tenants.attack(http, "SELECT 1")).status_code == 200
    assert (await tenants.as_victim(http, "SELECT 1")).status_code == 200


def names_of_others(core: Application, tenants: Tenants) -> list[str]:
    return [
        tenants.b.tenant_id,
        tenants.b.schema_name,
        tenants.b.role_name,
        core.settings.tenant_group_role,
    ]


# --- Prometheus ----------------------------------------------------------------------------


async def test_prometheus_metrics_need_a_token_and_the_refusal_is_audited(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    since = dt.datetime.now(dt.UTC)
    response = await http.get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    events = (await http.get("/api/v1/admin/audit", headers=admin_headers)).json()["events"]
    assert any(
        e["outcome"] == "denied"
        and e["code"] == "unauthenticated"
        and e["action"] == "/metrics"
        and dt.datetime.fromisoformat(e["at"]) >= since
        for e in events
    )


@pytest.mark.parametrize(
    ("tenant_ids", "scopes"),
    [(["{a}"], ["read", "write", "admin"]), (["{a}"], ["metrics"]), (["*"], ["read"])],
    ids=["tenant admin", "tenant metrics", "platform without metrics"],
)
async def test_prometheus_metrics_refuse_anyone_but_the_platform(
    http: httpx.AsyncClient,
    core: Application,
    tenants: Tenants,
    tenant_ids: list[str],
    scopes: list[Any],
) -> None:
    token = await service_token(
        core,
        [t.format(a=tenants.a.tenant_id) for t in tenant_ids],
        [Scope(s) for s in scopes],
    )
    response = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403, response.text[:300]
    assert tenants.b.tenant_id not in response.text


@pytest.mark.parametrize("holder", ["metrics scope", "bootstrap admin"])
async def test_prometheus_metrics_for_the_platform(
    http: httpx.AsyncClient, core: Application, tenants: Tenants, both_active: None, holder: str
) -> None:
    token = (
        await service_token(core, ["*"], [Scope("metrics")])
        if holder == "metrics scope"
        else ADMIN_TOKEN
    )
    response = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert "dbsvc_requests_total" in response.text
    assert f'tenant="{tenants.b.tenant_id}"' in response.text  # the platform sees every pool


# --- performance figures -------------------------------------------------------------------


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_performance_figures_need_a_token(figures: Figures, front_end: str) -> None:
    assert (await figures.performance(front_end, None)).code == "unauthenticated"


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_tenant_performance_figures_name_no_other_tenant(
    figures: Figures, core: Application, tenants: Tenants, both_active: None, front_end: str
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], RWA)
    reply = await figures.performance(front_end, token, tenants.a.tenant_id)
    assert reply.code == "ok", reply.text
    for name in names_of_others(core, tenants):
        assert name not in reply.text
    assert set(reply.document.get("pools", {})) <= {tenants.a.tenant_id}
    for key in SERVICE_WIDE:
        assert key not in reply.document


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_tenant_performance_figures_need_a_tenant_the_caller_acts_for(
    figures: Figures, core: Application, tenants: Tenants, both_active: None, front_end: str
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], RWA)
    other = await figures.performance(front_end, token, tenants.b.tenant_id)
    assert other.code == "permission_denied"
    none = await figures.performance(front_end, token, None)
    assert none.code == "invalid_request"
    for reply in (other, none):
        assert "pools" not in reply.document


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_tenant_performance_figures_count_only_its_own_requests(
    figures: Figures,
    http: httpx.AsyncClient,
    core: Application,
    tenants: Tenants,
    new_tenant: TenantFactory,
    front_end: str,
) -> None:
    c = await new_tenant("figs")
    token = await service_token(core, [c.tenant_id], [Scope.READ])
    for _ in range(3):
        response = await http.post(
            "/api/v1/query",
            json={"sql": "SELECT 1", "tenant_id": c.tenant_id},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200
    for _ in range(5):
        await tenants.as_victim(http, "SELECT 1")
        await tenants.attack(http, "SELECT * FROM no_such_table")  # A's errors are A's
    reply = await figures.performance(front_end, token, c.tenant_id)
    assert reply.code == "ok", reply.text
    assert reply.document["requests"] == 3
    assert reply.document["error_rate_percent"] == 0
    assert set(reply.document["pools"]) <= {c.tenant_id}


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_platform_without_metrics_scope_sees_one_tenant_only(
    figures: Figures, core: Application, tenants: Tenants, both_active: None, front_end: str
) -> None:
    token = await service_token(core, ["*"], [Scope.READ])
    reply = await figures.performance(front_end, token, tenants.a.tenant_id)
    assert reply.code == "ok"
    assert tenants.b.tenant_id not in reply.text
    assert (await figures.performance(front_end, token, None)).code == "invalid_request"


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_platform_metrics_principal_sees_every_tenant(
    figures: Figures, core: Application, tenants: Tenants, both_active: None, front_end: str
) -> None:
    token = await service_token(core, ["*"], [Scope("metrics")])
    reply = await figures.performance(front_end, token)
    assert reply.code == "ok", reply.text
    assert {tenants.a.tenant_id, tenants.b.tenant_id} <= set(reply.document["pools"])
    assert reply.document["pool_connections_open"] >= 2


# --- health --------------------------------------------------------------------------------


def assert_small_health(reply: Reply, core: Application, tenants: Tenants) -> None:
    assert reply.code == "ok", reply.text
    assert set(reply.document) == SMALL_HEALTH, sorted(reply.document)
    assert reply.document["dependencies"]["postgresql"]["status"] == "healthy"
    for dependency in reply.document["dependencies"].values():
        assert set(dependency) <= {"status", "embedded"}, dependency
    for name in (
        *names_of_others(core, tenants),
        tenants.a.tenant_id,
        tenants.a.role_name,
        core.settings.tenant_role_prefix,
    ):
        assert name not in reply.text


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_health_without_credentials_is_the_small_document(
    figures: Figures, core: Application, tenants: Tenants, both_active: None, front_end: str
) -> None:
    assert_small_health(await figures.health(front_end, None), core, tenants)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
async def test_health_for_a_tenant_token_is_the_small_document(
    figures: Figures, core: Application, tenants: Tenants, both_active: None, front_end: str
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], RWA)
    assert_small_health(await figures.health(front_end, token, tenants.a.tenant_id), core, tenants)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("holder", ["metrics scope", "bootstrap admin"])
async def test_health_for_the_platform_is_the_full_document(
    figures: Figures, core: Application, tenants: Tenants, front_end: str, holder: str
) -> None:
    token = (
        await service_token(core, ["*"], [Scope("metrics")])
        if holder == "metrics scope"
        else ADMIN_TOKEN
    )
    reply = await figures.health(front_end, token, tenants.a.tenant_id)
    assert reply.code == "ok"
    assert reply.document["tenant_context"]["active_tenants"] >= 2
    assert "database_details" in reply.document and "performance_metrics" in reply.document


# --- shared partitions (gRPC ManagePartitions LIST is open to a tenant's read scope) --------


@pytest.fixture
async def a_client(core: Application, grpc_target: str, tenants: Tenants) -> AsyncIterator[Any]:
    token = await service_token(core, [tenants.a.tenant_id], RWA)
    async with MultiDatabaseClient(grpc_target, tenants.a.tenant_id, token, retries=0) as client:
        yield client


async def test_tenant_partition_listing_hides_the_shared_figures(
    a_client: MultiDatabaseClient, core: Application, grpc_target: str, tenants: Tenants
) -> None:
    await a_client.fetch_all(
        "CREATE TABLE IF NOT EXISTS a_parts (at date NOT NULL, v int) PARTITION BY RANGE (at)"
    )
    await a_client.fetch_all(
        "CREATE TABLE IF NOT EXISTS a_parts_2024 PARTITION OF a_parts"
        " FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')"
    )
    await a_client.fetch_all("INSERT INTO a_parts VALUES ('2024-05-01', 1)")
    listed = await a_client.partitions()
    shared = [p for p in listed if p["parent"].startswith(f"{tenants.shared}.")]
    own = [p for p in listed if p["parent"] == f"{tenants.a.schema_name}.a_parts"]
    assert shared, "the shared time-series partitions are listed"
    assert all(p["rows_estimate"] == 0 and p["bytes"] == 0 for p in shared), shared[:3]
    assert own and own[0]["bytes"] > 0  # its own tables keep their figures

    # A platform token with read (the bootstrap admin token holds no data scope).
    platform_token = await service_token(core, ["*"], [Scope.READ])
    async with MultiDatabaseClient(grpc_target, tenants.a.tenant_id, platform_token) as platform:
        everything = await platform.partitions()
    assert any(p["bytes"] > 0 for p in everything if p["parent"].startswith(f"{tenants.shared}."))
