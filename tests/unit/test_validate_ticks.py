"""Tick and bar validation: one reason per kind of bad input, None for good input."""

from __future__ import annotations

import math

import msgspec
import pytest

from contracts.codec import ContractError
from contracts.messages import Bar, Timeframe
from contracts.servertime import Periods
from workers.candle_ingest.validate import (
    SalvagedBatch,
    TicksCodec,
    check_bar,
    check_symbol,
    check_tick,
)

NOW = 1_704_362_400_000
SKEW = 5_000
NAN = math.nan
INF = math.inf
DBL_MAX = 1.7976931348623157e308


def tick(
    time_ms: int = NOW,
    bid: float = 1.10001,
    ask: float = 1.10003,
    last: float | None = None,
    volume: float | None = None,
) -> str | None:
    return check_tick(time_ms, bid, ask, last, volume, now_ms=NOW, max_future_skew_ms=SKEW)


def test_good_ticks_pass() -> None:
    assert tick() is None
    assert tick(bid=9.99e14, ask=9.99e14, last=9.99e14, volume=9.99e14) is None  # below 1e15
    assert tick(bid=1.1, ask=1.1) is None  # zero spread
    assert tick(last=1.10002, volume=0.0) is None
    assert tick(volume=12.5) is None
    assert tick(time_ms=NOW + SKEW) is None
    assert tick(time_ms=0) is None  # old ticks are the aggregator's business (too_late)


@pytest.mark.parametrize(
    ("bid", "ask", "last"),
    [
        (NAN, 1.1, None),
        (1.1, NAN, None),
        (INF, INF, None),
        (1.1, INF, None),
        (-INF, 1.1, None),
        (0.0, 1.1, None),
        (-1.1, 1.1, None),
        (1.1, 0.0, None),
        (1.1, 1.1, NAN),
        (1.1, 1.1, INF),
        (1.1, 1.1, -1.1),
        # MT5's EMPTY_VALUE (DBL_MAX) from a faulty EA, and anything from 1e15 on
        (DBL_MAX, DBL_MAX, None),
        (1.1, DBL_MAX, None),
        (1.1, 1.1, DBL_MAX),
        (1e15, 1e15, None),
    ],
)
def test_bad_price(bid: float, ask: float, last: float | None) -> None:
    assert tick(bid=bid, ask=ask, last=last) == "bad_price"


def test_a_last_price_of_zero_is_none_as_mt5_means_it() -> None:
    """MT5 fills ``MqlTick.last`` with 0 for a symbol without deals (forex): an EA that copies
    it must not have every tick refused."""
    assert tick(bid=1.1, ask=1.1, last=0.0) is None


def test_bid_above_ask() -> None:
    assert tick(bid=1.10004, ask=1.10003) == "bid_above_ask"


def test_volume() -> None:
    assert tick(volume=-1.0) == "negative_volume"
    assert tick(volume=-INF) == "negative_volume"
    assert tick(volume=NAN) == "bad_volume"
    assert tick(volume=INF) == "bad_volume"
    assert tick(volume=DBL_MAX) == "bad_volume"


def test_future_time() -> None:
    assert tick(time_ms=NOW + SKEW + 1) == "future_time"


@pytest.mark.parametrize("symbol", ["EURUSD", "US500.cash", "BRK B", "EUR/USD", "#AAPL"])
def test_legal_symbols(symbol: str) -> None:
    assert check_symbol(symbol) is None


@pytest.mark.parametrize("symbol", ["", "x" * 65, "EUR\nUSD", " EURUSD", "EURUSD\t", "A\x00B"])
def test_illegal_symbols(symbol: str) -> None:
    assert check_symbol(symbol) == "illegal_symbol"


def bar(**kw: object) -> str | None:
    fields: dict[str, object] = {
        "feed": "a", "symbol": "EURUSD", "tf": Timeframe.H4,
        "open_time_ms": NOW - NOW % 86_400_000 + 2 * 3_600_000,
        "open": 1.1, "high": 1.2, "low": 1.0, "close": 1.15, "tick_volume": 10,
        "real_volume": 0.0, "spread": 0.0001,
    }  # fmt: skip
    fields.update(kw)
    b = Bar(**fields)  # type: ignore[arg-type]
    return check_bar(b, periods=Periods(79_200_000), now_ms=NOW, max_future_skew_ms=SKEW)


def test_bars() -> None:
    assert bar() is None
    assert bar(low=0.0) == "bad_price"
    assert bar(high=NAN) == "bad_price"
    assert bar(high=1.12) == "bad_ohlc"  # below the close
    assert bar(low=1.12) == "bad_ohlc"  # above the open
    assert bar(spread=NAN) == "bad_volume"
    assert bar(real_volume=INF) == "bad_volume"
    assert bar(high=DBL_MAX) == "bad_price"
    assert bar(real_volume=DBL_MAX) == "bad_volume"
    assert bar(spread=1e15) == "bad_volume"
    assert bar(open_time_ms=NOW - NOW % 86_400_000) == "misaligned_bar"  # 00:00, day starts 22:00
    assert bar(tf=Timeframe.M1, open_time_ms=NOW + 60_000) == "future_time"


def test_a_batch_keeps_the_ticks_that_decode_and_refuses_the_others_alone() -> None:
    rows = [
        {"time_ms": 1_741_600_800_123, "bid": 1.1, "ask": 1.2, "seq": 1},
        {"time_ms": -5, "bid": 1.1, "ask": 1.2, "seq": 2},  # negative
        {"time_ms": 1_741_600_800_200.5, "bid": 1.1, "ask": 1.2, "seq": 3},  # not an integer
        {"bid": 1.1, "ask": 1.2, "seq": 4},  # no time
        {"time_ms": 1_741_600_800_300, "bid": 1.1, "ask": 1.2, "seq": 5},
    ]
    batch = {"type": "tick_batch", "feed": "icm-live", "symbol": "EURUSD", "ticks": rows}
    codec = TicksCodec()
    got = codec.decode(msgspec.json.encode(batch))
    assert isinstance(got, SalvagedBatch)
    assert (got.feed, got.symbol) == ("icm-live", "EURUSD")
    assert [t.seq for t in got.ticks] == [1, 5]
    assert got.index == (0, 4)
    assert [(i, msgspec.json.decode(raw), reason) for i, raw, reason, _ in got.refused] == [
        (1, rows[1], "invalid_value"),
        (2, rows[2], "invalid_value"),
        (3, rows[3], "missing_field"),
    ]
    # a bad envelope, or no tick to keep, is the whole message's fault
    for whole in (
        {**batch, "feed": "icm.live"},
        {**batch, "v": 9},
        {**batch, "ticks": rows[1:4]},
    ):
        with pytest.raises(ContractError):
            codec.decode(msgspec.json.encode(whole))
    assert not isinstance(
        codec.decode(msgspec.json.encode({**batch, "ticks": rows[:1]})), SalvagedBatch
    )
