"""Service identities, signed tokens and scopes."""

from database_service.auth.identities import Authenticator, ServiceDirectory, ServiceIdentity
from database_service.auth.principal import ALL_TENANTS, Principal, Scope, parse_scopes
from database_service.auth.tokens import TokenCodec

__all__ = [
    "ALL_TENANTS",
    "Authenticator",
    "Principal",
    "Scope",
    "ServiceDirectory",
    "ServiceIdentity",
    "TokenCodec",
    "parse_scopes",
]
