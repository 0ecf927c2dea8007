-- The transactional outbox of execute_multi_db_operation (issue 13): one row per write of a store
-- outside PostgreSQL (the key-value store, ClickHouse, an external vector or graph store),
-- inserted in the same transaction as the operation's PostgreSQL part, so it exists if and only if
-- that part committed. The applier (multidb/outbox.py) applies rows after the commit, marks them
-- applied once the store acknowledged, retries with backoff, and leaves a row `failed` (kept,
-- visible, retryable by an administrator) after its last attempt.
--
-- In the control schema, not the tenant's: tenants have no privilege on the table. The only way
-- in is control.multidb_record(), SECURITY DEFINER, which takes the tenant from session_user
-- (session_company(): both of a tenant's logins map to it), never from an argument, so a row
-- names the tenant whose login wrote it. The applier derives the tenant from that column only
-- and applies in that tenant's namespaces with that tenant's identity: a tenant that reached the
-- function with its own SQL (the SQL guard refuses control-schema functions) could only queue
-- what it may do itself through the API.
CREATE TABLE {{control}}.multidb_outbox (
    id              bigserial PRIMARY KEY,
    tenant_id       text NOT NULL REFERENCES {{control}}.tenants ON DELETE CASCADE,
    operation_id    uuid NOT NULL,       -- the execute_multi_db_operation call it belongs to
    store           text NOT NULL CHECK (store IN ('dragonflydb', 'clickhouse', 'vector', 'graph')),
    part            text NOT NULL,       -- the part's name in the call (dragonflydb, weaviate...)
    -- Which store instance the recording instance writes that store to (a digest of its
    -- configuration: the Redis, ClickHouse or Weaviate it has): only an instance configured
    -- alike applies the entry, so one with another configuration can never apply it elsewhere.
    target          text NOT NULL DEFAULT '',
    op              jsonb NOT NULL,      -- the operation, re-validated by the applier
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_error      text,
    result          jsonb,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_at      timestamptz
);
CREATE INDEX multidb_outbox_pending ON {{control}}.multidb_outbox (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX multidb_outbox_tenant ON {{control}}.multidb_outbox (tenant_id, status, id);
CREATE INDEX multidb_outbox_operation ON {{control}}.multidb_outbox (operation_id);
REVOKE ALL ON {{control}}.multidb_outbox FROM PUBLIC;
REVOKE ALL ON SEQUENCE {{control}}.multidb_outbox_id_seq FROM PUBLIC;

CREATE FUNCTION {{control}}.multidb_record(
    p_operation uuid, p_store text, p_part text, p_op jsonb, p_target text)
    RETURNS bigint
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
    SET search_path = pg_catalog
AS $$
DECLARE
    company text := {{control}}.session_company();
    entry bigint;
BEGIN
    IF company IS NULL THEN
        RAISE EXCEPTION 'no active tenant for this login' USING ERRCODE = '42501';
    END IF;
    IF octet_length(p_op::text) > 4194304 THEN
        RAISE EXCEPTION 'an outbox entry may hold at most 4 MiB' USING ERRCODE = '54000';
    END IF;
    -- The request that records an entry applies it right after its commit; the background
    -- applier leaves it to that request for a few seconds (then it is a leftover: a crash).
    INSERT INTO {{control}}.multidb_outbox
        (tenant_id, operation_id, store, part, op, target, next_attempt_at)
    VALUES (company, p_operation, p_store, p_part, p_op, coalesce(p_target, ''),
            clock_timestamp() + interval '5 seconds')
    RETURNING id INTO entry;
    RETURN entry;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.multidb_record(uuid, text, text, jsonb, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION {{control}}.multidb_record(uuid, text, text, jsonb, text) TO {{group}};
