"""Small LightGBM models and feature vectors for the model-scorer's tests and benchmark.

Models are trained in a fraction of a second on a planted pattern over the names of the
feature-builder's feature set; a ``columns`` order other than the set's own makes a model
whose card and booster read the features in that order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightgbm
import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from contracts.messages import FeatureVector, Timeframe
from contracts.models import ModelCard
from workers.features import DEFAULT
from workers.registry import Registry

NAMES = list(DEFAULT.names)
START_MS = 1_741_039_200_000


def train(
    seed: int,
    *,
    objective: str = "binary",
    columns: list[str] | None = None,
    rounds: int = 24,
) -> lightgbm.Booster:
    """A booster over ``columns`` (default: the feature set's order)."""
    names = NAMES if columns is None else columns
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(600, len(names)))
    signal = x[:, 0] + 0.5 * x[:, 1] - 0.3 * x[:, 2] + rng.normal(scale=0.5, size=600)
    params: dict[str, object] = {"verbose": -1, "num_leaves": 7, "seed": seed}
    y: np.ndarray[Any, Any]
    if objective == "multiclass":
        y = np.digitize(signal, [-0.5, 0.5])
        params |= {"objective": "multiclass", "num_class": 3}
    elif objective == "regression":
        y = signal
        params |= {"objective": "regression"}
    else:
        y = (signal > 0).astype(int)
        params |= {"objective": "binary"}
    return lightgbm.train(
        params, lightgbm.Dataset(x, y, feature_name=names), num_boost_round=rounds
    )


def card_for(
    booster: lightgbm.Booster, feed: str, symbol: str, tf: Timeframe, *, auc: float = 0.6
) -> ModelCard:
    return ModelCard(
        feed=feed,
        symbol=symbol,
        tf=tf,
        feature_set_id=DEFAULT.id,
        feature_names=list(booster.feature_name()),
        train_from_ms=START_MS - 86_400_000,
        train_to_ms=START_MS,
        data_hash="d" * 64,
        metrics={"auc": auc},
        library_versions={"lightgbm": lightgbm.__version__},
        created_at_ms=START_MS,
    )


def vectors(
    feed: str,
    symbol: str,
    tf: Timeframe,
    n: int,
    *,
    seed: int,
    start: int = 0,
    warming: int = 0,
) -> list[FeatureVector]:
    """``n`` consecutive vectors of one series from candle ``start``; the first ``warming``
    of the series are flagged as warming up."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        t = START_MS + i * tf.ms
        out.append(
            FeatureVector(
                feed=feed,
                symbol=symbol,
                tf=tf,
                open_time_ms=t,
                candle_revision=0,
                close=round(5000 + rng.normal(), 2),
                close_time_ms=t + tf.ms,
                last_tick_ms=t + tf.ms - 1_000,
                feature_set_id=DEFAULT.id,
                values=[float(x) for x in rng.normal(size=len(NAMES))],
                warming_up=i < warming,
            )
        )
    return out


def expected_probabilities(booster: lightgbm.Booster, v: FeatureVector) -> list[float]:
    """What the scorer must publish for ``v``: the booster on the row in its own column
    order (looked up by name here), as (P(first class) .. P(last class))."""
    by_name = dict(zip(NAMES, v.values, strict=True))
    row: NDArray[np.float64] = np.array([[by_name[n] for n in booster.feature_name()]])
    p = np.asarray(booster.predict(row))
    if p.ndim == 1:
        return [1.0 - float(p[0]), float(p[0])]
    return [float(x) for x in p[0]]


async def promote_each(registry: Registry, keys: Iterable[tuple[str, str, Timeframe]]) -> None:
    """A promoted model of its own (own bytes, own version) for every feed/symbol/timeframe."""
    keys = list(keys)
    for k, (feed, symbol, tf) in enumerate(tqdm(keys, desc="models", unit="model", leave=False)):
        booster = train(k + 1, rounds=8)
        version = await registry.put(
            booster.model_to_string().encode(), card_for(booster, feed, symbol, tf)
        )
        await registry.promote(version, force=True)
