"""The signal policy, declared as data, and the pure decision it drives.

A policy has default rules and overrides per feed, symbol and timeframe; the most specific
matching override wins (ties: the first listed), and what it leaves out comes from the
defaults. It is read from a TOML or JSON file and may be replaced at run time from a KV
entry (JSON); a policy that does not validate is refused as a whole.

``decide(state, score, rule)`` is the whole decision for one series (feed, symbol, tf):

- **hysteresis**: flat, enter BUY at ``score >= entry_long``, SELL at ``score <=
  entry_short``; long, exit to FLAT at ``score <= exit_long`` (``< entry_long``), reverse to
  SELL at ``score <= entry_short``; short symmetrically.
- **cooldown**: an entry (BUY or SELL, also a reversal) needs ``cooldown_bars`` periods of
  the timeframe from the candle of the series' last signal to its own (a weekend or a quiet
  hour without candles counts its periods) and ``cooldown_s`` seconds of event time since
  that signal; a restatement does not start it again. A blocked reversal still exits to FLAT;
  exits are never held back.
- **max per period**: at most ``max_signals`` entries whose candles closed within
  ``period_s`` (0: no limit). Entries are remembered whatever the limit, for a day or the
  period if longer, so a limit put in or a period widened at run time counts the entries
  already made within it.
- **only on change**: off, a series in BUY or SELL restates its side on every candle
  (restatements are not entries).
- **expiry**: a signal is valid until its candle's close plus ``expiry_s``: event time, so a
  replay yields the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final

import msgspec

from contracts.messages import Score, Side, Signal, Timeframe

Threshold = Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=366 * 86_400.0)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]


class PolicyError(ValueError):
    """The policy is not valid."""


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What decides the signals of one series."""

    entry_long: Threshold = 0.6
    exit_long: Threshold = 0.2
    entry_short: Threshold = -0.6
    exit_short: Threshold = -0.2
    cooldown_bars: Count = 0
    cooldown_s: Seconds = 0.0
    max_signals: Count = 0
    """Entries allowed per ``period_s``; 0 means no limit."""
    period_s: Seconds = 3600.0
    only_on_change: bool = True
    expiry_s: Annotated[float, msgspec.Meta(gt=0.0, le=366 * 86_400.0)] = 300.0

    def check(self) -> Rule:
        if not self.exit_long < self.entry_long:
            raise PolicyError(f"exit_long {self.exit_long} must be below {self.entry_long}")
        if not self.entry_short < self.exit_short:
            raise PolicyError(f"exit_short {self.exit_short} must be above {self.entry_short}")
        if not self.entry_short < self.entry_long:
            raise PolicyError("entry_short must be below entry_long")
        if self.max_signals and not self.period_s:
            raise PolicyError("max_signals needs a period_s above 0")
        return self


class Override(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rules for the series it matches; a field left out matches any / keeps the default."""

    feed: str | None = None
    symbol: str | None = None
    tf: Timeframe | None = None
    entry_long: Threshold | None = None
    exit_long: Threshold | None = None
    entry_short: Threshold | None = None
    exit_short: Threshold | None = None
    cooldown_bars: Count | None = None
    cooldown_s: Seconds | None = None
    max_signals: Count | None = None
    period_s: Seconds | None = None
    only_on_change: bool | None = None
    expiry_s: Annotated[float, msgspec.Meta(gt=0.0, le=366 * 86_400.0)] | None = None

    @property
    def specificity(self) -> int:
        return sum(x is not None for x in (self.feed, self.symbol, self.tf))

    def matches(self, feed: str, symbol: str, tf: Timeframe) -> bool:
        return (
            (self.feed is None or self.feed == feed)
            and (self.symbol is None or self.symbol == symbol)
            and (self.tf is None or self.tf == tf)
        )

    def over(self, base: Rule) -> Rule:
        changes = {
            f: getattr(self, f) for f in Rule.__struct_fields__ if getattr(self, f) is not None
        }
        return msgspec.structs.replace(base, **changes)


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    defaults: Rule = Rule()
    overrides: tuple[Override, ...] = ()

    def check(self) -> Policy:
        self.defaults.check()
        for i, o in enumerate(self.overrides):
            try:
                o.over(self.defaults).check()
            except PolicyError as exc:
                raise PolicyError(f"override {i + 1}: {exc}") from None
        return self

    def rule(self, feed: str, symbol: str, tf: Timeframe) -> Rule:
        best: Override | None = None
        for o in self.overrides:
            if o.matches(feed, symbol, tf) and (best is None or o.specificity > best.specificity):
                best = o
        return self.defaults if best is None else best.over(self.defaults)


_json_policy: Final = msgspec.json.Decoder(Policy)


POLICY_BUCKET: Final = "signal-policy"
POLICY_KEY: Final = "policy"
SIDES_BUCKET: Final = "signal-sides"
"""The last signal published for each series, kept for good: SIGNALS keeps a month."""


def kv_bucket(base: str = POLICY_BUCKET, namespace: str | None = None) -> str:
    """A KV bucket of signal-publisher's (the run-time policy, the sides told); a replay
    namespace's is ``ns-<name>-<base>``, named like every other bucket of the namespace so
    that ``tickwire replay delete`` finds it."""
    return base if namespace is None else f"ns-{namespace}-{base}"


def parse_policy(data: bytes, *, toml: bool = False) -> Policy:
    """A checked policy from JSON (or TOML) bytes; ``PolicyError`` says what is wrong."""
    try:
        policy = msgspec.toml.decode(data, type=Policy) if toml else _json_policy.decode(data)
    except msgspec.MsgspecError as exc:
        raise PolicyError(str(exc)) from None
    return policy.check()


def read_policy(path: Path) -> Policy:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_policy(data, toml=path.suffix.lower() == ".toml")
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


# --- the decision -------------------------------------------------------------------------


class State(msgspec.Struct, frozen=True, kw_only=True):
    """One series after its latest decision."""

    side: Side = Side.FLAT
    last_open_ms: int | None = None
    """Candle open time of the series' last signal (cooldown in bars)."""
    last_close_ms: int | None = None
    """Candle close time of the series' last signal (cooldown in seconds)."""
    entries: tuple[int, ...] = ()
    """Close times of recent entries, for the limit per period."""


def signal_id(score: Score) -> str:
    """Feed, symbol, timeframe, candle open time and model version."""
    return (
        f"{score.feed}|{score.symbol}|{score.tf.value}|{score.open_time_ms}|{score.model_version}"
    )


def make_signal(score: Score, side: Side, rule: Rule, sid: str | None = None) -> Signal:
    strength = 0.0 if side is Side.FLAT else min(1.0, abs(score.score))
    return Signal(
        signal_id=signal_id(score) if sid is None else sid,
        feed=score.feed,
        symbol=score.symbol,
        tf=score.tf,
        open_time_ms=score.open_time_ms,
        candle_revision=score.candle_revision,
        side=side,
        strength=strength,
        ref_price=score.close,
        expires_ms=score.close_time_ms + round(rule.expiry_s * 1000),
        model_version=score.model_version,
        feature_set_id=score.feature_set_id,
    )


def _target(side: Side, s: float, r: Rule) -> Side:
    if side is Side.BUY:
        return Side.SELL if s <= r.entry_short else Side.FLAT if s <= r.exit_long else Side.BUY
    if side is Side.SELL:
        return Side.BUY if s >= r.entry_long else Side.FLAT if s >= r.exit_short else Side.SELL
    return Side.BUY if s >= r.entry_long else Side.SELL if s <= r.entry_short else Side.FLAT


ENTRY_MEMORY_MS: Final = 86_400_000
"""How long entries are remembered at least, for a limit per period set at run time."""


def _window(state: State, close_ms: int, r: Rule) -> tuple[int, ...]:
    start = close_ms - round(r.period_s * 1000)
    return tuple(t for t in state.entries if t > start)


def _remembered(state: State, close_ms: int, r: Rule) -> tuple[int, ...]:
    start = close_ms - max(round(r.period_s * 1000), ENTRY_MEMORY_MS)
    return tuple(t for t in state.entries if t > start)


def _entry_allowed(state: State, score: Score, r: Rule) -> bool:
    if state.last_open_ms is not None:
        # rounded: an H4 or D1 candle over a change of the server's clock is an hour off
        bars = (score.open_time_ms - state.last_open_ms + score.tf.ms // 2) // score.tf.ms
        if bars < r.cooldown_bars:
            return False
    last_close = state.last_close_ms
    if last_close is not None and score.close_time_ms - last_close < round(r.cooldown_s * 1000):
        return False
    return not r.max_signals or len(_window(state, score.close_time_ms, r)) < r.max_signals


def decide(state: State, score: Score, rule: Rule) -> tuple[State, Signal | None]:
    """The series' state after ``score`` and the signal it gives, if any."""
    s = score.score
    side = _target(state.side, s, rule)
    entry = side is not Side.FLAT and side is not state.side
    if entry and not _entry_allowed(state, score, rule):
        # held back: from FLAT nothing happens; a reversal still leaves the side it holds,
        # whatever the exit threshold (a long exit may lie below the short entry)
        side = Side.FLAT
        entry = False
    if side is state.side:
        if rule.only_on_change or side is Side.FLAT:
            return state, None
        return state, make_signal(score, side, rule)  # a restatement
    entries = _remembered(state, score.close_time_ms, rule)
    if entry:
        entries = (*entries, score.close_time_ms)
    new = State(
        side=side,
        last_open_ms=score.open_time_ms,
        last_close_ms=score.close_time_ms,
        entries=entries,
    )
    return new, make_signal(score, side, rule)
