"""Who is calling: a service, the tenants it may act for, and what it may do.

A principal whose tenants contain ``*`` is the *platform*: its scopes hold over every tenant and
over what no single tenant owns (the shared partitions, every service, the whole audit log,
service-wide figures). Any other principal's scopes, ``admin`` included, cover its own tenants
only; ``covers`` is the one test for "within the caller's" (granting a service, minting a token).

A principal may also *grant* scopes it does not hold (``grants``): the bootstrap administrator
creates tenants and services and mints their tokens, but holds no data scope itself (``read``,
``write``, ``ingest``), so the root credential never reads, writes or ingests a tenant's data.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
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
    METRICS = "metrics"  # service-wide figures (Prometheus, dashboards); platform principals only


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
    # Scopes it may hand out (to a service it creates, in a token it mints) without holding
    # them: the bootstrap administrator's data scopes.
    grants: frozenset[Scope] = frozenset()

    def can_act_for(self, tenant_id: str) -> bool:
        return self.is_platform or tenant_id in self.tenants

    def has_scope(self, scope: Scope) -> bool:
        return scope in self.scopes

    @property
    def is_platform(self) -> bool:
        """Acts for every tenant (``*``), such as the bootstrap administrator."""
        return ALL_TENANTS in self.tenants

    def is_platform_with(self, *scopes: Scope) -> bool:
        """A platform principal holding at least one of ``scopes``."""
        return self.is_platform and any(s in self.scopes for s in scopes)

    def covers(self, tenants: Iterable[str] = (), scopes: Iterable[Scope] = ()) -> bool:
        """Whether ``tenants`` and ``scopes`` are all within this principal's own (scopes: held
        or grantable).

        ``*`` among ``tenants`` is covered only by a platform principal: a tenant-scoped caller
        can never grant or mint "every tenant", however many tenants it holds."""
        if not set(scopes) <= self.scopes | self.grants:
            return False
        if self.is_platform:
            return True
        wanted = set(tenants)
        return ALL_TENANTS not in wanted and wanted <= self.tenants

    def require_platform(self, *scopes: Scope) -> None:
        """Raise PermissionDenied unless this is a platform principal holding one of ``scopes``."""
        if not self.is_platform_with(*scopes):
            wanted = " or ".join(repr(s.value) for s in scopes)
            raise PermissionDenied(
                f"service {self.service!r}: this operation spans tenants and needs the {wanted}"
                " scope over every tenant ('*')"
            )

    def require(self, scope: Scope, tenant_id: str | None = None) -> None:
        """Raise PermissionDenied unless this principal holds ``scope`` (for ``tenant_id``)."""
        if tenant_id is not None and not self.can_act_for(tenant_id):
            raise PermissionDenied(f"service {self.service!r} may not act for tenant {tenant_id!r}")
        if scope not in self.scopes and scope in self.grants:
            raise PermissionDenied(
                f"service {self.service!r} is for bootstrapping only (tenants, services, tokens):"
                f" it may grant the {scope.value!r} scope but not use it; issue a token for a"
                " service that holds it"
            )
        if scope not in self.scopes:
            raise PermissionDenied(
                f"service {self.service!r} lacks the {scope.value!r} scope for this operation"
            )
