"""The Central Hub contract (issue #15): this instance registers and heartbeats its health to a
hub that follows the contract (tests/fix_hub.py); tenant configuration updates — from a
heartbeat's answer or pushed by a platform administrator — are validated whole, applied
atomically and once per version, and audited; the hub down and back costs nothing but a
re-registration."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.config import Settings
from database_service.tenancy import TenantRecord
from tests.fix_hub import Hub
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory, TokenFactory, make_settings

PUSH = "/api/v1/hub/tenant-config"


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
async def hubbed(pg_cluster: PgCluster, tmp_path: Path, hub: Hub) -> AsyncIterator[Application]:
    """A second instance of the service, registered with the hub (heartbeat every 0.2 s)."""
    settings: Settings = make_settings(
        pg_cluster,
        tmp_path,
        central_hub_url=hub.url,
        central_hub_token=hub.token,
        central_hub_heartbeat_seconds=0.2,
        instance_id="instance-under-test",
        http_port=18080,
        # The hub's agent runs in the instance's primary process, which maintains partitions
        # too: a retention no test's data is older than keeps it from dropping other tests' rows.
        ts_retention_days=36_500,
    )
    async with Application(settings, start_nats=False) as app:
        yield app


async def role_limits(core: Application, tenant: TenantRecord) -> tuple[int, list[str]]:
    row = await core.owner_pool.fetchrow(
        "SELECT rolconnlimit, rolconfig FROM pg_roles WHERE rolname = $1", tenant.role_name
    )
    assert row is not None
    return row["rolconnlimit"], list(row["rolconfig"] or [])


async def audit(core: Application, tenant_id: str, action: str) -> list[dict[str, Any]]:
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT * FROM {core.settings.control_schema}.audit_log"
        " WHERE tenant_id = $1 AND action = $2 ORDER BY id",
        tenant_id,
        action,
    )
    return [dict(r) for r in rows]


async def test_the_instance_registers_and_heartbeats_its_health(
    hubbed: Application, hub: Hub, new_tenant: TenantFactory
) -> None:
    await eventually(lambda: len(hub.heartbeats) >= 2, "two heartbeats")
    (registration,) = hub.registrations
    assert registration["instance_id"] == "instance-under-test"
    assert registration["service"] == "database-service" and registration["version"]
    assert registration["endpoints"]["http"] == "http://127.0.0.1:18080"
    assert "grpc" in registration["endpoints"]
    beat = hub.heartbeats[-1]
    assert beat["instance_id"] == "instance-under-test"
    assert beat["health"]["status"] == beat["status"]
    assert "dependencies" in beat["health"] and "performance_metrics" in beat["health"]
    assert isinstance(beat["config_versions"], dict)
    assert hub.unauthorized == 0  # the token went with every call

    section = hubbed.hub_admin.status()
    assert section["status"] == "registered" and section["consecutive_failures"] == 0
    assert section["url"] == hub.url
    health = await hubbed.health.document()
    assert health["central_hub"]["status"] == "registered"

    tenant = await new_tenant("hubt")
    await eventually(
        lambda: tenant.tenant_id in hub.heartbeats[-1]["tenants"], "the new tenant reported"
    )


async def test_an_update_in_a_heartbeat_answer_is_applied_once_and_audited(
    hubbed: Application, hub: Hub, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("hubc")
    hub.pending.append(
        {
            "tenant_id": tenant.tenant_id,
            "version": 3,
            "limits": {"connection_limit": 7, "statement_timeout_ms": 4321},
            "cache_rules": {"positions": 2000},
        }
    )
    await eventually(lambda: hubbed.hub_admin.status()["updates_applied"] == 1, "applied")
    record = await hubbed.registry.get(tenant.tenant_id)
    assert (record.limits.connection_limit, record.limits.statement_timeout_ms) == (7, 4321)
    limit, config = await role_limits(hubbed, tenant)
    assert limit == 7 and "statement_timeout=4321" in config
    assert hubbed.caching.rules.rules(tenant.tenant_id) == {"positions": 2000}
    (event,) = await audit(hubbed, tenant.tenant_id, "hub.config.apply")
    assert event["service"] == "central-hub" and "version=3" in event["detail"]
    await eventually(
        lambda: hub.heartbeats[-1]["config_versions"].get(tenant.tenant_id) == 3,
        "the applied version reported back",
    )

    # The same version again (a hub retrying), or an older one: nothing changes.
    hub.pending.extend(
        [
            {"tenant_id": tenant.tenant_id, "version": 3, "limits": {
                "connection_limit": 1, "statement_timeout_ms": 100}},
            {"tenant_id": tenant.tenant_id, "version": 2, "status": "suspended"},
        ]
    )  # fmt: skip
    await eventually(lambda: not hub.pending, "handed out")
    await asyncio.sleep(0.5)  # a heartbeat or two later
    record = await hubbed.registry.get(tenant.tenant_id)
    assert record.limits.connection_limit == 7 and record.active
    assert len(await audit(hubbed, tenant.tenant_id, "hub.config.apply")) == 1


async def test_the_hub_down_and_back_costs_a_registration(hubbed: Application, hub: Hub) -> None:
    await eventually(lambda: hubbed.hub_admin.status()["status"] == "registered", "registered")
    await hub.stop()
    await eventually(lambda: hubbed.hub_admin.status()["status"] == "unreachable", "unreachable")
    section = hubbed.hub_admin.status()
    assert section["consecutive_failures"] >= 1 and section["last_error"]
    # Meanwhile the service serves as ever.
    assert (await hubbed.health.document(detailed=False))["status"] in {"healthy", "degraded"}

    await hub.start()  # a restarted hub: it has forgotten the instance, answers 404
    await eventually(lambda: hubbed.hub_admin.status()["status"] == "registered", "back", 15)
    assert len(hub.registrations) == 2
    assert hub.registrations[-1]["instance_id"] == "instance-under-test"


# --- pushed by the hub to our endpoint ------------------------------------------------------


async def test_pushed_updates_need_a_platform_administrator(
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    service_headers: TokenFactory,
    new_tenant: TenantFactory,
    core: Application,
) -> None:
    tenant = await new_tenant("hubp")
    update = {"tenant_id": tenant.tenant_id, "version": 1, "status": "suspended"}
    own_admin = await service_headers([tenant.tenant_id], (Scope.READ, Scope.ADMIN))
    refused = await http.post(PUSH, json=update, headers=own_admin)
    assert refused.status_code == 403, refused.text
    anonymous = await http.post(PUSH, json=update)
    assert anonymous.status_code == 401
    assert (await http.get("/api/v1/hub", headers=own_admin)).status_code == 403
    assert (await core.registry.get(tenant.tenant_id)).active


async def test_a_batch_with_one_bad_update_changes_nothing(
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    new_tenant: TenantFactory,
    core: Application,
) -> None:
    tenant = await new_tenant("hubb")
    good = {"tenant_id": tenant.tenant_id, "version": 1, "limits": {
        "connection_limit": 3, "statement_timeout_ms": 2000}}  # fmt: skip
    for bad in (
        {"tenant_id": tenant.tenant_id, "version": 2, "status": "deleted"},
        {"tenant_id": tenant.tenant_id, "version": 0},
        {"tenant_id": tenant.tenant_id, "version": "2"},
        {"tenant_id": tenant.tenant_id, "version": 2, "limits": {"connection_limit": 0,
            "statement_timeout_ms": 2000}},
        {"tenant_id": tenant.tenant_id, "version": 2, "cache_rules": {"a; drop": 10}},
        {"tenant_id": tenant.tenant_id, "version": 2, "cache_rules": {"positions": -1}},
        {"tenant_id": tenant.tenant_id, "version": 2, "owner": "someone"},
        {"tenant_id": "../other", "version": 2},
    ):  # fmt: skip
        response = await http.post(PUSH, json={"updates": [good, bad]}, headers=admin_headers)
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["code"] in {"invalid_parameters", "invalid_tenant_id"}
    not_json = await http.post(
        PUSH, content=b"{nope", headers={**admin_headers, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    record = await core.registry.get(tenant.tenant_id)
    assert record.limits.connection_limit != 3
    versions = (await http.get("/api/v1/hub", headers=admin_headers)).json()["config_versions"]
    assert tenant.tenant_id not in versions


async def test_a_pushed_suspension_and_resumption_apply_in_version_order(
    http: httpx.AsyncClient,
    admin_headers: dict[str, str],
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
    core: Application,
) -> None:
    tenant = await new_tenant("hubs")
    headers = await service_headers(
        [tenant.tenant_id], (Scope.READ,), **{"X-Tenant-Id": tenant.tenant_id}
    )
    suspend = {"tenant_id": tenant.tenant_id, "version": 1, "status": "suspended"}
    response = await http.post(PUSH, json=suspend, headers=admin_headers)
    assert response.status_code == 200, response.text
    assert response.json()["results"] == [
        {"tenant_id": tenant.tenant_id, "version": 1, "outcome": "applied"}
    ]
    assert (await core.registry.get(tenant.tenant_id)).status == "suspended"
    query = await http.post("/api/v1/query", json={"sql": "SELECT 1"}, headers=headers)
    assert query.status_code >= 400

    # v3 then v2 in one batch: applied in version order, so v3 (active) is what stays.
    batch = {"updates": [
        {"tenant_id": tenant.tenant_id, "version": 3, "status": "active"},
        {"tenant_id": tenant.tenant_id, "version": 2, "limits": {
            "connection_limit": 4, "statement_timeout_ms": 1500}},
        {"tenant_id": f"nobody_{secrets.token_hex(3)}", "version": 1, "status": "active"},
    ]}  # fmt: skip
    response = await http.post(PUSH, json=batch, headers=admin_headers)
    assert response.status_code == 200, response.text
    outcomes = {(r["tenant_id"], r["version"]): r["outcome"] for r in response.json()["results"]}
    assert outcomes[(tenant.tenant_id, 2)] == "applied"
    assert outcomes[(tenant.tenant_id, 3)] == "applied"
    assert "rejected" in outcomes.values()  # the unknown tenant, said so
    record = await core.registry.get(tenant.tenant_id)
    assert record.active and record.limits.connection_limit == 4
    query = await http.post("/api/v1/query", json={"sql": "SELECT 1"}, headers=headers)
    assert query.status_code == 200, query.text

    again = await http.post(PUSH, json=suspend, headers=admin_headers)
    assert again.json()["results"][0]["outcome"] == "unchanged"
    assert (await core.registry.get(tenant.tenant_id)).active
    events = await audit(core, tenant.tenant_id, "hub.config.apply")
    # (The audit writer batches: its ids do not follow the order of events.)
    assert sorted(e["detail"].split()[0] for e in events) == ["version=1", "version=2", "version=3"]
