"""What a tenant sends cannot stall other tenants or crash a request.

Guard cost: the work is bounded before parsing (bytes, then an estimate of tokens: parsing
cost follows the token count), and statements past a small size are parsed on a worker thread,
never on the event loop every tenant's requests share.

Bad input: text that is not valid Unicode (a lone surrogate, a NUL) is a 400/INVALID_ARGUMENT
``invalid_text``; every SQLSTATE PostgreSQL may answer maps to a status that says whose fault
it is (no 500 for a caller's statement); and every such request is audited.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time

import asyncpg
import httpx
import pytest

from database_service.app import Application
from database_service.auth import Scope
from tests.isolation.fix_attack import Tenants
from tests.isolation.fix_frontends import FrontEnd, service_token

pytestmark = pytest.mark.usefixtures("unchanged_victim")


async def test_a_statement_of_too_many_tokens_is_refused_before_parsing(
    front_end: FrontEnd,
) -> None:
    sql = "SELECT " + ",".join("1" for _ in range(30_000))  # 60 KB, 60,000 tokens
    started = time.perf_counter()
    outcome = await front_end.run(sql)
    elapsed = time.perf_counter() - started
    print(f"\n{front_end.name}: 60,000 tokens refused in {elapsed * 1000:.1f} ms")
    assert outcome.refused and outcome.code == "payload_too_large", outcome


async def test_large_statements_do_not_stall_other_tenants(
    front_end: FrontEnd, core: Application, tenants: Tenants
) -> None:
    token = await service_token(core, [tenants.b.tenant_id], (Scope.READ,))
    # Large but allowed statements, each different (no cached verdict), parsed meanwhile.
    big = [
        f"SELECT {secrets.randbelow(10**6)}, cardinality(ARRAY["
        + ",".join("1" for _ in range(9_000))
        + "])"
        for _ in range(8)
    ]
    gaps: list[float] = []
    latencies: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:  # how late the event loop wakes a 10 ms sleeper
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            gaps.append(time.perf_counter() - before - 0.01)

    async def victim() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            outcome = await front_end.run(
                "SELECT count(*) FROM users", tenant_id=tenants.b.tenant_id, token=token
            )
            assert outcome.ok, outcome
            latencies.append(time.perf_counter() - before)

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(victim())]
    await asyncio.sleep(0.2)
    outcomes = await asyncio.gather(*(front_end.run(sql) for sql in big))
    stop.set()
    await asyncio.gather(*tasks)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:1]
    print(
        f"\n{front_end.name}: 8 statements of 18,000 tokens; B's reads: {len(latencies)},"
        f" median {statistics.median(latencies) * 1000:.1f} ms,"
        f" max {max(latencies) * 1000:.1f} ms; event-loop lag max {max(gaps) * 1000:.1f} ms"
    )
    assert max(latencies) < 3, "B's reads stalled behind the guard"


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT 'a\x00b'", []),
        ("SELECT 1 -- \x00", []),
        ("SELECT $1::text", ["a\x00b"]),
    ],
    ids=["NUL in SQL", "NUL in a comment", "NUL in a parameter"],
)
async def test_text_with_a_nul_is_invalid_text(
    front_end: FrontEnd, sql: str, params: list[str]
) -> None:
    outcome = await front_end.run(sql, *params)
    assert outcome.refused, outcome
    assert outcome.code in {"invalid_text", "invalid_parameters", "data_exception"}, outcome
    assert outcome.status in {"400", "INVALID_ARGUMENT"}, outcome


@pytest.mark.parametrize(
    "body",
    [
        '{"sql": "SELECT \'\\ud800\'", "params": []}',
        '{"sql": "SELECT 1 -- \\udfff", "params": []}',
        '{"sql": "SELECT $1::text", "params": ["\\ud83d"]}',
        '{"sql": "SELECT $1::jsonb", "params": [{"k": "\\udc00"}]}',
    ],
)
async def test_lone_surrogates_over_rest_are_400_and_audited(
    http: httpx.AsyncClient, core: Application, tenants: Tenants, body: str
) -> None:
    marker = f"surrogate-{secrets.token_hex(3)}"
    token = await service_token(core, [tenants.a.tenant_id], (Scope.READ, Scope.WRITE))
    response = await http.post(
        "/api/v1/query",
        content=body.encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "X-Tenant-Id": tenants.a.tenant_id,
            "X-Request-Marker": marker,
        },
    )
    # SQL text is refused before parsing; a parameter reaches PostgreSQL, which refuses the
    # bytes (22021, character_not_in_repertoire): both are the caller's 400.
    codes = {"invalid_text", "invalid_parameters", "data_exception"}
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] in codes
    await core.audit.flush()
    rows = await core.owner_pool.fetch(
        f"SELECT outcome, code FROM {core.settings.control_schema}.audit_log"
        " WHERE tenant_id = $1 AND action = 'query' ORDER BY id DESC LIMIT 1",
        tenants.a.tenant_id,
    )
    assert rows and rows[0]["code"] in codes


SQLSTATES = {
    # SQLSTATE: (statement, expected code, REST status)
    "21000": ("SELECT (SELECT 1 UNION ALL SELECT 2)", "cardinality_violation", "400"),
    "0A000": ("SELECT count(*) FROM users FOR UPDATE", "feature_not_supported", "400"),
    "42P18": ("SELECT $1", "sql_error", "400"),
    "22012": ("SELECT 1 / 0", "data_exception", "400"),
    "2201E": ("SELECT ln(0)", "data_exception", "400"),
    "22P02": ("SELECT 'x'::int", "data_exception", "400"),
    "42703": ("SELECT nope FROM users", "undefined_column", "400"),
    "42P01": ("SELECT * FROM nope", "undefined_table", "404"),
    "22023": ("SELECT repeat('x', -1)::int", "data_exception", "400"),
}


@pytest.mark.parametrize("state", SQLSTATES)
async def test_sqlstates_a_statement_causes_are_the_callers_errors(
    front_end: FrontEnd, state: str
) -> None:
    sql, code, _status = SQLSTATES[state]
    outcome = await front_end.run(sql)
    assert not outcome.ok and not outcome.server_error, outcome
    if outcome.sqlstate == state:
        assert outcome.code == code, outcome
    if front_end.name == "rest":
        assert outcome.status.startswith("4"), outcome


async def test_a_lock_not_available_is_a_conflict_to_retry(
    front_end: FrontEnd, attacker_conn: asyncpg.Connection
) -> None:
    await attacker_conn.execute(
        "INSERT INTO users VALUES ('locked', 'locked@a', 'free') ON CONFLICT DO NOTHING"
    )
    async with attacker_conn.transaction():
        await attacker_conn.execute("SELECT * FROM users WHERE user_id = 'locked' FOR UPDATE")
        outcome = await front_end.run(
            "SELECT * FROM users WHERE user_id = 'locked' FOR UPDATE NOWAIT"
        )
    assert (outcome.code, outcome.sqlstate) == ("lock_not_available", "55P03"), outcome
    assert outcome.status in {"409", "ABORTED"}, outcome


async def test_a_tenants_own_raise_is_the_tenants_error(
    front_end: FrontEnd, attacker_conn: asyncpg.Connection
) -> None:
    await attacker_conn.execute(
        "CREATE OR REPLACE FUNCTION boom(code text) RETURNS int LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = code; END $$"
    )
    for code in ("P0001", "U0001", "XX000", "58000"):
        outcome = await front_end.run("SELECT boom($1)", code)
        assert not outcome.ok and outcome.sqlstate == code, outcome
        # A tenant's function may claim any SQLSTATE: it is reported as it is, never hidden.
        assert outcome.code is not None
