"""The check that no feature reads a candle later than the one it describes.

Two properties, each checked per feature on a given series of candles:

- prefix invariance: the batch value at i computed on ``candles[:i + 1]`` equals the value
  at i computed on all candles, at several i;
- stream parity: stepping through the candles one at a time gives the batch values (the
  incremental form cannot see the future, so a batch form that does differs from it); the
  two forms round differently, so a feature ``of_price_level`` is compared at the size of
  the highest price, not at its own.

The trainer runs it on its training candles before fitting; tests run it on every feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from workers.features.base import Array, Candles, Feature
from workers.features.featureset import FeatureSet


@dataclass(frozen=True)
class Violation:
    name: str
    index: int
    check: str
    """``prefix`` (the value changes when later candles are removed) or ``stream``."""
    full: float
    other: float


def close(a: Array, b: Array, tol: float) -> NDArray[np.bool_]:
    """Elementwise: equal within ``tol`` absolute for small values, relative for large ones;
    NaN equals NaN, an infinity the same infinity."""
    both_nan = np.isnan(a) & np.isnan(b)
    with np.errstate(invalid="ignore"):
        near = np.abs(a - b) <= tol * np.maximum(1.0, np.abs(b))
    return both_nan | near | np.equal(a, b)


def sample_points(n: int, count: int = 24) -> list[int]:
    """Indices spread over the series, the first and last included."""
    if n <= 0:
        return []
    return sorted({round(float(x)) for x in np.linspace(0, n - 1, min(count, n))})


def violations(
    features: FeatureSet | Iterable[Feature],
    candles: Candles,
    *,
    samples: Sequence[int] | None = None,
    tol: float = 1e-9,
) -> list[Violation]:
    """Every feature output that reads ahead, at most one violation per name and check."""
    points = sample_points(len(candles)) if samples is None else list(samples)
    feature_list = features.features if isinstance(features, FeatureSet) else tuple(features)
    bars = [candles.row(i) for i in range(len(candles))]
    level = max(1.0, float(np.max(candles.high))) if len(candles) else 1.0
    found: dict[tuple[str, str], Violation] = {}
    for feature in feature_list:
        full = feature.batch(candles)
        tols = {"prefix": tol, "stream": tol * level if feature.of_price_level else tol}
        # (check, index, value computed another way) for every row compared
        others: list[tuple[str, int, Array]] = [
            ("prefix", i, feature.batch(candles.head(i + 1))[i]) for i in points
        ]
        stream = FeatureSet((feature,)).engine().run(bars)
        others += [
            ("stream", int(i), stream[i])
            for i in np.flatnonzero(~close(stream, full, tols["stream"]).all(axis=1))[:1]
        ]
        for check, i, other in others:
            same = close(other, full[i], tols[check])
            for j in np.flatnonzero(~same):
                name = feature.names[j]
                found.setdefault(
                    (name, check), Violation(name, i, check, float(full[i, j]), float(other[j]))
                )
    return list(found.values())
