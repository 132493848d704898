-- The last stream sequence replicated for a stream and consumer; the row is locked until
-- the batch commits, so two writers of one consumer take turns.
SELECT last_seq FROM replication_state
WHERE stream = $1 AND consumer = $2
FOR UPDATE
