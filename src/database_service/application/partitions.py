"""Partitions of the time-series tables: list, maintain now, detach, attach.

The shared partitions hold every tenant's rows, and their sizes and row estimates describe
every tenant's activity: changing them, and seeing their figures, is for the platform
administrator. A tenant (``read``) sees its own partitioned tables with their figures and the
shared partitions' names and bounds only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.tenancy import TenantRegistry, validate_tenant_id
from database_service.timeseries import MaintenanceReport, PartitionInfo, PartitionManager

__all__ = ["PartitionAdmin"]


class PartitionAdmin:
    def __init__(
        self,
        access: Access,
        manager: PartitionManager,
        registry: TenantRegistry,
        *,
        shared_schema: str,
    ) -> None:
        self._access = access
        self._manager = manager
        self._registry = registry
        self._shared = shared_schema

    @property
    def last_maintenance(self) -> dt.datetime | None:
        return self._manager.last_run

    async def list(
        self, principal: Principal, table: str | None = None, *, tenant_id: str | None = None
    ) -> list[PartitionInfo]:
        """Without a tenant: every partition with its figures (platform administrator). With
        one: that tenant's view (``read`` for it)."""
        if tenant_id is None:
            await self._access.require_platform(principal, "partitions.list")
            return await self._manager.list(table)
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require(principal, Scope.READ, "partitions.list", tenant_id)
        tenant = await self._registry.get_active(tenant_id)
        infos = await self._manager.list(table, schemas=[tenant.schema_name, self._shared])
        if principal.is_platform:
            return infos
        shared = f"{self._shared}."
        return [
            dataclasses.replace(p, rows_estimate=0, bytes=0) if p.parent.startswith(shared) else p
            for p in infos
        ]

    async def maintain(
        self, principal: Principal, *, tenant_id: str | None = None
    ) -> MaintenanceReport | None:
        """Create partitions ahead and apply retention now (None: another instance is)."""
        await self._access.require_platform(principal, "partitions.maintain", tenant_id=tenant_id)
        report = await self._manager.maintain()
        await self._access.done(principal, "partitions.maintain", tenant_id)
        return report

    async def detach(
        self, principal: Principal, table: str, name: str, *, tenant_id: str | None = None
    ) -> None:
        await self._access.require_platform(principal, "partitions.detach", tenant_id=tenant_id)
        await self._manager.detach(table, name)
        await self._access.done(principal, "partitions.detach", tenant_id, f"{table} {name}")

    async def attach(
        self,
        principal: Principal,
        table: str,
        name: str,
        start: dt.datetime,
        *,
        tenant_id: str | None = None,
    ) -> None:
        await self._access.require_platform(principal, "partitions.attach", tenant_id=tenant_id)
        await self._manager.attach(table, name, start)
        await self._access.done(principal, "partitions.attach", tenant_id, f"{table} {name}")
