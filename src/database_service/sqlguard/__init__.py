"""Statement classification and rejection with PostgreSQL's own parser (pglast)."""

from database_service.sqlguard.functions import ALLOWED_FUNCTIONS, NAME_ARGUMENTS, NAME_TYPES
from database_service.sqlguard.statement import (
    Classification,
    SqlGuard,
    StatementKind,
    packaged_catalog_functions,
)

__all__ = [
    "ALLOWED_FUNCTIONS",
    "NAME_ARGUMENTS",
    "NAME_TYPES",
    "Classification",
    "SqlGuard",
    "StatementKind",
    "packaged_catalog_functions",
]
