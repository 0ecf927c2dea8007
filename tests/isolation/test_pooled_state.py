"""Nothing a request leaves on a pooled connection reaches the next request, and requests of two
tenants interleaved on the same service never see each other's identity or rows."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.isolation.fix_attack import Tenants

pytestmark = pytest.mark.usefixtures("unchanged_victim")


async def test_user_id_does_not_survive_into_the_next_request(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    with_user = await tenants.attack(
        http, "SELECT current_setting('dbsvc.user_id', true)", user_id="a-user"
    )
    assert with_user.json()["rows"] == [["a-user"]]
    for _ in range(5):  # the pool has several connections; every one must be clean
        after = await tenants.attack(
            http, "SELECT coalesce(current_setting('dbsvc.user_id', true), '')"
        )
        assert after.json()["rows"] == [[""]]


async def test_refused_session_changes_leave_default_settings(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    for attempt in (
        "SET search_path = public",
        "SET statement_timeout = 0",
        "PREPARE p AS SELECT 1",
    ):
        assert (await tenants.attack(http, attempt)).status_code == 400
    shown = await tenants.attack(http, "SHOW search_path")
    assert tenants.a.schema_name in shown.json()["rows"][0][0]
    timeout = await tenants.attack(http, "SHOW statement_timeout")
    assert timeout.json()["rows"] != [["0"]]


async def test_victim_settings_are_its_own(http: httpx.AsyncClient, tenants: Tenants) -> None:
    await tenants.attack(http, "SELECT 1")
    shown = await tenants.as_victim(http, "SELECT session_user, current_setting('search_path')")
    role, search_path = shown.json()["rows"][0]
    assert role == tenants.b.role_name
    assert tenants.b.schema_name in search_path and tenants.a.schema_name not in search_path


async def test_interleaved_requests_each_see_only_their_own_tenant(
    http: httpx.AsyncClient, tenants: Tenants
) -> None:
    sql = (
        "SELECT session_user::text, (SELECT string_agg(DISTINCT company_id, ',') FROM market_data)"
    )

    async def as_a() -> tuple[str, list[list[str]]]:
        return "a", (await tenants.attack(http, sql)).json()["rows"]

    async def as_b() -> tuple[str, list[list[str]]]:
        return "b", (await tenants.as_victim(http, sql)).json()["rows"]

    results = await asyncio.gather(*(as_a() if i % 2 else as_b() for i in range(50)))
    for who, rows in results:
        tenant = tenants.a if who == "a" else tenants.b
        assert rows == [[tenant.role_name, tenant.tenant_id]], (who, rows)
