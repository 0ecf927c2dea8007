"""Statement classification and rejection with PostgreSQL's own parser (pglast)."""

from database_service.sqlguard.statement import Classification, SqlGuard, StatementKind

__all__ = ["Classification", "SqlGuard", "StatementKind"]
