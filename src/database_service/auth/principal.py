"""Who is calling: a service, the tenants it may act for, and what it may do."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from database_service.errors import PermissionDenied

__all__ = ["ALL_TENANTS", "Principal", "Scope", "parse_scopes"]

ALL_TENANTS = "*"


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    INGEST = "ingest"
    ADMIN = "admin"


def parse_scopes(values: object) -> frozenset[Scope]:
    if isinstance(values, str):
        values = [v for v in values.replace(" ", ",").split(",") if v]
    if not isinstance(values, list | tuple | set | frozenset):
        raise ValueError("scopes must be a list")
    try:
        return frozenset(Scope(v) for v in values)
    except ValueError:
        known = ", ".join(s.value for s in Scope)
        raise ValueError(f"unknown scope in {sorted(map(str, values))}; known: {known}") from None


@dataclass(frozen=True, slots=True)
class Principal:
    service: str
    tenants: frozenset[str]
    scopes: frozenset[Scope]
    token_id: str | None = None
    expires_at: datetime | None = None

    def can_act_for(self, tenant_id: str) -> bool:
        return ALL_TENANTS in self.tenants or tenant_id in self.tenants

    def has_scope(self, scope: Scope) -> bool:
        return scope in self.scopes

    def require(self, scope: Scope, tenant_id: str | None = None) -> None:
        """Raise PermissionDenied unless this principal holds ``scope`` (for ``tenant_id``)."""
        if tenant_id is not None and not self.can_act_for(tenant_id):
            raise PermissionDenied(f"service {self.service!r} may not act for tenant {tenant_id!r}")
        if scope not in self.scopes:
            raise PermissionDenied(
                f"service {self.service!r} lacks the {scope.value!r} scope for this operation"
            )
