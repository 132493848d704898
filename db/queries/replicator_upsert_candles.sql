-- Staged candles into the candles table. A row is replaced only by the same or a later
-- revision: a redelivered older revision never overwrites a newer one.
-- Unqualified: the connection's search_path says market, or a replay namespace's schema.
INSERT INTO candles AS t (
    feed, symbol, tf, open_time, close_time, open, high, low, close, tick_volume,
    real_volume, spread_mean, spread_max, first_tick_ms, last_tick_ms, revision, v
)
SELECT feed, symbol, tf,
       timestamptz 'epoch' + open_time_ms * INTERVAL '1 millisecond',
       timestamptz 'epoch' + close_time_ms * INTERVAL '1 millisecond',
       open, high, low, close, tick_volume, real_volume, spread_mean, spread_max,
       first_tick_ms, last_tick_ms, revision, v
FROM candles_staging
ON CONFLICT (feed, symbol, tf, open_time) DO UPDATE SET
    close_time = excluded.close_time,
    open = excluded.open,
    high = excluded.high,
    low = excluded.low,
    close = excluded.close,
    tick_volume = excluded.tick_volume,
    real_volume = excluded.real_volume,
    spread_mean = excluded.spread_mean,
    spread_max = excluded.spread_max,
    first_tick_ms = excluded.first_tick_ms,
    last_tick_ms = excluded.last_tick_ms,
    revision = excluded.revision,
    v = excluded.v
WHERE excluded.revision >= t.revision
