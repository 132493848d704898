"""The trainer's pure parts on a deterministic synthetic market, against independent
computations written here (pandas for labels, pairwise counting for AUC)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pandas as pd
import pytest

from tests.trainer_market import market
from tests.unit.test_features import PeekNext
from workers.features import DEFAULT, Candles, FeatureSet
from workers.trainer import dataset, evaluate, labels, split
from workers.trainer.train import Params, train

H = 3
PARAMS = Params(folds=4, rounds=100)


@pytest.fixture(scope="module")
def patterned() -> dataset.Dataset:
    return dataset.build(market(3000, seed=1, pattern=True), DEFAULT, H)


def test_labels_match_pandas() -> None:
    c = market(500, seed=3)
    spread = c.spread_mean * np.linspace(0.5, 40, len(c))  # a spread that makes FLATs
    df = pd.DataFrame({"close": c.close, "spread": spread})
    future = df["close"].shift(-H)
    up = (future - df["close"] - df["spread"]) / df["close"]
    down = (df["close"] - future - df["spread"]) / df["close"]
    expected = np.select([up > 0, down > 0], [1.0, -1.0], 0.0)
    expected[future.isna().to_numpy()] = np.nan

    got = labels.classes(c.close, spread, H)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[-H:]).all()
    assert np.isfinite(got[:-H]).all()
    assert {-1.0, 0.0, 1.0} <= set(got[:-H])
    np.testing.assert_allclose(labels.long_net_return(c.close, spread, H)[:-H], up[:-H], rtol=1e-12)


def test_dataset_drops_warmup_and_unlabelled_candles(patterned: dataset.Dataset) -> None:
    c = market(3000, seed=1, pattern=True)
    assert len(patterned) == len(c) - (DEFAULT.warmup - 1) - H
    assert patterned.open_time_ms[0] == c.open_time_ms[DEFAULT.warmup - 1]
    assert patterned.open_time_ms[-1] == c.open_time_ms[-H - 1]
    assert np.isfinite(patterned.features).all()


def test_a_window_after_its_warm_up_has_the_values_feature_builder_serves() -> None:
    """feature-builder streams a series from its first candle; a training window starts
    later. Its rows must hold the streamed values: with the candles read before it they do,
    from its first row on; starting cold at the window they do not."""
    c = market(3000, seed=4)
    served = DEFAULT.engine().run([c.row(i) for i in range(len(c))])
    at = 2000
    from_ms = int(c.open_time_ms[at])

    def cut(first: int) -> Candles:
        return Candles(**{f: getattr(c, f)[first:] for f in Candles.__dataclass_fields__})

    ds = dataset.build(cut(at - dataset.WARM_UP_CANDLES), DEFAULT, H, from_ms=from_ms)
    assert ds.open_time_ms[0] == from_ms
    rows = slice(at, at + len(ds))
    assert np.allclose(ds.features, served[rows], rtol=1e-9, atol=1e-12)
    cold = dataset.build(cut(at), DEFAULT, H, from_ms=from_ms)
    first = at + DEFAULT.warmup - 1  # a cold start has no values before its warm-up
    assert not np.allclose(cold.features, served[first : first + len(cold)], rtol=1e-9)


@pytest.mark.parametrize(("n", "folds", "horizon"), [(3000, 4, 3), (1000, 2, 12), (5000, 6, 1)])
def test_no_training_label_window_overlaps_its_test_fold(n: int, folds: int, horizon: int) -> None:
    out = split.walk_forward(n, folds=folds, horizon=horizon)
    assert len(out) == folds
    assert out[-1].test[-1] == n - 1  # the last fold is the latest holdout
    for a, b in itertools.pairwise(out):
        assert a.test[-1] + 1 == b.test[0]
    for f in out:
        test = set(range(int(f.test[0]), int(f.test[-1]) + 1))
        valid = set(f.valid.tolist())
        for i in f.fit.tolist():  # label of row i reads candles i .. i + horizon
            assert not test & set(range(i, i + horizon + 1))
            assert not valid & set(range(i, i + horizon + 1))
        for i in f.valid.tolist():
            assert not test & set(range(i, i + horizon + 1))
        assert f.fit[-1] + horizon + 1 == f.valid[0]  # no more rows purged than needed
        assert f.valid[-1] + horizon + 1 == f.test[0]


def test_too_few_rows_for_the_folds_is_refused() -> None:
    with pytest.raises(split.SplitError, match="too few"):
        split.walk_forward(300, folds=4, horizon=3)


def pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def test_auc_and_logloss_match_independent_computations() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 700).astype(np.int64)
    p = np.round(rng.uniform(0, 1, 700) * 0.6 + 0.3 * y, 2)  # rounded: many ties
    assert evaluate.auc(y, p) == pytest.approx(pairwise_auc(y, p), abs=1e-12)
    expected = -np.mean([np.log(q) if t else np.log(1 - q) for t, q in zip(y, p, strict=True)])
    assert evaluate.logloss(y, p) == pytest.approx(expected, rel=1e-12)


def test_backtest_matches_a_trade_by_trade_reference() -> None:
    rng = np.random.default_rng(9)
    p = rng.uniform(0, 1, 400)
    r = rng.normal(0, 1e-3, 400)
    t = np.arange(400, dtype=np.int64) * 300_000
    got = evaluate.backtest(p, r, t, horizon=4, threshold=0.6)
    trades, busy_until = [], -1
    for i in range(400):
        if i >= busy_until and p[i] >= 0.6:
            trades.append(r[i])
            busy_until = i + 4
    eq = pd.Series(trades).cumsum()
    assert got["trades"] == len(trades)
    assert got["hit_rate"] == pytest.approx(np.mean(np.array(trades) > 0))
    assert got["total_return"] == pytest.approx(eq.iloc[-1])
    assert got["max_drawdown"] == pytest.approx((eq.cummax().clip(lower=0) - eq).max())


def test_shuffled_labels_give_walk_forward_auc_near_half(patterned: dataset.Dataset) -> None:
    rng = np.random.default_rng(11)
    shuffled = dataclasses.replace(patterned, target=rng.permutation(patterned.target))
    rep = evaluate.report(shuffled, train(shuffled, PARAMS, progress=False))
    assert rep["walk_forward"]["auc"] == pytest.approx(0.5, abs=0.06)


def test_planted_pattern_gives_walk_forward_auc_clearly_above_half(
    patterned: dataset.Dataset,
) -> None:
    training = train(patterned, PARAMS, progress=False)
    rep = evaluate.report(patterned, training)
    assert rep["walk_forward"]["auc"] > 0.6
    assert all(f["auc"] > 0.6 for f in rep["folds"])
    # the report's fold AUC is the AUC of the fold's own predictions, recomputed here
    last = training.holdout
    assert rep["holdout"]["auc"] == pytest.approx(
        pairwise_auc(patterned.target[last.fold.test], last.predictions), abs=1e-12
    )


def test_a_feature_that_peeks_is_caught_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("features were computed for training")

    peeking = FeatureSet((*DEFAULT.features, PeekNext()))
    monkeypatch.setattr(FeatureSet, "batch", no_training)  # the check uses each Feature's
    with pytest.raises(dataset.LookaheadError, match="next_ret"):
        dataset.build(market(800, seed=2), peeking, H)


def test_a_figure_that_could_not_be_computed_is_left_off_the_model_card() -> None:
    """A backtest without a trade has no hit rate: the card stays valid without it."""
    import argparse
    import math
    from types import SimpleNamespace

    import msgspec

    from workers.trainer.cli import card_for

    args = argparse.Namespace(feed="demo", symbol="EURUSD", tf="M1")
    ds = SimpleNamespace(feature_set_id=DEFAULT.id, names=DEFAULT.names, data_hash="h", horizon=5)
    rep = {
        "holdout": {"auc": 0.61, "logloss": 0.68, "test_from_ms": 1_000, "test_rows": 400},
        "walk_forward": {"auc": 0.58, "logloss": 0.69},
        "backtest": {"sharpe": 0.0, "hit_rate": math.nan, "max_drawdown": 0.0},
    }
    card = card_for(args, ds, rep, 0, 1_000)  # type: ignore[arg-type]
    assert "hit_rate" not in card.metrics
    assert card.metrics["auc"] == 0.61
    assert all(math.isfinite(v) for v in card.metrics.values())
    assert b"null" not in msgspec.json.encode(card.metrics)  # NaN would be stored as null


def test_the_gate_scores_the_active_model_only_on_holdout_rows_it_was_not_trained_on(
    patterned: dataset.Dataset,
) -> None:
    """An active model whose training window reaches into the candidate's holdout (one
    trained later or on a longer window: a backfill, a fire time run again) would be scored
    in sample there, better than it is, and keep a better candidate out. Both are scored on
    the holdout rows after its window; trained past the whole holdout, or for other
    features or another horizon, its stored metrics stand for it."""
    import argparse

    import lightgbm
    import msgspec

    from workers.trainer.cli import card_for, compared

    training = train(patterned, PARAMS, progress=False)
    hold = training.holdout
    test = np.arange(len(patterned))[hold.fold.test]
    times = patterned.open_time_ms[test]
    # trained on every row before the middle of the holdout, deep enough to remember them
    half = int(times[len(times) // 2])
    seen = patterned.open_time_ms < half
    overfit = {"objective": "binary", "num_leaves": 255, "min_data_in_leaf": 2, "verbose": -1}
    overfit |= {"num_threads": 1, "deterministic": True, "seed": 1}
    active = lightgbm.train(
        overfit,
        lightgbm.Dataset(patterned.features[seen], patterned.target[seen]),
        num_boost_round=300,
    )
    args = argparse.Namespace(feed="demo", symbol="EURUSD", tf="M5")
    report = evaluate.report(patterned, training)
    card = card_for(args, patterned, report, int(patterned.open_time_ms[0]), int(times[-1]))
    seen_half = msgspec.structs.replace(card, train_to_ms=half)
    mine, theirs, how = compared(patterned, training, card.metrics, seen_half, active)
    after = times >= half
    rows = test[after]
    assert how == f"scored on the {len(rows)} holdout rows after its training"
    want_active = pairwise_auc(patterned.target[rows], active.predict(patterned.features[rows]))
    want_mine = pairwise_auc(patterned.target[rows], hold.predictions[after])
    assert theirs["auc"] == pytest.approx(want_active, abs=1e-12)
    assert mine["auc"] == pytest.approx(want_mine, abs=1e-12)
    in_sample = pairwise_auc(patterned.target[test], active.predict(patterned.features[test]))
    assert in_sample > theirs["auc"] + 0.05  # what scoring it on the whole holdout gave it
    # its whole window after the holdout's start: the same holdout, the candidate's own figures
    before = msgspec.structs.replace(card, train_to_ms=int(times[0]))
    mine, _, how = compared(patterned, training, card.metrics, before, active)
    assert how == "scored on the same holdout"
    assert mine["auc"] == pytest.approx(card.metrics["auc"], abs=1e-12)
    # nothing left to compare on, or not the same model kind: the stored metrics
    past = msgspec.structs.replace(card, train_to_ms=int(times[-1]) + 1)
    other = msgspec.structs.replace(card, metrics={**card.metrics, "horizon": H + 1.0})
    renamed = msgspec.structs.replace(card, feature_names=[*card.feature_names[:-1], "x"])
    for active_card, says in (
        (past, "trained past this holdout: its stored metrics"),
        (other, "predicts another horizon: its stored metrics"),
        (renamed, "reads other features: its stored metrics"),
    ):
        mine, theirs, how = compared(patterned, training, card.metrics, active_card, active)
        assert (mine, theirs, how) == (card.metrics, active_card.metrics, says)
