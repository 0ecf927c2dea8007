"""Tokens, secrets and the principal's checks, without a database."""

import time
from typing import Any

import jwt
import pytest

from database_service.auth import (
    ExchangeGate,
    ExchangeLimits,
    Principal,
    RateLimited,
    Scope,
    TokenCodec,
    bootstrap_admin,
    parse_scopes,
)
from database_service.auth.ratelimit import TokenBuckets
from database_service.auth.tokens import hash_secret, verify_secret, verify_secret_or_dummy
from database_service.errors import PermissionDenied, Unauthenticated
from database_service.observability.audit import AuditEvent

KEY = b"k" * 32


AUDIENCE = "urn:database-service:test"


def codec(**overrides: Any) -> TokenCodec:
    return TokenCodec(KEY, **{"issuer": "database-service", "audience": AUDIENCE, **overrides})


def test_issued_token_verifies_to_its_claims() -> None:
    token = codec().issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=60)
    principal = codec().verify(token)
    assert principal.service == "trading"
    assert principal.tenants == frozenset({"abc"})
    assert principal.scopes == frozenset({Scope.READ})


def test_expired_token_is_unauthenticated() -> None:
    token = codec().issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=-60)
    with pytest.raises(Unauthenticated, match="expired"):
        codec().verify(token)


def test_token_signed_with_another_key_is_unauthenticated() -> None:
    other = TokenCodec(b"o" * 32, issuer="database-service", audience=AUDIENCE)
    token = other.issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=60)
    with pytest.raises(Unauthenticated, match="invalid token"):
        codec().verify(token)


def test_unsigned_token_is_unauthenticated() -> None:
    token = jwt.encode(
        {"sub": "x", "iss": "database-service", "exp": 2**40, "iat": 0}, None, "none"
    )
    with pytest.raises(Unauthenticated):
        codec().verify(token)


def test_token_from_another_issuer_is_unauthenticated() -> None:
    other = codec(issuer="someone-else")
    token = other.issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=60)
    with pytest.raises(Unauthenticated):
        codec().verify(token)


def test_garbage_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated):
        codec().verify("not.a.token")


def test_principal_outside_its_tenants_is_denied() -> None:
    principal = Principal("svc", frozenset({"abc"}), frozenset({Scope.READ}))
    with pytest.raises(PermissionDenied, match="tenant 'xyz'"):
        principal.require(Scope.READ, "xyz")


def test_principal_without_scope_is_denied() -> None:
    principal = Principal("svc", frozenset({"*"}), frozenset({Scope.READ}))
    with pytest.raises(PermissionDenied, match="'write'"):
        principal.require(Scope.WRITE, "abc")


def test_unknown_scope_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        parse_scopes("read,superpowers")


def test_client_secret_hash_verifies_only_the_same_secret() -> None:
    stored = hash_secret("s3cret")
    assert verify_secret("s3cret", stored)
    assert not verify_secret("s3cret!", stored)
    assert not verify_secret("s3cret", "garbage")


# --- audience, token ids, lifetimes ----------------------------------------------------------


def test_a_token_names_its_audience_and_another_deployment_refuses_it() -> None:
    token = codec().issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=60)
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == AUDIENCE
    # Same key, same issuer, another deployment: refused.
    with pytest.raises(Unauthenticated, match="invalid token"):
        codec(audience="urn:database-service:elsewhere").verify(token)


@pytest.mark.parametrize("missing", ["aud", "jti"])
def test_a_token_without_audience_or_id_is_refused(missing: str) -> None:
    now = int(time.time())
    claims = {
        "iss": "database-service", "aud": AUDIENCE, "sub": "trading", "iat": now,
        "exp": now + 60, "jti": "j1", "tenants": ["abc"], "scopes": ["read"],
    }  # fmt: skip
    del claims[missing]
    with pytest.raises(Unauthenticated):
        codec().verify(jwt.encode(claims, KEY, algorithm="HS256"))


def test_no_token_outlives_the_maximum_lifetime() -> None:
    limited = codec(max_ttl_seconds=3600)
    limited.issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=3600)
    with pytest.raises(ValueError, match="maximum"):
        limited.issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=3601)


def test_inspect_reads_an_expired_token_but_never_a_forged_one() -> None:
    token = codec().issue("trading", tenants=["abc"], scopes=[Scope.READ], ttl_seconds=-600)
    claims = codec().inspect(token)
    assert claims.service == "trading" and len(claims.token_id) == 32
    assert claims.expires_at.timestamp() < time.time()
    other = TokenCodec(b"o" * 32, issuer="database-service", audience=AUDIENCE)
    with pytest.raises(Unauthenticated):
        codec().inspect(other.issue("trading", tenants=["a"], scopes=[], ttl_seconds=60))


def test_unknown_services_are_checked_against_a_dummy_hash() -> None:
    assert not verify_secret_or_dummy("anything", None)
    stored = hash_secret("s3cret")
    assert verify_secret_or_dummy("s3cret", stored)
    assert not verify_secret_or_dummy("other", stored)


# --- the bootstrap administrator ---------------------------------------------------------------


def test_the_bootstrap_admin_grants_every_scope_but_uses_no_data_scope() -> None:
    boot = bootstrap_admin()
    assert boot.is_platform and boot.is_platform_with(Scope.ADMIN)
    assert boot.covers({"abc", "*"}, set(Scope))  # may create any service, mint any token
    boot.require(Scope.ADMIN, "abc")
    for scope in (Scope.READ, Scope.WRITE, Scope.INGEST):
        assert not boot.has_scope(scope)
        with pytest.raises(PermissionDenied, match="bootstrapping only"):
            boot.require(scope, "abc")


# --- rate limits ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_buckets_refill_at_their_rate_and_record_a_run_of_refusals_once() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [None, None, None]
    first = buckets.take("a")
    assert first is not None and first.record and first.retry_after == pytest.approx(0.5)
    later = [buckets.take("a") for _ in range(5)]
    assert all(r is not None and not r.record for r in later)  # within the second: not again
    assert buckets.take("b") is None  # another key has its own bucket
    clock.now += 1.0  # two tokens back
    assert buckets.take("a") is None and buckets.take("a") is None
    again = buckets.take("a")
    assert again is not None and again.record and again.unrecorded == 5


def test_token_buckets_are_bounded_in_memory() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=100, clock=Clock())
    for i in range(1000):
        buckets.take(f"k{i}")
    assert len(buckets) == 100


def test_the_exchange_gate_limits_sources_services_and_what_is_in_flight() -> None:
    clock = Clock()
    gate = ExchangeGate(
        ExchangeLimits(
            source_rate=1, source_burst=2, service_rate=1, service_burst=3, max_in_flight=1
        ),
        clock=clock,
    )
    for _ in range(2):
        with gate.admit("10.0.0.1", "svc"):
            pass
    with pytest.raises(RateLimited, match=r"from 10\.0\.0\.1") as info, gate.admit("10.0.0.1", "x"):
        pass
    assert info.value.error_code == "resource_exhausted" and info.value.retry_after_seconds == 1
    with gate.admit("10.0.0.2", "svc"):  # the third of svc's burst, from another source
        with pytest.raises(RateLimited, match="in flight"), gate.admit("10.0.0.3", "other"):
            pass
    with pytest.raises(RateLimited, match="service 'svc'"), gate.admit("10.0.0.4", "svc"):
        pass
    assert gate.in_flight == 0


# --- audit details -----------------------------------------------------------------------------

# Messages as PostgreSQL 18, asyncpg and the query core produce them, with the values they echo.
REAL_MESSAGES = [
    (
        "parameter $1 (int4): invalid literal for int() with base 10: 'hunter2'; got str 'hunter2'",
        "parameter $1 (int4): invalid literal for int() with base 10: '…'; got str …",
    ),
    (
        "parameter $2 (uuid): badly formed hexadecimal UUID string; got int 4111111111111111",
        "parameter $2 (uuid): badly formed hexadecimal UUID string; got int …",
    ),
    (
        "parameter $1 (jsonb): not JSON; got dict {'card': '4111111111111111'}",
        "parameter $1 (jsonb): not JSON; got dict …",
    ),
    ("row 3, column price (numeric): bad; got 'hunter2'", "row 3, column price (numeric): bad; got …"),
    (
        'invalid input syntax for type integer: "hunter2"',
        'invalid input syntax for type integer: "…"',
    ),
    ('invalid input syntax for type integer: "a"b"', 'invalid input syntax for type integer: "…"'),
    ('invalid input value for enum tier: "hunter2"', 'invalid input value for enum tier: "…"'),
    ('value "4111111111111111" is out of range for type integer', 'value "…" is out of range for type integer'),
    ('date/time field value out of range: "2024-13-45"', 'date/time field value out of range: "…"'),
    ('syntax error at or near "hunter2"', 'syntax error at or near "…"'),
    (
        "invalid input for query argument $1: 4111111111111111 (value out of int32 range)",
        "invalid input for query argument $1: … (value out of int32 range)",
    ),
    (
        "invalid input for query argument $1: 'hunter2' (invalid literal for int() with base 10:"
        " 'hunter2')",
        "invalid input for query argument $1: '…' (invalid literal for int() with base 10: '…')",
    ),
    ("invalid service name 'Hunter2 Corp'", "invalid service name '…'"),
    # Names of things, not values: kept.
    ('relation "users" does not exist', 'relation "users" does not exist'),
    (
        'null value in column "email" of relation "users" violates not-null constraint',
        'null value in column "email" of relation "users" violates not-null constraint',
    ),
    (
        'duplicate key value violates unique constraint "users_pkey"',
        'duplicate key value violates unique constraint "users_pkey"',
    ),
    (
        "service 'svc-a' lacks the 'write' scope for this operation",
        "service 'svc-a' lacks the 'write' scope for this operation",
    ),
    (
        "service 'svc-a' may not act for tenant 'acme'",
        "service 'svc-a' may not act for tenant 'acme'",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("message", "redacted"), REAL_MESSAGES)
def test_audit_details_keep_names_and_drop_values(message: str, redacted: str) -> None:
    event = AuditEvent(service="svc-a", tenant_id="acme", action="query", detail=message)
    assert event.detail == redacted
    assert "hunter2" not in (event.detail or "").lower() and "4111" not in (event.detail or "")
