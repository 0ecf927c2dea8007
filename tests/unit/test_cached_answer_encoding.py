"""A cached gRPC answer is sent as the bytes it was stored as, with a tail that sets the
summary's duration and cache fields: what a client parses must be exactly the stored message
with those fields replaced, whatever the stored summary held."""

import pytest

from database_service.api.grpc.encoding import summary_tail
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
