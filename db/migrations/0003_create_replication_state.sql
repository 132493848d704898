-- The last stream sequence timescale-replicator has stored, per stream and durable consumer.
-- It is written in the same transaction as the rows it covers, so after a crash the
-- replicator knows exactly which redelivered messages are already in.
CREATE TABLE market.replication_state (
    stream     text        NOT NULL,
    consumer   text        NOT NULL,
    last_seq   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT replication_state_pkey PRIMARY KEY (stream, consumer),
    CONSTRAINT replication_state_last_seq_check CHECK (last_seq >= 0)
);
