"""What the service tells about itself: health, figures, Prometheus metrics, the audit trail.

Anyone may ask whether the service is up (the small health document); the full document, the
service-wide figures, ``/metrics`` and every tenant's audit events need a platform principal
(tenants ``*``) holding ``metrics`` or ``admin``; a tenant's token sees its own figures and, with
``admin`` over it, its own audit events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg

from database_service.application.access import Access
from database_service.auth import Principal, Scope
from database_service.errors import InvalidRequest
from database_service.observability import AuditLog, HealthReporter, Metrics, RequestWindow
from database_service.observability.health import performance_document
from database_service.postgres import TenantPools
from database_service.query import encode_value
from database_service.tenancy import TenantRegistry, quote_ident, validate_tenant_id

__all__ = ["Observability"]


def sees_everything(principal: Principal | None) -> bool:
    return principal is not None and principal.is_platform_with(Scope.METRICS, Scope.ADMIN)


class Observability:
    def __init__(
        self,
        access: Access,
        *,
        health: HealthReporter,
        window: RequestWindow,
        pools: TenantPools,
        metrics: Metrics,
        audit: AuditLog,
        owner_pool: asyncpg.Pool,
        control_schema: str,
        registry: TenantRegistry,
        pgwire_views: list[Callable[[Callable[[str], bool]], dict[str, object]]] | None = None,
        pgwire_peers: list[Callable[[], list[dict[str, Any]]]] | None = None,
    ) -> None:
        self._access = access
        self._pgwire_views = pgwire_views if pgwire_views is not None else []
        self._pgwire_peers = pgwire_peers if pgwire_peers is not None else []
        self._health = health
        self._window = window
        self._pools = pools
        self._metrics = metrics
        self._audit = audit
        self._pool = owner_pool
        self._audit_table = f"{quote_ident(control_schema)}.audit_log"
        self._slow_table = f"{quote_ident(control_schema)}.slow_queries"
        self._registry = registry

    def report(self, name: str, section: Callable[[], dict[str, Any]]) -> None:
        """A section of the detailed health document, kept by the part that owns it (a front
        end's listener: the gRPC port's ``grpc``). The first to report a name keeps it."""
        self._health.sections.setdefault(name, section)

    def unreport(self, name: str, section: Callable[[], dict[str, Any]]) -> None:
        if self._health.sections.get(name) == section:
            del self._health.sections[name]

    async def health(self, principal: Principal | None) -> dict[str, Any]:
        """The small document for anyone, the full one for a platform principal."""
        return await self._health.document(detailed=sees_everything(principal))

    async def performance(self, principal: Principal, tenant_id: str | None) -> dict[str, Any]:
        """The service's figures for a platform principal; otherwise those of ``tenant_id``
        (required, one the caller may act for) and nothing of other tenants."""
        if sees_everything(principal):
            return performance_document(self._window, self._pools, audit=self._audit)
        if tenant_id is None:
            raise InvalidRequest(
                "a tenant is required (the X-Tenant-Id header, x-tenant-id metadata): figures"
                " are per tenant"
            )
        tenant_id = validate_tenant_id(tenant_id)
        await self._access.require_tenant(principal, tenant_id, "metrics.performance")
        return performance_document(self._window, self._pools, tenant_id=tenant_id)

    async def status(self, principal: Principal) -> dict[str, Any]:
        """What the status page shows (a platform principal holding ``metrics`` or
        ``admin``): the detailed health document, the performance document with every
        tenant's pools, the tenants, and the slow-query log's last hour."""
        await self._access.require_platform(principal, "status.read", Scope.METRICS, Scope.ADMIN)
        health = await self._health.document(detailed=True)
        tenants = await self._registry.list()
        counts = await self._pool.fetch(
            f"SELECT tenant_id, count(*)::int AS n FROM {self._slow_table}"
            " WHERE recorded_at > now() - interval '1 hour' GROUP BY tenant_id"
        )
        recent = await self._pool.fetch(
            f"SELECT tenant_id, recorded_at, duration_ms, statement FROM {self._slow_table}"
            " ORDER BY id DESC LIMIT 10"
        )
        return {
            "health": health,
            "performance": performance_document(self._window, self._pools, audit=self._audit),
            "tenants": [
                {"tenant_id": t.tenant_id, "status": t.status}
                for t in sorted(tenants, key=lambda t: t.tenant_id)
            ],
            "slow": {r["tenant_id"]: r["n"] for r in counts},
            "slow_recent": [
                {**dict(r), "recorded_at": r["recorded_at"].isoformat(timespec="seconds")}
                for r in recent
            ],
        }

    async def prometheus(self, principal: Principal) -> bytes:
        """Prometheus text: every tenant's pools are labelled, so for the platform only."""
        await self._access.require_platform(principal, "metrics", Scope.METRICS, Scope.ADMIN)
        return self._metrics.render()

    async def pgwire(self, principal: Principal, tenant_id: str | None) -> dict[str, Any]:
        """The PostgreSQL wire port's admin view (pools, clients, servers, stats), like
        PgBouncer's SHOW: of one tenant (admin over it), or of every tenant (the platform
        administrator). With several workers, every worker's rows (the others' from their last
        snapshots, about a second old), each naming its ``worker``."""
        if tenant_id is None:
            await self._access.require_platform(principal, "pgwire.show")
            only: str | None = None
        else:
            only = validate_tenant_id(tenant_id)
            await self._access.require(principal, Scope.ADMIN, "pgwire.show", only)

        def visible(candidate: str) -> bool:
            return only is None or candidate == only

        document: dict[str, Any] = {"enabled": bool(self._pgwire_views)}
        for view in self._pgwire_views:
            for kind, rows in view(visible).items():
                document.setdefault(kind, []).extend(rows if isinstance(rows, list) else [])
        for peer in (view for source in self._pgwire_peers for view in source()):
            document["enabled"] = True
            for kind, rows in peer.items():
                if isinstance(rows, list):
                    document.setdefault(kind, []).extend(
                        r for r in rows if isinstance(r, dict) and visible(_tenant_of(r))
                    )
        return document

    async def audit_events(
        self, principal: Principal, tenant_id: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The most recent audit events: of one tenant (admin over it), or of every tenant and
        of the service itself (the platform administrator)."""
        if tenant_id is None:
            await self._access.require_platform(principal, "audit.read")
        else:
            tenant_id = validate_tenant_id(tenant_id)
            await self._access.require(principal, Scope.ADMIN, "audit.read", tenant_id)
        await self._audit.flush()
        rows = await self._pool.fetch(
            f"SELECT * FROM {self._audit_table}"
            " WHERE $1::text IS NULL OR tenant_id = $1 ORDER BY id DESC LIMIT $2",
            tenant_id,
            limit,
        )
        return [{k: encode_value(v) for k, v in r.items()} for r in rows]


def _tenant_of(row: dict[str, Any]) -> str:
    """The tenant a row of the wire port's admin view is about (pool figures name it
    ``tenant_id``, the SHOW rows ``database``)."""
    return str(row.get("database") or row.get("tenant_id") or "")
