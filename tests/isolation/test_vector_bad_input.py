"""Bad input to vector collections on pgvector through REST, as raw bytes (Python's JSON
reader takes ``NaN``, ``Infinity``, integers of any size and lone surrogates): every case is
refused with a stable code or runs as asked — never a server error — and a refused write
leaves the collection as it was. Also a zero vector, whose cosine distance is not a number."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import service_token

pytestmark = [pytest.mark.usefixtures("unchanged_victim"), pytest.mark.pgvector]

_BASE = "/api/v1/vector/collections/Probe"
_OBJ = '"properties": {"title": "t", "n": 1, "x": 1.5, "on": "2024-01-01T00:00:00Z"}'

# (method, path under the collection, body as JSON text)
CASES: dict[str, tuple[str, str, str]] = {
    "upsert_nan": ("POST", "/objects", '{"objects": [{"vector": [NaN, 1, 1]}]}'),
    "upsert_infinity": ("POST", "/objects", '{"objects": [{"vector": [Infinity, 1, 1]}]}'),
    "upsert_past_float4": ("POST", "/objects", '{"objects": [{"vector": [1e300, 1, 1]}]}'),
    "upsert_big_int_component": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [100000000000000000000000000000, 1, 1]}]}',
    ),
    "upsert_wrong_dimension": ("POST", "/objects", '{"objects": [{"vector": [1, 1]}]}'),
    "upsert_huge_dimension": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [' + ",".join(["1"] * 20000) + "]}]}",
    ),
    "upsert_int_past_64_bits": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"n": 100000000000000000000}}]}',
    ),
    "upsert_number_nan": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"x": NaN}}]}',
    ),
    "upsert_date_out_of_range": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"on": "99999-01-01T00:00:00Z"}}]}',
    ),
    "upsert_date_infinity": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"on": "infinity"}}]}',
    ),
    "upsert_text_nul": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"title": "a\\u0000"}}]}',
    ),
    "upsert_text_lone_surrogate": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"title": "\\ud800"}}]}',
    ),
    "upsert_tags_nested": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"tags": [["a"]]}}]}',
    ),
    "upsert_unknown_property": (
        "POST",
        "/objects",
        '{"objects": [{"vector": [1, 1, 1], "properties": {"nope": 1}}]}',
    ),
    "upsert_id_not_uuid": (
        "POST",
        "/objects",
        '{"objects": [{"id": "x\'--", "vector": [1, 1, 1]}]}',
    ),
    "upsert_same_id_twice": (
        "POST",
        "/objects",
        '{"objects": [{"id": "00000000-0000-0000-0000-000000000001", "vector": [1, 1, 1]},'
        ' {"id": "00000000-0000-0000-0000-000000000001", "vector": [2, 2, 2]}]}',
    ),
    "search_nan": ("POST", "/search", '{"vector": [NaN, 1, 1]}'),
    "search_zero_vector": ("POST", "/search", '{"vector": [0, 0, 0]}'),
    "search_limit_zero": ("POST", "/search", '{"vector": [1, 1, 1], "limit": 0}'),
    "search_limit_huge": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "limit": 100000000000000000000}',
    ),
    "search_certainty_nan": ("POST", "/search", '{"vector": [1, 1, 1], "certainty": NaN}'),
    "search_certainty_infinity": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "certainty": Infinity}',
    ),
    "search_distance_negative_infinity": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "distance": -Infinity}',
    ),
    "search_where_nan": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "where": {"path": ["x"], "operator": "GreaterThan",'
        ' "valueNumber": NaN}}',
    ),
    "search_where_big_int": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "where": {"path": ["n"], "operator": "Equal",'
        ' "valueInt": 100000000000000000000000}}',
    ),
    "search_where_deep": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "where": '
        + '{"operator": "And", "operands": [' * 300
        + '{"path": ["n"], "operator": "Equal", "valueInt": 1}'
        + "]}" * 300
        + "}",
    ),
    "search_where_wide": (
        "POST",
        "/search",
        '{"vector": [1, 1, 1], "where": {"operator": "Or", "operands": ['
        + ",".join(['{"path": ["n"], "operator": "Equal", "valueInt": 1}'] * 5000)
        + "]}}",
    ),
    "count_where_date_garbage": (
        "POST",
        "/count",
        '{"where": {"path": ["on"], "operator": "Equal", "valueDate": "yesterday"}}',
    ),
    "get_many_ids": (
        "POST",
        "/objects/get",
        '{"ids": [' + ",".join(['"00000000-0000-0000-0000-000000000002"'] * 20000) + "]}",
    ),
    "delete_where_like_star": (
        "POST",
        "/objects/delete",
        '{"where": {"path": ["title"], "operator": "Like", "valueText": "%%%%*"}}',
    ),
}


@pytest.fixture
async def a_headers(
    core: Application, http: httpx.AsyncClient, tenants: Tenants
) -> AsyncIterator[dict[str, str]]:
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    headers = {"Authorization": f"Bearer {token}", "X-Tenant-Id": tenants.a.tenant_id}
    response = await http.post(
        "/api/v1/vector/collections",
        json={"name": "Probe", "dimension": 3, "properties": {
            "title": "text", "n": "int", "x": "number", "on": "date", "tags": "text[]"}},
        headers=headers,
    )  # fmt: skip
    assert response.status_code in (201, 409), response.text
    response = await http.post(
        f"{_BASE}/objects",
        json={"objects": [{"id": "00000000-0000-0000-0000-0000000000aa", "vector": [1, 2, 3],
                           "properties": {"title": "kept", "n": 5}}]},
        headers=headers,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    yield headers


async def _objects(http: httpx.AsyncClient, headers: dict[str, str]) -> int:
    response = await http.post(f"{_BASE}/count", json={}, headers=headers)
    assert response.status_code == 200, response.text
    return int(response.json()["count"])


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_vector_input_is_refused_with_a_stable_code(
    http: httpx.AsyncClient, a_headers: dict[str, str], case: str
) -> None:
    method, path, body = CASES[case]
    before = await _objects(http, a_headers)
    response = await http.request(
        method,
        _BASE + path,
        content=body.encode("utf-8", "surrogatepass"),
        headers={**a_headers, "Content-Type": "application/json"},
    )
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:
        code = response.json().get("error", {}).get("code")
        assert code and code != "internal", response.text[:300]
        assert await _objects(http, a_headers) == before
