"""Backfill bars and live ticks of one feed/symbol, in random orders, against a
reference written from the README's *Backfill* section and aggregate.py's docstring.

Reference rules (README, Operations / Backfill, and the dead-letter table):
- bars own the time up to the end of their latest bar (any timeframe), rounded up to M1;
  a tick before it is covered_by_bars;
- ticks own the time from their earliest tick, rounded down to M1; a bar ending after it
  is covered_by_ticks;
- the first timeframe imported (src) builds every larger one from its first bar on; a bar
  of a larger timeframe ending after that first bar's open is covered_by_bars; before it,
  or of a smaller timeframe, a bar gives its own candle only;
- a tick older than the ticks' watermark minus the lateness is too_late;
- a larger candle holding the handover takes the bars' part and the ticks' part; a bar
  share for a ticks' candle already past the lateness is lost (late_shares);
- every key is published with revisions 0, 1, 2, ... once each; the last is the final
  candle; a candle with any tick in it comes from the ticks' side, a bar's own candle from
  the bars' side.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from contracts.messages import Bar, Candle, Timeframe
from workers.candle_ingest.aggregate import Aggregator, AggregatorConfig

TFS = tuple(Timeframe)
MIN = 60_000
HOUR = 3_600_000
DAY = 86_400_000
SEEDS = int(os.environ.get("TICKWIRE_PROP_SEEDS", "100"))
FEED, SYM = "crypto", "BTCUSD"
FAR = 1 << 50


PER: list = [None]
"""contracts.servertime.Periods of the run when zoned (D1/H4 follow a server clock)."""


def open_of(tf: Timeframe, t: int, ds: int) -> int:
    if PER[0] is not None:
        return PER[0].open(tf, t)
    return (t - ds) // tf.ms * tf.ms + ds


def end_of(tf: Timeframe, o: int) -> int:
    if PER[0] is not None:
        return PER[0].end(tf, o)
    return o + tf.ms


class Row(NamedTuple):
    time_ms: int
    bid: float
    ask: float
    last: float | None
    volume: float | None
    seq: int | None


@dataclass(frozen=True)
class Tk:
    t: int
    p: float
    s: float
    v: float | None


class Ref:
    def __init__(self, late: int, ds: int) -> None:
        self.late, self.ds = late, ds
        self.W: int | None = None
        self.start: int | None = None
        self.bars_end: int | None = None
        self.src: Timeframe | None = None
        self.first_src = 0
        self.bars_wm: int | None = None
        self.taken: int | None = None
        # key (tf, open) -> list of elements; ("t", Tk) / ("b", Bar)
        self.agg: dict[tuple[Timeframe, int], list] = {}
        self.own: dict[tuple[Timeframe, int], Bar] = {}
        self.lost = 0
        self.lost_keys: set[tuple[Timeframe, int]] = set()

    def tick(self, k: Tk) -> str:
        if self.W is not None and k.t < self.W - self.late:
            return "too_late"
        if self.bars_end is not None and k.t < self.bars_end:
            return "covered_by_bars"
        if self.W is None and self.bars_wm is not None:
            self.taken = self.bars_wm
        self.W = k.t if self.W is None else max(self.W, k.t)
        m = open_of(Timeframe.M1, k.t, self.ds)
        self.start = m if self.start is None else min(self.start, m)
        for tf in TFS:
            self.agg.setdefault((tf, open_of(tf, k.t, self.ds)), []).append(("t", k))
        return "accepted"

    def bar(self, b: Bar) -> str:
        tf = Timeframe(b.tf)
        o = b.open_time_ms
        end = end_of(tf, o)
        if self.start is not None and end > self.start:
            return "covered_by_ticks"
        if self.src is not None and tf.ms > self.src.ms and end > self.first_src:
            return "covered_by_bars"
        if self.src is None:
            self.src, self.first_src, self.bars_wm = tf, o, o
        be = open_of(Timeframe.M1, end - 1, self.ds) + MIN
        self.bars_end = be if self.bars_end is None else max(self.bars_end, be)
        self.own[tf, o] = b
        assert self.bars_wm is not None
        if tf is self.src and o >= self.bars_wm:  # out of order: its own candle only
            for L in TFS:
                if L.ms > tf.ms and L.ms % tf.ms == 0:
                    ho = open_of(L, o, self.ds)
                    he = end_of(L, ho)
                    joins = self.start is not None and (
                        he > self.start or (self.taken is not None and ho < self.taken < he)
                    )
                    if joins and self.W is not None and he <= self.W - self.late:
                        self.lost += 1
                        self.lost_keys.add((L, ho))
                        continue
                    self.agg.setdefault((L, ho), []).append(("b", b))
            self.bars_wm = max(self.bars_wm, end)
        return "accepted"

    def watermark(self, w: int) -> None:
        if self.W is not None:
            self.W = max(self.W, w)

    def finals(self) -> dict[tuple[Timeframe, int], dict]:
        out: dict[tuple[Timeframe, int], dict] = {}
        for (tf, o), b in self.own.items():
            out[tf, o] = {
                "open": b.open, "high": b.high, "low": b.low, "close": b.close,
                "tick_volume": b.tick_volume, "real_volume": b.real_volume,
                "spread": (b.spread, b.spread, b.spread), "first_tick_ms": o,
                "last_tick_ms": end_of(tf, o) - 1, "source": "bars",
            }  # fmt: skip
        for (tf, o), els in self.agg.items():
            assert (tf, o) not in out, ("reference key twice", tf, o)
            # (first, last, open, close, high, low, n, vol, spread)
            items = []
            for arrival, (kind, x) in enumerate(els):
                if kind == "t":
                    items.append((x.t, x.t, x.p, x.p, x.p, x.p, 1, x.v or 0.0, x.s, arrival))
                else:
                    e = end_of(Timeframe(x.tf), x.open_time_ms) - 1
                    items.append((x.open_time_ms, e, x.open, x.close, x.high, x.low,
                                  x.tick_volume, x.real_volume, x.spread, arrival))  # fmt: skip
            fmin = min(i[0] for i in items)
            lmax = max(i[1] for i in items)
            spreads = [i[8] for i in items]
            out[tf, o] = {
                "open": next(i[2] for i in items if i[0] == fmin),
                "close": [i[3] for i in items if i[1] == lmax][-1],
                "high": max(i[4] for i in items),
                "low": min(i[5] for i in items),
                "tick_volume": sum(i[6] for i in items),
                "real_volume": sum(i[7] for i in items),
                "spread": (min(spreads), max(spreads), max(spreads)),
                "first_tick_ms": fmin,
                "last_tick_ms": lmax,
                "source": "ticks" if any(k == "t" for k, _ in els) else None,
            }
        return out


def check_emitted(emitted: list[Candle], ctx: str) -> dict[tuple[Timeframe, int], Candle]:
    revs: dict[tuple[Timeframe, int], list[Candle]] = {}
    for c in emitted:
        revs.setdefault((c.tf, c.open_time_ms), []).append(c)
    final = {}
    for key, cs in revs.items():
        assert [c.revision for c in cs] == list(range(len(cs))), (
            ctx,
            key,
            [(c.revision, c.source) for c in cs],
        )
        assert len({c.source for c in cs}) == 1, (ctx, key, [(c.revision, c.source) for c in cs])
        assert all(c.close_time_ms == end_of(c.tf, c.open_time_ms) for c in cs)
        final[key] = cs[-1]
    return final


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def compare(final: dict, want: dict, ctx: str, lost_keys: set) -> None:
    missing = set(want) - set(final)
    extra = set(final) - set(want)
    assert not missing, (ctx, "missing", sorted(missing, key=str)[:5])
    assert not extra, (ctx, "extra", sorted(extra, key=str)[:5])
    for key, w in want.items():
        c = final[key]
        got = {
            "open": c.open, "high": c.high, "low": c.low, "close": c.close,
            "tick_volume": c.tick_volume, "real_volume": c.real_volume,
            "first_tick_ms": c.first_tick_ms, "last_tick_ms": c.last_tick_ms,
        }  # fmt: skip
        for k, v in got.items():
            wv = w[k]
            ok = close(v, wv) if isinstance(wv, float) else v == wv
            assert ok, (ctx, key, k, v, wv, c)
        lo, hi, mx = w["spread"]
        assert lo - 1e-12 <= c.spread_mean <= hi + 1e-12, (ctx, key, c.spread_mean, w["spread"])
        assert close(c.spread_max, mx), (ctx, key, c.spread_max, mx)
        if w["source"] is not None:
            assert c.source == w["source"], (ctx, key, c.source, w["source"])


def mkbar(rng: random.Random, tf: Timeframe, o: int) -> Bar:
    op = round(1 + rng.random(), 4)
    cl = round(1 + rng.random(), 4)
    return Bar(
        feed=FEED, symbol=SYM, tf=tf, open_time_ms=o, open=op,
        high=max(op, cl) + round(rng.random() * 0.1, 4), low=min(op, cl) - round(rng.random() * 0.1, 4),
        close=cl, tick_volume=rng.randint(0, 50), real_volume=float(rng.randint(0, 5)),
        spread=rng.choice([0.0, 0.5, 1.0, 2.0]),
    )  # fmt: skip


def gen(rng: random.Random, ds: int, late: int):
    day0 = 1_767_225_600_000 + rng.randrange(0, 20) * DAY + ds
    if PER[0] is not None:  # around a daylight saving change
        day0 = rng.choice(
            [1_772_928_000_000, 1_774_742_400_000, 1_792_800_000_000, 1_793_491_200_000]
        )
        day0 += rng.randrange(-3, 2) * DAY
    src = rng.choice([Timeframe.M1, Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.H1])
    # bars: a run of src bars from b0, with holes
    b0 = day0 + rng.randrange(0, 20 * HOUR) // src.ms * src.ms
    nbars = rng.randrange(1, 200 if src.ms < HOUR else 40)
    bars = []
    o = b0
    for _ in range(nbars):
        bars.append(mkbar(rng, src, o))
        o += src.ms * (1 if rng.random() < 0.85 else rng.randrange(2, 30))
    bars_stop = o
    # ticks: start around the bars' end (before, at, after, far after)
    rel = rng.choice(["before", "at", "after", "far", "inside"])
    if rel == "before":
        t0 = b0 - rng.randrange(0, 3 * HOUR)
    elif rel == "inside":
        t0 = b0 + rng.randrange(0, max(1, bars_stop - b0))
    elif rel == "at":
        t0 = bars_stop + rng.choice([0, 1, 999, 30_000, 59_999, 60_000])
    elif rel == "after":
        t0 = bars_stop + rng.randrange(0, 2 * HOUR)
    else:
        t0 = bars_stop + rng.randrange(1, 4) * DAY + rng.randrange(0, DAY)
    ticks = []
    t = t0
    for _ in range(rng.randrange(1, 300)):
        t += rng.choice([0, 1, 500, 3_000, 20_000, 60_000, 61_000, 5 * MIN])
        ticks.append(
            Tk(t, round(1 + rng.random(), 5), rng.choice([0.0, 0.1, 0.3]), rng.choice([None, 1.0]))
        )
    # late ones: move some ticks before their predecessors
    for i in range(len(ticks)):
        if rng.random() < 0.1:
            k = ticks[i]
            ticks[i] = Tk(k.t - rng.randrange(0, 2 * late + 2 * MIN + 1), k.p, k.s, k.v)
    # extra bars of other timeframes
    extra = []
    for _ in range(rng.randrange(0, 6)):
        tf = rng.choice(TFS)
        o = open_of(tf, b0 + rng.randrange(-3 * DAY, 2 * DAY), ds)
        if all((b.tf, b.open_time_ms) != (tf, o) for b in bars + extra):
            extra.append(mkbar(rng, tf, o))
    # interleave: bars keep their order (ticks too, as generated)
    order = rng.choice(["bars-first", "ticks-first", "mixed", "split"])
    ev: list[tuple] = []
    if order == "bars-first":
        ev = [("b", b) for b in bars] + [("t", k) for k in ticks]
    elif order == "ticks-first":
        ev = [("t", k) for k in ticks] + [("b", b) for b in bars]
    elif order == "split":
        cut = rng.randrange(len(bars) + 1)
        ev = (
            [("b", b) for b in bars[:cut]]
            + [("t", k) for k in ticks]
            + [("b", b) for b in bars[cut:]]
        )
    else:
        bi = ti = 0
        while bi < len(bars) or ti < len(ticks):
            if ti >= len(ticks) or (bi < len(bars) and rng.random() < 0.5):
                ev.append(("b", bars[bi]))
                bi += 1
            else:
                ev.append(("t", ticks[ti]))
                ti += 1
    for b in extra:
        ev.insert(rng.randrange(len(ev) + 1), ("b", b))
    for _ in range(rng.randrange(0, 4)):
        # an idle close: a watermark somewhat after the latest tick so far
        i = rng.randrange(len(ev) + 1)
        ts = [e[1].t for e in ev[:i] if e[0] == "t"]
        if ts:
            ev.insert(i, ("w", max(ts) + rng.randrange(0, 3 * HOUR)))
    return ev


def run(seed: int, zone: str | None = None) -> None:
    rng = random.Random(seed)
    ds = rng.choice([0, 0, 79_200_000]) if zone is None else 0
    late = rng.choice([DAY * 400, DAY * 400, 60_000, 10 * MIN, 2 * HOUR])
    delay = rng.choice([0, 0, 15_000])
    config = AggregatorConfig(
        allowed_lateness_ms=late, close_delay_ms=delay, day_start_ms=ds, server_tz=zone
    )
    agg = Aggregator(config)
    PER[0] = agg.periods if zone is not None else None
    ref = Ref(late, ds)
    emitted: list[Candle] = []
    ev = gen(rng, ds, late)
    restarts = {rng.randrange(len(ev) + 1) for _ in range(2)} if rng.random() < 0.3 else set()
    use_rows = rng.random() < 0.5
    pos = 0
    while pos < len(ev):
        n = pos
        kind, x = ev[pos]
        pos += 1
        if n in restarts:
            agg2 = Aggregator.restore(config, agg.snapshot())
            agg2.late_shares = agg.late_shares
            agg = agg2
        ctx = f"seed {seed} ev {n} {kind} {x}"
        if kind == "t" and use_rows:
            # through add_rows, one row per call or in runs (the hot path's fast loop)
            run_ = [x]
            while pos < len(ev) and ev[pos][0] == "t" and rng.random() < 0.8:
                run_.append(ev[pos][1])
                pos += 1
            res = agg.add_rows(
                FEED,
                SYM,
                [Row(k.t, k.p, k.p + k.s, None, k.v, None) for k in run_],
                now_ms=FAR,
                max_future_skew_ms=0,
                out=emitted,
                out_times=[],
            )
            refused = dict(res.refused)
            for j, k in enumerate(run_):
                assert refused.get(j, "accepted") == ref.tick(k), (ctx, j, k)
        elif kind == "t":
            r = agg.add(FEED, SYM, x.t, x.p, x.p + x.s, None, x.v, None)
            want = ref.tick(x)
            assert r.outcome == want, ctx
            emitted += r.candles
        elif kind == "b":
            why = agg.covered(x)
            want = ref.bar(x)
            assert (why or "accepted") == want, ctx
            if why is None:
                emitted += agg.add_bar(x)
        else:
            emitted += agg.advance(FEED, SYM, x)
            ref.watermark(x)
    emitted += agg.advance(FEED, SYM, FAR)
    emitted += agg.advance_bars(FEED, SYM, FAR)
    ctx = f"seed {seed}"
    assert agg.late_shares == ref.lost, (ctx, agg.late_shares, ref.lost)
    final = check_emitted(emitted, ctx)
    compare(final, ref.finals(), ctx, ref.lost_keys)


@pytest.mark.parametrize("seed", range(SEEDS))
def test_bars_and_ticks_match_reference(seed: int) -> None:
    run(seed)


@pytest.mark.parametrize("seed", range(SEEDS // 4))
@pytest.mark.parametrize("zone", ["America/New_York+7", "Europe/Athens"])
def test_bars_and_ticks_match_reference_on_a_server_clock(seed: int, zone: str) -> None:
    try:
        run(seed, zone)
    finally:
        PER[0] = None
