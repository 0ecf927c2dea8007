import pytest

from database_service.errors import (
    PayloadTooLarge,
    QueryError,
    TenantNotFound,
    grpc_status_of,
    http_status_of,
)


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
        ("XX000", "database_error", 500),
        (None, "database_error", 500),
    ],
)
def test_sqlstate_maps_to_a_stable_code(sqlstate: str | None, code: str, status: int) -> None:
    error = QueryError("boom", sqlstate=sqlstate)
    assert error.error_code == code
    assert http_status_of(error) == status


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
