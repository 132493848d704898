-- Closed candles (and their revisions) as candle-ingest publishes them on CANDLES.
-- Natural key: (feed, symbol, tf, open_time). Writers upsert on it and keep the row with the
-- highest revision: a later revision replaces an earlier one, never the reverse.
-- Times: open_time/close_time are the period [start, end) in UTC; first_tick_ms and
-- last_tick_ms keep the message's epoch milliseconds as they are.
CREATE TABLE market.candles (
    feed          text             NOT NULL,
    symbol        text             NOT NULL,
    tf            text             NOT NULL,
    open_time     timestamptz      NOT NULL,
    close_time    timestamptz      NOT NULL,
    open          double precision NOT NULL,
    high          double precision NOT NULL,
    low           double precision NOT NULL,
    close         double precision NOT NULL,
    tick_volume   bigint           NOT NULL,
    real_volume   double precision NOT NULL,
    spread_mean   double precision NOT NULL,
    spread_max    double precision NOT NULL,
    first_tick_ms bigint           NOT NULL,
    last_tick_ms  bigint           NOT NULL,
    revision      integer          NOT NULL,
    v             integer          NOT NULL,
    -- the time column is part of every unique key, as hypertables require
    CONSTRAINT candles_pkey PRIMARY KEY (feed, symbol, tf, open_time),
    CONSTRAINT candles_tf_check CHECK (tf IN ('M1', 'M5', 'M15', 'M30', 'H1', 'H4', 'D1')),
    CONSTRAINT candles_period_check CHECK (close_time > open_time),
    CONSTRAINT candles_range_check CHECK (low <= high),
    CONSTRAINT candles_revision_check CHECK (revision >= 0)
);

-- With TimescaleDB: one-day chunks, compressed once they are a week old (late revisions
-- arrive within minutes). EXECUTE strings keep plain PostgreSQL from parsing them.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        EXECUTE $sql$
            SELECT create_hypertable('market.candles', 'open_time',
                                     chunk_time_interval => INTERVAL '1 day',
                                     if_not_exists => TRUE)
        $sql$;
        EXECUTE $sql$
            ALTER TABLE market.candles SET (
                timescaledb.compress,
                timescaledb.compress_segmentby = 'feed, symbol, tf',
                timescaledb.compress_orderby = 'open_time DESC'
            )
        $sql$;
        EXECUTE $sql$
            SELECT add_compression_policy('market.candles', INTERVAL '7 days',
                                          if_not_exists => TRUE)
        $sql$;
    END IF;
END
$$;
