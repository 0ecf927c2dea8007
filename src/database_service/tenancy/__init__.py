"""Tenants: ids, roles, schemas, RLS, per-tenant migrations and the control plane."""

from database_service.tenancy.ids import TenantNames, quote_ident, validate_tenant_id
from database_service.tenancy.manager import TenantManager
from database_service.tenancy.migrations import MigrationReport, Migrator
from database_service.tenancy.registry import TenantLimits, TenantRecord, TenantRegistry
from database_service.tenancy.secrets import SecretBox

__all__ = [
    "MigrationReport",
    "Migrator",
    "SecretBox",
    "TenantLimits",
    "TenantManager",
    "TenantNames",
    "TenantRecord",
    "TenantRegistry",
    "quote_ident",
    "validate_tenant_id",
]
