"""Tenant configuration from the Central Hub, whichever way it arrives (pushed to our endpoint
by a platform administrator's credential, or carried by a heartbeat's answer), and the hub's
state for health and administrators.

Each update is applied by ``TenantManager.configure``: one transaction, idempotent by version.
Every applied update is audited (``hub.config.apply``, the version in the detail) under the
principal that pushed it, or ``central-hub`` for updates the agent pulled.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from database_service.application.access import Access
from database_service.auth import ALL_TENANTS, Principal, Scope
from database_service.errors import Conflict, NotFound
from database_service.hub import HubAgent, parse_updates
from database_service.query.caching import CacheRules
from database_service.tenancy import TenantManager, quote_ident
from database_service.tenancy.configuration import TenantConfig

__all__ = ["HUB", "HubAdmin"]

# Who applied what a heartbeat's answer carried (the audit's service name).
HUB = Principal(
    service="central-hub", tenants=frozenset({ALL_TENANTS}), scopes=frozenset({Scope.ADMIN})
)


class HubAdmin:
    def __init__(
        self,
        access: Access,
        manager: TenantManager,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        cache_rules: CacheRules | None,
        max_ttl_ms: int,
    ) -> None:
        self._access = access
        self._manager = manager
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.hub_config"
        self._cache_rules = cache_rules
        self._max_ttl_ms = max_ttl_ms
        self.agent: HubAgent | None = None

    async def receive(self, principal: Principal, payload: Any) -> dict[str, Any]:
        """An update (or ``{"updates": [...]}``) pushed by the hub: a platform administrator
        only; the batch is validated whole before anything is applied."""
        await self._access.require_platform(principal, "hub.config")
        configs = parse_updates(payload, max_ttl_ms=self._max_ttl_ms)
        return {"results": await self.apply(configs, principal)}

    async def apply(
        self, configs: list[TenantConfig], principal: Principal = HUB
    ) -> list[dict[str, Any]]:
        results = []
        for config in configs:
            result: dict[str, Any] = {"tenant_id": config.tenant_id, "version": config.version}
            try:
                result["outcome"] = await self._manager.configure(config)
            except (NotFound, Conflict) as exc:
                result.update(outcome="rejected", reason=str(exc))
            if result["outcome"] == "applied":
                await self._access.done(
                    principal,
                    "hub.config.apply",
                    config.tenant_id,
                    detail=f"version={config.version} fields={','.join(sorted(config.source))}",
                )
            results.append(result)
        if self._cache_rules is not None and any(r["outcome"] == "applied" for r in results):
            await self._cache_rules.load()
        return results

    async def versions(self) -> dict[str, int]:
        rows = await self._pool.fetch(f"SELECT tenant_id, version FROM {self._table}")
        return {r["tenant_id"]: r["version"] for r in rows}

    def status(self) -> dict[str, Any]:
        """The health document's ``central_hub`` section."""
        if self.agent is None:
            return {"status": "not_configured"}
        return self.agent.document()

    async def describe(self, principal: Principal) -> dict[str, Any]:
        await self._access.require_platform(principal, "hub.read", Scope.ADMIN, Scope.METRICS)
        return {**self.status(), "config_versions": await self.versions()}
