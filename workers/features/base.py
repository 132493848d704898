"""What every feature is made of: a candle to read, arrays of candles, and the two forms.

A feature is a frozen dataclass whose fields are its parameters. It declares its output
names, its warm-up (how many candles, the current one included, it needs before its
values mean anything) and its memory (after how many candles what came before them no
longer shows in its values), and it carries both forms of one definition side by side:

- ``stepper()``: an incremental state that takes one candle at a time in O(1);
- ``batch(candles)``: the same values for a whole array of candles at once.

Both forms give NaN for candles before the warm-up and finite values from it on, and
neither ever reads a candle later than the one it describes.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Final, Protocol, Self

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

PARITY: Final = 1e-9
"""How far two computations of the same value may differ by rounding alone (the stepped
and batch forms, or two engines that started at different candles once past their
memory): ``PARITY`` of the value, or absolute below 1."""
FADED: Final = 1e-12
"""The weight below which what came before a feature's memory counts as gone."""


def agree(a: Sequence[float], b: Sequence[float]) -> bool:
    """Values equal to ``PARITY`` (NaN with NaN, an infinity with itself)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x == y or (x != x and y != y):
            continue
        if not abs(x - y) <= PARITY * max(1.0, abs(x), abs(y)):
            return False
    return True


def fading(b: float, weight: float = FADED) -> int:
    """Steps of ``avg = b * avg + ...`` after which the average's start weighs below
    ``weight``: the smallest k with ``b ** k < weight``."""
    k = max(1, math.ceil(math.log(weight) / math.log(b)))
    while b**k >= weight:
        k += 1
    while k > 1 and b ** (k - 1) < weight:
        k -= 1
    return k


class Bar(Protocol):
    """The fields of a closed candle that features read (``contracts.messages.Candle`` has
    them all)."""

    @property
    def open_time_ms(self) -> int: ...
    @property
    def open(self) -> float: ...
    @property
    def high(self) -> float: ...
    @property
    def low(self) -> float: ...
    @property
    def close(self) -> float: ...
    @property
    def tick_volume(self) -> int: ...
    @property
    def spread_mean(self) -> float: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Candles:
    """Candles of one series in time order, as arrays: the input of the batch form."""

    open_time_ms: NDArray[np.int64]
    open: Array
    high: Array
    low: Array
    close: Array
    tick_volume: NDArray[np.int64]
    spread_mean: Array

    @classmethod
    def from_bars(cls, bars: Iterable[Bar]) -> Candles:
        rows = [
            (b.open_time_ms, b.open, b.high, b.low, b.close, b.tick_volume, b.spread_mean)
            for b in bars
        ]
        cols = list(zip(*rows, strict=True)) if rows else [()] * 7
        return cls(
            open_time_ms=np.asarray(cols[0], dtype=np.int64),
            open=np.asarray(cols[1], dtype=np.float64),
            high=np.asarray(cols[2], dtype=np.float64),
            low=np.asarray(cols[3], dtype=np.float64),
            close=np.asarray(cols[4], dtype=np.float64),
            tick_volume=np.asarray(cols[5], dtype=np.int64),
            spread_mean=np.asarray(cols[6], dtype=np.float64),
        )

    def __len__(self) -> int:
        return len(self.close)

    def head(self, n: int) -> Candles:
        """The first ``n`` candles: what was known when candle ``n - 1`` closed."""
        return Candles(**{f.name: getattr(self, f.name)[:n] for f in dataclasses.fields(self)})

    def row(self, i: int) -> Bar:
        return _Row(
            open_time_ms=int(self.open_time_ms[i]),
            open=float(self.open[i]),
            high=float(self.high[i]),
            low=float(self.low[i]),
            close=float(self.close[i]),
            tick_volume=int(self.tick_volume[i]),
            spread_mean=float(self.spread_mean[i]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    open_time_ms: int
    open: float
    high: float
    low: float
    close: float
    tick_volume: int
    spread_mean: float


class Stepper(abc.ABC):
    """The incremental form of one feature: the state of one series."""

    __slots__ = ()

    @abc.abstractmethod
    def step(self, bar: Bar, out: list[float], at: int) -> None:
        """Take the next candle; write this feature's values to ``out[at:at + width]``
        (left NaN before the warm-up)."""

    @abc.abstractmethod
    def clone(self) -> Self:
        """An independent copy: the state to go back to when a candle is revised."""


class Feature(abc.ABC):
    """One feature definition. Subclasses are frozen dataclasses; their fields are the
    parameters, and ``kind`` names the definition in the feature-set id."""

    kind: ClassVar[str]
    of_price_level: ClassVar[bool] = False
    """True when the values are differences of price levels (MACD): they round at the
    price's size, not at their own, and the look-ahead check compares them at that size."""

    @property
    @abc.abstractmethod
    def names(self) -> tuple[str, ...]:
        """Output names, in the order the values are written."""

    @property
    @abc.abstractmethod
    def warmup(self) -> int:
        """Candles needed, the current one included, before the values are valid."""

    @property
    def memory(self) -> int:
        """Candles after which its values no longer depend on the state it had before them
        (two steppers in any states, fed the same candles, agree to rounding, and to
        ``FADED`` of how far apart they started): its warm-up for a feature of a window;
        more for one that smooths recursively and so remembers every candle, fading."""
        return self.warmup

    @abc.abstractmethod
    def stepper(self) -> Stepper: ...

    @abc.abstractmethod
    def batch(self, candles: Candles) -> Array:
        """Values for every candle, shape ``(len(candles), len(names))``."""

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def empty(n: int, width: int = 1) -> Array:
    return np.full((n, width), np.nan, dtype=np.float64)


def linear_scan(u: Array, b: float) -> Array:
    """``y[i] = b * y[i - 1] + u[i]`` (``y[-1] = 0``) for every i, without a Python loop.

    Doubling: after the pass with shift s each y[i] holds the terms u[i - s + 1 .. i]
    weighted by powers of b; log2(n) vectorised passes, or fewer once b**s underflows.
    """
    y = u.copy()
    s, bs = 1, b
    n = len(y)
    while s < n and bs != 0.0:
        y[s:] = y[s:] + bs * y[:-s]
        s *= 2
        bs *= bs
    return y
