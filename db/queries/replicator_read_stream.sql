-- The last stream sequence replicated for a stream and consumer, and the creation time of
-- the stream it counts (NULL: not known yet); no row when nothing was replicated.
SELECT last_seq, stream_created FROM replication_state
WHERE stream = $1 AND consumer = $2
