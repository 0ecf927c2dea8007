"""Whole results through ``POST /api/v1/query`` are bounded by bytes (``max_result_bytes``), not
only by rows: 20,000 rows of 10 KB are refused with a stable code, having held about the cap
rather than the result; results under the cap come back exactly as before; and a response's body
never exceeds the cap by more than one row, whatever the encoding adds (UTF-8, base64). And the
REST fast path that builds these bodies answers every request, success or error, exactly as the
FastAPI route does."""

from __future__ import annotations

import json
import secrets
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from database_service.api.http.app import create_http_app
from database_service.api.http.routes.queries import QueryFastPath
from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from tests.fix_pg import PgCluster
from tests.fix_service import make_settings

CAP = 1_000_000
QUERY = "/api/v1/query"
BIG = "SELECT repeat('x', 10000) FROM generate_series(1, 20000)"
BIG_BYTES = 20_000 * 10_000  # 200 MB as one result


@dataclass
class Capped:
    core: Application
    http: httpx.AsyncClient
    tenant: TenantRecord
    headers: dict[str, str]

    async def query(self, sql: str, *params: Any) -> httpx.Response:
        body = {"sql": sql, "params": list(params), "tenant_id": self.tenant.tenant_id}
        return await self.http.post(QUERY, json=body, headers=self.headers)


@pytest.fixture
async def capped(pg_cluster: PgCluster, tmp_path: Path) -> AsyncIterator[Capped]:
    """An instance whose whole results are capped at 1 MB (and not by rows before that)."""
    settings = make_settings(pg_cluster, tmp_path, max_result_bytes=CAP, max_result_rows=100_000)
    core = Application(
        settings, start_nats=False, migrate_tenants_on_start=False, maintain_partitions=False
    )
    await core.__aenter__()
    try:
        tenant = await core.tenants.create(f"cap_{secrets.token_hex(4)}")
        name = f"cap-{secrets.token_hex(4)}"
        scopes = (Scope.READ,)
        await core.services.register(
            name, tenants=[tenant.tenant_id], scopes=scopes, with_secret=False
        )
        token = core.tokens.issue(name, tenants=[tenant.tenant_id], scopes=scopes, ttl_seconds=600)
        transport = httpx.ASGITransport(app=create_http_app(core))
        async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as http:
            yield Capped(core, http, tenant, {"Authorization": f"Bearer {token}"})
    finally:
        await core.__aexit__(None, None, None)


async def test_a_result_past_the_byte_cap_is_refused_with_a_stable_code(capped: Capped) -> None:
    tracemalloc.start()
    try:
        response = await capped.query(BIG)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "result_too_large"
    assert f"{CAP} bytes" in error["message"]
    # Refused having held a bounded part of the result, not the result: the cap and the batch
    # the executor reads by cursor (2,048 rows: 20 MB of these) measured 21 MB; 200 MB before.
    assert peak < BIG_BYTES // 4, f"peak {peak} bytes while refusing"


def _refusals(core: Application) -> float:
    value = core.metrics.registry.get_sample_value(
        "dbsvc_errors_total", {"code": "result_too_large"}
    )
    return value or 0.0


async def test_the_refusal_is_counted(capped: Capped) -> None:
    before = _refusals(capped.core)
    response = await capped.query(BIG)
    assert response.json()["error"]["code"] == "result_too_large"
    assert _refusals(capped.core) == before + 1


async def test_a_result_under_the_cap_comes_back_as_before(capped: Capped) -> None:
    response = await capped.query(
        "SELECT g AS n, repeat('x', 10000) AS s, g % 2 = 0 AS even, NULL::text AS nothing"
        " FROM generate_series(1, 50) g"
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["columns"] == [
        {"name": "n", "type": "int4"},
        {"name": "s", "type": "text"},
        {"name": "even", "type": "bool"},
        {"name": "nothing", "type": "text"},
    ]
    assert body["rows"] == [[g, "x" * 10000, g % 2 == 0, None] for g in range(1, 51)]
    assert (body["row_count"], body["command"], body["statement_class"]) == (
        50,
        "SELECT 50",
        "read",
    )
    assert response.headers["content-type"] == "application/json"
    # Byte for byte what a JSONResponse of the same document writes.
    expected = json.dumps(
        body, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    )
    assert response.content == expected.encode()


async def test_values_that_need_encoding_under_the_cap_are_unaffected(capped: Capped) -> None:
    response = await capped.query(
        "SELECT 1.10::numeric AS price, '2024-01-02 03:04:05+00'::timestamptz AS at,"
        " '{\"a\": [1, 2]}'::jsonb AS doc, '\\x0001'::bytea AS raw, ARRAY[1,2] AS ids,"
        " 'NaN'::float8 AS nan, 2.5::float8 AS half, 'é'::text AS accent, 'a'::\"char\" AS c,"
        " '2024-01-02 03:04:05.25'::timestamp AS naive, 'infinity'::timestamptz AS forever,"
        " '{\"big\": 123456789012345678901234567890}'::jsonb AS big"
    )
    assert response.status_code == 200, response.text
    # asyncpg decodes "char" to bytes and infinity to datetime.max (no offset): as before.
    assert response.json()["rows"] == [
        [
            "1.10", "2024-01-02T03:04:05+00:00", {"a": [1, 2]}, "AAE=", [1, 2], "nan", 2.5, "é",
            "YQ==", "2024-01-02T03:04:05.250000", "9999-12-31T23:59:59.999999",
            {"big": 123456789012345678901234567890},
        ]
    ]  # fmt: skip
    assert "é".encode() in response.content  # UTF-8, not \u escapes, as before


@pytest.mark.parametrize(
    ("value", "row_bytes"),
    [
        ("repeat('x', 10000)", 10_004),  # ["xxx…"], and a comma
        ("repeat('é', 5000)", 10_004),  # 5,000 characters, 10,000 bytes in UTF-8
        ("decode(repeat('00', 7000), 'hex')", 9_338),  # 7,000 bytes, 9,334 in base64
    ],
    ids=["ascii", "utf8", "bytea"],
)
async def test_a_body_never_exceeds_the_cap_by_more_than_one_row(
    capped: Capped, value: str, row_bytes: int
) -> None:
    answered = refused = 0
    # 140 rows of bytea: 980 KB by the executor's count, a body of 1.3 MB in base64.
    for rows in (50, CAP // row_bytes - 1, CAP // row_bytes, CAP // row_bytes + 1, 140, 400):
        response = await capped.query(f"SELECT {value} FROM generate_series(1, $1)", rows)
        if response.status_code == 200:
            answered += 1
            assert len(response.json()["rows"]) == rows
            assert len(response.content) <= CAP + row_bytes, (rows, len(response.content))
        else:
            refused += 1
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "result_too_large"
    assert answered and refused


# The REST fast path (``QueryFastPath``) answers ``POST /api/v1/query`` without FastAPI's
# routing; every answer, success or error, must be the one the route gives.


def _without_fast_path(core: Application) -> Any:
    api = create_http_app(core)
    api.user_middleware[:] = [m for m in api.user_middleware if m.cls is not QueryFastPath]
    return api


def _comparable(response: httpx.Response) -> tuple[int, Any, str | None, str | None]:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    if isinstance(body, dict):
        body.pop("duration_ms", None)
    return (
        response.status_code,
        body,
        response.headers.get("content-type"),
        response.headers.get("www-authenticate"),
    )


async def test_the_fast_path_answers_as_the_route_does(capped: Capped) -> None:
    tenant = capped.tenant.tenant_id
    auth = capped.headers
    cases: list[tuple[dict[str, str], Any]] = [
        (
            auth,
            {"sql": "SELECT 1 AS one, 'é' AS e, now() > '2000-01-01' AS t", "tenant_id": tenant},
        ),
        (auth, {"sql": "SELECT $1::int + 1", "params": [41], "tenant_id": tenant}),
        ({**auth, "X-Tenant-Id": tenant}, {"sql": "SELECT 1"}),
        ({**auth, "X-Tenant-Id": "other"}, {"sql": "SELECT 1", "tenant_id": tenant}),
        ({**auth, "X-User-Id": "alice"}, {"sql": "SELECT 1", "tenant_id": tenant}),
        ({}, {"sql": "SELECT 1", "tenant_id": tenant}),
        ({"Authorization": "Bearer nope"}, {"sql": "SELECT 1", "tenant_id": tenant}),
        (auth, {"sql": "SELECT 1"}),
        (auth, {"sql": "SELECT 1", "tenant_id": "no_such_tenant"}),
        (auth, {"sql": "SELECT 1", "tenant_id": "Bad Id!"}),
        (auth, {"sql": "SELEC 1", "tenant_id": tenant}),
        (auth, {"sql": "SELECT 1/0", "tenant_id": tenant}),
        (auth, {"sql": "DELETE FROM users", "tenant_id": tenant}),
        (auth, {"sql": "SELECT * FROM pg_catalog.pg_authid", "tenant_id": tenant}),
        (auth, {"sql": BIG, "tenant_id": tenant}),
        (auth, {"sql": 1, "tenant_id": tenant}),
        (auth, {"tenant_id": tenant}),
        (auth, {"sql": "SELECT 1", "tenant_id": tenant, "extra": True}),
        (auth, ["SELECT 1"]),
        (auth, b'{"sql": "SELECT 1", '),
        (auth, b'{"sql": "SELECT NaN", "params": [NaN], "tenant_id": "%s"}' % tenant.encode()),
        ({**auth, "Content-Type": "text/plain"}, b'{"sql": "SELECT 1"}'),
        (auth, b"\xff\xfe"),
    ]
    transport = httpx.ASGITransport(app=_without_fast_path(capped.core))
    async with httpx.AsyncClient(transport=transport, base_url="http://dbsvc.test") as route:
        for headers, body in cases:
            answers = []
            for http in (capped.http, route):
                if isinstance(body, bytes):
                    sent = {
                        "content": body,
                        "headers": {"Content-Type": "application/json", **headers},
                    }
                else:
                    sent = {"json": body, "headers": headers}
                answers.append(_comparable(await http.post(QUERY, **sent)))
            assert answers[0] == answers[1], (headers, body)
