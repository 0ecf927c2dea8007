-- Isolation, refined after an outside attack run (issue: tenant isolation that survives an
-- outside attack suite). Three things change in the shared schema:
--
-- 1. The user id behind user-level row security cannot be forged by the tenant's own SQL.
--    Each tenant gets a second login role, used only for requests that carry a user id. Its
--    sessions see user-restricted rows only through control.session_user_scope(), which accepts
--    the user id only with a tag that control.enter_user() computed for this backend and this
--    transaction from a key the tenant cannot read; anything else (a forged or cleared
--    dbsvc.user_id, a tag replayed from another transaction) is an error, not "every user".
--    The company-wide login (no user id) is unchanged: it sees every row of its company.
-- 2. No key space is shared between tenants: market_data's key is (company_id, id) and each
--    tenant draws ids from a sequence of its own (tenant migration 0003), so an id says nothing
--    about other tenants' volume and cannot collide with another tenant's row.
-- 3. session_company() maps both of a tenant's logins to its company.

ALTER TABLE {{control}}.tenants ADD COLUMN user_role_name name UNIQUE;

CREATE OR REPLACE FUNCTION {{control}}.session_company() RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER PARALLEL SAFE
    SET search_path = pg_catalog
AS $$
    SELECT tenant_id FROM {{control}}.tenants
    WHERE (role_name = session_user OR user_role_name = session_user) AND status = 'active'
$$;

-- The key behind user context tags; written by the service at start (derived from its master
-- key), readable only by the owner and the SECURITY DEFINER functions below.
CREATE TABLE {{control}}.user_context_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key       bytea NOT NULL CHECK (length(key) >= 32)
);
REVOKE ALL ON {{control}}.user_context_key FROM PUBLIC;

-- The tag of a user id for this backend and this transaction: sha256(key || sha256(message)).
-- The inner hash fixes the message's length, so the tag cannot be extended; pid and
-- transaction start make a tag worthless anywhere else.
CREATE FUNCTION {{control}}.user_tag(k bytea, u text) RETURNS text
    LANGUAGE sql STABLE PARALLEL RESTRICTED
    SET search_path = pg_catalog
AS $$
    SELECT encode(sha256(k || sha256(convert_to(
        pg_backend_pid()::text || ':'
        || (extract(epoch FROM transaction_timestamp()) * 1000000)::bigint::text || ':' || u,
        'UTF8'))), 'hex')
$$;
REVOKE ALL ON FUNCTION {{control}}.user_tag(bytea, text) FROM PUBLIC;

-- Called by the service as the first statement of every transaction of a user-scoped login.
-- The key proves the caller is the service: the tenant's SQL never sees it.
CREATE FUNCTION {{control}}.enter_user(p_user text, p_key bytea) RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
    SET search_path = pg_catalog
AS $$
DECLARE
    k bytea;
BEGIN
    SELECT key INTO k FROM {{control}}.user_context_key;
    IF k IS NULL OR p_key IS NULL OR p_key <> k THEN
        RAISE EXCEPTION 'invalid user context key' USING ERRCODE = '42501';
    END IF;
    IF p_user IS NULL OR p_user = '' THEN
        RAISE EXCEPTION 'a user id is required' USING ERRCODE = '22023';
    END IF;
    PERFORM set_config('dbsvc.user_id', p_user, true);
    PERFORM set_config('dbsvc.user_sig', {{control}}.user_tag(k, p_user), true);
END
$$;
REVOKE ALL ON FUNCTION {{control}}.enter_user(text, bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {{control}}.enter_user(text, bytea) TO {{group}};

-- The user a session's rows are restricted to: NULL for a company-wide login; for a user-scoped
-- login the verified user id, or an error when the tag is missing or wrong. Used by the
-- policies as an InitPlan, so it runs once per statement (in the leader: PARALLEL RESTRICTED,
-- a parallel worker has another pid).
CREATE FUNCTION {{control}}.session_user_scope() RETURNS text
    LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
    SET search_path = pg_catalog
AS $$
DECLARE
    k bytea;
    u text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {{control}}.tenants WHERE user_role_name = session_user) THEN
        RETURN NULL;
    END IF;
    u := current_setting('dbsvc.user_id', true);
    SELECT key INTO k FROM {{control}}.user_context_key;
    IF u IS NULL OR u = '' OR k IS NULL
       OR current_setting('dbsvc.user_sig', true) IS DISTINCT FROM {{control}}.user_tag(k, u) THEN
        RAISE EXCEPTION 'no valid user context in this transaction: the user id is set by the'
            ' service only' USING ERRCODE = '42501';
    END IF;
    RETURN u;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.session_user_scope() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {{control}}.session_user_scope() TO {{group}};

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['market_data', 'trading_ticks', 'ai_predictions']
    LOOP
        EXECUTE format('DROP POLICY user_isolation ON {{shared}}.%I', t);
        EXECUTE format(
            'CREATE POLICY user_isolation ON {{shared}}.%I AS RESTRICTIVE FOR ALL TO {{group}} '
            'USING (user_id IS NULL OR user_id = coalesce((SELECT {{control}}.session_user_scope()), user_id)) '
            'WITH CHECK (user_id IS NULL OR user_id = coalesce((SELECT {{control}}.session_user_scope()), user_id))',
            t);
    END LOOP;
END
$$;

-- market_data: a key per company, ids from the company's own sequence.
ALTER TABLE {{shared}}.market_data DROP CONSTRAINT market_data_pkey;
ALTER TABLE {{shared}}.market_data ALTER COLUMN id DROP DEFAULT;
DROP SEQUENCE {{shared}}.market_data_id_seq;
ALTER TABLE {{shared}}.market_data ADD PRIMARY KEY (company_id, id);

-- Before RLS checks the row, so a row naming another company keeps no id and is refused by
-- the policy like any other (no sequence of that company is touched, nothing is revealed).
CREATE FUNCTION {{shared}}.market_data_id() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog
AS $$
DECLARE
    company text := {{control}}.session_company();
    own_schema name;
BEGIN
    IF NEW.id IS NOT NULL THEN
        RETURN NEW;
    END IF;
    IF company IS NULL AND session_user = current_user THEN
        company := NEW.company_id;  -- the service's owner role writes for any company
    END IF;
    IF company IS DISTINCT FROM NEW.company_id THEN
        RETURN NEW;
    END IF;
    SELECT schema_name INTO own_schema FROM {{control}}.tenants WHERE tenant_id = company;
    IF own_schema IS NOT NULL THEN
        NEW.id := nextval(format('%I._market_data_id_seq', own_schema)::regclass);
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION {{shared}}.market_data_id() FROM PUBLIC;
CREATE TRIGGER market_data_id BEFORE INSERT ON {{shared}}.market_data
    FOR EACH ROW EXECUTE FUNCTION {{shared}}.market_data_id();
