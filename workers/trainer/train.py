"""LightGBM on walk-forward folds: each fold's booster stops early on its validation part
only, and is scored on its test fold, which it never saw. The last fold's booster, fitted on
the rows before its validation part (all of it before the latest holdout), is the model that
goes into the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightgbm
import numpy as np
from tqdm import tqdm

from workers.features.base import Array
from workers.trainer.dataset import Dataset
from workers.trainer.split import Fold, walk_forward


@dataclass(frozen=True)
class Params:
    folds: int = 4
    rounds: int = 300
    """Most boosting rounds; early stopping usually ends sooner."""
    early_stopping: int = 20
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 40
    valid_fraction: float = 0.2
    seed: int = 7

    def lightgbm(self) -> dict[str, Any]:
        return {
            "objective": "binary",
            "metric": "binary_logloss",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": 1,
            "verbose": -1,
        }


@dataclass(frozen=True)
class FoldResult:
    fold: Fold
    booster: lightgbm.Booster
    predictions: Array
    """P(UP) on the fold's test rows."""
    best_iteration: int


@dataclass(frozen=True)
class Training:
    folds: list[FoldResult] = field(default_factory=list)

    @property
    def holdout(self) -> FoldResult:
        """The latest fold: its booster is the model, its test rows the latest holdout."""
        return self.folds[-1]


def fit(ds: Dataset, fold: Fold, params: Params) -> FoldResult:
    names = list(ds.names)
    fit_set = lightgbm.Dataset(
        ds.features[fold.fit], ds.target[fold.fit], feature_name=names, free_raw_data=False
    )
    valid_set = lightgbm.Dataset(
        ds.features[fold.valid], ds.target[fold.valid], reference=fit_set, feature_name=names
    )
    booster = lightgbm.train(
        params.lightgbm(),
        fit_set,
        num_boost_round=params.rounds,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lightgbm.early_stopping(params.early_stopping, verbose=False)],
    )
    best = booster.best_iteration or params.rounds
    predictions = np.asarray(
        booster.predict(ds.features[fold.test], num_iteration=best), dtype=np.float64
    )
    return FoldResult(fold, booster, predictions, best)


def train(ds: Dataset, params: Params, *, progress: bool = True) -> Training:
    folds = walk_forward(
        len(ds), folds=params.folds, horizon=ds.horizon, valid_fraction=params.valid_fraction
    )
    results = [
        fit(ds, fold, params)
        for fold in tqdm(folds, desc="walk-forward folds", unit="fold", disable=not progress)
    ]
    return Training(results)


def model_bytes(result: FoldResult) -> bytes:
    """The LightGBM text model of a fold's booster, cut at its best iteration."""
    text: str = result.booster.model_to_string(num_iteration=result.best_iteration)
    return text.encode()
