"""The evaluation report: per-fold AUC and log-loss, precision and recall by threshold, and a
cost-aware backtest of the signal policy on the out-of-sample predictions.

The policy: go long at a candle's close when P(UP) is at least the threshold, hold
``horizon`` bars, pay the spread (it is in the net return), and take no new trade while one
is open. Everything is computed on test folds only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from workers.features.base import Array
from workers.trainer.dataset import Dataset
from workers.trainer.train import Training

THRESHOLDS: Final = tuple(round(0.3 + 0.05 * i, 2) for i in range(9))
YEAR_MS: Final = 365.25 * 86_400_000
EPS: Final = 1e-15


def auc(y: NDArray[np.int64], p: Array) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); NaN with one class."""
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    # average rank of each run of equal scores
    _, start, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def logloss(y: NDArray[np.int64], p: Array) -> float:
    q = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def by_threshold(y: NDArray[np.int64], p: Array) -> list[dict[str, float]]:
    out = []
    for t in THRESHOLDS:
        chosen = p >= t
        tp = int((chosen & (y == 1)).sum())
        n_chosen = int(chosen.sum())
        out.append(
            {
                "threshold": t,
                "signals": float(n_chosen),
                "precision": tp / n_chosen if n_chosen else math.nan,
                "recall": tp / int(y.sum()) if y.sum() else math.nan,
            }
        )
    return out


def backtest(
    p: Array,
    long_return: Array,
    open_time_ms: NDArray[np.int64],
    horizon: int,
    threshold: float,
) -> dict[str, Any]:
    """Trades of the policy, their equity curve (sum of net returns), hit rate, Sharpe
    (per trade, annualised by trades per year over the span) and max drawdown."""
    trades: list[int] = []
    i = 0
    while i < len(p):
        if p[i] >= threshold:
            trades.append(i)
            i += horizon
        else:
            i += 1
    r = long_return[trades]
    equity = np.cumsum(r)
    peak = np.maximum.accumulate(np.concatenate([[0.0], equity]))[1:]
    span_ms = float(open_time_ms[-1] - open_time_ms[0]) if len(open_time_ms) > 1 else 0.0
    sd = float(r.std()) if len(r) > 1 else 0.0
    sharpe = 0.0
    if sd > 0 and span_ms > 0:
        sharpe = float(r.mean()) / sd * math.sqrt(len(r) / (span_ms / YEAR_MS))
    return {
        "threshold": threshold,
        "trades": len(r),
        "hit_rate": float((r > 0).mean()) if len(r) else math.nan,
        "total_return": float(equity[-1]) if len(r) else 0.0,
        "sharpe": sharpe,
        "max_drawdown": float((peak - equity).max()) if len(r) else 0.0,
        "equity_time_ms": [int(open_time_ms[t]) for t in trades],
        "equity": [float(e) for e in equity],
    }


def holdout_metrics(y: NDArray[np.int64], p: Array) -> dict[str, float]:
    return {"auc": auc(y, p), "logloss": logloss(y, p)}


def report(ds: Dataset, training: Training, *, threshold: float = 0.5) -> dict[str, Any]:
    folds = []
    for r in training.folds:
        y = ds.target[r.fold.test]
        folds.append(
            {
                "fold": r.fold.number,
                "fit_rows": len(r.fold.fit),
                "valid_rows": len(r.fold.valid),
                "test_rows": len(r.fold.test),
                "test_from_ms": int(ds.open_time_ms[r.fold.test[0]]),
                "test_to_ms": int(ds.open_time_ms[r.fold.test[-1]]),
                "best_iteration": r.best_iteration,
                "up_rate": float(y.mean()),
                **holdout_metrics(y, r.predictions),
            }
        )
    test = np.concatenate([r.fold.test for r in training.folds])
    p = np.concatenate([r.predictions for r in training.folds])
    y = ds.target[test]
    return {
        "feature_set_id": ds.feature_set_id,
        "horizon": ds.horizon,
        "rows": len(ds),
        "folds": folds,
        "walk_forward": holdout_metrics(y, p),
        "holdout": folds[-1] | {},
        "thresholds": by_threshold(y, p),
        "backtest": backtest(p, ds.long_return[test], ds.open_time_ms[test], ds.horizon, threshold),
    }


def save(rep: dict[str, Any], out: Path) -> list[Path]:
    """``report.json`` and the PNG plots (equity curve, precision/recall by threshold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "equity.png", out / "thresholds.png"]
    paths[0].write_text(json.dumps(rep, indent=2, allow_nan=True) + "\n")

    bt = rep["backtest"]
    fig, ax = plt.subplots(figsize=(8, 4))
    times = np.asarray(bt["equity_time_ms"], dtype="datetime64[ms]")
    ax.plot(times, bt["equity"], drawstyle="steps-post")
    ax.set_title(
        f"equity, long when P(up) >= {bt['threshold']:g}: {bt['trades']} trades,"
        f" Sharpe {bt['sharpe']:.2f}, max drawdown {bt['max_drawdown']:.4f}"
    )
    ax.set_ylabel("sum of net returns")
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    rows = rep["thresholds"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["threshold"] for r in rows], [r["precision"] for r in rows], label="precision")
    ax.plot([r["threshold"] for r in rows], [r["recall"] for r in rows], label="recall")
    ax.set_xlabel("threshold on P(up)")
    ax.set_title(f"walk-forward AUC {rep['walk_forward']['auc']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    plt.close(fig)
    return paths
