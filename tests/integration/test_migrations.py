"""Per-tenant migrations: each tenant in its own transaction, serialised, reported."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from database_service.app import Application
from database_service.tenancy.migrations import Migration, MigrationProgress, Migrator
from tests.fix_service import TenantFactory


def migrator_with(core: Application, *extra: Migration) -> Migrator:
    s = core.settings
    return Migrator(
        control_schema=s.control_schema,
        shared_schema=s.shared_schema,
        group_role=s.tenant_group_role,
        role_prefix=s.tenant_role_prefix,
        tenant_migrations=[*core.migrator.tenant_migrations, *extra],
    )


async def has_column(core: Application, schema: str, table: str, column: str) -> bool:
    return bool(
        await core.owner_pool.fetchval(
            "SELECT 1 FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
            schema,
            table,
            column,
        )
    )


async def test_failure_in_one_tenant_leaves_the_others_migrated_and_is_reported(
    core: Application, new_tenant: TenantFactory
) -> None:
    a, b, c = [await new_tenant(p) for p in ("mig_a", "mig_b", "mig_c")]
    # Tenant b already has the column the migration adds, so the migration fails there only.
    await core.owner_pool.execute(f"ALTER TABLE {b.schema_name}.users ADD COLUMN nickname text")
    migration = Migration(900, "add_nickname", "ALTER TABLE users ADD COLUMN nickname text;"
                          "CREATE INDEX users_nickname ON users (nickname);")  # fmt: skip
    seen: list[MigrationProgress] = []
    async with core.owner_pool.acquire() as conn:
        report = await migrator_with(core, migration).migrate(
            conn, tenant_ids=[a.tenant_id, b.tenant_id, c.tenant_id], progress=seen.append
        )
    by_tenant = {r.tenant_id: r for r in report.tenants}
    assert by_tenant[a.tenant_id].applied == [900]
    assert by_tenant[c.tenant_id].applied == [900]
    failed = by_tenant[b.tenant_id]
    assert not failed.ok and failed.sqlstate == "42701" and failed.failed_version == 900
    assert [p.done for p in seen] == [1, 2, 3] and all(p.total == 3 for p in seen)
    # The failed tenant rolled back whole: no index, no version row.
    assert not await core.owner_pool.fetchval(
        "SELECT 1 FROM pg_indexes WHERE schemaname = $1 AND indexname = 'users_nickname'",
        b.schema_name,
    )
    for tenant in (a, c):
        assert await has_column(core, tenant.schema_name, "users", "nickname")
    versions = await core.owner_pool.fetch(
        f"SELECT tenant_id FROM {core.settings.control_schema}.tenant_migrations WHERE version = 900"
    )
    assert {r["tenant_id"] for r in versions} == {a.tenant_id, c.tenant_id}


async def test_a_second_run_has_nothing_left_to_do(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("mig_again")
    migration = Migration(901, "add_note", "ALTER TABLE positions ADD COLUMN note text")
    migrator = migrator_with(core, migration)
    async with core.owner_pool.acquire() as conn:
        first = await migrator.migrate(conn, tenant_ids=[tenant.tenant_id])
        second = await migrator.migrate(conn, tenant_ids=[tenant.tenant_id])
    assert first.tenants[0].applied == [901]
    assert second.tenants[0].applied == [] and second.tenants[0].ok


async def test_concurrent_migrators_are_serialised_by_the_advisory_lock(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("mig_race")
    slow = Migration(
        902, "slow", "SELECT pg_sleep(0.3); ALTER TABLE positions ADD COLUMN race text"
    )
    migrator = migrator_with(core, slow)

    async def run() -> list[int]:
        conn = await asyncpg.connect(str(core.endpoints.postgres_dsn))
        try:
            report = await migrator.migrate(conn, tenant_ids=[tenant.tenant_id])
            return report.tenants[0].applied
        finally:
            await conn.close()

    results = await asyncio.gather(run(), run())
    assert sorted(results) == [[], [902]]


async def test_migration_endpoint_reports_every_tenant(
    http: httpx.AsyncClient, admin_headers: dict[str, str], new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("mig_http")
    response = await http.post(
        "/api/v1/admin/migration", json={"tenant_ids": [tenant.tenant_id]}, headers=admin_headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["failed"] == 0
    assert body["tenants"] == [
        {
            "tenant_id": tenant.tenant_id,
            "status": "ok",
            "applied": [],
            "error": None,
            "sqlstate": None,
            "failed_version": None,
            "duration_ms": body["tenants"][0]["duration_ms"],
        }
    ]


async def test_migration_endpoint_needs_admin(
    http: httpx.AsyncClient, service_headers: object, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("mig_noadm")
    headers = await service_headers([tenant.tenant_id])  # type: ignore[operator]
    response = await http.post("/api/v1/admin/migration", json={}, headers=headers)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
