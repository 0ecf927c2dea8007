"""Browser sign-in for the status page: a short-lived, signed sign-in link minted for a platform
principal (``database-service status-link``, or ``POST /api/v1/status/link`` with a bearer
credential), exchanged once at ``/status/login`` for a session cookie.

A browser cannot send our bearer tokens on a plain navigation, and a token in a URL would end up
in histories and logs; the link holds no credential of the service, only a grant signed with a
key derived from the master key, valid ``LINK_SECONDS``. The cookie is the same kind of grant,
valid ``SESSION_SECONDS``, HttpOnly, SameSite=Strict, limited to ``/status``. Both carry the
principal's name and scopes as they were when the link was minted: revoking that service ends
new links at once and existing sessions within ``SESSION_SECONDS`` (SECURITY.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

from database_service.auth.principal import ALL_TENANTS, Principal, Scope

__all__ = ["LINK_SECONDS", "SESSION_SECONDS", "StatusLinks"]

LINK_SECONDS = 120
SESSION_SECONDS = 3600
_VIEW = frozenset({Scope.METRICS, Scope.ADMIN})


class StatusLinks:
    def __init__(self, master_key: str) -> None:
        self._key = hmac.new(master_key.encode(), b"dbsvc status page v1", hashlib.sha256).digest()

    def link_code(self, principal: Principal, *, now: float | None = None) -> str:
        return self._sign("link", principal, LINK_SECONDS, now)

    def session_from_link(self, code: str, *, now: float | None = None) -> str | None:
        """The cookie's value for a valid, unexpired link; None otherwise."""
        principal = self._open("link", code, now)
        return None if principal is None else self._sign("session", principal, SESSION_SECONDS, now)

    def principal(self, cookie: str, *, now: float | None = None) -> Principal | None:
        return self._open("session", cookie, now)

    def _sign(self, kind: str, principal: Principal, ttl: int, now: float | None) -> str:
        claims = {
            "k": kind,
            "s": principal.service,
            # Only a platform principal's scopes: a tenant's ``metrics`` is not every tenant's.
            "sc": sorted(s.value for s in principal.scopes & _VIEW)
            if principal.is_platform
            else [],
            "e": int((now if now is not None else time.time()) + ttl),
            "n": secrets.token_hex(8),
        }
        body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self._key, body, hashlib.sha256).digest()
        return (body + b"." + base64.urlsafe_b64encode(mac)).decode().replace("=", "")

    def _open(self, kind: str, value: str, now: float | None) -> Principal | None:
        if not isinstance(value, str) or len(value) > 1000 or value.count(".") != 1:
            return None
        body_text, mac_text = value.split(".")
        try:
            body = _unpad(body_text)
            mac = _unpad(mac_text)
        except ValueError:
            return None
        expected = hmac.new(self._key, base64.urlsafe_b64encode(body), hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            return None
        try:
            claims = json.loads(body)
            scopes = frozenset(Scope(s) for s in claims["sc"]) & _VIEW
            expired = claims["e"] < (now if now is not None else time.time())
        except (ValueError, KeyError, TypeError):
            return None
        if claims.get("k") != kind or expired or not scopes:
            return None
        return Principal(service=str(claims["s"]), tenants=frozenset({ALL_TENANTS}), scopes=scopes)


def _unpad(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
