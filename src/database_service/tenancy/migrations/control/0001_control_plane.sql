-- Control plane: tenants, service identities, migration versions, audit log.
-- Placeholders {{control}}, {{shared}}, {{group}} are filled by the migration runner from settings.

CREATE TABLE {{control}}.tenants (
    tenant_id            text PRIMARY KEY CHECK (tenant_id ~ '^[a-z][a-z0-9_]{1,40}$'),
    status               text NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'suspended')),
    role_name            name NOT NULL UNIQUE,
    schema_name          name NOT NULL UNIQUE,
    role_secret          text NOT NULL,              -- Fernet token; the key is derived from the master key
    connection_limit     integer NOT NULL CHECK (connection_limit > 0),
    statement_timeout_ms integer NOT NULL CHECK (statement_timeout_ms > 0),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {{control}}.services (
    service_name text PRIMARY KEY CHECK (service_name ~ '^[a-z][a-z0-9_.-]{1,62}$'),
    secret_hash  text,                               -- scrypt; NULL for token-only identities
    tenants      text[] NOT NULL,                    -- tenant ids, or {'*'}
    scopes       text[] NOT NULL,
    status       text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {{control}}.tenant_migrations (
    tenant_id  text NOT NULL REFERENCES {{control}}.tenants ON DELETE CASCADE,
    version    integer NOT NULL,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

CREATE TABLE {{control}}.audit_log (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    service         text,
    tenant_id       text,
    action          text NOT NULL,
    statement_class text,
    outcome         text NOT NULL,
    code            text,
    detail          text
);
CREATE INDEX audit_log_tenant_at ON {{control}}.audit_log (tenant_id, at);
CREATE INDEX audit_log_at ON {{control}}.audit_log (at);

-- The company of the session's login role. Keyed on session_user, which a tenant cannot change
-- (SET ROLE changes current_user only, and SET SESSION AUTHORIZATION needs a superuser session).
-- SECURITY DEFINER so tenants need no access to the control plane; suspended tenants map to none.
CREATE FUNCTION {{control}}.session_company() RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER PARALLEL SAFE
    SET search_path = pg_catalog
AS $$
    SELECT tenant_id FROM {{control}}.tenants
    WHERE role_name = session_user AND status = 'active'
$$;
REVOKE ALL ON FUNCTION {{control}}.session_company() FROM PUBLIC;
GRANT USAGE ON SCHEMA {{control}} TO {{group}};
GRANT EXECUTE ON FUNCTION {{control}}.session_company() TO {{group}};

-- Shared tables (seed: "Level 2: User-Level Row Security"), owned by the service's owner role.
CREATE TABLE {{shared}}.market_data (
    id         bigserial PRIMARY KEY,
    company_id varchar(50) NOT NULL DEFAULT {{control}}.session_company(),
    user_id    varchar(50),
    symbol     varchar(20) NOT NULL,
    tick_data  jsonb,
    "timestamp" timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX market_data_company_symbol_ts ON {{shared}}.market_data (company_id, symbol, "timestamp");

CREATE TABLE {{shared}}.trading_ticks (
    time       timestamptz NOT NULL,
    company_id varchar(50) NOT NULL DEFAULT {{control}}.session_company(),
    user_id    varchar(50) NOT NULL,
    symbol     varchar(20) NOT NULL,
    bid        numeric(10, 5),
    ask        numeric(10, 5),
    volume     integer,
    spread     numeric(6, 2)
);
CREATE INDEX trading_ticks_company_symbol_time ON {{shared}}.trading_ticks (company_id, symbol, time);

CREATE TABLE {{shared}}.ai_predictions (
    time            timestamptz NOT NULL,
    company_id      varchar(50) NOT NULL DEFAULT {{control}}.session_company(),
    user_id         varchar(50) NOT NULL,
    symbol          varchar(20) NOT NULL,
    prediction_type varchar(50) NOT NULL,
    confidence      numeric(3, 2) NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    model_version   varchar(20),
    features        jsonb,
    result          jsonb
);
CREATE INDEX ai_predictions_company_symbol_time ON {{shared}}.ai_predictions (company_id, symbol, time);

CREATE TABLE {{shared}}.tenant_configurations (
    company_id   varchar(50) NOT NULL DEFAULT {{control}}.session_company(),
    config_key   varchar(100) NOT NULL,
    config_value jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, config_key)
);

GRANT USAGE ON SCHEMA {{shared}} TO {{group}};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {{shared}} TO {{group}};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {{shared}} TO {{group}};

-- RLS, forced so that even the tables' owner goes through policies. Company isolation keys on
-- the login role (above); the restrictive user policy keys on dbsvc.user_id, which the service
-- sets per transaction (SET LOCAL) and the SQL guard forbids tenants to set.
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['market_data', 'trading_ticks', 'ai_predictions', 'tenant_configurations']
    LOOP
        EXECUTE format('ALTER TABLE {{shared}}.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE {{shared}}.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY company_isolation ON {{shared}}.%I AS PERMISSIVE FOR ALL TO {{group}} '
            'USING (company_id = (SELECT {{control}}.session_company())) '
            'WITH CHECK (company_id = (SELECT {{control}}.session_company()))', t);
        -- The owner role maintains every tenant's rows (retention, tenant deletion).
        EXECUTE format(
            'CREATE POLICY service_owner ON {{shared}}.%I AS PERMISSIVE FOR ALL TO CURRENT_USER '
            'USING (true) WITH CHECK (true)', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['market_data', 'trading_ticks', 'ai_predictions']
    LOOP
        EXECUTE format(
            'CREATE POLICY user_isolation ON {{shared}}.%I AS RESTRICTIVE FOR ALL TO {{group}} '
            'USING (user_id IS NULL OR user_id = coalesce('
            'nullif((SELECT current_setting(''dbsvc.user_id'', true)), ''''), user_id)) '
            'WITH CHECK (user_id IS NULL OR user_id = coalesce('
            'nullif((SELECT current_setting(''dbsvc.user_id'', true)), ''''), user_id))', t);
    END LOOP;
END
$$;
