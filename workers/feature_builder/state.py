"""Per-series feature state, candle checks and revisions: the pure part of feature-builder.

A series (feed, symbol, timeframe) holds the incremental engine after its latest candle and
enough to go back: the engine as it was before the oldest of the recent candles, a copy
taken every ``depth`` candles, and the recent candles themselves (between ``depth`` and
``2 * depth`` of them). A revised candle among the latest ``depth`` is recomputed from the
state before it, and the candles after it are stepped again so the state going on holds
every latest revision. So is a candle of a period the series has none of, among the latest
``depth``: one a late tick made after the next period's candle was out (an allowed
lateness over the timeframe). Only that candle's vector is published: later vectors keep
the history they were computed from, and their ids are taken.

A snapshot of the builder is its series pickled (engines of twenty kinds of feature are
plain objects with ``__slots__``), behind a header saying what they were built under: the
feature set, the depth, the stream sequence they cover and what the worker adds (its input
stream, its durable). Pickle runs code from what it loads: a snapshot is read only from
feature-builder's own object store, which only feature-builder's NATS user (and ops) may
write (``infra/nats/accounts.conf``).

Pickling thousands of series takes seconds (about 0.4 ms a series): too long to hold up
the candles. ``Builder.begin_snapshot`` takes the state as of now and pickles it a few
series at a time (``Snapshot.step``) while candles go on being applied; a series is
pickled before the first candle that would change it (copy on write), so every series in
the snapshot is as it was when the snapshot began.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import pickle
from collections.abc import Mapping
from typing import Final, NamedTuple

import msgspec

from contracts import subjects
from contracts.messages import Candle, FeatureVector, Timeframe
from contracts.servertime import fits
from workers.features import Engine, FeatureSet

HIGH_BELOW_LOW: Final = "high_below_low"
PRICE_OUTSIDE_RANGE: Final = "price_outside_range"
BAD_PRICE: Final = "bad_price"
BAD_PERIOD: Final = "bad_period"
SUBJECT_MISMATCH: Final = "subject_mismatch"
OUT_OF_ORDER: Final = "out_of_order"
STALE_REVISION: Final = "stale_revision"
REVISION_TOO_OLD: Final = "revision_too_old"
NON_FINITE: Final = "non_finite_feature"


SNAPSHOT_FORMAT: Final = 2
"""Raise when what a snapshot holds changes shape (``Series``, the header), or when a fix
changes what state a series reaches without changing the feature-set id (``Builder``'s
checks or revisions): a snapshot of another format is not used."""


class SnapshotMismatch(ValueError):
    """The snapshot was taken under another feature set, depth, stream or format, or cannot
    be read: rebuild from the stream."""


class _Header(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    feature_set_id: str
    depth: int
    stream_seq: int
    """The state holds every candle up to this stream sequence, and no later one."""
    context: dict[str, str]
    """What else the state was built under (the worker's input stream, durable...)."""


class Refusal(NamedTuple):
    reason: str
    detail: str


Key = tuple[str, str, Timeframe]


def check_candle(c: Candle, subject: str) -> Refusal | None:
    """A candle features can be computed from, published where it belongs."""
    refusal = _check_subject(c.feed, c.symbol, c.tf, subject)
    if refusal is not None:
        return refusal
    # the usual case at once: every price positive and finite (a NaN fails each comparison)
    lo, hi = c.low, c.high
    if (
        0.0 < lo <= c.open <= hi < math.inf
        and lo <= c.close <= hi
        and c.close_time_ms - c.open_time_ms == c.tf.ms
        and math.isfinite(c.spread_mean)
    ):
        return None
    prices = (c.open, c.high, c.low, c.close)
    if not all(math.isfinite(p) and p > 0.0 for p in prices):
        return Refusal(BAD_PRICE, f"{_name(c)} o={c.open} h={c.high} l={c.low} c={c.close}")
    if c.high < c.low:
        return Refusal(HIGH_BELOW_LOW, f"{_name(c)} high={c.high} < low={c.low}")
    if not (c.low <= c.open <= c.high and c.low <= c.close <= c.high):
        return Refusal(
            PRICE_OUTSIDE_RANGE, f"{_name(c)} o={c.open} c={c.close} outside [{c.low}, {c.high}]"
        )
    if not fits(c.tf, c.open_time_ms, c.close_time_ms) or not math.isfinite(c.spread_mean):
        return Refusal(BAD_PERIOD, f"{_name(c)} {c.open_time_ms}..{c.close_time_ms}")
    return None


@functools.lru_cache(maxsize=65_536)
def _check_subject(feed: str, symbol: str, tf: Timeframe, subject: str) -> Refusal | None:
    tokens = subject.rsplit(".", 3)
    try:
        token = subjects.escape(symbol)
    except subjects.SubjectError as exc:
        return Refusal(SUBJECT_MISMATCH, str(exc))
    if tokens[-3:] != [feed, token, tf.value]:
        return Refusal(SUBJECT_MISMATCH, f"{feed}/{symbol}/{tf} published on {subject}")
    return None


def _name(c: Candle) -> str:
    return f"{c.feed} {c.symbol} {c.tf.value} {c.open_time_ms} r{c.revision}"


class Series:
    """One series' engine, the state to go back to, and its recent candles."""

    __slots__ = ("base", "depth", "engine", "mid", "recent")

    def __init__(self, fs: FeatureSet, depth: int) -> None:
        self.depth = depth
        self.engine = fs.engine()
        self.base = self.engine.clone()
        """The engine before ``recent[0]``."""
        self.mid: Engine | None = None
        """The engine before ``recent[depth]``, once there is one."""
        self.recent: list[Candle] = []

    def add(self, c: Candle) -> list[float]:
        """Step the next candle (later than every one before)."""
        recent = self.recent
        if len(recent) == self.depth:
            self.mid = self.engine.clone()
        values = self.engine.step(c)
        recent.append(c)
        if len(recent) == 2 * self.depth:
            assert self.mid is not None
            self.base, self.mid = self.mid, None
            del recent[: self.depth]
        return values

    def revise(self, at: int, c: Candle) -> tuple[list[float], bool]:
        """Replace ``recent[at]`` and step again from the state before the oldest recent
        candle; the revised candle's values and whether it was still warming up."""
        self.recent[at] = c
        return self._step_again(at)

    def insert(self, c: Candle) -> tuple[list[float], bool]:
        """Put a candle of a period between two recent ones in its place and step again,
        as ``revise`` does."""
        recent = self.recent
        at = bisect.bisect_left(recent, c.open_time_ms, key=lambda r: r.open_time_ms)
        recent.insert(at, c)
        out = self._step_again(at)
        if len(recent) == 2 * self.depth:  # ``at`` is past the first ``depth``: kept
            assert self.mid is not None
            self.base, self.mid = self.mid, None
            del recent[: self.depth]
        return out

    def _step_again(self, at: int) -> tuple[list[float], bool]:
        engine = self.base.clone()
        self.mid = None
        values: list[float] = []
        warming = False
        for k, candle in enumerate(self.recent):
            if k == self.depth:
                self.mid = engine.clone()
            out = engine.step(candle)
            if k == at:
                values, warming = out, engine.warming_up
        self.engine = engine
        return values, warming

    def find(self, open_time_ms: int) -> int | None:
        for k in range(len(self.recent) - 1, -1, -1):
            t = self.recent[k].open_time_ms
            if t == open_time_ms:
                return k
            if t < open_time_ms:
                return None
        return None


class Snapshot:
    """The builder's series as they were when it began, pickled a few at a time."""

    def __init__(self, header: bytes, series: dict[Key, Series]) -> None:
        self._header = header
        self._todo = series
        self._done: dict[Key, bytes] = {}

    def take(self, key: Key) -> None:
        """Pickle this series now, if it is still to be: it is about to change."""
        series = self._todo.pop(key, None)
        if series is not None:
            self._done[key] = pickle.dumps(series, protocol=pickle.HIGHEST_PROTOCOL)

    def step(self, n: int) -> bool:
        """Pickle up to ``n`` more series; True once every one is."""
        todo = self._todo
        for key in list(itertools.islice(todo, n)):
            self.take(key)
        return not todo

    def data(self) -> bytes:
        """The whole snapshot (every series pickled first)."""
        self.step(len(self._todo))
        body = pickle.dumps(self._done, protocol=pickle.HIGHEST_PROTOCOL)
        return len(self._header).to_bytes(4, "big") + self._header + body


class Builder:
    """Every series of one worker, under one feature set."""

    def __init__(self, fs: FeatureSet, depth: int = 8) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.fs = fs
        self.depth = depth
        self.series: dict[Key, Series] = {}
        self.revisions = 0
        """Revised candles recomputed so far."""
        self.taking: Snapshot | None = None
        """The snapshot being pickled, which a series is given to before it changes."""

    def begin_snapshot(self, stream_seq: int, context: Mapping[str, str]) -> Snapshot:
        """A snapshot of every series as of now (``stream_seq``), pickled as it is stepped
        (``end_snapshot`` once it is done with)."""
        header = msgspec.json.encode(
            _Header(
                format=SNAPSHOT_FORMAT,
                feature_set_id=self.fs.id,
                depth=self.depth,
                stream_seq=stream_seq,
                context=dict(context),
            )
        )
        self.taking = Snapshot(header, dict(self.series))
        return self.taking

    def end_snapshot(self) -> None:
        self.taking = None

    def snapshot(self, stream_seq: int, context: Mapping[str, str]) -> bytes:
        """Every series, as of ``stream_seq``, and what they were built under, at once."""
        data = self.begin_snapshot(stream_seq, context).data()
        self.end_snapshot()
        return data

    @classmethod
    def restore(
        cls, fs: FeatureSet, depth: int, data: bytes, context: Mapping[str, str]
    ) -> tuple[Builder, int]:
        """The builder ``snapshot`` saved and the stream sequence it covers;
        SnapshotMismatch if it was built under anything else than ``fs``, ``depth`` and
        ``context``, or cannot be read."""
        size = int.from_bytes(data[:4], "big")
        try:
            header = msgspec.json.decode(data[4 : 4 + size], type=_Header)
        except msgspec.DecodeError as exc:
            raise SnapshotMismatch(f"not a feature-builder snapshot: {exc}") from None
        want: dict[str, object] = {
            "format": SNAPSHOT_FORMAT,
            "feature set": fs.id,
            "revision depth": depth,
            **context,
        }
        got: dict[str, object] = {
            "format": header.format,
            "feature set": header.feature_set_id,
            "revision depth": header.depth,
            **header.context,
        }
        differ = [f"{k} {got.get(k)!r}, not {v!r}" for k, v in want.items() if got.get(k) != v]
        differ += [f"{k} {v!r}, not none" for k, v in got.items() if k not in want]
        if differ:
            raise SnapshotMismatch("taken under " + "; ".join(differ))
        builder = cls(fs, depth)
        try:  # our own bucket: see the module's docstring
            pickled = pickle.loads(data[4 + size :])
            builder.series = {key: pickle.loads(one) for key, one in pickled.items()}
        except Exception as exc:  # a class of the feature library changed since
            raise SnapshotMismatch(f"series not readable: {exc!r}") from None
        if not all(isinstance(v, Series) for v in builder.series.values()):
            raise SnapshotMismatch("series of another type")
        return builder, header.stream_seq

    def apply(self, c: Candle, subject: str) -> FeatureVector | Refusal:
        """The vector of a candle (new or revised), or why there is none."""
        refusal = check_candle(c, subject)
        if refusal is not None:
            return refusal
        key = (c.feed, c.symbol, c.tf)
        if self.taking is not None:
            self.taking.take(key)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(self.fs, self.depth)
        recent = series.recent
        if not recent or c.open_time_ms > recent[-1].open_time_ms:
            values = series.add(c)
            warming = series.engine.warming_up
        else:
            # the latest ``depth`` candles, however many more are kept: what may be revised
            # must not depend on where the series' history started (a restart)
            oldest = recent[max(0, len(recent) - self.depth)].open_time_ms
            if c.open_time_ms < oldest:
                if c.revision > 0:
                    return Refusal(
                        REVISION_TOO_OLD, f"{_name(c)}: only candles from {oldest} can be revised"
                    )
                return Refusal(
                    OUT_OF_ORDER, f"{_name(c)} after {recent[-1].open_time_ms}, not a revision"
                )
            at = series.find(c.open_time_ms)
            if at is None:  # a period that had no candle: a late tick made one
                values, warming = series.insert(c)
            elif c.revision <= recent[at].revision:
                return Refusal(
                    STALE_REVISION, f"{_name(c)}: revision {recent[at].revision} already seen"
                )
            else:
                values, warming = series.revise(at, c)
                self.revisions += 1
        if warming:
            values = [v if v == v else 0.0 for v in values]  # NaN: this feature is not warm
        if not all(map(math.isfinite, values)):  # JSON has no inf: it would go out as null
            return Refusal(NON_FINITE, f"{_name(c)}: {values}")
        return FeatureVector(
            feed=c.feed,
            symbol=c.symbol,
            tf=c.tf,
            open_time_ms=c.open_time_ms,
            candle_revision=c.revision,
            close=c.close,
            close_time_ms=c.close_time_ms,
            last_tick_ms=c.last_tick_ms,
            feature_set_id=self.fs.id,
            values=values,
            warming_up=warming,
        )


def message_id(v: FeatureVector) -> str:
    """The ``Nats-Msg-Id`` of a vector: its candle's key and revision, and the feature set."""
    return (
        f"{v.feed}|{v.symbol}|{v.tf.value}|{v.open_time_ms}|{v.candle_revision}|{v.feature_set_id}"
    )
