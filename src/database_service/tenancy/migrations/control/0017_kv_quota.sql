-- A per-tenant quota on the embedded key-value store ({{control}}.kv, cache/kv.py
-- PostgresKeyValueStore). Without it one tenant's keys could fill the disk every tenant shares.
--
-- kv_usage holds each tenant's bytes: key + value + KV_KEY_OVERHEAD (64) per key, so a flood of
-- tiny keys costs too. Statement triggers over transition tables keep it exact for every writer
-- of kv (set, incr, the exactly-once markers, deletes, the expiry sweep, a tenant's deletion by
-- cascade): one kv_usage change per tenant per statement, whatever the row count, locked in
-- tenant order. (Row triggers did the same per row, and each update of one usage row within a
-- statement follows the chain of its earlier versions: O(n²) for n keys, minutes for a reclaim
-- of 150,000 expired keys on a connection every tenant's calls share.) The usage row's lock
-- serialises one tenant's writes for the length of a statement, never another tenant's.
-- The limit comes from the writing transaction (set_config('dbsvc.kv_tenant_max_bytes', …,
-- true), which the store sends with each write): a write that grows a tenant past it fails with
-- SQLSTATE 53400 and changes nothing. Without the setting (an operator's psql) there is no limit.
-- Expired keys count until they are deleted; at the quota the store deletes some of the tenant's
-- expired keys (a bounded number per round, SKIP LOCKED) and tries again before refusing.
--
-- Unlogged like kv: both are emptied together after a crash.
CREATE UNLOGGED TABLE {{control}}.kv_usage (
    tenant_id text PRIMARY KEY REFERENCES {{control}}.tenants (tenant_id) ON DELETE CASCADE,
    bytes     bigint NOT NULL DEFAULT 0
);

INSERT INTO {{control}}.kv_usage (tenant_id, bytes)
SELECT tenant_id, sum(octet_length(key) + octet_length(value) + 64)
FROM {{control}}.kv GROUP BY tenant_id;

CREATE FUNCTION {{control}}.kv_account_statement() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
DECLARE
    change record;
    total  bigint;
    cap    bigint := nullif(current_setting('dbsvc.kv_tenant_max_bytes', true), '')::bigint;
BEGIN
    FOR change IN
        WITH delta AS (
            SELECT tenant_id, octet_length(key) + octet_length(value) + 64 AS bytes
            FROM added
            UNION ALL
            SELECT tenant_id, -(octet_length(key) + octet_length(value) + 64)
            FROM removed
        )
        SELECT tenant_id, sum(bytes)::bigint AS bytes FROM delta GROUP BY tenant_id
        HAVING sum(bytes) <> 0 ORDER BY tenant_id  -- one lock order for every statement
    LOOP
        IF change.bytes < 0 THEN
            -- Never inserts: a tenant being deleted (kv rows go by cascade) gets no new row.
            UPDATE {{control}}.kv_usage SET bytes = bytes + change.bytes
            WHERE tenant_id = change.tenant_id;
            CONTINUE;
        END IF;
        INSERT INTO {{control}}.kv_usage AS u (tenant_id, bytes)
        VALUES (change.tenant_id, change.bytes)
        ON CONFLICT (tenant_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
        RETURNING u.bytes INTO total;
        IF cap IS NOT NULL AND total > cap THEN
            RAISE EXCEPTION 'key-value quota exceeded'
                USING ERRCODE = '53400', DETAIL = format('%s of %s bytes', total, cap);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- A trigger with transition tables takes one event: the same function reads "added" and
-- "removed", with an empty stand-in for the side an event does not have.
CREATE FUNCTION {{control}}.kv_account_insert() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
DECLARE
    change record;
    total  bigint;
    cap    bigint := nullif(current_setting('dbsvc.kv_tenant_max_bytes', true), '')::bigint;
BEGIN
    FOR change IN
        SELECT tenant_id, sum(octet_length(key) + octet_length(value) + 64)::bigint AS bytes
        FROM added GROUP BY tenant_id ORDER BY tenant_id
    LOOP
        INSERT INTO {{control}}.kv_usage AS u (tenant_id, bytes)
        VALUES (change.tenant_id, change.bytes)
        ON CONFLICT (tenant_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
        RETURNING u.bytes INTO total;
        IF cap IS NOT NULL AND total > cap THEN
            RAISE EXCEPTION 'key-value quota exceeded'
                USING ERRCODE = '53400', DETAIL = format('%s of %s bytes', total, cap);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION {{control}}.kv_account_delete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
DECLARE
    change record;
BEGIN
    FOR change IN
        SELECT tenant_id, sum(octet_length(key) + octet_length(value) + 64)::bigint AS bytes
        FROM removed GROUP BY tenant_id ORDER BY tenant_id
    LOOP
        -- Never inserts: a tenant being deleted (kv rows go by cascade) gets no new row.
        UPDATE {{control}}.kv_usage SET bytes = bytes - change.bytes
        WHERE tenant_id = change.tenant_id;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER kv_account_insert AFTER INSERT ON {{control}}.kv
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.kv_account_insert();
CREATE TRIGGER kv_account_update AFTER UPDATE ON {{control}}.kv
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.kv_account_statement();
CREATE TRIGGER kv_account_delete AFTER DELETE ON {{control}}.kv
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.kv_account_delete();
