-- Record the last stream sequence of a batch, in the batch's transaction; never backwards.
INSERT INTO replication_state AS s (stream, consumer, last_seq, updated_at)
VALUES ($1, $2, $3, now())
ON CONFLICT (stream, consumer) DO UPDATE SET
    last_seq = greatest(s.last_seq, excluded.last_seq),
    updated_at = excluded.updated_at
