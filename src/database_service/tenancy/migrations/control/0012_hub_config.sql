-- Tenant configuration received from the Central Hub (issue #15): the newest version applied
-- per tenant, so an update is applied once (a repeated or older version changes nothing), and
-- what it said.
CREATE TABLE {{control}}.hub_config (
    tenant_id  text PRIMARY KEY REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    version    bigint NOT NULL CHECK (version > 0),
    applied_at timestamptz NOT NULL DEFAULT now(),
    payload    jsonb NOT NULL
);
