-- Cache invalidation for writes that bypass the service (issue #11: result cache). Statement
-- triggers NOTIFY the service on channel dbsvc_invalidate with
--     <tenant id>|<schema>.<relation>|<transaction id>|<statement time, epoch ms>
-- (tenant '*': every tenant). NOTIFY is delivered at commit and not at all on rollback, and
-- PostgreSQL folds identical notifications of one transaction into one. The service's listener
-- (cache/generations.py) turns each into a generation bump; the transaction id lets N instances
-- count one write once.
--
-- Tenant tables: the tenant is looked up by schema (SECURITY DEFINER: tenants cannot read the
-- control plane). A write into a partition also names its ancestors, so a read of the
-- partitioned table is invalidated too.
-- Notifications are signed: any role may NOTIFY any channel, so the listener accepts only a
-- payload followed by |md5(key || payload), with a key only the owner reads (a random 244 bits,
-- from gen_random_uuid's strong source). Tenants cannot run cache_signed (nor read the key).
CREATE TABLE {{control}}.cache_notify_key (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key       text NOT NULL
);
INSERT INTO {{control}}.cache_notify_key (key)
VALUES (replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
REVOKE ALL ON {{control}}.cache_notify_key FROM PUBLIC;

CREATE FUNCTION {{control}}.cache_signed(payload text) RETURNS text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog
AS $$
    SELECT payload || '|' || md5(key || payload) FROM {{control}}.cache_notify_key
$$;
REVOKE ALL ON FUNCTION {{control}}.cache_signed(text) FROM PUBLIC;

CREATE FUNCTION {{control}}.cache_notify() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    tenant text;
    suffix text := '|' || txid_current()::text || '|'
        || (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text;
    rel record;
BEGIN
    SELECT tenant_id INTO tenant FROM {{control}}.tenants WHERE schema_name = TG_TABLE_SCHEMA;
    FOR rel IN
        -- pg_partition_ancestors lists nothing for a table that is not a partition.
        SELECT n.nspname, c.relname
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = TG_RELID
           OR c.oid IN (SELECT relid FROM pg_partition_ancestors(TG_RELID))
    LOOP
        -- Its rows are not known here: every read of the table, point reads included
        -- (query/pointkeys.py names them).
        PERFORM pg_notify('dbsvc_invalidate',
            {{control}}.cache_signed(
                coalesce(tenant, '*') || '|' || rel.nspname || '.' || rel.relname || suffix));
        PERFORM pg_notify('dbsvc_invalidate',
            {{control}}.cache_signed(coalesce(tenant, '*') || '|' || rel.nspname || '.' || rel.relname
                || '#keyed' || suffix));
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.cache_notify() FROM PUBLIC;

-- Tenant tables with a primary key, written through the table itself: the transition tables
-- name the keys the statement wrote (old and new), so a cached read of one row by its key
-- (query/pointkeys.py) is invalidated by writes to that row only. The key's name is
-- <schema>.<table>#row:<md5 of the key columns' text joined by U+001F>, as the service
-- computes it. Past 16 keys (a bulk write: listing them would cost every instance more than
-- the reads it keeps), or without a primary key, the table's keyed reads all go
-- (<table>#keyed). Every read of the table but point reads depends on <schema>.<table>.
CREATE FUNCTION {{control}}.cache_notify_rows() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    tenant text;
    relation text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    suffix text := '|' || txid_current()::text || '|'
        || (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text;
    key_text text;
    source text;
    keys text[];
    k text;
BEGIN
    SELECT tenant_id INTO tenant FROM {{control}}.tenants WHERE schema_name = TG_TABLE_SCHEMA;
    tenant := coalesce(tenant, '*') || '|';
    SELECT string_agg(format('%I::text', a.attname), ' || chr(31) || ' ORDER BY k.ord)
    INTO key_text
    FROM pg_index i
    CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
    WHERE i.indrelid = TG_RELID AND i.indisprimary;
    source := CASE TG_OP
        WHEN 'INSERT' THEN 'SELECT * FROM dbsvc_new'
        WHEN 'DELETE' THEN 'SELECT * FROM dbsvc_old'
        ELSE 'SELECT * FROM dbsvc_old UNION ALL SELECT * FROM dbsvc_new' END;
    IF key_text IS NOT NULL THEN
        -- At most 17 keys: more means "too many to list".
        EXECUTE format('SELECT array_agg(DISTINCT md5(%s)) FROM (%s LIMIT 34) r',
                       key_text, source)
        INTO keys;
    END IF;
    IF keys IS NULL AND key_text IS NOT NULL THEN
        RETURN NULL;  -- the statement wrote no row
    END IF;
    PERFORM pg_notify('dbsvc_invalidate', {{control}}.cache_signed(tenant || relation || suffix));
    IF keys IS NULL OR cardinality(keys) > 16 THEN
        PERFORM pg_notify('dbsvc_invalidate',
            {{control}}.cache_signed(tenant || relation || '#keyed' || suffix));
    ELSE
        FOREACH k IN ARRAY keys LOOP
            PERFORM pg_notify('dbsvc_invalidate',
                {{control}}.cache_signed(tenant || relation || '#row:' || k || suffix));
        END LOOP;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.cache_notify_rows() FROM PUBLIC;

-- Shared tables (one table, every tenant's rows under row-level security): the transition
-- tables name the companies whose rows the statement wrote, so only those tenants' caches are
-- invalidated. One function for the three operations: PL/pgSQL plans a statement when it first
-- runs it, so each trigger only touches the transition tables it declares. TRUNCATE has no
-- transition table (PostgreSQL does not allow one), nor do partitions and inheritance children
-- when written directly: those notify '*'. A statement touching more than 100 companies (the
-- owner's retention) notifies '*' once instead of a notification per company.
CREATE FUNCTION {{control}}.cache_notify_shared() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    relation text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
    suffix text := '|' || txid_current()::text || '|'
        || (extract(epoch FROM clock_timestamp()) * 1000)::bigint::text;
    companies text[];
    company text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(DISTINCT company_id::text) INTO companies FROM dbsvc_new;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(DISTINCT company_id::text) INTO companies FROM dbsvc_old;
    ELSIF TG_OP = 'UPDATE' THEN
        SELECT array_agg(DISTINCT company_id) INTO companies FROM (
            SELECT company_id::text FROM dbsvc_old UNION SELECT company_id::text FROM dbsvc_new
        ) k;
    ELSE
        companies := ARRAY['*'];
    END IF;
    IF companies IS NULL THEN
        RETURN NULL;  -- the statement wrote no row
    END IF;
    IF cardinality(companies) > 100 THEN
        companies := ARRAY['*'];
    END IF;
    FOREACH company IN ARRAY companies LOOP
        PERFORM pg_notify('dbsvc_invalidate',
            {{control}}.cache_signed(company || '|' || relation || suffix));
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.cache_notify_shared() FROM PUBLIC;

-- Attach the triggers to a table (idempotent). The service calls it for tables it creates;
-- the event trigger below calls it for tables created in tenant schemas.
CREATE FUNCTION {{control}}.cache_watch(rel regclass) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog
AS $$
DECLARE
    info record;
BEGIN
    SELECT c.relkind, c.relispartition, c.relhassubclass, c.relnamespace = '{{shared}}'::regnamespace AS shared,
           EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) AS child
    INTO info FROM pg_class c WHERE c.oid = rel;
    IF info.relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cache_watch: % is not a table', rel USING ERRCODE = '42809';
    END IF;
    EXECUTE format('DROP TRIGGER IF EXISTS dbsvc_cache_notify ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsvc_cache_insert ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsvc_cache_update ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsvc_cache_delete ON %s', rel);
    EXECUTE format('DROP TRIGGER IF EXISTS dbsvc_cache_truncate ON %s', rel);
    IF info.shared AND NOT info.child AND NOT (info.relkind = 'r' AND info.relhassubclass) THEN
        EXECUTE format('CREATE TRIGGER dbsvc_cache_insert AFTER INSERT ON %s'
            ' REFERENCING NEW TABLE AS dbsvc_new FOR EACH STATEMENT'
            ' EXECUTE FUNCTION {{control}}.cache_notify_shared()', rel);
        EXECUTE format('CREATE TRIGGER dbsvc_cache_update AFTER UPDATE ON %s'
            ' REFERENCING OLD TABLE AS dbsvc_old NEW TABLE AS dbsvc_new FOR EACH STATEMENT'
            ' EXECUTE FUNCTION {{control}}.cache_notify_shared()', rel);
        EXECUTE format('CREATE TRIGGER dbsvc_cache_delete AFTER DELETE ON %s'
            ' REFERENCING OLD TABLE AS dbsvc_old FOR EACH STATEMENT'
            ' EXECUTE FUNCTION {{control}}.cache_notify_shared()', rel);
        EXECUTE format('CREATE TRIGGER dbsvc_cache_truncate AFTER TRUNCATE ON %s'
            ' FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.cache_notify_shared()', rel);
    ELSIF NOT info.shared AND NOT info.child AND NOT (info.relkind = 'r' AND info.relhassubclass) THEN
        -- Tenant tables: the keys written (cache_notify_rows); TRUNCATE has no transition table.
        EXECUTE format('CREATE TRIGGER dbsvc_cache_insert AFTER INSERT ON %s'
            ' REFERENCING NEW TABLE AS dbsvc_new FOR EACH STATEMENT'
            ' EXECUTE FUNCTION {{control}}.cache_notify_rows()', rel);
        EXECUTE format('CREATE TRIGGER dbsvc_cache_update AFTER UPDATE ON %s'
            ' REFERENCING OLD TABLE AS dbsvc_old NEW TABLE AS dbsvc_new FOR EACH STATEMENT'
            ' EXECUTE FUNCTION {{control}}.cache_notify_rows()', rel);
        EXECUTE format('CREATE TRIGGER dbsvc_cache_delete AFTER DELETE ON %s'
            ' REFERENCING OLD TABLE AS dbsvc_old FOR EACH STATEMENT'
            ' EXECUTE FUNCTION {{control}}.cache_notify_rows()', rel);
        EXECUTE format('CREATE TRIGGER dbsvc_cache_truncate AFTER TRUNCATE ON %s'
            ' FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.cache_notify()', rel);
    ELSE
        -- Partitions and inheritance children (no transition tables), and shared tables that
        -- cannot have them (their tenant is unknown: cache_notify says '*').
        EXECUTE format('CREATE TRIGGER dbsvc_cache_notify'
            ' AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %s'
            ' FOR EACH STATEMENT EXECUTE FUNCTION {{control}}.cache_notify()', rel);
    END IF;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.cache_watch(regclass) FROM PUBLIC;

-- The shared tables that exist now (the partitions of trading_ticks and ai_predictions are
-- written only through their parents).
SELECT {{control}}.cache_watch(c.oid::regclass)
FROM pg_class c
WHERE c.relnamespace = '{{shared}}'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition;

-- Tables created later in a tenant schema (by the tenant's DDL, or a tenant migration) are
-- watched from creation. Event triggers need a superuser: without one (a managed PostgreSQL
-- whose owner role is not superuser), tenants' own new tables are not watched; writes to them
-- through the service still invalidate (the service bumps what a write names), writes
-- bypassing it are bounded by the TTL. The ingestion staging tables are not watched: they hold
-- no rows outside a transaction.
CREATE FUNCTION {{control}}.cache_watch_new_tables() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    obj record;
BEGIN
    FOR obj IN
        SELECT d.objid, c.relname
        FROM pg_event_trigger_ddl_commands() d
        JOIN pg_class c ON c.oid = d.objid
        WHERE d.classid = 'pg_class'::regclass AND c.relkind IN ('r', 'p')
          AND c.relpersistence <> 't'
          AND EXISTS (SELECT 1 FROM {{control}}.tenants t WHERE t.schema_name = d.schema_name)
    LOOP
        IF obj.relname NOT LIKE '\_ingest\_%' THEN
            PERFORM {{control}}.cache_watch(obj.objid::regclass);
        END IF;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.cache_watch_new_tables() FROM PUBLIC;

DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
       AND NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = 'dbsvc_cache_watch') THEN
        CREATE EVENT TRIGGER dbsvc_cache_watch ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
            EXECUTE FUNCTION {{control}}.cache_watch_new_tables();
    END IF;
END
$$;
