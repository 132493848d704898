"""The training data set: stored candles -> the shared features -> labels, nothing leaked.

Features come from ``FeatureSet.batch``, the very definitions the feature-builder streams,
and are checked by ``lookahead.violations`` before anything else is done with them. Rows
are the candles that have every feature (after the warm-up) and a label (all but the last
``horizon`` candles).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import asyncpg
import numpy as np
from numpy.typing import NDArray

from db.queries import query
from workers.features import DEFAULT, Candles, FeatureSet, violations
from workers.features.base import Array
from workers.trainer import labels

LOOKAHEAD_CANDLES = 3000
"""The look-ahead check runs on the last this many candles (it steps them one at a time)."""
WARM_UP_CANDLES = DEFAULT.memory
"""Candles read before a training window: RSI, ATR and MACD remember every candle before
theirs; after the feature set's memory what the window's start changes weighs below 1e-12,
so the rows equal what feature-builder serves from its whole history."""


class DatasetError(ValueError):
    """The candles cannot make a training data set."""


class LookaheadError(DatasetError):
    """A feature reads candles later than the one it describes."""


@dataclass(frozen=True)
class Dataset:
    features: Array
    """Shape ``(rows, len(names))``."""
    names: tuple[str, ...]
    feature_set_id: str
    target: NDArray[np.int64]
    """1 when the long trade earns after the spread (class UP), else 0."""
    classes: Array
    """DOWN / FLAT / UP per row."""
    long_return: Array
    """Net return of a long trade from the row's close over ``horizon`` bars."""
    open_time_ms: NDArray[np.int64]
    horizon: int
    data_hash: str

    def __len__(self) -> int:
        return len(self.target)


async def load_candles(
    dsn: str,
    feed: str,
    symbol: str,
    tf: str,
    start: dt.datetime,
    end: dt.datetime,
    warm_up: int = WARM_UP_CANDLES,
) -> Candles:
    """The series' candles in [start, end) and the ``warm_up`` candles before them."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(query("trainer_candles"), feed, symbol, tf, start, end, warm_up)
    finally:
        await conn.close()
    return Candles(
        open_time_ms=np.asarray([r["open_time_ms"] for r in rows], dtype=np.int64),
        open=np.asarray([r["open"] for r in rows], dtype=np.float64),
        high=np.asarray([r["high"] for r in rows], dtype=np.float64),
        low=np.asarray([r["low"] for r in rows], dtype=np.float64),
        close=np.asarray([r["close"] for r in rows], dtype=np.float64),
        tick_volume=np.asarray([r["tick_volume"] for r in rows], dtype=np.int64),
        spread_mean=np.asarray([r["spread_mean"] for r in rows], dtype=np.float64),
    )


def check_lookahead(fs: FeatureSet, candles: Candles) -> None:
    """Raise ``LookaheadError`` naming every feature that peeks at later candles."""
    n = len(candles)
    tail = Candles(
        **{
            name: getattr(candles, name)[max(0, n - LOOKAHEAD_CANDLES) :]
            for name in Candles.__dataclass_fields__
        }
    )
    found = violations(fs, tail)
    if found:
        names = sorted({v.name for v in found})
        raise LookaheadError(f"features read later candles: {', '.join(names)}")


def data_hash(candles: Candles, fs: FeatureSet, horizon: int) -> str:
    h = hashlib.sha256(f"{fs.id}|h={horizon}|".encode())
    for name in Candles.__dataclass_fields__:
        h.update(np.ascontiguousarray(getattr(candles, name)).tobytes())
    return h.hexdigest()


def build(candles: Candles, fs: FeatureSet, horizon: int, *, from_ms: int | None = None) -> Dataset:
    """Check the features for look-ahead, compute them and the labels, keep complete rows
    (of the candles opened at or after ``from_ms``; those before only warm the features
    up)."""
    if len(candles) <= fs.warmup + horizon:
        raise DatasetError(
            f"{len(candles)} candles are too few: the features need {fs.warmup} to warm up"
            f" and the labels {horizon} more"
        )
    check_lookahead(fs, candles)
    x = fs.batch(candles)
    cls = labels.classes(candles.close, candles.spread_mean, horizon)
    long_ret = labels.long_net_return(candles.close, candles.spread_mean, horizon)
    keep = np.isfinite(x).all(axis=1) & np.isfinite(cls)
    if from_ms is not None:
        keep &= candles.open_time_ms >= from_ms
    rows = np.flatnonzero(keep)
    if not len(rows):
        raise DatasetError("no candle of the window has every feature and a label")
    if rows[-1] - rows[0] + 1 != len(rows):
        raise DatasetError("features are missing in the middle of the series")
    return Dataset(
        features=x[rows],
        names=fs.names,
        feature_set_id=fs.id,
        target=(cls[rows] == labels.UP).astype(np.int64),
        classes=cls[rows],
        long_return=long_ret[rows],
        open_time_ms=candles.open_time_ms[rows],
        horizon=horizon,
        data_hash=data_hash(candles, fs, horizon),
    )
