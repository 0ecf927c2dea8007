"""The query execution core shared by every front end."""

from database_service.query.executor import QueryExecutor, TenantContext
from database_service.query.values import coerce_params, encode_value
from database_service.results import (
    Column,
    Header,
    QueryResult,
    Summary,
    TransactionResult,
)

__all__ = [
    "Column",
    "Header",
    "QueryExecutor",
    "QueryResult",
    "Summary",
    "TenantContext",
    "TransactionResult",
    "coerce_params",
    "encode_value",
]
