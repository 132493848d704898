"""Properties of candle-ingest's Aggregator against an independent reference.

Seeded random loops. The reference is written from the
contract (module docstring of ``workers.candle_ingest.aggregate``, README candle-ingest,
``contracts.servertime``), not from the implementation:

- W = largest accepted tick time per (feed, symbol) (or a Watermark's time, ``advance``);
- a period [o, e) with ticks closes (revision 0) once W >= e + close_delay;
- a tick older than W - lateness is ``too_late``; a later one into a closed period revises
  it (revision + 1, republished); into a closed period without a candle it emits one;
- emission order per call: revisions (M1..D1), then closes (M1..D1, by open time);
- periods: o = (t - ds) // L * L + ds, or with a zone H4/D1 are the maximal runs of time
  over which the server clock's floor(wall, L) is constant (each opens at the first
  instant the clock shows its start, ends where the next one opens).

``TICKWIRE_PROP_SEEDS`` sets how many streams each test runs (default 100).
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from contracts.messages import Candle, TickRow, Timeframe
from workers.candle_ingest.aggregate import (
    ACCEPTED,
    DUPLICATE,
    Aggregator,
    AggregatorConfig,
    PriceSource,
)
from workers.candle_ingest.validate import check_tick

H = 3_600_000
DAY = 86_400_000
TFS = list(Timeframe)
STREAMS = int(os.environ.get("TICKWIRE_PROP_SEEDS", "100"))
SKEW = 60_000

ZONES = [
    "Europe/Athens",
    "America/New_York+7",
    "Europe/London",
    "Australia/Sydney",
    "America/Santiago",  # changes at 24:00 local: the server's midnight skipped / repeated
    "Asia/Tokyo",
    "America/New_York",
    "Etc/GMT-2",
]


# --- reference periods -----------------------------------------------------------------


@functools.cache
def _zone(spec: str) -> tuple[ZoneInfo, int]:
    if spec.startswith("Etc/") or (spec.count("+") == 0 and spec.count("-") == 0):
        return ZoneInfo(spec), 0
    for sign in "+-":
        if sign in spec:
            name, hours = spec.rsplit(sign, 1)
            try:
                return ZoneInfo(name), int(float(sign + hours) * H)
            except Exception:
                pass
    return ZoneInfo(spec), 0


@functools.cache
def _label(spec: str, L: int, hour_start: int) -> int:
    """floor(server wall clock, L) during the UTC hour starting at ``hour_start``."""
    zi, shift = _zone(spec)
    off = datetime.fromtimestamp(hour_start // 1000, zi).utcoffset()
    assert off is not None
    wall = hour_start + int(off.total_seconds()) * 1000 + shift
    return wall // L


@functools.lru_cache(maxsize=200_000)
def _zoned_hour_period(spec: str, L: int, h0: int) -> tuple[int, int]:
    lab = _label(spec, L, h0)
    o = h0
    while _label(spec, L, o - H) == lab:
        o -= H
    e = h0 + H
    while _label(spec, L, e) == lab:
        e += H
    return o, e


def ref_period(L: int, t: int, ds: int, zone: str | None) -> tuple[int, int]:
    if zone is None or L <= H:
        o = (t - ds) // L * L + ds
        return o, o + L
    return _zoned_hour_period(zone, L, t // H * H)


# --- reference aggregator --------------------------------------------------------------


@dataclass
class _RTick:
    t: int
    p: float
    s: float
    v: float


@dataclass
class _RSym:
    W: int | None = None
    periods: dict[tuple[int, int], list[_RTick]] = field(default_factory=dict)
    ends: dict[tuple[int, int], int] = field(default_factory=dict)
    rev: dict[tuple[int, int], int] = field(default_factory=dict)  # emitted -> revision
    max_seq: int | None = None
    low_seq: int | None = None
    taken: set[int] = field(default_factory=set)
    missing: dict[int, int] = field(default_factory=dict)
    """missing seq -> max(W, t) when it went missing: forgotten once older than W - lateness
    (not in the README; aggregate._TickBook.missing)"""


class Reference:
    def __init__(self, cfg: AggregatorConfig) -> None:
        self.cfg = cfg
        self.tfs = list(cfg.timeframes)
        self.syms: dict[tuple[str, str], _RSym] = {}
        self.filled = 0

    def _period(self, i: int, t: int) -> tuple[int, int]:
        return ref_period(self.tfs[i].ms, t, self.cfg.day_start_ms, self.cfg.server_tz)

    def _candle(self, feed: str, sym: str, r: _RSym, key: tuple[int, int]) -> Candle:
        i, o = key
        ts = r.periods[key]
        tmin = min(x.t for x in ts)
        tmax = max(x.t for x in ts)
        op = next(x.p for x in ts if x.t == tmin)  # first arrived among the earliest
        cl = [x.p for x in ts if x.t == tmax][-1]  # last arrived among the latest
        ssum = math.fsum(x.s for x in ts)
        return Candle(
            feed=feed,
            symbol=sym,
            tf=self.tfs[i],
            open_time_ms=o,
            close_time_ms=r.ends[key],
            open=op,
            high=max(x.p for x in ts),
            low=min(x.p for x in ts),
            close=cl,
            tick_volume=len(ts),
            real_volume=math.fsum(x.v for x in ts),
            spread_mean=ssum / len(ts),
            spread_max=max(x.s for x in ts),
            first_tick_ms=tmin,
            last_tick_ms=tmax,
            revision=r.rev.get(key, 0),
            source="ticks",
        )

    def _closes(self, feed: str, sym: str, r: _RSym) -> list[Candle]:
        assert r.W is not None
        due = sorted(
            k for k in r.periods if k not in r.rev and r.ends[k] + self.cfg.close_delay_ms <= r.W
        )
        out = []
        for k in due:
            r.rev[k] = 0
            out.append(self._candle(feed, sym, r, k))
        return out

    def _seq(self, r: _RSym, seq: int, t: int) -> tuple[bool, int]:
        """(duplicate, gap) per README 'Sequence numbers'."""
        if r.max_seq is None:
            r.max_seq = r.low_seq = seq
            r.taken = {seq}
            return False, 0
        assert r.low_seq is not None
        assert r.W is not None
        floor = r.W - self.cfg.allowed_lateness_ms
        r.missing = {s: seen for s, seen in r.missing.items() if seen >= floor}
        seen = max(r.W, t)
        if seq > r.max_seq:
            gap = seq - r.max_seq - 1
            r.missing.update(dict.fromkeys(range(r.max_seq + 1, seq), seen))
            r.max_seq = seq
            r.taken.add(seq)
            return False, gap
        if seq in r.missing:
            del r.missing[seq]
            r.taken.add(seq)
            self.filled += 1
            return False, 0
        if t > r.W:  # restart
            r.max_seq = r.low_seq = seq
            r.taken = {seq}
            r.missing = {}
            return False, 0
        if seq < r.low_seq:  # the numbers between were skipped: a gap
            gap = r.low_seq - seq - 1
            r.missing.update(dict.fromkeys(range(seq + 1, r.low_seq), seen))
            r.low_seq = seq
            r.taken.add(seq)
            return False, gap
        return True, 0

    def add(self, feed, sym, t, bid, ask, last, volume, seq):
        kind = self.cfg.price
        if kind == PriceSource.BID:
            p = bid
        elif kind == PriceSource.MID:
            p = (bid + ask) / 2
        elif last is None:
            return "no_last_price", [], 0
        else:
            p = last
        r = self.syms.get((feed, sym))
        if r is None:
            r = self.syms[feed, sym] = _RSym()
        elif r.W is not None and t < r.W - self.cfg.allowed_lateness_ms:
            return "too_late", [], 0
        gap = 0
        if seq is not None:
            dup, gap = self._seq(r, seq, t)
            if dup:
                return "duplicate", [], 0
        tick = _RTick(t, p, ask - bid, 0.0 if volume is None else float(volume))
        wold = r.W
        r.W = t if wold is None else max(wold, t)
        out: list[Candle] = []
        for i in range(len(self.tfs)):
            o, e = self._period(i, t)
            key = (i, o)
            r.periods.setdefault(key, []).append(tick)
            r.ends[key] = e
            if key in r.rev:
                r.rev[key] += 1
                out.append(self._candle(feed, sym, r, key))
            elif wold is not None and e + self.cfg.close_delay_ms <= wold:
                r.rev[key] = 0
                out.append(self._candle(feed, sym, r, key))
        out += self._closes(feed, sym, r)
        return "accepted", out, gap

    def advance(self, feed, sym, w):
        r = self.syms.get((feed, sym))
        if r is None or r.W is None:
            return []
        if w <= r.W:
            return []
        r.W = w
        return self._closes(feed, sym, r)

    def watermark(self, feed, sym):
        r = self.syms.get((feed, sym))
        return None if r is None else r.W

    def next_close_ms(self, feed, sym):
        r = self.syms.get((feed, sym))
        if r is None:
            return None
        ends = [r.ends[k] for k in r.periods if k not in r.rev]
        return min(ends) + self.cfg.close_delay_ms if ends else None

    def open_candles(self):
        return sum(1 for r in self.syms.values() for k in r.periods if k not in r.rev)


# --- random streams --------------------------------------------------------------------


def _transitions(spec: str) -> list[int]:
    zi, _ = _zone(spec)
    out = []
    start = int(datetime(2019, 1, 1, tzinfo=UTC).timestamp()) * 1000
    prev = None
    for d in range(365 * 8):
        u = start + d * DAY
        off = datetime.fromtimestamp(u // 1000, zi).utcoffset()
        if prev is not None and off != prev:
            # the hour of the change within the day before
            for h in range(24):
                x = u - DAY + h * H
                if datetime.fromtimestamp(x // 1000, zi).utcoffset() == off:
                    out.append(x)
                    break
        prev = off
    return out


def random_config(rng: random.Random, *, zoned: bool | None = None) -> AggregatorConfig:
    k = rng.random()
    tfs = TFS if k < 0.5 else sorted(rng.sample(TFS, rng.randint(1, len(TFS))), key=TFS.index)
    price = rng.choice(list(PriceSource))
    if zoned is None:
        zoned = rng.random() < 0.4
    late = rng.choice([0, 1, 999, 30_000, 60_000, 600_000, 3 * H, DAY + 7])
    delay = rng.choice([0, 0, 0, 1, 500, 5_000, 61_000, 2 * H])
    if zoned:
        return AggregatorConfig(
            timeframes=tuple(tfs),
            price=price,
            allowed_lateness_ms=late,
            close_delay_ms=delay,
            server_tz=rng.choice(ZONES),
        )
    ds = rng.choice(
        [0, 79_200_000, 75_600_000, rng.randrange(0, 1440) * 60_000, rng.randrange(-DAY, 2 * DAY)]
    )
    return AggregatorConfig(
        timeframes=tuple(tfs),
        price=price,
        day_start_ms=ds,
        allowed_lateness_ms=late,
        close_delay_ms=delay,
    )


def _dy(rng: random.Random, lo: int, hi: int) -> float:
    """A dyadic price/volume: sums of these are exact in floats."""
    return rng.randint(lo, hi) / 1024


def random_symbol_stream(rng: random.Random, cfg: AggregatorConfig, *, bad: bool) -> list[tuple]:
    """Events ('t', TickRow) / ('w', time) of one symbol, in arrival order."""
    if rng.random() < 0.3:
        return edge_symbol_stream(rng, cfg)
    n = rng.randint(1, 400)
    if cfg.server_tz is not None and rng.random() < 0.8:
        tr = _transitions(cfg.server_tz) or [1_700_000_000_000]
        t0 = rng.choice(tr) - rng.randrange(0, 3 * DAY)
    else:
        t0 = rng.randrange(1_500_000_000_000, 1_800_000_000_000)
    step_mode = rng.random()
    with_seq = rng.random() < 0.7
    vol_mode = rng.choice(["none", "all", "some"])
    last_mode = rng.choice(["none", "all", "some", "all"])
    mid = rng.randint(1024, 1024 * 200)
    ticks = []
    t = t0
    for k in range(n):
        x = rng.random()
        if step_mode < 0.3:  # dense
            d = rng.choice([0, 0, 1, rng.randint(0, 2_000)])
        elif x < 0.6:
            d = rng.randint(0, 5_000)
        elif x < 0.85:
            d = rng.randint(0, 120_000)
        elif x < 0.95:
            d = rng.randint(0, 4 * H)
        else:
            d = rng.randint(0, 2 * DAY)
        if rng.random() < 0.05:
            d = rng.choice([59_999, 60_000, 60_001, H - 1, H, 4 * H, DAY])
        t += d
        mid += rng.randint(-20, 20)
        mid = max(mid, 64)
        spread = rng.randint(0, 40)
        bid = mid / 1024
        ask = (mid + spread) / 1024
        last = None
        if last_mode == "all" or (last_mode == "some" and rng.random() < 0.7):
            last = _dy(rng, mid - 5, mid + spread + 5) if mid > 10 else bid
        vol = None
        if vol_mode == "all" or (vol_mode == "some" and rng.random() < 0.5):
            vol = _dy(rng, 0, 4096)
        ticks.append(
            TickRow(
                time_ms=t, bid=bid, ask=ask, last=last, volume=vol, seq=k + 1 if with_seq else None
            )
        )
    # EA restart: numbers again from 1 (times keep increasing)
    if with_seq and n > 20 and rng.random() < 0.15:
        cut = rng.randrange(5, n)
        ticks = ticks[:cut] + [
            TickRow(
                time_ms=r.time_ms + 1, bid=r.bid, ask=r.ask, last=r.last, volume=r.volume, seq=j + 1
            )
            for j, r in enumerate(ticks[cut:])
        ]
    events: list[tuple] = []
    arrival: list[tuple[float, tuple]] = []
    for idx, r in enumerate(ticks):
        x = rng.random()
        if x < 0.04:  # dropped: a sequence gap
            continue
        pos = float(idx)
        if x < 0.15:  # late: delivered later
            pos += rng.choice(
                [0.5, 1.5, rng.uniform(0, 10), rng.uniform(0, 60), rng.uniform(0, 300)]
            )
        arrival.append((pos, ("t", r)))
        if rng.random() < 0.06:  # duplicate: resent
            arrival.append((pos + rng.uniform(0, 30), ("t", r)))
        if bad and rng.random() < 0.04:
            arrival.append((pos + 0.1, ("t", _bad_row(rng, r))))
        if rng.random() < 0.03:  # watermark (idle close) some time after this tick
            w = r.time_ms + rng.choice(
                [0, 1, 60_000, rng.randint(0, 3 * H), rng.randint(0, 2 * DAY)]
            )
            arrival.append((pos + 0.01, ("w", w)))
    arrival.sort(key=lambda a: a[0])
    events = [e for _, e in arrival]
    if rng.random() < 0.2:
        events.insert(0, ("w", t0 - 5))  # a watermark before the first tick: ignored
    return events


def edge_symbol_stream(rng: random.Random, cfg: AggregatorConfig) -> list[tuple]:
    """Arrival order built directly against the watermark: ticks exactly at W - lateness
    and one ms before, on period boundaries (o + L - 1, o + L), at W, resent ticks,
    numbers skipped, a number below every one seen, watermarks at boundaries."""
    late = cfg.allowed_lateness_ms
    if cfg.server_tz is not None and rng.random() < 0.8:
        t0 = rng.choice(_transitions(cfg.server_tz) or [1_700_000_000_000]) - rng.randrange(0, DAY)
    else:
        t0 = rng.randrange(1_500_000_000_000, 1_800_000_000_000)
    W = t0
    seq = rng.randint(1, 50)
    sent: list[TickRow] = []
    events: list[tuple] = []
    mid = rng.randint(2048, 4096)
    for _ in range(rng.randint(1, 300)):
        x = rng.random()
        tf = rng.choice(cfg.timeframes)
        o, e = ref_period(tf.ms, W, cfg.day_start_ms, cfg.server_tz)
        if x < 0.1 and sent:
            events.append(("t", rng.choice(sent[-20:])))  # resent
            continue
        if x < 0.15:
            w = rng.choice([e, e - 1, e + cfg.close_delay_ms, e + cfg.close_delay_ms - 1, W + late])
            events.append(("w", w))
            W = max(W, w)
            continue
        if x < 0.35:
            t = rng.choice([W - late, W - late - 1, W - late + 1, W, W - 1])
        elif x < 0.55:
            t = rng.choice([e - 1, e, e + 1, o, o + tf.ms - 1, e + cfg.close_delay_ms])
        elif x < 0.6:
            t = W + rng.choice([late, late + 1, tf.ms, 4 * H, DAY])
        else:
            t = W + rng.randint(0, 30_000)
        t = max(t, 0)
        y = rng.random()
        if y < 0.1:
            seq += rng.randint(2, 5)  # a gap
        elif y < 0.13:
            s_low = max(1, seq - rng.randint(1, 100))
            seq_used = s_low
        else:
            seq += 1
        seq_used = seq if y >= 0.1 and not 0.1 <= y < 0.13 else (seq if y < 0.1 else s_low)
        mid = max(64, mid + rng.randint(-8, 8))
        r = TickRow(
            time_ms=t,
            bid=mid / 1024,
            ask=(mid + rng.randint(0, 9)) / 1024,
            last=rng.choice([None, mid / 1024, (mid + 1) / 1024]),
            volume=rng.choice([None, 0.0, rng.randint(0, 64) / 8]),
            seq=seq_used,
        )
        events.append(("t", r))
        sent.append(r)
        W = max(W, t)  # an estimate (the tick may be refused): good enough to aim at
    return events


def _bad_row(rng: random.Random, r: TickRow) -> TickRow:
    kind = rng.randrange(8)
    d = {
        "time_ms": r.time_ms,
        "bid": r.bid,
        "ask": r.ask,
        "last": r.last,
        "volume": r.volume,
        "seq": r.seq,
    }
    if kind == 0:
        d["bid"] = float("nan")
    elif kind == 1:
        d["ask"] = float("inf")
    elif kind == 2:
        d["bid"], d["ask"] = r.ask + 1, r.bid
    elif kind == 3:
        d["volume"] = -1.0
    elif kind == 4:
        d["volume"] = float("nan")
    elif kind == 5:
        d["last"] = 0.0
    elif kind == 6:
        d["time_ms"] = 10**14  # future
    else:
        d["bid"] = 1e15
    return TickRow(**d)


def random_streams(rng: random.Random, cfg: AggregatorConfig, *, bad: bool) -> list[tuple]:
    """Events of several (feed, symbol), interleaved in random runs, each keeping its order."""
    names = [("f1", "EURUSD"), ("f1", "XAUUSD"), ("f2", "EURUSD"), ("f2", "US500")]
    keys = rng.sample(names, rng.randint(1, 4))
    per = {k: random_symbol_stream(rng, cfg, bad=bad) for k in keys}
    out = []
    while per:
        k = rng.choice(list(per))
        evs = per[k]
        take = rng.randint(1, 40)
        chunk, per[k] = evs[:take], evs[take:]
        if not per[k]:
            del per[k]
        # ticks of a chunk form one add_rows call (watermarks split it)
        run: list[TickRow] = []
        for e in chunk:
            if e[0] == "t":
                run.append(e[1])
            else:
                if run:
                    out.append(("rows", k, run))
                    run = []
                out.append(("w", k, e[1]))
        if run:
            out.append(("rows", k, run))
    return out


def _now(rows: list[TickRow]) -> int:
    """When TICKS stored the message: after its ticks, mostly (a future one is refused)."""
    return max((r.time_ms for r in rows if r.time_ms < 10**13), default=0)


# --- 1. add_rows == check_tick + add per row ----------------------------------------------


def _run_rows(agg: Aggregator, events, *, snap_rng: random.Random | None = None):
    log = []
    filled = 0
    for ev in events:
        if ev[0] == "w":
            _, (feed, sym), w = ev
            log.append(("w", agg.advance(feed, sym, w)))
            continue
        _, (feed, sym), rows = ev
        now = _now(rows)
        out: list[Candle] = []
        times: list[int] = []
        res = agg.add_rows(
            feed, sym, rows, now_ms=now, max_future_skew_ms=SKEW, out=out, out_times=times
        )
        log.append(("rows", res, out, times))
        if snap_rng is not None and snap_rng.random() < 0.1:
            # ``filled`` is not in a snapshot: the caller takes it (app: per batch)
            filled += agg.filled
            agg = Aggregator.restore(agg.config, agg.snapshot())
    agg.filled += filled
    return agg, log


def _run_single(agg: Aggregator, events):
    log = []
    for ev in events:
        if ev[0] == "w":
            _, (feed, sym), w = ev
            log.append(("w", agg.advance(feed, sym, w)))
            continue
        _, (feed, sym), rows = ev
        now = _now(rows)
        acc = dup = gap = 0
        refused = []
        out: list[Candle] = []
        times: list[int] = []
        for i, r in enumerate(rows):
            reason = check_tick(
                r.time_ms, r.bid, r.ask, r.last, r.volume, now_ms=now, max_future_skew_ms=SKEW
            )
            if reason is not None:
                refused.append((i, reason))
                continue
            res = agg.add(feed, sym, r.time_ms, r.bid, r.ask, r.last, r.volume, r.seq)
            gap += res.gap
            if res.outcome == ACCEPTED:
                acc += 1
                out.extend(res.candles)
                times.extend([r.time_ms] * len(res.candles))
            elif res.outcome == DUPLICATE:
                dup += 1
            else:
                refused.append((i, res.outcome))
        log.append(("rows", (acc, dup, gap, refused, agg.watermark(feed, sym)), out, times))
    return agg, log


@pytest.mark.parametrize("seed", range(STREAMS))
def test_add_rows_equals_check_tick_then_add(seed: int) -> None:
    rng = random.Random(seed * 7919 + 1)
    cfg = random_config(rng)
    events = random_streams(rng, cfg, bad=True)
    a, la = _run_rows(Aggregator(cfg), events, snap_rng=random.Random(seed))
    b, lb = _run_single(Aggregator(cfg), events)
    assert len(la) == len(lb)
    for n, (x, y) in enumerate(zip(la, lb, strict=True)):
        if x[0] == "w":
            assert x == y, n
            continue
        res, out, times = x[1:]
        assert (res.accepted, res.duplicate, res.gap, res.refused, res.watermark) == y[1], n
        assert out == y[2], n
        assert times == y[3], n
    assert a.filled == b.filled
    assert a.snapshot() == b.snapshot()
    for feed, sym in b.symbols():
        assert a.next_close_ms(feed, sym) == b.next_close_ms(feed, sym)
    assert a.open_candles() == b.open_candles()


# --- 2. candles against the reference --------------------------------------------------


def _compare_to_reference(cfg: AggregatorConfig, events, *, use_rows: bool) -> dict:
    agg = Aggregator(cfg)
    ref = Reference(cfg)
    stats = {
        "accepted": 0,
        "duplicate": 0,
        "too_late": 0,
        "revisions": 0,
        "candles": 0,
        "gap": 0,
        "no_last_price": 0,
        "w": 0,
    }
    for n, ev in enumerate(events):
        if ev[0] == "w":
            _, (feed, sym), w = ev
            got = agg.advance(feed, sym, w)
            want = ref.advance(feed, sym, w)
            assert got == want, (n, ev)
            stats["w"] += 1
            stats["candles"] += len(got)
            continue
        _, (feed, sym), rows = ev
        rows = [
            r
            for r in rows
            if check_tick(
                r.time_ms,
                r.bid,
                r.ask,
                r.last,
                r.volume,
                now_ms=_now(rows),
                max_future_skew_ms=SKEW,
            )
            is None
        ]
        if not rows:
            continue
        want_out: list[Candle] = []
        want_counts = {"accepted": 0, "duplicate": 0, "gap": 0}
        want_refused = []
        for i, r in enumerate(rows):
            outcome, cs, gap = ref.add(feed, sym, r.time_ms, r.bid, r.ask, r.last, r.volume, r.seq)
            want_counts["gap"] += gap
            if outcome in ("accepted", "duplicate"):
                want_counts[outcome] += 1
            else:
                want_refused.append((i, outcome))
                stats[outcome] += 1
            want_out += cs
        if use_rows:
            got_out: list[Candle] = []
            res = agg.add_rows(
                feed,
                sym,
                rows,
                now_ms=_now(rows),
                max_future_skew_ms=SKEW,
                out=got_out,
                out_times=[],
            )
            got = (res.accepted, res.duplicate, res.gap, res.refused)
        else:
            got_out = []
            acc = dup = gap = 0
            refused = []
            for i, r in enumerate(rows):
                x = agg.add(feed, sym, r.time_ms, r.bid, r.ask, r.last, r.volume, r.seq)
                gap += x.gap
                if x.outcome == ACCEPTED:
                    acc += 1
                elif x.outcome == DUPLICATE:
                    dup += 1
                else:
                    refused.append((i, x.outcome))
                got_out += x.candles
            got = (acc, dup, gap, refused)
        want = (want_counts["accepted"], want_counts["duplicate"], want_counts["gap"], want_refused)
        assert got == want, (n, feed, sym)
        if got_out != want_out:
            _explain(got_out, want_out, n)
        assert agg.watermark(feed, sym) == ref.watermark(feed, sym)
        assert agg.next_close_ms(feed, sym) == ref.next_close_ms(feed, sym), n
        stats["accepted"] += want_counts["accepted"]
        stats["duplicate"] += want_counts["duplicate"]
        stats["gap"] += want_counts["gap"]
        stats["candles"] += len(want_out)
        stats["revisions"] += sum(1 for c in want_out if c.revision > 0)
    assert agg.open_candles() == ref.open_candles()
    assert agg.filled == ref.filled
    return stats


def _explain(got: list[Candle], want: list[Candle], n: int) -> None:
    lines = [f"event {n}: {len(got)} candles, reference {len(want)}"]
    for k in range(max(len(got), len(want))):
        g = got[k] if k < len(got) else None
        w = want[k] if k < len(want) else None
        if g != w:
            lines.append(f"  [{k}] got  {g}")
            lines.append(f"  [{k}] want {w}")
    raise AssertionError("\n".join(lines[:21]))


TOTALS: dict[str, int] = {}


@pytest.mark.parametrize("seed", range(STREAMS))
def test_candles_match_reference(seed: int) -> None:
    rng = random.Random(seed * 104729 + 3)
    cfg = random_config(rng)
    events = random_streams(rng, cfg, bad=False)
    stats = _compare_to_reference(cfg, events, use_rows=seed % 2 == 0)
    for k, v in stats.items():
        TOTALS[k] = TOTALS.get(k, 0) + v


@pytest.mark.parametrize("seed", range(STREAMS // 2))
def test_zoned_candles_match_reference(seed: int) -> None:
    rng = random.Random(seed * 15485863 + 5)
    cfg = random_config(rng, zoned=True)
    events = random_streams(rng, cfg, bad=False)
    _compare_to_reference(cfg, events, use_rows=seed % 2 == 1)


# --- 3. period boundaries -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ZONES)
def test_zoned_periods_match_reference(spec: str) -> None:
    rng = random.Random(spec)
    cfg = AggregatorConfig(server_tz=spec)
    periods = cfg.periods()
    tr = _transitions(spec)
    instants = []
    for x in tr:
        for d in (-DAY - 1, -4 * H, -H - 1, -H, -1, 0, 1, H - 1, H, 4 * H, DAY):
            instants.append(x + d)
        for _ in range(40):
            instants.append(x + rng.randrange(-3 * DAY, 3 * DAY))
    instants += [rng.randrange(1_500_000_000_000, 1_900_000_000_000) for _ in range(2000)]
    for t in instants:
        for tf in TFS:
            o, e = ref_period(tf.ms, t, 0, spec)
            assert periods.open(tf, t) == o, (spec, tf, t)
            assert periods.end(tf, o) == e, (spec, tf, t)
            assert o <= t < e
            assert periods.aligned(tf, o)


@pytest.mark.parametrize("seed", range(50))
def test_fixed_day_start_periods(seed: int) -> None:
    rng = random.Random(seed)
    ds = rng.choice([0, 79_200_000, rng.randrange(0, DAY), rng.randrange(-5 * DAY, 5 * DAY)])
    cfg = AggregatorConfig(day_start_ms=ds)
    periods = cfg.periods()
    for _ in range(500):
        t = rng.randrange(0, 2_000_000_000_000)
        for tf in TFS:
            o = periods.open(tf, t)
            e = periods.end(tf, o)
            # independent: count whole periods from the day start, in Python's big ints
            base = ds % DAY
            k = math.floor((t - base) / tf.ms) if abs(t - base) < 2**52 else None
            assert k is not None
            assert (o, e) == (base + k * tf.ms, base + (k + 1) * tf.ms)


# --- 4. bars only: larger candles built from bars of one timeframe ----------------------


@pytest.mark.parametrize("seed", range(max(STREAMS // 3, 1)))
def test_bars_build_larger_candles(seed: int) -> None:
    """Bars of one timeframe in time order (with gaps): their own candle at once, the larger
    ones closed by the bars' watermark (the end of the latest bar), no close delay."""
    from contracts.messages import Bar

    rng = random.Random(seed * 31 + 11)
    cfg = random_config(rng)
    src = rng.choice([tf for tf in cfg.timeframes if tf.ms <= H] or [cfg.timeframes[0]])
    agg = Aggregator(cfg)
    periods = cfg.periods()
    tfs = list(cfg.timeframes)
    t = periods.open(src, rng.randrange(1_500_000_000_000, 1_800_000_000_000))
    if cfg.server_tz is not None:
        t = periods.open(
            src,
            rng.choice(_transitions(cfg.server_tz) or [1_700_000_000_000])
            - rng.randrange(0, 2 * DAY),
        )
    groups: dict[tuple[int, int], list[Bar]] = {}
    ends: dict[tuple[int, int], int] = {}
    emitted: set[tuple[int, int]] = set()
    wm = None
    for _ in range(rng.randint(1, 300)):
        e = periods.end(src, t)
        p = [rng.randint(1024, 4096) / 1024 for _ in range(4)]
        bar = Bar(
            feed="f",
            symbol="S",
            tf=src,
            open_time_ms=t,
            open=p[0],
            high=max(p),
            low=min(p),
            close=p[3],
            tick_volume=rng.randint(0, 100),
            real_volume=rng.randint(0, 100) / 4,
            spread=rng.randint(0, 64) / 1024,
        )
        got = agg.add_bar(bar)
        want = []
        if src in tfs:
            want.append(
                Candle(
                    feed="f",
                    symbol="S",
                    tf=src,
                    open_time_ms=t,
                    close_time_ms=e,
                    open=bar.open,
                    high=bar.high,
                    low=bar.low,
                    close=bar.close,
                    tick_volume=bar.tick_volume,
                    real_volume=bar.real_volume,
                    spread_mean=bar.spread,
                    spread_max=bar.spread,
                    first_tick_ms=t,
                    last_tick_ms=e - 1,
                    revision=0,
                    source="bars",
                )
            )
        for i, tf in enumerate(tfs):
            if tf.ms > src.ms and tf.ms % src.ms == 0:
                o, pe = ref_period(tf.ms, t, cfg.day_start_ms, cfg.server_tz)
                groups.setdefault((i, o), []).append(bar)
                ends[i, o] = pe
        wm = e
        for k in sorted(groups):
            if k in emitted or ends[k] > wm:
                continue
            emitted.add(k)
            bs = groups[k]
            want.append(
                Candle(
                    feed="f",
                    symbol="S",
                    tf=tfs[k[0]],
                    open_time_ms=k[1],
                    close_time_ms=ends[k],
                    open=bs[0].open,
                    high=max(b.high for b in bs),
                    low=min(b.low for b in bs),
                    close=bs[-1].close,
                    tick_volume=sum(b.tick_volume for b in bs),
                    real_volume=math.fsum(b.real_volume for b in bs),
                    spread_mean=math.fsum(b.spread for b in bs) / len(bs),
                    spread_max=max(b.spread for b in bs),
                    first_tick_ms=bs[0].open_time_ms,
                    last_tick_ms=periods.end(src, bs[-1].open_time_ms) - 1,
                    revision=0,
                    source="bars",
                )
            )
        if got != want:
            _explain(got, want, t)
        # next bar: right after, or after a gap (a weekend, an hour, a few bars)
        t = e
        if rng.random() < 0.1:
            t = periods.open(src, t + rng.choice([src.ms, 3 * src.ms, H, 5 * H, 2 * DAY]))


def test_filled_only_counts_numbers_counted_in_a_gap() -> None:
    """``Aggregator.filled``: 'Missing sequence numbers that came after all (each was counted
    in a gap when it went missing)'; README: gaps_total - gaps_filled_total = 'the difference
    never came'. A number below every one seen marks those between as missing without a gap,
    so filling one of them makes gaps - filled negative."""
    agg = Aggregator(AggregatorConfig())
    t = 1_700_000_000_000
    gaps = agg.add("f", "S", t + 100, 1.0, 1.1, seq=3).gap  # numbers start at 3 here
    gaps += agg.add("f", "S", t + 10, 1.0, 1.1, seq=1).gap  # resent late, below all: taken
    gaps += agg.add("f", "S", t + 20, 1.0, 1.1, seq=2).gap  # the one between
    assert gaps >= agg.filled
