"""Python client for the Database Service: ``MultiDatabaseClient``."""

from database_service_client.client import (
    Column,
    MultiDatabaseClient,
    QueryResult,
    QueryStream,
    StatementResult,
)
from database_service_client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DatabaseServiceError,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotConfigured,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "Column",
    "DatabaseServiceError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InternalError",
    "InvalidArgument",
    "MultiDatabaseClient",
    "NotConfigured",
    "NotFound",
    "PermissionDenied",
    "QueryResult",
    "QueryStream",
    "ResourceExhausted",
    "StatementResult",
    "Unauthenticated",
    "Unavailable",
]
