"""Errors the service reports to its callers.

Every error carries a stable ``code`` (snake_case, part of the API), a message a caller can act
on, the HTTP status and gRPC status name the front ends use, and for errors raised by PostgreSQL
the SQLSTATE, position, detail and hint.

The tree::

    DatabaseServiceError
     ├── InvalidRequest              invalid_request            400  INVALID_ARGUMENT
     │    ├── InvalidTenantId        invalid_tenant_id
     │    ├── InvalidParameters      invalid_parameters
     │    ├── PayloadTooLarge        payload_too_large          413
     │    ├── InvalidText            invalid_text               (not valid Unicode, or a NUL)
     │    ├── BackupCorrupt          backup_corrupt             (checksum or signature mismatch)
     │    ├── BackupUnsupported      backup_unsupported         (format version, schema)
     │    └── SqlRejected            sql_rejected               (the SQL guard said no)
     │         └── SqlSyntaxError    sql_syntax_error           SQLSTATE 42601, position
     ├── Unauthenticated             unauthenticated            401  UNAUTHENTICATED
     ├── PermissionDenied            permission_denied          403  PERMISSION_DENIED
     ├── NotFound                    not_found                  404  NOT_FOUND
     │    └── TenantNotFound         tenant_not_found
     ├── Conflict                    conflict                   409  ALREADY_EXISTS
     │    └── TenantExists           tenant_exists
     ├── FailedPrecondition          failed_precondition        409  FAILED_PRECONDITION
     │    ├── TenantSuspended        tenant_suspended
     │    ├── ConfirmationRequired   confirmation_required
     │    ├── BackupTargetNotEmpty   backup_target_not_empty    (restore over data: replace)
     │    └── BackupInvalid          backup_invalid             (fails verification; not used)
     ├── ResourceExhausted           resource_exhausted         429  RESOURCE_EXHAUSTED
     │    └── ResultTooLarge         result_too_large           422  (rows or bytes; stream it)
     ├── Unavailable                 unavailable                503  UNAVAILABLE
     │    └── StatementOutdated      statement_outdated         (a table changed under it; retry)
     └── QueryError                  (by SQLSTATE, see below)   PostgreSQL refused the statement

``QueryError`` maps a SQLSTATE to a code by class, the way psycopg's ``errors`` module does:
``23505`` → ``unique_violation``, class ``23`` → ``integrity_violation``, ``42501`` →
``insufficient_privilege``, ``57014`` → ``query_canceled`` and so on. Every class PostgreSQL
defines has a mapping (a statement's fault is 4xx, a server that cannot serve now is 503, only
class ``XX`` is 500); a class PostgreSQL does not define (a tenant's own RAISE) is a 400
``database_error``. The driver boundary (``query.boundary``) is the only place that builds one
from a driver error.

A driver error that means PostgreSQL cannot be reached or dropped the session (a socket error,
the driver's connection errors, a server starting or shutting down) is not about the statement:
it is ``Unavailable``, whichever pool the call went through. ``postgres_unreachable`` is the one
test for it, used by ``query.boundary.postgres_errors`` for tenant connections,
``postgres_unavailable`` around owner-pool calls on the request path, and the front ends' last
resort handlers (``escaped_driver_error``).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from typing import Any, ClassVar

import asyncpg

__all__ = [
    "DRIVER_ERRORS",
    "UNREACHABLE_ERRORS",
    "BackupCorrupt",
    "BackupInvalid",
    "BackupTargetNotEmpty",
    "BackupUnsupported",
    "ConfirmationRequired",
    "Conflict",
    "DatabaseServiceError",
    "DepthOutOfRange",
    "EdgeNotFound",
    "FailedPrecondition",
    "GraphCollectionKind",
    "GraphCollectionNotFound",
    "InvalidFilter",
    "InvalidParameters",
    "InvalidRequest",
    "InvalidTenantId",
    "InvalidText",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QueryError",
    "ResourceExhausted",
    "ResultTooLarge",
    "SqlRejected",
    "SqlSyntaxError",
    "StatementOutdated",
    "TenantExists",
    "TenantNotFound",
    "TenantSuspended",
    "Unauthenticated",
    "Unavailable",
    "VertexNotFound",
    "caller_text_error",
    "escaped_driver_error",
    "postgres_unavailable",
    "postgres_unreachable",
    "unavailable",
]


class DatabaseServiceError(Exception):
    """Base of every error a caller can see."""

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        position: int | None = None,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.position = position
        self.detail = detail
        self.hint = hint

    @property
    def error_code(self) -> str:
        """The stable code; instances may refine the class default (see QueryError)."""
        return self.code

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.error_code, "message": self.message}
        for key in ("sqlstate", "position", "detail", "hint"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return body


class InvalidRequest(DatabaseServiceError):
    code = "invalid_request"
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"


class InvalidTenantId(InvalidRequest):
    code = "invalid_tenant_id"


class InvalidParameters(InvalidRequest):
    code = "invalid_parameters"


class InvalidText(InvalidRequest):
    """SQL or a parameter that is not valid Unicode text (a lone surrogate, a NUL)."""

    code = "invalid_text"


class BackupCorrupt(InvalidRequest):
    """A tenant backup whose checksums or signature do not match (damaged, changed, or made
    with another master key): refused before anything is changed."""

    code = "backup_corrupt"


class BackupUnsupported(InvalidRequest):
    """A tenant backup this service cannot restore (another format version, a newer tenant
    schema, an object kind it does not export)."""

    code = "backup_unsupported"


class PayloadTooLarge(InvalidRequest):
    code = "payload_too_large"
    http_status = 413


class SqlRejected(InvalidRequest):
    """The SQL guard refused the statement before it reached PostgreSQL."""

    code = "sql_rejected"


class SqlSyntaxError(SqlRejected):
    code = "sql_syntax_error"


class Unauthenticated(DatabaseServiceError):
    code = "unauthenticated"
    http_status = 401
    grpc_status = "UNAUTHENTICATED"


class PermissionDenied(DatabaseServiceError):
    code = "permission_denied"
    http_status = 403
    grpc_status = "PERMISSION_DENIED"


class NotFound(DatabaseServiceError):
    code = "not_found"
    http_status = 404
    grpc_status = "NOT_FOUND"


class TenantNotFound(NotFound):
    code = "tenant_not_found"


class Conflict(DatabaseServiceError):
    code = "conflict"
    http_status = 409
    grpc_status = "ALREADY_EXISTS"


class TenantExists(Conflict):
    code = "tenant_exists"


class FailedPrecondition(DatabaseServiceError):
    code = "failed_precondition"
    http_status = 409
    grpc_status = "FAILED_PRECONDITION"


class TenantSuspended(FailedPrecondition):
    code = "tenant_suspended"


class ConfirmationRequired(FailedPrecondition):
    code = "confirmation_required"


class BackupInvalid(FailedPrecondition):
    """A backup that fails verification (a file missing, changed or added, WAL that does not
    parse): it is not restored from."""

    code = "backup_invalid"


class BackupTargetNotEmpty(FailedPrecondition):
    """A restore into a tenant that holds data; the caller may ask to replace it."""

    code = "backup_target_not_empty"


class ResourceExhausted(DatabaseServiceError):
    code = "resource_exhausted"
    http_status = 429
    grpc_status = "RESOURCE_EXHAUSTED"


class ResultTooLarge(ResourceExhausted):
    """A whole result past the service's limits (rows or bytes): nothing changed (a read, or a
    write rolled back), so the caller may stream it instead or ask for less."""

    code = "result_too_large"
    http_status = 422


class Unavailable(DatabaseServiceError):
    code = "unavailable"
    http_status = 503
    grpc_status = "UNAVAILABLE"


class StatementOutdated(Unavailable):
    """PostgreSQL refused a prepared statement whose tables changed (a column added or retyped)
    since it was prepared ("cached plan must not change result type"), at Bind: nothing ran,
    and retrying is safe. The query core retries once on fresh statements; a caller sees this
    only when the tables changed again meanwhile."""

    code = "statement_outdated"


# Driver errors that say PostgreSQL cannot be reached or ended the session, not that it refused a
# statement: socket errors and timeouts, asyncpg's connection-state errors ("connection is
# closed"), SQLSTATE class 08, and a server starting up, shutting down or crashed (57P01-57P03).
UNREACHABLE_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    # "cannot switch to state N; another operation (M) is in progress": a pooled connection
    # whose protocol was left mid-operation when PostgreSQL went away (seen after an embedded
    # PostgreSQL was killed and restarted); the connection is unusable, not the request wrong.
    asyncpg.exceptions._base.InternalClientError,
)
# A statement refused or a connection lost: what a background loop that retries shrugs off.
DRIVER_ERRORS: tuple[type[Exception], ...] = (asyncpg.PostgresError, *UNREACHABLE_ERRORS)
# InterfaceErrors about a value or the client's setup rather than the connection (asyncpg's
# client-side DataError and ClientConfigurationError are also ValueErrors).
_NOT_UNREACHABLE: tuple[type[Exception], ...] = (
    ValueError,
    asyncpg.exceptions.UnsupportedClientFeatureError,
    asyncpg.exceptions.UnsupportedServerFeatureError,
)


def postgres_unreachable(exc: BaseException) -> bool:
    """Whether a driver error means PostgreSQL is unreachable or dropped the connection."""
    return isinstance(exc, UNREACHABLE_ERRORS) and not isinstance(exc, _NOT_UNREACHABLE)


def unavailable(what: str, exc: BaseException) -> Unavailable:
    """The Unavailable for an unreachable-PostgreSQL error; raise it ``from exc``."""
    return Unavailable(
        f"{what}: PostgreSQL connection failed ({type(exc).__name__}: {exc})",
        sqlstate=getattr(exc, "sqlstate", None),
    )


@contextlib.contextmanager
def postgres_unavailable(what: str) -> Iterator[None]:
    """Around owner-pool calls: unreachable PostgreSQL becomes Unavailable (503); any other error
    passes unchanged, for the caller to handle (a unique violation) or to surface as a bug."""
    try:
        yield
    except Exception as exc:
        if not postgres_unreachable(exc):
            raise
        raise unavailable(what, exc) from exc


def caller_text_error(exc: BaseException) -> InvalidText | None:
    """For the front ends' last resort: text PostgreSQL cannot hold (NUL, a lone surrogate) that
    a caller sent and a statement met on a path that did not check it first. The service makes
    no such text itself, so it is the caller's input: ``invalid_text``, not an internal error."""
    if isinstance(
        exc,
        asyncpg.exceptions.CharacterNotInRepertoireError
        | asyncpg.exceptions.UntranslatableCharacterError,
    ) or (
        isinstance(exc, asyncpg.exceptions.DataError) and isinstance(exc.__cause__, UnicodeError)
    ):
        return InvalidText("text holds a NUL or is not valid Unicode (a lone surrogate)")
    return None


def escaped_driver_error(exc: BaseException) -> bool:
    """For the front ends' last resort: an unreachable-PostgreSQL error no boundary translated.

    A bare OSError or timeout counts only when it was raised inside asyncpg, so that a disk or
    network error elsewhere still surfaces as the internal error it is."""
    if not postgres_unreachable(exc):
        return False
    if not isinstance(exc, OSError):
        return True  # one of asyncpg's own classes
    return any(
        str(frame.f_globals.get("__name__", "")).startswith("asyncpg.")
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


# SQLSTATE → (code, http status, gRPC status). Exact states first, then every class PostgreSQL
# defines (errcodes.txt), so no SQLSTATE becomes a 500 by accident: what a caller's statement
# caused is a 4xx, what the server cannot do right now is 503 (retry), and only PostgreSQL's
# own internal errors (class XX) are 500. A class PostgreSQL does not define (a tenant's
# function may RAISE any five characters) is the caller's doing: 400.
_SQLSTATE_EXACT: dict[str, tuple[str, int, str]] = {
    "23505": ("unique_violation", 409, "ALREADY_EXISTS"),
    "23503": ("foreign_key_violation", 409, "FAILED_PRECONDITION"),
    "23502": ("not_null_violation", 400, "INVALID_ARGUMENT"),
    "23514": ("check_violation", 400, "INVALID_ARGUMENT"),
    "25006": ("read_only_transaction", 403, "PERMISSION_DENIED"),
    "42501": ("insufficient_privilege", 403, "PERMISSION_DENIED"),
    "42601": ("sql_syntax_error", 400, "INVALID_ARGUMENT"),
    "42P01": ("undefined_table", 404, "NOT_FOUND"),
    "42703": ("undefined_column", 400, "INVALID_ARGUMENT"),
    "42883": ("undefined_function", 400, "INVALID_ARGUMENT"),
    "42804": ("datatype_mismatch", 400, "INVALID_ARGUMENT"),
    "55P03": ("lock_not_available", 409, "ABORTED"),
    "55006": ("object_in_use", 409, "ABORTED"),
    "57014": ("query_canceled", 408, "DEADLINE_EXCEEDED"),
    "40001": ("serialization_failure", 409, "ABORTED"),
    "40P01": ("deadlock_detected", 409, "ABORTED"),
    "53300": ("too_many_connections", 503, "UNAVAILABLE"),
    "53400": ("configuration_limit_exceeded", 400, "INVALID_ARGUMENT"),
    "28P01": ("invalid_password", 503, "UNAVAILABLE"),
    "28000": ("invalid_authorization", 503, "UNAVAILABLE"),
    "P0001": ("raise_exception", 400, "INVALID_ARGUMENT"),
    "P0004": ("assert_failure", 400, "INVALID_ARGUMENT"),
}
_SQLSTATE_CLASS: dict[str, tuple[str, int, str]] = {
    "01": ("warning", 400, "INVALID_ARGUMENT"),
    "02": ("no_data", 404, "NOT_FOUND"),
    "03": ("sql_statement_not_yet_complete", 400, "INVALID_ARGUMENT"),
    "08": ("connection_exception", 503, "UNAVAILABLE"),
    "09": ("triggered_action_exception", 400, "INVALID_ARGUMENT"),
    "0A": ("feature_not_supported", 400, "INVALID_ARGUMENT"),
    "0B": ("invalid_transaction_initiation", 400, "INVALID_ARGUMENT"),
    "0F": ("locator_exception", 400, "INVALID_ARGUMENT"),
    "0L": ("invalid_grantor", 403, "PERMISSION_DENIED"),
    "0P": ("invalid_role_specification", 400, "INVALID_ARGUMENT"),
    "0Z": ("diagnostics_exception", 400, "INVALID_ARGUMENT"),
    "10": ("xquery_error", 400, "INVALID_ARGUMENT"),
    "20": ("case_not_found", 400, "INVALID_ARGUMENT"),
    "21": ("cardinality_violation", 400, "INVALID_ARGUMENT"),
    "22": ("data_exception", 400, "INVALID_ARGUMENT"),
    "23": ("integrity_violation", 409, "FAILED_PRECONDITION"),
    "24": ("invalid_cursor_state", 409, "FAILED_PRECONDITION"),
    "25": ("invalid_transaction_state", 409, "FAILED_PRECONDITION"),
    "26": ("invalid_sql_statement_name", 400, "INVALID_ARGUMENT"),
    "27": ("triggered_data_change_violation", 409, "FAILED_PRECONDITION"),
    "28": ("invalid_authorization", 503, "UNAVAILABLE"),
    "2B": ("dependent_privilege_descriptors_still_exist", 409, "FAILED_PRECONDITION"),
    "2D": ("invalid_transaction_termination", 400, "INVALID_ARGUMENT"),
    "2F": ("sql_routine_exception", 400, "INVALID_ARGUMENT"),
    "34": ("invalid_cursor_name", 400, "INVALID_ARGUMENT"),
    "38": ("external_routine_exception", 400, "INVALID_ARGUMENT"),
    "39": ("external_routine_invocation_exception", 400, "INVALID_ARGUMENT"),
    "3B": ("savepoint_exception", 400, "INVALID_ARGUMENT"),
    "3D": ("invalid_catalog_name", 404, "NOT_FOUND"),
    "3F": ("undefined_schema", 404, "NOT_FOUND"),
    "40": ("transaction_rollback", 409, "ABORTED"),
    "42": ("sql_error", 400, "INVALID_ARGUMENT"),
    "44": ("with_check_option_violation", 400, "INVALID_ARGUMENT"),
    "53": ("insufficient_resources", 503, "UNAVAILABLE"),
    "54": ("program_limit_exceeded", 400, "INVALID_ARGUMENT"),
    "55": ("object_not_in_prerequisite_state", 409, "FAILED_PRECONDITION"),
    "57": ("operator_intervention", 503, "UNAVAILABLE"),
    "58": ("system_error", 503, "UNAVAILABLE"),
    "72": ("snapshot_too_old", 409, "ABORTED"),
    "F0": ("config_file_error", 503, "UNAVAILABLE"),
    "HV": ("fdw_error", 400, "INVALID_ARGUMENT"),
    "P0": ("plpgsql_error", 400, "INVALID_ARGUMENT"),
    "XX": ("internal_error", 500, "INTERNAL"),
}
_SQLSTATE_UNKNOWN_CLASS = ("database_error", 400, "INVALID_ARGUMENT")


class QueryError(DatabaseServiceError):
    """PostgreSQL refused or failed the statement; ``sqlstate`` says why."""

    code = "database_error"

    def __init__(
        self,
        message: str,
        *,
        sqlstate: str | None = None,
        position: int | None = None,
        detail: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, sqlstate=sqlstate, position=position, detail=detail, hint=hint)
        mapped = _map_sqlstate(sqlstate)
        self._code, self._http_status, self._grpc_status = mapped

    @property
    def error_code(self) -> str:
        return self._code

    @property
    def status(self) -> int:
        return self._http_status

    @property
    def grpc_status_name(self) -> str:
        return self._grpc_status


def _map_sqlstate(sqlstate: str | None) -> tuple[str, int, str]:
    if sqlstate is None:
        return ("database_error", 500, "INTERNAL")
    if sqlstate in _SQLSTATE_EXACT:
        return _SQLSTATE_EXACT[sqlstate]
    return _SQLSTATE_CLASS.get(sqlstate[:2], _SQLSTATE_UNKNOWN_CLASS)


def http_status_of(error: DatabaseServiceError) -> int:
    """The HTTP status for any error of the tree (QueryError decides per SQLSTATE)."""
    if isinstance(error, QueryError):
        return error.status
    return error.http_status


def grpc_status_of(error: DatabaseServiceError) -> str:
    if isinstance(error, QueryError):
        return error.grpc_status_name
    return error.grpc_status


# --- the relationship graph (stores/graph) ---------------------------------------------------


class GraphCollectionNotFound(NotFound):
    """A vertex or edge collection the tenant has not created (by writing to it)."""

    code = "graph_collection_not_found"


class VertexNotFound(NotFound):
    """A start, end or edge endpoint vertex the tenant does not have."""

    code = "vertex_not_found"


class EdgeNotFound(NotFound):
    code = "edge_not_found"


class InvalidFilter(InvalidRequest):
    """A graph filter or aggregation naming a bad property, operator or value."""

    code = "invalid_filter"


class DepthOutOfRange(InvalidRequest):
    """A traversal depth outside 0 ≤ min ≤ max ≤ the configured bound."""

    code = "depth_out_of_range"


class GraphCollectionKind(FailedPrecondition):
    """Edges written to a vertex collection, or vertices to an edge collection."""

    code = "graph_collection_kind"
