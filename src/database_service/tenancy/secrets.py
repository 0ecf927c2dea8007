"""Tenant role secrets: generated, stored encrypted, and turned into SCRAM verifiers.

The master key never encrypts anything directly: HKDF derives one key per purpose. The role's
password reaches PostgreSQL only as a SCRAM-SHA-256 verifier computed here, so the plaintext never
appears in a statement the server could log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from database_service.postgres import TenantLogin

if TYPE_CHECKING:
    from database_service.tenancy.registry import TenantRecord

__all__ = [
    "SecretBox",
    "TenantLogins",
    "derive_key",
    "new_role_password",
    "scram_sha256_verifier",
]


def derive_key(master_key: str, purpose: str, length: int = 32) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose.encode())
    return hkdf.derive(master_key.encode())


class SecretBox:
    """Authenticated encryption of small secrets with a key derived from the master key."""

    def __init__(self, master_key: str, purpose: str = "tenant-role-secrets") -> None:
        self._fernet = Fernet(base64.urlsafe_b64encode(derive_key(master_key, purpose)))

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ValueError(
                "cannot decrypt a tenant secret: the master key differs from the one that sealed it"
            ) from None


def new_role_password() -> str:
    return secrets.token_urlsafe(32)


def scram_sha256_verifier(password: str, *, iterations: int = 4096) -> str:
    """The verifier PostgreSQL stores for SCRAM-SHA-256 (RFC 5802/7677), as rolpassword."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class TenantLogins:
    """A tenant's pool logins, with its secret opened once per sealed value.

    Opening the sealed secret costs ~50 µs; the cache is keyed by the sealed value, so a
    rotated secret is picked up on the next lookup. ``user_scoped`` picks the login whose
    sessions see user-level rows only through a user id the service signs (migration 0004)."""

    def __init__(self, box: SecretBox) -> None:
        self._box = box
        self._cache: dict[tuple[str, bool], tuple[str, str, TenantLogin]] = {}

    def login(self, tenant: TenantRecord, *, user_scoped: bool = False) -> TenantLogin:
        role = tenant.user_role_name if user_scoped else tenant.role_name
        if role is None:
            raise ValueError(f"tenant {tenant.tenant_id!r} has no user-scoped login yet")
        key = (tenant.tenant_id, user_scoped)
        cached = self._cache.get(key)
        if cached is not None and cached[:2] == (tenant.role_secret, role):
            return cached[2]
        login = TenantLogin(
            tenant.tenant_id, role, self._box.open(tenant.role_secret), user_scoped=user_scoped
        )
        self._cache[key] = (tenant.role_secret, role, login)
        return login
