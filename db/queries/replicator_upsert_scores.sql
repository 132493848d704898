-- Staged scores into the scores table; the same or a later candle revision wins.
-- Unqualified: the connection's search_path says market, or a replay namespace's schema.
INSERT INTO scores AS t (
    feed, symbol, tf, open_time, model_version, candle_revision, feature_set_id,
    probabilities, score, v
)
SELECT feed, symbol, tf,
       timestamptz 'epoch' + open_time_ms * INTERVAL '1 millisecond',
       model_version, candle_revision, feature_set_id, probabilities, score, v
FROM scores_staging
ON CONFLICT (feed, symbol, tf, model_version, open_time) DO UPDATE SET
    candle_revision = excluded.candle_revision,
    feature_set_id = excluded.feature_set_id,
    probabilities = excluded.probabilities,
    score = excluded.score,
    v = excluded.v
WHERE excluded.candle_revision >= t.candle_revision
