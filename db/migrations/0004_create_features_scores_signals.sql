-- What feature-builder, model-scorer and signal-publisher publish on FEATURES, SCORES and
-- SIGNALS, as timescale-replicator stores it. Each row is the latest candle revision of its
-- natural key: writers upsert and keep the row with the highest candle_revision (a later
-- revision replaces an earlier one, never the reverse). The time column `open_time` (the
-- candle's period start, UTC) is part of every unique key, as hypertables require.

-- One feature vector per candle and feature set; `values` in the order of the set's names.
CREATE TABLE market.features (
    feed            text               NOT NULL,
    symbol          text               NOT NULL,
    tf              text               NOT NULL,
    open_time       timestamptz        NOT NULL,
    feature_set_id  text               NOT NULL,
    candle_revision integer            NOT NULL,
    "values"        double precision[] NOT NULL,
    warming_up      boolean            NOT NULL,
    v               integer            NOT NULL,
    CONSTRAINT features_pkey PRIMARY KEY (feed, symbol, tf, feature_set_id, open_time),
    CONSTRAINT features_tf_check CHECK (tf IN ('M1', 'M5', 'M15', 'M30', 'H1', 'H4', 'D1')),
    CONSTRAINT features_revision_check CHECK (candle_revision >= 0)
);

-- One score per candle and model version.
CREATE TABLE market.scores (
    feed            text               NOT NULL,
    symbol          text               NOT NULL,
    tf              text               NOT NULL,
    open_time       timestamptz        NOT NULL,
    model_version   text               NOT NULL,
    candle_revision integer            NOT NULL,
    feature_set_id  text               NOT NULL,
    probabilities   double precision[] NOT NULL,
    score           double precision   NOT NULL,
    v               integer            NOT NULL,
    CONSTRAINT scores_pkey PRIMARY KEY (feed, symbol, tf, model_version, open_time),
    CONSTRAINT scores_tf_check CHECK (tf IN ('M1', 'M5', 'M15', 'M30', 'H1', 'H4', 'D1')),
    CONSTRAINT scores_revision_check CHECK (candle_revision >= 0),
    CONSTRAINT scores_score_check CHECK (score BETWEEN -1 AND 1)
);

-- One signal per candle and model version: a revision that changes the decision replaces
-- the row (its `corrects` names the signal it replaces). `signal_id` is the Nats-Msg-Id
-- subscribers saw.
CREATE TABLE market.signals (
    feed            text             NOT NULL,
    symbol          text             NOT NULL,
    tf              text             NOT NULL,
    open_time       timestamptz      NOT NULL,
    model_version   text             NOT NULL,
    candle_revision integer          NOT NULL,
    signal_id       text             NOT NULL,
    side            text             NOT NULL,
    strength        double precision NOT NULL,
    ref_price       double precision NOT NULL,
    expires_at      timestamptz      NOT NULL,
    feature_set_id  text             NOT NULL,
    corrects        text,
    v               integer          NOT NULL,
    CONSTRAINT signals_pkey PRIMARY KEY (feed, symbol, tf, model_version, open_time),
    CONSTRAINT signals_tf_check CHECK (tf IN ('M1', 'M5', 'M15', 'M30', 'H1', 'H4', 'D1')),
    CONSTRAINT signals_revision_check CHECK (candle_revision >= 0),
    CONSTRAINT signals_side_check CHECK (side IN ('BUY', 'SELL', 'FLAT')),
    CONSTRAINT signals_strength_check CHECK (strength BETWEEN 0 AND 1),
    CONSTRAINT signals_ref_price_check CHECK (ref_price > 0),
    CONSTRAINT signals_expiry_check CHECK (expires_at > open_time)
);
CREATE INDEX signals_signal_id_idx ON market.signals (signal_id, open_time);

-- With TimescaleDB: one-day chunks, compressed after a week, dropped after their retention
-- (features and scores 180 days: rebuildable from candles; signals 90 days: the audit trail
-- of what was sent stays a month in SIGNALS as well). Candles are kept (0002, no retention).
DO $$
DECLARE
    -- table, columns a compressed segment is made of, retention
    policy record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        FOR policy IN
            SELECT * FROM (VALUES
                ('market.features', 'feed, symbol, tf, feature_set_id', INTERVAL '180 days'),
                ('market.scores',   'feed, symbol, tf, model_version',  INTERVAL '180 days'),
                ('market.signals',  'feed, symbol, tf, model_version',  INTERVAL '90 days')
            ) AS p (hypertable, segmentby, retention)
        LOOP
            EXECUTE format(
                $sql$SELECT create_hypertable(%L, 'open_time',
                                              chunk_time_interval => INTERVAL '1 day',
                                              if_not_exists => TRUE)$sql$,
                policy.hypertable);
            EXECUTE format(
                $sql$ALTER TABLE %s SET (timescaledb.compress,
                                        timescaledb.compress_segmentby = %L,
                                        timescaledb.compress_orderby = 'open_time DESC')$sql$,
                policy.hypertable, policy.segmentby);
            EXECUTE format(
                $sql$SELECT add_compression_policy(%L, INTERVAL '7 days', if_not_exists => TRUE)$sql$,
                policy.hypertable);
            EXECUTE format(
                $sql$SELECT add_retention_policy(%L, %L::interval, if_not_exists => TRUE)$sql$,
                policy.hypertable, policy.retention);
        END LOOP;
    END IF;
END
$$;
