"""JSON a tenant's own statements make (``jsonb`` nested hundreds or thousands deep, numbers
past 64 bits, every kind of value at once) read back through every front end that runs SQL:
rows, or a clear error with a stable code (``result_too_large`` when no JSON writer can write
the value), never a server error or a closed connection."""

from __future__ import annotations

import httpx
import pytest

from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd

pytestmark = pytest.mark.usefixtures("unchanged_victim")


def _deep(depth: int, open_: str = "[", close: str = "]") -> str:
    return f"SELECT (repeat('{open_}', {depth}) || '1' || repeat('{close}', {depth}))::jsonb AS j"


STATEMENTS = {
    "array_300": _deep(300),
    "array_600": _deep(600),
    "array_2000": _deep(2000),
    "object_600": _deep(600, '{"a":', "}"),
    "object_5000": _deep(5000, '{"a":', "}"),
    "big_number": "SELECT '{\"n\": 100000000000000000000000000000}'::jsonb AS j",
    "huge_number": "SELECT ('[' || repeat('9', 5000) || ']')::jsonb AS j",
    "json_not_jsonb": "SELECT (repeat('[', 3000) || repeat(']', 3000))::json AS j",
    "array_of_deep": f"SELECT ARRAY[({_deep(600)[7:-7]})] AS j",
    # A value orjson refuses beside one only it writes (NaN as null): the fallback writer
    # must take both.
    "big_number_and_nan": "SELECT '{\"n\": 100000000000000000000000000000}'::jsonb AS j,"
    " 'NaN'::float8 AS f, '-Infinity'::float8 AS g",
}


@pytest.mark.parametrize("statement", sorted(STATEMENTS))
async def test_deep_or_huge_json_values_read_back_or_are_refused_clearly(
    front_end: FrontEnd, statement: str
) -> None:
    outcome = await front_end.run(STATEMENTS[statement])
    assert not outcome.server_error, outcome
    if not outcome.ok:
        assert outcome.code and outcome.code != "internal", outcome
    # The session that read it is still good (a failed decode leaves no half-read result).
    after = await front_end.run("SELECT 41 + 1")
    assert after.ok and after.rows == [[42]], after


@pytest.mark.parametrize("statement", sorted(STATEMENTS))
async def test_deep_or_huge_json_through_the_rest_analytics_route(
    http: httpx.AsyncClient, tenants: Tenants, statement: str
) -> None:
    """The same through ``POST /api/v1/analytics/query`` on PostgreSQL (its own encoder)."""
    response = await http.post(
        "/api/v1/analytics/query",
        json={
            "sql": STATEMENTS[statement],
            "engine": "postgresql",
            "tenant_id": tenants.a.tenant_id,
        },
        headers=tenants.a_headers,
    )
    assert response.status_code < 500, response.text[:300]
    if response.status_code != 200:
        assert response.json()["error"]["code"] not in {None, "internal"}, response.text[:300]
