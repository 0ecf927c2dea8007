"""Tenant lifecycle against real PostgreSQL: what create, suspend, resume and delete build and
remove, and that bad input changes nothing."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.errors import (
    ConfirmationRequired,
    FailedPrecondition,
    TenantExists,
    TenantNotFound,
)
from database_service.query import TenantContext
from database_service.tenancy import TenantLimits, TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_service import TenantFactory, TokenFactory

BUSINESS_TABLES = {
    "users", "mt5_accounts", "trading_history", "trading_signals", "positions", "notification_logs",
}  # fmt: skip
# Ingestion's staging tables and event-id registry (tenant migration 0002).
INGEST_TABLES = {"_ingest_ticks", "_ingest_predictions", "_ingest_events"}


async def test_create_builds_schema_tables_and_a_locked_down_role(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("life", TenantLimits(connection_limit=7, statement_timeout_ms=1234))
    pool = core.owner_pool
    tables = {
        r["tablename"]
        for r in await pool.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = $1", tenant.schema_name
        )
    }
    assert tables == BUSINESS_TABLES | INGEST_TABLES
    role = await pool.fetchrow("SELECT * FROM pg_roles WHERE rolname = $1", tenant.role_name)
    assert role is not None
    assert role["rolcanlogin"]
    assert not any(
        role[k]
        for k in ("rolsuper", "rolbypassrls", "rolcreaterole", "rolcreatedb", "rolreplication")
    )
    assert role["rolconnlimit"] == 7
    config = await pool.fetchval(
        "SELECT setconfig FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole"
        " WHERE r.rolname = $1",
        tenant.role_name,
    )
    assert "statement_timeout=1234" in config
    versions = await pool.fetch(
        f"SELECT version FROM {core.settings.control_schema}.tenant_migrations WHERE tenant_id = $1",
        tenant.tenant_id,
    )
    assert [r["version"] for r in versions] == [m.version for m in core.migrator.tenant_migrations]


async def test_role_secret_is_sealed_and_really_checked_by_postgres(
    core: Application, new_tenant: TenantFactory, pg_cluster: PgCluster
) -> None:
    tenant = await new_tenant("sec")
    password = core.secret_box.open(tenant.role_secret)
    assert password not in tenant.role_secret
    conn = await asyncpg.connect(pg_cluster.dsn, user=tenant.role_name, password=password)
    try:
        assert await conn.fetchval("SELECT session_user") == tenant.role_name
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(pg_cluster.dsn, user=tenant.role_name, password="wrong")


async def test_creating_a_tenant_twice_is_a_conflict_and_changes_nothing(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("dup")
    before = await core.owner_pool.fetchval("SELECT count(*) FROM pg_roles")
    with pytest.raises(TenantExists):
        await core.tenants.create(tenant.tenant_id)
    assert await core.owner_pool.fetchval("SELECT count(*) FROM pg_roles") == before
    assert (await core.registry.get(tenant.tenant_id)).role_secret == tenant.role_secret


async def test_create_over_http_returns_201_then_409(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    body = {"tenant_id": "http_made", "connection_limit": 4}
    first = await http.post("/api/v1/admin/schema/create", json=body, headers=admin_headers)
    assert first.status_code == 201, first.text
    assert first.json()["schema"].startswith("t_")  # opaque: no customer id in the catalog
    assert "http_made" not in first.json()["schema"] + first.json()["role"]
    assert "role_secret" not in first.json()
    second = await http.post("/api/v1/admin/schema/create", json=body, headers=admin_headers)
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "tenant_exists"


@pytest.mark.parametrize(
    "tenant_id",
    [
        "",
        "A",
        "1abc",
        "abc-def",
        "x" * 42,
        "abc; DROP ROLE postgres",
        "t'; --",
        'a"b',
        "ab c",
        "tenänt",
    ],
)
async def test_invalid_tenant_ids_get_a_clear_error_and_nothing_is_created(
    http: httpx.AsyncClient, admin_headers: dict[str, str], core: Application, tenant_id: str
) -> None:
    before = await core.owner_pool.fetchval("SELECT count(*) FROM pg_namespace")
    response = await http.post(
        "/api/v1/admin/schema/create", json={"tenant_id": tenant_id}, headers=admin_headers
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_tenant_id"
    assert await core.owner_pool.fetchval("SELECT count(*) FROM pg_namespace") == before


async def test_wrong_types_in_the_create_body_are_rejected(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await http.post(
        "/api/v1/admin/schema/create",
        json={"tenant_id": 123, "connection_limit": "many"},
        headers=admin_headers,
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"


async def test_suspended_tenant_cannot_log_in_and_resume_restores_it(
    core: Application, new_tenant: TenantFactory, pg_cluster: PgCluster
) -> None:
    tenant = await new_tenant("susp")
    password = core.secret_box.open(tenant.role_secret)
    await core.tenants.suspend(tenant.tenant_id)
    assert (await core.registry.get(tenant.tenant_id)).status == "suspended"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(pg_cluster.dsn, user=tenant.role_name, password=password)
    await core.tenants.resume(tenant.tenant_id)
    conn = await asyncpg.connect(pg_cluster.dsn, user=tenant.role_name, password=password)
    await conn.close()


async def test_delete_requires_confirmation(core: Application, new_tenant: TenantFactory) -> None:
    tenant = await new_tenant("keep")
    with pytest.raises(ConfirmationRequired):
        await core.tenants.delete(tenant.tenant_id, confirm=False)
    assert await core.registry.find(tenant.tenant_id) is not None


async def test_delete_drops_role_schema_and_shared_rows(
    core: Application, new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("gone")
    other = await new_tenant("stay")
    pool = core.owner_pool
    shared = core.settings.shared_schema
    for t in (tenant, other):
        await pool.execute(
            f"INSERT INTO {shared}.market_data (company_id, symbol) VALUES ($1, 'EURUSD')",
            t.tenant_id,
        )
    await core.tenants.delete(tenant.tenant_id, confirm=True)
    assert (
        await pool.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", tenant.role_name) is None
    )
    assert (
        await pool.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", tenant.schema_name)
        is None
    )
    counts = {
        r["company_id"]: r["n"]
        for r in await pool.fetch(
            f"SELECT company_id, count(*) AS n FROM {shared}.market_data"
            " WHERE company_id = ANY($1) GROUP BY company_id",
            [tenant.tenant_id, other.tenant_id],
        )
    }
    assert counts == {other.tenant_id: 1}
    with pytest.raises(TenantNotFound):
        await core.registry.get(tenant.tenant_id)


async def test_delete_over_http_without_confirm_is_refused(
    http: httpx.AsyncClient, admin_headers: dict[str, str], new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("http_del")
    refused = await http.delete(f"/api/v1/admin/tenants/{tenant.tenant_id}", headers=admin_headers)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "confirmation_required"
    done = await http.delete(
        f"/api/v1/admin/tenants/{tenant.tenant_id}?confirm=true", headers=admin_headers
    )
    assert done.status_code == 200


async def test_unknown_tenant_is_not_found(
    http: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    response = await http.post("/api/v1/admin/tenants/nobody_here/suspend", headers=admin_headers)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "tenant_not_found"


async def test_tenant_list_shows_limits_but_never_secrets(
    http: httpx.AsyncClient, admin_headers: dict[str, str], new_tenant: TenantFactory
) -> None:
    tenant = await new_tenant("listed")
    response = await http.get("/api/v1/admin/tenants", headers=admin_headers)
    listed = {t["tenant_id"]: t for t in response.json()["tenants"]}
    assert listed[tenant.tenant_id]["status"] == "active"
    assert tenant.role_secret not in response.text


async def test_a_tenant_from_before_opaque_names_is_upgraded_at_start(
    core: Application, new_tenant: TenantFactory, pg_cluster: PgCluster
) -> None:
    # Put a tenant back into the old shape: schema tenant_<id>, role <prefix><id>, no user role.
    tenant = await new_tenant("legacy")
    control = core.settings.control_schema
    legacy_schema = f"tenant_{tenant.tenant_id}"
    legacy_role = f"{core.settings.tenant_role_prefix}{tenant.tenant_id}"
    await core.pools.close_tenant(tenant.tenant_id)
    async with core.owner_pool.acquire() as conn, conn.transaction():
        await conn.execute(f'DROP OWNED BY "{tenant.user_role_name}"')
        await conn.execute(f'DROP ROLE "{tenant.user_role_name}"')
        await conn.execute(f'ALTER SCHEMA "{tenant.schema_name}" RENAME TO "{legacy_schema}"')
        await conn.execute(f'ALTER ROLE "{tenant.role_name}" RENAME TO "{legacy_role}"')
        await conn.execute(
            f"UPDATE {control}.tenants SET schema_name = $2, role_name = $3,"
            " user_role_name = NULL WHERE tenant_id = $1",
            tenant.tenant_id,
            legacy_schema,
            legacy_role,
        )
        await conn.execute(f"INSERT INTO {legacy_schema}.users VALUES ('kept', 'kept@x', 'pro')")
    core.registry.invalidate(tenant.tenant_id)

    assert tenant.tenant_id in await core.tenants.upgrade()
    assert await core.tenants.upgrade() == []  # idempotent

    upgraded = await core.registry.get(tenant.tenant_id)
    assert upgraded.schema_name.startswith("t_") and tenant.tenant_id not in upgraded.schema_name
    assert tenant.tenant_id not in upgraded.role_name and upgraded.user_role_name
    password = core.secret_box.open(upgraded.role_secret)
    for role in upgraded.roles:
        conn = await asyncpg.connect(pg_cluster.dsn, user=role, password=password)
        try:
            assert await conn.fetchval("SELECT email FROM users") == "kept@x"
        finally:
            await conn.close()


# --- a delete is all or nothing, and can be repeated --------------------------------------------


async def still_works(core: Application, tenant: TenantRecord, pg_cluster: PgCluster) -> None:
    """The tenant is active, logs in, and its data (own schema and shared rows) is there."""
    record = await core.registry.get(tenant.tenant_id)
    assert record.status == "active"
    password = core.secret_box.open(record.role_secret)
    for role in record.roles:
        conn = await asyncpg.connect(pg_cluster.dsn, user=role, password=password)
        try:
            assert await conn.fetchval("SELECT email FROM users") == "kept@x"
        finally:
            await conn.close()
    principal = Principal("svc-del", frozenset({tenant.tenant_id}), frozenset({Scope.READ}))
    result = await core.executor.execute(
        principal, TenantContext(tenant.tenant_id), "SELECT count(*) FROM market_data"
    )
    assert result.rows == [(1,)]


async def seeded(core: Application, new_tenant: TenantFactory, prefix: str) -> TenantRecord:
    tenant = await new_tenant(prefix)
    await core.owner_pool.execute(
        f"INSERT INTO {tenant.schema_name}.users VALUES ('kept', 'kept@x', 'pro')"
    )
    await core.owner_pool.execute(
        f"INSERT INTO {core.settings.shared_schema}.market_data (company_id, symbol)"
        " VALUES ($1, 'EURUSD')",
        tenant.tenant_id,
    )
    return tenant


async def test_a_delete_that_fails_changes_nothing_and_can_be_repeated(
    core: Application, new_tenant: TenantFactory, pg_cluster: PgCluster
) -> None:
    # The tenant's role owns a database (something DROP OWNED does not drop): DROP ROLE fails.
    tenant = await seeded(core, new_tenant, "undead")
    database = f"{tenant.role_name}_db"
    admin = await asyncpg.connect(pg_cluster.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{database}" OWNER "{tenant.role_name}"')
        with pytest.raises(Exception) as info:
            await core.tenants.delete(tenant.tenant_id, confirm=True)
        await still_works(core, tenant, pg_cluster)
        assert isinstance(info.value, FailedPrecondition), info.value
        assert "nothing was dropped" in info.value.message
        await admin.execute(f'DROP DATABASE "{database}"')
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.close()
    await core.tenants.delete(tenant.tenant_id, confirm=True)  # repeated: done
    assert await core.registry.find(tenant.tenant_id) is None
    assert not await core.owner_pool.fetchval(
        "SELECT count(*) FROM pg_roles WHERE rolname = ANY($1)", list(tenant.roles)
    )


async def test_a_delete_held_up_by_a_lock_gives_up_and_changes_nothing(
    core: Application,
    new_tenant: TenantFactory,
    pg_cluster: PgCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tenant = await seeded(core, new_tenant, "locked")
    monkeypatch.setattr(core.tenants, "_delete_lock_timeout_ms", 300, raising=False)
    holder = await asyncpg.connect(pg_cluster.dsn)
    try:
        async with holder.transaction():
            await holder.execute(f'LOCK TABLE "{tenant.schema_name}".users IN ACCESS SHARE MODE')
            with pytest.raises(Exception) as info:
                # Not forever behind the lock: it gives up on its own, well within this bound.
                await asyncio.wait_for(core.tenants.delete(tenant.tenant_id, confirm=True), 20)
    finally:
        await holder.close()
    await still_works(core, tenant, pg_cluster)
    assert isinstance(info.value, FailedPrecondition), info.value


async def test_a_delete_interrupted_after_it_began_is_finished_by_repeating_it(
    core: Application, http: httpx.AsyncClient, new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:  # fmt: skip
    # What a crash between the two steps leaves: 'deleting', logins refused, nothing dropped.
    tenant = await seeded(core, new_tenant, "halfway")
    async with core.owner_pool.acquire() as conn, conn.transaction():
        await conn.execute(
            f"UPDATE {core.settings.control_schema}.tenants SET status = 'deleting'"
            " WHERE tenant_id = $1",
            tenant.tenant_id,
        )
        for role in tenant.roles:
            await conn.execute(f'ALTER ROLE "{role}" NOLOGIN')
    core.registry.invalidate(tenant.tenant_id)
    headers = await service_headers([tenant.tenant_id])
    body = {"sql": "SELECT 1", "tenant_id": tenant.tenant_id}
    response = await http.post("/api/v1/query", json=body, headers=headers)
    assert response.status_code == 409, response.text  # refused like a suspended tenant, no 503
    await core.tenants.delete(tenant.tenant_id, confirm=True)
    assert await core.registry.find(tenant.tenant_id) is None
    assert not await core.owner_pool.fetchval(
        "SELECT count(*) FROM pg_namespace WHERE nspname = $1", tenant.schema_name
    )
