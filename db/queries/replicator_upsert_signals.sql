-- Staged signals into the signals table; the same or a later candle revision wins.
-- Unqualified: the connection's search_path says market, or a replay namespace's schema.
INSERT INTO signals AS t (
    feed, symbol, tf, open_time, model_version, candle_revision, signal_id, side, strength,
    ref_price, expires_at, feature_set_id, corrects, v
)
SELECT feed, symbol, tf,
       timestamptz 'epoch' + open_time_ms * INTERVAL '1 millisecond',
       model_version, candle_revision, signal_id, side, strength, ref_price,
       timestamptz 'epoch' + expires_ms * INTERVAL '1 millisecond',
       feature_set_id, corrects, v
FROM signals_staging
ON CONFLICT (feed, symbol, tf, model_version, open_time) DO UPDATE SET
    candle_revision = excluded.candle_revision,
    signal_id = excluded.signal_id,
    side = excluded.side,
    strength = excluded.strength,
    ref_price = excluded.ref_price,
    expires_at = excluded.expires_at,
    feature_set_id = excluded.feature_set_id,
    corrects = excluded.corrects,
    v = excluded.v
WHERE excluded.candle_revision >= t.candle_revision
