"""Request and response bodies of the REST API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueryRequest(_Body):
    sql: StrictStr = Field(description="One SQL statement; parameters as $1, $2, ...")
    params: list[Any] = Field(default_factory=list, description="JSON values, typed by PostgreSQL")
    tenant_id: StrictStr | None = Field(default=None, description="Or the X-Tenant-Id header")
    user_id: StrictStr | None = Field(default=None, description="Or the X-User-Id header")
    cache_ttl_ms: int = Field(
        default=0,
        ge=0,
        le=86_400_000,
        description="Cache a read's result this long (capped by the server; only reads that are"
        " safe to cache); the response's `cache` says what happened",
    )
    allow_stale: bool = Field(
        default=False,
        description="While PostgreSQL is unreachable, answer with the last cached result"
        " (`cache.stale`: true, `cache.age_ms`) instead of 503",
    )


class CacheOut(BaseModel):
    status: str = Field(description="hit | miss | bypass | off | stale")
    code: str | None = None
    reason: str | None = None
    age_ms: float | None = None
    stale: bool = False


class ColumnOut(BaseModel):
    name: str
    type: str


class QueryResponse(BaseModel):
    columns: list[ColumnOut]
    rows: list[list[Any]]
    row_count: int
    command: str
    statement_class: str
    duration_ms: float
    cache: CacheOut | None = Field(default=None, description="When the request asked the cache")


class TenantCreateRequest(_Body):
    tenant_id: StrictStr
    connection_limit: int | None = Field(default=None, ge=1, le=10_000)
    statement_timeout_ms: int | None = Field(default=None, ge=100, le=86_400_000)


class CacheRulesRequest(_Body):
    rules: dict[StrictStr, int] = Field(
        description="Table name -> TTL in milliseconds (replaces the tenant's rules)"
    )


class MigrationRequest(_Body):
    tenant_ids: list[StrictStr] | None = Field(
        default=None, description="Only these tenants (default: all)"
    )


class ServiceCreateRequest(_Body):
    service: StrictStr
    tenants: list[StrictStr] = Field(min_length=1, description="Tenant ids, or ['*']")
    scopes: list[StrictStr] = Field(min_length=1)
    with_secret: bool = True


class TokenRequest(_Body):
    service: StrictStr = Field(max_length=200)
    secret: StrictStr = Field(max_length=1000)
    ttl_seconds: int | None = Field(
        default=None, ge=60, description="At most DBSVC_TOKEN_MAX_TTL_SECONDS"
    )


class AdminTokenRequest(_Body):
    service: StrictStr
    tenants: list[StrictStr] | None = None
    scopes: list[StrictStr] | None = None
    ttl_seconds: int | None = Field(
        default=None, ge=60, description="At most DBSVC_TOKEN_MAX_TTL_SECONDS"
    )


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "Bearer"
    expires_in: int
    token_id: str | None = Field(default=None, description="The token's jti, to revoke it by")


class TokenRevokeRequest(_Body):
    """The token itself, or its service and id (``jti``)."""

    token: StrictStr | None = Field(default=None, max_length=8192)
    service: StrictStr | None = Field(default=None, max_length=200)
    token_id: StrictStr | None = Field(default=None, max_length=200)


class TokenRevokeResponse(BaseModel):
    service: str
    token_id: str
    expires_at: str | None
    revoked: bool
    already_revoked: bool


class ErrorBody(BaseModel):
    code: str
    message: str
    sqlstate: str | None = None
    position: int | None = None
    detail: str | None = None
    hint: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
