"""Service identities in the control plane, and the authenticator every front end calls.

A token is only as good as the identity behind it: the authenticator checks the signature and
expiry, then that the service still exists and is active, and narrows the token's tenants and
scopes to what the identity holds now (so disabling or narrowing a service takes effect within
``cache_ttl`` seconds, without a token revocation list).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from database_service.auth.principal import ALL_TENANTS, Principal, Scope
from database_service.auth.tokens import (
    TokenCodec,
    everything,
    hash_secret,
    new_client_secret,
    verify_secret,
)
from database_service.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    postgres_unavailable,
)
from database_service.tenancy.ids import quote_ident, validate_tenant_id

__all__ = ["Authenticator", "ServiceDirectory", "ServiceIdentity"]

log = logging.getLogger(__name__)

_SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{1,62}$")


@dataclass(frozen=True, slots=True)
class ServiceIdentity:
    name: str
    tenants: frozenset[str]
    scopes: frozenset[Scope]
    active: bool
    has_secret: bool

    def principal(self) -> Principal:
        """What a token of this service can at most be (to test a token's claims against)."""
        return Principal(service=self.name, tenants=self.tenants, scopes=self.scopes)

    def public_dict(self) -> dict[str, object]:
        return {
            "service": self.name,
            "tenants": sorted(self.tenants),
            "scopes": sorted(s.value for s in self.scopes),
            "status": "active" if self.active else "disabled",
        }


def validate_service_name(name: object) -> str:
    if not isinstance(name, str) or not _SERVICE_NAME.fullmatch(name):
        raise InvalidRequest(
            f"invalid service name {str(name)[:60]!r}: 2-63 characters, a lower-case letter "
            "first, then lower-case letters, digits, '_', '.' or '-'"
        )
    return name


class ServiceDirectory:
    """Service identities in the control plane, read and written through the owner's pool; an
    unreachable PostgreSQL is ``Unavailable`` (503), never a failed authentication."""

    def __init__(self, pool: asyncpg.Pool, *, control_schema: str) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.services"

    @staticmethod
    def _identity(row: asyncpg.Record) -> ServiceIdentity:
        return ServiceIdentity(
            name=row["service_name"],
            tenants=frozenset(row["tenants"]),
            scopes=frozenset(Scope(s) for s in row["scopes"]),
            active=row["status"] == "active",
            has_secret=row["secret_hash"] is not None,
        )

    async def register(
        self,
        name: str,
        *,
        tenants: Iterable[str],
        scopes: Iterable[Scope],
        with_secret: bool = True,
        replace: bool = False,
    ) -> tuple[ServiceIdentity, str | None]:
        """Create (or with ``replace`` redefine) a service; returns its new client secret once."""
        validate_service_name(name)
        tenant_list = sorted(set(tenants))
        for tenant in tenant_list:
            if tenant != ALL_TENANTS:
                validate_tenant_id(tenant)
        if not tenant_list:
            raise InvalidRequest("a service needs at least one tenant (or '*')")
        secret = new_client_secret() if with_secret else None
        hashed = hash_secret(secret) if secret else None
        conflict = (
            " ON CONFLICT (service_name) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,"
            " tenants = EXCLUDED.tenants, scopes = EXCLUDED.scopes, status = 'active'"
            if replace
            else ""
        )
        try:
            with postgres_unavailable("service directory"):
                row = await self._pool.fetchrow(
                    f"INSERT INTO {self._table} (service_name, secret_hash, tenants, scopes)"
                    f" VALUES ($1, $2, $3, $4){conflict} RETURNING *",
                    name,
                    hashed,
                    tenant_list,
                    sorted(s.value for s in set(scopes)),
                )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"service {name!r} already exists") from None
        assert row is not None
        return self._identity(row), secret

    async def find(self, name: str) -> ServiceIdentity | None:
        with postgres_unavailable("service directory"):
            row = await self._pool.fetchrow(
                f"SELECT * FROM {self._table} WHERE service_name = $1", name
            )
        return None if row is None else self._identity(row)

    async def list(self) -> list[ServiceIdentity]:
        with postgres_unavailable("service directory"):
            rows = await self._pool.fetch(f"SELECT * FROM {self._table} ORDER BY service_name")
        return [self._identity(r) for r in rows]

    async def set_active(self, name: str, active: bool) -> None:
        status = "active" if active else "disabled"
        with postgres_unavailable("service directory"):
            result = await self._pool.execute(
                f"UPDATE {self._table} SET status = $2 WHERE service_name = $1", name, status
            )
        if result.endswith(" 0"):
            raise NotFound(f"service {name!r} does not exist")

    async def check_secret(self, name: str, secret: str) -> ServiceIdentity:
        with postgres_unavailable("service directory"):
            row = await self._pool.fetchrow(
                f"SELECT * FROM {self._table} WHERE service_name = $1", name
            )
        # Same message for every failure, so the endpoint does not tell which services exist.
        if (
            row is None
            or row["secret_hash"] is None
            or row["status"] != "active"
            or not verify_secret(secret, row["secret_hash"])
        ):
            raise Unauthenticated("unknown service or wrong secret")
        return self._identity(row)


class Authenticator:
    """Turns a bearer token into a Principal, or raises Unauthenticated."""

    def __init__(
        self,
        codec: TokenCodec,
        directory: ServiceDirectory,
        *,
        bootstrap_admin_token: str,
        cache_ttl: float = 5.0,
    ) -> None:
        self.codec = codec
        self.directory = directory
        self._admin_token = bootstrap_admin_token.encode()
        self._ttl = cache_ttl
        self._cache: dict[str, tuple[float, ServiceIdentity | None]] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        token = _bearer(authorization)
        if hmac.compare_digest(token.encode(), self._admin_token):
            return everything()
        claimed = self.codec.verify(token)
        identity = await self._identity(claimed.service)
        if identity is None or not identity.active:
            raise Unauthenticated(f"service {claimed.service!r} is unknown or disabled")
        if ALL_TENANTS in identity.tenants:
            tenants = claimed.tenants
        elif ALL_TENANTS in claimed.tenants:
            tenants = identity.tenants
        else:
            tenants = claimed.tenants & identity.tenants
        return Principal(
            service=claimed.service,
            tenants=tenants,
            scopes=claimed.scopes & identity.scopes,
            token_id=claimed.token_id,
            expires_at=claimed.expires_at,
        )

    async def _identity(self, name: str) -> ServiceIdentity | None:
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        identity = await self.directory.find(name)
        self._cache[name] = (now + self._ttl, identity)
        return identity

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()
