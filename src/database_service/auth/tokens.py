"""Signed service tokens (JWT, HS256, key derived from the master key) and client secrets.

A token names its issuer and its audience (the deployment it is for, so that deployments sharing
a key and an issuer still refuse each other's tokens), its service, tenants and scopes, an id
(``jti``, by which it can be revoked) and an expiry no later than the maximum lifetime allows.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt

from database_service.auth.principal import ALL_TENANTS, Principal, Scope, parse_scopes
from database_service.errors import Unauthenticated

__all__ = [
    "BOOTSTRAP_SERVICE",
    "TokenClaims",
    "TokenCodec",
    "bootstrap_admin",
    "deployment_audience",
    "everything",
    "hash_secret",
    "new_client_secret",
    "verify_secret",
    "verify_secret_or_dummy",
]

_ALGORITHM = "HS256"
_REQUIRED = ["exp", "iat", "sub", "iss", "aud", "jti"]


def deployment_audience(deployment_id: str) -> str:
    """The default audience: the deployment's id (control plane, created with it)."""
    return f"urn:database-service:{deployment_id}"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What identifies a token (to revoke it): its service, id and expiry."""

    service: str
    token_id: str
    expires_at: datetime


class TokenCodec:
    def __init__(
        self,
        signing_key: bytes,
        *,
        issuer: str,
        audience: str,
        max_ttl_seconds: int | None = None,
        leeway_seconds: int = 5,
    ) -> None:
        if len(signing_key) < 32:
            raise ValueError("token signing key must be at least 32 bytes")
        if not audience:
            raise ValueError("a token audience is required")
        self._key = signing_key
        self._issuer = issuer
        self._audience = audience
        self.max_ttl_seconds = max_ttl_seconds
        self._leeway = leeway_seconds

    @property
    def audience(self) -> str:
        return self._audience

    def issue(
        self,
        service: str,
        *,
        tenants: Iterable[str],
        scopes: Iterable[Scope],
        ttl_seconds: int,
    ) -> str:
        if self.max_ttl_seconds is not None and ttl_seconds > self.max_ttl_seconds:
            # The use cases refuse this with a clear error first; this is the last guard.
            raise ValueError(
                f"token lifetime {ttl_seconds} s exceeds the maximum of {self.max_ttl_seconds} s"
            )
        now = int(time.time())
        claims = {
            "iss": self._issuer,
            "aud": self._audience,
            "sub": service,
            "iat": now,
            "exp": now + ttl_seconds,
            "jti": uuid.uuid4().hex,
            "tenants": sorted(set(tenants)),
            "scopes": sorted(s.value for s in set(scopes)),
        }
        return jwt.encode(claims, self._key, algorithm=_ALGORITHM)

    def _decode(self, token: str, *, verify_exp: bool = True) -> dict[str, object]:
        try:
            claims: dict[str, object] = jwt.decode(
                token,
                self._key,
                algorithms=[_ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": _REQUIRED, "verify_exp": verify_exp},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        if not isinstance(claims.get("jti"), str) or not claims["jti"]:
            raise Unauthenticated("invalid token: 'jti' must be a non-empty string")
        return claims

    def inspect(self, token: str) -> TokenClaims:
        """A token of ours (signature, issuer and audience checked), expired or not."""
        claims = self._decode(token, verify_exp=False)
        return TokenClaims(
            service=str(claims["sub"]),
            token_id=str(claims["jti"]),
            expires_at=_expiry(claims),
        )

    def verify(self, token: str) -> Principal:
        claims = self._decode(token)
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
            token_id=str(claims["jti"]),
            expires_at=_expiry(claims),
        )


def _expiry(claims: dict[str, object]) -> datetime:
    exp = claims["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthenticated("invalid token: 'exp' must be a number")
    return datetime.fromtimestamp(int(exp), UTC)


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


@functools.cache
def _dummy_hash() -> str:
    """A hash of nothing anyone knows, with the parameters of real ones."""
    return hash_secret(secrets.token_urlsafe(32))


def warm_dummy_hash() -> None:
    _dummy_hash()


def verify_secret_or_dummy(secret: str, stored: str | None) -> bool:
    """``verify_secret``, at the same cost when there is nothing to verify against (an unknown
    service, one without a secret): the time taken does not tell which services exist."""
    if stored is None:
        verify_secret(secret, _dummy_hash())
        return False
    return verify_secret(secret, stored)


BOOTSTRAP_SERVICE = "bootstrap-admin"


def bootstrap_admin() -> Principal:
    """The bootstrap admin token's principal, meant for bootstrapping only: it administers every
    tenant (create, suspend, migrate, delete), creates services and mints their tokens with any
    scope, and reads health, metrics and the audit trail; it holds no data scope itself, so it
    never queries a tenant's data or ingests (``Principal.grants``)."""
    return Principal(
        service=BOOTSTRAP_SERVICE,
        tenants=frozenset({ALL_TENANTS}),
        scopes=frozenset({Scope.ADMIN, Scope.METRICS}),
        grants=frozenset(Scope),
    )


def everything(service: str = BOOTSTRAP_SERVICE) -> Principal:
    """Every tenant, every scope: the operator at the CLI (who holds the data directory and the
    master key anyway). The bootstrap admin token is ``bootstrap_admin``, not this."""
    return Principal(service=service, tenants=frozenset({ALL_TENANTS}), scopes=frozenset(Scope))
