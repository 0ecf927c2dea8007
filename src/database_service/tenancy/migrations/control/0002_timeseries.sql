-- Time series (issue: time-series engine). trading_ticks and ai_predictions become partitioned
-- by time range; the partitions themselves are created ahead and dropped past retention by the
-- service's maintenance task (timeseries/partitions.py). A DEFAULT partition catches records with
-- no partition yet (late, or far in the future), so an insert never fails for its timestamp.
-- 1-minute candles of ticks are kept in candles_1m by statement triggers: inserted ticks are
-- merged into their buckets incrementally (first/last tick times decide open and close, so a late
-- tick lands where it belongs); deletes and updates recompute the touched buckets from the raw
-- ticks.

ALTER TABLE {{shared}}.trading_ticks RENAME TO trading_ticks_unpartitioned;
ALTER TABLE {{shared}}.ai_predictions RENAME TO ai_predictions_unpartitioned;
ALTER INDEX {{shared}}.trading_ticks_company_symbol_time RENAME TO trading_ticks_unpartitioned_idx;
ALTER INDEX {{shared}}.ai_predictions_company_symbol_time RENAME TO ai_predictions_unpartitioned_idx;

CREATE TABLE {{shared}}.trading_ticks (
    time       timestamptz NOT NULL,
    company_id varchar(50) NOT NULL DEFAULT {{control}}.session_company(),
    user_id    varchar(50) NOT NULL,
    symbol     varchar(20) NOT NULL,
    bid        numeric(10, 5),
    ask        numeric(10, 5),
    volume     integer,
    spread     numeric(6, 2)
) PARTITION BY RANGE (time);
CREATE INDEX trading_ticks_company_symbol_time ON {{shared}}.trading_ticks (company_id, symbol, time);
CREATE TABLE {{shared}}.trading_ticks_default PARTITION OF {{shared}}.trading_ticks DEFAULT;

CREATE TABLE {{shared}}.ai_predictions (
    time            timestamptz NOT NULL,
    company_id      varchar(50) NOT NULL DEFAULT {{control}}.session_company(),
    user_id         varchar(50) NOT NULL,
    symbol          varchar(20) NOT NULL,
    prediction_type varchar(50) NOT NULL,
    confidence      numeric(3, 2) NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    model_version   varchar(20),
    features        jsonb,
    result          jsonb
) PARTITION BY RANGE (time);
CREATE INDEX ai_predictions_company_symbol_time ON {{shared}}.ai_predictions (company_id, symbol, time);
CREATE TABLE {{shared}}.ai_predictions_default PARTITION OF {{shared}}.ai_predictions DEFAULT;

INSERT INTO {{shared}}.trading_ticks SELECT * FROM {{shared}}.trading_ticks_unpartitioned;
INSERT INTO {{shared}}.ai_predictions SELECT * FROM {{shared}}.ai_predictions_unpartitioned;
DROP TABLE {{shared}}.trading_ticks_unpartitioned;
DROP TABLE {{shared}}.ai_predictions_unpartitioned;

CREATE TABLE {{shared}}.candles_1m (
    company_id  varchar(50) NOT NULL,
    symbol      varchar(20) NOT NULL,
    bucket      timestamptz NOT NULL,
    open        numeric NOT NULL,
    high        numeric NOT NULL,
    low         numeric NOT NULL,
    close       numeric NOT NULL,
    volume      bigint NOT NULL,
    ticks       integer NOT NULL,
    price_volume numeric NOT NULL,           -- sum(price * volume), for VWAP over any interval
    spread_sum  numeric NOT NULL,
    spread_min  numeric,
    spread_max  numeric,
    spread_n    integer NOT NULL,
    open_time   timestamptz NOT NULL,          -- the first and last tick's time: an inserted tick
    close_time  timestamptz NOT NULL,          -- earlier/later than these becomes open/close
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (company_id, symbol, bucket)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON {{shared}}.trading_ticks, {{shared}}.ai_predictions TO {{group}};
GRANT SELECT ON {{shared}}.candles_1m TO {{group}};

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['trading_ticks', 'ai_predictions', 'candles_1m']
    LOOP
        EXECUTE format('ALTER TABLE {{shared}}.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE {{shared}}.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY company_isolation ON {{shared}}.%I AS PERMISSIVE FOR ALL TO {{group}} '
            'USING (company_id = (SELECT {{control}}.session_company())) '
            'WITH CHECK (company_id = (SELECT {{control}}.session_company()))', t);
        EXECUTE format(
            'CREATE POLICY service_owner ON {{shared}}.%I AS PERMISSIVE FOR ALL TO CURRENT_USER '
            'USING (true) WITH CHECK (true)', t);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['trading_ticks', 'ai_predictions']
    LOOP
        EXECUTE format(
            'CREATE POLICY user_isolation ON {{shared}}.%I AS RESTRICTIVE FOR ALL TO {{group}} '
            'USING (user_id IS NULL OR user_id = coalesce('
            'nullif((SELECT current_setting(''dbsvc.user_id'', true)), ''''), user_id)) '
            'WITH CHECK (user_id IS NULL OR user_id = coalesce('
            'nullif((SELECT current_setting(''dbsvc.user_id'', true)), ''''), user_id))', t);
    END LOOP;
END
$$;

-- The price of a tick is its mid, (bid + ask) / 2, or whichever side is present.
CREATE FUNCTION {{shared}}.tick_price(bid numeric, ask numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN trim_scale(coalesce((bid + ask) / 2, bid, ask));

-- Recompute the 1-minute candles of the given (company, symbol, minute) keys from the raw ticks:
-- delete them, then insert what the ticks say now (a minute left without ticks disappears).
-- lo/hi bound the minutes, so only the partitions of that time range are scanned.
CREATE FUNCTION {{shared}}.recompute_candles_1m(
        companies text[], symbols text[], buckets timestamptz[], lo timestamptz, hi timestamptz)
    RETURNS void LANGUAGE sql
    SET search_path = pg_catalog
BEGIN ATOMIC
    DELETE FROM {{shared}}.candles_1m c
    USING unnest(companies, symbols, buckets) AS k(company_id, symbol, bucket)
    WHERE c.company_id = k.company_id AND c.symbol = k.symbol AND c.bucket = k.bucket
      AND c.bucket >= lo AND c.bucket < hi;
    INSERT INTO {{shared}}.candles_1m (company_id, symbol, bucket, open, high, low, close,
        volume, ticks, price_volume, spread_sum, spread_min, spread_max, spread_n, open_time,
        close_time)
    SELECT t.company_id, t.symbol, k.bucket,
           (array_agg({{shared}}.tick_price(t.bid, t.ask) ORDER BY t.time))[1],
           max({{shared}}.tick_price(t.bid, t.ask)), min({{shared}}.tick_price(t.bid, t.ask)),
           (array_agg({{shared}}.tick_price(t.bid, t.ask) ORDER BY t.time DESC))[1],
           coalesce(sum(t.volume), 0), count(*),
           coalesce(sum({{shared}}.tick_price(t.bid, t.ask) * t.volume), 0),
           coalesce(sum(t.ask - t.bid), 0), min(t.ask - t.bid), max(t.ask - t.bid),
           count(t.ask - t.bid), min(t.time), max(t.time)
    FROM unnest(companies, symbols, buckets) AS k(company_id, symbol, bucket)
    JOIN {{shared}}.trading_ticks t
      ON t.company_id = k.company_id AND t.symbol = k.symbol
     AND t.time >= k.bucket AND t.time < k.bucket + interval '1 minute'
    WHERE t.time >= lo AND t.time < hi AND {{shared}}.tick_price(t.bid, t.ask) IS NOT NULL
    GROUP BY t.company_id, t.symbol, k.bucket;
END;
REVOKE ALL ON FUNCTION {{shared}}.recompute_candles_1m(text[], text[], timestamptz[], timestamptz, timestamptz) FROM PUBLIC;

-- Statement triggers (one call per INSERT/COPY/UPDATE/DELETE, not per row). SECURITY DEFINER:
-- tenants cannot write candles_1m themselves; the keys come only from the rows they wrote.
-- One function for all three: PL/pgSQL plans a statement when it first runs it, so each trigger
-- only ever touches the transition tables it declares.
-- Inserts are merged: the statement's ticks are aggregated per bucket and folded into the stored
-- candle (sums add up, extremes widen, open/close move only for an earlier/later tick), so the
-- cost follows the statement's size, not the bucket's (a full recompute per batch made ingestion
-- of many small batches quadratic in the ticks per minute). Deletes and updates recompute.
CREATE FUNCTION {{shared}}.candles_1m_after_write() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
AS $$
DECLARE
    companies text[];
    symbols text[];
    buckets timestamptz[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {{shared}}.candles_1m AS c (company_id, symbol, bucket, open, high, low,
            close, volume, ticks, price_volume, spread_sum, spread_min, spread_max, spread_n,
            open_time, close_time)
        SELECT company_id, symbol, bucket,
               (array_agg(price ORDER BY time))[1], max(price), min(price),
               (array_agg(price ORDER BY time DESC))[1],
               coalesce(sum(volume), 0), count(*), coalesce(sum(price * volume), 0),
               coalesce(sum(ask - bid), 0), min(ask - bid), max(ask - bid), count(ask - bid),
               min(time), max(time)
        FROM (SELECT company_id::text AS company_id, symbol::text AS symbol, time, bid, ask,
                     volume, {{shared}}.tick_price(bid, ask) AS price,
                     date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket
              FROM new_ticks) n
        WHERE price IS NOT NULL
        GROUP BY company_id, symbol, bucket
        ORDER BY company_id, symbol, bucket    -- one lock order for concurrent writers
        ON CONFLICT (company_id, symbol, bucket) DO UPDATE SET
            open = CASE WHEN excluded.open_time < c.open_time THEN excluded.open ELSE c.open END,
            close = CASE WHEN excluded.close_time >= c.close_time
                         THEN excluded.close ELSE c.close END,
            open_time = least(c.open_time, excluded.open_time),
            close_time = greatest(c.close_time, excluded.close_time),
            high = greatest(c.high, excluded.high),
            low = least(c.low, excluded.low),
            volume = c.volume + excluded.volume,
            ticks = c.ticks + excluded.ticks,
            price_volume = c.price_volume + excluded.price_volume,
            spread_sum = c.spread_sum + excluded.spread_sum,
            spread_min = least(c.spread_min, excluded.spread_min),
            spread_max = greatest(c.spread_max, excluded.spread_max),
            spread_n = c.spread_n + excluded.spread_n,
            updated_at = now();
        RETURN NULL;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(company_id), array_agg(symbol), array_agg(bucket)
        INTO companies, symbols, buckets
        FROM (SELECT DISTINCT company_id::text, symbol::text,
                     date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket
              FROM old_ticks) k;
    ELSE
        SELECT array_agg(company_id), array_agg(symbol), array_agg(bucket)
        INTO companies, symbols, buckets
        FROM (SELECT company_id::text, symbol::text,
                     date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket
              FROM old_ticks
              UNION
              SELECT company_id::text, symbol::text,
                     date_bin('1 minute', time, TIMESTAMPTZ '2000-01-01 00:00:00+00')
              FROM new_ticks) k;
    END IF;
    IF buckets IS NOT NULL THEN
        PERFORM {{shared}}.recompute_candles_1m(companies, symbols, buckets,
            (SELECT min(b) FROM unnest(buckets) b),
            (SELECT max(b) FROM unnest(buckets) b) + interval '1 minute');
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION {{shared}}.candles_1m_after_write() FROM PUBLIC;

CREATE TRIGGER candles_1m_insert AFTER INSERT ON {{shared}}.trading_ticks
    REFERENCING NEW TABLE AS new_ticks FOR EACH STATEMENT
    EXECUTE FUNCTION {{shared}}.candles_1m_after_write();
CREATE TRIGGER candles_1m_delete AFTER DELETE ON {{shared}}.trading_ticks
    REFERENCING OLD TABLE AS old_ticks FOR EACH STATEMENT
    EXECUTE FUNCTION {{shared}}.candles_1m_after_write();
CREATE TRIGGER candles_1m_update AFTER UPDATE ON {{shared}}.trading_ticks
    REFERENCING OLD TABLE AS old_ticks NEW TABLE AS new_ticks FOR EACH STATEMENT
    EXECUTE FUNCTION {{shared}}.candles_1m_after_write();
