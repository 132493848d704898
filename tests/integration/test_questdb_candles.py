"""The QuestDB candles table on a real server: ILP/HTTP writes deduplicate on the natural key."""

from __future__ import annotations

from typing import Any

import pytest
from questdb import Sender, TimestampMicros, TimestampNanos

from db.questdb import apply_ddl, query, table_name, wait_for_wal
from infra.stack import QuestDBUrls

pytestmark = pytest.mark.integration

OPEN_MS = 1_704_164_640_000  # 2024-01-02T03:04:00Z
CANDLE: dict[str, Any] = {
    "feed": "mt5-demo",
    "symbol": "US500.cash",
    "tf": "M1",
    "open_time_ms": OPEN_MS,
    "close_time_ms": OPEN_MS + 60_000,
    "open": 4742.25,
    "high": 4743.5,
    "low": 4741.0,
    "close": 4742.75,
    "tick_volume": 57,
    "real_volume": 0.0,
    "spread_mean": 0.45,
    "spread_max": 0.9,
    "first_tick_ms": OPEN_MS + 120,
    "last_tick_ms": OPEN_MS + 59_870,
    "revision": 0,
    "v": 1,
}


def write(conf: str, table: str, candle: dict[str, Any]) -> None:
    """One candle as candle-ingest writes it: its own ILP/HTTP request, flushed."""
    key = ("feed", "symbol", "tf")
    times = ("open_time_ms", "close_time_ms")
    with Sender.from_conf(conf) as sender:
        sender.row(
            table,
            symbols={name: candle[name] for name in key},
            columns={
                "close_time": TimestampMicros(candle["close_time_ms"] * 1000),
                **{name: value for name, value in candle.items() if name not in key + times},
            },
            at=TimestampNanos(candle["open_time_ms"] * 1_000_000),
        )
        sender.flush()


def as_row(candle: dict[str, Any]) -> dict[str, Any]:
    """The row QuestDB's JSON gives back for `candle`."""
    row = {name: value for name, value in candle.items() if not name.endswith("_time_ms")}
    return {
        "ts": "2024-01-02T03:04:00.000000Z",
        **row,
        "close_time": "2024-01-02T03:05:00.000000Z",
    }


def test_the_same_candle_twice_is_one_row_and_a_revision_replaces_it(
    questdb: QuestDBUrls, unique: str
) -> None:
    prefix = f"{unique}_"
    apply_ddl(questdb.http, table_prefix=prefix)
    apply_ddl(questdb.http, table_prefix=prefix)  # idempotent
    table = table_name("candles", table_prefix=prefix)
    read_all = "SELECT * FROM {prefix}candles"

    write(questdb.ilp_conf, table, CANDLE)
    write(questdb.ilp_conf, table, CANDLE)
    wait_for_wal(questdb.http, table)
    rows = query(questdb.http, read_all, table_prefix=prefix)
    assert rows == [as_row(CANDLE)]

    revised = {**CANDLE, "close": 4743.0, "high": 4743.75, "tick_volume": 61, "revision": 1}
    write(questdb.ilp_conf, table, revised)
    wait_for_wal(questdb.http, table)
    rows = query(questdb.http, read_all, table_prefix=prefix)
    assert rows == [as_row(revised)]


def test_the_table_is_a_wal_table_deduplicating_on_the_natural_key(
    questdb: QuestDBUrls, unique: str
) -> None:
    prefix = f"{unique}_"
    apply_ddl(questdb.http, table_prefix=prefix)
    table = table_name("candles", table_prefix=prefix)

    [described] = [r for r in query(questdb.http, "tables()") if r["table_name"] == table]
    assert described["walEnabled"] is True
    assert described["dedup"] is True
    assert described["designatedTimestamp"] == "ts"
    assert described["partitionBy"] == "DAY"
    columns = query(questdb.http, "SHOW COLUMNS FROM {prefix}candles", table_prefix=prefix)
    upsert_keys = [c["column"] for c in columns if c["upsertKey"]]
    assert upsert_keys == ["ts", "feed", "symbol", "tf"]
    assert {c["column"]: c["type"] for c in columns if c["type"] == "SYMBOL"} == {
        "feed": "SYMBOL",
        "symbol": "SYMBOL",
        "tf": "SYMBOL",
    }
