-- Ingestion (issue: market data over NATS JetStream and Kafka with an exactly-once effect).
-- Every ingested tick and prediction carries its producer's event id. A unique index that
-- includes the partition keys makes "stored once" a property of the schema: the merge inserts
-- with ON CONFLICT DO NOTHING, so a record that arrives twice (both transports, redelivery, a
-- replayed dead letter) is stored once. Rows written by SQL or BulkInsert have no event id
-- (NULL), which the index does not constrain. Time leads the key (after the company), so index
-- inserts follow time and stay near the right edge of the b-tree, whatever the ids look like:
-- random ids as the leading column made every insert a random page once the index outgrew the
-- cache.

ALTER TABLE {{shared}}.trading_ticks ADD COLUMN event_id uuid;
CREATE UNIQUE INDEX trading_ticks_event ON {{shared}}.trading_ticks (company_id, time, event_id);

ALTER TABLE {{shared}}.ai_predictions ADD COLUMN event_id uuid;
CREATE UNIQUE INDEX ai_predictions_event ON {{shared}}.ai_predictions (company_id, time, event_id);

-- Records the pipeline could not store, with the reason and the raw payload: a message that is
-- not an IngestBatch is kept whole; a rejected record is kept as a one-record IngestBatch, so a
-- replay feeds it through the same pipeline.
CREATE TABLE {{control}}.dead_letters (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    transport     text NOT NULL,                 -- nats, kafka, replay
    source        text NOT NULL,                 -- subject, or topic/partition@offset
    tenant_id     text,                          -- when the record names one
    event_id      text,
    code          text NOT NULL,                 -- stable: bad_protobuf, tenant_not_found, ...
    reason        text NOT NULL,
    payload       bytea NOT NULL,
    replayed_at   timestamptz,
    replay_result text
);
CREATE INDEX dead_letters_pending ON {{control}}.dead_letters (tenant_id, id) WHERE replayed_at IS NULL;
