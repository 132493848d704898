"""Randomized properties of ``workers.rebuild.plan`` (signals stage, effective scores,
``Stored``), checked against an independent reference of the documented contract.

Reference ("subscriber"): files each signal under its candle (feed, symbol, tf, open
time); of one candle it keeps the latest revision, of equals the one published last
(``state.last_words`` docstring); the side it holds after a candle is the
side of the signal filed under the latest candle at or before it (FLAT when none).

Contract (plan.py / README "Rebuild in place"): after the rebuild's signals the subscriber
holds, after every candle of the range, what a fresh run of the policy over the effective
scores (latest revision of each candle, rebuilt ones in the range) gives; a correction
names the signal it replaces; it is the key's next rebuild generation with Msg-Id
``<signal id>|rebuild-<n>``; planning again over the streams with the output publishes
nothing.

Modes: signals the live signal-publisher made under an older policy (``book``), arbitrary
signals in force (``arbitrary``), a second rebuild under another policy (``gens``), the live
worker correcting candles after a rebuild (``live-after``), and SCORES no longer holding the
oldest scores whose signals SIGNALS still keeps (``retention``). Seeded loops over
``random.Random``; env ``TICKWIRE_PROP_SEEDS`` sets how many.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable

import msgspec
import pytest

from contracts import subjects
from contracts.messages import Candle, Score, Side, Signal, Timeframe
from workers.rebuild import plan
from workers.signal_publisher.policy import Policy, Rule, State, decide
from workers.signal_publisher.state import Book

SEEDS = int(os.environ.get("TICKWIRE_PROP_SEEDS", "400"))
FLAT, BUY, SELL = Side.FLAT, Side.BUY, Side.SELL
T0 = 1_717_200_000_000  # 2024-06-01 00:00 UTC, a Saturday: M1/M5 fine
SERIES = (
    ("fx", "EURUSD", Timeframe.M1),
    ("fx", "US500.cash", Timeframe.M5),
    ("b2", "EURUSD", Timeframe.M1),
)
CandleKey = tuple[str, str, Timeframe, int]


# --- building blocks -------------------------------------------------------------------


def score(series, i: int, rev: int, value: float, model: str = "m1", rebuild: int = 0) -> Score:
    feed, symbol, tf = series
    open_ms = T0 + i * tf.ms
    return Score(
        feed=feed,
        symbol=symbol,
        tf=tf,
        open_time_ms=open_ms,
        candle_revision=rev,
        close=1.0 + i / 100 + rev / 1000,
        close_time_ms=open_ms + tf.ms,
        last_tick_ms=open_ms + tf.ms - 1,
        feature_set_id="fs1",
        model_version=model,
        probabilities=[max(0.0, -value), 1 - abs(value), max(0.0, value)],
        score=value,
        rebuild=rebuild,
    )


def subject_of(s: Score) -> str:
    return subjects.scores(s.feed, s.symbol, s.tf)


def random_rule(rng: random.Random) -> Rule:
    entry_long = rng.choice([0.3, 0.5, 0.6])
    exit_long = entry_long - rng.choice([0.2, 0.4, 0.6])
    entry_short = -rng.choice([0.3, 0.5, 0.6])
    exit_short = entry_short + rng.choice([0.2, 0.4, 0.6])
    return Rule(
        entry_long=entry_long,
        exit_long=exit_long,
        entry_short=entry_short,
        exit_short=exit_short,
        cooldown_bars=rng.choice([0, 0, 1, 2, 3]),
        cooldown_s=rng.choice([0.0, 0.0, 60.0, 300.0]),
        max_signals=rng.choice([0, 0, 1, 2]),
        period_s=rng.choice([600.0, 3600.0]),
        only_on_change=rng.random() < 0.7,
    ).check()


def random_policy(rng: random.Random) -> Policy:
    return Policy(defaults=random_rule(rng)).check()


def value(rng: random.Random) -> float:
    return rng.choice([-0.9, -0.7, -0.5, -0.3, -0.1, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9])


def ckey(m) -> CandleKey:
    return (m.feed, m.symbol, m.tf, m.open_time_ms)


# --- the independent reference ------------------------------------------------------------


class Subscriber:
    """Files each signal under its candle; the latest revision wins, of equals the later one."""

    def __init__(self) -> None:
        self.filed: dict[CandleKey, Signal] = {}

    def take(self, signals: Iterable[Signal]) -> None:
        for s in signals:
            k = ckey(s)
            held = self.filed.get(k)
            if held is None or s.candle_revision >= held.candle_revision:
                self.filed[k] = s

    def side_after(self, series, open_ms: int) -> Side:
        best = None
        for k, _s in self.filed.items():
            if k[:3] == series and k[3] <= open_ms and (best is None or k[3] > best[3]):
                best = k
        return FLAT if best is None else self.filed[best].side


def ref_effective(stream: list[tuple[str, Score]], rebuilt: dict[CandleKey, Score]):
    """Per series, in candle order, the score decided on for each candle."""
    chosen: dict[CandleKey, Score] = {}
    for _, s in stream:  # all scores here are valid
        held = chosen.get(ckey(s))
        if held is None or s.candle_revision >= held.candle_revision:
            chosen[ckey(s)] = s
    chosen.update(rebuilt)
    out: dict[tuple, list[Score]] = {}
    for k in sorted(chosen, key=lambda k: (k[0], k[1], k[2].ms, k[3])):
        out.setdefault(k[:3], []).append(chosen[k])
    return out


def fresh_sides(chain: list[Score], rule: Rule) -> dict[int, Side]:
    state = State()
    out = {}
    for s in chain:
        state, _ = decide(state, s, rule)
        out[s.open_time_ms] = state.side
    return out


def in_force_of(signals: Iterable[Signal]) -> plan.Stored:
    st: plan.Stored = plan.Stored()
    for s in signals:
        st.add(ckey(s), s, s.candle_revision)
    return st


# --- scenario ------------------------------------------------------------------------------


class Scenario:
    """Scores in stream order (several revisions per candle, some arriving late), and the
    signals the live signal-publisher (``Book``, under an older policy) made of them."""

    def __init__(self, rng: random.Random, mode: str) -> None:
        self.rng = rng
        self.mode = mode
        self.series = rng.sample(SERIES, rng.randint(1, len(SERIES)))
        self.n = {s: rng.randint(3, 14) for s in self.series}
        self.stream: list[tuple[str, Score]] = []
        revs: dict[tuple, int] = {}
        pending = []
        for s in self.series:
            for i in range(self.n[s]):
                pending.append((i, s))
        pending.sort(key=lambda x: (x[0], SERIES.index(x[1])))
        late: list[tuple[int, tuple]] = []
        for i, s in pending:
            sc = score(s, i, 0, value(rng))
            self.stream.append((subject_of(sc), sc))
            revs[(s, i)] = 0
            if rng.random() < 0.35:
                late.append((i, s))
            # revisions of recent candles arrive now and then
            while late and rng.random() < 0.5:
                j, t = late.pop(rng.randrange(len(late)))
                if i - j > 5:  # beyond the live depth used below: dropped
                    continue
                revs[(t, j)] += 1
                sc = score(t, j, revs[(t, j)], value(rng))
                self.stream.append((subject_of(sc), sc))
        self.revs = revs
        self.old_policy = random_policy(rng)
        self.policy = random_policy(rng) if rng.random() < 0.7 else self.old_policy
        self.signals: list[Signal] = []
        if mode == "arbitrary":
            self._arbitrary_signals()
        else:
            book = Book(self.old_policy, depth=8)
            for subj, sc in self.stream:
                out = book.apply(sc, subj)
                if isinstance(out, list):
                    self.signals.extend(out)
        if mode == "retention":
            # SCORES keeps 14 days, SIGNALS 30: the oldest scores are gone, their signals not
            cut = rng.randint(1, 4)
            self.stream = [
                (j, x) for j, x in self.stream if (x.open_time_ms - T0) // x.tf.ms >= cut
            ]
            self.revs = {k: v for k, v in self.revs.items() if k[1] >= cut}

    def _arbitrary_signals(self) -> None:
        from workers.signal_publisher.policy import make_signal

        rng = self.rng
        for _subj, sc in self.stream:
            if rng.random() < 0.4:
                side = rng.choice([FLAT, BUY, SELL])
                self.signals.append(make_signal(sc, side, self.old_policy.defaults))

    def request(self) -> plan.Request:
        rng = self.rng
        top = max(self.n.values())
        tf = rng.choice(self.series)[2]
        a = rng.randint(0, top)
        start = T0 + a * tf.ms
        end = None
        if rng.random() < 0.6:
            end = start + rng.randint(1, top + 1) * tf.ms
        feed = None
        symbols: frozenset[str] = frozenset()
        if rng.random() < 0.3:
            feed = rng.choice(self.series)[0]
        if rng.random() < 0.3:
            symbols = frozenset({rng.choice(self.series)[1]})
        return plan.Request(start, end, (plan.SIGNALS,), feed, symbols)

    def rebuilt(self, req: plan.Request) -> dict[CandleKey, Score]:
        """Rebuilt scores for some candles of the range (as the scores stage makes them)."""
        out = {}
        if self.rng.random() < 0.5:
            return out
        for (s, i), rev in self.revs.items():
            sc = score(s, i, rev, value(self.rng), model="m2")
            if req.covers(sc.open_time_ms) and self.rng.random() < 0.85:
                out[ckey(sc)] = sc
        return out


def check_outcome(
    tag: str,
    sc: Scenario,
    req: plan.Request,
    policy: Policy,
    stream,
    rebuilt,
    before: list[Signal],
    result: plan.Result,
) -> list[str]:
    problems = []
    chains = ref_effective(stream, rebuilt)
    sub = Subscriber()
    sub.take(before)
    filed_before = dict(sub.filed)
    gen_before: dict[CandleKey, int] = {}
    for s in before:
        gen_before[ckey(s)] = max(gen_before.get(ckey(s), 0), s.rebuild)
    for o in result.publish:
        m = o.message
        k = ckey(m)
        want_gen = gen_before.get(k, 0) + 1
        if m.rebuild != want_gen:
            problems.append(f"{tag}: {m.signal_id} rebuild {m.rebuild}, want {want_gen}")
        if not o.msg_id.endswith(f"|rebuild-{m.rebuild}") or o.msg_id != m.signal_id:
            problems.append(f"{tag}: msg id {o.msg_id} / signal id {m.signal_id}")
        was = filed_before.get(k)
        if m.corrects != (None if was is None else was.signal_id):
            problems.append(
                f"{tag}: {m.signal_id} corrects {m.corrects}, subscriber held"
                f" {None if was is None else was.signal_id}"
            )
        if not req.covers(m.open_time_ms) or not req.wants(m.feed, m.symbol):
            problems.append(f"{tag}: {m.signal_id} outside the range or the series asked for")
    sub.take(o.message for o in result.publish)
    for series, chain in chains.items():
        if not req.wants(series[0], series[1]):
            continue
        want = fresh_sides(chain, policy.rule(*series))
        for s in chain:
            if not req.covers(s.open_time_ms):
                continue
            got = sub.side_after(series, s.open_time_ms)
            if got is not want[s.open_time_ms]:
                problems.append(
                    f"{tag}: {series[0]} {series[1]} {series[2].value} candle"
                    f" {(s.open_time_ms - T0) // series[2].ms}: subscriber holds {got.value},"
                    f" policy {want[s.open_time_ms].value}"
                )
    return problems


def run_seed(seed: int, mode: str = "book") -> list[str]:
    rng = random.Random(seed)
    sc = Scenario(rng, mode)
    req = sc.request()
    rebuilt = sc.rebuilt(req)
    chains = plan.effective_scores(sc.stream, rebuilt)
    ref = ref_effective(sc.stream, rebuilt)
    problems = []
    if {k: [msgspec.json.encode(x) for x in v] for k, v in chains.items()} != {
        k: [msgspec.json.encode(x) for x in v] for k, v in ref.items()
    }:
        problems.append(f"seed {seed}: effective_scores differs from the reference")
    before = list(sc.signals)
    r1 = plan.signals(chains, in_force_of(before), req, sc.policy)
    problems += check_outcome(
        f"seed {seed} gen1", sc, req, sc.policy, sc.stream, rebuilt, before, r1
    )
    after1 = before + [o.message for o in r1.publish]
    # idempotence: the same rebuild again publishes nothing
    r1b = plan.signals(chains, in_force_of(after1), req, sc.policy)
    if r1b.publish:
        problems.append(
            f"seed {seed} again: publishes {len(r1b.publish)}: "
            + ", ".join(o.message.signal_id for o in r1b.publish[:3])
        )
    if mode == "gens" or mode == "live-after":
        # generation n+1: another policy (and maybe live corrections in between)
        signals2 = list(after1)
        stream2 = list(sc.stream)
        if mode == "live-after":
            # the live signal-publisher goes on (it acks rebuilt signals without effect):
            # new revisions of recent candles, decided by its own book
            book = Book(sc.policy, depth=8)
            for subj, s in sc.stream:
                book.apply(s, subj)
            for _ in range(rng.randint(1, 4)):
                (t, j) = rng.choice(list(sc.revs))
                if j < sc.n[t] - 6:
                    continue
                sc.revs[(t, j)] += 1
                s = score(t, j, sc.revs[(t, j)], value(rng))
                stream2.append((subject_of(s), s))
                out = book.apply(s, subject_of(s))
                if isinstance(out, list):
                    signals2.extend(out)
        policy2 = random_policy(rng)
        rebuilt2 = dict(rebuilt.items())
        if mode == "live-after":
            rebuilt2 = {}  # signals only
        chains2 = plan.effective_scores(stream2, rebuilt2)
        r2 = plan.signals(chains2, in_force_of(signals2), req, policy2)
        problems += check_outcome(
            f"seed {seed} gen2", sc, req, policy2, stream2, rebuilt2, signals2, r2
        )
        r2b = plan.signals(
            chains2, in_force_of(signals2 + [o.message for o in r2.publish]), req, policy2
        )
        if r2b.publish:
            problems.append(f"seed {seed} gen2 again: publishes {len(r2b.publish)}")
    return problems


@pytest.mark.parametrize("mode", ["book", "arbitrary", "gens", "live-after", "retention"])
def test_signals_plan_against_subscriber_reference(mode: str) -> None:
    failures = []
    for seed in range(SEEDS):
        failures += run_seed(seed, mode)
    assert not failures, "\n".join(failures[:20])


def test_a_held_signal_of_a_later_revision_than_the_score_is_left_to_the_live_worker() -> None:
    """Scores are read up to what signal-publisher acked, and it publishes a signal before
    it acks the score: SIGNALS may hold revision 1's BUY while revision 0 is the latest
    score read. A correction at revision 0 would never be in force, and go out again on
    every run."""
    from workers.signal_publisher.policy import make_signal

    series = SERIES[0]
    pol = Policy()
    req = plan.Request(T0, None, (plan.SIGNALS,))
    s0 = score(series, 0, 0, 0.0)  # rev 0: FLAT, no signal
    held = make_signal(score(series, 0, 1, 0.9), BUY, pol.defaults)  # rev 1's BUY, in force
    chains = plan.effective_scores([(subject_of(s0), s0)], {})
    r1 = plan.signals(chains, in_force_of([held]), req, pol)
    assert r1.publish == []
    assert r1.unchanged == 1


def test_a_series_not_held_whole_is_left_out_of_features_and_the_others_go_on() -> None:
    """A series whose first candles the stream no longer holds would be warmed from fewer
    candles than feature-builder's state was: nothing of it is computed or published, and
    the other series come out as they do without it."""
    from tests.candles import series as candles_of
    from workers.features import DEFAULT

    kept = candles_of(60, seed=3, feed="fx", symbol="EURUSD")
    short = candles_of(60, seed=4, feed="fx", symbol="GBPUSD")
    both = sorted([*kept, *short], key=lambda c: (c.open_time_ms, c.symbol))
    req = plan.Request(kept[40].open_time_ms, None, (plan.FEATURES,))

    def of(cs: Iterable[Candle]) -> list[tuple[str, Candle]]:
        return [(subjects.candles(c.feed, c.symbol, c.tf), c) for c in cs]

    got = plan.features(of(both), plan.Stored(), req, DEFAULT, 8, lambda s: s[1] != "GBPUSD")
    alone = plan.features(of(kept), plan.Stored(), req, DEFAULT, 8, lambda _: True)
    assert got.left_out == [("fx", "GBPUSD", Timeframe.M1)]
    assert got.publish == alone.publish
    assert [o.message.symbol for o in got.publish] == ["EURUSD"] * 20
    assert alone.left_out == []
