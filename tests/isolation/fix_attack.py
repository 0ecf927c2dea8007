"""The attacker and the victim.

Tenant A (the attacker) holds every scope for itself, so that what stops it is isolation, not a
missing scope. Tenant B (the victim) has recognisable rows in its schema and in every shared
table. ``unchanged_victim`` (autouse in the attack modules) snapshots B's data before each test
and asserts it is byte-for-byte the same after.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from database_service.tenancy import TenantRecord
from tests.fix_pg import PgCluster

SECRET = "VICTIM-SECRET-7f3a"
SHARED_TABLES = (
    "market_data",
    "trading_ticks",
    "ai_predictions",
    "tenant_configurations",
    "candles_1m",
)


@dataclass
class Tenants:
    a: TenantRecord
    b: TenantRecord
    a_headers: dict[str, str]
    b_headers: dict[str, str]
    shared: str

    async def attack(
        self, http: httpx.AsyncClient, sql: str, *params: Any, user_id: str | None = None
    ) -> httpx.Response:
        body: dict[str, Any] = {"sql": sql, "params": list(params), "tenant_id": self.a.tenant_id}
        if user_id is not None:
            body["user_id"] = user_id
        response = await http.post("/api/v1/query", json=body, headers=self.a_headers)
        assert SECRET not in response.text, f"victim data leaked: {response.text[:300]}"
        return response

    async def as_victim(self, http: httpx.AsyncClient, sql: str, *params: Any) -> httpx.Response:
        body = {"sql": sql, "params": list(params), "tenant_id": self.b.tenant_id}
        return await http.post("/api/v1/query", json=body, headers=self.b_headers)


async def _headers(core: Application, tenant: TenantRecord, scopes: list[Scope]) -> dict[str, str]:
    name = f"attack-{secrets.token_hex(4)}"
    await core.services.register(name, tenants=[tenant.tenant_id], scopes=scopes, with_secret=False)
    token = core.tokens.issue(name, tenants=[tenant.tenant_id], scopes=scopes, ttl_seconds=3600)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
async def tenants(core: Application) -> Tenants:
    tag = secrets.token_hex(3)
    a = await core.tenants.create(f"attacker_{tag}")
    b = await core.tenants.create(f"victim_{tag}")
    shared = core.settings.shared_schema
    pool = core.owner_pool
    await pool.execute(
        f"INSERT INTO {b.schema_name}.users (user_id, email, subscription_tier)"
        " VALUES ('b-user', $1, 'enterprise')",
        f"{SECRET}@victim.example",
    )
    await pool.execute(
        f"INSERT INTO {shared}.market_data (company_id, user_id, symbol, tick_data)"
        " VALUES ($1, 'b-user', 'EURUSD', $2), ($1, NULL, 'GBPUSD', $2)",
        b.tenant_id,
        {"note": SECRET},
    )
    await pool.execute(
        f"INSERT INTO {shared}.trading_ticks (time, company_id, user_id, symbol, bid, ask, volume)"
        " VALUES (now(), $1, 'b-user', 'EURUSD', 1.1, 1.2, 7)",
        b.tenant_id,
    )
    await pool.execute(
        f"INSERT INTO {shared}.ai_predictions (time, company_id, user_id, symbol, prediction_type,"
        " confidence, features) VALUES (now(), $1, 'b-user', 'EURUSD', 'buy', 0.9, $2)",
        b.tenant_id,
        {"note": SECRET},
    )
    await pool.execute(
        f"INSERT INTO {shared}.tenant_configurations (company_id, config_key, config_value)"
        " VALUES ($1, 'risk_limit', $2)",
        b.tenant_id,
        {"note": SECRET},
    )
    # A has rows of its own in the shared tables, so "only its own rows" is observable.
    await pool.execute(
        f"INSERT INTO {shared}.market_data (company_id, user_id, symbol) VALUES ($1, 'a-user', 'USDJPY')",
        a.tenant_id,
    )
    return Tenants(
        a=a,
        b=b,
        a_headers=await _headers(core, a, [Scope.READ, Scope.WRITE, Scope.ADMIN]),
        b_headers=await _headers(core, b, [Scope.READ, Scope.WRITE]),
        shared=shared,
    )


async def snapshot(core: Application, tenants: Tenants) -> dict[str, list[tuple[Any, ...]]]:
    pool = core.owner_pool
    state = {
        "users": [
            tuple(r)
            for r in await pool.fetch(f"SELECT * FROM {tenants.b.schema_name}.users ORDER BY 1")
        ]
    }
    for table in SHARED_TABLES:
        rows = await pool.fetch(
            f"SELECT * FROM {tenants.shared}.{table} WHERE company_id = $1 ORDER BY 1, 2, 3",
            tenants.b.tenant_id,
        )
        state[table] = [tuple(r) for r in rows]
    state["role"] = [
        tuple(r)
        for r in await pool.fetch(
            "SELECT rolname, rolcanlogin, rolsuper, rolbypassrls, rolconnlimit FROM pg_roles"
            " WHERE rolname = $1",
            tenants.b.role_name,
        )
    ]
    return state


@pytest.fixture
async def unchanged_victim(core: Application, tenants: Tenants) -> AsyncIterator[None]:
    before = await snapshot(core, tenants)
    assert before["users"] and before["market_data"], "the victim's seed rows are missing"
    yield
    assert await snapshot(core, tenants) == before, "the victim's data changed"


@pytest.fixture
async def attacker_conn(
    tenants: Tenants, core: Application, pg_cluster: PgCluster
) -> AsyncIterator[asyncpg.Connection]:
    """A's own role over a direct connection: no service, no guard — only PostgreSQL."""
    conn = await asyncpg.connect(
        pg_cluster.dsn,
        user=tenants.a.role_name,
        password=core.secret_box.open(tenants.a.role_secret),
    )
    try:
        yield conn
    finally:
        await conn.close()
