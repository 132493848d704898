"""timescale-replicator: CANDLES, FEATURES, SCORES, SIGNALS into PostgreSQL/TimescaleDB."""
