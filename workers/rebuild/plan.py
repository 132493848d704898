"""What a rebuild publishes, decided without NATS: the pure part of ``tickwire rebuild``.

Each stage computes, for the candles of the range, what the pipeline would publish now
(the feature library, the active model, the current policy) and compares it with what the
stream holds for the same natural key. Only what differs is published, as the key's next
rebuild generation: the message carries ``rebuild = n`` and its ``Nats-Msg-Id`` is the
pipeline's id plus ``|rebuild-<n>``, so the stream's duplicate window never drops it and a
second rebuild that computes the same values publishes nothing.

- **features**: every candle of a series from the stream's first one, in stream order,
  through the feature-builder's ``Builder``; the state before the range is warmed by the
  same candles the live worker saw, and the last vector of each candle of the range is
  what the live worker would publish now. feature-builder's state outlives the stream's
  age (its snapshot): its vectors come from the series' whole history. A series is
  recomputed when the stream still has every candle it ever had, or at least the feature
  set's ``memory`` of its candles before the range: then every feature is past its warm-up
  and what came before weighs below ``FADED`` (RSI, ATR and MACD remember every candle,
  fading), so the vectors equal the live ones but for rounding, and are taken as the same
  when their values ``agree`` (to ``PARITY``; flags, ids and the rest exactly). With fewer,
  its vectors would be warmed from too little (still warming up, or EMAs drifting) and
  differ for that alone: the series is left out (nor are its scores or signals rebuilt).
- **scores**: the latest vector of each candle of the range (the rebuilt one when features
  are rebuilt too) by the active model of its series, as model-scorer scores.
- **signals**: the policy's decisions over every series' scores from its first one, the
  latest score of each candle taken (rebuilt ones in the range). For each candle of the
  range the side subscribers hold after it, from the signals in force, is compared with
  the side the policy holds now; where they differ, or where the policy now gives a signal
  of another side, a correcting signal goes out naming the one it replaces.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import msgspec
import numpy as np

from contracts import subjects
from contracts.messages import Candle, FeatureVector, Score, Side, Signal, Timeframe
from workers.feature_builder.state import Builder
from workers.feature_builder.state import message_id as vector_id
from workers.features import FeatureSet, agree
from workers.model_scorer import scoring
from workers.model_scorer.scoring import Model
from workers.signal_publisher.policy import Policy, State, decide, make_signal, signal_id
from workers.signal_publisher.state import check_score

FEATURES: Final = "features"
SCORES: Final = "scores"
SIGNALS: Final = "signals"
STAGES: Final = (FEATURES, SCORES, SIGNALS)
"""In pipeline order: a rebuild runs a contiguous part of it."""

Series = tuple[str, str, Timeframe]
CandleKey = tuple[str, str, Timeframe, int]
M = TypeVar("M", FeatureVector, Score, Signal)
K = TypeVar("K", bound=Hashable)


class RebuildError(ValueError):
    """The rebuild asked for cannot be run; nothing was changed."""


# --- the request ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    start_ms: int
    """First candle open time rebuilt (included)."""
    end_ms: int | None
    """Candle open time where the range ends (excluded); None: up to the latest candle."""
    stages: tuple[str, ...]
    feed: str | None = None
    symbols: frozenset[str] = frozenset()

    def covers(self, open_time_ms: int) -> bool:
        return self.start_ms <= open_time_ms and (self.end_ms is None or open_time_ms < self.end_ms)

    def wants(self, feed: str, symbol: str) -> bool:
        return (self.feed is None or feed == self.feed) and (
            not self.symbols or symbol in self.symbols
        )

    def filters(self, domain: str, namespace: str | None) -> list[str]:
        """Subject filters of ``domain`` that hold every series asked for."""
        if not self.symbols:
            return [subjects.wildcard(domain, feed=self.feed, namespace=namespace)]
        prefix = "" if namespace is None else f"{subjects.NAMESPACE}.{namespace}."
        feed = "*" if self.feed is None else self.feed
        return [f"{prefix}{domain}.{feed}.{subjects.escape(s)}.*" for s in sorted(self.symbols)]


MIN_EPOCH_MS: Final = 10**11
"""Bare numbers below this (1973-03-03 in ms) are refused as ambiguous: epoch seconds of
now (10 digits) or an ISO basic date (``20250303``) read as milliseconds would be January
1970, and the rebuild would start at the streams' first message."""


def parse_time(text: str, flag: str) -> int:
    """Epoch milliseconds from an ISO time (UTC if naive) or a whole number of ms from
    ``MIN_EPOCH_MS`` on."""
    if text.isascii() and text.isdigit():
        if int(text) < MIN_EPOCH_MS:
            raise RebuildError(
                f"{flag}: {text} is ambiguous (epoch seconds? a date?): give an ISO time "
                "or epoch milliseconds (13 digits)"
            )
        return int(text)
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise RebuildError(f"{flag}: not an ISO time or epoch milliseconds: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return round(value.timestamp() * 1000)


def parse_stages(text: str) -> tuple[str, ...]:
    """``features,scores,signals`` or a contiguous part of it, in pipeline order."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise RebuildError("--stages: give at least one of " + ",".join(STAGES))
    for name in names:
        if name not in STAGES:
            raise RebuildError(f"--stages: unknown stage {name!r} (known: {','.join(STAGES)})")
    if len(set(names)) != len(names):
        raise RebuildError(f"--stages: a stage is named twice: {text!r}")
    at = [STAGES.index(n) for n in names]
    if at != sorted(at):
        raise RebuildError(f"--stages: give them in pipeline order ({','.join(STAGES)}): {text!r}")
    if at[-1] - at[0] + 1 != len(at):
        missing = [s for s in STAGES[at[0] : at[-1] + 1] if s not in names]
        raise RebuildError(
            f"--stages: {','.join(names)} skips {','.join(missing)}: what it feeds would not change"
        )
    return tuple(names)


def request(
    *,
    start: str,
    end: str | None,
    stages: str,
    feed: str | None = None,
    symbols: Sequence[str] = (),
) -> Request:
    """A checked request from the command line's words; ``RebuildError`` says what is wrong."""
    start_ms = parse_time(start, "--from")
    end_ms = None if end is None else parse_time(end, "--to")
    if end_ms is not None and end_ms <= start_ms:
        raise RebuildError(f"--to {end} is not after --from {start}")
    try:
        if feed is not None:
            subjects.check_name(feed, "feed")
        for symbol in symbols:
            subjects.check_symbol(symbol)
    except subjects.SubjectError as exc:
        raise RebuildError(str(exc)) from None
    return Request(start_ms, end_ms, parse_stages(stages), feed, frozenset(symbols))


# --- what the streams hold -----------------------------------------------------------------


def rebuild_id(pipeline_id: str, generation: int) -> str:
    """The ``Nats-Msg-Id`` of a rebuilt message: the pipeline's id and the generation."""
    return f"{pipeline_id}|rebuild-{generation}"


@dataclass(slots=True)
class Held(Generic[M]):
    message: M
    """The one in force: the highest candle revision, the later in the stream among equals."""
    revision: int
    generation: int
    """The highest rebuild generation seen for the key."""


@dataclass(slots=True)
class Stored(Generic[K, M]):
    """Per natural key, the message in force in a stream and its rebuild generation."""

    by_key: dict[K, Held[M]] = field(default_factory=dict)

    def add(self, key: K, message: M, revision: int) -> None:
        """Messages must come in stream order."""
        held = self.by_key.get(key)
        if held is None:
            self.by_key[key] = Held(message, revision, message.rebuild)
            return
        if revision >= held.revision:
            held.message, held.revision = message, revision
        held.generation = max(held.generation, message.rebuild)

    def get(self, key: K) -> M | None:
        held = self.by_key.get(key)
        return None if held is None else held.message

    def next_generation(self, key: K) -> int:
        held = self.by_key.get(key)
        return 1 if held is None else held.generation + 1


def same(a: M, b: M) -> bool:
    """Equal but for the rebuild generation."""
    return msgspec.structs.replace(a, rebuild=0) == msgspec.structs.replace(b, rebuild=0)


def feature_key(v: FeatureVector) -> tuple[str, str, Timeframe, int, str]:
    return (v.feed, v.symbol, v.tf, v.open_time_ms, v.feature_set_id)


def score_key(s: Score) -> tuple[str, str, Timeframe, int, str]:
    return (s.feed, s.symbol, s.tf, s.open_time_ms, s.model_version)


def candle_key(m: Candle | FeatureVector | Score | Signal) -> CandleKey:
    return (m.feed, m.symbol, m.tf, m.open_time_ms)


@dataclass(frozen=True, slots=True)
class Out(Generic[M]):
    message: M
    msg_id: str


@dataclass(slots=True)
class Result(Generic[M]):
    current: dict[CandleKey, M] = field(default_factory=dict)
    """What the stage computes now for each candle of the range (rebuild generation 0)."""
    publish: list[Out[M]] = field(default_factory=list)
    """What differs from the stream, as the next generation of its key."""
    unchanged: int = 0
    left_out: list[Series] = field(default_factory=list)
    """Series of the range the stage cannot recompute: nothing is published for them."""
    held_before: dict[Series, int] = field(default_factory=dict)
    """Features: candles of each series of the range the stream holds before it."""


def alike(a: FeatureVector, b: FeatureVector) -> bool:
    """The same but for rounding: values that ``agree``, everything else equal (``same``)."""
    return agree(a.values, b.values) and same(
        msgspec.structs.replace(a, values=[]), msgspec.structs.replace(b, values=[])
    )


def _emit(
    result: Result[M],
    message: M,
    held: M | None,
    generation: int,
    pipeline_id: str,
    equal: Callable[[M, M], bool] = same,
) -> bool:
    """Publish ``message`` unless ``held`` is ``equal`` to it; False when it is."""
    if held is not None and equal(held, message):
        result.unchanged += 1
        return False
    out = msgspec.structs.replace(message, rebuild=generation)
    result.publish.append(Out(out, rebuild_id(pipeline_id, generation)))
    return True


# --- the stages ----------------------------------------------------------------------------


def features(
    candles: Iterable[tuple[str, Candle]],
    stored: Stored[tuple[str, str, Timeframe, int, str], FeatureVector],
    req: Request,
    fs: FeatureSet,
    depth: int,
    whole: Callable[[Series], bool],
) -> Result[FeatureVector]:
    """Vectors of the range from ``(subject, candle)`` in stream order, from the first.

    A series ``whole`` says the stream holds from its first candle is compared exactly; one
    with at least ``fs.memory`` candles before the range, by ``alike``, and where its vector
    is alike the stream's that one stays in force (``current``, for the scores); any other
    is left out."""
    builder = Builder(fs, depth)
    result: Result[FeatureVector] = Result()
    before: dict[Series, set[int]] = {}
    ranged: dict[Series, None] = {}
    """Series with a candle in the range, in the order they came."""
    for subject, c in candles:
        series = (c.feed, c.symbol, c.tf)
        covered = req.covers(c.open_time_ms)
        if covered:
            ranged[series] = None
        v = builder.apply(c, subject)
        if not isinstance(v, FeatureVector):
            continue
        if covered:
            result.current[candle_key(v)] = v
        elif c.open_time_ms < req.start_ms:
            before.setdefault(series, set()).add(c.open_time_ms)
    tolerant: set[Series] = set()
    for series in ranged:
        result.held_before[series] = len(before.get(series, ()))
        if whole(series):
            continue
        if result.held_before[series] >= fs.memory:
            tolerant.add(series)
        else:
            result.left_out.append(series)
    left_out = set(result.left_out)
    for ck in list(result.current):
        series = ck[:3]
        if series in left_out:
            del result.current[ck]
            continue
        v = result.current[ck]
        key = feature_key(v)
        held = stored.get(key)
        equal = alike if series in tolerant else same
        if not _emit(result, v, held, stored.next_generation(key), vector_id(v), equal):
            assert held is not None
            result.current[ck] = msgspec.structs.replace(held, rebuild=0)
    return result


ModelOf = Callable[[Series], Model | None]


def scores(
    vectors: Iterable[FeatureVector],
    model_of: ModelOf,
    stored: Stored[tuple[str, str, Timeframe, int, str], Score],
) -> Result[Score]:
    """Scores of the range's vectors by each series' model (``None``: no usable model)."""
    groups: dict[Series, list[FeatureVector]] = {}
    for v in vectors:
        if not v.warming_up:
            groups.setdefault((v.feed, v.symbol, v.tf), []).append(v)
    result: Result[Score] = Result()
    for series, group in groups.items():
        model = model_of(series)
        if model is None:
            continue
        usable = [v for v in group if scoring.check(v, model) is None]
        if not usable:
            continue
        values = np.array([v.values for v in usable], dtype=np.float64)
        finite = ~scoring.non_finite(values)
        usable = [v for v, ok in zip(usable, finite.tolist(), strict=True) if ok]
        if not usable:
            continue
        for s in scoring.scores(usable, model, values[finite]):
            result.current[candle_key(s)] = s
    for s in result.current.values():
        key = score_key(s)
        _emit(result, s, stored.get(key), stored.next_generation(key), scoring.message_id(s))
    return result


def effective_scores(
    stream: Iterable[tuple[str, Score]], rebuilt: Mapping[CandleKey, Score]
) -> dict[Series, list[Score]]:
    """Per series, in candle order, the score decided on for each candle: the rebuilt one,
    else the stream's latest revision (the later among equals), refused ones left out."""
    latest: dict[CandleKey, tuple[int, Score]] = {}
    for subject, s in stream:
        if check_score(s, subject) is not None:
            continue
        key = candle_key(s)
        held = latest.get(key)
        if held is None or s.candle_revision >= held[0]:
            latest[key] = (s.candle_revision, s)
    chosen = {k: s for k, (_, s) in latest.items()}
    chosen.update(rebuilt)
    out: dict[Series, list[Score]] = {}
    for key in sorted(chosen, key=lambda k: (k[0], k[1], k[2].ms, k[2], k[3])):
        out.setdefault((key[0], key[1], key[2]), []).append(chosen[key])
    return out


def signals(
    chains: Mapping[Series, list[Score]],
    in_force: Stored[CandleKey, Signal],
    req: Request,
    policy: Policy,
) -> Result[Signal]:
    """Correcting signals where the decisions over ``chains`` differ from what subscribers
    were told for the candles of the range. What they were told comes from every signal in
    force, those of candles without a score here too (SIGNALS keeps longer than SCORES)."""
    result: Result[Signal] = Result()
    told_by: dict[Series, list[Signal]] = {}
    for h in in_force.by_key.values():
        told_by.setdefault(_series(h.message), []).append(h.message)
    for series, chain in chains.items():
        if not req.wants(series[0], series[1]):
            continue
        rule = policy.rule(*series)
        state = State()
        told = Side.FLAT
        """The side subscribers hold, from the signals in force and those sent here."""
        scored = {score.open_time_ms for score in chain}
        unscored = sorted(
            (s for s in told_by.get(series, []) if s.open_time_ms not in scored),
            key=lambda s: s.open_time_ms,
        )
        k = 0
        for score in chain:
            if req.end_ms is not None and score.open_time_ms >= req.end_ms:
                break
            while k < len(unscored) and unscored[k].open_time_ms < score.open_time_ms:
                told = unscored[k].side
                k += 1
            key = candle_key(score)
            held = in_force.get(key)
            state, signal = decide(state, score, rule)
            if score.open_time_ms < req.start_ms:  # the state before the range
                told = told if held is None else held.side
                continue
            if held is not None and held.candle_revision > score.candle_revision:
                # a later revision's signal, out before its score was acked: the live
                # worker's to decide, and a correction below it would never be in force
                told = held.side
                result.unchanged += 1
                continue
            after = told if held is None else held.side
            told = state.side
            if signal is not None:
                if held is not None and held.side is signal.side:
                    result.unchanged += 1
                    continue
            elif after is state.side:
                result.unchanged += 1
                continue
            else:
                signal = make_signal(score, state.side, rule)
            generation = in_force.next_generation(key)
            sid = rebuild_id(signal_id(score), generation)
            fix = msgspec.structs.replace(
                signal,
                signal_id=sid,
                corrects=None if held is None else held.signal_id,
                rebuild=generation,
            )
            result.publish.append(Out(fix, sid))
    return result


def _series(m: Signal) -> Series:
    return (m.feed, m.symbol, m.tf)
