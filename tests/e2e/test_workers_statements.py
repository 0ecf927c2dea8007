"""Statement statistics and the slow-query log with ``DBSVC_WORKERS=2``: each worker keeps its own
figures and shares them through the run directory, so whichever worker answers, a tenant's
figures count the statements both ran; slow statements are logged (with their plans) in the
control plane whichever worker ran them, and ``dbsvc_slow_queries_total`` adds both up."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.test_serve import Served
from tests.e2e.test_workers import metric, tenant_with_token

CALLS = 40


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with tempfile.TemporaryDirectory(prefix="dbsvc-stmt-workers-") as tmp:
        server = Served(Path(tmp) / "data", env={"DBSVC_WORKERS": "2"})
        try:
            server.wait_for_line("Database Service is running.", timeout=90)
            server.wait_healthy(timeout=30)
            yield server
        finally:
            server.kill()


def statements(served: Served, headers: dict[str, str]) -> dict[str, Any]:
    response = httpx.get(f"{served.base}/api/v1/statements", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def test_figures_and_slow_queries_cover_both_workers(served: Served) -> None:
    headers = tenant_with_token(served, "stmt_workers")
    settings = httpx.put(
        f"{served.base}/api/v1/admin/tenants/stmt_workers/statement-settings",
        json={"slow_query_ms": 0},
        headers=served.admin(),
    )
    assert settings.status_code == 200, settings.text
    time.sleep(6)  # the other worker reloads the tenant's settings within 5 s
    for i in range(CALLS):
        # A new connection each time: the kernel spreads them over both workers.
        response = httpx.post(
            f"{served.base}/api/v1/query",
            json={"sql": f"SELECT count(*) FROM users WHERE user_id = 'u{i}'"},
            headers=headers,
            timeout=10,
        )
        assert response.status_code == 200, response.text

    deadline = time.monotonic() + 15
    while True:
        document = statements(served, headers)
        found = [s for s in document["statements"] if "FROM users" in s["statement"]]
        if found and found[0]["calls"] == CALLS and document["processes"] == 2:
            break
        assert time.monotonic() < deadline, document
        time.sleep(0.5)
    assert found[0]["rows"] == CALLS

    while True:
        response = httpx.get(
            f"{served.base}/api/v1/slow-queries?limit=1000", headers=headers, timeout=10
        )
        entries = response.json()["slow_queries"]
        if len(entries) == CALLS:
            break
        assert time.monotonic() < deadline + 15, entries
        time.sleep(0.5)
    assert all("Aggregate" in e["plan"] for e in entries)
    assert metric(served, "dbsvc_slow_queries_total", statement_class="read") >= CALLS

    # A reset through one worker resets both (each applies it when it next shares).
    reset = httpx.post(f"{served.base}/api/v1/statements/reset", headers=headers, timeout=10)
    assert reset.status_code == 403  # the tenant's service holds no admin scope
    admin = {**served.admin(), "X-Tenant-Id": "stmt_workers"}
    reset = httpx.post(f"{served.base}/api/v1/statements/reset", headers=admin, timeout=10)
    assert reset.status_code == 200, reset.text
    time.sleep(3)
    for _ in range(4):  # whichever worker answers
        assert statements(served, headers)["statements"] == []
