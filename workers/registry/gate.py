"""The promotion gate: a candidate replaces the active model only when it is better.

Pure: the trainer calls it with the metrics of both models on the same latest holdout; the
registry calls it again at promotion against the active model's stored metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

LOWER_IS_BETTER: Final = frozenset({"logloss", "log_loss", "brier", "max_drawdown"})
"""Metrics where smaller is better; every other metric is better when larger."""
CHANCE: Final = {"auc": 0.5}
"""What a model that ranks no better than a coin scores: a candidate must beat it, whatever
the active model scores (or when there is none), to be promoted without force."""


def should_promote(
    candidate_metrics: Mapping[str, float],
    active_metrics: Mapping[str, float] | None,
    *,
    metric: str = "auc",
    min_gain: float = 0.0,
) -> tuple[bool, str]:
    """Whether the candidate beats the active model by more than ``min_gain`` on ``metric``.

    Returns the decision and a one-line reason. A candidate no better than chance on the
    metric (``CHANCE``) is refused. Otherwise, no active model: promote. A metric that is
    missing or not finite on the candidate refuses; on the active model only, promotes (the
    active model cannot be shown to be better).
    """
    if min_gain < 0 or not math.isfinite(min_gain):
        raise ValueError(f"min_gain must be finite and >= 0, not {min_gain!r}")
    candidate = candidate_metrics.get(metric)
    if candidate is None or not math.isfinite(candidate):
        return False, f"candidate has no finite {metric} (got {candidate!r})"
    chance = CHANCE.get(metric)
    if chance is not None and candidate <= chance:
        return False, f"candidate {metric}={candidate:.6g} is no better than chance ({chance:g})"
    if active_metrics is None:
        return True, f"no active model; candidate {metric}={candidate:.6g}"
    active = active_metrics.get(metric)
    if active is None or not math.isfinite(active):
        return True, f"active model has no finite {metric}; candidate {metric}={candidate:.6g}"
    gain = active - candidate if metric in LOWER_IS_BETTER else candidate - active
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    verdict = f"candidate {metric}={candidate:.6g} vs active {active:.6g} ({direction} is better, gain {gain:+.6g}, needed > {min_gain:.6g})"
    if gain > min_gain:
        return True, verdict
    return False, verdict
