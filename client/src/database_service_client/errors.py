"""Errors the client raises, one class per gRPC status code the service uses.

    DatabaseServiceError
     ├── InvalidArgument        INVALID_ARGUMENT   (bad SQL, parameters, ids)
     ├── Unauthenticated        UNAUTHENTICATED
     ├── PermissionDenied       PERMISSION_DENIED
     ├── NotFound               NOT_FOUND
     ├── AlreadyExists          ALREADY_EXISTS
     ├── FailedPrecondition     FAILED_PRECONDITION
     ├── Aborted                ABORTED            (serialization failure, deadlock: retry)
     ├── ResourceExhausted      RESOURCE_EXHAUSTED
     ├── DeadlineExceeded       DEADLINE_EXCEEDED  (also statement timeouts)
     ├── Unavailable            UNAVAILABLE
     ├── Cancelled              CANCELLED
     ├── InternalError          INTERNAL, UNKNOWN, anything else
     └── NotConfigured          a store this deployment does not have (raised by the client)

Each carries ``code`` (the service's stable error code, e.g. ``unique_violation``), ``sqlstate``
and ``position`` when PostgreSQL reported them, and ``status`` (the grpc.StatusCode).
"""

from __future__ import annotations

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DatabaseServiceError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "NotConfigured",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class DatabaseServiceError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: str = "internal",
        sqlstate: str | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.sqlstate = sqlstate
        self.position = position

    def __str__(self) -> str:
        extra = f" (SQLSTATE {self.sqlstate})" if self.sqlstate else ""
        return f"{self.code}: {self.message}{extra}"


class InvalidArgument(DatabaseServiceError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(DatabaseServiceError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(DatabaseServiceError):
    status = grpc.StatusCode.PERMISSION_DENIED


class NotFound(DatabaseServiceError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DatabaseServiceError):
    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DatabaseServiceError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(DatabaseServiceError):
    status = grpc.StatusCode.ABORTED


class ResourceExhausted(DatabaseServiceError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(DatabaseServiceError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(DatabaseServiceError):
    status = grpc.StatusCode.UNAVAILABLE


class Cancelled(DatabaseServiceError):
    status = grpc.StatusCode.CANCELLED


class InternalError(DatabaseServiceError):
    status = grpc.StatusCode.INTERNAL


class NotConfigured(DatabaseServiceError):
    """The operation needs a store this deployment has not configured."""


_BY_STATUS: dict[grpc.StatusCode, type[DatabaseServiceError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument, Unauthenticated, PermissionDenied, NotFound, AlreadyExists,
        FailedPrecondition, Aborted, ResourceExhausted, DeadlineExceeded, Unavailable, Cancelled,
        InternalError,
    )
}  # fmt: skip


def from_rpc_error(error: grpc.aio.AioRpcError) -> DatabaseServiceError:
    """The exception for a failed call, with the service's code, SQLSTATE and position."""
    trailing = {k: v for k, v in (error.trailing_metadata() or ()) if isinstance(v, str)}
    status = error.code()
    cls = _BY_STATUS.get(status, InternalError)
    if trailing.get("dbsvc-error-code") == "not_configured":
        cls = NotConfigured  # a store this deployment lacks (execute_multi_db_operation)
    position = trailing.get("dbsvc-position")
    default_code = (
        "deadline_exceeded"
        if status is grpc.StatusCode.DEADLINE_EXCEEDED
        else (status.name.lower() if status is not None else "unknown")
    )
    return cls(
        error.details() or status.name,
        code=trailing.get("dbsvc-error-code", default_code),
        sqlstate=trailing.get("dbsvc-sqlstate"),
        position=int(position) if position and position.isdigit() else None,
    )
