"""gRPC answers written as bytes rather than built as messages: what a client parses must be
exactly the message the service would otherwise have built.

A cached answer is sent as the bytes it was stored as, with a tail that sets the summary's
duration and cache fields (whatever the stored summary held); a packed answer is written
directly (``encoded_result``)."""

from decimal import Decimal

import pytest

from database_service.api.grpc.encoding import (
    encoded_result,
    hit_tail,
    result_message,
    summary_tail,
)
from database_service.results import Column, QueryResult, StatementKind, ValueKind
from database_service_client._proto import database_service_pb2 as pb


def stored(**summary: object) -> pb.QueryResult:
    message = pb.QueryResult(
        header=pb.ResultHeader(columns=[pb.Column(name="user_id"), pb.Column(name="tier")]),
        rows=pb.RowChunk(packed=b'[["u000001","gold"]]'),
        summary=pb.ResultSummary(
            row_count=1, command="SELECT 1", duration_ms=4.25, statement_class="read"
        ),
    )
    for name, value in summary.items():
        setattr(message.summary, name, value)
    return message


@pytest.mark.parametrize(
    ("duration_ms", "cache", "age_ms", "stale", "reason"),
    [
        (0.173, "hit", 12.5, False, ""),
        (0.0, "stale", 0.0, True, "PostgreSQL unreachable"),
        (1e-9, "hit", 86_400_000.0, False, "ünïcode reason, and a long one " * 10),
    ],
)
def test_tail_sets_the_summary_and_keeps_the_rest(
    duration_ms: float, cache: str, age_ms: float, stale: bool, reason: str
) -> None:
    original = stored()
    sent = original.SerializeToString() + summary_tail(duration_ms, cache, age_ms, stale, reason)
    received = pb.QueryResult.FromString(sent)
    expected = stored(
        duration_ms=duration_ms, cache=cache, cache_age_ms=age_ms, stale=stale, cache_reason=reason
    )
    assert received == expected
    assert received.header == original.header and received.rows == original.rows


def test_tail_replaces_defaults_over_stored_values() -> None:
    # A stored summary that somehow held cache fields: the tail's defaults still win.
    original = stored(cache="miss", cache_age_ms=3.0, stale=True, cache_reason="x")
    sent = original.SerializeToString() + summary_tail(0.0, "", 0.0, False, "")
    summary = pb.QueryResult.FromString(sent).summary
    assert (summary.duration_ms, summary.cache, summary.cache_age_ms) == (0.0, "", 0.0)
    assert (summary.stale, summary.cache_reason) == (False, "")
    assert (summary.row_count, summary.command) == (1, "SELECT 1")


@pytest.mark.parametrize(
    ("duration_ms", "age_ms"), [(0.0, 0.0), (0.173, 12.5), (1e-9, 86_400_000.0), (-0.0, 1e300)]
)
def test_a_hits_tail_is_the_tail_of_a_hit(duration_ms: float, age_ms: float) -> None:
    assert hit_tail(duration_ms, age_ms) == summary_tail(duration_ms, "hit", age_ms, False, "")


# --- a whole packed answer written directly (encoding.encoded_result) ------------------------

INT = Column("id", "int4", ValueKind.INTEGER)
TEXT = Column("näme", "text", ValueKind.TEXT)
FLOAT = Column("px", "float8", ValueKind.FLOAT)
BIG = Column("n", "numeric", ValueKind.DECIMAL)
MANY = [(i, f"r{i}", i / 3, Decimal("1.5")) for i in range(500)]


@pytest.mark.parametrize(
    ("columns", "rows", "command", "kind", "duration_ms"),
    [
        ([INT, TEXT], [(1, "ä" * 300)], "SELECT 1", StatementKind.READ, 0.42),
        ([INT, TEXT, FLOAT, BIG], MANY, "SELECT 500", StatementKind.READ, 12.0),
        ([INT], [], "SELECT 0", StatementKind.READ, 0.0),  # no rows: an empty chunk, present
        ([], [], "UPDATE 7", StatementKind.WRITE, 1.25),  # a write: no columns, a count
        ([], [], "", StatementKind.DDL, 0.0),
    ],
)
def test_a_directly_encoded_answer_parses_as_the_message(
    columns: list[Column],
    rows: list[tuple[object, ...]],
    command: str,
    kind: StatementKind,
    duration_ms: float,
) -> None:
    result = QueryResult(
        columns=columns,
        rows=rows,
        command=command,
        row_count=int(command.rsplit(maxsplit=1)[-1]) if command else 0,
        kind=kind,
        duration_ms=duration_ms,
    )
    data = encoded_result(result)
    assert data is not None
    expected = result_message(result, pb.QueryResult, packed=True)
    assert pb.QueryResult.FromString(data) == expected
    assert pb.QueryResult.FromString(data).HasField("rows") == expected.HasField("rows")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**70])
def test_rows_that_cannot_go_packed_are_left_to_the_message(value: object) -> None:
    column = FLOAT if isinstance(value, float) else INT
    result = QueryResult([column], [(value,)], "SELECT 1", 1, StatementKind.READ, 0.1)
    assert encoded_result(result) is None
