-- The candles of one series in a training window [$4, $5), oldest first, as the feature
-- library reads them (open time in epoch milliseconds).
SELECT (extract(epoch FROM open_time) * 1000)::bigint AS open_time_ms,
       open, high, low, close, tick_volume, spread_mean
FROM market.candles
WHERE feed = $1 AND symbol = $2 AND tf = $3
  AND open_time >= $4 AND open_time < $5
ORDER BY open_time;
