"""Who consumes and produces what: the arrows of the design, as data.

Each worker declares here the domains it reads and writes and the message type on each.
Workers take their consumer and output subjects from this table, and the AsyncAPI document
is generated from it, so the document cannot drift from what the workers do.
"""

from __future__ import annotations

from typing import Any, Final, NamedTuple

from contracts import subjects
from contracts.messages import Candle, DeadLetter, FeatureVector, Score, Signal, TickInput


class Channel(NamedTuple):
    domain: str
    """A subject domain of ``contracts.subjects`` (ticks, candles, ...)."""
    message: Any
    """The msgspec type (or tagged union) carried on it."""
    description: str


class WorkerIO(NamedTuple):
    name: str
    description: str
    consumes: tuple[Channel, ...]
    publishes: tuple[Channel, ...]


TICKS_IN: Final = Channel(
    subjects.TICKS,
    TickInput,
    "Ticks from an MT5 EA (one per message or a TickBatch) and backfill Bars.",
)
CANDLES_CH: Final = Channel(
    subjects.CANDLES,
    Candle,
    "Closed candles per feed, symbol and timeframe; a revision replaces an earlier one.",
)
FEATURES_CH: Final = Channel(
    subjects.FEATURES, FeatureVector, "Feature vectors of closed candles, with feature-set id."
)
SCORES_CH: Final = Channel(
    subjects.SCORES, Score, "Model scores of feature vectors, with model version."
)
SIGNALS_CH: Final = Channel(
    subjects.SIGNALS, Signal, "Trading signals with deterministic id and expiry."
)

WORKERS: Final = (
    WorkerIO(
        "candle-ingest",
        "Ticks to M1..D1 candles by event time; QuestDB and CANDLES.",
        (TICKS_IN,),
        (CANDLES_CH,),
    ),
    WorkerIO(
        "feature-builder",
        "Rolling features per feed/symbol/timeframe, O(1) per candle.",
        (CANDLES_CH,),
        (FEATURES_CH,),
    ),
    WorkerIO(
        "model-scorer",
        "LightGBM scores from the active model in the registry.",
        (FEATURES_CH,),
        (SCORES_CH,),
    ),
    WorkerIO(
        "signal-publisher",
        "Signals from scores by a declarative policy.",
        (SCORES_CH,),
        (SIGNALS_CH,),
    ),
    WorkerIO(
        "timescale-replicator",
        "Candles, features, scores and signals into PostgreSQL/TimescaleDB.",
        (CANDLES_CH, FEATURES_CH, SCORES_CH, SIGNALS_CH),
        (),
    ),
)


def dead_letters(worker: str) -> Channel:
    return Channel(subjects.DLQ, DeadLetter, f"Messages {worker} refused, with the reason.")


def by_name(name: str) -> WorkerIO:
    for io in WORKERS:
        if io.name == name:
            return io
    raise KeyError(name)
