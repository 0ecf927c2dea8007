"""The bootstrap admin token is for bootstrapping only.

It creates tenants and services, mints their tokens (with any scope), and reads health, metrics
and the audit trail; it never reads, writes or changes a tenant's data through any front end,
and never ingests. Whoever carries it carries no data access.
"""

from __future__ import annotations

import secrets

import httpx
import pytest

from database_service.app import Application
from database_service.ingest import Inbound
from database_service_client import tick
from database_service_client._proto import ingest_pb2
from tests.fix_service import ADMIN_TOKEN
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")

STATEMENTS = {
    "read": "SELECT email FROM users",
    "shared read": "SELECT count(*) FROM market_data",
    "write": "INSERT INTO users VALUES ('boot', 'boot@x', 'free')",
    "ddl": "CREATE TABLE boot_notes (id int)",
    "ddl revealing rows": "ALTER TABLE users ADD CONSTRAINT boot_probe CHECK (email <> 'x')",
}


@pytest.mark.parametrize("sql", STATEMENTS.values(), ids=STATEMENTS.keys())
async def test_the_bootstrap_token_never_reaches_tenant_data(
    front_end: FrontEnd, core: Application, tenants: Tenants, sql: str
) -> None:
    for tenant_id in (tenants.a.tenant_id, tenants.b.tenant_id):
        outcome = await front_end.run(sql, tenant_id=tenant_id, token=ADMIN_TOKEN)
        assert outcome.refused, outcome
        assert outcome.code in ("permission_denied", "read_only_transaction"), outcome
    tables = await core.owner_pool.fetchval(
        "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'boot_notes'",
        tenants.a.schema_name,
    )
    assert tables == 0


async def test_the_bootstrap_token_reads_no_time_series(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await http.get(
        "/api/v1/timeseries/last",
        params={"since": "2024-01-01T00:00:00Z"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Tenant-Id": tenants.b.tenant_id},
    )
    assert response.status_code == 403, response.text[:300]


async def test_the_bootstrap_token_cannot_ingest(core: Application, tenants: Tenants) -> None:
    shared = core.settings.shared_schema
    count = f"SELECT count(*) FROM {shared}.trading_ticks WHERE company_id = $1"
    before = await core.owner_pool.fetchval(count, tenants.a.tenant_id)
    record = tick(tenants.a.tenant_id, "BOOT", 1_795_000_000_000_000, bid=1.0, ask=1.0002)
    batch = ingest_pb2.IngestBatch(ticks=[record]).SerializeToString()
    await core.ingest.process("nats", [Inbound(batch, "boot", f"Bearer {ADMIN_TOKEN}")])
    assert await core.owner_pool.fetchval(count, tenants.a.tenant_id) == before
    letter = await core.owner_pool.fetchrow(
        f"SELECT * FROM {core.settings.control_schema}.dead_letters WHERE event_id = $1",
        record.event_id,
    )
    assert letter is not None and letter["code"] == "permission_denied"


async def test_the_bootstrap_token_still_bootstraps(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    tenant_id = f"boot_{secrets.token_hex(3)}"
    created = await http.post(
        "/api/v1/admin/schema/create", json={"tenant_id": tenant_id}, headers=admin_headers
    )
    assert created.status_code == 201, created.text
    name = f"boot-{secrets.token_hex(3)}"
    service = await http.post(
        "/api/v1/admin/services",
        json={"service": name, "tenants": [tenant_id], "scopes": ["read", "write", "ingest"]},
        headers=admin_headers,
    )
    assert service.status_code == 201, service.text  # it grants scopes it does not use
    minted = await http.post("/api/v1/admin/tokens", json={"service": name}, headers=admin_headers)
    assert minted.status_code == 200, minted.text
    headers = {"Authorization": f"Bearer {minted.json()['access_token']}"}
    body = {"sql": "INSERT INTO users VALUES ('u1', 'u1@x', 'pro')", "tenant_id": tenant_id}
    assert (await http.post("/api/v1/query", json=body, headers=headers)).status_code == 200
    for path in ("/api/v1/admin/tenants", "/api/v1/admin/services", "/api/v1/admin/audit"):
        assert (await http.get(path, headers=admin_headers)).status_code == 200, path
    assert (await http.get("/metrics", headers=admin_headers)).status_code == 200
    health = (await http.get("/api/v1/health", headers=admin_headers)).json()
    assert "database_details" in health  # the full document
