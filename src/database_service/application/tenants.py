"""Tenant administration: create, list, read, suspend, resume, delete, migrate.

An administrator of some tenants administers those tenants only (``admin`` for each); what spans
every tenant — migrating all of them — needs the platform administrator.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.errors import InvalidParameters
from database_service.query.caching import CacheRules
from database_service.tenancy import (
    MigrationReport,
    Migrator,
    TenantLimits,
    TenantManager,
    TenantRecord,
    TenantRegistry,
    validate_tenant_id,
)
from database_service.tenancy.migrations import ProgressCallback

__all__ = ["TenantAdmin"]

_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class TenantAdmin:
    def __init__(
        self,
        access: Access,
        manager: TenantManager,
        registry: TenantRegistry,
        migrator: Migrator,
        owner_pool: asyncpg.Pool,
        cache_rules: CacheRules | None = None,
        tenant_data_elsewhere: Sequence[Callable[[str], Awaitable[object]]] = (),
    ) -> None:
        self._cache_rules = cache_rules
        # What holds tenant data outside PostgreSQL (vector collections on Weaviate): each is
        # called with the tenant id to drop it all before the tenant itself goes.
        self._elsewhere = tuple(tenant_data_elsewhere)
        self._access = access
        self._manager = manager
        self._registry = registry
        self._migrator = migrator
        self._pool = owner_pool

    async def create(
        self,
        principal: Principal,
        tenant_id: str,
        *,
        connection_limit: int | None = None,
        statement_timeout_ms: int | None = None,
    ) -> TenantRecord:
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.create", tenant_id)
        defaults = self._manager.default_limits
        limits = TenantLimits(
            connection_limit or defaults.connection_limit,
            statement_timeout_ms or defaults.statement_timeout_ms,
        )
        record = await self._manager.create(tenant_id, limits)
        await self._access.done(principal, "tenant.create", tenant_id)
        return record

    async def list(self, principal: Principal) -> list[TenantRecord]:
        """The tenants the caller administers (every one for the platform administrator)."""
        await self._access.require(principal, Scope.ADMIN, "tenant.list")
        return [r for r in await self._registry.list() if principal.can_act_for(r.tenant_id)]

    async def get(self, principal: Principal, tenant_id: str) -> TenantRecord:
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.get", tenant_id)
        return await self._registry.get(tenant_id)

    async def cache_rules(self, principal: Principal, tenant_id: str) -> dict[str, int]:
        """The tenant's result cache rules: table name -> TTL in milliseconds."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.cache_rules", tenant_id)
        await self._registry.get(tenant_id)  # NotFound for an unknown tenant
        assert self._cache_rules is not None
        return self._cache_rules.rules(tenant_id)

    async def set_cache_rules(
        self, principal: Principal, tenant_id: str, rules: dict[str, int], *, max_ttl_ms: int
    ) -> dict[str, int]:
        """Replace the tenant's rules ("cache reads of positions for 2 s"): a read is cached
        by them when every table it reads has one, for the smallest TTL."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.cache_rules.set", tenant_id)
        await self._registry.get(tenant_id)
        for relation, ttl in rules.items():
            if not _TABLE_NAME.fullmatch(relation):
                raise InvalidParameters(
                    f"{relation!r:.80} is not a table name (lower-case letters, digits and _)"
                )
            if not 0 < ttl <= max_ttl_ms:
                raise InvalidParameters(
                    f"the TTL of {relation} must be 1 to {max_ttl_ms} ms (DBSVC_CACHE_MAX_TTL_MS)"
                )
        assert self._cache_rules is not None
        await self._cache_rules.replace(tenant_id, rules)
        await self._access.done(principal, "tenant.cache_rules.set", tenant_id)
        return self._cache_rules.rules(tenant_id)

    async def suspend(self, principal: Principal, tenant_id: str) -> TenantRecord:
        """Refuse the tenant's logins, end its sessions and close its pools; data is kept."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.suspend", tenant_id)
        record = await self._manager.suspend(tenant_id)
        await self._access.done(principal, "tenant.suspend", tenant_id)
        return record

    async def resume(self, principal: Principal, tenant_id: str) -> TenantRecord:
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.resume", tenant_id)
        record = await self._manager.resume(tenant_id)
        await self._access.done(principal, "tenant.resume", tenant_id)
        return record

    async def delete(self, principal: Principal, tenant_id: str, *, confirm: bool) -> None:
        """Drop the tenant's schema, roles and shared-table rows (``confirm`` required)."""
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.ADMIN, "tenant.delete", tenant_id)
        if confirm:
            # Before the tenant goes: should a store be unreachable, the deletion fails (and can
            # be repeated) rather than leave data a tenant re-created with the id would find.
            await self._registry.get(tenant_id)
            for drop in self._elsewhere:
                await drop(tenant_id)
        await self._manager.delete(tenant_id, confirm=confirm)
        await self._access.done(principal, "tenant.delete", tenant_id)

    async def migrate(
        self,
        principal: Principal,
        tenant_ids: Sequence[str] | None,
        *,
        progress: ProgressCallback | None = None,
    ) -> MigrationReport:
        """Pending migrations of the control plane and every (or the named) tenant. Every tenant
        (``None``, or an empty list: the control plane only) needs the platform administrator;
        named tenants need admin over each, and the report names only them."""
        named: Sequence[str] | None = tuple(dict.fromkeys(tenant_ids)) if tenant_ids else None
        if named is None:
            await self._access.require_platform(principal, "migrate")
        else:
            for tenant_id in named:
                await self._access.require(
                    principal, Scope.ADMIN, "migrate", validate_tenant_id(tenant_id)
                )
            for tenant_id in named:
                await self._registry.get(tenant_id)  # an unknown tenant is a clear 404
        async with self._pool.acquire() as conn:
            report = await self._migrator.migrate(
                conn, tenant_ids=named if named is not None else tenant_ids, progress=progress
            )
        for result in report.tenants:
            self._registry.invalidate(result.tenant_id)
        for audited in named if named is not None else (None,):
            await self._access.done(principal, "migrate", audited)
        return report
