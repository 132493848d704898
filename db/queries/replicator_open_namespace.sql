-- The schema of a replay namespace's tables, made on first use (see migration 0008).
SELECT market.open_namespace($1)
