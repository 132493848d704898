-- The candles of one series in a training window [$4, $5) and the $6 candles before it
-- (the warm-up of the features that remember every earlier candle), oldest first, as the
-- feature library reads them (open time in epoch milliseconds).
SELECT open_time_ms, open, high, low, close, tick_volume, spread_mean
FROM (
    (SELECT (extract(epoch FROM open_time) * 1000)::bigint AS open_time_ms,
            open, high, low, close, tick_volume, spread_mean
     FROM market.candles
     WHERE feed = $1 AND symbol = $2 AND tf = $3 AND open_time < $4
     ORDER BY open_time DESC
     LIMIT $6)
    UNION ALL
    (SELECT (extract(epoch FROM open_time) * 1000)::bigint AS open_time_ms,
            open, high, low, close, tick_volume, spread_mean
     FROM market.candles
     WHERE feed = $1 AND symbol = $2 AND tf = $3 AND open_time >= $4 AND open_time < $5)
) AS window_and_warm_up
ORDER BY open_time_ms;
