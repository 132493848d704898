-- Drop a replay namespace's schema and everything in it; false when it did not exist.
SELECT market.drop_namespace($1)
