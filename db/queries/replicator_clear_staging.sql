-- Empty the staging tables inside a transaction (the row-by-row fallback after a batch the
-- database refused stages one row at a time).
TRUNCATE candles_staging, features_staging, scores_staging, signals_staging
