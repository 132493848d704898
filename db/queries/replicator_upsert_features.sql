-- Staged feature vectors into the features table; the same or a later candle revision wins.
-- Unqualified: the connection's search_path says market, or a replay namespace's schema.
INSERT INTO features AS t (
    feed, symbol, tf, open_time, feature_set_id, candle_revision, "values", warming_up, v
)
SELECT feed, symbol, tf,
       timestamptz 'epoch' + open_time_ms * INTERVAL '1 millisecond',
       feature_set_id, candle_revision, "values", warming_up, v
FROM features_staging
ON CONFLICT (feed, symbol, tf, feature_set_id, open_time) DO UPDATE SET
    candle_revision = excluded.candle_revision,
    "values" = excluded."values",
    warming_up = excluded.warming_up,
    v = excluded.v
WHERE excluded.candle_revision >= t.candle_revision
