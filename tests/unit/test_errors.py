import asyncpg
import pytest
from asyncpg.exceptions._base import DataError as ClientDataError
from asyncpg.exceptions._base import InternalClientError

from database_service.errors import (
    InvalidParameters,
    PayloadTooLarge,
    QueryError,
    StatementOutdated,
    TenantNotFound,
    Unavailable,
    escaped_driver_error,
    grpc_status_of,
    http_status_of,
    postgres_unavailable,
    postgres_unreachable,
)
from database_service.query.boundary import postgres_errors


@pytest.mark.parametrize(
    ("sqlstate", "code", "status"),
    [
        ("23505", "unique_violation", 409),
        ("23514", "check_violation", 400),
        ("23P01", "integrity_violation", 409),
        ("42501", "insufficient_privilege", 403),
        ("42P01", "undefined_table", 404),
        ("57014", "query_canceled", 408),
        ("22P02", "data_exception", 400),
        ("XX000", "internal_error", 500),
        ("21000", "cardinality_violation", 400),
        ("0A000", "feature_not_supported", 400),
        ("55P03", "lock_not_available", 409),
        ("25006", "read_only_transaction", 403),
        ("P0001", "raise_exception", 400),
        ("U0001", "database_error", 400),  # a tenant's own RAISE with a code of its own
        (None, "database_error", 500),
    ],
)
def test_sqlstate_maps_to_a_stable_code(sqlstate: str | None, code: str, status: int) -> None:
    error = QueryError("boom", sqlstate=sqlstate)
    assert error.error_code == code
    assert http_status_of(error) == status


def _postgres_sqlstates() -> list[str]:
    """Every SQLSTATE PostgreSQL defines (asyncpg mirrors errcodes.txt, one class per state)."""
    from asyncpg import exceptions

    return sorted(
        {
            cls.sqlstate
            for cls in vars(exceptions).values()
            if isinstance(cls, type) and getattr(cls, "sqlstate", None)
        }
    )


def test_every_postgres_sqlstate_class_has_a_mapping() -> None:
    states = _postgres_sqlstates()
    assert len(states) > 200 and len({s[:2] for s in states}) > 40
    for state in states:
        error = QueryError("x", sqlstate=state)
        # Only PostgreSQL's own internal errors are a 500; nothing a caller sends is.
        if state.startswith("XX"):
            assert http_status_of(error) == 500, state
        else:
            assert http_status_of(error) < 500 or http_status_of(error) == 503, state
            assert error.error_code != "database_error", state
        assert grpc_status_of(error) not in {"UNKNOWN"}, state


def test_error_body_carries_sqlstate_and_position() -> None:
    body = QueryError("syntax", sqlstate="42601", position=8).to_dict()
    assert body == {
        "code": "sql_syntax_error",
        "message": "syntax",
        "sqlstate": "42601",
        "position": 8,
    }


def test_service_errors_have_http_and_grpc_statuses() -> None:
    assert http_status_of(TenantNotFound("x")) == 404
    assert grpc_status_of(TenantNotFound("x")) == "NOT_FOUND"
    assert http_status_of(PayloadTooLarge("x")) == 413


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError(2, "No such file or directory"),  # the Unix socket is gone
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        # A pooled connection left mid-operation when PostgreSQL went away.
        InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    ],
    ids=type,
)
def test_connection_failures_are_unavailable_at_every_boundary(exc: Exception) -> None:
    assert postgres_unreachable(exc)
    for boundary in (postgres_errors("t1"), postgres_unavailable("tenant registry")):
        with pytest.raises(Unavailable) as caught, boundary:
            raise exc
        assert caught.value.__cause__ is exc
        assert http_status_of(caught.value) == 503
        assert grpc_status_of(caught.value) == "UNAVAILABLE"
        assert caught.value.to_dict()["code"] == "unavailable"


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),  # 57014
        asyncpg.DataError("invalid input for query argument $1"),  # SQLSTATE 22000
        ClientDataError("invalid input for query argument $1"),  # asyncpg's client side
        ValueError("not a driver error"),
    ],
    ids=type,
)
def test_statement_errors_are_not_unavailable(exc: Exception) -> None:
    assert not postgres_unreachable(exc)
    with pytest.raises(type(exc)), postgres_unavailable("tenant registry"):
        raise exc  # the owner-pool boundary leaves them to the caller


def test_the_tenant_boundary_keeps_sqlstate_and_client_errors_apart() -> None:
    with pytest.raises(QueryError) as caught, postgres_errors("t1"):
        raise asyncpg.UniqueViolationError("duplicate key")
    assert caught.value.error_code == "unique_violation"
    with pytest.raises(InvalidParameters), postgres_errors("t1"):
        raise ClientDataError("invalid input for query argument $1")
    with pytest.raises(Unavailable) as dropped, postgres_errors("t1"):
        raise asyncpg.ConnectionDoesNotExistError("connection was closed")
    assert dropped.value.sqlstate == "08003"


async def test_last_resort_takes_socket_errors_only_from_the_driver() -> None:
    with pytest.raises(OSError) as from_driver:
        await asyncpg.connect("postgresql://postgres@/postgres?host=/nonexistent-dbsvc-socket-dir")
    assert escaped_driver_error(from_driver.value)
    try:
        raise FileNotFoundError(2, "No such file or directory", "/data/report.csv")
    except OSError as elsewhere:
        assert not escaped_driver_error(elsewhere)
    assert escaped_driver_error(asyncpg.InterfaceError("connection is closed"))
    assert not escaped_driver_error(asyncpg.UniqueViolationError("duplicate key"))


def test_a_statement_outdated_by_a_table_change_is_retryable_not_a_caller_error() -> None:
    """Refused at Bind ("cached plan must not change result type"): nothing ran, a 503 to retry
    rather than a 400 blaming the caller; a composite type changed while a result was decoded:
    the statement ran, so it is not called outdated."""
    with pytest.raises(StatementOutdated) as caught, postgres_errors("t1"):
        raise asyncpg.InvalidCachedStatementError("cached plan must not change result type")
    assert caught.value.to_dict()["code"] == "statement_outdated"
    assert http_status_of(caught.value) == 503
    assert caught.value.sqlstate == "0A000"
    with pytest.raises(Unavailable) as decoded, postgres_errors("t1"):
        raise asyncpg.OutdatedSchemaCacheError("type changed")
    assert not isinstance(decoded.value, StatementOutdated)
