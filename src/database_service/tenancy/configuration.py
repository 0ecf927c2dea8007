"""A tenant's configuration as an operator (or the Central Hub) sets it: one version of its
limits, status and cache rules, applied all at once or not at all (``TenantManager.configure``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from database_service.tenancy.registry import TenantLimits

__all__ = ["TenantConfig"]


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """Fields left ``None`` stay as they are; ``cache_rules`` replaces the tenant's rules
    (table name -> TTL in ms) when given."""

    tenant_id: str
    version: int
    limits: TenantLimits | None = None
    status: str | None = None  # "active" or "suspended"
    cache_rules: dict[str, int] | None = None
    source: dict[str, Any] = field(default_factory=dict)  # what was received, as stored
