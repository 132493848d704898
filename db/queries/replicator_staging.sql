-- timescale-replicator: per-connection staging tables that batches are COPYed into before
-- the upsert. Times are epoch milliseconds as the messages carry them; the upsert converts.
-- ON COMMIT DELETE ROWS: every transaction starts with empty staging tables.
CREATE TEMPORARY TABLE IF NOT EXISTS candles_staging (
    feed text, symbol text, tf text, open_time_ms bigint, close_time_ms bigint,
    open double precision, high double precision, low double precision,
    close double precision, tick_volume bigint, real_volume double precision,
    spread_mean double precision, spread_max double precision, first_tick_ms bigint,
    last_tick_ms bigint, revision integer, v integer
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS features_staging (
    feed text, symbol text, tf text, open_time_ms bigint, feature_set_id text,
    candle_revision integer, "values" double precision[], warming_up boolean, v integer
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS scores_staging (
    feed text, symbol text, tf text, open_time_ms bigint, model_version text,
    candle_revision integer, feature_set_id text, probabilities double precision[],
    score double precision, v integer
) ON COMMIT DELETE ROWS;
CREATE TEMPORARY TABLE IF NOT EXISTS signals_staging (
    feed text, symbol text, tf text, open_time_ms bigint, model_version text,
    candle_revision integer, signal_id text, side text, strength double precision,
    ref_price double precision, expires_ms bigint, feature_set_id text, corrects text,
    v integer
) ON COMMIT DELETE ROWS;
