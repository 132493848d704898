-- The schema a replay namespace's analytic tables live in (see migration 0008).
SELECT market.namespace_schema($1)
