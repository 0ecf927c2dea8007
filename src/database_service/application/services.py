"""Service identities and their tokens.

A service gets only tenants and scopes its creator holds (``*`` only from the platform
administrator). A token can be minted only for a service whose tenants and scopes are within
the caller's, and carries only tenants and scopes both hold; for a caller who does not
administer every tenant of a service, that service does not exist (the same answer either way:
no roster of other tenants' services).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from database_service.application.access import Access
from database_service.auth import (
    ALL_TENANTS,
    Authenticator,
    Principal,
    Scope,
    ServiceDirectory,
    ServiceIdentity,
    TokenCodec,
    parse_scopes,
)
from database_service.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated
from database_service.tenancy import validate_tenant_id

__all__ = ["IssuedToken", "ServiceAdmin"]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    service: str


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
    ) -> None:
        self._access = access
        self._directory = directory
        self._codec = codec
        self._authenticator = authenticator
        self._default_ttl = default_ttl_seconds

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

    async def _administered(self, principal: Principal, name: str, action: str) -> ServiceIdentity:
        """The service, if the caller administers every tenant it holds; else 'no such service'."""
        await self._access.require(principal, Scope.ADMIN, action)
        identity = await self._directory.find(name)
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
        ttl = ttl_seconds or self._default_ttl
        token = self._codec.issue(identity.name, tenants=carried, scopes=granted, ttl_seconds=ttl)
        await self._access.done(principal, action, detail=identity.name)
        return IssuedToken(token, ttl, identity.name)

    async def exchange(self, service: str, secret: str, ttl_seconds: int | None) -> IssuedToken:
        """Client credentials: a service's name and secret for a token of everything it holds."""
        try:
            identity = await self._directory.check_secret(service, secret)
        except Unauthenticated as exc:
            await self._access.denied(None, None, "auth.token", exc)
            raise
        ttl = ttl_seconds or self._default_ttl
        token = self._codec.issue(
            identity.name, tenants=identity.tenants, scopes=identity.scopes, ttl_seconds=ttl
        )
        return IssuedToken(token, ttl, identity.name)
