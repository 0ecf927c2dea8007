"""Every check lives in the application layer, so no front end can skip it.

Front ends are thin adapters: they may reach the query core, the use cases and what they need
to authenticate and count requests, and nothing else of the core (a static check of their
source). Each use case refuses a tenant's administrator acting beyond its tenants, and records
the refusal, whoever calls it (called directly here, as a future front end would); and the same
refusal comes back through REST and gRPC alike, under the same audited action.
"""

from __future__ import annotations

import ast
import datetime as dt
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import NotFound, PermissionDenied
from database_service.query import TenantContext
from database_service_client import MultiDatabaseClient
from database_service_client._proto import database_service_pb2 as pb
from database_service_client._proto.database_service_pb2_grpc import DatabaseServiceStub
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")

SRC = Path(__file__).resolve().parents[2] / "src" / "database_service"
# What a front end may use of the core: the query core and the use cases, and what it needs to
# authenticate, count, time and trace requests and record what nothing else did.
FRONT_END_MAY_USE = {
    "executor", "timeseries", "tenant_admin", "service_admin", "partition_admin",
    "observability", "dead_letter_admin", "access", "authenticator", "metrics", "window",
    "audit", "settings", "tracing", "key_value", "statement_admin", "backup_admin",
    "tenant_backups", "analytics", "graphs", "vectors", "hub_admin", "multidb",
    # the status page's sign-in links (as the authenticator, no use case: a signature check)
    "status_links",
}  # fmt: skip
# The operator at the machine: the cluster's backups and a replica of it are made with
# PostgreSQL's own programs, on the owner's DSN (no use case: no caller to authorize).
CLI_MAY_ALSO_USE = {
    "endpoints", "guard", "open_cluster_backups", "postgres_dsn", "backfill_analytics",
}  # fmt: skip


def _core_attributes(path: Path) -> set[str]:
    """Attributes read off anything named ``core`` (``core.x``, ``self.core.x``)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            value = node.value
            named = (isinstance(value, ast.Name) and value.id == "core") or (
                isinstance(value, ast.Attribute) and value.attr == "core"
            )
            if named:
                used.add(node.attr)
    return used


@pytest.mark.parametrize(
    "path",
    [*sorted((SRC / "api").rglob("*.py")), SRC / "cli.py"],
    ids=lambda p: str(p.relative_to(SRC)),
)
def test_front_ends_reach_only_the_application_layer(path: Path) -> None:
    allowed = FRONT_END_MAY_USE | (CLI_MAY_ALSO_USE if path.name == "cli.py" else set())
    assert _core_attributes(path) <= allowed, _core_attributes(path) - allowed


@pytest.fixture
def a_admin(tenants: Tenants) -> Principal:
    """Tenant A's administrator: every scope, but only over A."""
    return Principal(
        service=f"a-admin-{secrets.token_hex(3)}",
        tenants=frozenset({tenants.a.tenant_id}),
        scopes=frozenset(Scope),
    )


UseCase = Callable[[Application, Principal, Tenants], Awaitable[Any]]

CROSSING = {
    "create B's tenant": lambda c, p, t: c.tenant_admin.create(p, t.b.tenant_id),
    "read B": lambda c, p, t: c.tenant_admin.get(p, t.b.tenant_id),
    "suspend B": lambda c, p, t: c.tenant_admin.suspend(p, t.b.tenant_id),
    "resume B": lambda c, p, t: c.tenant_admin.resume(p, t.b.tenant_id),
    "delete B": lambda c, p, t: c.tenant_admin.delete(p, t.b.tenant_id, confirm=True),
    "migrate every tenant": lambda c, p, t: c.tenant_admin.migrate(p, None),
    "migrate B": lambda c, p, t: c.tenant_admin.migrate(p, [t.b.tenant_id]),
    "a service for B": lambda c, p, t: c.service_admin.create(
        p, f"x-{secrets.token_hex(3)}", tenants=[t.b.tenant_id], scopes=["read"]
    ),
    "a service for every tenant": lambda c, p, t: c.service_admin.create(
        p, f"x-{secrets.token_hex(3)}", tenants=["*"], scopes=["read"]
    ),
    "every partition": lambda c, p, t: c.partition_admin.list(p),
    "B's partitions": lambda c, p, t: c.partition_admin.list(p, tenant_id=t.b.tenant_id),
    "maintain partitions": lambda c, p, t: c.partition_admin.maintain(p),
    "detach a partition": lambda c, p, t: c.partition_admin.detach(p, "trading_ticks", "x"),
    "attach a partition": lambda c, p, t: c.partition_admin.attach(
        p, "trading_ticks", "x", dt.datetime.now(dt.UTC)
    ),
    "every audit event": lambda c, p, t: c.observability.audit_events(p, None, 10),
    "B's audit events": lambda c, p, t: c.observability.audit_events(p, t.b.tenant_id, 10),
    "Prometheus": lambda c, p, t: c.observability.prometheus(p),
    "B's figures": lambda c, p, t: c.observability.performance(p, t.b.tenant_id),
    "every dead letter": lambda c, p, t: c.dead_letter_admin.list(p),
    "B's dead letters": lambda c, p, t: c.dead_letter_admin.list(p, tenant_id=t.b.tenant_id),
    "replay every dead letter": lambda c, p, t: c.dead_letter_admin.replay(p, None),
    "query B": lambda c, p, t: c.executor.execute(p, TenantContext(t.b.tenant_id), "SELECT 1"),
}


@pytest.mark.parametrize("use_case", CROSSING.values(), ids=CROSSING.keys())
async def test_each_use_case_refuses_a_tenant_admin_beyond_its_tenants_and_records_it(
    core: Application, tenants: Tenants, a_admin: Principal, use_case: UseCase
) -> None:
    with pytest.raises((PermissionDenied, NotFound)):
        await use_case(core, a_admin, tenants)
    await core.audit.flush()
    denied = await core.owner_pool.fetchval(
        f"SELECT count(*) FROM {core.settings.control_schema}.audit_log"
        " WHERE service = $1 AND outcome = 'denied'",
        a_admin.service,
    )
    assert denied == 1


async def test_a_tenant_admin_may_still_act_on_its_own_tenant(
    core: Application, tenants: Tenants, a_admin: Principal
) -> None:
    assert (await core.tenant_admin.get(a_admin, tenants.a.tenant_id)).tenant_id == (
        tenants.a.tenant_id
    )
    assert [r.tenant_id for r in await core.tenant_admin.list(a_admin)] == [tenants.a.tenant_id]
    await core.partition_admin.list(a_admin, tenant_id=tenants.a.tenant_id)
    await core.observability.performance(a_admin, tenants.a.tenant_id)


async def _audited_actions(core: Application, service: str) -> list[str]:
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT action FROM {core.settings.control_schema}.audit_log"
        " WHERE service = $1 AND outcome = 'denied' ORDER BY id",
        service,
    )
    return [r["action"] for r in rows]


async def test_rest_and_grpc_meet_the_same_checks(
    core: Application, tenants: Tenants, http: httpx.AsyncClient, grpc_target: str
) -> None:
    scopes = (Scope.READ, Scope.WRITE, Scope.ADMIN)
    a = tenants.a.tenant_id
    rest_token = await service_token(core, [a], scopes)
    grpc_token = await service_token(core, [a], scopes)
    headers = {"Authorization": f"Bearer {rest_token}", "X-Tenant-Id": a}
    # REST: three ways in to what only the platform or B's administrator may do.
    created = await http.post(
        "/api/v1/admin/schema/create", json={"tenant_id": tenants.b.tenant_id}, headers=headers
    )
    maintained = await http.post("/api/v1/admin/partitions/maintain", headers=headers)
    figures = await http.get(
        "/api/v1/metrics/performance",
        headers={**headers, "X-Tenant-Id": tenants.b.tenant_id},
    )
    assert [r.status_code for r in (created, maintained, figures)] == [403, 403, 403]
    # gRPC: the same three.
    channel = grpc.aio.insecure_channel(grpc_target)
    stub = DatabaseServiceStub(channel)
    metadata = (("authorization", f"Bearer {grpc_token}"), ("x-tenant-id", a))
    codes = []
    for call in (
        lambda: stub.CreateTenantSchema(
            pb.SchemaRequest(tenant_id=tenants.b.tenant_id), metadata=metadata
        ),
        lambda: stub.ManagePartitions(
            pb.PartitionRequest(action=pb.PARTITION_ACTION_MAINTAIN), metadata=metadata
        ),
        lambda: stub.GetPerformanceMetrics(
            pb.MetricsRequest(),
            metadata=(metadata[0], ("x-tenant-id", tenants.b.tenant_id)),
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call()
        codes.append(info.value.code())
    await channel.close()
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 3
    rest = await _audited_actions(core, _service_of(core, rest_token))
    via_grpc = await _audited_actions(core, _service_of(core, grpc_token))
    expected = ["tenant.create", "partitions.maintain", "metrics.performance"]
    assert (sorted(rest), sorted(via_grpc)) == (sorted(expected), sorted(expected)), (
        rest,
        via_grpc,
    )


def _service_of(core: Application, token: str) -> str:
    return core.tokens.verify(token).service


async def test_the_client_library_meets_the_same_checks(
    core: Application, tenants: Tenants, grpc_target: str
) -> None:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.ADMIN, Scope.READ))
    async with MultiDatabaseClient(grpc_target, tenants.a.tenant_id, token) as client:
        with pytest.raises(Exception) as info:
            await client.create_tenant_schema(tenants.b.tenant_id)
    assert getattr(info.value, "code", None) == "permission_denied"
