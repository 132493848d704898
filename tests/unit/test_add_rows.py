"""``Aggregator.add_rows`` does exactly what ``check_tick`` then ``add`` per tick does.

The batch path keeps in-order ticks in local variables; these tests hold it to the
tick-by-tick path on streams with every kind of trouble: ticks out of order, too late,
duplicated, bad prices, sequence gaps, watermarks, all price sources.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from contracts.codec import Codec
from contracts.messages import Candle, Tick, TickBatch, TickInput, TickRow, Watermark
from tests import market
from workers.candle_ingest.aggregate import (
    ACCEPTED,
    DUPLICATE,
    Aggregator,
    AggregatorConfig,
    PriceSource,
)
from workers.candle_ingest.validate import check_tick

SKEW_MS = 60_000

Rows = tuple[str, str, tuple[Tick | TickRow, ...]]


def _messages(seed: int, *, regroup: bool) -> Iterator[Rows | Watermark]:
    """The scenario's messages; ``regroup``: each symbol's ticks re-cut into runs of 1-120."""
    sc = market.scenario(seed=seed, ticks=30_000)
    codec: Codec[TickInput] = Codec(TickInput, max_bytes=1 << 20)
    decoded = [codec.decode(payload) for _, _, payload, _ in sc.messages]
    last = {}
    for m in decoded:
        assert isinstance(m, Tick | TickBatch)
        last[m.feed, m.symbol] = m.ticks[-1].time_ms if isinstance(m, TickBatch) else m.time_ms
    if not regroup:
        for m in decoded:
            if isinstance(m, TickBatch):
                yield m.feed, m.symbol, tuple(m.ticks)
            elif isinstance(m, Tick):
                yield m.feed, m.symbol, (m,)
    else:
        rng = random.Random(seed)
        per: dict[tuple[str, str], list[Tick | TickRow]] = {}
        for m in decoded:
            rows = tuple(m.ticks) if isinstance(m, TickBatch) else (m,)
            per.setdefault((m.feed, m.symbol), []).extend(rows)  # type: ignore[arg-type]
        cursors = dict.fromkeys(per, 0)
        while cursors:
            key = rng.choice(sorted(cursors))
            i = cursors[key]
            n = rng.randint(1, 120)
            yield key[0], key[1], tuple(per[key][i : i + n])
            cursors[key] = i + n
            if i + n >= len(per[key]):
                del cursors[key]
    # idle symbols closed at the end, as the worker's watermarks do
    for (feed, symbol), t in sorted(last.items()):
        yield Watermark(feed=feed, symbol=symbol, time_ms=t + 10 * 86_400_000)


def _one_by_one(
    agg: Aggregator, feed: str, symbol: str, rows: tuple[Any, ...], now_ms: int
) -> tuple[list[Candle], list[int], list[Any]]:
    out: list[Candle] = []
    times: list[int] = []
    accepted = duplicate = gap = 0
    refused = []
    for i, t in enumerate(rows):
        reason = check_tick(
            t.time_ms, t.bid, t.ask, t.last, t.volume, now_ms=now_ms, max_future_skew_ms=SKEW_MS
        )
        if reason is not None:
            refused.append((i, reason))
            continue
        r = agg.add(feed, symbol, t.time_ms, t.bid, t.ask, t.last, t.volume, t.seq)
        gap += r.gap
        if r.outcome == ACCEPTED:
            accepted += 1
            out += r.candles
            times += [t.time_ms] * len(r.candles)
        elif r.outcome == DUPLICATE:
            duplicate += 1
        else:
            refused.append((i, r.outcome))
    return out, times, [accepted, duplicate, gap, refused]


@pytest.mark.parametrize("regroup", [False, True])
@pytest.mark.parametrize(
    ("price", "lateness", "delay"),
    [
        (PriceSource.BID, 60_000, 0),
        (PriceSource.MID, 60_000, 2_000),
        (PriceSource.BID, 0, 0),
        (PriceSource.BID, 600_000, 30_000),
    ],
)
def test_add_rows_equals_tick_by_tick(
    price: PriceSource, lateness: int, delay: int, regroup: bool
) -> None:
    config = AggregatorConfig(
        price=price, day_start_ms=79_200_000, allowed_lateness_ms=lateness, close_delay_ms=delay
    )
    batched, single = Aggregator(config), Aggregator(config)
    # "now" inside the stream: its later ticks are in the future, refused as future_time
    now_ms = market.START_MS + 3 * 3_600_000
    candles = accepted = 0
    reasons: set[str] = set()
    for item in _messages(seed=7, regroup=regroup):
        if isinstance(item, Watermark):
            got = batched.advance(item.feed, item.symbol, item.time_ms)
            assert got == single.advance(item.feed, item.symbol, item.time_ms)
            candles += len(got)
            continue
        feed, symbol, rows = item
        out: list[Candle] = []
        times: list[int] = []
        result = batched.add_rows(
            feed, symbol, rows, now_ms=now_ms, max_future_skew_ms=SKEW_MS, out=out, out_times=times
        )
        want_out, want_times, want = _one_by_one(single, feed, symbol, rows, now_ms)
        assert out == want_out
        assert times == want_times
        assert [result.accepted, result.duplicate, result.gap, result.refused] == want
        assert result.watermark == single.watermark(feed, symbol)
        candles += len(out)
        accepted += result.accepted
        reasons.update(reason for _, reason in result.refused)
    assert batched.snapshot() == single.snapshot()
    # the comparison covered real work: candles, refusals of several kinds
    assert candles > 100
    assert accepted > 15_000
    assert {"too_late", "bad_price", "bid_above_ask", "future_time"} <= reasons


def test_a_price_source_without_last_refuses_each_tick() -> None:
    agg = Aggregator(AggregatorConfig(price=PriceSource.LAST))
    # none, or 0 as MT5 gives it for a symbol without deals
    rows = tuple(
        TickRow(time_ms=1_000 + i, bid=1.0, ask=1.1, last=0.0 if i % 2 else None, seq=i + 1)
        for i in range(5)
    )
    result = agg.add_rows(
        "f", "S", rows, now_ms=10_000, max_future_skew_ms=SKEW_MS, out=[], out_times=[]
    )
    assert result.refused == [(i, "no_last_price") for i in range(5)]
    assert result.accepted == 0


def test_an_empty_value_from_a_faulty_ea_is_refused_inside_a_run() -> None:
    """MT5's EMPTY_VALUE (DBL_MAX) as bid, ask, last or volume, in the middle of in-order
    ticks the batch path folds in its fast run: each is refused where it stands, as
    tick by tick, and the mid price of the others stays finite."""
    big = 1.7976931348623157e308
    bad = {3: {"bid": big, "ask": big}, 5: {"ask": big}, 8: {"last": big}, 11: {"volume": big}}
    rows = tuple(
        TickRow(time_ms=1_000 + 100 * i, **({"bid": 1.0, "ask": 1.1} | bad.get(i, {})))
        for i in range(14)
    )
    config = AggregatorConfig(price=PriceSource.MID)
    batched, single = Aggregator(config), Aggregator(config)
    out: list[Candle] = []
    result = batched.add_rows(
        "f", "S", rows, now_ms=10_000, max_future_skew_ms=SKEW_MS, out=out, out_times=[]
    )
    _, _, want = _one_by_one(single, "f", "S", rows, 10_000)
    assert result.refused == want[3]
    assert result.refused == [
        (3, "bad_price"),
        (5, "bad_price"),
        (8, "bad_price"),
        (11, "bad_volume"),
    ]
    assert result.accepted == 10
    closed = batched.advance("f", "S", 7 * 86_400_000)
    assert len(closed) == 7  # one of each timeframe
    for candle in closed:
        assert (candle.high, candle.low, candle.tick_volume) == (1.05, 1.05, 10)
