"""What every REST route shares: the core, the caller, the tenant a request is for.

No ``from __future__ import annotations``: FastAPI resolves the ``Annotated`` dependency aliases
below from the route modules' globals.
"""

import datetime as dt
from typing import Annotated

from fastapi import Depends, Header, Request

from database_service.app import Application
from database_service.auth import Principal
from database_service.errors import InvalidRequest, Unauthenticated, Unavailable
from database_service.query import TenantContext
from database_service.tenancy import validate_tenant_id
from database_service.tls.peer import PeerCertificate, peer_from_pem

__all__ = [
    "Authenticated",
    "Core",
    "OptionalPrincipal",
    "TenantHeader",
    "acting_for",
    "aware",
    "get_core",
    "peer_certificate",
    "tenant_context",
]


def peer_certificate(request: Request) -> PeerCertificate | None:
    """The client certificate TLS verified against the client CA (the ASGI TLS extension,
    which ``TlsHttpProtocol`` fills in), or None."""
    chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain")
    return peer_from_pem(chain[0].encode()) if chain else None


async def get_core(request: Request) -> Application:
    """``async``: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per
    request for an attribute read."""
    core: Application = request.app.state.core
    return core


Core = Annotated[Application, Depends(get_core)]

# The tenant a request acts for, when its body does not say (``tenant_context``).
TenantHeader = Annotated[str | None, Header(alias="x-tenant-id")]


async def authenticated(
    request: Request, core: Core, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The caller, or 401 (audited): by its token, its client certificate (mutual TLS), or
    both (then naming the same service)."""
    try:
        principal = await core.authenticator.authenticate(authorization, peer_certificate(request))
    except Unauthenticated as exc:
        await core.access.denied(None, None, request.url.path, exc)
        raise
    request.state.service = principal.service
    return principal


Authenticated = Annotated[Principal, Depends(authenticated)]


async def optional_principal(
    request: Request, core: Core, authorization: Annotated[str | None, Header()] = None
) -> Principal | None:
    """The caller when it sent credentials (bad ones are refused), else None; None as well
    when PostgreSQL is down (the service directory lives there): answer what anyone may see."""
    if authorization is None and peer_certificate(request) is None:
        return None
    try:
        return await authenticated(request, core, authorization)
    except Unavailable:
        return None


OptionalPrincipal = Annotated[Principal | None, Depends(optional_principal)]


def acting_for(request: Request, principal: Principal, tenant_id: str) -> None:
    """Count this request in the tenant's figures, once the caller may act for it."""
    if principal.can_act_for(tenant_id):
        request.state.tenant_id = tenant_id


def tenant_context(
    request: Request,
    principal: Principal,
    tenant_id: str | None,
    user_id: str | None = None,
    *,
    header: str | None = None,
) -> TenantContext:
    """The tenant (and user) a request is for: the body's or the X-Tenant-Id header's, which
    must agree when both are given."""
    if tenant_id and header and tenant_id != header:
        raise InvalidRequest("tenant_id in the body and X-Tenant-Id header differ")
    chosen = tenant_id or header
    if chosen is None:
        raise InvalidRequest("tenant_id is required (body field or X-Tenant-Id header)")
    ctx = TenantContext(validate_tenant_id(chosen), user_id)
    acting_for(request, principal, ctx.tenant_id)
    return ctx


def aware(moment: dt.datetime) -> dt.datetime:
    """A time without an offset is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
