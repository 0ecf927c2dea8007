"""PostgreSQL connections: the owner's pool and per-tenant pools under a global cap."""

from database_service.postgres.pools import (
    Connection,
    PoolStats,
    TenantConnection,
    TenantLogin,
    TenantPools,
    create_owner_pool,
    init_connection,
)

__all__ = [
    "Connection",
    "PoolStats",
    "TenantConnection",
    "TenantLogin",
    "TenantPools",
    "create_owner_pool",
    "init_connection",
]
