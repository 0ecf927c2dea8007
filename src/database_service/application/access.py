"""Authorization with its audit trail, for every use case.

A use case decides who may call it; this module makes the decision and its record one step, so
that no front end (REST, gRPC, the CLI, and the ones to come) can check without recording or
record without checking. Refusals are counted and audited as ``denied``; successes of
administrative actions are audited as ``ok``.
"""

from __future__ import annotations

from typing import NoReturn

from database_service.auth import Principal, Scope
from database_service.errors import DatabaseServiceError, PermissionDenied
from database_service.observability.audit import AuditEvent, AuditLog

__all__ = ["Access"]


class Access:
    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    async def require(
        self, principal: Principal, scope: Scope, action: str, tenant_id: str | None = None
    ) -> None:
        """``scope`` (for ``tenant_id``, when given), or a refusal that is audited."""
        try:
            principal.require(scope, tenant_id)
        except PermissionDenied as exc:
            await self.deny(principal, tenant_id, action, exc)

    async def require_tenant(self, principal: Principal, tenant_id: str, action: str) -> None:
        """The principal may act for ``tenant_id`` (any scope)."""
        if not principal.can_act_for(tenant_id):
            await self.deny(
                principal,
                tenant_id,
                action,
                PermissionDenied(
                    f"service {principal.service!r} may not act for tenant {tenant_id!r}"
                ),
            )

    async def require_platform(
        self, principal: Principal, action: str, *scopes: Scope, tenant_id: str | None = None
    ) -> None:
        """Operations spanning tenants: a platform principal (tenants ``*``) holding one of
        ``scopes`` (default ``admin``); a tenant's administrator is refused."""
        try:
            principal.require_platform(*(scopes or (Scope.ADMIN,)))
        except PermissionDenied as exc:
            await self.deny(principal, tenant_id, action, exc)

    async def deny(
        self,
        principal: Principal | None,
        tenant_id: str | None,
        action: str,
        exc: DatabaseServiceError,
    ) -> NoReturn:
        await self._audit.denied(principal.service if principal else None, tenant_id, action, exc)
        raise exc

    async def denied(
        self,
        principal: Principal | None,
        tenant_id: str | None,
        action: str,
        exc: DatabaseServiceError,
    ) -> None:
        """Record a refusal the caller raises itself (authentication failures)."""
        await self._audit.denied(principal.service if principal else None, tenant_id, action, exc)

    async def done(
        self,
        principal: Principal,
        action: str,
        tenant_id: str | None = None,
        detail: str | None = None,
    ) -> None:
        await self._audit.record(
            AuditEvent(service=principal.service, tenant_id=tenant_id, action=action, detail=detail)
        )
