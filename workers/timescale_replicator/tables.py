"""What each replicated stream becomes in PostgreSQL: checks, rows, natural keys.

Pure: no NATS, no database. A message that passes ``check`` becomes a row that the
database accepts (every CHECK constraint and column range of ``market`` is mirrored here),
so one bad message is dead-lettered on its own instead of failing its batch's COPY.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from contracts import subjects
from contracts.messages import Candle, FeatureVector, Score, Signal, Timeframe
from contracts.streams import CANDLES, FEATURES, SCORES, SIGNALS

M = TypeVar("M", Candle, FeatureVector, Score, Signal)
Row = tuple[Any, ...]
Problem = tuple[str, str]

OUT_OF_RANGE: Final = "out_of_range"
SUBJECT_MISMATCH: Final = "subject_mismatch"
ILLEGAL_SYMBOL: Final = "illegal_symbol"
ILLEGAL_ID: Final = "illegal_id"

MAX_TIME_MS: Final = 4_102_444_800_000
"""2100-01-01 UTC: a later time is a fault upstream, and beyond 294276 AD PostgreSQL fails."""
MAX_INT4: Final = 2**31 - 1
MAX_INT8: Final = 2**63 - 1
MAX_ID_CHARS: Final = 128
"""A feature-set id or model version."""
MAX_SIGNAL_ID_CHARS: Final = 512
"""A signal id: feed (32), symbol (64), timeframe, candle time, a model version (128) and
what a correction or a rebuild adds, with room to spare."""


@dataclass(frozen=True, slots=True)
class Table(Generic[M]):
    """One stream and the ``market`` table it is replicated into."""

    name: str
    """Table in schema ``market``; its staging table is ``<name>_staging``."""
    stream: str
    """Base stream name (namespaced with ``contracts.streams.stream_name``)."""
    message: type[M]
    columns: str
    """Staging columns, space-separated, in the order of ``row()``'s values."""
    key: int
    """The natural key is a row's first ``key`` values (the time column included)."""
    revision: int
    """Position of the revision: the same or a higher one replaces a stored row."""
    check: Callable[[M, str, str | None], Problem | None]
    """``(message, subject, namespace)`` -> ``(reason, detail)`` for a message to refuse."""
    row: Callable[[M], Row]

    @property
    def column_names(self) -> list[str]:
        return self.columns.split()

    @property
    def staging(self) -> str:
        return f"{self.name}_staging"

    @property
    def upsert_query(self) -> str:
        return f"replicator_upsert_{self.name}"


def plain_insert(upsert: str) -> str:
    """An upsert's ``INSERT ... SELECT`` without its ``ON CONFLICT`` clause: refused on a
    stored key, and cheaper by a third where no key is stored."""
    head, clause, _ = upsert.partition("\nON CONFLICT ")
    if not clause:
        raise ValueError("not an upsert: no ON CONFLICT clause on a line of its own")
    return head


def latest(rows: Iterable[Row], key: int, revision: int) -> list[Row]:
    """One row per natural key (a row's first ``key`` values): the highest revision, the
    later one among equals.

    An upsert cannot touch one row twice in a statement, and a batch may hold several
    revisions of a candle; the database's own guard then keeps a stored later revision.
    """
    best: dict[tuple[Any, ...], Row] = {}
    for row in rows:
        k = row[:key]
        held = best.get(k)
        if held is None or row[revision] >= held[revision]:
            best[k] = row
    return list(best.values())


# --- checks ------------------------------------------------------------------------------


def _time(name: str, ms: int) -> Problem | None:
    if ms > MAX_TIME_MS:
        return OUT_OF_RANGE, f"{name}={ms} is after 2100-01-01"
    return None


def _int(name: str, value: int, top: int) -> Problem | None:
    if value > top:
        return OUT_OF_RANGE, f"{name}={value} exceeds {top}"
    return None


def _ident(name: str, value: str | None, limit: int = MAX_ID_CHARS) -> Problem | None:
    if value is None:
        return None
    if not value or len(value) > limit or not value.isprintable():
        return ILLEGAL_ID, f"{name} must be 1..{limit} printable characters: {value!r}"
    return None


def _unit(name: str, values: Sequence[float], low: float, high: float) -> Problem | None:
    if not values:
        return OUT_OF_RANGE, f"{name} is empty"
    for i, x in enumerate(values):
        if not low <= x <= high:
            return OUT_OF_RANGE, f"{name}[{i}]={x} outside [{low}, {high}]"
    return None


_SUBJECT: Final[dict[type[Any], Callable[..., str]]] = {
    Candle: subjects.candles,
    FeatureVector: subjects.features,
    Score: subjects.scores,
    Signal: subjects.signals,
}


@functools.lru_cache(maxsize=65_536)
def _subject(kind: type[Any], feed: str, symbol: str, tf: Timeframe, ns: str | None) -> str:
    """Where a message of this kind and series belongs (a worker meets the same few)."""
    return _SUBJECT[kind](feed, symbol, tf, namespace=ns)


def _common(
    m: Candle | FeatureVector | Score | Signal, subject: str, ns: str | None
) -> Problem | None:
    """Symbol legal, published where its feed, symbol and timeframe say, times in range."""
    try:
        expected = _subject(type(m), m.feed, m.symbol, m.tf, ns)
    except subjects.SubjectError as exc:
        return ILLEGAL_SYMBOL, str(exc)
    if subject != expected:
        return SUBJECT_MISMATCH, f"{m.feed}/{m.symbol}/{m.tf.value} published on {subject}"
    return None if m.open_time_ms <= MAX_TIME_MS else _time("open_time_ms", m.open_time_ms)


def check_candle(c: Candle, subject: str, ns: str | None) -> Problem | None:
    problem = _common(c, subject, ns)
    if problem is None and (
        # the common case in one expression: every value in range; else say what is not
        c.open_time_ms < c.close_time_ms <= MAX_TIME_MS
        and c.first_tick_ms <= MAX_INT8
        and c.last_tick_ms <= MAX_INT8
        and c.tick_volume <= MAX_INT8
        and c.revision <= MAX_INT4
        and 0 < c.low <= min(c.open, c.close) <= max(c.open, c.close) <= c.high
    ):
        return None
    return problem or _candle_problem(c)


def _candle_problem(c: Candle) -> Problem | None:
    problem = (
        _time("close_time_ms", c.close_time_ms)
        or _int("first_tick_ms", c.first_tick_ms, MAX_INT8)
        or _int("last_tick_ms", c.last_tick_ms, MAX_INT8)
        or _int("tick_volume", c.tick_volume, MAX_INT8)
        or _int("revision", c.revision, MAX_INT4)
    )
    if problem:
        return problem
    if c.close_time_ms <= c.open_time_ms:
        return OUT_OF_RANGE, f"close_time_ms={c.close_time_ms} <= open_time_ms={c.open_time_ms}"
    if not 0 < c.low <= min(c.open, c.close) <= max(c.open, c.close) <= c.high:
        return OUT_OF_RANGE, f"OHLC {c.open}/{c.high}/{c.low}/{c.close} is not a bar"
    return None


def check_features(f: FeatureVector, subject: str, ns: str | None) -> Problem | None:
    return (
        _common(f, subject, ns)
        or _int("candle_revision", f.candle_revision, MAX_INT4)
        or _ident("feature_set_id", f.feature_set_id)
        or (None if f.values else (OUT_OF_RANGE, "values is empty"))
    )


def check_score(s: Score, subject: str, ns: str | None) -> Problem | None:
    problem = (
        _common(s, subject, ns)
        or _int("candle_revision", s.candle_revision, MAX_INT4)
        or _ident("feature_set_id", s.feature_set_id)
        or _ident("model_version", s.model_version)
        or _unit("probabilities", s.probabilities, 0.0, 1.0)
    )
    if problem:
        return problem
    if not -1.0 <= s.score <= 1.0:
        return OUT_OF_RANGE, f"score={s.score} outside [-1, 1]"
    return None


def check_signal(s: Signal, subject: str, ns: str | None) -> Problem | None:
    problem = (
        _common(s, subject, ns)
        or _time("expires_ms", s.expires_ms)
        or _int("candle_revision", s.candle_revision, MAX_INT4)
        or _ident("signal_id", s.signal_id, MAX_SIGNAL_ID_CHARS)
        or _ident("feature_set_id", s.feature_set_id)
        or _ident("model_version", s.model_version)
        or _ident("corrects", s.corrects, MAX_SIGNAL_ID_CHARS)
    )
    if problem:
        return problem
    if not s.ref_price > 0:
        return OUT_OF_RANGE, f"ref_price={s.ref_price} is not positive"
    if s.expires_ms <= s.open_time_ms:
        return OUT_OF_RANGE, f"expires_ms={s.expires_ms} <= open_time_ms={s.open_time_ms}"
    return None


# --- rows --------------------------------------------------------------------------------
# A timeframe or side is a StrEnum, a str already: written as it is (``.value`` is a
# property lookup per message).


def candle_row(c: Candle) -> Row:
    return (
        c.feed, c.symbol, c.tf, c.open_time_ms, c.close_time_ms, c.open, c.high, c.low,
        c.close, c.tick_volume, c.real_volume, c.spread_mean, c.spread_max, c.first_tick_ms,
        c.last_tick_ms, c.revision, c.v,
    )  # fmt: skip


def features_row(f: FeatureVector) -> Row:
    return (
        f.feed, f.symbol, f.tf, f.open_time_ms, f.feature_set_id, f.candle_revision,
        f.values, f.warming_up, f.v,
    )  # fmt: skip


def score_row(s: Score) -> Row:
    return (
        s.feed, s.symbol, s.tf, s.open_time_ms, s.model_version, s.candle_revision,
        s.feature_set_id, s.probabilities, s.score, s.v,
    )  # fmt: skip


def signal_row(s: Signal) -> Row:
    return (
        s.feed, s.symbol, s.tf, s.open_time_ms, s.model_version, s.candle_revision,
        s.signal_id, s.side, s.strength, s.ref_price, s.expires_ms, s.feature_set_id,
        s.corrects, s.v,
    )  # fmt: skip


CANDLE_TABLE: Final = Table(
    name="candles",
    stream=CANDLES,
    message=Candle,
    columns=(
        "feed symbol tf open_time_ms close_time_ms open high low close tick_volume "
        "real_volume spread_mean spread_max first_tick_ms last_tick_ms revision v"
    ),
    key=4,
    revision=15,
    check=check_candle,
    row=candle_row,
)
FEATURE_TABLE: Final = Table(
    name="features",
    stream=FEATURES,
    message=FeatureVector,
    columns=("feed symbol tf open_time_ms feature_set_id candle_revision values warming_up v"),
    key=5,
    revision=5,
    check=check_features,
    row=features_row,
)
SCORE_TABLE: Final = Table(
    name="scores",
    stream=SCORES,
    message=Score,
    columns=(
        "feed symbol tf open_time_ms model_version candle_revision feature_set_id "
        "probabilities score v"
    ),
    key=5,
    revision=5,
    check=check_score,
    row=score_row,
)
SIGNAL_TABLE: Final = Table(
    name="signals",
    stream=SIGNALS,
    message=Signal,
    columns=(
        "feed symbol tf open_time_ms model_version candle_revision signal_id side "
        "strength ref_price expires_ms feature_set_id corrects v"
    ),
    key=5,
    revision=5,
    check=check_signal,
    row=signal_row,
)

TABLES: Final[dict[str, Table[Any]]] = {
    t.stream: t for t in (CANDLE_TABLE, FEATURE_TABLE, SCORE_TABLE, SIGNAL_TABLE)
}
"""By base stream name, in pipeline order."""
