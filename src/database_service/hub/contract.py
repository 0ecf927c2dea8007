"""The Central Hub contract: what this service sends and what it accepts (pure functions and
models, no sockets). The README's "Central Hub" section is the prose of it.

This service → the hub (``DBSVC_CENTRAL_HUB_URL``; ``Authorization: Bearer
DBSVC_CENTRAL_HUB_TOKEN`` when set):

- ``POST {hub}/api/v1/instances`` — registration: ``{"instance_id", "service":
  "database-service", "version", "endpoints": {"grpc", "http"}, "tenants": [...],
  "started_at"}``. Any 2xx registers.
- ``POST {hub}/api/v1/instances/{instance_id}/heartbeat`` every
  ``DBSVC_CENTRAL_HUB_HEARTBEAT_SECONDS``: ``{"instance_id", "at", "status", "health": <the
  health document>, "metrics": {...}, "tenants": [...], "config_versions": {tenant: version}}``.
  A 404 means the hub forgot the instance: it registers again. The answer may carry
  configuration updates: ``{"updates": [<update>, ...]}``.

The hub → this service: ``POST /api/v1/hub/tenant-config`` with ``{"updates": [<update>,
...]}`` (or one update), as a platform administrator (a service credential of ours with
``admin`` over every tenant). The answer lists each update's outcome.

An update: ``{"tenant_id", "version": n ≥ 1, "limits": {"connection_limit",
"statement_timeout_ms"}?, "status": "active" | "suspended"?, "cache_rules": {table: ttl_ms}?}``.
Applied atomically per update, idempotent by version: a version not newer than the tenant's
applied one is ``unchanged``. A batch is validated whole before any of it is applied: one
malformed update refuses the batch.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from database_service.errors import InvalidParameters
from database_service.tenancy import TenantLimits, TenantRecord, validate_tenant_id
from database_service.tenancy.configuration import TenantConfig

__all__ = [
    "Limits",
    "Update",
    "heartbeat_document",
    "parse_updates",
    "registration_document",
]

_TABLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
MAX_UPDATES = 1000


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    connection_limit: int = Field(ge=1, le=10_000)
    statement_timeout_ms: int = Field(ge=100, le=86_400_000)


class Update(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tenant_id: str = Field(min_length=1, max_length=63)
    version: int = Field(ge=1, le=2**62)
    limits: Limits | None = None
    status: Literal["active", "suspended"] | None = None
    cache_rules: dict[str, int] | None = None


def parse_updates(payload: Any, *, max_ttl_ms: int) -> list[TenantConfig]:
    """``{"updates": [...]}`` or one update, validated whole (InvalidParameters naming the
    first problem; nothing of a refused batch is applied)."""
    if isinstance(payload, Mapping) and "updates" in payload:
        if set(payload) != {"updates"} or not isinstance(payload["updates"], list):
            raise InvalidParameters('expected {"updates": [...]} and nothing else')
        items = payload["updates"]
    else:
        items = [payload]
    if not 1 <= len(items) <= MAX_UPDATES:
        raise InvalidParameters(f"1 to {MAX_UPDATES} updates at a time")
    configs = []
    seen: set[tuple[str, int]] = set()
    for n, item in enumerate(items):
        try:
            update = Update.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "update"
            raise InvalidParameters(f"update {n}: {where}: {first['msg']}") from None
        tenant_id = validate_tenant_id(update.tenant_id)
        for table, ttl in (update.cache_rules or {}).items():
            if not _TABLE_NAME.fullmatch(table):
                raise InvalidParameters(f"update {n}: {table!r:.80} is not a table name")
            if not 0 < ttl <= max_ttl_ms:
                raise InvalidParameters(
                    f"update {n}: the TTL of {table} must be 1 to {max_ttl_ms} ms"
                )
        if (tenant_id, update.version) in seen:
            raise InvalidParameters(
                f"update {n}: tenant {tenant_id} version {update.version} twice"
            )
        seen.add((tenant_id, update.version))
        configs.append(
            TenantConfig(
                tenant_id=tenant_id,
                version=update.version,
                limits=(
                    TenantLimits(update.limits.connection_limit, update.limits.statement_timeout_ms)
                    if update.limits
                    else None
                ),
                status=update.status,
                cache_rules=update.cache_rules,
                source=update.model_dump(exclude_none=True),
            )
        )
    # Per tenant in version order: a batch carrying v2 and v3 ends at v3 whatever its order.
    return sorted(configs, key=lambda c: (c.tenant_id, c.version))


def registration_document(
    *,
    instance_id: str,
    version: str,
    endpoints: Mapping[str, str],
    tenants: list[TenantRecord],
    started_at: dt.datetime,
) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "service": "database-service",
        "version": version,
        "endpoints": dict(endpoints),
        "tenants": sorted(t.tenant_id for t in tenants),
        "started_at": started_at.isoformat(),
    }


def heartbeat_document(
    *,
    instance_id: str,
    health: Mapping[str, Any],
    metrics: Mapping[str, Any],
    tenants: list[TenantRecord],
    config_versions: Mapping[str, int],
    at: dt.datetime,
) -> dict[str, Any]:
    return {
        "instance_id": instance_id,
        "at": at.isoformat(),
        "status": health.get("status", "unknown"),
        "health": dict(health),
        "metrics": dict(metrics),
        "tenants": sorted(t.tenant_id for t in tenants),
        "config_versions": dict(config_versions),
    }
