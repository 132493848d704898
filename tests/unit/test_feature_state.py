"""feature-builder's pure state: new candles, revisions within the depth, refusals."""

from __future__ import annotations

import re

import msgspec
import numpy as np
import pytest

from contracts import subjects
from contracts.messages import Candle, FeatureVector, Timeframe
from tests.candles import series
from workers.feature_builder import state
from workers.feature_builder.state import Builder, Refusal
from workers.features import DEFAULT, Candles, FeatureSet

SUBJECT = subjects.candles("feed-a", "EURUSD", series(1)[0].tf)


def batch_row(candles: list[Candle], i: int) -> np.ndarray:
    return DEFAULT.batch(Candles.from_bars(candles))[i]


def vector(result: FeatureVector | Refusal) -> FeatureVector:
    assert isinstance(result, FeatureVector), result
    return result


def test_warm_up_flag_and_zeros_until_every_feature_has_history() -> None:
    b = Builder(DEFAULT, depth=4)
    candles = series(40, seed=2)
    out = [vector(b.apply(c, SUBJECT)) for c in candles]
    assert [v.warming_up for v in out] == [i + 1 < DEFAULT.warmup for i in range(40)]
    assert out[0].values[DEFAULT.names.index("ret_1")] == 0.0
    assert out[0].values[DEFAULT.names.index("range_hl")] > 0.0  # warm from the first candle
    want = batch_row(candles, 39)
    np.testing.assert_allclose(out[39].values, want, rtol=1e-9, atol=1e-12)
    assert out[39].feature_set_id == DEFAULT.id


@pytest.mark.parametrize("back", [0, 1, 3])  # depth 4: the latest 4 candles can be revised
def test_a_revision_within_the_depth_recomputes_it_and_everything_after(back: int) -> None:
    b = Builder(DEFAULT, depth=4)
    candles = series(100, seed=3)
    for c in candles[:90]:
        vector(b.apply(c, SUBJECT))
    i = 89 - back
    rev = msgspec.structs.replace(candles[i], close=candles[i].low, revision=1)
    got = vector(b.apply(rev, SUBJECT))
    fixed = [*candles[:i], rev, *candles[i + 1 :]]
    assert (got.open_time_ms, got.candle_revision) == (rev.open_time_ms, 1)
    np.testing.assert_allclose(got.values, batch_row(fixed, i), rtol=1e-9, atol=1e-12)
    nxt = vector(b.apply(candles[90], SUBJECT))  # the state goes on from the revised history
    np.testing.assert_allclose(nxt.values, batch_row(fixed, 90), rtol=1e-9, atol=1e-12)
    assert b.revisions == 1


def test_a_revision_older_than_the_depth_is_refused_however_long_the_history() -> None:
    """Depth 4: the latest 4 candles may be revised, whatever the series' length (the kept
    candles number 4 to 7 depending on it). A restart whose history starts elsewhere must
    take and refuse the same revisions as the run it replaces."""
    candles = series(40, seed=5)
    for n in range(30, 38):  # every point of the keeping cycle
        b = Builder(DEFAULT, depth=4)
        for c in candles[:n]:
            vector(b.apply(c, SUBJECT))
        for back in range(7):
            rev = msgspec.structs.replace(candles[n - 1 - back], revision=1)
            result = b.apply(rev, SUBJECT)
            if back < 4:
                assert vector(result).candle_revision == 1, (n, back)
            else:
                assert isinstance(result, Refusal), (n, back)
                assert result.reason == state.REVISION_TOO_OLD, (n, back)


def test_a_price_next_to_nothing_is_refused_and_the_series_goes_on() -> None:
    """A candle at 5e-324 (positive and finite: valid) after closes near 2.5: its return
    over the candle before underflows. It and the next candle get vectors that are not
    finite, refused as ``non_finite_feature``, never an error (which would stop every
    restart's warm-up too); the candles after equal the batch form over the same history."""
    candles = series(80, seed=6, price=2.5)
    tiny = 5e-324
    candles[50] = msgspec.structs.replace(candles[50], open=tiny, high=tiny, low=tiny, close=tiny)
    b = Builder(DEFAULT, depth=4)
    got = [b.apply(c, SUBJECT) for c in candles]
    refused = [i for i, r in enumerate(got) if isinstance(r, Refusal)]
    assert refused[:2] == [50, 51]
    assert all(got[i].reason == state.NON_FINITE for i in refused)  # type: ignore[union-attr]
    with np.errstate(invalid="ignore"):  # the windows over both infinities
        want = batch_row(candles, 79)
    np.testing.assert_allclose(vector(got[79]).values, want, rtol=1e-9)


def test_a_warming_vector_is_never_sent_with_an_infinite_value() -> None:
    """JSON has no inf: a vector holding one would go out as null and every consumer would
    refuse it. While warming up, not-yet-warm features are 0; an infinite one is refused."""
    b = Builder(DEFAULT, depth=4)
    first, second = series(2, seed=7)
    low, high = 1e-300, 1e300
    vector(b.apply(msgspec.structs.replace(first, open=low, high=low, low=low, close=low), SUBJECT))
    result = b.apply(
        msgspec.structs.replace(second, open=high, high=high, low=high, close=high), SUBJECT
    )
    assert isinstance(result, Refusal)
    assert result.reason == state.NON_FINITE


def test_refusals() -> None:
    b = Builder(DEFAULT, depth=4)
    candles = series(50, seed=4)
    for c in candles[:40]:
        vector(b.apply(c, SUBJECT))
    too_old = msgspec.structs.replace(candles[5], revision=1)
    cases = {
        state.REVISION_TOO_OLD: too_old,
        state.OUT_OF_ORDER: candles[5],
        state.STALE_REVISION: candles[39],
        state.HIGH_BELOW_LOW: msgspec.structs.replace(candles[40], high=0.5, low=0.6),
        state.PRICE_OUTSIDE_RANGE: msgspec.structs.replace(candles[40], open=candles[40].high * 2),
        state.BAD_PRICE: msgspec.structs.replace(candles[40], low=0.0),
        state.BAD_PERIOD: msgspec.structs.replace(candles[40], close_time_ms=1),
        state.SUBJECT_MISMATCH: msgspec.structs.replace(candles[40], feed="feed-b"),
    }
    for reason, c in cases.items():
        result = b.apply(c, SUBJECT)
        assert isinstance(result, Refusal), reason
        assert result.reason == reason
    # none of them touched the state
    got = vector(b.apply(candles[40], SUBJECT))
    np.testing.assert_allclose(got.values, batch_row(candles, 40), rtol=1e-9, atol=1e-12)


def test_a_d1_candle_over_a_change_of_the_server_clock_is_an_hour_off_and_taken() -> None:
    b = Builder(DEFAULT, depth=4)
    day = 86_400_000
    subject = "candles.feed-a.EURUSD.D1"
    days = [
        msgspec.structs.replace(
            c,
            tf=Timeframe.D1,
            open_time_ms=k * day,
            close_time_ms=(k + 1) * day,
            first_tick_ms=k * day,
            last_tick_ms=k * day + 1,
        )
        for k, c in enumerate(series(3, seed=2))
    ]
    short = msgspec.structs.replace(days[1], close_time_ms=2 * day - 3_600_000)
    vector(b.apply(days[0], subject))
    vector(b.apply(short, subject))  # 23 h: the clock went an hour ahead that day
    long = msgspec.structs.replace(days[2], close_time_ms=4 * day - 3_600_000 * 2)
    refused = b.apply(long, subject)  # 46 h is no day
    assert isinstance(refused, Refusal)
    assert refused.reason == state.BAD_PERIOD


def test_message_id_is_the_candle_key_revision_and_feature_set() -> None:
    v = vector(Builder(DEFAULT).apply(series(1)[0], SUBJECT))
    assert state.message_id(v) == f"feed-a|EURUSD|M1|{v.open_time_ms}|0|{DEFAULT.id}"


def test_a_restored_snapshot_goes_on_as_the_builder_it_was_taken_of() -> None:
    """Revisions after the restore included: the recent candles and the engines to go back
    to are in the snapshot too."""
    candles = series(120, seed=5)
    b = Builder(DEFAULT, depth=4)
    for c in candles[:100]:
        b.apply(c, SUBJECT)
    data = b.snapshot(100, {"stream": "CANDLES"})
    again, seq = Builder.restore(DEFAULT, 4, data, {"stream": "CANDLES"})
    assert seq == 100
    later = [
        *candles[100:110],
        msgspec.structs.replace(candles[107], close=candles[107].low, revision=1),
        *candles[110:],
    ]
    enc = msgspec.json.encode
    assert [enc(again.apply(c, SUBJECT)) for c in later] == [
        enc(b.apply(c, SUBJECT)) for c in later
    ]


def test_a_snapshot_pickled_while_candles_go_on_holds_the_state_when_it_began() -> None:
    """Series pickled a few at a time while candles keep coming: new ones, a revision, a
    candle of a period the series had none of, a series that did not exist when it began.
    Restored, it goes on exactly as a builder that stopped where the snapshot began."""
    symbols = [f"S{i:02d}" for i in range(12)]
    runs = {s: series(90, seed=i, symbol=s) for i, s in enumerate(symbols)}
    subject = {s: subjects.candles("feed-a", s, runs[s][0].tf) for s in symbols}
    b, stopped = Builder(DEFAULT, depth=4), Builder(DEFAULT, depth=4)
    first = [(s, c) for k in range(60) for s in symbols for c in (runs[s][k],)]
    for s, c in first:
        b.apply(c, subject[s])
        stopped.apply(c, subject[s])
    taking = b.begin_snapshot(len(first), {})
    meanwhile = [
        (symbols[11], runs[symbols[11]][60]),
        (symbols[5], msgspec.structs.replace(runs[symbols[5]][58], close=runs[symbols[5]][58].low,
                                             revision=1)),
        (symbols[7], runs[symbols[7]][61]),  # leaves a period without a candle
        (symbols[7], runs[symbols[7]][60]),  # which comes after the next one
        ("NEW", series(3, seed=99, symbol="NEW")[0]),
    ]  # fmt: skip
    done = False
    for s, c in meanwhile:
        done = taking.step(1)  # in order from S00: the series that change come later
        b.apply(c, subjects.candles("feed-a", s, c.tf))
    assert not done, "some series were still to be pickled when they changed"
    data = taking.data()
    b.end_snapshot()
    again, seq = Builder.restore(DEFAULT, 4, data, {})
    assert seq == len(first)
    assert set(again.series) == set(stopped.series)
    after = [(s, c) for k in range(60, 90) for s in symbols for c in (runs[s][k],)]
    enc = msgspec.json.encode
    assert [enc(again.apply(c, subject[s])) for s, c in after] == [
        enc(stopped.apply(c, subject[s])) for s, c in after
    ]


@pytest.mark.parametrize(
    ("fs", "depth", "context", "says"),
    [
        (
            FeatureSet(DEFAULT.features[:2]),
            4,
            {"stream": "CANDLES"},
            "feature set 'fs-",
        ),
        (DEFAULT, 8, {"stream": "CANDLES"}, "revision depth 4, not 8"),
        (DEFAULT, 4, {"stream": "NS_x_CANDLES"}, "stream 'CANDLES', not 'NS_x_CANDLES'"),
        (DEFAULT, 4, {}, "stream 'CANDLES', not none"),
    ],
)
def test_a_snapshot_taken_under_anything_else_is_refused(
    fs: FeatureSet, depth: int, context: dict[str, str], says: str
) -> None:
    b = Builder(DEFAULT, depth=4)
    b.apply(series(1)[0], SUBJECT)
    with pytest.raises(state.SnapshotMismatch, match=re.escape(says)):
        Builder.restore(fs, depth, b.snapshot(1, {"stream": "CANDLES"}), context)


def test_what_is_not_a_snapshot_is_refused() -> None:
    with pytest.raises(state.SnapshotMismatch, match="not a feature-builder snapshot"):
        Builder.restore(DEFAULT, 4, b"\x00\x00\x00\x02{}garbage", {})
    good = Builder(DEFAULT, depth=4).snapshot(0, {})
    with pytest.raises(state.SnapshotMismatch, match="series not readable"):
        Builder.restore(DEFAULT, 4, good[:-3], {})
