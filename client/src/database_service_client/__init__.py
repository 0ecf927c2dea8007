"""Python client for the Database Service: ``MultiDatabaseClient``; ``MarketDataPublisher`` to
publish market data for ingestion (the ``publish`` extra)."""

from database_service_client.client import (
    Column,
    MultiDatabaseClient,
    MultiDbResult,
    PulledStream,
    QueryResult,
    QueryStream,
    StatementResult,
    StoreOutcome,
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
    "MultiDbResult",
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
    "StoreOutcome",
    "TlsOptions",
    "Unauthenticated",
    "Unavailable",
    "bind",
    "event_id_for",
    "prediction",
    "tick",
]
