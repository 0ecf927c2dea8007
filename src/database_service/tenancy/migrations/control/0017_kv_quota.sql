-- A per-tenant quota on the embedded key-value store ({{control}}.kv, cache/kv.py
-- PostgresKeyValueStore). Without it one tenant's keys could fill the disk every tenant shares.
--
-- kv_usage holds each tenant's bytes: key + value + KV_KEY_OVERHEAD (64) per key, so a flood of
-- tiny keys costs too. A row trigger keeps it exact for every writer of kv (set, incr, the
-- exactly-once markers, deletes, the expiry sweep, a tenant's deletion by cascade); the row's
-- lock serialises one tenant's writes for the length of a statement, never another tenant's.
-- The limit comes from the writing transaction (set_config('dbsvc.kv_tenant_max_bytes', …,
-- true), which the store sends with each write): a write that grows a tenant past it fails with
-- SQLSTATE 53400 and changes nothing. Without the setting (an operator's psql) there is no limit.
-- Expired keys count until they are deleted; the store deletes a tenant's expired keys and tries
-- once more before refusing.
--
-- Unlogged like kv: both are emptied together after a crash.
CREATE UNLOGGED TABLE {{control}}.kv_usage (
    tenant_id text PRIMARY KEY REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    bytes     bigint NOT NULL DEFAULT 0
);

INSERT INTO {{control}}.kv_usage (tenant_id, bytes)
SELECT tenant_id, sum(octet_length(key) + octet_length(value) + 64)
FROM {{control}}.kv GROUP BY tenant_id;

CREATE FUNCTION {{control}}.kv_account() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
DECLARE
    delta  bigint := 0;
    tenant text;
    total  bigint;
    cap    bigint;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        delta := delta - (octet_length(OLD.key) + octet_length(OLD.value) + 64);
        tenant := OLD.tenant_id;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        delta := delta + octet_length(NEW.key) + octet_length(NEW.value) + 64;
        tenant := NEW.tenant_id;
    END IF;
    IF delta = 0 THEN
        RETURN NULL;  -- an expiry changed, or a value of the same size
    END IF;
    IF delta < 0 THEN
        -- Never inserts: a tenant being deleted (kv rows go by cascade) gets no new row.
        UPDATE {{control}}.kv_usage SET bytes = bytes + delta WHERE tenant_id = tenant;
        RETURN NULL;
    END IF;
    INSERT INTO {{control}}.kv_usage AS u (tenant_id, bytes) VALUES (tenant, delta)
    ON CONFLICT (tenant_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
    RETURNING u.bytes INTO total;
    cap := nullif(current_setting('dbsvc.kv_tenant_max_bytes', true), '')::bigint;
    IF cap IS NOT NULL AND total > cap THEN
        RAISE EXCEPTION 'key-value quota exceeded'
            USING ERRCODE = '53400', DETAIL = format('%s of %s bytes', total, cap);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER kv_account AFTER INSERT OR UPDATE OR DELETE ON {{control}}.kv
    FOR EACH ROW EXECUTE FUNCTION {{control}}.kv_account();
