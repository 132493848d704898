"""Candle aggregation against an independent pandas reference.

The reference resamples the accepted ticks with pandas (``origin`` at the day start); which
ticks are accepted comes from a small model of the rules written here (watermark, lateness,
EA sequence numbers), and the aggregator must agree with that model tick by tick.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec
import pandas as pd
import pytest

from contracts.messages import Bar, Candle, Timeframe
from tests import reference as plain
from workers.candle_ingest.aggregate import (
    MAX_MISSING_SEQS,
    Aggregator,
    AggregatorConfig,
    PriceSource,
    SnapshotMismatch,
    TickResult,
)

DAY = 86_400_000
HOUR = 3_600_000
MINUTE = 60_000
START = int(datetime(2024, 1, 4, 9, 0, tzinfo=UTC).timestamp() * 1000)  # a Thursday
FAR = 30 * DAY
FEEDS = ("brokerA", "brokerB")
SYMBOLS = ("EURUSD", "GBPUSD", "US500.cash")
TF_INDEX = {tf: i for i, tf in enumerate(Timeframe)}


class T(NamedTuple):
    feed: str
    symbol: str
    time_ms: int
    bid: float
    ask: float
    last: float | None
    volume: float | None
    seq: int | None


Key = tuple[str, str, Timeframe, int]


# --- input --------------------------------------------------------------------------


def make_stream(seed: int, n: int = 50_000) -> list[T]:
    """Ticks of 2 feeds x 3 symbols (same names on both feeds), per-symbol times
    non-decreasing, seqs 1, 2, 3... per symbol; irregular gaps, hours-long gaps, a weekend."""
    r = random.Random(seed)
    keys = [(f, s) for f in FEEDS for s in SYMBOLS]
    mid = {k: 1.0 + r.random() for k in keys}
    seq = dict.fromkeys(keys, 0)
    t = START
    out: list[T] = []
    for i in range(n):
        u = r.random()
        if i == n // 2:
            t += 2 * DAY + r.randint(0, HOUR)  # the weekend
        elif u < 0.0005:
            t += r.randint(2 * HOUR, 7 * HOUR)
        elif u < 0.01:
            t += r.randint(MINUTE, 30 * MINUTE)
        elif u < 0.1:
            pass  # same millisecond
        else:
            t += r.randint(1, 3000)
        k = r.choice(keys)
        mid[k] = max(0.5, mid[k] + r.randint(-30, 30) / 100_000)
        bid = round(mid[k], 5)
        ask = round(bid + r.randint(0, 30) / 100_000, 5)
        last = round(bid + r.randint(0, 5) / 100_000, 5) if r.random() < 0.9 else None
        volume = float(r.randint(1, 20)) if r.random() < 0.8 else None
        seq[k] += 1
        out.append(T(*k, t, bid, ask, last, volume, seq[k]))
    return out


def shuffle_windows(ticks: Sequence[T], seed: int, size: int) -> list[T]:
    r = random.Random(seed)
    out: list[T] = []
    for i in range(0, len(ticks), size):
        chunk = list(ticks[i : i + size])
        r.shuffle(chunk)
        out.extend(chunk)
    return out


# --- the model of which ticks are accepted --------------------------------------------


class Expected(NamedTuple):
    outcomes: list[str]
    gaps: int


def expected(ticks: Iterable[T], lateness: int, price: PriceSource) -> Expected:
    wm: dict[tuple[str, str], int] = {}
    max_seq: dict[tuple[str, str], int] = {}
    low: dict[tuple[str, str], int] = {}
    missing: dict[tuple[str, str], set[int]] = {}
    outcomes: list[str] = []
    gaps = 0
    for tk in ticks:
        k = (tk.feed, tk.symbol)
        if price is PriceSource.LAST and tk.last is None:
            outcomes.append("no_last_price")
            continue
        if k in wm and tk.time_ms < wm[k] - lateness:
            outcomes.append("too_late")
            continue
        if tk.seq is not None:
            if k not in max_seq or tk.seq > max_seq[k]:
                if k in max_seq:
                    gaps += tk.seq - max_seq[k] - 1
                    missing[k].update(range(max_seq[k] + 1, tk.seq))
                else:
                    low[k] = tk.seq
                max_seq[k] = tk.seq
                missing.setdefault(k, set())
            elif tk.seq in missing[k]:
                missing[k].remove(tk.seq)
            elif tk.time_ms > wm[k]:
                max_seq[k] = low[k] = tk.seq
                missing[k] = set()
            elif tk.seq < low[k]:  # sent before every number seen so far: not seen
                missing[k].update(range(tk.seq + 1, low[k]))
                low[k] = tk.seq
            else:
                outcomes.append("duplicate")
                continue
        wm[k] = max(wm.get(k, tk.time_ms), tk.time_ms)
        outcomes.append("accepted")
    return Expected(outcomes, gaps)


# --- the reference ------------------------------------------------------------------


def reference(
    ticks: Sequence[T],
    timeframes: Iterable[Timeframe] = tuple(Timeframe),
    day_start_ms: int = 0,
    price: PriceSource = PriceSource.BID,
) -> dict[Key, dict[str, float]]:
    """Candles of the given (accepted) ticks by pandas resampling, keyed by natural key."""
    df = pd.DataFrame(list(ticks), columns=list(T._fields))
    df["arrival"] = range(len(df))
    df["price"] = {
        PriceSource.BID: df["bid"],
        PriceSource.MID: (df["bid"] + df["ask"]) / 2,
        PriceSource.LAST: df["last"],
    }[price]
    df["spread"] = df["ask"] - df["bid"]
    df["volume"] = df["volume"].fillna(0.0)
    # first/last by time; among equal times by arrival
    df = df.sort_values(["time_ms", "arrival"], kind="stable")
    df.index = pd.to_datetime(df["time_ms"], unit="ms")
    origin = pd.Timestamp(day_start_ms % DAY, unit="ms")
    out: dict[Key, dict[str, float]] = {}
    for (feed, symbol), g in df.groupby(["feed", "symbol"], sort=True):
        for tf in timeframes:
            grouper = pd.Grouper(freq=pd.Timedelta(milliseconds=tf.ms), origin=origin)
            agg = g.groupby(grouper).agg(
                open=("price", "first"),
                high=("price", "max"),
                low=("price", "min"),
                close=("price", "last"),
                tick_volume=("price", "count"),
                real_volume=("volume", "sum"),
                spread_mean=("spread", "mean"),
                spread_max=("spread", "max"),
                first_tick_ms=("time_ms", "min"),
                last_tick_ms=("time_ms", "max"),
            )
            agg = agg[agg["tick_volume"] > 0]
            for row in agg.itertuples():
                open_ms = row.Index.value // 1_000_000
                out[(str(feed), str(symbol), tf, open_ms)] = {
                    "close_time_ms": open_ms + tf.ms,
                    **{f: getattr(row, f) for f in agg.columns},
                }
    return out


# --- running the aggregator ---------------------------------------------------------


class Run(NamedTuple):
    outcomes: list[str]
    gaps: int
    emitted: list[Candle]
    per_call: list[list[Candle]]


def feed_ticks(agg: Aggregator, ticks: Iterable[T]) -> Run:
    outcomes: list[str] = []
    per_call: list[list[Candle]] = []
    gaps = 0
    for tk in ticks:
        res = agg.add(*tk)
        outcomes.append(res.outcome)
        gaps += res.gap
        per_call.append(list(res.candles))
    return Run(outcomes, gaps, [c for cs in per_call for c in cs], per_call)


def drain(agg: Aggregator) -> list[Candle]:
    """Close everything still open, as a watermark far in the future would."""
    return [
        c
        for feed, sym in agg.symbols()
        for c in agg.advance(feed, sym, agg_wm(agg, feed, sym) + FAR)
    ]


def agg_wm(agg: Aggregator, feed: str, symbol: str) -> int:
    wm = agg.watermark(feed, symbol)
    assert wm is not None
    return wm


def final_candles(emitted: Iterable[Candle]) -> dict[Key, Candle]:
    """Latest revision per natural key; revisions of a key must come as 0, 1, 2..."""
    out: dict[Key, Candle] = {}
    for c in emitted:
        key = (c.feed, c.symbol, c.tf, c.open_time_ms)
        prev = out.get(key)
        assert c.revision == (0 if prev is None else prev.revision + 1), (key, c.revision)
        out[key] = c
    return out


def assert_matches(got: dict[Key, Candle], want: dict[Key, dict[str, float]]) -> None:
    assert sorted(got) == sorted(want)
    for key, ref in want.items():
        c = got[key]
        exact = {f: getattr(c, f) for f in ref if f != "spread_mean"}
        assert exact == {f: ref[f] for f in exact}, key
        assert c.spread_mean == pytest.approx(ref["spread_mean"], rel=1e-12, abs=1e-15), key


def assert_emission_order(per_call: Iterable[list[Candle]]) -> None:
    for cs in per_call:
        order = [(TF_INDEX[c.tf], c.open_time_ms) for c in cs]
        assert order == sorted(order)


@pytest.fixture(scope="module")
def stream() -> list[T]:
    return make_stream(seed=7)


# --- the cases ----------------------------------------------------------------------


def test_in_order_stream_equals_the_pandas_reference(stream: list[T]) -> None:
    agg = Aggregator(AggregatorConfig())
    run = feed_ticks(agg, stream)
    assert set(run.outcomes) == {"accepted"}
    assert run.gaps == 0
    assert all(c.revision == 0 and c.source == "ticks" for c in run.emitted)
    assert agg.open_candles() <= len(FEEDS) * len(SYMBOLS) * len(Timeframe)
    assert_emission_order(run.per_call)
    got = final_candles(run.emitted + drain(agg))
    assert agg.open_candles() == 0
    assert_matches(got, reference(stream))
    # the stream really has a weekend and multi-hour holes, and several days
    assert len({k[3] for k in got if k[2] is Timeframe.D1}) >= 5


def test_closed_candles_go_out_when_the_watermark_reaches_their_close(stream: list[T]) -> None:
    """Each candle is emitted by the first tick whose time reaches close + delay, not before."""
    for delay in (0, 5_000):
        agg = Aggregator(AggregatorConfig(close_delay_ms=delay))
        wm: dict[tuple[str, str], int] = {}
        for tk in stream[:20_000]:
            before = wm.get((tk.feed, tk.symbol), -1)
            res = agg.add(*tk)
            wm[(tk.feed, tk.symbol)] = max(before, tk.time_ms)
            for c in res.candles:
                assert (c.feed, c.symbol) == (tk.feed, tk.symbol)
                assert before < c.close_time_ms + delay <= tk.time_ms


@pytest.mark.parametrize("delay", [0, 5_000])
def test_out_of_order_ticks_revise_candles(stream: list[T], delay: int) -> None:
    ticks = shuffle_windows(stream, seed=3, size=7)
    config = AggregatorConfig(close_delay_ms=delay)
    agg = Aggregator(config)
    run = feed_ticks(agg, ticks)
    want = expected(ticks, config.allowed_lateness_ms, config.price)
    assert run.outcomes == want.outcomes
    assert run.gaps == want.gaps > 0
    assert "too_late" in run.outcomes  # windows across the multi-hour holes
    assert any(c.revision > 0 for c in run.emitted)
    assert_emission_order(run.per_call)
    accepted = [tk for tk, o in zip(ticks, run.outcomes, strict=True) if o == "accepted"]
    assert_matches(final_candles(run.emitted + drain(agg)), reference(accepted))


def test_ticks_beyond_lateness_duplicates_and_dropped_ticks(stream: list[T]) -> None:
    r = random.Random(11)
    ticks: list[T] = []
    sent: list[T] = []
    for tk in stream:
        u = r.random()
        if u < 0.01:
            continue  # lost on the way: its seq shows as a gap
        ticks.append(tk)
        sent.append(tk)
        if u < 0.03 and len(sent) > 20:  # the EA sends an earlier tick again
            ticks.append(sent[-r.randint(1, 20)])
        elif u < 0.04:  # a stale tick, minutes behind
            stale = tk.time_ms - r.randint(61_000, 10 * MINUTE)
            ticks.append(tk._replace(time_ms=stale, seq=None))
    config = AggregatorConfig(allowed_lateness_ms=60_000)
    agg = Aggregator(config)
    run = feed_ticks(agg, ticks)
    want = expected(ticks, config.allowed_lateness_ms, config.price)
    assert run.outcomes == want.outcomes
    assert {"duplicate", "too_late"} <= set(run.outcomes)
    assert 0 < run.gaps == want.gaps <= len(stream) - len(sent)
    accepted = [tk for tk, o in zip(ticks, run.outcomes, strict=True) if o == "accepted"]
    assert accepted == sent  # each tick that came, once
    assert_matches(final_candles(run.emitted + drain(agg)), reference(accepted))


def test_ea_restart_resets_the_sequence() -> None:
    agg = Aggregator(AggregatorConfig())
    for i in range(1, 6):
        assert agg.add("a", "EURUSD", START + i, 1.1, 1.1, seq=100 + i).outcome == "accepted"
    assert agg.add("a", "EURUSD", START + 5, 1.1, 1.1, seq=103).outcome == "duplicate"
    assert agg.add("a", "EURUSD", START + 6, 1.1, 1.1, seq=1).outcome == "accepted"  # restart
    assert agg.add("a", "EURUSD", START + 7, 1.1, 1.1, seq=3) == TickResult("accepted", [], 1)
    assert agg.add("a", "EURUSD", START + 7, 1.1, 1.1, seq=3).outcome == "duplicate"
    assert agg.add("a", "EURUSD", START + 7, 1.1, 1.1, seq=104).outcome == "accepted"  # > max
    # the EA's first tick after its restart, retried: below every number since, not seen
    assert agg.add("a", "EURUSD", START + 6, 1.1, 1.1, seq=0).outcome == "accepted"
    assert agg.add("a", "EURUSD", START + 6, 1.1, 1.1, seq=0).outcome == "duplicate"


def test_a_number_below_every_one_seen_is_a_tick_not_yet_seen() -> None:
    """An EA that retries a publish sends it after later ticks: the first numbers a symbol
    shows need not be its lowest."""
    agg = Aggregator(AggregatorConfig())
    assert agg.add("a", "X", START + 100, 1.0, 1.0, seq=8).outcome == "accepted"
    assert agg.add("a", "X", START + 50, 1.0, 1.0, seq=5).outcome == "accepted"
    assert agg.add("a", "X", START + 50, 1.0, 1.0, seq=5).outcome == "duplicate"
    assert agg.add("a", "X", START + 70, 1.0, 1.0, seq=7).outcome == "accepted"  # between
    assert agg.add("a", "X", START + 60, 1.0, 1.0, seq=6).outcome == "accepted"
    for seq in (5, 6, 7, 8):
        assert agg.add("a", "X", START + 100, 1.0, 1.0, seq=seq).outcome == "duplicate"
    assert agg.add("a", "X", START + 101, 1.0, 1.0, seq=9) == TickResult("accepted", [], 0)
    # the numbers survive a snapshot
    again = Aggregator.restore(AggregatorConfig(), agg.snapshot())
    assert again.add("a", "X", START + 40, 1.0, 1.0, seq=4).outcome == "accepted"
    assert again.add("a", "X", START + 60, 1.0, 1.0, seq=6).outcome == "duplicate"


def test_gaps_and_late_fills() -> None:
    agg = Aggregator(AggregatorConfig())
    assert agg.add("a", "X", START, 1.0, 1.0, seq=1).gap == 0
    assert agg.add("a", "X", START + 10, 1.0, 1.0, seq=5).gap == 3
    assert agg.filled == 0
    assert agg.add("a", "X", START + 5, 1.0, 1.0, seq=3) == TickResult("accepted", [], 0)
    assert agg.filled == 1  # of the 3 missing, one came after all
    assert agg.add("a", "X", START + 5, 1.0, 1.0, seq=3).outcome == "duplicate"
    assert agg.add("a", "X", START + 10, 1.0, 1.0, seq=5).outcome == "duplicate"
    assert agg.add("a", "X", START + 11, 1.0, 1.0, seq=7).gap == 1
    # no seq: never a duplicate here (the stream's Nats-Msg-Id dedups those)
    assert agg.add("a", "X", START + 11, 1.0, 1.0).outcome == "accepted"
    assert agg.add("a", "X", START + 11, 1.0, 1.0).outcome == "accepted"


def test_lateness_boundary() -> None:
    agg = Aggregator(AggregatorConfig(allowed_lateness_ms=MINUTE))
    agg.add("a", "X", START + 2 * MINUTE, 1.0, 1.0)
    assert agg.add("a", "X", START + MINUTE - 1, 1.0, 1.0).outcome == "too_late"
    assert agg.add("a", "X", START + MINUTE, 1.0, 1.0).outcome == "accepted"


def test_missing_seqs_are_capped_over_several_gaps() -> None:
    agg = Aggregator(AggregatorConfig())
    agg.add("a", "X", START, 1.0, 1.0, seq=0)
    half = MAX_MISSING_SEQS // 2 + 1000
    assert agg.add("a", "X", START + 1, 1.0, 1.0, seq=half + 1).gap == half
    assert agg.add("a", "X", START + 2, 1.0, 1.0, seq=2 * half + 2).gap == half
    # 2 * half > MAX_MISSING_SEQS: the oldest are forgotten, the newest kept
    assert agg.add("a", "X", START + 2, 1.0, 1.0, seq=1).outcome == "duplicate"
    assert agg.add("a", "X", START + 2, 1.0, 1.0, seq=half + 2).outcome == "accepted"


def test_missing_seqs_are_bounded() -> None:
    agg = Aggregator(AggregatorConfig())
    agg.add("a", "X", START, 1.0, 1.0, seq=1)
    assert agg.add("a", "X", START + 1, 1.0, 1.0, seq=1_000_002).gap == 1_000_000
    assert agg.add("a", "X", START + 1, 1.0, 1.0, seq=1_000_001).outcome == "accepted"
    # only the newest MAX_MISSING_SEQS are remembered: an older one reads as a duplicate
    old = 1_000_002 - MAX_MISSING_SEQS - 5
    assert agg.add("a", "X", START + 1, 1.0, 1.0, seq=old).outcome == "duplicate"
    assert len(agg.snapshot()) < 200_000
    # missing seqs are forgotten once their time is beyond the lateness
    agg.add("a", "X", START + 10 * MINUTE, 1.0, 1.0, seq=1_000_003)
    assert len(agg.snapshot()) < 1_000


def test_day_start_at_22_utc_aligns_d1_and_h4(stream: list[T]) -> None:
    for day_start in (79_200_000, -7_200_000):  # the same broker day, normalised
        config = AggregatorConfig(
            timeframes=(Timeframe.D1, Timeframe.H4, Timeframe.M1), day_start_ms=day_start
        )
        assert config.day_start_ms == 79_200_000
        assert config.timeframes == (Timeframe.M1, Timeframe.H4, Timeframe.D1)
        agg = Aggregator(config)
        run = feed_ticks(agg, stream)
        got = final_candles(run.emitted + drain(agg))
        d1 = [k[3] for k in got if k[2] is Timeframe.D1]
        assert d1
        assert all(o % DAY == 22 * HOUR for o in d1)
        assert all(k[3] % (4 * HOUR) == 2 * HOUR for k in got if k[2] is Timeframe.H4)
        assert_matches(got, reference(stream, config.timeframes, day_start_ms=79_200_000))


@pytest.mark.parametrize("price", [PriceSource.MID, PriceSource.LAST])
def test_price_sources(stream: list[T], price: PriceSource) -> None:
    ticks = stream[:20_000]
    agg = Aggregator(AggregatorConfig(price=price))
    run = feed_ticks(agg, ticks)
    want = expected(ticks, 60_000, price)
    assert run.outcomes == want.outcomes
    if price is PriceSource.LAST:
        assert "no_last_price" in run.outcomes
    accepted = [tk for tk, o in zip(ticks, run.outcomes, strict=True) if o == "accepted"]
    assert_matches(final_candles(run.emitted + drain(agg)), reference(accepted, price=price))


@pytest.mark.parametrize("delay", [0, 2_000])
def test_advance_closes_what_a_tick_at_that_time_would(stream: list[T], delay: int) -> None:
    config = AggregatorConfig(close_delay_ms=delay)
    agg = Aggregator(config)
    r = random.Random(5)
    probes = 0
    for i, tk in enumerate(stream[:30_000]):
        agg.add(*tk)
        if i % 300:
            continue
        for feed, symbol in agg.symbols():
            wm = agg_wm(agg, feed, symbol)
            boundary = (wm // MINUTE + 1) * MINUTE  # START is on a minute
            next_hour = (wm // HOUR + 1) * HOUR
            steps = [wm + 1, wm + 59_999, wm + 61_000, wm + 5 * HOUR, wm + 3 * DAY]
            w = r.choice([*steps, boundary, boundary + delay, next_hour + delay])
            by_advance = Aggregator.restore(config, agg.snapshot())
            by_tick = Aggregator.restore(config, agg.snapshot())
            closed = by_advance.advance(feed, symbol, w)
            tick = by_tick.add(feed, symbol, w, 1.5, 1.5001)
            assert tick.outcome == "accepted"
            assert closed == tick.candles
            assert by_advance.watermark(feed, symbol) == by_tick.watermark(feed, symbol) == w
            probes += bool(closed)
    assert probes > 50
    # never backwards, and nothing for unknown symbols
    wm = agg_wm(agg, "brokerA", "EURUSD")
    assert agg.advance("brokerA", "EURUSD", wm - HOUR) == []
    assert agg.watermark("brokerA", "EURUSD") == wm
    assert agg.advance("brokerC", "EURUSD", wm + DAY) == []
    assert agg.watermark("brokerC", "EURUSD") is None


@pytest.mark.parametrize("delay", [0, 2_000])
def test_next_close_is_when_advance_first_closes_something(stream: list[T], delay: int) -> None:
    config = AggregatorConfig(close_delay_ms=delay)
    agg = Aggregator(config)
    assert agg.next_close_ms("brokerA", "EURUSD") is None
    for i, tk in enumerate(stream[:20_000]):
        agg.add(*tk)
        if i % 500:
            continue
        for feed, symbol in agg.symbols():
            w = agg.next_close_ms(feed, symbol)
            assert w is not None
            copy = Aggregator.restore(config, agg.snapshot())
            assert copy.advance(feed, symbol, w - 1) == []
            closed = copy.advance(feed, symbol, w)
            assert closed
            assert min(c.close_time_ms for c in closed) + delay == w
    drain(agg)
    assert all(agg.next_close_ms(f, s) is None for f, s in agg.symbols())


def test_advancing_idle_symbols_while_streaming_changes_no_candle(stream: list[T]) -> None:
    agg = Aggregator(AggregatorConfig())
    emitted: list[Candle] = []
    for i, tk in enumerate(stream):
        emitted += agg.add(*tk).candles
        if i % 100 == 0:  # a Watermark message: every symbol is at least this far
            for feed, symbol in agg.symbols():
                emitted += agg.advance(feed, symbol, tk.time_ms)
    assert_matches(final_candles(emitted + drain(agg)), reference(stream))


def test_snapshot_and_restore_mid_stream_change_nothing(stream: list[T]) -> None:
    ticks = shuffle_windows(stream, seed=9, size=5)
    config = AggregatorConfig(close_delay_ms=1_000)
    for cut in (len(ticks) // 3, len(ticks) // 2 + 17):
        whole = Aggregator(config)
        uninterrupted = feed_ticks(whole, ticks)
        first = Aggregator(config)
        head = feed_ticks(first, ticks[:cut])
        first.last_stream_seq = cut
        snap = first.snapshot()
        second = Aggregator.restore(config, snap)
        assert second.last_stream_seq == cut
        assert second.snapshot() == snap
        assert second.symbols() == first.symbols()
        assert second.open_candles() == first.open_candles()
        tail = feed_ticks(second, ticks[cut:])
        assert head.per_call + tail.per_call == uninterrupted.per_call
        assert head.outcomes + tail.outcomes == uninterrupted.outcomes
        assert drain(second) == drain(whole)
        assert second.snapshot() != snap


def test_restore_refuses_another_config_or_garbage() -> None:
    agg = Aggregator(AggregatorConfig())
    agg.add("a", "X", START, 1.0, 1.0)
    snap = agg.snapshot()
    with pytest.raises(SnapshotMismatch):
        Aggregator.restore(AggregatorConfig(day_start_ms=HOUR), snap)
    with pytest.raises(SnapshotMismatch):
        Aggregator.restore(AggregatorConfig(timeframes=(Timeframe.M1,)), snap)
    with pytest.raises(SnapshotMismatch):
        Aggregator.restore(AggregatorConfig(), b"\x93garbage")


def test_same_calls_give_byte_identical_output(stream: list[T]) -> None:
    ticks = shuffle_windows(stream, seed=1, size=4)

    def once() -> tuple[bytes, bytes]:
        agg = Aggregator(AggregatorConfig(day_start_ms=79_200_000, close_delay_ms=500))
        run = feed_ticks(agg, ticks)
        return msgspec.json.encode(run.emitted + drain(agg)), agg.snapshot()

    assert once() == once()


def test_feeds_are_never_mixed() -> None:
    agg = Aggregator(AggregatorConfig(timeframes=(Timeframe.M1, Timeframe.H1)))
    for i in range(100):
        agg.add("brokerA", "EURUSD", START + i * 1000, 1.1, 1.1002, volume=1.0, seq=i)
        agg.add("brokerB", "EURUSD", START + i * 1000, 2.2, 2.2001, volume=3.0, seq=i)
    got = final_candles(drain(agg))
    assert {(k[0], k[2]) for k in got} == {
        (f, tf) for f in ("brokerA", "brokerB") for tf in (Timeframe.M1, Timeframe.H1)
    }
    for key, c in got.items():
        price = 1.1 if key[0] == "brokerA" else 2.2
        assert c.open == c.high == c.low == c.close == price
        assert c.real_volume == c.tick_volume * (1.0 if key[0] == "brokerA" else 3.0)
    assert sum(c.tick_volume for k, c in got.items() if k[2] is Timeframe.H1) == 200


def test_ties_keep_arrival_order() -> None:
    agg = Aggregator(AggregatorConfig(timeframes=(Timeframe.M1, Timeframe.M5)))
    agg.add("a", "X", START + 10, 1.00002, 1.1)
    agg.add("a", "X", START + 5, 1.00001, 1.1)  # earlier: the new open
    agg.add("a", "X", START + 5, 1.00003, 1.1)  # same time, later arrival: not the open
    agg.add("a", "X", START + 20, 1.00004, 1.1)
    agg.add("a", "X", START + 20, 1.00005, 1.1)  # same time, later arrival: the close
    (m1, m5) = agg.advance("a", "X", START + DAY)
    for c in (m1, m5):
        assert (c.open, c.close, c.first_tick_ms, c.last_tick_ms) == (
            1.00001, 1.00005, START + 5, START + 20,
        )  # fmt: skip


def test_a_late_tick_into_a_closed_empty_period_emits_it() -> None:
    tfs = (Timeframe.M1, Timeframe.M5)
    agg = Aggregator(AggregatorConfig(timeframes=tfs, allowed_lateness_ms=5 * MINUTE))
    t0 = START  # START is on a 5-minute boundary
    agg.add("a", "X", t0, 1.0, 1.0)
    (closed,) = agg.add("a", "X", t0 + 2 * MINUTE, 1.0, 1.0).candles  # closes M1 t0
    res = agg.add("a", "X", t0 + MINUTE + 1, 2.0, 2.0)  # the M1 t0+1m had no tick
    assert [(c.tf, c.open_time_ms, c.revision, c.high) for c in res.candles] == [
        (Timeframe.M1, t0 + MINUTE, 0, 2.0)
    ]
    res = agg.add("a", "X", t0 + 30_000, 3.0, 3.0)  # into the closed M1 t0: a revision
    assert [(c.tf, c.open_time_ms, c.revision, c.high, c.tick_volume) for c in res.candles] == [
        (Timeframe.M1, t0, 1, 3.0, 2)
    ]
    assert (closed.revision, closed.tick_volume) == (0, 1)
    (m1, m5) = agg.advance("a", "X", t0 + 5 * MINUTE)
    assert (m1.open_time_ms, m5.open_time_ms, m5.tick_volume, m5.high) == (
        t0 + 2 * MINUTE, t0, 4, 3.0,
    )  # fmt: skip


def test_a_late_tick_after_advance_revises_the_larger_candle() -> None:
    tfs = (Timeframe.M1, Timeframe.M5)
    agg = Aggregator(AggregatorConfig(timeframes=tfs, allowed_lateness_ms=2 * MINUTE))
    agg.add("a", "X", START + 10_000, 1.0, 1.0)
    closed = agg.advance("a", "X", START + 5 * MINUTE + 30_000)
    assert [(c.tf, c.open_time_ms) for c in closed] == [(tf, START) for tf in tfs]
    res = agg.add("a", "X", START + 4 * MINUTE + 50_000, 2.0, 2.0)  # M1 START+4m had none
    assert [(c.tf, c.open_time_ms, c.revision, c.tick_volume, c.close) for c in res.candles] == [
        (Timeframe.M1, START + 4 * MINUTE, 0, 1, 2.0),
        (Timeframe.M5, START, 1, 2, 2.0),
    ]
    assert agg.advance("a", "X", START + DAY) == []  # nothing else was open


def test_several_candles_due_at_once_go_out_by_open_time() -> None:
    """With a close delay longer than the period, a late tick can open an older candle after
    a newer one; both close on the same call, oldest first."""
    tfs = (Timeframe.M1, Timeframe.M5)
    config = AggregatorConfig(
        timeframes=tfs, allowed_lateness_ms=5 * MINUTE, close_delay_ms=150_000
    )
    agg = Aggregator(config)
    agg.add("a", "X", START + 2 * MINUTE + 10_000, 1.0, 1.0)
    assert agg.add("a", "X", START + 3 * MINUTE + 1_000, 1.0, 1.0).candles == []
    assert agg.add("a", "X", START + 30_000, 2.0, 2.0).candles == []  # M1 START, still open
    assert agg.open_candles() == 4
    closed = agg.advance("a", "X", START + 10 * MINUTE)
    assert [(c.tf, c.open_time_ms) for c in closed] == [
        (Timeframe.M1, START),
        (Timeframe.M1, START + 2 * MINUTE),
        (Timeframe.M1, START + 3 * MINUTE),
        (Timeframe.M5, START),
    ]
    assert (closed[-1].open, closed[-1].tick_volume) == (2.0, 3)


def test_kept_candles_are_evicted_after_the_lateness() -> None:
    agg = Aggregator(AggregatorConfig(allowed_lateness_ms=MINUTE))
    for i in range(3 * 24 * 60):
        agg.add("a", "X", START + i * MINUTE, 1.0, 1.0)
    size = len(agg.snapshot())
    for i in range(3 * 24 * 60, 6 * 24 * 60):
        agg.add("a", "X", START + i * MINUTE, 1.0, 1.0)
    assert len(agg.snapshot()) <= size + 200
    assert agg.add("a", "X", START + (6 * 24 * 60 - 3) * MINUTE, 1.0, 1.0).outcome == "too_late"


def test_open_candles_counts_every_timeframe() -> None:
    agg = Aggregator(AggregatorConfig())
    assert agg.open_candles() == 0
    agg.add("a", "X", START, 1.0, 1.0)
    assert agg.open_candles() == 7
    agg.add("a", "X", START + MINUTE, 1.0, 1.0)  # M1 START closes
    assert agg.open_candles() == 7
    agg.add("a", "Y", START, 1.0, 1.0)
    assert agg.open_candles() == 14
    assert agg.symbols() == [("a", "X"), ("a", "Y")]


# --- bars ---------------------------------------------------------------------------


def bars_of(stream: list[T], feed: str, symbol: str, tf: Timeframe = Timeframe.M1) -> list[Bar]:
    """The ``tf`` bars (the reference's candles) of one symbol of the stream."""
    rows = reference([tk for tk in stream if (tk.feed, tk.symbol) == (feed, symbol)], (tf,))
    return [
        Bar(
            feed=feed,
            symbol=symbol,
            tf=tf,
            open_time_ms=key[3],
            open=r["open"],
            high=r["high"],
            low=r["low"],
            close=r["close"],
            tick_volume=int(r["tick_volume"]),
            real_volume=r["real_volume"],
            spread=r["spread_mean"],
        )
        for key, r in sorted(rows.items(), key=lambda kv: kv[0][3])
    ]


def bars_reference(
    bars: list[Bar], tf: Timeframe, day_start_ms: int
) -> dict[Key, dict[str, float]]:
    df = pd.DataFrame(
        {
            "open": [b.open for b in bars],
            "high": [b.high for b in bars],
            "low": [b.low for b in bars],
            "close": [b.close for b in bars],
            "ticks": [b.tick_volume for b in bars],
            "volume": [b.real_volume for b in bars],
            "spread": [b.spread for b in bars],
            "start": [b.open_time_ms for b in bars],
            "end": [b.open_time_ms + Timeframe(b.tf).ms - 1 for b in bars],
        },
        index=pd.to_datetime([b.open_time_ms for b in bars], unit="ms"),
    )
    grouper = pd.Grouper(
        freq=pd.Timedelta(milliseconds=tf.ms), origin=pd.Timestamp(day_start_ms, unit="ms")
    )
    agg = df.groupby(grouper).agg(
        open=("open", "first"), high=("high", "max"), low=("low", "min"),
        close=("close", "last"), tick_volume=("ticks", "sum"), real_volume=("volume", "sum"),
        spread_mean=("spread", "mean"), spread_max=("spread", "max"),
        first_tick_ms=("start", "min"), last_tick_ms=("end", "max"), n=("open", "count"),
    )  # fmt: skip
    agg = agg[agg["n"] > 0].drop(columns="n")
    feed, symbol = bars[0].feed, bars[0].symbol
    return {
        (feed, symbol, tf, row.Index.value // 1_000_000): {
            "close_time_ms": row.Index.value // 1_000_000 + tf.ms,
            **{f: getattr(row, f) for f in agg.columns},
        }
        for row in agg.itertuples()
    }


def test_bars_give_their_own_candle_and_build_larger_timeframes(stream: list[T]) -> None:
    day_start = 79_200_000
    tfs = (Timeframe.M1, Timeframe.M15, Timeframe.H4, Timeframe.D1)
    agg = Aggregator(AggregatorConfig(timeframes=tfs, day_start_ms=day_start))
    bars = bars_of(stream, "brokerB", "US500.cash")
    emitted: list[Candle] = []
    for bar in bars:
        out = agg.add_bar(bar)
        own = out[0]
        assert (own.tf, own.open_time_ms, own.source, own.revision) == (
            Timeframe.M1, bar.open_time_ms, "bars", 0,
        )  # fmt: skip
        assert (own.first_tick_ms, own.last_tick_ms) == (
            bar.open_time_ms, bar.open_time_ms + MINUTE - 1,
        )  # fmt: skip
        assert own.spread_mean == own.spread_max == bar.spread
        assert (own.open, own.high, own.low, own.close, own.tick_volume, own.real_volume) == (
            bar.open, bar.high, bar.low, bar.close, bar.tick_volume, bar.real_volume,
        )  # fmt: skip
        assert all(c.source == "bars" and c.tf is not Timeframe.M1 for c in out[1:])
        emitted += out
    # a repeated bar: its own candle only
    assert agg.add_bar(bars[-1]) == [own]
    # a bar of a timeframe the M1 bars build: refused where they do, its own candle before
    h4 = msgspec.structs.replace(
        bars[-1],
        tf=Timeframe.H4,
        open_time_ms=bars[-1].open_time_ms // (4 * HOUR) * (4 * HOUR) + 2 * HOUR,
    )
    assert agg.covered(h4) == "covered_by_bars"
    with pytest.raises(ValueError, match="covered_by_bars"):
        agg.add_bar(h4)
    older = msgspec.structs.replace(h4, open_time_ms=h4.open_time_ms - 60 * DAY)
    assert [(c.tf, c.open_time_ms) for c in agg.add_bar(older)] == [
        (Timeframe.H4, older.open_time_ms)
    ]
    with pytest.raises(ValueError, match="aligned"):
        agg.add_bar(msgspec.structs.replace(bars[0], open_time_ms=bars[0].open_time_ms + 1))
    emitted += agg.advance_bars("brokerB", "US500.cash", bars[-1].open_time_ms + FAR)
    got = final_candles(c for c in emitted if c.tf is not Timeframe.M1)
    want: dict[Key, dict[str, float]] = {}
    for tf in tfs[1:]:
        want |= bars_reference(bars, tf, day_start)
    assert_matches(got, want)
    # the bar book is separate from the tick book
    assert agg.symbols() == []
    assert agg.watermark("brokerB", "US500.cash") is None


def test_bars_of_an_unconfigured_timeframe_still_build_larger_ones() -> None:
    agg = Aggregator(AggregatorConfig(timeframes=(Timeframe.H1,)))
    bar = Bar(feed="a", symbol="X", tf=Timeframe.M30, open_time_ms=START, open=1.0, high=2.0,
              low=0.5, close=1.5, tick_volume=10, real_volume=2.0, spread=0.1)  # fmt: skip
    assert agg.add_bar(bar) == []
    (h1,) = agg.add_bar(msgspec.structs.replace(bar, open_time_ms=START + 30 * MINUTE, high=3.0))
    assert (h1.tf, h1.open_time_ms, h1.high, h1.low, h1.tick_volume, h1.source) == (
        Timeframe.H1, START, 3.0, 0.5, 20, "bars",
    )  # fmt: skip


# --- a server clock on daylight saving time -------------------------------------------

NY7 = "America/New_York+7"
"""New York time plus 7 h: UTC+2, UTC+3 from 2026-03-08 to 2026-11-01."""


def around(day: str, hours: int, seed: int) -> list[T]:
    """Ticks of a symbol that trades all week, every 1-90 s for ``hours`` from ``day``."""
    r = random.Random(seed)
    t = int(pd.Timestamp(day, tz="UTC").value // 1_000_000)
    end = t + hours * HOUR
    mid, seq, out = 60_000.0, 0, []
    while t < end:
        t += r.randint(1_000, 90_000)
        mid = round(mid + r.randint(-500, 500) / 100, 2)
        seq += 1
        out.append(T("crypto", "BTCUSD", t, mid, round(mid + r.randint(1, 90) / 100, 2), None,
                     float(r.randint(1, 5)), seq))  # fmt: skip
    return out


def zoned_reference(ticks: Sequence[T], tf: Timeframe) -> dict[Key, dict[str, float]]:
    """H4 or D1 candles of a New York+7 server, grouped by pandas on its wall clock; each
    opens at the first instant the clock shows its start and closes where the next opens."""
    df = pd.DataFrame(list(ticks), columns=list(T._fields))
    df["arrival"] = range(len(df))
    df = df.sort_values(["time_ms", "arrival"], kind="stable")
    df["spread"] = df["ask"] - df["bid"]
    shift, length = pd.Timedelta(hours=7), pd.Timedelta(milliseconds=tf.ms)
    utc = pd.to_datetime(df["time_ms"], unit="ms", utc=True)
    wall = utc.dt.tz_convert("America/New_York").dt.tz_localize(None) + shift
    day = wall.dt.floor("D")
    df["start"] = day + (wall - day) // length * length

    def instant(start: pd.Timestamp) -> int:
        local = (start - shift).tz_localize(
            "America/New_York", ambiguous=True, nonexistent="shift_forward"
        )
        return int(local.tz_convert("UTC").value // 1_000_000)

    agg = df.groupby("start").agg(
        open=("bid", "first"), high=("bid", "max"), low=("bid", "min"), close=("bid", "last"),
        tick_volume=("bid", "count"), real_volume=("volume", "sum"),
        spread_mean=("spread", "mean"), spread_max=("spread", "max"),
        first_tick_ms=("time_ms", "min"), last_tick_ms=("time_ms", "max"),
    )  # fmt: skip
    return {
        ("crypto", "BTCUSD", tf, instant(start)): {
            "close_time_ms": instant(start + length),
            **{f: getattr(row, f) for f in agg.columns},
        }
        for start, row in zip(agg.index, agg.itertuples(), strict=True)
    }


@pytest.mark.parametrize(
    "day",
    [
        "2026-03-06T12:00",  # New York springs forward on Sunday 2026-03-08
        "2026-10-30T12:00",  # and falls back on Sunday 2026-11-01
    ],
)
def test_h4_and_d1_follow_a_server_clock_over_its_change(day: str) -> None:
    config = AggregatorConfig(server_tz=NY7, allowed_lateness_ms=60_000)
    ticks = shuffle_windows(around(day, 4 * 24, seed=3), seed=4, size=3)
    agg = Aggregator(config)
    run = feed_ticks(agg, ticks)
    assert run.outcomes == expected(ticks, 60_000, PriceSource.BID).outcomes
    accepted = [tk for tk, o in zip(ticks, run.outcomes, strict=True) if o == "accepted"]
    got = final_candles(run.emitted + drain(agg))
    want = reference(accepted, (Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.M30,
                                Timeframe.H1))  # fmt: skip
    for tf in (Timeframe.H4, Timeframe.D1):
        want |= zoned_reference(accepted, tf)
    assert_matches(got, want)
    lengths = {(k[2], c.close_time_ms - c.open_time_ms) for k, c in got.items()}
    short = "03-0" in day  # the clock jumps an hour ahead: that day is 23 h long
    assert (Timeframe.D1, DAY + (-HOUR if short else HOUR)) in lengths
    assert (Timeframe.H4, 4 * HOUR + (-HOUR if short else HOUR)) in lengths
    # a snapshot of the zoned state restores only under the same zone
    restored = Aggregator.restore(config, agg.snapshot())
    assert restored.snapshot() == agg.snapshot()
    with pytest.raises(SnapshotMismatch):
        Aggregator.restore(AggregatorConfig(day_start_ms=22 * HOUR), agg.snapshot())


def test_bars_of_a_server_on_daylight_saving_time_build_its_h4_and_d1() -> None:
    agg = Aggregator(AggregatorConfig(server_tz=NY7))
    ticks = around("2026-10-30T12:00", 4 * 24, seed=5)
    bars = bars_of(ticks, "crypto", "BTCUSD", Timeframe.H1)
    emitted = [c for bar in bars for c in agg.add_bar(bar)]
    emitted += agg.advance_bars("crypto", "BTCUSD", bars[-1].open_time_ms + FAR)
    got = final_candles(c for c in emitted if c.tf in (Timeframe.H4, Timeframe.D1))
    spans = {(k[3], c.close_time_ms) for k, c in got.items()}
    for tf in (Timeframe.H4, Timeframe.D1):
        for key, ref in zoned_reference(ticks, tf).items():
            assert (key[3], ref["close_time_ms"]) in spans
            c = got[key]
            assert (c.open, c.high, c.low, c.close, c.tick_volume) == (
                ref["open"], ref["high"], ref["low"], ref["close"], ref["tick_volume"],
            )  # fmt: skip
    # a D1 bar (of another symbol: the H1 bars build this one's) opens at the server's
    # midnight: 21:00 UTC in summer time, 22:00 after; the server's Sunday 2026-11-01, when
    # New York's clock went back, is 25 h long
    summer = int(pd.Timestamp("2026-10-29T21:00", tz="UTC").value // 1_000_000)
    sunday = int(pd.Timestamp("2026-10-31T21:00", tz="UTC").value // 1_000_000)
    winter = int(pd.Timestamp("2026-11-02T22:00", tz="UTC").value // 1_000_000)
    for open_ms, length in ((summer, DAY), (sunday, DAY + HOUR), (winter, DAY)):
        d1 = msgspec.structs.replace(
            bars[0], symbol="ETHUSD", tf=Timeframe.D1, open_time_ms=open_ms
        )
        own = agg.add_bar(d1)[0]
        assert own.close_time_ms - own.open_time_ms == length
    with pytest.raises(ValueError, match="aligned"):
        agg.add_bar(msgspec.structs.replace(bars[0], tf=Timeframe.D1, open_time_ms=summer + HOUR))


def test_a_server_time_zone_is_regular_and_no_fixed_day_start_beside_it() -> None:
    with pytest.raises(ValueError, match="either a fixed time of day or a zone"):
        AggregatorConfig(server_tz=NY7, day_start_ms=22 * HOUR)
    with pytest.raises(ValueError, match="whole hours and change by one hour on a whole hour"):
        AggregatorConfig(server_tz="Asia/Kolkata")
    assert AggregatorConfig(server_tz=f" {NY7} ").server_tz == NY7
    with pytest.raises(ValueError, match="not a time zone"):
        AggregatorConfig(server_tz="Mars/Olympus")


# --- bars and ticks of one symbol: the handover ----------------------------------------


def minute_of(t: int) -> int:
    return t // MINUTE * MINUTE


def samples_reference(
    bars: Sequence[Bar], ticks: Sequence[T], tfs: Iterable[Timeframe]
) -> dict[Key, dict[str, float]]:
    """Candles of bars and ticks together (``tests.reference.with_bars``)."""
    both = plain.with_bars([msgspec.structs.asdict(b) for b in bars], [t._asdict() for t in ticks])
    names = {tf.value for tf in tfs}
    return {(f, s, Timeframe(tf), o): c for (f, s, tf, o), c in both.items() if tf in names}


def add_bars(agg: Aggregator, bars: Iterable[Bar]) -> tuple[list[Candle], list[str]]:
    """Bars as candle-ingest gives them: one the ticks cover is refused."""
    emitted: list[Candle] = []
    outcomes: list[str] = []
    for bar in bars:
        reason = agg.covered(bar)
        if reason is not None:
            outcomes.append(reason)
            with pytest.raises(ValueError, match=reason):
                agg.add_bar(bar)
        else:
            outcomes.append("accepted")
            emitted += agg.add_bar(bar)
    return emitted, outcomes


@pytest.mark.parametrize("restart", [False, True])
def test_bars_then_live_ticks_make_each_candle_once(restart: bool) -> None:
    """A backfill exported at ``cut`` (its last bar still forming), then the live ticks."""
    ticks = around("2026-02-03T00:00", 60, seed=11)
    # after a tick with another in the same minute: the last bar holds only the first
    cut = next(
        a.time_ms + 1
        for a, b in itertools.pairwise(ticks)
        if a.time_ms > ticks[0].time_ms + 33 * HOUR and minute_of(a.time_ms) == minute_of(b.time_ms)
    )
    bars = bars_of([t for t in ticks if t.time_ms < cut], "crypto", "BTCUSD")
    live = [t for t in ticks if t.time_ms >= cut]
    config = AggregatorConfig(allowed_lateness_ms=MINUTE)
    agg = Aggregator(config)
    emitted, bar_outcomes = add_bars(agg, bars)
    assert set(bar_outcomes) == {"accepted"}
    if restart:
        agg = Aggregator.restore(config, agg.snapshot())
    run = feed_ticks(agg, live)
    # the ticks of the minute the last bar was exported in are that bar's
    handover = bars[-1].open_time_ms + MINUTE
    assert handover == minute_of(cut) + MINUTE
    assert run.outcomes == ["covered_by_bars" if t.time_ms < handover else "accepted" for t in live]
    got = final_candles(emitted + run.emitted + drain(agg))
    taken = [t for t in live if t.time_ms >= handover]
    assert_matches(got, samples_reference(bars, taken, Timeframe))
    for key, c in got.items():
        ends = c.close_time_ms <= handover
        assert c.source == ("bars" if ends else "ticks"), key
    # the day of the handover holds the morning's bars and the afternoon's ticks
    day = got["crypto", "BTCUSD", Timeframe.D1, handover // DAY * DAY]
    assert day.first_tick_ms < cut < day.last_tick_ms


def test_bars_imported_after_live_ticks_fill_in_before_them() -> None:
    """Ticks from ``first`` on, then a backfill of bars that runs past it."""
    ticks = around("2026-02-03T00:00", 60, seed=12)
    first = ticks[0].time_ms + 34 * HOUR + 17 * MINUTE + 20_000
    live = [t for t in ticks if first <= t.time_ms < first + 2 * HOUR + 13 * MINUTE]
    bars = bars_of([t for t in ticks if t.time_ms < first + 4 * HOUR], "crypto", "BTCUSD")
    lateness = 2 * HOUR
    agg = Aggregator(AggregatorConfig(allowed_lateness_ms=lateness))
    run = feed_ticks(agg, live)
    assert set(run.outcomes) == {"accepted"}
    wm = agg_wm(agg, "crypto", "BTCUSD")
    emitted, bar_outcomes = add_bars(agg, bars)
    start = minute_of(live[0].time_ms)  # the ticks' part
    assert bar_outcomes == [
        "covered_by_ticks" if b.open_time_ms + MINUTE > start else "accepted" for b in bars
    ]
    taken = [b for b in bars if b.open_time_ms < start]
    got = final_candles(run.emitted + emitted + drain(agg))
    # a larger candle whose period holds the start takes the bars' share while the ticks'
    # one is kept; one published past the lateness before the bars came keeps the ticks
    want = samples_reference(taken, live, Timeframe)
    tick_only = samples_reference([], live, Timeframe)
    late = 0
    for key in list(want):
        tf, open_ms = key[2], key[3]
        if open_ms < start < open_ms + tf.ms and open_ms + tf.ms <= wm - lateness:
            want[key] = tick_only[key]
            late += sum(open_ms <= b.open_time_ms < open_ms + tf.ms for b in taken)
    assert late > 0
    assert agg.late_shares == late
    assert_matches(got, want)
    revised = {k[2] for k, c in got.items() if c.revision}
    assert {Timeframe.H1, Timeframe.H4} <= revised  # kept when the bars came: revised
    assert Timeframe.D1 not in revised  # still open: joined before it closed


def test_a_late_tick_before_the_first_takes_the_bars_open_candle_over() -> None:
    day = int(pd.Timestamp("2026-02-04T10:00", tz="UTC").value // 1_000_000)
    agg = Aggregator(AggregatorConfig(allowed_lateness_ms=5 * MINUTE))
    first = T("crypto", "BTCUSD", day + 30 * MINUTE + 30_000, 10.0, 10.5, None, 1.0, None)
    assert agg.add(*first).outcome == "accepted"
    bars = [
        Bar(feed="crypto", symbol="BTCUSD", tf=Timeframe.M1, open_time_ms=day + m * MINUTE,
            open=9.0, high=9.5, low=8.5, close=9.2, tick_volume=4, real_volume=0.0, spread=0.3)
        for m in range(20, 28)
    ]  # fmt: skip
    emitted, outcomes = add_bars(agg, bars)
    assert set(outcomes) == {"accepted"}
    # before the bars' end (10:28): theirs; after it: a tick, and the ticks' part grows
    before = T("crypto", "BTCUSD", day + 27 * MINUTE + 30_000, 11.0, 11.5, None, 1.0, None)
    assert agg.add(*before).outcome == "covered_by_bars"
    late = T("crypto", "BTCUSD", day + 29 * MINUTE + 45_000, 12.0, 12.5, None, 1.0, None)
    r = agg.add(*late)
    assert r.outcome == "accepted"
    emitted += r.candles
    emitted += drain(agg)
    emitted += agg.advance_bars("crypto", "BTCUSD", day + FAR)
    got = final_candles(emitted)
    assert_matches(got, samples_reference(bars, [late, first], Timeframe))
    m5 = got["crypto", "BTCUSD", Timeframe.M5, day + 25 * MINUTE]
    assert (m5.source, m5.tick_volume, m5.high) == ("ticks", 3 * 4 + 1, 12.0)


def test_ticks_after_a_gap_close_what_the_bars_left_open() -> None:
    """Bars to Friday evening, the EA from Monday: the bars' last hour and day close at the
    first tick; a bar of the gap imported later is too late for Friday's day."""
    friday = int(pd.Timestamp("2026-02-06T18:00", tz="UTC").value // 1_000_000)
    bars = [
        Bar(feed="crypto", symbol="BTCUSD", tf=Timeframe.M1, open_time_ms=friday + m * MINUTE,
            open=9.0, high=9.5 + m, low=8.5, close=9.2, tick_volume=4, real_volume=0.0,
            spread=0.3)
        for m in range(25)
    ]  # fmt: skip
    agg = Aggregator(AggregatorConfig(allowed_lateness_ms=MINUTE))
    emitted, _ = add_bars(agg, bars)
    assert {c.tf for c in emitted} <= {Timeframe.M1, Timeframe.M5, Timeframe.M15}
    monday = T("crypto", "BTCUSD", friday + 3 * DAY + 30_000, 10.0, 10.5, None, 1.0, None)
    r = agg.add(*monday)
    assert r.outcome == "accepted"
    closed = {(c.tf, c.source) for c in r.candles}
    larger = (Timeframe.M15, Timeframe.M30, Timeframe.H1, Timeframe.H4, Timeframe.D1)
    assert closed == {(tf, "ticks") for tf in larger}
    gap = msgspec.structs.replace(bars[-1], open_time_ms=friday + 2 * HOUR, high=99.0)
    more, outcomes = add_bars(agg, [gap])
    assert outcomes == ["accepted"]
    assert [(c.tf, c.source) for c in more] == [(Timeframe.M1, "bars")]
    assert agg.late_shares == 1  # Friday's day: published and past the lateness
    # within the lateness, after every bar: the ticks' part starts a minute earlier
    before = T("crypto", "BTCUSD", friday + 3 * DAY - 1_000, 11.0, 11.5, None, 1.0, None)
    late = agg.add(*before)
    assert late.outcome == "accepted"
    got = final_candles(emitted + r.candles + more + late.candles + drain(agg))
    want = samples_reference(bars, [monday, before], Timeframe)
    want |= samples_reference([gap], [], [Timeframe.M1])
    assert_matches(got, want)


def test_bars_of_a_second_timeframe_build_no_candle_twice() -> None:
    """H1 bars build the symbol's H4 and D1: a D1 bar over them would be a second D1;
    M1 bars give their own candles, and their end is the bars' end for the ticks."""
    day = int(pd.Timestamp("2026-02-04T00:00", tz="UTC").value // 1_000_000)

    def bar(tf: Timeframe, open_ms: int) -> Bar:
        return Bar(feed="crypto", symbol="BTCUSD", tf=tf, open_time_ms=open_ms, open=9.0,
                   high=9.5, low=8.5, close=9.2, tick_volume=4, real_volume=0.0, spread=0.3)  # fmt: skip

    agg = Aggregator(AggregatorConfig())
    hours = [bar(Timeframe.H1, day + h * HOUR) for h in range(8, 10)]
    emitted, outcomes = add_bars(agg, hours)
    later = [bar(Timeframe.D1, day), bar(Timeframe.D1, day + DAY), bar(Timeframe.M1, day)]
    more, refused = add_bars(agg, [*later, bar(Timeframe.D1, day - DAY)])
    assert outcomes + refused == ["accepted"] * 2 + ["covered_by_bars"] * 2 + ["accepted"] * 2
    assert [(c.tf, c.open_time_ms) for c in more] == [
        (Timeframe.M1, day), (Timeframe.D1, day - DAY),
    ]  # fmt: skip
    m1 = bar(Timeframe.M1, day + 10 * HOUR + 30 * MINUTE)  # after the H1 bars' watermark
    assert [c.tf for c in agg.add_bar(m1)] == [Timeframe.M1]
    inside = T("crypto", "BTCUSD", m1.open_time_ms + 30_000, 10.0, 10.5, None, 1.0, None)
    assert agg.add(*inside).outcome == "covered_by_bars"
    after = T("crypto", "BTCUSD", m1.open_time_ms + MINUTE, 10.0, 10.5, None, 1.0, None)
    assert agg.add(*after).outcome == "accepted"
    got = final_candles(emitted + more + drain(agg))
    assert sum(k[2] is Timeframe.D1 for k in got) == 2  # the day before, and this one


@pytest.mark.parametrize("delay", [0, 15_000])
@pytest.mark.parametrize("order", ["bars, ticks, gap bars", "bars, gap bars, ticks",
                                   "ticks, bars, gap bars"])  # fmt: skip
def test_bars_and_ticks_give_the_same_candles_in_any_order(order: str, delay: int) -> None:
    """M1 bars 09:00-09:44 (the gap bars from 09:30), ticks from 09:45: whichever comes
    first, every candle is built once, from both where its period holds 09:45."""
    day = int(pd.Timestamp("2026-02-04T00:00", tz="UTC").value // 1_000_000)
    rng = random.Random(9)
    bars = [
        Bar(feed="crypto", symbol="BTCUSD", tf=Timeframe.M1, open_time_ms=day + m * MINUTE,
            open=9.0, high=9.5 + rng.random(), low=8.5 - rng.random(), close=9.2,
            tick_volume=rng.randint(1, 9), real_volume=0.0, spread=0.3)
        for m in range(9 * 60, 9 * 60 + 45)
    ]  # fmt: skip
    ticks = [
        T("crypto", "BTCUSD", day + 9 * HOUR + 45 * MINUTE + 500 + k * 7_000,
          10.0 + rng.random(), 11.0, None, 1.0, None)
        for k in range(700)
    ]  # fmt: skip
    early = [t for t in ticks if t.time_ms < day + 9 * HOUR + 58 * MINUTE]
    parts = {
        "bars": bars[:30],
        "gap bars": bars[30:],
        "ticks": early,
    }
    agg = Aggregator(AggregatorConfig(allowed_lateness_ms=MINUTE, close_delay_ms=delay))
    emitted: list[Candle] = []
    for name in order.split(", "):
        if name == "ticks":
            run = feed_ticks(agg, parts[name])
            assert set(run.outcomes) == {"accepted"}
            emitted += run.emitted
        else:
            out, outcomes = add_bars(agg, parts[name])
            assert set(outcomes) == {"accepted"}
            emitted += out
    run = feed_ticks(agg, ticks[len(early) :])
    emitted += run.emitted + drain(agg)
    assert agg.late_shares == 0
    assert_matches(final_candles(emitted), samples_reference(bars, ticks, Timeframe))
