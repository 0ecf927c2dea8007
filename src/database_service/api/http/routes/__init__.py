"""REST routes, one module per concern; each calls the application layer only."""

from database_service.api.http.routes import (
    analytics,
    backups,
    graph,
    hub,
    keyvalue,
    multidb,
    observability,
    partitions,
    queries,
    services,
    statements,
    status,
    tenant_backups,
    tenants,
    timeseries,
    vectors,
)

ROUTERS = (
    queries.router,
    timeseries.router,
    keyvalue.router,
    multidb.router,
    vectors.router,
    graph.router,
    analytics.router,
    tenants.router,
    tenant_backups.router,
    services.router,
    partitions.router,
    backups.router,
    observability.router,
    statements.router,
    hub.router,
    status.router,
)

__all__ = ["ROUTERS"]
