"""Walk-forward folds in time, with a purge gap so no training label sees the test fold.

The rows are consecutive candles. Row ``i``'s label reads candles ``i .. i + horizon``, so a
training row may only be used for a test fold starting at row ``t`` when
``i + horizon < t``: the last ``horizon`` rows before every test fold (the purge gap) are
left out. The same gap separates the early-stopping validation part from the rows the
booster is fitted on. Each fold trains on everything before it (an expanding window); the
last fold is the latest holdout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Index = NDArray[np.int64]


class SplitError(ValueError):
    """Too few rows for the walk-forward folds asked for."""


@dataclass(frozen=True)
class Fold:
    number: int
    fit: Index
    """Rows the booster is fitted on."""
    valid: Index
    """Rows early stopping watches (after ``fit``, before ``test``, gaps on both sides)."""
    test: Index
    """Rows the fold is scored on; never seen while training."""


def walk_forward(
    n: int,
    *,
    folds: int,
    horizon: int,
    valid_fraction: float = 0.2,
    min_rows: int = 50,
) -> list[Fold]:
    """``folds`` consecutive test blocks covering the last ``folds / (folds + 1)`` of the rows."""
    if folds < 1:
        raise SplitError(f"folds must be >= 1, not {folds}")
    block = n // (folds + 1)
    out = []
    for k in range(folds):
        start = n - (folds - k) * block
        end = start + block if k < folds - 1 else n
        usable = start - horizon  # rows 0 .. usable-1 have labels that end before the test
        n_valid = int(usable * valid_fraction)
        fit_end = usable - n_valid - horizon
        if block < min_rows or n_valid < min_rows or fit_end < min_rows:
            raise SplitError(
                f"{n} rows are too few for {folds} walk-forward folds with horizon {horizon}"
                f" (each part needs at least {min_rows} rows)"
            )
        out.append(
            Fold(
                number=k,
                fit=np.arange(0, fit_end, dtype=np.int64),
                valid=np.arange(fit_end + horizon, usable, dtype=np.int64),
                test=np.arange(start, end, dtype=np.int64),
            )
        )
    return out
