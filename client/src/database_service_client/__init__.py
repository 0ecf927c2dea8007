"""Python client for the Database Service: ``MultiDatabaseClient``; ``MarketDataPublisher`` to
publish market data for ingestion (the ``publish`` extra)."""

from database_service_client.client import (
    Column,
    MultiDatabaseClient,
    PulledStream,
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
from database_service_client.params import bind
from database_service_client.publish import (
    MarketDataPublisher,
    PublishError,
    PublishReport,
    event_id_for,
    prediction,
    tick,
)
from database_service_client.tls import TlsOptions

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
    "MarketDataPublisher",
    "MultiDatabaseClient",
    "NotConfigured",
    "NotFound",
    "PermissionDenied",
    "PublishError",
    "PublishReport",
    "PulledStream",
    "QueryResult",
    "QueryStream",
    "ResourceExhausted",
    "StatementResult",
    "TlsOptions",
    "Unauthenticated",
    "Unavailable",
    "bind",
    "event_id_for",
    "prediction",
    "tick",
]
