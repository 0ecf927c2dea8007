"""The status page's markup and its sign-in grants, without a server."""

from __future__ import annotations

from typing import Any

from database_service.auth import ALL_TENANTS, Principal, Scope
from database_service.auth.status_links import LINK_SECONDS, SESSION_SECONDS, StatusLinks
from database_service.observability.status_page import render_fragment, render_page

ADMIN = Principal(
    service="ops", tenants=frozenset({ALL_TENANTS}), scopes=frozenset({Scope.ADMIN, Scope.READ})
)


def data(**overrides: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "health": {"status": "healthy", "version": "1.2.3", "dependencies": {}},
        "performance": {"pools": {}},
        "tenants": [],
        "slow": {},
        "slow_recent": [],
    }
    document.update(overrides)
    return document


def test_everything_a_tenant_wrote_is_escaped() -> None:
    hostile = "</td><script>alert(1)</script>"
    page = render_page(
        data(
            tenants=[{"tenant_id": "acme", "status": hostile}],
            slow_recent=[
                {"tenant_id": "acme", "recorded_at": "now", "duration_ms": 5.0,
                 "statement": f"SELECT '{hostile}'"}
            ],
        ),
        nonce="n0nce",
    )  # fmt: skip
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)" in page
    assert page.count("<script") == 1 and "<script nonce=n0nce>" in page


def test_the_page_marks_its_source_and_figures() -> None:
    assert "data-k=source>page<" in render_page(data(), nonce="x")
    fragment = render_fragment(data(tenants=[{"tenant_id": "acme", "status": "active"}]))
    assert "data-k=source>refresh<" in fragment and "data-tenant=acme" in fragment
    assert "data-k=version>1.2.3<" in fragment


def test_a_link_becomes_a_session_once_and_only_before_it_expires() -> None:
    links = StatusLinks("m" * 40)
    code = links.link_code(ADMIN, now=1000)
    session = links.session_from_link(code, now=1000 + LINK_SECONDS - 1)
    assert session is not None
    viewer = links.principal(session, now=1000 + SESSION_SECONDS)
    assert viewer is not None and viewer.scopes == frozenset({Scope.ADMIN})  # no data scope
    assert links.session_from_link(code, now=1000 + LINK_SECONDS + 1) is None
    assert links.principal(session, now=1000 + LINK_SECONDS + SESSION_SECONDS + 1) is None
    # A link is not a session, a session not a link, another key's grants are nothing.
    assert links.principal(code, now=1000) is None
    assert links.session_from_link(session, now=1000) is None
    assert StatusLinks("o" * 40).principal(session, now=1000) is None
    body, mac = session.split(".")
    assert links.principal(body[:-2] + "xx." + mac, now=1000) is None


def test_a_tenant_principal_gets_no_link_worth_anything() -> None:
    links = StatusLinks("m" * 40)
    for scopes in ({Scope.READ}, {Scope.METRICS, Scope.ADMIN}):
        tenant = Principal(service="r", tenants=frozenset({"acme"}), scopes=frozenset(scopes))
        assert links.session_from_link(links.link_code(tenant)) is None


def test_ingestion_and_replica_lag_are_shown_from_the_health_document() -> None:
    health = {
        "status": "healthy",
        "dependencies": {
            "ingestion": {"status": "healthy", "transports": {
                "nats": {"state": "running", "lag": 42, "stored": 1000,
                         "records_per_second": 12.5, "dead_letters": 0}}},
        },
        "replicas": {"max_lag_ms": 500, "replicas": [
            {"name": "replica-1", "status": "healthy", "lag_ms": 3.2}]},
    }  # fmt: skip
    fragment = render_fragment(data(health=health))
    assert "data-transport=nats" in fragment
    assert "data-k=ingest_lag>42<" in fragment and "data-k=ingest_rate>12.5<" in fragment
    assert "replica-1" in fragment and "data-k=replica_lag_ms>3.2<" in fragment
