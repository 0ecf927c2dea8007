-- Ingestion staging (runs with search_path = {{schema}}). Batches arrive by binary COPY into
-- these unlogged tables and are merged into the shared tables in the same transaction by
-- `WITH b AS (DELETE FROM _ingest_… WHERE batch = txid_current() RETURNING …) INSERT … ON
-- CONFLICT DO NOTHING`, so they hold no live rows outside a transaction. COPY cannot target the
-- shared tables (row-level security), and tenants have no TEMP privilege, hence tables of the
-- tenant's own schema. `batch` (the writing transaction's id, by default) and its index let a
-- merge find its own rows without scanning the dead ones earlier merges left for autovacuum
-- (a full scan made every batch slower than the one before, until the next vacuum).
CREATE UNLOGGED TABLE _ingest_ticks (
    event_id uuid NOT NULL,
    time_us  bigint NOT NULL,
    user_id  text NOT NULL,
    symbol   text NOT NULL,
    bid      double precision,
    ask      double precision,
    volume   bigint,
    spread   double precision,
    batch    bigint NOT NULL DEFAULT txid_current()
);
CREATE INDEX _ingest_ticks_batch ON _ingest_ticks (batch);

CREATE UNLOGGED TABLE _ingest_predictions (
    event_id        uuid NOT NULL,
    time_us         bigint NOT NULL,
    user_id         text NOT NULL,
    symbol          text NOT NULL,
    prediction_type text NOT NULL,
    confidence      double precision NOT NULL,
    model_version   text,
    features        text,                -- JSON text: PostgreSQL checks it in the merge's cast
    result          text,
    batch           bigint NOT NULL DEFAULT txid_current()
);
CREATE INDEX _ingest_predictions_batch ON _ingest_predictions (batch);

-- Event ids of records stored in the tenant's own tables (signals, generic rows): the primary
-- key is what makes a second delivery a no-op.
CREATE TABLE _ingest_events (
    event_id  uuid PRIMARY KEY,
    stored_at timestamptz NOT NULL DEFAULT now()
);
