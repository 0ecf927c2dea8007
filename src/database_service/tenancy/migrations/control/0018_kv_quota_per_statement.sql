-- The key-value quota's accounting (0017) per statement instead of per row.
--
-- 0017's row trigger updated the tenant's kv_usage row once for every kv row written. Within one
-- statement those updates of the same row each follow the chain of its earlier versions, so a
-- statement touching n keys of a tenant cost O(n²): reclaiming 150,000 expired keys at the quota
-- (or deleting a tenant with as many) ran for minutes while holding a connection of the owner's
-- pool every tenant shares. Statement triggers with transition tables sum each tenant's change
-- once per statement: one kv_usage update per tenant per statement, whatever the row count.
-- The quota check is the same: a statement that grows a tenant past
-- current_setting('dbsvc.kv_tenant_max_bytes') fails with 53400 and changes nothing.
DROP TRIGGER kv_account ON {{control}}.kv;
DROP FUNCTION {{control}}.kv_account();

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
