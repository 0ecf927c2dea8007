-- Per-tenant result cache rules (issue #11): "cache reads of positions and
-- tenant_configurations for 2 s". A read is cached by the rules when every table it reads has
-- one (its TTL: the smallest), without the caller asking. ``relation`` is a table's name as a
-- tenant writes it in SQL (unqualified: the tenant's own table or a shared one).
CREATE TABLE {{control}}.cache_rules (
    tenant_id  text NOT NULL REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    relation   text NOT NULL CHECK (relation ~ '^[a-z_][a-z0-9_]{0,62}$'),
    ttl_ms     integer NOT NULL CHECK (ttl_ms > 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, relation)
);

-- The key-value store when no Redis is configured (the embedded default): shared by every
-- worker and instance, as Redis would be. Unlogged (a crash empties it: a cache, not a
-- database, as Redis without persistence); a tenant's keys go with the tenant. Keys are the
-- caller's bytes verbatim, in the tenant's row range: no key reaches another tenant's.
CREATE UNLOGGED TABLE {{control}}.kv (
    tenant_id  text NOT NULL REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    key        bytea NOT NULL,
    value      bytea NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX ON {{control}}.kv (expires_at) WHERE expires_at IS NOT NULL;
