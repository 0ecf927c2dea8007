import jwt
import pytest

from database_service.auth import Principal, Scope, TokenCodec, parse_scopes
from database_service.auth.tokens import hash_secret, verify_secret
from database_service.errors import PermissionDenied, Unauthenticated

KEY = b"k" * 32


def codec() -> TokenCodec:
    return TokenCodec(KEY, issuer="database-service")


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
    other = TokenCodec(b"o" * 32, issuer="database-service")
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
    other = TokenCodec(KEY, issuer="someone-else")
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
