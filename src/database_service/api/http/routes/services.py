"""Service identities and tokens: register, list, client-credentials exchange, admin issue,
revoke."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from database_service.api.http.deps import Authenticated, Core
from database_service.api.http.schemas import (
    AdminTokenRequest,
    ServiceCreateRequest,
    TokenRequest,
    TokenResponse,
    TokenRevokeRequest,
    TokenRevokeResponse,
)
from database_service.auth import RateLimited
from database_service.errors import DatabaseServiceError

router = APIRouter(tags=["auth"])


@router.post("/api/v1/admin/services", status_code=201)
async def create_service(
    body: ServiceCreateRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Register a service identity; its client secret is returned once. A service gets only
    tenants and scopes its creator holds (``*`` only from the platform administrator)."""
    identity, secret = await core.service_admin.create(
        principal,
        body.service,
        tenants=body.tenants,
        scopes=body.scopes,
        with_secret=body.with_secret,
    )
    return {**identity.public_dict(), "secret": secret}


@router.get("/api/v1/admin/services")
async def list_services(core: Core, principal: Authenticated) -> dict[str, Any]:
    """Services whose tenants are all within the caller's (every service for the platform)."""
    return {"services": [s.public_dict() for s in await core.service_admin.list(principal)]}


@router.post("/api/v1/auth/token", response_model=TokenResponse)
async def token(body: TokenRequest, core: Core, request: Request) -> TokenResponse | Response:
    """Client-credentials exchange: a service's name and secret for a signed token. Rate-limited
    per client address and per service name: over a limit, 429 ``resource_exhausted`` with
    ``Retry-After``."""
    source = request.client.host if request.client else None
    try:
        issued = await core.service_admin.exchange(
            body.service, body.secret, body.ttl_seconds, source=source
        )
    except RateLimited as exc:
        # The error in the usual shape (the app's handler), plus when to come back.
        response: Response = await request.app.exception_handlers[DatabaseServiceError](
            request, exc
        )
        response.headers["Retry-After"] = str(exc.retry_after_seconds)
        return response
    return TokenResponse(
        access_token=issued.token, expires_in=issued.expires_in, token_id=issued.token_id
    )


@router.post("/api/v1/admin/tokens", response_model=TokenResponse)
async def admin_token(
    body: AdminTokenRequest, core: Core, principal: Authenticated
) -> TokenResponse:
    """Issue a token for a registered service (like ``database-service token issue``): only for
    a service whose tenants and scopes are within the caller's, and only with tenants and
    scopes both hold. Another tenant's service gets the same answer as one that does not
    exist."""
    issued = await core.service_admin.issue_token(
        principal,
        body.service,
        tenants=body.tenants,
        scopes=body.scopes,
        ttl_seconds=body.ttl_seconds,
    )
    return TokenResponse(
        access_token=issued.token, expires_in=issued.expires_in, token_id=issued.token_id
    )


@router.post("/api/v1/admin/tokens/revoke", response_model=TokenRevokeResponse)
async def revoke_token(
    body: TokenRevokeRequest, core: Core, principal: Authenticated
) -> dict[str, Any]:
    """Revoke one token (like ``database-service token revoke``): the token itself, or its
    service and id (``token_id``, the ``jti``). Only tokens of services the caller administers;
    every instance refuses the token within a few seconds (this one at once)."""
    revoked = await core.service_admin.revoke_token(
        principal, token=body.token, service=body.service, token_id=body.token_id
    )
    return revoked.public_dict()
