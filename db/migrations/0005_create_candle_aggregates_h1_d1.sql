-- H1 and D1 bars aggregated from the M1 candles, for dashboards and quick reads:
-- market.candles_h1 and market.candles_d1, the same columns on both kinds of server.
--
-- With TimescaleDB they are continuous aggregates (real-time: materialized buckets plus the
-- newest rows), refreshed by a policy. On plain PostgreSQL they are ordinary views that
-- aggregate on every read. Buckets are UTC hours and UTC days; the broker-day D1 candles
-- candle-ingest publishes (configurable day start) are in market.candles with tf = 'D1'.
--
-- Columns: feed, symbol, open_time (bucket start), open, high, low, close, tick_volume,
-- real_volume, spread_max, m1_count (M1 candles in the bucket).

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        -- WITH NO DATA: creating with data cannot run inside a transaction; the policy fills it
        EXECUTE $sql$
            CREATE MATERIALIZED VIEW market.candles_h1
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT feed, symbol,
                   time_bucket(INTERVAL '1 hour', open_time) AS open_time,
                   first(open, open_time) AS open,
                   max(high) AS high,
                   min(low) AS low,
                   last(close, open_time) AS close,
                   sum(tick_volume)::bigint AS tick_volume,
                   sum(real_volume) AS real_volume,
                   max(spread_max) AS spread_max,
                   count(*) AS m1_count
            FROM market.candles
            WHERE tf = 'M1'
            GROUP BY feed, symbol, time_bucket(INTERVAL '1 hour', open_time)
            WITH NO DATA
        $sql$;
        EXECUTE $sql$
            CREATE MATERIALIZED VIEW market.candles_d1
            WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
            SELECT feed, symbol,
                   time_bucket(INTERVAL '1 day', open_time) AS open_time,
                   first(open, open_time) AS open,
                   max(high) AS high,
                   min(low) AS low,
                   last(close, open_time) AS close,
                   sum(tick_volume)::bigint AS tick_volume,
                   sum(real_volume) AS real_volume,
                   max(spread_max) AS spread_max,
                   count(*) AS m1_count
            FROM market.candles
            WHERE tf = 'M1'
            GROUP BY feed, symbol, time_bucket(INTERVAL '1 day', open_time)
            WITH NO DATA
        $sql$;
        EXECUTE $sql$
            SELECT add_continuous_aggregate_policy('market.candles_h1',
                start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
                schedule_interval => INTERVAL '15 minutes', if_not_exists => TRUE)
        $sql$;
        EXECUTE $sql$
            SELECT add_continuous_aggregate_policy('market.candles_d1',
                start_offset => INTERVAL '10 days', end_offset => INTERVAL '1 day',
                schedule_interval => INTERVAL '1 hour', if_not_exists => TRUE)
        $sql$;
    ELSE
        -- open/close: the first and last M1 of the bucket by time
        EXECUTE $sql$
            CREATE VIEW market.candles_h1 AS
            SELECT feed, symbol,
                   date_trunc('hour', open_time, 'UTC') AS open_time,
                   (array_agg(open ORDER BY open_time))[1] AS open,
                   max(high) AS high,
                   min(low) AS low,
                   (array_agg(close ORDER BY open_time DESC))[1] AS close,
                   sum(tick_volume)::bigint AS tick_volume,
                   sum(real_volume) AS real_volume,
                   max(spread_max) AS spread_max,
                   count(*) AS m1_count
            FROM market.candles
            WHERE tf = 'M1'
            GROUP BY feed, symbol, date_trunc('hour', open_time, 'UTC')
        $sql$;
        EXECUTE $sql$
            CREATE VIEW market.candles_d1 AS
            SELECT feed, symbol,
                   date_trunc('day', open_time, 'UTC') AS open_time,
                   (array_agg(open ORDER BY open_time))[1] AS open,
                   max(high) AS high,
                   min(low) AS low,
                   (array_agg(close ORDER BY open_time DESC))[1] AS close,
                   sum(tick_volume)::bigint AS tick_volume,
                   sum(real_volume) AS real_volume,
                   max(spread_max) AS spread_max,
                   count(*) AS m1_count
            FROM market.candles
            WHERE tf = 'M1'
            GROUP BY feed, symbol, date_trunc('day', open_time, 'UTC')
        $sql$;
    END IF;
END
$$;
