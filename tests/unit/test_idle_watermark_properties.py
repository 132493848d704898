"""Ticks and idle watermarks against a reference written from the README / module
docstring (not from the implementation).

Reference (README "candle-ingest", aggregate.py docstring):
- W = the largest accepted tick time or watermark (watermarks of a symbol with no tick are
  ignored: nothing to close).
- a tick older than W - lateness is too_late; otherwise accepted.
- a candle closes (revision 0) once W >= end + close_delay; a late tick into a published
  candle emits it again with revision + 1; a late tick into a closed period that had no
  candle publishes that candle at once (revision 0).
- an idle close (Watermark) is just a W move; a tick after it is a revision within the
  lateness, too_late beyond it: the same as if a tick at that time had come.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import NamedTuple

import pytest

from contracts.messages import Candle, Timeframe
from workers.candle_ingest.aggregate import Aggregator, AggregatorConfig

TFS = tuple(Timeframe)
MIN = 60_000
SEEDS = int(os.environ.get("TICKWIRE_PROP_SEEDS", "100"))
FEED, SYM = "fx", "EURUSD"


def open_of(tf: Timeframe, t: int, ds: int) -> int:
    L = tf.ms
    return (t - ds) // L * L + ds


class Row(NamedTuple):
    time_ms: int
    bid: float
    ask: float
    last: float | None
    volume: float | None
    seq: int | None


@dataclass
class RC:
    ticks: list[tuple[int, float, float, float | None]] = field(default_factory=list)
    published: int = -1  # last revision published, -1: never


def content(tf: Timeframe, o: int, ticks: list[tuple[int, float, float, float | None]]) -> dict:
    # open: earliest time, first arrived among equal times; close: latest, last arrived
    tmin = min(t for t, *_ in ticks)
    tmax = max(t for t, *_ in ticks)
    op = next(p for t, p, *_ in ticks if t == tmin)
    cl = [p for t, p, *_ in ticks if t == tmax][-1]
    ps = [p for _, p, *_ in ticks]
    sp = [s for _, _, s, _ in ticks]
    return {
        "tf": tf,
        "open_time_ms": o,
        "close_time_ms": o + tf.ms,
        "open": op,
        "high": max(ps),
        "low": min(ps),
        "close": cl,
        "tick_volume": len(ticks),
        "real_volume": sum(v or 0.0 for *_, v in ticks),
        "spread_mean": sum(sp) / len(sp),
        "spread_max": max(sp),
        "first_tick_ms": tmin,
        "last_tick_ms": tmax,
    }


class Ref:
    def __init__(self, late: int, delay: int, ds: int) -> None:
        self.late, self.delay, self.ds = late, delay, ds
        self.W: int | None = None
        self.c: dict[tuple[Timeframe, int], RC] = {}

    def _closes(self) -> list[tuple]:
        out = []
        assert self.W is not None
        for tf in TFS:
            for (tf2, o), rc in sorted(self.c.items(), key=lambda kv: kv[0][1]):
                if tf2 is tf and rc.published < 0 and o + tf.ms + self.delay <= self.W:
                    rc.published = 0
                    out.append((tf, o, 0, content(tf, o, rc.ticks)))
        return out

    def tick(self, t: int, p: float, s: float, v: float | None) -> tuple[str, list]:
        if self.W is not None and t < self.W - self.late:
            return "too_late", []
        self.W = t if self.W is None else max(self.W, t)
        out = []
        for tf in TFS:
            o = open_of(tf, t, self.ds)
            rc = self.c.setdefault((tf, o), RC())
            rc.ticks.append((t, p, s, v))
            if rc.published >= 0:
                rc.published += 1
                out.append((tf, o, rc.published, content(tf, o, rc.ticks)))
            elif o + tf.ms + self.delay <= self.W and len(rc.ticks) == 1:
                rc.published = 0
                out.append((tf, o, 0, content(tf, o, rc.ticks)))
        return "accepted", out + self._closes()

    def watermark(self, w: int) -> list:
        if self.W is None:
            return []
        self.W = max(self.W, w)
        return self._closes()


def as_tuple(c: Candle) -> tuple:
    return (
        c.tf,
        c.open_time_ms,
        c.revision,
        {
            "tf": c.tf,
            "open_time_ms": c.open_time_ms,
            "close_time_ms": c.close_time_ms,
            "open": c.open,
            "high": c.high,
            "low": c.low,
            "close": c.close,
            "tick_volume": c.tick_volume,
            "real_volume": c.real_volume,
            "spread_mean": c.spread_mean,
            "spread_max": c.spread_max,
            "first_tick_ms": c.first_tick_ms,
            "last_tick_ms": c.last_tick_ms,
        },
    )


def same(a: dict, b: dict) -> bool:
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, float):
            if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9):
                return False
        elif x != y:
            return False
    return True


def compare(got: list[Candle], want: list[tuple], ctx: str) -> None:
    # in the docstring's order: revisions (M1..D1), then closes (M1..D1, each by open time)
    g = [as_tuple(c) for c in got]
    w = want
    assert [(a[0], a[1], a[2]) for a in g] == [(a[0], a[1], a[2]) for a in w], ctx
    for a, b in zip(g, w, strict=True):
        assert same(a[3], b[3]), f"{ctx}: {a} != {b}"
    for c in got:
        assert c.source == "ticks"


def gen_stream(rng: random.Random, late: int) -> list[tuple]:
    base = 1_767_225_600_000 + rng.randrange(0, 30) * 86_400_000 + rng.randrange(0, 86_400_000)
    t = base
    ev: list[tuple] = []
    n = rng.randrange(20, 400)
    W = t
    for _ in range(n):
        r = rng.random()
        if r < 0.55:
            t += rng.choice([0, 1, 17, 250, 999, 1_000, 4_000, 30_000, 59_999, 60_000, 61_000])
            t += (
                rng.choice([0, 0, 0, rng.randrange(0, 300_000), rng.randrange(0, 5 * 3_600_000)])
                if rng.random() < 0.1
                else 0
            )
            tt = t
        elif r < 0.75:  # late, around the lateness boundary
            tt = W - rng.choice([0, 1, late - 1, late, late + 1, rng.randrange(0, 2 * late + 2)])
        elif r < 0.85:  # tie with the watermark
            tt = W
        else:
            # a watermark: ahead, behind, exactly on a period end (+/- 1)
            if rng.random() < 0.5:
                w = W + rng.randrange(0, 3 * 3_600_000)
            else:
                tf = rng.choice(TFS)
                w = (W // tf.ms + rng.randrange(0, 3)) * tf.ms + rng.choice([-1, 0, 1])
            ev.append(("wm", w))
            W = max(W, w)
            t = max(t, W if rng.random() < 0.5 else t)
            continue
        price = round(1.0 + rng.random(), 5)
        spread = rng.choice([0.0, 0.0001, 0.0002, 0.0003])
        vol = rng.choice([None, 1.0, 2.5])
        ev.append(("tick", tt, price, spread, vol))
        W = max(W, tt)
    return ev


@pytest.mark.parametrize("seed", range(SEEDS))
def test_ticks_and_idle_watermarks_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    late = rng.choice([0, 1_000, 5_000, 60_000, 600_000])
    delay = rng.choice([0, 0, 15_000, 90_000])
    ds = rng.choice([0, 0, 79_200_000, 75_600_000])
    agg = Aggregator(
        AggregatorConfig(allowed_lateness_ms=late, close_delay_ms=delay, day_start_ms=ds)
    )
    ref = Ref(late, delay, ds)
    ev = gen_stream(rng, late)
    restart_at = rng.randrange(len(ev) + 1) if rng.random() < 0.3 else -1
    use_rows = rng.random() < 0.5
    k = 0
    while k < len(ev):
        e = ev[k]
        if k == restart_at:
            agg = Aggregator.restore(agg.config, agg.snapshot())
        ctx = f"seed {seed} event {k} {e}"
        k += 1
        if e[0] == "tick" and use_rows:
            run_ = [e]
            while k < len(ev) and ev[k][0] == "tick" and k != restart_at and rng.random() < 0.85:
                run_.append(ev[k])
                k += 1
            rows = [Row(t, p, p + s, None, v, None) for _, t, p, s, v in run_]
            out: list[Candle] = []
            res = agg.add_rows(
                FEED, SYM, rows, now_ms=1 << 50, max_future_skew_ms=0, out=out, out_times=[]
            )
            refused = dict(res.refused)
            want = []
            for j, (_, t, p, s, v) in enumerate(run_):
                outcome, w = ref.tick(t, p, s, v)
                assert refused.get(j, "accepted") == outcome, (ctx, j)
                want += w
            compare(out, want, ctx)
            assert res.watermark == ref.W, ctx
        elif e[0] == "tick":
            _, t, p, s, v = e
            r = agg.add(FEED, SYM, t, p, p + s, None, v, None)
            outcome, want = ref.tick(t, p, s, v)
            assert r.outcome == outcome, ctx
            compare(r.candles, want, ctx)
        else:
            got = agg.advance(FEED, SYM, e[1])
            compare(got, ref.watermark(e[1]), ctx)
            assert agg.watermark(FEED, SYM) == ref.W, ctx
            nc = agg.next_close_ms(FEED, SYM)
            if ref.W is not None:
                opens = [o + tf.ms for (tf, o), rc in ref.c.items() if rc.published < 0]
                assert nc == (min(opens) + delay if opens else None), ctx
