"""The query execution core through POST /api/v1/query: typed values, error mapping with
SQLSTATE and position, bad input rejected with nothing written, user-level RLS, limits."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from database_service.app import Application
from database_service.auth import Principal, Scope
from database_service.query import TenantContext
from database_service.results import Header
from database_service.tenancy import TenantLimits, TenantRecord
from tests.fix_service import TenantFactory, TokenFactory

QUERY = "/api/v1/query"


@pytest.fixture
async def tenant(new_tenant: TenantFactory) -> TenantRecord:
    return await new_tenant("q")


@pytest.fixture
async def headers(tenant: TenantRecord, service_headers: TokenFactory) -> dict[str, str]:
    return await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE))


async def run(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    tenant: TenantRecord,
    sql: str,
    *params: Any,
    **extra: Any,
) -> httpx.Response:
    body = {"sql": sql, "params": list(params), "tenant_id": tenant.tenant_id, **extra}
    return await http.post(QUERY, json=body, headers=headers)


async def count_users(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> int:
    response = await run(http, headers, tenant, "SELECT count(*) FROM users")
    return int(response.json()["rows"][0][0])


async def test_results_carry_column_types_and_exact_values(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    response = await run(
        http, headers, tenant,
        "SELECT 1.10::numeric AS price, '2024-01-02 03:04:05+00'::timestamptz AS at,"
        " '{\"a\": [1, 2]}'::jsonb AS doc, '\\x0001'::bytea AS raw, ARRAY[1,2] AS ids,"
        " NULL::text AS nothing, true AS flag",
    )  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(c["name"], c["type"]) for c in body["columns"]] == [
        ("price", "numeric"), ("at", "timestamptz"), ("doc", "jsonb"), ("raw", "bytea"),
        ("ids", "int4[]"), ("nothing", "text"), ("flag", "bool"),
    ]  # fmt: skip
    assert body["rows"] == [
        ["1.10", "2024-01-02T03:04:05+00:00", {"a": [1, 2]}, "AAE=", [1, 2], None, True]
    ]
    assert body["statement_class"] == "read"


async def test_parameters_are_typed_by_postgres(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    insert = await run(
        http, headers, tenant,
        "INSERT INTO users (user_id, email, subscription_tier, subscription_limits, created_at)"
        " VALUES ($1, $2, $3, $4, $5)",
        "u1", "u1@example.com", "pro", {"max_mt5_accounts": 5}, "2024-05-06T07:08:09Z",
    )  # fmt: skip
    assert insert.status_code == 200, insert.text
    assert insert.json()["row_count"] == 1 and insert.json()["command"] == "INSERT 0 1"
    select = await run(
        http, headers, tenant,
        "SELECT subscription_limits, created_at FROM users WHERE user_id = $1", "u1",
    )  # fmt: skip
    assert select.json()["rows"] == [[{"max_mt5_accounts": 5}, "2024-05-06T07:08:09+00:00"]]


async def test_tenant_and_user_may_come_from_headers(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    response = await http.post(
        QUERY, json={"sql": "SELECT current_setting('dbsvc.user_id', true)"},
        headers={**headers, "X-Tenant-Id": tenant.tenant_id, "X-User-Id": "trader-7"},
    )  # fmt: skip
    assert response.json()["rows"] == [["trader-7"]]


async def test_syntax_error_carries_sqlstate_and_position(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    response = await run(http, headers, tenant, "SELECT * FRM users")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "sql_syntax_error" and error["sqlstate"] == "42601"
    assert error["position"] == 10


async def test_undefined_table_is_404_with_position(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    response = await run(http, headers, tenant, "SELECT * FROM no_such_table")
    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["code"], error["sqlstate"], error["position"]) == ("undefined_table", "42P01", 15)


async def test_unique_violation_is_409_and_keeps_the_first_row(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    sql = "INSERT INTO users (user_id, email, subscription_tier) VALUES ($1, $2, 'free')"
    assert (await run(http, headers, tenant, sql, "dup", "dup@x")).status_code == 200
    response = await run(http, headers, tenant, sql, "dup", "other@x")
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "unique_violation"
    assert response.json()["error"]["sqlstate"] == "23505"
    assert await count_users(http, headers, tenant) == 1


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        (["only-one"], "takes 3 parameter"),
        (["u", "e@x", 5], "parameter $3"),
        ([["u"], "e@x", "free"], "parameter $1"),
        (["u", {"email": 1}, "free"], "parameter $2"),
    ],
)
async def test_malformed_parameters_get_a_clear_error_and_nothing_is_written(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    tenant: TenantRecord,
    params: list[Any],
    fragment: str,
) -> None:
    sql = "INSERT INTO users (user_id, email, subscription_tier) VALUES ($1, $2, $3)"
    response = await run(http, headers, tenant, sql, *params)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_parameters"
    assert fragment in response.json()["error"]["message"]
    assert await count_users(http, headers, tenant) == 0


async def test_check_violation_reports_the_constraint(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    response = await run(
        http, headers, tenant,
        "INSERT INTO users (user_id, email, subscription_tier) VALUES ('u', 'e', 'platinum')",
    )  # fmt: skip
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "check_violation"


async def test_statement_timeout_from_tenant_limits_cancels_the_query(
    http: httpx.AsyncClient, new_tenant: TenantFactory, service_headers: TokenFactory
) -> None:
    tenant = await new_tenant("slow", TenantLimits(connection_limit=5, statement_timeout_ms=300))
    headers = await service_headers([tenant.tenant_id])
    response = await run(http, headers, tenant, "SELECT pg_sleep(5)")
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "query_canceled"
    assert response.json()["error"]["sqlstate"] == "57014"


async def test_oversized_sql_is_413_and_never_parsed(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord, core: Application
) -> None:
    sql = "SELECT 1 /*" + "x" * core.settings.max_sql_bytes + "*/"
    response = await run(http, headers, tenant, sql)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_oversized_body_is_413(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord, core: Application
) -> None:
    params = ["x" * 1000] * (core.settings.max_request_bytes // 1000 + 1)
    response = await run(http, headers, tenant, "SELECT 1", *params)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    # Refused before any route, it still has a request id (and counts in the metrics).
    assert len(response.headers["x-request-id"]) >= 16


async def test_malformed_json_and_wrong_types_are_400(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    broken = await http.post(
        QUERY, content=b"{not json", headers={**headers, "Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    wrong = await http.post(QUERY, json={"sql": 42, "tenant_id": tenant.tenant_id}, headers=headers)
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "invalid_request"
    extra = await http.post(
        QUERY, json={"sql": "SELECT 1", "tenant_id": tenant.tenant_id, "role": "x"}, headers=headers
    )
    assert extra.status_code == 400


async def test_unknown_and_suspended_tenants_are_refused(
    http: httpx.AsyncClient,
    core: Application,
    new_tenant: TenantFactory,
    service_headers: TokenFactory,
) -> None:
    tenant = await new_tenant("paused")
    headers = await service_headers(["*"])
    unknown = await http.post(
        QUERY, json={"sql": "SELECT 1", "tenant_id": "nobody_at_all"}, headers=headers
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "tenant_not_found"
    await core.tenants.suspend(tenant.tenant_id)
    paused = await run(http, headers, tenant, "SELECT 1")
    assert paused.status_code == 409 and paused.json()["error"]["code"] == "tenant_suspended"
    await core.tenants.resume(tenant.tenant_id)
    assert (await run(http, headers, tenant, "SELECT 1")).status_code == 200


async def test_invalid_user_id_is_rejected(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    response = await run(http, headers, tenant, "SELECT 1", user_id="u'; reset role; --")
    assert response.status_code == 400


async def test_user_id_limits_shared_rows_to_that_user(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord
) -> None:
    for user in ("alice", "bob", None):
        sql = "INSERT INTO market_data (user_id, symbol) VALUES ($1, 'EURUSD')"
        assert (await run(http, headers, tenant, sql, user)).status_code == 200
    sql = "SELECT coalesce(user_id, '-') FROM market_data ORDER BY 1"
    everyone = await run(http, headers, tenant, sql)
    assert everyone.json()["rows"] == [["-"], ["alice"], ["bob"]]
    alice = await run(http, headers, tenant, sql, user_id="alice")
    assert alice.json()["rows"] == [["-"], ["alice"]]
    forged = await run(
        http,
        headers,
        tenant,
        "INSERT INTO market_data (user_id, symbol) VALUES ('bob', 'X')",
        user_id="alice",
    )
    assert forged.status_code == 403 and forged.json()["error"]["sqlstate"] == "42501"


async def test_result_larger_than_the_cap_is_refused(
    http: httpx.AsyncClient, headers: dict[str, str], tenant: TenantRecord, core: Application
) -> None:
    response = await run(
        http, headers, tenant, "SELECT generate_series(1, $1)", core.settings.max_result_rows + 1
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "result_too_large"


async def test_pool_per_tenant_is_reported_in_metrics(
    http: httpx.AsyncClient,
    headers: dict[str, str],
    tenant: TenantRecord,
    admin_headers: dict[str, str],
) -> None:
    await run(http, headers, tenant, "SELECT 1")
    metrics = (await http.get("/metrics", headers=admin_headers)).text
    assert f'dbsvc_pool_connections{{tenant="{tenant.tenant_id}"}}' in metrics
    assert 'dbsvc_requests_total{code="ok",front_end="http",operation="/api/v1/query"}' in metrics


async def test_a_statement_still_works_after_the_tenant_changes_its_table(
    http: httpx.AsyncClient, service_headers: TokenFactory, tenant: TenantRecord
) -> None:
    """Statements are prepared once per connection and reused; a table the tenant alters
    (a column added, dropped, retyped) must not leave the old statement failing on every
    connection that prepared it."""
    headers = await service_headers([tenant.tenant_id], (Scope.READ, Scope.WRITE, Scope.ADMIN))
    for sql in ("CREATE TABLE quotes (id int PRIMARY KEY, px numeric)",
                "INSERT INTO quotes VALUES (1, 1.5)"):  # fmt: skip
        assert (await run(http, headers, tenant, sql)).status_code == 200
    for _ in range(8):  # on every pooled connection
        assert (await run(http, headers, tenant, "SELECT * FROM quotes")).status_code == 200
    altered = await run(http, headers, tenant, "ALTER TABLE quotes ADD COLUMN venue text")
    assert altered.status_code == 200, altered.text
    for _ in range(8):
        response = await run(http, headers, tenant, "SELECT * FROM quotes")
        assert response.status_code == 200, response.text
        assert [c["name"] for c in response.json()["columns"]] == ["id", "px", "venue"]
    retyped = await run(http, headers, tenant, "ALTER TABLE quotes ALTER COLUMN px TYPE text")
    assert retyped.status_code == 200, retyped.text
    for _ in range(8):
        response = await run(http, headers, tenant, "SELECT px FROM quotes WHERE id = $1", 1)
        assert response.status_code == 200, response.text
        assert response.json()["rows"] == [["1.5"]]


async def test_kept_statements_are_retried_on_every_path_after_a_table_changes(
    core: Application, tenant: TenantRecord
) -> None:
    """The same, through each of the query core's paths (whole result, stream, transaction),
    with the statement kept on several pooled connections at once and the table changed by
    another session (a migration, another instance)."""
    principal = Principal(
        "svc-q", frozenset({tenant.tenant_id}), frozenset({Scope.READ, Scope.WRITE})
    )
    ctx = TenantContext(tenant.tenant_id)
    table = f"{tenant.schema_name}.moving"
    await core.owner_pool.execute(f"CREATE TABLE {table} (id int, px numeric)")
    await core.owner_pool.execute(f"GRANT SELECT ON {table} TO {tenant.role_name}")
    await core.owner_pool.execute(f"INSERT INTO {table} VALUES (1, 1.5)")
    sql = "SELECT id, px FROM moving"

    async def whole() -> tuple[list[str], list[tuple[object, ...]]]:
        result = await core.executor.execute(principal, ctx, sql)
        return [c.type_name for c in result.columns], [tuple(r) for r in result.rows]

    async def streamed() -> tuple[list[str], list[tuple[object, ...]]]:
        events = [e async for e in core.executor.stream(principal, ctx, sql)]
        header = next(e for e in events if isinstance(e, Header))
        rows = [tuple(r) for e in events if isinstance(e, list) for r in e]
        return [c.type_name for c in header.columns], rows

    async def in_transaction() -> tuple[list[str], list[tuple[object, ...]]]:
        done = await core.executor.transaction(principal, ctx, [(sql, [])])
        result = done.results[0]
        return [c.type_name for c in result.columns], [tuple(r) for r in result.rows]

    paths = (whole, streamed, in_transaction)
    await asyncio.gather(*(path() for path in paths for _ in range(3)))  # kept on each connection
    await core.owner_pool.execute(f"ALTER TABLE {table} ALTER COLUMN px TYPE text")
    for outcome in await asyncio.gather(*(path() for path in paths for _ in range(3))):
        assert outcome == (["int4", "text"], [(1, "1.5")])
