"""The REST boundary for errors: the service's error tree, FastAPI's and Starlette's own errors,
and anything unexpected, all in the documented shape ``{"error": {"code", "message", ...}}``."""

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope as AsgiScope

from database_service.app import Application
from database_service.errors import (
    UNREACHABLE_ERRORS,
    DatabaseServiceError,
    InvalidRequest,
    Unauthenticated,
    caller_text_error,
    escaped_driver_error,
    http_status_of,
    unavailable,
)
from database_service.observability import AuditEvent
from database_service.observability.notices import Notices

__all__ = ["ErrorResponses", "install_error_handlers", "internal_error_handler"]

log = logging.getLogger(__name__)

# Errors Starlette and FastAPI raise themselves (no route, wrong method, a body that does not
# parse), in the service's words.
_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_request",
}


class ErrorResponses:
    """The service's errors as responses: shared by the exception handlers FastAPI calls and
    the fast path of ``POST /api/v1/query`` (``routes.queries.QueryFastPath``), which answers
    without FastAPI's routing."""

    def __init__(self, core: Application) -> None:
        self._core = core
        self._notices = Notices(log)

    def service(self, request: Request, exc: DatabaseServiceError) -> JSONResponse:
        request.state.error_code = exc.error_code
        self._core.metrics.errors.labels(exc.error_code).inc()
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
        return JSONResponse(
            {"error": exc.to_dict()}, status_code=http_status_of(exc), headers=headers
        )

    def driver(self, request: Request, exc: Exception) -> JSONResponse:
        """Last resort: PostgreSQL unreachable on a path without its own translation is still a
        503 the caller can retry, not a 500 (logged once per outage, not per request).
        Anything else is re-raised here and stays a 500."""
        if not escaped_driver_error(exc):
            raise exc
        self._notices.once(
            "postgres-unreachable",
            "PostgreSQL is unreachable (%s: %s); requests answer 503 until it is back: see the"
            " health document's dependencies.postgresql",
            type(exc).__name__,
            exc,
        )
        return self.service(request, unavailable(request.url.path, exc))


def install_error_handlers(api: FastAPI, core: Application) -> ErrorResponses:
    responses = ErrorResponses(core)

    @api.exception_handler(DatabaseServiceError)
    async def service_error(request: Request, exc: DatabaseServiceError) -> JSONResponse:
        return responses.service(request, exc)

    @api.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return responses.service(request, InvalidRequest(f"invalid request: {problems}"))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """No route, wrong method, a body that is not JSON in UTF-8: the documented shape."""
        status = exc.status_code
        code = _HTTP_CODES.get(status, "internal" if status >= 500 else "invalid_request")
        where = f"{request.method} {request.url.path}"
        message = {
            404: f"no such route: {where}",
            405: f"method not allowed: {where}",
            400: "invalid request: the body is not valid JSON in UTF-8",
        }.get(status, str(exc.detail))
        request.state.error_code = code
        core.metrics.errors.labels(code).inc()
        return JSONResponse(
            {"error": {"code": code, "message": message}}, status_code=status, headers=exc.headers
        )

    async def driver_error(request: Request, exc: Exception) -> JSONResponse:
        return responses.driver(request, exc)

    @api.exception_handler(asyncpg.exceptions.DataError)
    async def data_error(request: Request, exc: asyncpg.exceptions.DataError) -> JSONResponse:
        """Text PostgreSQL cannot hold, met on a path that did not check it: the caller's
        (``invalid_text``). Any other data error that escaped stays the internal error it is."""
        text = caller_text_error(exc)
        if text is None:
            raise exc
        return responses.service(request, text)

    for kind in UNREACHABLE_ERRORS:
        api.add_exception_handler(kind, driver_error)
    return responses


def internal_error_handler(core: Application) -> Any:
    async def internal_error(scope: AsgiScope, exc: Exception) -> None:
        """An exception nothing answered (a bug): log it with its traceback, count and audit
        it; ``InternalErrors`` then answers ``500 internal`` without its text."""
        route: Any = scope.get("route")
        operation = getattr(route, "path", None) or "unmatched"
        state = scope.get("state", {})
        method = scope.get("method", "?")
        log.error("%s %s: unexpected error", method, scope.get("path"), exc_info=exc)
        core.metrics.errors.labels("internal").inc()
        core.metrics.unhandled.labels("http", operation).inc()
        await core.audit.record(
            AuditEvent(
                service=state.get("service"),
                tenant_id=state.get("tenant_id"),
                action=f"{method} {operation}",
                outcome="error",
                code="internal",
                detail=type(exc).__name__,
            )
        )

    return internal_error
