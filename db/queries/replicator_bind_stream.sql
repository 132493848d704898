-- Record which stream (by its creation time) a consumer's sequences count: a row of its
-- own at sequence 0, or the time set on a row that has none or has stored nothing yet.
INSERT INTO replication_state AS s (stream, consumer, last_seq, stream_created)
VALUES ($1, $2, 0, $3)
ON CONFLICT (stream, consumer) DO UPDATE SET stream_created = excluded.stream_created
WHERE s.stream_created IS NULL OR s.last_seq = 0
