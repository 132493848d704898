-- Least privilege. Migrations run as an admin role (the owner of everything here); the
-- pipeline and its readers get group roles without login, which their login users join:
--
--   CREATE ROLE replicator LOGIN PASSWORD '...' IN ROLE tickwire_replicator;
--   CREATE ROLE grafana    LOGIN PASSWORD '...' IN ROLE tickwire_reader;
--
-- tickwire_replicator reads and upserts the market tables (no DELETE, no TRUNCATE, owns
-- nothing, so cannot DROP or ALTER) and may create temporary tables (its COPY staging).
-- tickwire_reader reads the market schema, views included, and nothing else.
--
-- Roles belong to the whole cluster, grants to one database: the roles are created once
-- (a second database, or a concurrent migrator, finds them there) and granted here.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tickwire_replicator') THEN
        CREATE ROLE tickwire_replicator NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;  -- created at the same moment by a migrator of another database
END
$$;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tickwire_reader') THEN
        CREATE ROLE tickwire_reader NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

-- Nothing in market for anyone else; nobody but the owner creates in public.
REVOKE ALL ON SCHEMA market FROM PUBLIC;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

GRANT USAGE ON SCHEMA market TO tickwire_replicator, tickwire_reader;
GRANT SELECT, INSERT, UPDATE
    ON market.candles, market.features, market.scores, market.signals,
       market.replication_state
    TO tickwire_replicator;
GRANT SELECT ON ALL TABLES IN SCHEMA market TO tickwire_reader;
-- tables and views later migrations add are readable too
ALTER DEFAULT PRIVILEGES IN SCHEMA market GRANT SELECT ON TABLES TO tickwire_reader;

DO $$
BEGIN
    EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO tickwire_replicator',
                   current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO tickwire_reader', current_database());
END
$$;
