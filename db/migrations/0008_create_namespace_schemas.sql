-- Replay namespaces in the analytic store. A pipeline run in namespace <name> replicates
-- into schema "ns_<name>", never into market: the same tables (columns, keys, checks,
-- indexes) and a replication_state of its own.
--
-- market.open_namespace(name) makes the schema when it is missing and returns its name.
-- It runs with its owner's rights (the migrating admin), so tickwire_replicator may call
-- it without the right to create anything itself; what the role then gets in the schema is
-- what it has in market: SELECT, INSERT, UPDATE on those tables, nothing else.
-- market.drop_namespace(name) drops the schema with everything in it; only the owner may
-- run it (`tickwire replay delete`, with the admin DSN).
--
-- Names are checked as the rest of tickwire checks them ([A-Za-z0-9_-]{1,32}) and quoted
-- with format('%I'); both functions pin their search_path.

CREATE FUNCTION market.namespace_schema(name text) RETURNS text
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog
AS $$
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_-]{1,32}$' THEN
        RAISE EXCEPTION 'namespace must match [A-Za-z0-9_-]{1,32}: %', name
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN 'ns_' || name;
END
$$;

CREATE FUNCTION market.open_namespace(name text) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    schema text := market.namespace_schema(name);
    t text;
BEGIN
    -- the replicator's connections (one per stream) open it at the same moment
    PERFORM pg_advisory_xact_lock(hashtext('tickwire:namespace:' || schema));
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = schema) THEN
        RETURN schema;
    END IF;
    EXECUTE format('CREATE SCHEMA %I', schema);
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', schema);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO tickwire_replicator, tickwire_reader', schema);
    FOREACH t IN ARRAY ARRAY['candles', 'features', 'scores', 'signals', 'replication_state']
    LOOP
        EXECUTE format('CREATE TABLE %I.%I (LIKE market.%I INCLUDING ALL)', schema, t, t);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %I.%I TO tickwire_replicator', schema, t);
        EXECUTE format('GRANT SELECT ON %I.%I TO tickwire_reader', schema, t);
    END LOOP;
    RETURN schema;
END
$$;

CREATE FUNCTION market.drop_namespace(name text) RETURNS boolean
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    schema text := market.namespace_schema(name);
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = schema) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP SCHEMA %I CASCADE', schema);
    RETURN true;
END
$$;

REVOKE ALL ON FUNCTION market.namespace_schema(text), market.open_namespace(text),
    market.drop_namespace(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION market.namespace_schema(text), market.open_namespace(text)
    TO tickwire_replicator;
