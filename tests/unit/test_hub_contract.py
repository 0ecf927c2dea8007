"""The Central Hub contract's codecs: what an update may say, and how a batch is ordered."""

from __future__ import annotations

import datetime as dt

import pytest

from database_service.errors import InvalidParameters
from database_service.hub.contract import heartbeat_document, parse_updates


def test_one_update_or_a_batch_parse_alike() -> None:
    one = {"tenant_id": "acme", "version": 2, "status": "suspended"}
    assert parse_updates(one, max_ttl_ms=1000) == parse_updates({"updates": [one]}, max_ttl_ms=1000)


def test_a_batch_is_applied_in_version_order_per_tenant() -> None:
    configs = parse_updates(
        {"updates": [
            {"tenant_id": "bb", "version": 9},
            {"tenant_id": "aa", "version": 3},
            {"tenant_id": "aa", "version": 1},
        ]},
        max_ttl_ms=1000,
    )  # fmt: skip
    assert [(c.tenant_id, c.version) for c in configs] == [("aa", 1), ("aa", 3), ("bb", 9)]


def test_limits_and_rules_become_the_tenants_configuration() -> None:
    (config,) = parse_updates(
        {"tenant_id": "acme", "version": 1, "cache_rules": {"positions": 500},
         "limits": {"connection_limit": 5, "statement_timeout_ms": 1000}},
        max_ttl_ms=1000,
    )  # fmt: skip
    assert config.limits is not None and config.limits.connection_limit == 5
    assert config.cache_rules == {"positions": 500} and config.status is None
    assert config.source["limits"] == {"connection_limit": 5, "statement_timeout_ms": 1000}


@pytest.mark.parametrize(
    "payload",
    [
        {"updates": []},
        {"updates": "x"},
        {"updates": [], "more": 1},
        {"tenant_id": "aa", "version": 1, "status": "deleting"},
        {"tenant_id": "aa", "version": True},
        {"tenant_id": "aa", "version": 1.5},
        {"tenant_id": "aa"},
        {"tenant_id": "aa", "version": 1, "cache_rules": {"positions": 1001}},
        {"tenant_id": "aa", "version": 1, "cache_rules": {"Positions": 10}},
        {"tenant_id": "aa", "version": 1, "limits": {"connection_limit": 5}},
        {"updates": [{"tenant_id": "aa", "version": 1}, {"tenant_id": "aa", "version": 1}]},
        ["not", "an", "object"],
    ],
)
def test_a_malformed_update_is_refused(payload: object) -> None:
    with pytest.raises(InvalidParameters):
        parse_updates(payload, max_ttl_ms=1000)


def test_the_heartbeat_carries_the_health_status() -> None:
    beat = heartbeat_document(
        instance_id="i",
        health={"status": "degraded", "x": 1},
        metrics={},
        tenants=[],
        config_versions={"a": 2},
        at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    )
    assert beat["status"] == "degraded" and beat["config_versions"] == {"a": 2}
    assert beat["at"] == "2026-01-01T00:00:00+00:00"
