-- Analytics replication to ClickHouse (issue 12). Every write to a replicated table — whoever
-- makes it: ingestion, the query API, bulk insert, an operator's psql — is queued here by
-- statement triggers in the writing transaction, so it is queued if and only if it commits.
-- The replicator (analytics/replicator.py, one per cluster under an advisory lock) reads the
-- queue in seq order, inserts into ClickHouse, and deletes what ClickHouse accepted. A row
-- committed late with a lower seq is simply still in the queue when it becomes visible: nothing
-- is skipped, which a "seq > checkpoint" reader could not promise (sequence values are handed
-- out before commit, so they commit out of order).
CREATE TABLE {{control}}.analytics_changes (
    seq        bigserial PRIMARY KEY,
    source     text NOT NULL,      -- the replicated table's name
    company_id text NOT NULL,      -- the tenant
    op         "char" NOT NULL,    -- 'U' new image (insert/update), 'D' delete, 'X' tenant deleted,
                                   -- 'P' purge before a backfill's snapshot
    row        jsonb NOT NULL,
    queued_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The batch being replicated, written before ClickHouse sees it: after a crash the same seqs are
-- sent again, as the same blocks with the same insert_deduplication_tokens, and ClickHouse drops
-- the replay. One row at most (one replicator).
CREATE TABLE {{control}}.analytics_inflight (
    batch_id   bigint PRIMARY KEY,
    seqs       bigint[] NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Whether anything is queued at all: a deployment without ClickHouse must not grow a queue
-- nobody reads. The service turns it on when it starts with analytics enabled; what was written
-- while it was off is brought over by `database-service analytics backfill`.
CREATE TABLE {{control}}.analytics_replication (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    enabled    boolean NOT NULL DEFAULT false,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO {{control}}.analytics_replication DEFAULT VALUES;

-- Statement triggers (one call per statement, rows from the transition tables). SECURITY
-- DEFINER: tenants cannot write the queue themselves; only the rows they wrote reach it. The
-- tenant of a tenant table comes from the trigger's argument (set by the tenant migration), of a
-- shared table from the row's company_id. PL/pgSQL compiles a trigger function once per table,
-- so each statement only meets the transition tables its trigger declares.
CREATE FUNCTION {{control}}.analytics_capture() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
BEGIN
    IF NOT (SELECT enabled FROM {{control}}.analytics_replication) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {{control}}.analytics_changes (source, company_id, op, row)
        SELECT TG_TABLE_NAME, coalesce(TG_ARGV[0], r.j ->> 'company_id'), 'U', r.j
        FROM (SELECT to_jsonb(n) AS j FROM new_rows n) r;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {{control}}.analytics_changes (source, company_id, op, row)
        SELECT TG_TABLE_NAME, coalesce(TG_ARGV[0], r.j ->> 'company_id'), 'U', r.j
        FROM (SELECT to_jsonb(n) AS j FROM new_rows n) r;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {{control}}.analytics_changes (source, company_id, op, row)
        SELECT TG_TABLE_NAME, coalesce(TG_ARGV[0], r.j ->> 'company_id'), 'D', r.j
        FROM (SELECT to_jsonb(o) AS j FROM old_rows o) r;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION {{control}}.analytics_capture() FROM PUBLIC;

-- Ticks and predictions are append-only event streams (no key to name a row by; retention drops
-- whole partitions, which fires no trigger): inserts are replicated. Candles change in place
-- (the tick triggers fold ticks into them with INSERT … ON CONFLICT DO UPDATE): every change.
CREATE TRIGGER dbsvc_analytics_insert AFTER INSERT ON {{shared}}.trading_ticks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture();
CREATE TRIGGER dbsvc_analytics_insert AFTER INSERT ON {{shared}}.ai_predictions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture();
CREATE TRIGGER dbsvc_analytics_insert AFTER INSERT ON {{shared}}.candles_1m
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture();
CREATE TRIGGER dbsvc_analytics_update AFTER UPDATE ON {{shared}}.candles_1m
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture();
CREATE TRIGGER dbsvc_analytics_delete AFTER DELETE ON {{shared}}.candles_1m
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT
    EXECUTE FUNCTION {{control}}.analytics_capture();
