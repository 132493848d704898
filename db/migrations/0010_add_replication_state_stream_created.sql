-- The creation time of the stream a replication_state row counts the sequences of. A stream
-- deleted and made again under its name (a replay made again, a stream recreated by ops)
-- numbers its messages from 1 again: taken for the stream the row was written for, its
-- messages up to the stored sequence would be skipped as stored. timescale-replicator
-- records the time at its first start on the stream (rows from before this column get it
-- at their next start) and refuses to start on a stream created at another time.
ALTER TABLE market.replication_state ADD COLUMN stream_created timestamptz;

-- the replay namespaces made before this migration (market.open_namespace copies market's
-- table, so later ones have the column)
DO $$
DECLARE
    schema text;
BEGIN
    FOR schema IN
        SELECT n.nspname FROM pg_namespace n JOIN pg_class c ON c.relnamespace = n.oid
        WHERE n.nspname LIKE 'ns\_%' AND c.relname = 'replication_state' AND c.relkind = 'r'
    LOOP
        EXECUTE format('ALTER TABLE %I.replication_state ADD COLUMN stream_created timestamptz',
            schema);
    END LOOP;
END
$$;
