"""The query execution core shared by every front end."""

from database_service.query.executor import Column, QueryExecutor, QueryResult, TenantContext
from database_service.query.values import coerce_params, encode_value

__all__ = [
    "Column",
    "QueryExecutor",
    "QueryResult",
    "TenantContext",
    "coerce_params",
    "encode_value",
]
