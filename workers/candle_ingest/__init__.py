"""candle-ingest: ticks and backfill bars -> candles of every configured timeframe."""
