"""Service identities and their tokens.

A service gets only tenants and scopes its creator holds (``*`` only from the platform
administrator; the bootstrap administrator may grant every scope without holding the data
scopes itself). A token can be minted only for a service whose tenants and scopes are within
the caller's, and carries only tenants and scopes both hold; for a caller who does not
administer every tenant of a service, that service does not exist (the same answer either way:
no roster of other tenants' services). The same holds for revoking one.

Every token lives at most ``max_ttl_seconds`` (``DBSVC_TOKEN_MAX_TTL_SECONDS``), however it is
issued. Tokens issued and exchanged are audited with their id (``jti``), by which they can be
revoked. The client-credentials exchange is rate-limited per client address and per service
name (``auth.ExchangeGate``), and its scrypt runs on a hashing thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from database_service.application.access import Access
from database_service.auth import (
    ALL_TENANTS,
    Authenticator,
    ExchangeGate,
    ExchangeLimits,
    Principal,
    RateLimited,
    Scope,
    ServiceDirectory,
    ServiceIdentity,
    TokenCodec,
    parse_scopes,
)
from database_service.auth.identities import validate_service_name
from database_service.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated
from database_service.tenancy import validate_tenant_id

__all__ = ["IssuedToken", "RevokedToken", "ServiceAdmin"]

# Longer names are no service's (auth.identities); rate-limit keys are cut to this.
_MAX_NAME = 64
_MAX_TOKEN_ID = 200


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    service: str
    token_id: str = ""


@dataclass(frozen=True, slots=True)
class RevokedToken:
    service: str
    token_id: str
    expires_at: datetime | None  # None: revoked by id, its expiry unknown
    already_revoked: bool

    def public_dict(self) -> dict[str, object]:
        return {
            "service": self.service,
            "token_id": self.token_id,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked": True,
            "already_revoked": self.already_revoked,
        }


def _scopes(values: Iterable[str] | str) -> frozenset[Scope]:
    try:
        return parse_scopes(list(values) if not isinstance(values, str) else values)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


class ServiceAdmin:
    def __init__(
        self,
        access: Access,
        directory: ServiceDirectory,
        codec: TokenCodec,
        authenticator: Authenticator,
        *,
        default_ttl_seconds: int,
        max_ttl_seconds: int,
        exchange_limits: ExchangeLimits | None = None,
    ) -> None:
        self._access = access
        self._directory = directory
        self._codec = codec
        self._authenticator = authenticator
        self.max_ttl_seconds = max_ttl_seconds
        self.default_ttl_seconds = min(default_ttl_seconds, max_ttl_seconds)
        self._gate = ExchangeGate(exchange_limits or ExchangeLimits())

    def _lifetime(self, requested: int | None) -> tuple[int, InvalidRequest | None]:
        """The lifetime of a new token, or why ``requested`` is refused."""
        if requested is None:
            return self.default_ttl_seconds, None
        if requested < 1:
            return requested, InvalidRequest(f"a token lifetime must be positive: {requested}")
        if requested > self.max_ttl_seconds:
            return requested, InvalidRequest(
                f"a token lifetime of {requested} s exceeds the maximum of"
                f" {self.max_ttl_seconds} s (DBSVC_TOKEN_MAX_TTL_SECONDS); issue a shorter-lived"
                " token and renew it (client credentials), or revoke it when done"
            )
        return requested, None

    def _issue(
        self, service: str, tenants: Iterable[str], scopes: Iterable[Scope], ttl: int
    ) -> IssuedToken:
        token = self._codec.issue(service, tenants=tenants, scopes=scopes, ttl_seconds=ttl)
        return IssuedToken(token, ttl, service, self._codec.inspect(token).token_id)

    async def create(
        self,
        principal: Principal,
        name: str,
        *,
        tenants: Iterable[str],
        scopes: Iterable[str] | str,
        with_secret: bool = True,
    ) -> tuple[ServiceIdentity, str | None]:
        """Register a service identity; its client secret (if any) is returned once."""
        action = "service.create"
        await self._access.require(principal, Scope.ADMIN, action)
        tenant_list = list(tenants)
        granted = _scopes(scopes)
        if not principal.covers(tenant_list, granted):
            await self._access.deny(
                principal,
                None,
                action,
                PermissionDenied("a service can be granted only tenants and scopes you hold"),
            )
        identity, secret = await self._directory.register(
            name, tenants=tenant_list, scopes=granted, with_secret=with_secret
        )
        await self._access.done(principal, action, detail=name)
        return identity, secret

    async def list(self, principal: Principal) -> list[ServiceIdentity]:
        """Services whose tenants are all within the caller's (every one for the platform)."""
        await self._access.require(principal, Scope.ADMIN, "service.list")
        return [s for s in await self._directory.list() if principal.covers(s.tenants)]

    async def set_active(self, principal: Principal, name: str, active: bool) -> None:
        action = "service.enable" if active else "service.disable"
        await self._administered(principal, name, action)
        await self._directory.set_active(name, active)
        self._authenticator.forget(name)
        await self._access.done(principal, action, detail=name)

    async def bind_certificate(self, principal: Principal, service: str, name: str) -> None:
        """Let client certificates carrying ``name`` (their RFC 4514 subject, or "DNS:",
        "URI:", "EMAIL:" and a subject alternative name) act as ``service`` (mutual TLS).

        Platform administrators only: a certificate is proof the CA gives, and whoever binds
        names decides what that proof is worth for every tenant the service holds."""
        action = "service.certificate.bind"
        await self._access.require_platform(principal, action)
        await self._administered(principal, service, action)
        await self._directory.bind_certificate(name, service, created_by=principal.service)
        self._authenticator.certificates_changed()
        await self._access.done(principal, action, detail=f"{service}: {name}")

    async def unbind_certificate(self, principal: Principal, name: str) -> None:
        action = "service.certificate.unbind"
        await self._access.require_platform(principal, action)
        await self._directory.unbind_certificate(name)
        self._authenticator.certificates_changed()
        await self._access.done(principal, action, detail=name)

    async def certificates(self, principal: Principal) -> dict[str, str]:
        await self._access.require_platform(principal, "service.certificate.list")
        return await self._directory.certificate_names()

    async def revoke_certificate(self, principal: Principal, fingerprint: str) -> bool:
        """Refuse one certificate (by its SHA-256 fingerprint) whatever it names."""
        action = "service.certificate.revoke"
        await self._access.require_platform(principal, action)
        revoked = await self._directory.revoke_certificate(
            fingerprint.lower().replace(":", ""), revoked_by=principal.service
        )
        self._authenticator.certificates_changed()
        await self._access.done(principal, action, detail=fingerprint)
        return revoked

    async def _administered(self, principal: Principal, name: str, action: str) -> ServiceIdentity:
        """The service, if the caller administers every tenant it holds; else 'no such service'."""
        await self._access.require(principal, Scope.ADMIN, action)
        try:
            # A name no service can have (NUL, a lone surrogate: text PostgreSQL cannot take)
            # is looked up nowhere; it answers as a service that does not exist.
            identity = await self._directory.find(validate_service_name(name))
        except InvalidRequest:
            identity = None
        if identity is None or not principal.covers(identity.tenants):
            await self._access.deny(
                principal, None, action, NotFound(f"service {name!r} does not exist")
            )
        return identity

    async def issue_token(
        self,
        principal: Principal,
        service: str,
        *,
        tenants: Iterable[str] | None = None,
        scopes: Iterable[str] | str | None = None,
        ttl_seconds: int | None = None,
    ) -> IssuedToken:
        """A token for a registered service (``database-service token issue``)."""
        action = "token.issue"
        identity = await self._administered(principal, service, action)
        if not principal.covers(identity.tenants, identity.scopes):
            await self._access.deny(
                principal,
                None,
                action,
                PermissionDenied(
                    f"service {identity.name!r} holds scopes you do not hold: only the platform"
                    " administrator can issue its tokens"
                ),
            )
        granted = _scopes(scopes) if scopes is not None else identity.scopes
        carried = frozenset(tenants) if tenants is not None else identity.tenants
        if not carried:
            raise InvalidRequest("a token needs at least one tenant")
        for tenant_id in carried - {ALL_TENANTS}:
            validate_tenant_id(tenant_id)
        if not (
            principal.covers(carried, granted) and identity.principal().covers(carried, granted)
        ):
            await self._access.deny(
                principal,
                None,
                action,
                PermissionDenied(
                    "a token can carry only tenants and scopes both you and the service hold"
                ),
            )
        ttl, refused = self._lifetime(ttl_seconds)
        if refused is not None:
            await self._access.deny(principal, None, action, refused)
        issued = self._issue(identity.name, carried, granted, ttl)
        await self._access.done(
            principal, action, detail=f"{identity.name} jti={issued.token_id} ttl={ttl}"
        )
        return issued

    async def exchange(
        self, service: str, secret: str, ttl_seconds: int | None, *, source: str | None = None
    ) -> IssuedToken:
        """Client credentials: a service's name and secret for a token of everything it holds.

        ``source`` is the client's address (each front end passes what it knows). Over the
        rate limits of that address or of that service name, or with too many exchanges in
        flight: ``RateLimited`` (429, retry after ``retry_after``). Unknown services cost and
        answer exactly what a wrong secret does."""
        action = "auth.token"
        try:
            with self._gate.admit(source, service[:_MAX_NAME]):
                ttl, refused = self._lifetime(ttl_seconds)
                if refused is not None:
                    raise refused
                identity = await self._directory.check_secret(service, secret)
        except RateLimited as exc:
            if exc.record:
                await self._access.denied(None, None, action, _with_unrecorded(exc))
            raise
        except (Unauthenticated, InvalidRequest) as exc:
            await self._access.denied(None, None, action, exc)
            raise
        issued = self._issue(identity.name, identity.tenants, identity.scopes, ttl)
        await self._access.done(
            identity.principal(), action, detail=f"{identity.name} jti={issued.token_id} ttl={ttl}"
        )
        return issued

    async def revoke_token(
        self,
        principal: Principal,
        *,
        token: str | None = None,
        service: str | None = None,
        token_id: str | None = None,
    ) -> RevokedToken:
        """Revoke one token: given whole (one of this deployment's, expired or not: its service,
        id and expiry are read from it), or by its service and id (``jti``, as the audit log
        and the token responses show it). Only tokens of services the caller administers; for
        another tenant's service the answer is the one for a service that does not exist.
        Every instance refuses the token within its authenticator's cache period (this one at
        once); the revocation is kept until the token expires anyway."""
        action = "token.revoke"
        await self._access.require(principal, Scope.ADMIN, action)
        expires_at: datetime | None = None
        if token is not None:
            if service is not None or token_id is not None:
                raise InvalidRequest("give the token, or its service and token id, not both")
            try:
                claims = self._codec.inspect(token.strip())
            except Unauthenticated as exc:
                raise InvalidRequest(f"not a token of this deployment: {exc.message}") from None
            service, token_id, expires_at = claims.service, claims.token_id, claims.expires_at
        elif service is None or token_id is None:
            raise InvalidRequest("give the token, or its service and token id")
        if not 1 <= len(token_id) <= _MAX_TOKEN_ID:
            raise InvalidRequest(f"a token id has 1 to {_MAX_TOKEN_ID} characters")
        await self._administered(principal, service, action)
        fresh = await self._directory.revoke(
            service, token_id, expires_at=expires_at, revoked_by=principal.service
        )
        self._authenticator.revoked_here(service, token_id)
        await self._access.done(principal, action, detail=f"{service} jti={token_id}")
        return RevokedToken(service, token_id, expires_at, already_revoked=not fresh)


def _with_unrecorded(exc: RateLimited) -> RateLimited:
    """The refusal as audited: with the refusals of its run that were not."""
    if not exc.unrecorded:
        return exc
    return RateLimited(
        f"{exc.message} ({exc.unrecorded} more refused since the last record)",
        retry_after=exc.retry_after,
    )
