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

-- Applies each tenant's change of one statement, in tenant order (one lock order for every
-- statement). Not executable by tenants (their group has USAGE on this schema): it is called
-- only by the triggers below, which run as the writer of kv.
CREATE FUNCTION {{control}}.kv_account_apply(p_tenants text[], p_bytes bigint[]) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
DECLARE
    total bigint;
    cap   bigint := nullif(current_setting('dbsvc.kv_tenant_max_bytes', true), '')::bigint;
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_tenants, 1), 0) LOOP
        IF p_bytes[i] < 0 THEN
            -- Never inserts: a tenant being deleted (kv rows go by cascade) gets no new row.
            UPDATE {{control}}.kv_usage SET bytes = bytes + p_bytes[i]
            WHERE tenant_id = p_tenants[i];
            CONTINUE;
        END IF;
        INSERT INTO {{control}}.kv_usage AS u (tenant_id, bytes)
        VALUES (p_tenants[i], p_bytes[i])
        ON CONFLICT (tenant_id) DO UPDATE SET bytes = u.bytes + EXCLUDED.bytes
        RETURNING u.bytes INTO total;
        IF cap IS NOT NULL AND total > cap THEN
            RAISE EXCEPTION 'key-value quota exceeded'
                USING ERRCODE = '53400', DETAIL = format('%s of %s bytes', total, cap);
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.kv_account_apply(text[], bigint[]) FROM PUBLIC;

-- A trigger with transition tables takes one event, and its function may name only the
-- tables that event has: one function per event, each summing its rows per tenant.
CREATE FUNCTION {{control}}.kv_account_insert() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM {{control}}.kv_account_apply(
        array_agg(tenant_id ORDER BY tenant_id), array_agg(bytes ORDER BY tenant_id))
    FROM (SELECT tenant_id, sum(octet_length(key) + octet_length(value) + 64)::bigint AS bytes
          FROM added GROUP BY tenant_id) AS change;
    RETURN NULL;
END
$$;

CREATE FUNCTION {{control}}.kv_account_update() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM {{control}}.kv_account_apply(
        array_agg(tenant_id ORDER BY tenant_id), array_agg(bytes ORDER BY tenant_id))
    FROM (SELECT tenant_id, sum(bytes)::bigint AS bytes
          FROM (SELECT tenant_id, octet_length(key) + octet_length(value) + 64 AS bytes
                FROM added
                UNION ALL
                SELECT tenant_id, -(octet_length(key) + octet_length(value) + 64)
                FROM removed) AS delta
          GROUP BY tenant_id HAVING sum(bytes) <> 0) AS change;
    RETURN NULL;
END
$$;

CREATE FUNCTION {{control}}.kv_account_delete() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
BEGIN
    PERFORM {{control}}.kv_account_apply(
        array_agg(tenant_id ORDER BY tenant_id), array_agg(-bytes ORDER BY tenant_id))
    FROM (SELECT tenant_id, sum(octet_length(key) + octet_length(value) + 64)::bigint AS bytes
          FROM removed GROUP BY tenant_id) AS change;
    RETURN NULL;
END
$$;

CREATE TRIGGER kv_account_insert AFTER INSERT ON {{control}}.kv
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.kv_account_insert();
CREATE TRIGGER kv_account_update AFTER UPDATE ON {{control}}.kv
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.kv_account_update();
CREATE TRIGGER kv_account_delete AFTER DELETE ON {{control}}.kv
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.kv_account_delete();
