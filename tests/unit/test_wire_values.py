"""Typed values on the wire round-trip without loss, and the generated code matches proto/."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest

from database_service_client._proto.database_service_pb2 import Value
from database_service_client.errors import InvalidArgument, from_rpc_error
from database_service_client.values import from_row, from_value, to_row, to_value

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "value",
    [
        None, True, False, 0, -(2**63), 2**63 - 1, 1.5, "text", "", b"\x00\xff",
        Decimal("12345678901234567890.000000001"),
        dt.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC),
        {"a": [1, 2, {"b": None}]}, [1, None, 3], [["x"], ["y"]],
    ],
)  # fmt: skip
def test_value_round_trips(value: Any) -> None:
    assert from_value(to_value(value)) == value


def test_naive_datetime_is_sent_as_utc() -> None:
    naive = dt.datetime(2024, 1, 2, 3, 4, 5)
    assert from_value(to_value(naive)) == naive.replace(tzinfo=dt.UTC)


def test_text_forms_for_types_without_their_own_kind() -> None:
    assert to_value(dt.date(2024, 1, 2)).string_value == "2024-01-02"
    some = uuid.uuid4()
    assert to_value(some).string_value == str(some)


def test_rows_round_trip() -> None:
    row = (1, "a", None, Decimal("1.10"))
    assert from_row(to_row(row)) == row


def test_an_empty_value_is_null() -> None:
    assert from_value(Value()) is None


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            initial_metadata=grpc.aio.Metadata(),
            trailing_metadata=grpc.aio.Metadata(
                ("dbsvc-error-code", "sql_syntax_error"),
                ("dbsvc-sqlstate", "42601"),
                ("dbsvc-position", "10"),
            ),
            details='syntax error at or near "FRM"',
        )


def test_rpc_errors_become_typed_exceptions_with_sqlstate() -> None:
    error = from_rpc_error(FakeRpcError())
    assert isinstance(error, InvalidArgument)
    assert (error.code, error.sqlstate, error.position) == ("sql_syntax_error", "42601", 10)


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
