"""Tenant ids and the PostgreSQL names derived from them.

Ids are validated once, here, against ``^[a-z][a-z0-9_]{1,40}$``; every identifier the service
interpolates into SQL is derived from a validated id or from validated settings, and is still
quoted with ``quote_ident`` where it is written into a statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from database_service.errors import InvalidTenantId

__all__ = ["TenantNames", "quote_ident", "validate_tenant_id"]

_TENANT_ID = re.compile(r"^[a-z][a-z0-9_]{1,40}$")
SCHEMA_PREFIX = "tenant_"


def validate_tenant_id(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not _TENANT_ID.fullmatch(tenant_id):
        shown = repr(tenant_id)[:60]
        raise InvalidTenantId(
            f"invalid tenant id {shown}: use 2-41 characters, a lower-case letter first, "
            "then lower-case letters, digits or '_'"
        )
    return tenant_id


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's quote_ident does."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, slots=True)
class TenantNames:
    """The schema and role of one tenant."""

    tenant_id: str
    schema: str
    role: str

    @classmethod
    def of(cls, tenant_id: str, role_prefix: str) -> TenantNames:
        tenant_id = validate_tenant_id(tenant_id)
        return cls(tenant_id, SCHEMA_PREFIX + tenant_id, role_prefix + tenant_id)
