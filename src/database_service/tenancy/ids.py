"""Tenant ids, and the PostgreSQL names of a tenant's schema and roles.

Ids are validated once, here, against ``^[a-z][a-z0-9_]{1,40}$``. The schema and role names are
**opaque**: random, chosen when the tenant is created and kept in the control plane, so that the
catalog — which PostgreSQL shows to every role — names no customer. Every identifier the service
interpolates into SQL comes from a validated id, the control plane or validated settings, and is
still quoted with ``quote_ident`` where it is written into a statement.
"""

from __future__ import annotations

import functools
import re
import secrets
from dataclasses import dataclass

from database_service.errors import InvalidTenantId

__all__ = ["TenantNames", "quote_ident", "quote_literal", "validate_tenant_id"]

_TENANT_ID = re.compile(r"^[a-z][a-z0-9_]{1,40}$")
SCHEMA_PREFIX = "t_"
LEGACY_SCHEMA_PREFIX = "tenant_"  # before names were opaque: tenant_<id>, <role prefix><id>
USER_ROLE_SUFFIX = "_u"


@functools.lru_cache(maxsize=4096)
def _well_formed(tenant_id: str) -> bool:
    # Memoised: every request checks its tenant id, some twice.
    return _TENANT_ID.fullmatch(tenant_id) is not None


def validate_tenant_id(tenant_id: object) -> str:
    if type(tenant_id) is str and len(tenant_id) <= 41:
        # Exactly str (a subclass's __hash__/__eq__ could be anything), and no longer than an
        # id may be: the memo holds nothing big.
        valid = _well_formed(tenant_id)
    else:
        valid = isinstance(tenant_id, str) and _TENANT_ID.fullmatch(tenant_id) is not None
    if not valid:
        shown = repr(tenant_id)[:60]
        raise InvalidTenantId(
            f"invalid tenant id {shown}: use 2-41 characters, a lower-case letter first, "
            "then lower-case letters, digits or '_'"
        )
    assert isinstance(tenant_id, str)
    return tenant_id


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's quote_ident does."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """Quote a string constant the way PostgreSQL's quote_literal does (standard strings)."""
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class TenantNames:
    """The schema and the two login roles of one tenant: ``role`` for company-wide requests,
    ``user_role`` for requests on behalf of one user (see control migration 0004)."""

    tenant_id: str
    schema: str
    role: str
    user_role: str

    @classmethod
    def new(cls, tenant_id: str, role_prefix: str) -> TenantNames:
        """Fresh opaque names for a new tenant (64 random bits: no customer id, no guessing)."""
        tenant_id = validate_tenant_id(tenant_id)
        token = secrets.token_hex(8)
        role = role_prefix + token
        return cls(tenant_id, SCHEMA_PREFIX + token, role, role + USER_ROLE_SUFFIX)
