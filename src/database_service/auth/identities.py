"""Service identities in the control plane, and the authenticator every front end calls.

A token is only as good as the identity behind it: the authenticator checks the signature,
issuer, audience and expiry, that the token was not revoked (by its ``jti``), then that the
service still exists and is active, and narrows the token's tenants and scopes to what the
identity holds now. Identities and the revocation list are cached for ``cache_ttl`` seconds, so
disabling or narrowing a service, or revoking one token, takes effect on every instance within
that bound. While PostgreSQL is unreachable, what was read within ``stale_if_unavailable``
seconds keeps answering (retried every second): nothing can be disabled or revoked meanwhile,
since both are writes to that PostgreSQL, and the requests that can still be served (the result
cache's stale fallback, key-value operations on Redis) would otherwise fail here.

The bootstrap admin token (``DBSVC_BOOTSTRAP_ADMIN_TOKEN``, else generated once into
``<data dir>/admin.token``) is meant for bootstrapping: it creates tenants and services and
mints their tokens, and is refused for tenant data and ingestion (``tokens.bootstrap_admin``).
To rotate it, put a new value (at least 24 characters) in the variable or the file and restart
every instance: the old value stops working as each one restarts.

Client secrets are checked with scrypt on a worker thread (``hash_threads``), never on the event
loop that serves every front end, and at the same cost whether the service exists or not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import asyncpg

from database_service.auth.principal import ALL_TENANTS, Principal, Scope
from database_service.auth.tokens import (
    TokenCodec,
    bootstrap_admin,
    hash_secret,
    new_client_secret,
    verify_secret_or_dummy,
    warm_dummy_hash,
)
from database_service.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    Unauthenticated,
    Unavailable,
    postgres_unavailable,
)
from database_service.tenancy.ids import quote_ident, validate_tenant_id
from database_service.tenancy.secrets import scram_sha256_verifier
from database_service.tls.peer import PeerCertificate

__all__ = ["Authenticator", "ServiceDirectory", "ServiceIdentity"]

log = logging.getLogger(__name__)

T = TypeVar("T")

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

    def __init__(self, pool: asyncpg.Pool, *, control_schema: str, hash_threads: int = 1) -> None:
        self._pool = pool
        self._table = f"{quote_ident(control_schema)}.services"
        self._revoked = f"{quote_ident(control_schema)}.revoked_tokens"
        self._deployment = f"{quote_ident(control_schema)}.deployment"
        self._certificates = f"{quote_ident(control_schema)}.service_certificates"
        self._revoked_certificates = f"{quote_ident(control_schema)}.revoked_certificates"
        # scrypt releases the GIL: hashing on these threads leaves the event loop free.
        self._hasher = concurrent.futures.ThreadPoolExecutor(
            hash_threads, thread_name_prefix="dbsvc-scrypt"
        )
        self._hasher.submit(warm_dummy_hash)  # the first unknown name costs no more than others

    def close(self) -> None:
        self._hasher.shutdown(wait=False, cancel_futures=True)

    async def _on_hasher(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._hasher, fn, *args)

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
        hashed = await self._on_hasher(hash_secret, secret) if secret else None
        # The PostgreSQL wire port's SCRAM-SHA-256 cannot use the scrypt hash: its verifier is
        # stored beside it (control migration 0014), made from the same secret.
        verifier = await self._on_hasher(scram_sha256_verifier, secret) if secret else None
        conflict = (
            " ON CONFLICT (service_name) DO UPDATE SET secret_hash = EXCLUDED.secret_hash,"
            " scram_verifier = EXCLUDED.scram_verifier, tenants = EXCLUDED.tenants,"
            " scopes = EXCLUDED.scopes, status = 'active'"
            if replace
            else ""
        )
        try:
            with postgres_unavailable("service directory"):
                row = await self._pool.fetchrow(
                    f"INSERT INTO {self._table}"
                    " (service_name, secret_hash, tenants, scopes, scram_verifier)"
                    f" VALUES ($1, $2, $3, $4, $5){conflict} RETURNING *",
                    name,
                    hashed,
                    tenant_list,
                    sorted(s.value for s in set(scopes)),
                    verifier,
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

    async def scram_verifier(self, name: str) -> tuple[ServiceIdentity, str | None] | None:
        """The service and its SCRAM-SHA-256 verifier (None: created before control migration
        0014, or token-only), for the PostgreSQL wire port; None when the service is unknown."""
        with postgres_unavailable("service directory"):
            row = await self._pool.fetchrow(
                f"SELECT * FROM {self._table} WHERE service_name = $1", name
            )
        return None if row is None else (self._identity(row), row["scram_verifier"])

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
        """The active service ``name`` if ``secret`` is its secret. One scrypt on a hashing
        thread whatever the outcome (against a dummy hash when the service is unknown or has no
        secret), and the same error for every failure: neither the answer nor the time it takes
        tells which services exist."""
        with postgres_unavailable("service directory"):
            row = await self._pool.fetchrow(
                f"SELECT * FROM {self._table} WHERE service_name = $1", name
            )
        stored = None if row is None else row["secret_hash"]
        matches = await self._on_hasher(verify_secret_or_dummy, secret, stored)
        if row is None or stored is None or row["status"] != "active" or not matches:
            raise Unauthenticated("unknown service or wrong secret")
        return self._identity(row)

    async def revoke(
        self, service: str, token_id: str, *, expires_at: datetime | None, revoked_by: str
    ) -> bool:
        """Record a revoked token (``expires_at``: when it expires anyway, None when unknown);
        False when it was revoked already. Revocations of long-expired tokens are purged."""
        with postgres_unavailable("service directory"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    f"DELETE FROM {self._revoked} WHERE expires_at < now() - interval '1 day'"
                )
                status = await conn.execute(
                    f"INSERT INTO {self._revoked} (service_name, jti, expires_at, revoked_by)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    service,
                    token_id,
                    expires_at,
                    revoked_by,
                )
        return status.endswith(" 1")

    async def revoked(self) -> frozenset[tuple[str, str]]:
        """(service, jti) of every revoked token that may still verify (expiry plus leeway)."""
        with postgres_unavailable("service directory"):
            rows = await self._pool.fetch(
                f"SELECT service_name, jti FROM {self._revoked}"
                " WHERE expires_at IS NULL OR expires_at > now() - interval '1 minute'"
            )
        return frozenset((r["service_name"], r["jti"]) for r in rows)

    async def bind_certificate(self, name: str, service: str, *, created_by: str) -> None:
        """Bind a client-certificate name (RFC 4514 subject, or "DNS:"/"URI:"/"EMAIL:" and a
        subject alternative name) to a service."""
        if not 3 <= len(name) <= 1000 or not name.isprintable():
            raise InvalidRequest("a certificate name is 3-1000 printable characters")
        try:
            with postgres_unavailable("service directory"):
                await self._pool.execute(
                    f"INSERT INTO {self._certificates} (name, service_name, created_by)"
                    " VALUES ($1, $2, $3)",
                    name,
                    service,
                    created_by,
                )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"certificate name {name!r} is bound already") from None
        except asyncpg.ForeignKeyViolationError:
            raise NotFound(f"service {service!r} does not exist") from None

    async def unbind_certificate(self, name: str) -> None:
        with postgres_unavailable("service directory"):
            result = await self._pool.execute(
                f"DELETE FROM {self._certificates} WHERE name = $1", name
            )
        if result.endswith(" 0"):
            raise NotFound(f"certificate name {name!r} is not bound")

    async def certificate_names(self) -> dict[str, str]:
        """Every bound certificate name and its service."""
        with postgres_unavailable("service directory"):
            rows = await self._pool.fetch(f"SELECT name, service_name FROM {self._certificates}")
        return {r["name"]: r["service_name"] for r in rows}

    async def revoke_certificate(self, fingerprint: str, *, revoked_by: str) -> bool:
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise InvalidRequest("a certificate fingerprint is 64 lower-case hex digits (SHA-256)")
        with postgres_unavailable("service directory"):
            status = await self._pool.execute(
                f"INSERT INTO {self._revoked_certificates} (fingerprint, revoked_by)"
                " VALUES ($1, $2) ON CONFLICT DO NOTHING",
                fingerprint,
                revoked_by,
            )
        return status.endswith(" 1")

    async def revoked_certificates(self) -> frozenset[str]:
        with postgres_unavailable("service directory"):
            rows = await self._pool.fetch(f"SELECT fingerprint FROM {self._revoked_certificates}")
        return frozenset(r["fingerprint"] for r in rows)

    async def deployment_id(self) -> str:
        """This deployment's id: drawn once when its control plane was created (control
        migration 0007), the same for every instance sharing it."""
        with postgres_unavailable("service directory"):
            value = await self._pool.fetchval(f"SELECT id::text FROM {self._deployment}")
        if value is None:
            raise RuntimeError(f"{self._deployment} is empty: control migration 0007 not applied")
        return str(value)


# (principal, the directory entry it was checked against, the revocation list, reusable until
# (monotonic), the token's expiry (epoch seconds)).
_Entry = tuple[float, "ServiceIdentity | None", float]
_Resolved = tuple[Principal, _Entry, frozenset[tuple[str, str]], float, float]


class Authenticator:
    """Turns a bearer token into a Principal, or raises Unauthenticated."""

    def __init__(
        self,
        codec: TokenCodec,
        directory: ServiceDirectory,
        *,
        bootstrap_admin_token: str,
        cache_ttl: float = 5.0,
        verified_tokens: int = 10_000,
        stale_if_unavailable: float = 300.0,
    ) -> None:
        self.codec = codec
        self.directory = directory
        self._admin_token = bootstrap_admin_token.encode()
        self._ttl = cache_ttl
        self._stale_if_unavailable = stale_if_unavailable
        # name -> (fresh until, identity, read at)
        self._cache: dict[str, tuple[float, ServiceIdentity | None, float]] = {}
        self._verified_tokens: OrderedDict[bytes, tuple[Principal, float]] = OrderedDict()
        self._verified_max = verified_tokens
        # The Principal each recent Authorization value resolved to, with what it was derived
        # from: the service's directory entry and the revocation list (the very objects) and
        # when either is due to be read again. Reused only while all of them still stand, so it
        # answers exactly what the checks below would (a change replaces those objects), without
        # hashing the token and building a Principal on every call. Bounded like the verified
        # tokens; never holds the bootstrap administrator (compared first, in constant time).
        self._principals: dict[str, _Resolved] = {}
        self._revoked: frozenset[tuple[str, str]] = frozenset()
        self._revoked_until = 0.0
        self._revoked_read_at: float | None = None
        self._revoked_lock = asyncio.Lock()
        self._certificate_names: dict[str, str] = {}
        self._revoked_fingerprints: frozenset[str] = frozenset()
        self._certificates_until = 0.0
        self._certificates_read_at: float | None = None

    def _may_stand_in(self, read_at: float | None, now: float) -> bool:
        """Whether what was read at ``read_at`` may answer while PostgreSQL is unreachable."""
        return read_at is not None and now - read_at <= self._stale_if_unavailable

    async def authenticate(
        self, authorization: str | None, peer: PeerCertificate | None = None
    ) -> Principal:
        """The caller, by its token, its verified client certificate (mutual TLS), or both —
        which must then name the same service."""
        if peer is None:
            return await self._by_token(authorization)
        service = await self._certificate_service(peer)
        if authorization is None:
            identity = await self._identity(service)
            if identity is None or not identity.active:
                raise Unauthenticated(f"service {service!r} is unknown or disabled")
            return identity.principal()
        principal = await self._by_token(authorization)
        if principal.service != service:
            raise Unauthenticated(
                f"the token is for service {principal.service!r} but the client certificate"
                f" ({peer.subject}) is bound to {service!r}"
            )
        return principal

    async def _certificate_service(self, peer: PeerCertificate) -> str:
        """The service a verified client certificate is bound to (as of at most ``cache_ttl``
        seconds ago, like revocations), or Unauthenticated."""
        if self._certificates_until <= time.monotonic():
            async with self._revoked_lock:
                now = time.monotonic()
                if self._certificates_until <= now:
                    try:
                        names = await self.directory.certificate_names()
                        revoked = await self.directory.revoked_certificates()
                    except Unavailable:
                        if not self._may_stand_in(self._certificates_read_at, now):
                            raise
                        self._certificates_until = now + min(self._ttl, 1.0)
                    else:
                        self._certificate_names, self._revoked_fingerprints = names, revoked
                        self._certificates_until = now + self._ttl
                        self._certificates_read_at = now
        if peer.fingerprint in self._revoked_fingerprints:
            raise Unauthenticated(
                f"client certificate {peer.fingerprint[:16]}… ({peer.subject}) has been revoked"
            )
        services = {self._certificate_names[n] for n in peer.names if n in self._certificate_names}
        if not services:
            raise Unauthenticated(f"client certificate ({peer.subject}) is bound to no service")
        if len(services) > 1:
            raise Unauthenticated(
                f"client certificate ({peer.subject}) is bound to several services:"
                f" {', '.join(sorted(services))}"
            )
        return services.pop()

    def certificates_changed(self) -> None:
        """A binding or a revocation made by this instance takes effect here at once."""
        self._certificates_until = 0.0

    def known(self, authorization: str) -> Principal | None:
        """The caller a bearer ``authorization`` was verified as, while that verification still
        holds — the checks ``authenticate`` makes of a token it verified before (its service's
        entry and the revocation list it was checked against are still the current ones, read
        within ``cache_ttl``; the token has not expired) — without awaiting anything. None:
        not verified here, or due to be checked again (``authenticate`` does it). Never the
        bootstrap admin token, which is not kept."""
        resolved = self._principals.get(authorization)
        if resolved is None:
            return None
        known, checked_entry, checked_list, until, expires = resolved
        if (
            time.monotonic() < until
            and self._revoked is checked_list
            and self._cache.get(known.service) is checked_entry
            and expires > time.time()
        ):
            return known
        return None

    async def _by_token(self, authorization: str | None) -> Principal:
        token = _bearer(authorization)
        if hmac.compare_digest(token.encode(), self._admin_token):
            return bootstrap_admin()
        assert authorization is not None  # _bearer refused None
        known = self.known(authorization)
        if known is not None:
            return known
        try:
            principal, claimed, revocations = await self._verify(token)
        except Unauthenticated:
            self._principals.pop(authorization, None)  # refused now: nothing kept for it
            raise
        # Verified again, unchanged: the same object, which is how QueryExecutor.replay knows
        # it. The one kept now, read after the checks awaited: calls that found the token due
        # at once all end with one object (taken out before them, each made one of its own,
        # and every replay kept for the caller was dropped when next asked: 2026-12-05).
        current = self._principals.get(authorization)
        if current is not None and current[0] == principal:
            principal = current[0]
        entry = self._cache.get(claimed.service)  # the entry just checked
        if entry is not None and claimed.expires_at is not None:
            fresh = self._principals.pop(authorization, None) is None
            if fresh and len(self._principals) >= self._verified_max:
                del self._principals[next(iter(self._principals))]  # the oldest
            self._principals[authorization] = (
                principal,
                entry,
                revocations,
                min(entry[0], self._revoked_until),
                claimed.expires_at.timestamp(),
            )
        return principal

    async def _verify(self, token: str) -> tuple[Principal, Principal, frozenset[tuple[str, str]]]:
        """The principal ``token`` stands for now (its signature checked once, revocation and
        its service's entry within ``cache_ttl``), the token's claims, and the revocation list
        it was checked against; Unauthenticated when refused."""
        claimed = self._verified(token)
        if claimed.token_id is None:
            raise Unauthenticated("token has been revoked")
        # Within cache_ttl of the last reads, answered here without awaiting (the same checks
        # as is_revoked and _identity: their coroutines only when a read is due).
        now = time.monotonic()
        if self._revoked_until > now:
            revoked = (claimed.service, claimed.token_id) in self._revoked
        else:
            revoked = await self.is_revoked(claimed.service, claimed.token_id)
        if revoked:
            raise Unauthenticated("token has been revoked")
        revocations = self._revoked  # the list just checked (nothing awaited since)
        cached = self._cache.get(claimed.service)
        if cached is not None and cached[0] > now:
            identity: ServiceIdentity | None = cached[1]
        else:
            identity = await self._identity(claimed.service)
        if identity is None or not identity.active:
            raise Unauthenticated(f"service {claimed.service!r} is unknown or disabled")
        if ALL_TENANTS in identity.tenants:
            tenants = claimed.tenants
        elif ALL_TENANTS in claimed.tenants:
            tenants = identity.tenants
        else:
            tenants = claimed.tenants & identity.tenants
        principal = Principal(
            service=claimed.service,
            tenants=tenants,
            scopes=claimed.scopes & identity.scopes,
            token_id=claimed.token_id,
            expires_at=claimed.expires_at,
        )
        return principal, claimed, revocations

    def _verified(self, token: str) -> Principal:
        """The token's claims, its signature checked once: kept by the token's digest until
        the token expires (a bounded LRU). Only the signature check is saved: revocation and
        the service being disabled are checked on every call (each within ``cache_ttl``)."""
        digest = hashlib.sha256(token.encode()).digest()
        kept = self._verified_tokens.get(digest)
        if kept is not None:
            claimed, until = kept
            if until > time.time():
                self._verified_tokens.move_to_end(digest)
                return claimed
            del self._verified_tokens[digest]
        claimed = self.codec.verify(token)  # raises Unauthenticated
        if claimed.expires_at is not None:
            self._verified_tokens[digest] = (claimed, claimed.expires_at.timestamp())
            if len(self._verified_tokens) > self._verified_max:
                self._verified_tokens.popitem(last=False)
        return claimed

    async def _identity(self, name: str) -> ServiceIdentity | None:
        now = time.monotonic()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            identity = await self.directory.find(name)
        except Unavailable:
            if cached is None or not self._may_stand_in(cached[2], now):
                raise
            self._cache[name] = (now + min(self._ttl, 1.0), cached[1], cached[2])
            return cached[1]
        self._cache[name] = (now + self._ttl, identity, now)
        return identity

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    async def is_revoked(self, service: str, token_id: str) -> bool:
        """Whether the token was revoked, as of at most ``cache_ttl`` seconds ago (one read of
        the whole list per period, shared by every request). An unreachable PostgreSQL is
        ``Unavailable``, never "not revoked", unless a list read within
        ``stale_if_unavailable`` can answer: nothing can be revoked while it is unreachable."""
        if self._revoked_until <= time.monotonic():
            async with self._revoked_lock:
                now = time.monotonic()
                if self._revoked_until <= now:
                    try:
                        revoked = await self.directory.revoked()
                    except Unavailable:
                        if not self._may_stand_in(self._revoked_read_at, now):
                            raise  # never "not revoked" on a list never read
                        self._revoked_until = now + min(self._ttl, 1.0)
                    else:
                        self._revoked = revoked
                        self._revoked_until = now + self._ttl
                        self._revoked_read_at = now
        return (service, token_id) in self._revoked

    def revoked_here(self, service: str, token_id: str) -> None:
        """A revocation made by this instance takes effect here at once."""
        self._revoked = self._revoked | {(service, token_id)}


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed Authorization header: expected 'Bearer <token>'")
    return token.strip()
