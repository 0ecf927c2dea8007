"""Tenant records in the control plane, with a short-lived cache for the request path.

The cache keeps tenant lookups off the hot path; its TTL bounds how long another instance may
keep serving a tenant that was suspended elsewhere (PostgreSQL itself refuses the suspended role's
new logins and its session_company() returns nothing at once, so the TTL is not a security bound).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from database_service.errors import (
    TenantNotFound,
    TenantSuspended,
    Unavailable,
    postgres_unavailable,
)
from database_service.tenancy.ids import quote_ident, validate_tenant_id

__all__ = ["TenantLimits", "TenantRecord", "TenantRegistry"]


@dataclass(frozen=True, slots=True)
class TenantLimits:
    connection_limit: int
    statement_timeout_ms: int


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant_id: str
    status: str
    role_name: str
    schema_name: str
    role_secret: str
    limits: TenantLimits
    created_at: datetime
    user_role_name: str | None = None  # the user-scoped login (control migration 0004)

    @property
    def active(self) -> bool:
        return self.status == "active"

    @property
    def roles(self) -> tuple[str, ...]:
        """The tenant's login roles, the company-wide one first."""
        return (self.role_name, *([self.user_role_name] if self.user_role_name else []))

    def public_dict(self) -> dict[str, Any]:
        """What an admin may see (never the secret)."""
        return {
            "tenant_id": self.tenant_id,
            "status": self.status,
            "schema": self.schema_name,
            "role": self.role_name,
            "connection_limit": self.limits.connection_limit,
            "statement_timeout_ms": self.limits.statement_timeout_ms,
            "created_at": self.created_at.isoformat(),
        }


class TenantRegistry:
    """Reads tenant records through the service owner's pool.

    Every request passes through here before it reaches a tenant pool, so PostgreSQL being down
    surfaces here first: as ``Unavailable``, like the same failure on a tenant connection."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        control_schema: str,
        cache_ttl: float = 2.0,
        stale_if_unavailable: float = 300.0,
    ) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.tenants"
        self._ttl = cache_ttl
        # While PostgreSQL is unreachable, a record read this recently still answers: the
        # requests that can be served then (stale cached results, key-value operations on
        # Redis) would otherwise fail here, 2 s into an outage. Nothing about a tenant can
        # change meanwhile: suspending or deleting one is a write to that PostgreSQL.
        self._stale_if_unavailable = stale_if_unavailable
        self._cache: dict[str, tuple[float, TenantRecord | None]] = {}

    def _record(self, row: asyncpg.Record) -> TenantRecord:
        return TenantRecord(
            tenant_id=row["tenant_id"],
            status=row["status"],
            role_name=row["role_name"],
            schema_name=row["schema_name"],
            role_secret=row["role_secret"],
            limits=TenantLimits(row["connection_limit"], row["statement_timeout_ms"]),
            created_at=row["created_at"],
            user_role_name=row["user_role_name"],
        )

    async def find(self, tenant_id: str) -> TenantRecord | None:
        with postgres_unavailable("tenant registry"):
            row = await self._pool.fetchrow(
                f"SELECT * FROM {self._table} WHERE tenant_id = $1", tenant_id
            )
        return None if row is None else self._record(row)

    async def get(self, tenant_id: str) -> TenantRecord:
        record = await self.find(validate_tenant_id(tenant_id))
        if record is None:
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
        return record

    def known_active(self, tenant_id: str) -> TenantRecord | None:
        """The tenant's record as ``get_active`` would answer it now without reading anything:
        cached, not due for a reread, active. None otherwise (``get_active`` decides)."""
        cached = self._cache.get(tenant_id)
        if cached is None or cached[0] <= time.monotonic():
            return None
        record = cached[1]
        return record if record is not None and record.active else None

    async def get_active(self, tenant_id: str) -> TenantRecord:
        """The tenant for a request: cached briefly; unknown → 404, suspended → 409."""
        validate_tenant_id(tenant_id)
        now = time.monotonic()
        cached = self._cache.get(tenant_id)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            try:
                record = await self.find(tenant_id)
            except Unavailable:
                if cached is None or now - (cached[0] - self._ttl) > self._stale_if_unavailable:
                    raise
                record = cached[1]  # the last known record; refreshed once PostgreSQL is back
            else:
                # Unchanged: the same object, which is how QueryExecutor.replay knows it; the
                # one kept now, so that calls reading it at once all end with one object.
                current = self._cache.get(tenant_id)
                if current is not None and record == current[1]:
                    record = current[1]
                self._cache[tenant_id] = (now + self._ttl, record)
        if record is None:
            raise TenantNotFound(f"tenant {tenant_id!r} does not exist")
        if not record.active:
            raise TenantSuspended(f"tenant {tenant_id!r} is suspended")
        return record

    def invalidate(self, tenant_id: str) -> None:
        self._cache.pop(tenant_id, None)

    async def list(self) -> list[TenantRecord]:
        with postgres_unavailable("tenant registry"):
            rows = await self._pool.fetch(f"SELECT * FROM {self._table} ORDER BY tenant_id")
        return [self._record(r) for r in rows]

    async def count_active(self) -> int:
        with postgres_unavailable("tenant registry"):
            value = await self._pool.fetchval(
                f"SELECT count(*) FROM {self._table} WHERE status = 'active'"
            )
        return int(value)
