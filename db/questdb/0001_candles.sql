-- QuestDB hot store of candles, written by candle-ingest over ILP/HTTP.
-- One statement per file: QuestDB's /exec runs one statement per request.
-- `{prefix}` is replaced by db.questdb.apply_ddl with a validated table-name prefix: ""
-- for the live table, e.g. "replay_7f3a_" for a replay or a test. Nothing else is replaced.
--
-- ts is the candle's open time (the designated timestamp). WAL + DEDUP UPSERT KEYS make a
-- rewrite of the same (ts, feed, symbol, tf) replace the row: the writer sends revisions in
-- order, so the last row written is the highest revision.
CREATE TABLE IF NOT EXISTS {prefix}candles (
    ts            TIMESTAMP,
    feed          SYMBOL,
    symbol        SYMBOL,
    tf            SYMBOL,
    close_time    TIMESTAMP,
    open          DOUBLE,
    high          DOUBLE,
    low           DOUBLE,
    close         DOUBLE,
    tick_volume   LONG,
    real_volume   DOUBLE,
    spread_mean   DOUBLE,
    spread_max    DOUBLE,
    first_tick_ms LONG,
    last_tick_ms  LONG,
    revision      INT,
    v             INT
) TIMESTAMP(ts) PARTITION BY DAY WAL
DEDUP UPSERT KEYS(ts, feed, symbol, tf);
