"""A feature set: a tuple of feature definitions, its stable id, and both ways to run it."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from workers.features.base import Array, Bar, Candles, Feature, Stepper
from workers.features.kinds import (
    Atr,
    BollingerZ,
    DayOfWeek,
    LogReturn,
    Macd,
    Range,
    Rsi,
    SpreadAtr,
    TimeOfDay,
    Volatility,
    VolumeZ,
)

LIBRARY_VERSION: Final = "1"
"""Raise when a definition's arithmetic changes: the ids of every feature set change too."""


@dataclass(frozen=True)
class FeatureSet:
    features: tuple[Feature, ...]
    names: tuple[str, ...] = field(init=False)
    warmup: int = field(init=False)
    """Candles a series needs before every feature is valid."""
    memory: int = field(init=False)
    """Candles after which every feature's values no longer depend on what came before
    them (to rounding, and ``FADED`` of the state they started from): an engine started
    that many candles before another's values agrees with an engine started at the
    series' first candle to ``PARITY`` (``agree``)."""
    id: str = field(init=False)
    """``fs-`` and 16 hex digits of a hash of kinds, parameters, names and library version."""

    def __post_init__(self) -> None:
        names = tuple(n for f in self.features for n in f.names)
        if len(set(names)) != len(names):
            raise ValueError(f"feature names repeat: {names}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "warmup", max((f.warmup for f in self.features), default=1))
        object.__setattr__(self, "memory", max((f.memory for f in self.features), default=1))
        object.__setattr__(self, "id", f"fs-{self.digest()[:16]}")

    def describe(self) -> dict[str, object]:
        """What the id is a hash of."""
        return {
            "library": LIBRARY_VERSION,
            "features": [
                {"kind": f.kind, "params": f.params(), "names": list(f.names)}
                for f in self.features
            ],
        }

    def digest(self) -> str:
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def engine(self) -> Engine:
        return Engine(self)

    def batch(self, candles: Candles) -> Array:
        """Every feature of every candle, shape ``(len(candles), len(names))``."""
        if not self.features:
            return np.empty((len(candles), 0))
        return np.concatenate([f.batch(candles) for f in self.features], axis=1)


class Engine:
    """The incremental state of one series under one feature set: O(1) per candle."""

    __slots__ = ("_parts", "count", "warmup", "width")

    def __init__(self, fs: FeatureSet | None = None) -> None:
        if fs is None:  # clone() fills the slots itself
            return
        parts: list[tuple[Stepper, int]] = []
        at = 0
        for f in fs.features:
            parts.append((f.stepper(), at))
            at += len(f.names)
        self._parts = parts
        self.width = at
        self.warmup = fs.warmup
        self.count = 0

    def step(self, bar: Bar) -> list[float]:
        """Take the next candle of the series; its values (NaN where not warm yet)."""
        out = [math.nan] * self.width
        for stepper, at in self._parts:
            stepper.step(bar, out, at)
        self.count += 1
        return out

    @property
    def warming_up(self) -> bool:
        """True while some feature lacks history (after the last ``step``)."""
        return self.count < self.warmup

    def clone(self) -> Engine:
        new = Engine()
        new._parts = [(s.clone(), at) for s, at in self._parts]
        new.width, new.warmup, new.count = self.width, self.warmup, self.count
        return new

    def run(self, bars: Iterable[Bar]) -> Array:
        """Step through ``bars``; the values as an array, like ``FeatureSet.batch``."""
        rows = [self.step(b) for b in bars]
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), self.width)


DEFAULT: Final = FeatureSet(
    (
        LogReturn(bars=1),
        LogReturn(bars=5),
        LogReturn(bars=20),
        Volatility(bars=20),
        Rsi(period=14),
        Macd(fast=12, slow=26, signal=9),
        Atr(period=14),
        BollingerZ(bars=20),
        VolumeZ(bars=20),
        SpreadAtr(period=14),
        Range(),
        TimeOfDay(),
        DayOfWeek(),
    )
)
"""The feature set the feature-builder publishes and the trainer trains on."""
