"""Signed service tokens (JWT, HS256, key derived from the master key) and client secrets."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import jwt

from database_service.auth.principal import ALL_TENANTS, Principal, Scope, parse_scopes
from database_service.errors import Unauthenticated

__all__ = ["TokenCodec", "hash_secret", "new_client_secret", "verify_secret"]

_ALGORITHM = "HS256"


class TokenCodec:
    def __init__(self, signing_key: bytes, *, issuer: str, leeway_seconds: int = 5) -> None:
        if len(signing_key) < 32:
            raise ValueError("token signing key must be at least 32 bytes")
        self._key = signing_key
        self._issuer = issuer
        self._leeway = leeway_seconds

    def issue(
        self,
        service: str,
        *,
        tenants: Iterable[str],
        scopes: Iterable[Scope],
        ttl_seconds: int,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": self._issuer,
            "sub": service,
            "iat": now,
            "exp": now + ttl_seconds,
            "jti": uuid.uuid4().hex,
            "tenants": sorted(set(tenants)),
            "scopes": sorted(s.value for s in set(scopes)),
        }
        return jwt.encode(claims, self._key, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "iss"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        tenants = claims.get("tenants")
        if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
            raise Unauthenticated("invalid token: 'tenants' must be a list of tenant ids")
        try:
            scopes = parse_scopes(claims.get("scopes", []))
        except ValueError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        return Principal(
            service=str(claims["sub"]),
            tenants=frozenset(tenants),
            scopes=scopes,
            token_id=claims.get("jti"),
            expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC),
        )


def new_client_secret() -> str:
    return secrets.token_urlsafe(32)


# scrypt parameters (RFC 7914 interactive level): the secret is random, so this mostly guards a
# leaked control-plane table against cheap brute force.
_N, _R, _P = 2**14, 8, 1


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_N, r=_R, p=_P)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    candidate = hashlib.scrypt(
        secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p)
    )
    return hmac.compare_digest(candidate, bytes.fromhex(digest))


def everything(service: str = "bootstrap-admin") -> Principal:
    """The bootstrap administrator (or the operator at the CLI): every tenant, every scope."""
    return Principal(service=service, tenants=frozenset({ALL_TENANTS}), scopes=frozenset(Scope))
