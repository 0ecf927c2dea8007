"""REST routes, one module per concern; each calls the application layer only."""

from database_service.api.http.routes import (
    analytics,
    backups,
    keyvalue,
    observability,
    partitions,
    queries,
    services,
    statements,
    tenant_backups,
    tenants,
    timeseries,
)

ROUTERS = (
    queries.router,
    timeseries.router,
    keyvalue.router,
    analytics.router,
    tenants.router,
    tenant_backups.router,
    services.router,
    partitions.router,
    backups.router,
    observability.router,
    statements.router,
)

__all__ = ["ROUTERS"]
