"""Scoring without NATS: a usable model, the matrix of one series' vectors, their Scores.

A vector's values are in the order of its feature set's names; a model reads the names of
its card in the booster's order. ``Model.columns`` maps one onto the other by name, once,
when the model is loaded, so a model trained on the same feature set with its columns in
another order still reads each value under its own name.

The score of a row is ``P(last class) - P(first class)``: ``P(up) - P(down)`` for a
three-class model (down, flat, up), ``P(positive) - P(negative) = 2 P(up) - 1`` for the
trainer's binary one (up against not up). Always in [-1, 1], positive for long.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import lightgbm
import numpy as np
from numpy.typing import NDArray

from contracts.codec import INVALID_VALUE, MALFORMED_JSON, Codec, ContractError
from contracts.messages import FeatureVector, Score
from contracts.models import ModelCard
from workers.features import DEFAULT, FeatureSet

Matrix = NDArray[np.float64]

FEATURE_SETS: Final[dict[str, FeatureSet]] = {fs.id: fs for fs in (DEFAULT,)}
"""The feature sets this scorer knows the names of: the ones the feature-builder computes."""

# Refusal reasons (dead letters and the ``tickwire_scorer_vectors`` metric).
FEATURE_SET_MISMATCH: Final = "feature_set_mismatch"
NO_MODEL: Final = "no_model"
BAD_VALUES: Final = "bad_values"
MODEL_UNUSABLE: Final = "model_unusable"
SUBJECT_MISMATCH: Final = "subject_mismatch"
# Outcomes that are not refusals.
SCORED: Final = "scored"
WARMING_UP: Final = "warming_up"
REBUILT: Final = "rebuilt"
"""A vector ``tickwire rebuild`` published: it scores it itself."""

BINARY: Final = "binary"
MULTICLASS: Final = "multiclass"
"""Objectives whose output is a probability per class; others cannot give a score."""


class ModelError(Exception):
    """The active model cannot score: the vectors wait for ops in the dead letters."""


@dataclass(frozen=True, slots=True)
class Model:
    card: ModelCard
    booster: lightgbm.Booster
    classes: int
    """2 for a binary model, ``num_class`` for a multiclass one."""
    columns: NDArray[np.intp]
    """Position in the vector of each feature the model reads, in the model's order."""
    width: int
    """Values a vector of the model's feature set holds."""
    threads: int = 1

    @classmethod
    def load(cls, card: ModelCard, booster: lightgbm.Booster, *, threads: int = 1) -> Model:
        """Check that the model gives class probabilities over a feature set known here."""
        objective = str(booster.params.get("objective", ""))
        if objective == BINARY:
            classes = 2
        elif objective == MULTICLASS:
            classes = booster.num_model_per_iteration()
        else:
            raise ModelError(f"model {card.version}: objective {objective!r} gives no classes")
        fs = FEATURE_SETS.get(card.feature_set_id)
        if fs is None:
            raise ModelError(
                f"model {card.version}: feature set {card.feature_set_id} is unknown here"
            )
        position = {name: i for i, name in enumerate(fs.names)}
        missing = [n for n in card.feature_names if n not in position]
        if missing:
            raise ModelError(
                f"model {card.version}: {missing} are not in feature set {card.feature_set_id}"
            )
        columns = np.array([position[n] for n in card.feature_names], dtype=np.intp)
        return cls(card, booster, classes, columns, len(fs.names), threads)

    @property
    def version(self) -> str:
        return self.card.version

    def probabilities(self, values: Matrix) -> Matrix:
        """Class probabilities, shape ``(rows, classes)``, of vectors' values (one per row)."""
        raw = self.booster.predict(values[:, self.columns], num_threads=self.threads)
        out = np.asarray(raw, dtype=np.float64)
        if self.classes == 2 and out.ndim == 1:
            return np.column_stack((1.0 - out, out))
        return out.reshape(len(values), self.classes)


def check(vector: FeatureVector, model: Model) -> tuple[str, str] | None:
    """Why ``model`` must not score ``vector`` (reason, detail), or None."""
    if vector.feature_set_id != model.card.feature_set_id:
        return FEATURE_SET_MISMATCH, (
            f"vector of {vector.feature_set_id}, model {model.version} "
            f"reads {model.card.feature_set_id}"
        )
    if len(vector.values) != model.width:
        return BAD_VALUES, (
            f"{len(vector.values)} values, feature set {vector.feature_set_id} "
            f"has {model.width} names"
        )
    return None


def non_finite(values: Matrix) -> NDArray[np.bool_]:
    """Rows holding NaN or an infinity."""
    return np.asarray(~np.isfinite(values).all(axis=1), dtype=np.bool_)


def scores(vectors: Sequence[FeatureVector], model: Model, values: Matrix) -> list[Score]:
    """One Score per vector, from the rows of ``values`` (checked, finite) in the same order."""
    probs = model.probabilities(values)
    conviction = (probs[:, -1] - probs[:, 0]).tolist()
    version = model.version
    return [
        Score(
            feed=v.feed,
            symbol=v.symbol,
            tf=v.tf,
            open_time_ms=v.open_time_ms,
            candle_revision=v.candle_revision,
            close=v.close,
            close_time_ms=v.close_time_ms,
            last_tick_ms=v.last_tick_ms,
            feature_set_id=v.feature_set_id,
            model_version=version,
            probabilities=p,
            score=s,
        )
        for v, p, s in zip(vectors, probs.tolist(), conviction, strict=True)
    ]


def message_id(score: Score) -> str:
    """The ``Nats-Msg-Id`` of a score: its candle's key and revision, and the model."""
    return (
        f"{score.feed}|{score.symbol}|{score.tf.value}|{score.open_time_ms}"
        f"|{score.candle_revision}|{score.model_version}"
    )


class VectorCodec(Codec[FeatureVector]):
    """The FeatureVector codec, which tells a NaN or infinite value from other bad input.

    JSON has no NaN or infinity: msgspec writes them as ``null`` and refuses to read them,
    other encoders write ``NaN`` or ``Infinity`` or an out-of-range number. Whichever way a
    non-finite value arrives, it is refused as ``bad_values`` (the slow path runs only for a
    payload that failed to decode).
    """

    refused: Callable[[str], None] | None = None
    """Told the reason of each refusal (the worker counts them by outcome)."""

    def decode(self, data: bytes) -> FeatureVector:
        try:
            return super().decode(data)
        except ContractError as exc:
            error = exc
            if exc.reason in (MALFORMED_JSON, INVALID_VALUE):
                detail = _non_finite_value(data)
                if detail is not None:
                    error = ContractError(BAD_VALUES, detail)
            if self.refused is not None:
                self.refused(error.reason)
            raise error from None


def _non_finite_value(data: bytes) -> str | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    values = doc.get("values") if isinstance(doc, dict) else None
    if not isinstance(values, list):
        return None
    for i, x in enumerate(values):
        if x is None or (isinstance(x, float) and not math.isfinite(x)):
            return f"values[{i}] is {x!r}: not a finite number"
    return None
