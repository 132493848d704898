"""The feature definitions: each one's incremental step and batch form, side by side.

Conventions shared by every definition here:

- log returns are ``log(close[i] / close[i - k])``;
- standard deviations are population ones (divide by n), over windows that end at the
  current candle;
- Wilder smoothing (RSI, ATR) is seeded with the plain mean of the first ``period`` inputs,
  then ``avg = (1 - 1/period) * avg + x / period``;
- MACD's EMAs use ``alpha = 2 / (span + 1)`` seeded with the first value (pandas'
  ``ewm(span=..., adjust=False)``);
- these smoothings remember every candle, fading by ``1 - 1/period`` (``1 - alpha``) a
  candle: their ``memory`` is how many candles it takes for their start to weigh below
  ``FADED`` (``fading``);
- a ratio whose denominator is zero, or below ``FLAT`` times the price level (a flat
  window), is 0;
- a log return whose ratio underflows to 0 (a price next to nothing) is -inf, as numpy
  gives it, never an error: the vector is refused as not finite.

Sliding windows are updated in O(1) (add the new value, remove the old one) and recomputed
from the window every ``bars`` candles, so rounding never accumulates over a long series.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from workers.features.base import (
    FADED,
    Array,
    Bar,
    Candles,
    Feature,
    Stepper,
    empty,
    fading,
    linear_scan,
)

NAN = math.nan
TAU = 2.0 * math.pi
DAY_MS = 86_400_000
FLAT = 1e-10
"""A window whose standard deviation (or ATR) is below ``FLAT`` times its level is flat."""
CANCELLED = 1e-3
"""A window's variance that fell below ``CANCELLED`` times its largest since it was last
computed from its values is computed from them again: what rounding left of the larger
one is no longer small against it."""
NEAR_FLAT = 1e-5
"""So is a window whose deviation is below ``NEAR_FLAT`` times its level: the rounding of
its base (half a unit in the last place of the level) is no longer small against it. A
tenth of a pip on EURUSD: quiet windows are far above it."""


def _log_ratio(a: Array, b: Array) -> Array:
    """``log(a / b)``; -inf or inf, as the incremental forms give them, where extreme prices
    make the ratio underflow or overflow."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.log(a / b)


def _log_returns(close: Array) -> Array:
    return _log_ratio(close[1:], close[:-1])


# --- log return over k bars ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogReturn(Feature):
    kind: ClassVar[str] = "log_return"
    bars: int = 1

    @property
    def names(self) -> tuple[str, ...]:
        return (f"ret_{self.bars}",)

    @property
    def warmup(self) -> int:
        return self.bars + 1

    def stepper(self) -> Stepper:
        return _LogReturnStep(self.bars)

    def batch(self, candles: Candles) -> Array:
        c, k = candles.close, self.bars
        out = empty(len(c))
        if len(c) > k:
            out[k:, 0] = _log_ratio(c[k:], c[:-k])
        return out


class _LogReturnStep(Stepper):
    __slots__ = ("closes",)

    def __init__(self, bars: int) -> None:
        self.closes: deque[float] = deque(maxlen=bars + 1)

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        closes = self.closes
        closes.append(bar.close)
        if len(closes) == closes.maxlen:
            r = bar.close / closes[0]
            out[at] = math.log(r) if r > 0.0 else -math.inf  # underflowed: as numpy's

    def clone(self) -> _LogReturnStep:
        new = _LogReturnStep.__new__(_LogReturnStep)
        new.closes = self.closes.copy()
        return new


# --- sliding mean and standard deviation ---------------------------------------------


def _fsum(values: list[float]) -> float:
    """``math.fsum``, or the plain sum (inf or NaN, as numpy's) where fsum raises: values
    whose sum is past the float range, or both infinities (an extreme price's returns)."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):
        return sum(values)


class _Window:
    """Mean and population variance of the last ``n`` values, O(1) per value.

    Sliding Welford updates of the values less a base (their mean when last computed from
    them), so that rounding is of the size of their deviations, not of their level. The
    window is computed from its values (two passes) every ``n`` values, so that rounding
    cannot build up, when its variance falls far below its recent largest (``CANCELLED``),
    and when its deviation is tiny against its level (``NEAR_FLAT``). A window of equal
    values is exactly flat, as the batch form's two passes make it.
    """

    __slots__ = ("base", "dev", "m2", "n", "near", "peak", "same", "since", "values")

    def __init__(self, n: int) -> None:
        self.n = n
        self.near = n * NEAR_FLAT**2
        self.values: deque[float] = deque(maxlen=n)
        self.base = 0.0
        self.dev = 0.0
        """``mean - base``."""
        self.m2 = 0.0
        self.peak = 0.0
        """The largest ``m2`` since the window was last computed from its values."""
        self.since = 0
        self.same = 0
        """How many of the latest values equal the last one."""

    def push(self, x: float) -> None:
        values = self.values
        self.same = self.same + 1 if values and values[-1] == x else 1
        if len(values) < self.n:
            if not values:
                self.base = x
            values.append(x)
            dx = x - self.base
            d = dx - self.dev
            self.dev += d / len(values)
            self.m2 += d * (dx - self.dev)
            self.peak = max(self.peak, self.m2)
            return
        old = values[0]
        values.append(x)
        self.since += 1
        if self.same >= self.n:
            self.base = x
            self.dev = self.m2 = self.peak = 0.0
            return
        if self.since < self.n:
            base = self.base
            dx, do = x - base, old - base
            dev = self.dev + (dx - do) / self.n
            m2 = self.m2 + (dx - do) * (dx - dev + do - self.dev)
            self.dev, self.m2 = dev, m2
            if m2 > self.peak:
                self.peak = m2
            if m2 > self.peak * CANCELLED and m2 > self.near * base * base:
                return
        self.since = 0
        self.base = base = _fsum(list(values)) / self.n
        self.dev = dev = _fsum([v - base for v in values]) / self.n  # what rounding left
        # d * d, not d ** 2: a square past the float range is inf, where ** raises
        self.m2 = self.peak = _fsum([d * d for d in (v - base - dev for v in values)])

    @property
    def full(self) -> bool:
        return len(self.values) == self.n

    @property
    def mean(self) -> float:
        return self.base + self.dev

    def std(self) -> float:
        m2 = self.m2
        if m2 > 0.0:
            return math.sqrt(m2 / self.n)
        return 0.0 if m2 == m2 else NAN  # NaN: the window holds both infinities

    def copy(self) -> _Window:
        new = _Window.__new__(_Window)
        new.n, new.m2, new.since = self.n, self.m2, self.since
        new.base, new.dev, new.peak, new.same = self.base, self.dev, self.peak, self.same
        new.near = self.near
        new.values = self.values.copy()
        return new


def _rolling(x: Array, n: int) -> tuple[Array, Array, Array]:
    """Each window of ``n`` values ending at ``n - 1 ..`` as its first value, its mean less
    that, and its population std. Taken less its first value, a window's deviations round
    at their own size, not at the level's: as the incremental form's do."""
    w = sliding_window_view(x, n)
    d = w - w[:, :1]
    dmean = d.mean(axis=1)
    return w[:, 0], dmean, np.sqrt(((d - dmean[:, None]) ** 2).mean(axis=1))


def _zscore(w: _Window, x: float) -> float:
    """How many of its standard deviations ``x`` is from the window's mean."""
    std = w.std()
    if std <= FLAT * abs(w.mean) or std == 0.0:
        return 0.0
    return ((x - w.base) - w.dev) / std


def _zscores(x: Array, first: Array, dmean: Array, std: Array) -> Array:
    flat = (std <= FLAT * np.abs(first + dmean)) | (std == 0.0)
    return np.where(flat, 0.0, ((x - first) - dmean) / np.where(flat, 1.0, std))


@dataclass(frozen=True, slots=True)
class Volatility(Feature):
    """Standard deviation of the last ``bars`` one-bar log returns."""

    kind: ClassVar[str] = "volatility"
    bars: int = 20

    @property
    def names(self) -> tuple[str, ...]:
        return (f"vol_{self.bars}",)

    @property
    def warmup(self) -> int:
        return self.bars + 1

    def stepper(self) -> Stepper:
        return _VolatilityStep(self.bars)

    def batch(self, candles: Candles) -> Array:
        n = self.bars
        out = empty(len(candles))
        if len(candles) > n:
            out[n:, 0] = _rolling(_log_returns(candles.close), n)[2]
        return out


class _VolatilityStep(Stepper):
    __slots__ = ("prev", "window")

    def __init__(self, bars: int) -> None:
        self.window = _Window(bars)
        self.prev = NAN

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        prev, self.prev = self.prev, bar.close
        if prev != prev:  # the first candle: no return yet
            return
        w = self.window
        r = bar.close / prev
        w.push(math.log(r) if r > 0.0 else -math.inf)  # underflowed: as numpy's
        if w.full:
            out[at] = w.std()

    def clone(self) -> _VolatilityStep:
        new = _VolatilityStep.__new__(_VolatilityStep)
        new.window, new.prev = self.window.copy(), self.prev
        return new


@dataclass(frozen=True, slots=True)
class BollingerZ(Feature):
    """How many standard deviations the close is from its ``bars``-candle mean."""

    kind: ClassVar[str] = "bollinger_z"
    bars: int = 20

    @property
    def names(self) -> tuple[str, ...]:
        return (f"bb_z_{self.bars}",)

    @property
    def warmup(self) -> int:
        return self.bars

    def stepper(self) -> Stepper:
        return _BollingerStep(self.bars)

    def batch(self, candles: Candles) -> Array:
        n, c = self.bars, candles.close
        out = empty(len(c))
        if len(c) >= n:
            out[n - 1 :, 0] = _zscores(c[n - 1 :], *_rolling(c, n))
        return out


class _BollingerStep(Stepper):
    __slots__ = ("window",)

    def __init__(self, bars: int) -> None:
        self.window = _Window(bars)

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        w = self.window
        w.push(bar.close)
        if w.full:
            out[at] = _zscore(w, bar.close)

    def clone(self) -> _BollingerStep:
        new = _BollingerStep.__new__(_BollingerStep)
        new.window = self.window.copy()
        return new


@dataclass(frozen=True, slots=True)
class VolumeZ(Feature):
    """z-score of the tick volume against its last ``bars`` candles (exact integer sums)."""

    kind: ClassVar[str] = "volume_z"
    bars: int = 20

    @property
    def names(self) -> tuple[str, ...]:
        return (f"volume_z_{self.bars}",)

    @property
    def warmup(self) -> int:
        return self.bars

    def stepper(self) -> Stepper:
        return _VolumeStep(self.bars)

    def batch(self, candles: Candles) -> Array:
        n, v = self.bars, candles.tick_volume
        out = empty(len(v))
        if len(v) >= n:
            # Python integers: exact sums whatever the volumes
            v_obj = v.astype(object)
            s1 = sliding_window_view(v_obj, n).sum(axis=1)
            s2 = sliding_window_view(v_obj * v_obj, n).sum(axis=1)
            out[n - 1 :, 0] = [
                _volume_z(int(x), int(a), int(b), n)
                for x, a, b in zip(v[n - 1 :], s1, s2, strict=True)
            ]
        return out


def _volume_z(v: int, s1: int, s2: int, n: int) -> float:
    var_n2 = n * s2 - s1 * s1  # n² times the variance, exact
    if var_n2 <= 0:
        return 0.0
    return (n * v - s1) / math.sqrt(var_n2)


class _VolumeStep(Stepper):
    __slots__ = ("s1", "s2", "values")

    def __init__(self, bars: int) -> None:
        self.values: deque[int] = deque(maxlen=bars)
        self.s1 = 0
        self.s2 = 0

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        values = self.values
        v = bar.tick_volume
        if len(values) == values.maxlen:
            old = values[0]
            self.s1 -= old
            self.s2 -= old * old
        values.append(v)
        self.s1 += v
        self.s2 += v * v
        n = len(values)
        if n == values.maxlen:
            out[at] = _volume_z(v, self.s1, self.s2, n)

    def clone(self) -> _VolumeStep:
        new = _VolumeStep.__new__(_VolumeStep)
        new.values, new.s1, new.s2 = self.values.copy(), self.s1, self.s2
        return new


# --- Wilder smoothing: RSI, ATR --------------------------------------------------------


class _Wilder:
    """Mean of the first ``period`` inputs, then ``avg = b * avg + a * x``."""

    __slots__ = ("a", "avg", "b", "count", "period", "total")

    def __init__(self, period: int) -> None:
        self.period = period
        self.a = 1.0 / period
        self.b = 1.0 - self.a
        self.count = 0
        self.total = 0.0
        self.avg = NAN

    def push(self, x: float) -> bool:
        """True once the average is defined."""
        self.count += 1
        if self.count > self.period:
            self.avg = self.b * self.avg + self.a * x
            return True
        self.total += x
        if self.count == self.period:
            self.avg = self.total / self.period
            return True
        return False

    def copy(self) -> _Wilder:
        new = _Wilder.__new__(_Wilder)
        new.period, new.a, new.b = self.period, self.a, self.b
        new.count, new.total, new.avg = self.count, self.total, self.avg
        return new


def _wilder(x: Array, period: int) -> Array:
    """Batch form of ``_Wilder`` over inputs ``x``: NaN until ``period`` inputs."""
    out = np.full(len(x), np.nan)
    if len(x) < period:
        return out
    a = 1.0 / period
    u = np.zeros(len(x) - period + 1)
    u[0] = x[:period].sum() / period
    u[1:] = a * x[period:]
    out[period - 1 :] = linear_scan(u, 1.0 - a)
    return out


def _rsi(gain: float, loss: float) -> float:
    total = gain + loss
    return 100.0 * gain / total if total > 0.0 else 50.0


@dataclass(frozen=True, slots=True)
class Rsi(Feature):
    """Wilder's relative strength index, 0..100."""

    kind: ClassVar[str] = "rsi"
    period: int = 14

    @property
    def names(self) -> tuple[str, ...]:
        return (f"rsi_{self.period}",)

    @property
    def warmup(self) -> int:
        return self.period + 1

    @property
    def memory(self) -> int:
        """Its warm-up seeds the average; then the state before fades by ``1 - 1/period``."""
        return self.warmup + fading(1.0 - 1.0 / self.period)

    def stepper(self) -> Stepper:
        return _RsiStep(self.period)

    def batch(self, candles: Candles) -> Array:
        out = empty(len(candles))
        if len(candles) <= self.period:
            return out
        change = np.diff(candles.close)
        gain = _wilder(np.maximum(change, 0.0), self.period)
        loss = _wilder(np.maximum(-change, 0.0), self.period)
        total = gain + loss
        safe = np.where(total > 0.0, total, 1.0)
        out[1:, 0] = np.where(total > 0.0, 100.0 * gain / safe, 50.0)
        out[: self.period, 0] = np.nan
        return out


class _RsiStep(Stepper):
    __slots__ = ("gain", "loss", "prev")

    def __init__(self, period: int) -> None:
        self.gain = _Wilder(period)
        self.loss = _Wilder(period)
        self.prev = NAN

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        prev, self.prev = self.prev, bar.close
        if prev != prev:
            return
        change = bar.close - prev
        self.gain.push(change if change > 0.0 else 0.0)
        if self.loss.push(-change if change < 0.0 else 0.0):
            out[at] = _rsi(self.gain.avg, self.loss.avg)

    def clone(self) -> _RsiStep:
        new = _RsiStep.__new__(_RsiStep)
        new.gain, new.loss, new.prev = self.gain.copy(), self.loss.copy(), self.prev
        return new


def _true_range(high: float, low: float, prev_close: float) -> float:
    return max(high - low, abs(high - prev_close), abs(low - prev_close))


def _true_ranges(c: Candles) -> Array:
    """True range of candles 1.. (candle 0 has no previous close)."""
    prev = c.close[:-1]
    h, lo = c.high[1:], c.low[1:]
    return np.maximum(h - lo, np.maximum(np.abs(h - prev), np.abs(lo - prev)))


def _atr(c: Candles, period: int) -> Array:
    """ATR of every candle (NaN before ``period`` true ranges), one dimension."""
    out = np.full(len(c), np.nan)
    if len(c) > period:
        out[1:] = _wilder(_true_ranges(c), period)
    return out


class _AtrStep:
    __slots__ = ("prev", "wilder")

    def __init__(self, period: int) -> None:
        self.wilder = _Wilder(period)
        self.prev = NAN

    def push(self, bar: Bar) -> bool:
        prev, self.prev = self.prev, bar.close
        if prev != prev:
            return False
        return self.wilder.push(_true_range(bar.high, bar.low, prev))

    def copy(self) -> _AtrStep:
        new = _AtrStep.__new__(_AtrStep)
        new.wilder, new.prev = self.wilder.copy(), self.prev
        return new


@dataclass(frozen=True, slots=True)
class Atr(Feature):
    """Wilder's average true range, in price units."""

    kind: ClassVar[str] = "atr"
    period: int = 14

    @property
    def names(self) -> tuple[str, ...]:
        return (f"atr_{self.period}",)

    @property
    def warmup(self) -> int:
        return self.period + 1

    @property
    def memory(self) -> int:
        """Its warm-up seeds the average; then the state before fades by ``1 - 1/period``."""
        return self.warmup + fading(1.0 - 1.0 / self.period)

    def stepper(self) -> Stepper:
        return _AtrFeatureStep(self.period)

    def batch(self, candles: Candles) -> Array:
        return _atr(candles, self.period)[:, None]


class _AtrFeatureStep(Stepper):
    __slots__ = ("atr",)

    def __init__(self, period: int) -> None:
        self.atr = _AtrStep(period)

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        if self.atr.push(bar):
            out[at] = self.atr.wilder.avg

    def clone(self) -> _AtrFeatureStep:
        new = _AtrFeatureStep.__new__(_AtrFeatureStep)
        new.atr = self.atr.copy()
        return new


@dataclass(frozen=True, slots=True)
class SpreadAtr(Feature):
    """Mean spread of the candle divided by ATR(period): the cost of a trade in ranges."""

    kind: ClassVar[str] = "spread_atr"
    period: int = 14

    @property
    def names(self) -> tuple[str, ...]:
        return (f"spread_atr_{self.period}",)

    @property
    def warmup(self) -> int:
        return self.period + 1

    @property
    def memory(self) -> int:
        """Its warm-up seeds the average; then the state before fades by ``1 - 1/period``."""
        return self.warmup + fading(1.0 - 1.0 / self.period)

    def stepper(self) -> Stepper:
        return _SpreadAtrStep(self.period)

    def batch(self, candles: Candles) -> Array:
        atr = _atr(candles, self.period)
        moving = atr > FLAT * candles.close  # below: a flat window, whose ATR only decays
        safe = np.where(moving, atr, 1.0)
        ratio = np.where(moving, candles.spread_mean / safe, 0.0)
        return np.where(np.isnan(atr), np.nan, ratio)[:, None]


class _SpreadAtrStep(Stepper):
    __slots__ = ("atr",)

    def __init__(self, period: int) -> None:
        self.atr = _AtrStep(period)

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        if self.atr.push(bar):
            atr = self.atr.wilder.avg
            out[at] = bar.spread_mean / atr if atr > FLAT * bar.close else 0.0

    def clone(self) -> _SpreadAtrStep:
        new = _SpreadAtrStep.__new__(_SpreadAtrStep)
        new.atr = self.atr.copy()
        return new


# --- MACD -----------------------------------------------------------------------------


def _ema(x: Array, span: int) -> Array:
    """``ewm(span, adjust=False)``: seeded with the first value."""
    if not len(x):
        return x.copy()
    a = 2.0 / (span + 1)
    u = a * x
    u[0] = x[0]
    return linear_scan(u, 1.0 - a)


@dataclass(frozen=True, slots=True)
class Macd(Feature):
    """EMA(fast) - EMA(slow) of the close, its EMA(signal), and their difference."""

    kind: ClassVar[str] = "macd"
    of_price_level: ClassVar[bool] = True
    fast: int = 12
    slow: int = 26
    signal: int = 9

    @property
    def names(self) -> tuple[str, ...]:
        return ("macd", "macd_signal", "macd_hist")

    @property
    def warmup(self) -> int:
        return self.slow + self.signal - 1

    @property
    def memory(self) -> int:
        """The first candle seeds the EMAs. What the fast and slow EMAs started from fades
        by the slower of their factors; the signal EMA's own start by its factor, and what
        the MACD brought into it over the first of these spans by its factor over the
        second: each span takes its start to half of ``FADED``, so that the state before
        weighs below ``FADED`` in every value after both."""
        slowest = 1.0 - 2.0 / (max(self.fast, self.slow) + 1)
        return max(
            self.warmup,
            1 + fading(slowest, FADED / 2) + fading(1.0 - 2.0 / (self.signal + 1), FADED / 2),
        )

    def stepper(self) -> Stepper:
        return _MacdStep(self.fast, self.slow, self.signal, self.warmup)

    def batch(self, candles: Candles) -> Array:
        c = candles.close
        macd = _ema(c, self.fast) - _ema(c, self.slow)
        signal = _ema(macd, self.signal)
        out = np.stack([macd, signal, macd - signal], axis=1) if len(c) else empty(0, 3)
        out[: self.warmup - 1] = np.nan
        return out


class _MacdStep(Stepper):
    __slots__ = ("a", "count", "fast", "signal", "slow", "warmup")

    def __init__(self, fast: int, slow: int, signal: int, warmup: int) -> None:
        self.a = (2.0 / (fast + 1), 2.0 / (slow + 1), 2.0 / (signal + 1))
        self.fast = self.slow = self.signal = NAN
        self.count = 0
        self.warmup = warmup

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        c = bar.close
        af, as_, ag = self.a
        if self.count == 0:
            self.fast = self.slow = c
            self.signal = 0.0
        else:
            self.fast = (1.0 - af) * self.fast + af * c
            self.slow = (1.0 - as_) * self.slow + as_ * c
            macd = self.fast - self.slow
            self.signal = (1.0 - ag) * self.signal + ag * macd
        self.count += 1
        if self.count >= self.warmup:
            macd = self.fast - self.slow
            out[at] = macd
            out[at + 1] = self.signal
            out[at + 2] = macd - self.signal

    def clone(self) -> _MacdStep:
        new = _MacdStep.__new__(_MacdStep)
        new.a, new.count, new.warmup = self.a, self.count, self.warmup
        new.fast, new.slow, new.signal = self.fast, self.slow, self.signal
        return new


# --- the candle itself and its time ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Range(Feature):
    """(high - low) / close."""

    kind: ClassVar[str] = "range"

    @property
    def names(self) -> tuple[str, ...]:
        return ("range_hl",)

    @property
    def warmup(self) -> int:
        return 1

    def stepper(self) -> Stepper:
        return _RangeStep()

    def batch(self, candles: Candles) -> Array:
        return ((candles.high - candles.low) / candles.close)[:, None]


class _RangeStep(Stepper):
    __slots__ = ()

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        out[at] = (bar.high - bar.low) / bar.close

    def clone(self) -> _RangeStep:
        return self


@dataclass(frozen=True, slots=True)
class TimeOfDay(Feature):
    """UTC time of day of the candle's open as a point on the unit circle."""

    kind: ClassVar[str] = "time_of_day"

    @property
    def names(self) -> tuple[str, ...]:
        return ("tod_sin", "tod_cos")

    @property
    def warmup(self) -> int:
        return 1

    def stepper(self) -> Stepper:
        return _TimeOfDayStep()

    def batch(self, candles: Candles) -> Array:
        angle = TAU * (candles.open_time_ms % DAY_MS) / DAY_MS
        return np.stack([np.sin(angle), np.cos(angle)], axis=1)


class _TimeOfDayStep(Stepper):
    __slots__ = ()

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        angle = TAU * (bar.open_time_ms % DAY_MS) / DAY_MS
        out[at] = math.sin(angle)
        out[at + 1] = math.cos(angle)

    def clone(self) -> _TimeOfDayStep:
        return self


@dataclass(frozen=True, slots=True)
class DayOfWeek(Feature):
    """UTC day of the week of the candle's open (Monday 0 .. Sunday 6) on the unit circle."""

    kind: ClassVar[str] = "day_of_week"

    @property
    def names(self) -> tuple[str, ...]:
        return ("dow_sin", "dow_cos")

    @property
    def warmup(self) -> int:
        return 1

    def stepper(self) -> Stepper:
        return _DayOfWeekStep()

    def batch(self, candles: Candles) -> Array:
        angle = TAU * ((candles.open_time_ms // DAY_MS + 3) % 7) / 7  # 1970-01-01: Thursday
        return np.stack([np.sin(angle), np.cos(angle)], axis=1)


class _DayOfWeekStep(Stepper):
    __slots__ = ()

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        angle = TAU * ((bar.open_time_ms // DAY_MS + 3) % 7) / 7
        out[at] = math.sin(angle)
        out[at + 1] = math.cos(angle)

    def clone(self) -> _DayOfWeekStep:
        return self
