"""feature-builder's pure state: new candles, revisions within the depth, refusals."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from contracts import subjects
from contracts.messages import Candle, FeatureVector, Timeframe
from tests.candles import series
from workers.feature_builder import state
from workers.feature_builder.state import Builder, Refusal
from workers.features import DEFAULT, Candles

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


@pytest.mark.parametrize("back", [0, 1, 3])  # depth 4: at least 4 candles can be revised
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
