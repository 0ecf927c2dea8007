"""Service identities, signed tokens, scopes, and admission to the client-credentials exchange."""

from database_service.auth.identities import Authenticator, ServiceDirectory, ServiceIdentity
from database_service.auth.principal import ALL_TENANTS, Principal, Scope, parse_scopes
from database_service.auth.ratelimit import ExchangeGate, ExchangeLimits, RateLimited
from database_service.auth.tokens import TokenClaims, TokenCodec, bootstrap_admin

__all__ = [
    "ALL_TENANTS",
    "Authenticator",
    "ExchangeGate",
    "ExchangeLimits",
    "Principal",
    "RateLimited",
    "Scope",
    "ServiceDirectory",
    "ServiceIdentity",
    "TokenClaims",
    "TokenCodec",
    "bootstrap_admin",
    "parse_scopes",
]
