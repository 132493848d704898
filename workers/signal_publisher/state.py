"""Per-series decisions, score checks and candle revisions: the pure part of signal-publisher.

A series (feed, symbol, timeframe) keeps its latest ``depth`` candles: each one's score, the
state before it and the signal in force for it (none, the one published, or a correction). A
revised candle is decided again from the state before it, and so is every later candle kept,
each under the rule it was first decided under (not a policy put in since); where the
decision (a side, or no signal) differs from the one made before, a correcting signal is
published: the new side, or when there is now no signal, the side the series keeps.
``corrects`` names the signal it replaces (if the candle had one) and its own id adds the
revision that caused it. A candle of a period that had none, coming after later candles (a
late first tick, with an allowed lateness over the timeframe), is put in its place among
them when it is newer than the oldest kept (and than the candle of the signal a restart took
the side of): decided from the state before it under the rule in force (its signal, if any,
is its first, under the plain id), and every later candle kept is decided again as after a
revision, the corrections' ids adding ``r<revision>@<its open time>``. One older than every
candle kept is refused (``out_of_order``, or ``revision_too_old`` for a revision): the state
before it is gone. A correction, and a late candle's signal, stays valid the allowed
lateness longer than a signal: a revision or a late candle comes up to that long after its
candle's close, and must not reach subscribers expired. When the last correction (or the
late candle's signal) is for an earlier candle and says another side than the series now
holds (a later candle decided as before, and its signal went out before the corrections),
the latest candle's signal is corrected too, to that side: the last signal subscribers get
is always where the series stands. A revision that changes no decision publishes nothing; so
does a late candle that gives no signal and changes none.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import msgspec

from contracts import subjects
from contracts.messages import Score, Side, Signal, Timeframe
from contracts.servertime import fits
from workers.signal_publisher.policy import Policy, Rule, State, decide, make_signal, signal_id

BAD_SCORE: Final = "bad_score"
BAD_PRICE: Final = "bad_price"
SUBJECT_MISMATCH: Final = "subject_mismatch"
OUT_OF_ORDER: Final = "out_of_order"
STALE_REVISION: Final = "stale_revision"
REVISION_TOO_OLD: Final = "revision_too_old"

Key = tuple[str, str, Timeframe]


def last_words(signals: Iterable[Signal]) -> dict[Key, Signal]:
    """The last word subscribers got on each series among ``signals``, given in the order
    they were published: the signal of its latest candle; of one candle, of its latest
    revision; of equals (a correction, a rebuild's), the one published last, as the
    replicator keeps it. Not simply the last one published: a correction for an earlier
    candle (``tickwire rebuild`` of a range) does not undo the later candles' signals."""
    out: dict[Key, Signal] = {}
    for s in signals:
        key = (s.feed, s.symbol, s.tf)
        held = out.get(key)
        if held is None or supersedes(s, held):
            out[key] = s
    return out


def supersedes(s: Signal, held: Signal) -> bool:
    """``s``, published after ``held`` on the same series, is the later word of the two."""
    return (s.open_time_ms, s.candle_revision) >= (held.open_time_ms, held.candle_revision)


def side_key(s: Signal) -> str:
    """The series' key in the sides bucket."""
    return f"{s.feed}.{subjects.escape(s.symbol)}.{s.tf.value}"


class Refusal(NamedTuple):
    reason: str
    detail: str


def check_score(s: Score, subject: str) -> Refusal | None:
    """A score a decision can be made on, published where it belongs."""
    name = f"{s.feed} {s.symbol} {s.tf.value} {s.open_time_ms} r{s.candle_revision}"
    try:
        token = subjects.escape(s.symbol)
    except subjects.SubjectError as exc:
        return Refusal(SUBJECT_MISMATCH, str(exc))
    if subject.rsplit(".", 3)[-3:] != [s.feed, token, s.tf.value]:
        return Refusal(SUBJECT_MISMATCH, f"{name} published on {subject}")
    if not (math.isfinite(s.score) and -1.0 <= s.score <= 1.0):
        return Refusal(BAD_SCORE, f"{name} score={s.score}")
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in s.probabilities):
        return Refusal(BAD_SCORE, f"{name} probabilities={s.probabilities}")
    if not (math.isfinite(s.close) and s.close > 0.0):
        return Refusal(BAD_PRICE, f"{name} close={s.close}")
    if not fits(s.tf, s.open_time_ms, s.close_time_ms) or s.last_tick_ms > s.close_time_ms:
        return Refusal(BAD_SCORE, f"{name} times {s.open_time_ms}..{s.close_time_ms}")
    return None


@dataclass(slots=True)
class Decided:
    score: Score
    rule: Rule
    """The rule it was decided under: a revision is decided again under it, not under a
    policy put in since (the score may not even have changed)."""
    before: State
    signal: Signal | None
    """The signal in force for this candle."""
    decided: Side | None
    """The side the policy gave on this candle (None: no signal): a revision that gives
    another is corrected."""


@dataclass(slots=True)
class Series:
    state: State = field(default_factory=State)
    recent: list[Decided] = field(default_factory=list)
    told_ms: int | None = None
    """Open time of the candle whose signal, read back from SIGNALS, set the state: that
    candle and earlier ones were decided under another policy or history, not to be
    decided again."""


class Book:
    """Every series' decisions; ``apply`` returns the signals a score gives, or a refusal."""

    def __init__(self, policy: Policy, depth: int = 8, lateness_ms: int = 0) -> None:
        self.policy = policy
        self.depth = depth
        self.lateness_ms = lateness_ms
        """How long after its close a candle may still be revised: a correction stays valid
        that much longer than a signal, so that it never comes already expired."""
        self.series: dict[Key, Series] = {}

    def apply(self, score: Score, subject: str) -> list[Signal] | Refusal:
        refusal = check_score(score, subject)
        if refusal is not None:
            return refusal
        key = (score.feed, score.symbol, score.tf)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series()
        recent = series.recent
        if series.told_ms is not None and score.open_time_ms <= series.told_ms:
            return Refusal(
                REVISION_TOO_OLD if score.candle_revision else OUT_OF_ORDER,
                f"{signal_id(score)} r{score.candle_revision}: at or before the signal"
                f" subscribers were told at {series.told_ms}, decided before the restart",
            )
        if not recent or score.open_time_ms > recent[-1].score.open_time_ms:
            rule = self.policy.rule(*key)
            before = series.state
            series.state, signal = decide(before, score, rule)
            decided = None if signal is None else signal.side
            recent.append(Decided(score, rule, before, signal, decided))
            if len(recent) > self.depth:
                del recent[0]
            return [] if signal is None else [signal]
        at = bisect.bisect_left(recent, score.open_time_ms, key=lambda d: d.score.open_time_ms)
        if at == 0 and recent[0].score.open_time_ms != score.open_time_ms:
            return Refusal(
                REVISION_TOO_OLD if score.candle_revision else OUT_OF_ORDER,
                f"{signal_id(score)} r{score.candle_revision}: before"
                f" {recent[0].score.open_time_ms}, the oldest of the {len(recent)} kept",
            )
        d = recent[at]
        if d.score.open_time_ms != score.open_time_ms:
            # a candle of a period that had none, after the next ones: a late tick made it
            recent.insert(at, Decided(score, self.policy.rule(*key), d.before, None, None))
            out = self._revise(series, at, score, first=True)
            if len(recent) > self.depth:
                del recent[0]
            return out
        if score.candle_revision <= d.score.candle_revision:
            return Refusal(
                STALE_REVISION,
                f"{signal_id(score)} r{score.candle_revision} after r{d.score.candle_revision}",
            )
        return self._revise(series, at, score)

    def told(self, signal: Signal) -> bool:
        """The series of ``signal``, the last one subscribers got, holds its side from that
        signal's candle on; True when that changed the series."""
        key = (signal.feed, signal.symbol, signal.tf)
        series = self.series.get(key)
        if signal.side is (Side.FLAT if series is None else series.state.side):
            return False
        if series is None:
            series = self.series[key] = Series()
        # its candle's close from its score where that is still here; else the length of the
        # timeframe (an hour off for an H4 or D1 candle over a change of the server's clock)
        close_ms = next(
            (d.score.close_time_ms for d in series.recent
             if d.score.open_time_ms == signal.open_time_ms),
            signal.open_time_ms + signal.tf.ms,
        )  # fmt: skip
        entries = tuple(t for t in series.state.entries if t < close_ms)
        held = series.state = msgspec.structs.replace(
            series.state,
            side=signal.side,
            last_open_ms=signal.open_time_ms,
            last_close_ms=close_ms,
            # a side taken is an entry, for the limit per period
            entries=entries if signal.side is Side.FLAT else (*entries, close_ms),
        )
        # no signal came after it: each later candle kept held that side, and a revision
        # of one is decided again from there; that candle and earlier ones are not
        series.recent = [d for d in series.recent if d.score.open_time_ms > signal.open_time_ms]
        for d in series.recent:
            d.before, d.decided, d.signal = held, None, None
        series.told_ms = signal.open_time_ms
        return True

    def untold(self, key: Key) -> bool:
        """Subscribers were never told a side of series ``key``: it holds none, from its
        latest candle on (decided here under another policy than the signals were); True
        when that changed the series."""
        series = self.series.get(key)
        if series is None or series.state.side is Side.FLAT:
            return False
        series.state = State()
        if series.recent:
            series.told_ms = series.recent[-1].score.open_time_ms
        series.recent = []
        return True

    def _revise(
        self, series: Series, i: int, revised: Score, *, first: bool = False
    ) -> list[Signal]:
        """Decide ``recent[i]`` (now ``revised``) and every later candle kept again, and
        return the corrections; ``first``: ``recent[i]`` was just put in, never decided, and
        a signal for it is its first, under the plain id."""
        recent = series.recent
        state = recent[i].before
        cause = f"r{revised.candle_revision}"
        if i + 1 < len(recent):
            cause = f"{cause}@{revised.open_time_ms}"
        out: list[Signal] = []
        for j in range(i, len(recent)):
            d = recent[j]
            score = revised if j == i else d.score
            d.before = state
            rule = d.rule
            state, signal = decide(state, score, rule)
            if j == i:
                d.score = revised
            decided = None if signal is None else signal.side
            if decided is d.decided:
                continue
            d.decided = decided
            if signal is None:
                # the decision now is to keep the side held before: say so
                signal = make_signal(score, state.side, rule)
            old = d.signal
            fix = msgspec.structs.replace(
                signal,
                signal_id=signal.signal_id if first and j == i else f"{signal_id(score)}|{cause}",
                corrects=None if old is None else old.signal_id,
                expires_ms=signal.expires_ms + self.lateness_ms,
            )
            d.signal = fix
            out.append(fix)
        series.state = state
        if out and out[-1].side is not state.side:
            # the last correction is for an earlier candle, and a later one decided as before
            # (its signal went out before the corrections): say again where the series is,
            # so that the last word subscribers get is the side it holds
            last = recent[-1]
            was = None if last.signal is None else last.signal.signal_id
            again = make_signal(
                last.score, state.side, last.rule, f"{signal_id(last.score)}|{cause}"
            )
            last.signal = msgspec.structs.replace(
                again, corrects=was, expires_ms=again.expires_ms + self.lateness_ms
            )
            out.append(last.signal)
        return out
