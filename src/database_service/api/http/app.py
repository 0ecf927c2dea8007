"""The REST front end (seed: "Method 3: HTTP REST"): admin operations, health, metrics, and a
JSON query endpoint for curl users.

A thin adapter: routes (one module per concern in ``routes/``) authenticate through ``deps`` and
call the application layer, which authorizes and audits itself; errors leave through
``errors``. The core is reached as ``request.app.state.core``.
"""

from typing import Any

from fastapi import FastAPI

from database_service import __version__
from database_service.api.http.errors import install_error_handlers, internal_error_handler
from database_service.api.http.middleware import BodyLimit, InternalErrors, RequestMetrics
from database_service.api.http.routes import ROUTERS
from database_service.api.http.routes.queries import QUERY_ROUTE, QueryFastPath
from database_service.api.http.schemas import ErrorResponse
from database_service.app import Application

__all__ = ["create_http_app"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 429, 500, 503)
}


def create_http_app(core: Application) -> FastAPI:
    api = FastAPI(
        title="Database Service",
        version=__version__,
        description="Multi-tenant database gateway: tenant isolation enforced by PostgreSQL.",
        responses=_ERRORS,
    )
    api.state.core = core
    for router in ROUTERS:
        api.include_router(router)
    errors = install_error_handlers(api, core)
    api.add_middleware(QueryFastPath, errors=errors, route=QUERY_ROUTE)
    api.add_middleware(InternalErrors, on_error=internal_error_handler(core))
    api.add_middleware(BodyLimit, max_bytes=core.settings.max_request_bytes)
    # Around the body limit: a refused body is counted, timed and answered with its request id.
    api.add_middleware(RequestMetrics, metrics=core.metrics, window=core.window)
    # Outermost (around every middleware above): a server span per request, continuing the
    # caller's traceparent header. Nothing is installed when traces are off.
    core.tracing.instrument_http(api)
    return api
