"""What the model registry stores, defined once: the card of a model and the active pointer.

The trainer writes them, the model-scorer reads them, both through ``workers.registry``.
Same rules as ``contracts.messages``: frozen, keyword-only, schema version ``v``, new
fields always with a default.

- ``ModelCard``: everything needed to trust a model file: where its data came from, the
  features it expects in which order, how it scored, which libraries built it. Its
  ``version`` is a hash of the artifact bytes, so the same file always gets the same version.
- ``ActiveModel``: the value of the registry's key per (feed, symbol, timeframe): the
  version the scorers use, and the versions active before it, newest last, for rollback.
"""

from __future__ import annotations

import enum
from typing import Annotated, Final

import msgspec

from contracts.messages import EpochMs, Feed, Symbol, Timeframe

MODELS_SCHEMA_VERSION: Final = 1

Version = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-f]{16}$(?!\n)",
        description="first 16 hex digits of the SHA-256 of the artifact bytes",
    ),
]


class ModelStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    """Stored, never active (or rolled back before it was ever replaced)."""
    ACTIVE = "active"
    """What the scorers of its feed, symbol and timeframe use now."""
    RETIRED = "retired"
    """Was active once and has been replaced or rolled back."""


class ModelCard(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Metadata of one LightGBM model file in the registry."""

    v: int = MODELS_SCHEMA_VERSION
    version: Version = ""
    """Set by the registry from the artifact bytes when the model is stored."""
    artifact_sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$(?!\n)")] = ""
    feed: Feed
    symbol: Symbol
    tf: Timeframe
    feature_set_id: Annotated[str, msgspec.Meta(min_length=1)]
    feature_names: list[str]
    """In the order the model reads them; equal to the booster's own feature names."""
    train_from_ms: EpochMs
    train_to_ms: EpochMs
    """Training window, candle open times, end exclusive."""
    data_hash: str
    """Hash of the training data set, to tell two trainings on different data apart."""
    metrics: dict[str, float] = {}
    """Holdout metrics (``auc``, ``logloss``...), the promotion gate compares them."""
    library_versions: dict[str, str] = {}
    """``lightgbm``, ``numpy``, ``tickwire`` versions that built the model."""
    created_at_ms: EpochMs = 0
    status: ModelStatus = ModelStatus.CANDIDATE
    """As stored: candidate. The registry reports the status its active pointer implies."""


class ActiveModel(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """The active version of one (feed, symbol, timeframe), with what was active before."""

    v: int = MODELS_SCHEMA_VERSION
    version: Version
    previous: list[str] = []
    """Versions active before this one, newest last: ``rollback`` restores the last."""
    retired: list[str] = []
    """Versions that were active and were rolled back, newest last."""
    changed_at_ms: EpochMs = 0
    """Wall-clock time of the promotion or rollback (registry records, not pipeline output)."""
    reason: str = ""
