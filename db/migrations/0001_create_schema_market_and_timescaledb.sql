-- Everything the pipeline stores lives in the `market` schema.
CREATE SCHEMA market;

-- TimescaleDB where the server has it (production); plain PostgreSQL otherwise (tests,
-- demo). Later migrations turn tables into hypertables only when this created the
-- extension, i.e. when `timescaledb` is in pg_extension. On a server that ships the
-- extension without preloading it, this fails loudly rather than leaving plain tables.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        EXECUTE 'CREATE EXTENSION IF NOT EXISTS timescaledb';
    END IF;
END
$$;
