-- Ingestion, after a review (issue: ingestion review). Two changes:
--
-- 1. Dead letters are stored once. A poison record arrives on both transports by design, and
--    again on every redelivery; each copy used to be a row of its own (and was announced again).
--    idempotency_key is a digest of the code, tenant, event id, publisher and payload, computed
--    by the service (ingest/deadletters.py: idempotency_key) and unique here, so the service
--    inserts with ON CONFLICT DO NOTHING and announces only what it stored. Letters stored before
--    get the same digest, computed below; of duplicates already stored, the first keeps it and
--    the others keep NULL (which the unique index does not constrain), so nothing is deleted.
-- 2. A tick or prediction without a user id is the company's: user_id NULL, which the
--    user-level policy shows to every user of the company. Ingestion used to store protobuf's
--    default, '', which no user's context matched, so callers with a user id saw no ingested
--    market data at all (ticks, candles, last tick). The columns become nullable and existing ''
--    become NULL. candles_1m does not depend on user ids, so its UPDATE trigger (which would
--    recompute every minute the statement touched: every ingested minute) is off for that one
--    statement, in this transaction; the candles stay exactly as they are.

-- 1. Dead letters.
ALTER TABLE {{control}}.dead_letters ADD COLUMN idempotency_key bytea;

WITH keyed AS (
    SELECT id, sha256(
               convert_to('dbsvc-dead-letter', 'UTF8') || '\x00'::bytea
               || CASE WHEN code IS NULL THEN '\x2d'::bytea
                       ELSE convert_to(octet_length(convert_to(code, 'UTF8')) || ':' || code,
                                       'UTF8') END
               || CASE WHEN tenant_id IS NULL THEN '\x2d'::bytea
                       ELSE convert_to(octet_length(convert_to(tenant_id, 'UTF8')) || ':'
                                       || tenant_id, 'UTF8') END
               || CASE WHEN event_id IS NULL THEN '\x2d'::bytea
                       ELSE convert_to(octet_length(convert_to(event_id, 'UTF8')) || ':'
                                       || event_id, 'UTF8') END
               || CASE WHEN service IS NULL THEN '\x2d'::bytea
                       ELSE convert_to(octet_length(convert_to(service, 'UTF8')) || ':'
                                       || service, 'UTF8') END
               || payload) AS k
    FROM {{control}}.dead_letters
), first_of_each AS (
    SELECT DISTINCT ON (k) id, k FROM keyed ORDER BY k, id
)
UPDATE {{control}}.dead_letters d SET idempotency_key = f.k
FROM first_of_each f WHERE d.id = f.id;

CREATE UNIQUE INDEX dead_letters_idempotency ON {{control}}.dead_letters (idempotency_key);

-- 2. No user id: NULL. DROP NOT NULL on the partitioned parents reaches every partition,
-- including the range partitions maintenance created standalone (LIKE the parent) and attached.
ALTER TABLE {{shared}}.trading_ticks ALTER COLUMN user_id DROP NOT NULL;
ALTER TABLE {{shared}}.ai_predictions ALTER COLUMN user_id DROP NOT NULL;

ALTER TABLE {{shared}}.trading_ticks DISABLE TRIGGER candles_1m_update;
UPDATE {{shared}}.trading_ticks SET user_id = NULL WHERE user_id = '';
ALTER TABLE {{shared}}.trading_ticks ENABLE TRIGGER candles_1m_update;
UPDATE {{shared}}.ai_predictions SET user_id = NULL WHERE user_id = '';
