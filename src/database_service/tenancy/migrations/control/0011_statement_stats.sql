-- Per-tenant statement settings and the slow-query log (issue #15). The statement statistics
-- themselves live in the serving processes (statements/), not here: recording them costs no
-- round trip.
--
-- A tenant's slow-query settings; NULL takes the service's default (DBSVC_SLOW_QUERY_MS,
-- DBSVC_SLOW_QUERY_KEEP_PARAMETERS).
CREATE TABLE {{control}}.statement_settings (
    tenant_id       text PRIMARY KEY REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    slow_query_ms   double precision CHECK (slow_query_ms >= 0),
    keep_parameters boolean,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Slow statements with their plans (EXPLAIN (COSTS OFF), taken afterwards as the tenant's own
-- login). ``parameters`` is NULL when redacted (the default); the count is kept either way.
-- Retention (newest N per tenant, an age bound) is kept by the writer.
CREATE TABLE {{control}}.slow_queries (
    id              bigserial PRIMARY KEY,
    tenant_id       text NOT NULL REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    fingerprint     text NOT NULL,
    statement       text NOT NULL,
    statement_class text NOT NULL,
    command         text NOT NULL,
    parameters      jsonb,
    parameter_count integer NOT NULL,
    duration_ms     double precision NOT NULL,
    row_count       bigint NOT NULL,
    recorded_at     timestamptz NOT NULL,
    plan            text,
    plan_error      text
);
CREATE INDEX ON {{control}}.slow_queries (tenant_id, id DESC);
