"""REST routes, one module per concern; each calls the application layer only."""

from database_service.api.http.routes import (
    keyvalue,
    observability,
    partitions,
    queries,
    services,
    tenants,
    timeseries,
)

ROUTERS = (
    queries.router,
    timeseries.router,
    keyvalue.router,
    tenants.router,
    services.router,
    partitions.router,
    observability.router,
)

__all__ = ["ROUTERS"]
