"""The query execution core shared by every front end."""

from database_service.query.executor import (
    Column,
    Header,
    QueryExecutor,
    QueryResult,
    Summary,
    TenantContext,
    TransactionResult,
)
from database_service.query.values import coerce_params, encode_value

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
