"""The signal policy against tables worked out by hand from its definition (thresholds,
hysteresis, cooldown, limit per period, only-on-change, expiry), policy files and updates,
and revisions that correct earlier signals."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

from contracts.messages import Score, Side, Signal, Timeframe
from workers.signal_publisher.policy import (
    Override,
    Policy,
    PolicyError,
    Rule,
    State,
    decide,
    make_signal,
    parse_policy,
    read_policy,
)
from workers.signal_publisher.state import Book, Refusal, check_score, last_words, supersedes

M = 60_000
SUBJECT = "scores.fx.EURUSD.M1"


def score(bar: int, value: float, *, revision: int = 0, close: float = 1.1) -> Score:
    return Score(
        feed="fx",
        symbol="EURUSD",
        tf=Timeframe.M1,
        open_time_ms=bar * M,
        candle_revision=revision,
        close=close,
        close_time_ms=(bar + 1) * M,
        last_tick_ms=(bar + 1) * M - 1,
        feature_set_id="fs1",
        model_version="m1",
        probabilities=[(1 - value) / 2, 0.0, (1 + value) / 2],
        score=value,
    )


def sides(rule: Rule, values: list[float]) -> list[str | None]:
    state = State()
    out: list[str | None] = []
    for bar, v in enumerate(values):
        state, signal = decide(state, score(bar, v), rule)
        out.append(None if signal is None else signal.side.value)
    return out


B, S, F, _ = "BUY", "SELL", "FLAT", None


@pytest.mark.parametrize(
    ("rule", "values", "expected"),
    [
        # entry 0.6 / exit 0.2 long, -0.6 / -0.2 short: in between nothing changes
        (
            Rule(),
            [0.5, 0.6, 0.7, 0.3, 0.2, 0.5, -0.6, -0.3, -0.2, 0.9, -0.9],
            [_, B, _, _, F, _, S, _, F, B, S],
        ),
        # three bars after any signal before an entry; the exit itself is not held back
        (Rule(cooldown_bars=3), [0.7, 0.1, 0.8, 0.8, 0.8], [B, F, _, _, B]),
        # two entries per five minutes of candle close times (closes at 1, 3 and 5 min
        # make three within 5 min; at 6 min the first has left the window)
        (
            Rule(max_signals=2, period_s=300),
            [0.7, 0.0, 0.7, 0.0, 0.7, 0.7],
            [B, F, B, F, _, B],
        ),
        # not only on change: the side is restated while held
        (Rule(only_on_change=False), [0.7, 0.65, 0.3, 0.1, 0.1], [B, B, B, F, _]),
        # two minutes since the last signal: a blocked reversal still exits
        (Rule(cooldown_s=120), [0.7, -0.7, -0.7, -0.7], [B, F, _, S]),
        # a blocked reversal exits even when the exit lies beyond the other side's entry
        (
            Rule(exit_long=-0.7, entry_short=-0.6, cooldown_bars=2),
            [0.7, -0.65, -0.65, -0.65],
            [B, F, _, S],
        ),
        (
            Rule(exit_short=0.7, entry_long=0.6, cooldown_bars=2),
            [-0.7, 0.65, 0.65, 0.65],
            [S, F, _, B],
        ),
    ],
)
def test_decisions_follow_the_hand_worked_table(
    rule: Rule, values: list[float], expected: list[str | None]
) -> None:
    assert sides(rule, values) == expected


def test_cooldown_counts_a_day_an_hour_short_or_long_as_one_bar() -> None:
    day, hour = 86_400_000, 3_600_000
    rule = Rule(cooldown_bars=1, only_on_change=False)

    def d1(open_ms: int, close_ms: int, value: float) -> Score:
        return msgspec.structs.replace(
            score(0, value), tf=Timeframe.D1, open_time_ms=open_ms, close_time_ms=close_ms,
            last_tick_ms=close_ms - 1,
        )  # fmt: skip

    state, first = decide(State(), d1(0, day - hour, 0.7), rule)
    assert first is not None
    assert first.side is Side.BUY
    # the day after one the server's clock went ahead opens 23 h later: one bar on
    state, again = decide(state, d1(day - hour, 2 * day - hour, 0.7), rule)
    assert again is not None
    assert again.side is Side.BUY
    assert check_score(d1(day - hour, 2 * day, 0.7), "scores.fx.EURUSD.D1") is None
    refusal = check_score(d1(0, 2 * day, 0.7), "scores.fx.EURUSD.D1")
    assert isinstance(refusal, Refusal)


def test_a_signal_quotes_the_candle_and_expires_after_its_close() -> None:
    _, signal = decide(State(), score(7, -0.75, close=1.25), Rule(expiry_s=90))
    assert signal is not None
    assert signal.signal_id == f"fx|EURUSD|M1|{7 * M}|m1"
    assert (signal.side, signal.strength, signal.ref_price) == (Side.SELL, 0.75, 1.25)
    assert signal.expires_ms == 8 * M + 90_000
    assert (signal.model_version, signal.feature_set_id, signal.corrects) == ("m1", "fs1", None)


def test_the_most_specific_override_wins_over_the_defaults() -> None:
    policy = Policy(
        defaults=Rule(entry_long=0.5, exit_long=0.1),
        overrides=(
            Override(feed="fx", exit_long=0.3),
            Override(feed="fx", symbol="EURUSD", tf=Timeframe.M1, entry_long=0.9),
            Override(symbol="EURUSD", entry_long=0.7),
        ),
    ).check()
    assert policy.rule("fx", "EURUSD", Timeframe.M1) == Rule(entry_long=0.9, exit_long=0.1)
    assert policy.rule("fx", "EURUSD", Timeframe.M5) == Rule(entry_long=0.5, exit_long=0.3)
    assert policy.rule("other", "EURUSD", Timeframe.M5) == Rule(entry_long=0.7, exit_long=0.1)
    assert policy.rule("other", "GBPUSD", Timeframe.H1) == Rule(entry_long=0.5, exit_long=0.1)


def test_policy_files_in_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "policy.toml"
    toml.write_text(
        "[defaults]\nentry_long = 0.7\nexpiry_s = 60.0\n\n"
        '[[overrides]]\nsymbol = "US500.cash"\ncooldown_bars = 2\n'
    )
    policy = read_policy(toml)
    assert policy.rule("fx", "US500.cash", Timeframe.M5) == Rule(
        entry_long=0.7, expiry_s=60.0, cooldown_bars=2
    )
    js = tmp_path / "policy.json"
    js.write_bytes(msgspec.json.encode(policy))
    assert read_policy(js) == policy


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b'{"defaults": {"entry_long": 0.2, "exit_long": 0.3}}', "exit_long"),
        (b'{"defaults": {"entry_short": -0.1, "exit_short": -0.5}}', "exit_short"),
        (b'{"overrides": [{"feed": "fx", "exit_long": 0.9}]}', "override 1"),
        (b'{"defaults": {"entry_long": 1.5}}', "<= 1.0"),
        (b'{"defaults": {"expiry_s": 0}}', "> 0.0"),
        (b'{"defaults": {"entry_lung": 0.5}}', "entry_lung"),
        (b'{"defaults": {"max_signals": 3, "period_s": 0}}', "period_s"),
        (b"{not json", "malformed"),
    ],
)
def test_a_bad_policy_is_refused_with_the_reason(data: bytes, says: str) -> None:
    with pytest.raises(PolicyError, match=says):
        parse_policy(data)


def test_a_missing_policy_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        read_policy(tmp_path / "none.toml")


# --- the book: checks, order, revisions ------------------------------------------------


def reason_of(result: object) -> str | None:
    return result.reason if isinstance(result, Refusal) else None


def test_bad_scores_are_refused_with_reasons() -> None:
    book = Book(Policy())
    nan = msgspec.structs.replace(score(1, 0.5), score=float("nan"))
    cases = [
        (msgspec.structs.replace(score(1, 0.5), score=1.5), "bad_score"),
        (nan, "bad_score"),
        (score(1, 0.5, close=0.0), "bad_price"),
        (score(1, 0.5, close=-2.0), "bad_price"),
    ]
    for s, reason in cases:
        assert reason_of(book.apply(s, SUBJECT)) == reason
    wrong = book.apply(score(1, 0.5), "scores.fx.GBPUSD.M1")
    assert reason_of(wrong) == "subject_mismatch"
    assert book.apply(score(5, 0.1), SUBJECT) == []
    late = book.apply(score(4, 0.9), SUBJECT)
    assert reason_of(late) == "out_of_order"
    again = book.apply(score(5, 0.9), SUBJECT)
    assert reason_of(again) == "stale_revision"


def test_a_revision_that_changes_the_decision_corrects_the_signal() -> None:
    book = Book(Policy())
    [buy] = book.apply(score(0, 0.7), SUBJECT)
    [fix] = book.apply(score(0, 0.5, revision=1), SUBJECT)
    # below the entry now: the BUY was wrong, the series stays flat
    assert (fix.side, fix.corrects, fix.candle_revision) == (Side.FLAT, buy.signal_id, 1)
    assert fix.signal_id == f"{buy.signal_id}|r1"
    [again] = book.apply(score(0, 0.8, revision=2), SUBJECT)
    assert (again.side, again.corrects) == (Side.BUY, fix.signal_id)


def test_a_correction_outlives_the_lateness_that_may_delay_it() -> None:
    """A revision may come up to the allowed lateness after its candle's close: with an
    expiry of 30 s and a lateness of 60 s a correction valid only 30 s past the close would
    reach subscribers expired. It stays valid 30 s past the latest it can come."""
    policy = Policy(defaults=Rule(expiry_s=30.0))
    book = Book(policy, lateness_ms=60_000)
    [buy] = book.apply(score(0, 0.7), SUBJECT)
    assert buy.expires_ms == M + 30_000
    [fix] = book.apply(score(0, 0.5, revision=1), SUBJECT)
    assert fix.expires_ms == M + 60_000 + 30_000
    book.apply(score(1, 0.7), SUBJECT)  # BUY again, then bar 0 revised back: BUY there,
    out = book.apply(score(0, 0.8, revision=2), SUBJECT)  # bar 1 held, said again last
    assert [(s.open_time_ms, s.expires_ms) for s in out] == [
        (0, M + 90_000),
        (M, 2 * M + 90_000),
    ]


def test_a_revision_that_keeps_the_decision_publishes_nothing() -> None:
    book = Book(Policy())
    assert [s.side for s in book.apply(score(0, 0.7), SUBJECT)] == [Side.BUY]
    assert book.apply(score(0, 0.95, revision=1), SUBJECT) == []


def test_a_candle_of_a_period_that_had_none_coming_after_the_next_is_decided_in_its_place() -> None:
    """With an allowed lateness over the timeframe, a period without ticks can get its first
    tick late: its candle (revision 0) comes after the next ones. Bars 0, 2, 3 at 0.1, 0.5,
    0.1 enter nothing. Bar 1 at 0.7, in its place, enters BUY; bar 2 at 0.5 holds it (above
    the 0.2 exit) and bar 3 at 0.1 exits: a FLAT for bar 3, which had no signal, its id
    adding the candle that caused it. Bar 1's signal is its first, and like a correction
    it stays valid the lateness longer: it comes up to that long after its close."""
    book = Book(Policy(defaults=Rule(expiry_s=30.0)), lateness_ms=120_000)
    for bar, value in ((0, 0.1), (2, 0.5), (3, 0.1)):
        assert book.apply(score(bar, value), SUBJECT) == []
    out = book.apply(score(1, 0.7), SUBJECT)
    assert not isinstance(out, Refusal), out
    assert [(s.open_time_ms, s.side, s.signal_id, s.corrects, s.expires_ms) for s in out] == [
        (M, Side.BUY, f"fx|EURUSD|M1|{M}|m1", None, 2 * M + 30_000 + 120_000),
        (3 * M, Side.FLAT, f"fx|EURUSD|M1|{3 * M}|m1|r0@{M}", None, 4 * M + 30_000 + 120_000),
    ]
    key = ("fx", "EURUSD", Timeframe.M1)
    assert [d.score.open_time_ms for d in book.series[key].recent] == [0, M, 2 * M, 3 * M]
    assert book.series[key].state.side is Side.FLAT
    assert reason_of(book.apply(score(1, 0.7), SUBJECT)) == "stale_revision"
    # a revision of it is decided again like any kept candle's: no BUY at bar 1, and no
    # exit at bar 3, whose correction now says the side the series keeps
    fixes = book.apply(score(1, 0.5, revision=1), SUBJECT)
    assert not isinstance(fixes, Refusal), fixes
    assert [(s.open_time_ms, s.side, s.signal_id, s.corrects) for s in fixes] == [
        (M, Side.FLAT, f"fx|EURUSD|M1|{M}|m1|r1@{M}", out[0].signal_id),
        (3 * M, Side.FLAT, f"fx|EURUSD|M1|{3 * M}|m1|r1@{M}", out[1].signal_id),
    ]
    [buy] = book.apply(score(4, 0.7), SUBJECT)
    assert (buy.open_time_ms, buy.side, buy.corrects) == (4 * M, Side.BUY, None)
    # the same scores again, in the same order: the same signals
    again = Book(Policy(defaults=Rule(expiry_s=30.0)), lateness_ms=120_000)
    for bar, value in ((0, 0.1), (2, 0.5), (3, 0.1)):
        again.apply(score(bar, value), SUBJECT)
    assert again.apply(score(1, 0.7), SUBJECT) == out


def test_a_late_candle_older_than_every_kept_one_is_refused() -> None:
    """Two candles kept: bars 2 and 4. Bar 1 comes late: the state before it is gone, so it
    is refused (a revision of it as too old) and nothing is published. Bar 3 is taken in
    its place, and bar 2, the oldest kept, goes: a revision of it is then too old."""
    book = Book(Policy(), depth=2)
    for bar in (0, 2, 4):
        assert book.apply(score(bar, 0.1), SUBJECT) == []
    late = book.apply(score(1, 0.7), SUBJECT)
    assert reason_of(late) == "out_of_order"
    assert isinstance(late, Refusal)
    assert f"before {2 * M}, the oldest of the 2 kept" in late.detail
    assert reason_of(book.apply(score(1, 0.7, revision=1), SUBJECT)) == "revision_too_old"
    out = book.apply(score(3, 0.7), SUBJECT)
    assert not isinstance(out, Refusal), out
    assert [(s.open_time_ms, s.side) for s in out] == [(3 * M, Side.BUY), (4 * M, Side.FLAT)]
    key = ("fx", "EURUSD", Timeframe.M1)
    assert [d.score.open_time_ms for d in book.series[key].recent] == [3 * M, 4 * M]
    assert reason_of(book.apply(score(2, 0.7, revision=1), SUBJECT)) == "revision_too_old"


@pytest.mark.parametrize("seed", range(20))
def test_a_subscriber_that_acts_on_the_latest_signal_ends_where_a_fresh_run_would(
    seed: int,
) -> None:
    """Scores and revisions of the kept candles in random order. A subscriber takes the side
    of each signal as it comes (corrections included). After every score it must hold what
    deciding the latest revision of every candle from the start gives."""
    rng = random.Random(seed)
    policy = Policy(defaults=Rule(cooldown_bars=rng.choice([0, 2]), only_on_change=True))
    book = Book(policy)
    latest: dict[int, Score] = {}
    held = Side.FLAT
    for step in range(300):
        bars = len(latest)
        if bars and rng.random() < 0.4:  # revise one of the kept candles
            old = rng.randrange(max(0, bars - 8), bars)
            s = score(old, rng.uniform(-1, 1), revision=latest[old].candle_revision + 1)
        else:
            s = score(bars, rng.uniform(-1, 1))
        latest[s.open_time_ms // M] = s
        for signal in book.apply(s, SUBJECT):
            held = signal.side
        fresh = Book(policy)
        for _, kept in sorted(latest.items()):
            fresh.apply(kept, SUBJECT)
        assert held is fresh.series["fx", "EURUSD", Timeframe.M1].state.side, f"step {step}"


def test_a_series_told_its_side_keeps_it_through_a_revision() -> None:
    """After a restart under a policy that no longer enters at 0.7, the series takes the
    BUY subscribers were told at bar 0. A revision of bar 2 that still holds must leave it
    long, and a later 0.1 exits."""
    told = Book(Policy())
    [buy] = told.apply(score(0, 0.7), SUBJECT)
    later = Book(Policy(defaults=Rule(entry_long=0.9)))
    for bar in range(4):
        later.apply(score(bar, 0.7 if bar == 0 else 0.5), SUBJECT)
    key = ("fx", "EURUSD", Timeframe.M1)
    assert later.series[key].state.side is Side.FLAT
    assert later.told(buy)
    assert not later.told(buy)  # told once: nothing to change
    assert later.series[key].state.side is Side.BUY
    assert later.apply(score(2, 0.45, revision=1), SUBJECT) == []
    assert later.series[key].state.side is Side.BUY
    # bar 0 itself was decided under the earlier policy: a revision of it is refused, not
    # decided again under this one (which would go flat without a word)
    assert reason_of(later.apply(score(0, 0.7, revision=1), SUBJECT)) == "revision_too_old"
    assert reason_of(later.apply(score(0, 0.7), SUBJECT)) == "out_of_order"
    assert later.series[key].state.side is Side.BUY
    [flat] = later.apply(score(4, 0.1), SUBJECT)
    assert (flat.side, flat.open_time_ms, flat.corrects) == (Side.FLAT, 4 * M, None)


def test_a_series_never_told_a_side_holds_none() -> None:
    """Under the default policy 0.55 and 0.4 give no signal: subscribers hold nothing. A
    restart decides them again under a policy that enters at 0.5: the series would be long
    without a word, and restate BUY at 0.3 or exit at 0.1 where a run without the restart
    says nothing. Told nothing, it holds no side from its latest candle on."""
    history = [score(0, 0.55), score(1, 0.4), score(2, 0.4)]
    key = ("fx", "EURUSD", Timeframe.M1)
    for only_on_change in (True, False):
        later = Book(Policy(defaults=Rule(entry_long=0.5, only_on_change=only_on_change)))
        for s in history:
            later.apply(s, SUBJECT)
        assert later.series[key].state.side is Side.BUY
        assert later.untold(key)
        assert not later.untold(key)  # nothing to change any more
        assert later.series[key].state.side is Side.FLAT
        assert later.apply(score(3, 0.3), SUBJECT) == []
        assert later.apply(score(4, 0.1), SUBJECT) == []
        assert reason_of(later.apply(score(2, 0.4, revision=1), SUBJECT)) == "revision_too_old"
        [buy] = later.apply(score(5, 0.7), SUBJECT)  # a new entry is taken as ever
        assert buy.side is Side.BUY
    assert not Book(Policy()).untold(key)  # a series the book does not hold


def test_the_last_word_is_the_latest_candles_not_the_last_published() -> None:
    """Signals in the order they were published; the last word on the series is the one a
    subscriber that files each under its candle ends up holding."""
    rule = Rule()
    buy0, flat2 = (
        make_signal(score(0, 0.7), Side.BUY, rule),
        make_signal(score(2, 0.1), Side.FLAT, rule),
    )
    key = ("fx", "EURUSD", Timeframe.M1)

    def fix(s: Signal, side: Side, **changes: int) -> Signal:
        return msgspec.structs.replace(s, side=side, signal_id=f"{s.signal_id}|fix", **changes)

    earlier = fix(buy0, Side.SELL, rebuild=1)  # a rebuild of a range ending before bar 2
    assert last_words([buy0, flat2, earlier])[key] is flat2
    assert last_words([earlier, flat2])[key] is flat2
    rebuilt = fix(flat2, Side.SELL, rebuild=1)
    assert last_words([buy0, flat2, rebuilt])[key] is rebuilt
    live = fix(flat2, Side.BUY)  # then the live worker corrects that candle: published last
    assert last_words([flat2, rebuilt, live])[key] is live
    revised = fix(flat2, Side.BUY, candle_revision=1)  # a later revision of the candle
    assert last_words([flat2, revised, rebuilt])[key] is revised
    other = msgspec.structs.replace(buy0, symbol="GBPUSD")
    assert last_words([flat2, other]) == {key: flat2, ("fx", "GBPUSD", Timeframe.M1): other}
    assert supersedes(flat2, rebuilt)
    assert supersedes(rebuilt, flat2)
    assert not supersedes(rebuilt, revised)
    assert not supersedes(buy0, flat2)


def test_a_series_told_its_side_keeps_its_candle_close_for_the_cooldown() -> None:
    """A D1 candle 25 h long (the server's clock went back that day): told its signal after a
    restart, the series counts the cooldown from that candle's close, as the run that
    decided it did."""
    day, hour = 86_400_000, 3_600_000

    def d1(k: int, close_ms: int, value: float) -> Score:
        return msgspec.structs.replace(
            score(0, value), tf=Timeframe.D1, open_time_ms=k * day, close_time_ms=close_ms,
            last_tick_ms=close_ms - 1,
        )  # fmt: skip

    subject = "scores.fx.EURUSD.D1"
    long_day = d1(0, day + hour, 0.7)
    told = Book(Policy())
    [buy] = told.apply(long_day, subject)
    later = Book(Policy(defaults=Rule(entry_long=0.9)))
    later.apply(long_day, subject)
    assert later.told(buy)
    key = ("fx", "EURUSD", Timeframe.D1)
    assert later.series[key].state == told.series[key].state
    assert later.series[key].state.last_close_ms == day + hour


def test_a_revision_further_back_decides_the_later_candles_again() -> None:
    """BUY at bar 0, held at bar 1, FLAT at bar 2. Bar 0 revised below the entry: no BUY
    there (FLAT correction), so bar 1 (0.7) is now the entry, and bar 2 exits as before.
    Bar 2's FLAT went out before the corrections, so it is said again last: a subscriber
    that acts on the latest signal it got must end flat, as the series is."""
    book = Book(Policy())
    [buy] = book.apply(score(0, 0.7), SUBJECT)
    assert book.apply(score(1, 0.7), SUBJECT) == []
    [flat] = book.apply(score(2, 0.1), SUBJECT)
    out = book.apply(score(0, 0.5, revision=1), SUBJECT)
    assert [(s.open_time_ms, s.side, s.corrects) for s in out] == [
        (0, Side.FLAT, buy.signal_id),
        (M, Side.BUY, None),
        (2 * M, Side.FLAT, flat.signal_id),
    ]
    assert out[1].signal_id == f"fx|EURUSD|M1|{M}|m1|r1@0"
    assert out[2].signal_id == f"fx|EURUSD|M1|{2 * M}|m1|r1@0"
    assert book.series["fx", "EURUSD", Timeframe.M1].state.side is Side.FLAT
    # revised again the same way: nothing changes, nothing goes out
    assert book.apply(score(0, 0.5, revision=2), SUBJECT) == []
    too_old = Book(Policy(), depth=2)
    for bar in range(4):
        too_old.apply(score(bar, 0.0), SUBJECT)
    result = too_old.apply(score(0, 0.9, revision=1), SUBJECT)
    assert reason_of(result) == "revision_too_old"


def test_a_limit_put_in_at_run_time_counts_the_entries_already_made() -> None:
    """max_signals is entries per period_s, whichever policy was in force when they were
    made: a limit put in, or a period widened, while running counts the recent ones."""
    for before in (Rule(), Rule(max_signals=1, period_s=60.0)):
        book = Book(Policy(defaults=before), depth=8)
        assert [s.side for s in book.apply(score(0, 0.7), SUBJECT)] == [Side.BUY]
        assert [s.side for s in book.apply(score(2, 0.0), SUBJECT)] == [Side.FLAT]
        book.policy = Policy(defaults=Rule(max_signals=1, period_s=3600.0))
        assert book.apply(score(3, 0.7), SUBJECT) == []  # the second entry in the hour
        assert [s.side for s in book.apply(score(61, 0.7), SUBJECT)] == [Side.BUY]  # the next


def test_a_revision_is_decided_under_the_rule_its_candle_was_decided_under() -> None:
    """A late tick that moves only the price, after the entry threshold was raised: the
    score is the same, so is the decision, and nothing is published."""
    book = Book(Policy(defaults=Rule(entry_long=0.6)), depth=8, lateness_ms=60_000)
    assert [s.side for s in book.apply(score(0, 0.65), SUBJECT)] == [Side.BUY]
    book.policy = Policy(defaults=Rule(entry_long=0.7))
    assert book.apply(score(1, 0.3), SUBJECT) == []  # held: above the exit
    assert book.apply(score(0, 0.65, revision=1, close=1.1001), SUBJECT) == []
    # a revision that does change the score is decided under that same rule: below 0.6 now
    fix = book.apply(score(0, 0.55, revision=2), SUBJECT)
    assert isinstance(fix, list)
    assert [(s.side, s.corrects) for s in fix] == [(Side.FLAT, "fx|EURUSD|M1|0|m1")]
