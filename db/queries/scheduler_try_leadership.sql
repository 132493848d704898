-- Session-level: held while this connection lives, released by PostgreSQL when it dies.
SELECT pg_try_advisory_lock(hashtext($1))
