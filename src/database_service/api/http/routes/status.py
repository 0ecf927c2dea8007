"""The operators' status page (``/status``): server-rendered HTML that refreshes itself, no
assets from anywhere else, for platform principals holding ``metrics`` or ``admin``.

A browser signs in with a link (``auth.status_links`` says why not with a token): ``POST
/api/v1/status/link`` (or ``database-service status-link``) gives one, ``/status/login`` turns
it into a session cookie. A bearer credential works too (curl, scripts)."""

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Header, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from database_service.api.http.deps import Authenticated, Core, peer_certificate
from database_service.auth import Principal, Scope
from database_service.auth.status_links import LINK_SECONDS, SESSION_SECONDS
from database_service.errors import PermissionDenied, Unauthenticated
from database_service.observability.status_page import render_fragment, render_page

router = APIRouter(tags=["status"])

COOKIE = "dbsvc_status"


def _headers(nonce: str = "") -> dict[str, str]:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {script}; style-src {script};"
            " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        ),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


async def _viewer(
    request: Request, core: Core, authorization: str | None, cookie: str | None
) -> Principal:
    """The session cookie's principal, else the bearer credential's (audited refusals)."""
    if cookie is not None:
        principal = core.status_links.principal(cookie)
        if principal is not None:
            return principal
    if authorization is None and peer_certificate(request) is None:
        exc = Unauthenticated("sign in with a link from `database-service status-link`")
        await core.access.denied(None, None, request.url.path, exc)
        raise exc
    return await core.authenticator.authenticate(authorization, peer_certificate(request))


@router.post("/api/v1/status/link")
async def status_link(core: Core, principal: Authenticated) -> dict[str, Any]:
    """A sign-in link for the status page, valid for a couple of minutes."""
    await core.access.require_platform(principal, "status.link", Scope.METRICS, Scope.ADMIN)
    code = core.status_links.link_code(principal)
    await core.access.done(principal, "status.link")
    return {"path": f"/status/login?code={code}", "expires_in_seconds": LINK_SECONDS}


@router.get("/status/login", include_in_schema=False)
async def status_login(request: Request, core: Core, code: str = "") -> Response:
    session = core.status_links.session_from_link(code)
    if session is None:
        return HTMLResponse(
            "<!doctype html><title>Sign-in link</title><p>This sign-in link is not valid or has"
            " expired: ask for a new one (<code>database-service status-link</code>).</p>",
            status_code=401,
            headers=_headers(),
        )
    response = RedirectResponse("/status", status_code=303, headers=_headers())
    response.set_cookie(
        COOKIE,
        session,
        max_age=SESSION_SECONDS,
        path="/status",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/status", include_in_schema=False)
async def status_page(
    request: Request,
    core: Core,
    authorization: Annotated[str | None, Header()] = None,
    dbsvc_status: Annotated[str | None, Cookie()] = None,
) -> HTMLResponse:
    try:
        principal = await _viewer(request, core, authorization, dbsvc_status)
        data = await core.observability.status(principal)
    except (Unauthenticated, PermissionDenied) as exc:
        return HTMLResponse(
            f"<!doctype html><title>Status</title><p>{exc.code}: sign in with a link from"
            " <code>database-service status-link</code> (a platform administrator's).</p>",
            status_code=401 if isinstance(exc, Unauthenticated) else 403,
            headers=_headers(),
        )
    nonce = secrets.token_urlsafe(16)
    return HTMLResponse(render_page(data, nonce=nonce), headers=_headers(nonce))


@router.get("/status/fragment", include_in_schema=False)
async def status_fragment(
    request: Request,
    core: Core,
    authorization: Annotated[str | None, Header()] = None,
    dbsvc_status: Annotated[str | None, Cookie()] = None,
) -> HTMLResponse:
    principal = await _viewer(request, core, authorization, dbsvc_status)
    data = await core.observability.status(principal)
    return HTMLResponse(render_fragment(data), headers=_headers())
