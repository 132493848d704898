"""The feature library: incremental equals batch on 50,000 candles, both equal pandas
references written here, the feature-set id is stable, and look-ahead is caught."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from numpy.typing import NDArray

from tests.candles import START_MS, series
from workers.features import DEFAULT, Candles, Feature, FeatureSet, Stepper, violations
from workers.features.base import Array, Bar, empty
from workers.features.kinds import Macd, Range, Rsi
from workers.features.lookahead import close

N = 50_000
LEVELS = [(1.1, 5, 3), (5000.0, 2, 4), (30_000.0, 1, 5)]  # price, digits, seed


@pytest.fixture(scope="module", params=LEVELS, ids=["fx", "index", "crypto"])
def long_series(request: pytest.FixtureRequest) -> tuple[list, Candles, Array]:
    price, digits, seed = request.param
    bars = series(N, price=price, digits=digits, seed=seed)
    return bars, Candles.from_bars(bars), DEFAULT.engine().run(bars)


def assert_close(got: Array, want: Array, what: str, tol: float = 1e-9) -> None:
    ok = close(got, want, tol)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raise AssertionError(f"{what}: first difference at {i}: {got[i]!r} != {want[i]!r}")


def test_incremental_equals_batch_for_every_feature(long_series) -> None:
    _, candles, stream = long_series
    batch = DEFAULT.batch(candles)
    assert stream.shape == batch.shape == (N, len(DEFAULT.names))
    for j, name in enumerate(DEFAULT.names):
        assert_close(stream[:, j], batch[:, j], name)


def test_values_are_nan_exactly_before_each_warm_up(long_series) -> None:
    _, _, stream = long_series
    at = 0
    for f in DEFAULT.features:
        for j in range(len(f.names)):
            column = stream[:, at + j]
            assert np.isnan(column[: f.warmup - 1]).all(), f.names[j]
            assert np.isfinite(column[f.warmup - 1 :]).all(), f.names[j]
        at += len(f.names)
    assert DEFAULT.warmup == max(f.warmup for f in DEFAULT.features) == 34


def column(values: Array, name: str) -> Array:
    return values[:, DEFAULT.names.index(name)]


def wilder(x: pd.Series, period: int) -> pd.Series:
    """Wilder's smoothing with pandas: mean of the first ``period`` values of x (from index
    1, the first change), then ewm(alpha=1/period, adjust=False)."""
    seed = x.iloc[1 : period + 1].mean()
    s = x.iloc[period:].copy()
    s.iloc[0] = seed
    return s.ewm(alpha=1 / period, adjust=False).mean().reindex(x.index)


def _differ(a: Array, b: Array, tol: float) -> NDArray[np.bool_]:
    """Per candle: some value differs by more than ``tol`` (absolute below 1, relative above),
    measured here, not by the library's ``agree``."""
    both_nan = np.isnan(a) & np.isnan(b)
    scale = np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
    ok = both_nan | (np.abs(a - b) <= tol * scale)
    return np.asarray(~ok.all(axis=1), dtype=np.bool_)


@pytest.mark.parametrize(
    ("price", "digits", "seed", "start"),
    [(1.1, 5, 3, 700), (5000.0, 2, 4, 2100), (1.1, 5, 6, None)],
    ids=["fx-from-700", "index-from-2100", "fx-after-another-series"],
)
def test_engines_started_apart_agree_to_1e_12_after_the_memory(
    price: float, digits: int, seed: int, start: int | None
) -> None:
    """Two engines in different states (one with the series' whole history, one started
    later; or one after another series entirely), fed the same candles, agree to 1e-12
    from the ``memory``-th candle on. Before, the recursive features still differ well
    past the warm-up: the memory is what they need, not the warm-up."""
    bars = series(3000, price=price, digits=digits, seed=seed)
    if start is None:
        other = DEFAULT.engine()
        for bar in series(900, price=price * 1.4, digits=digits, seed=seed + 10):
            other.step(bar)
        a, b = DEFAULT.engine().run(bars), other.run(bars)
    else:
        a, b = DEFAULT.engine().run(bars)[start:], DEFAULT.engine().run(bars[start:])
    differ = np.flatnonzero(_differ(a, b, 1e-12))
    assert len(differ), "the two states were not apart"
    assert differ[-1] < DEFAULT.memory - 1, f"differ at candle {differ[-1] + 1} of {DEFAULT.memory}"
    assert differ[-1] > 4 * DEFAULT.warmup
    assert DEFAULT.memory == max(f.memory for f in DEFAULT.features)


def test_the_memory_of_a_recursive_feature_is_where_its_start_weighs_below_1e_12() -> None:
    """An average ``b * avg + ...`` keeps ``b ** k`` of its start after k steps; the memory
    is the first k where that is below 1e-12, after the warm-up that seeds the average."""
    for period in (2, 14, 50):
        b = 1.0 - 1.0 / period
        k = Rsi(period=period).memory - Rsi(period=period).warmup
        assert b**k < 1e-12 <= b ** (k - 1), period
    fast, slow, signal = 12, 26, 9
    bs, bg = 1.0 - 2.0 / (slow + 1), 1.0 - 2.0 / (signal + 1)
    k = Macd(fast=fast, slow=slow, signal=signal).memory - 1
    # the MACD's start over the first k1 candles, the signal's over the last k2
    assert any(bs**k1 < 5e-13 and bg ** (k - k1) < 5e-13 for k1 in range(k))
    assert Range().memory == Range().warmup == 1


def test_rsi_atr_macd_equal_pandas_references(long_series) -> None:
    _, candles, stream = long_series
    df = pd.DataFrame({"h": candles.high, "l": candles.low, "c": candles.close})
    change = df["c"].diff()
    gain = wilder(change.clip(lower=0), 14)
    loss = wilder((-change).clip(lower=0), 14)
    with np.errstate(divide="ignore"):
        rsi = 100 - 100 / (1 + gain / loss)
    prev = df["c"].shift(1)
    tr = pd.concat([df["h"] - df["l"], (df["h"] - prev).abs(), (df["l"] - prev).abs()], axis=1)
    atr = wilder(tr.max(axis=1, skipna=False), 14)
    macd = df["c"].ewm(span=12, adjust=False).mean() - df["c"].ewm(span=26, adjust=False).mean()
    signal = macd.ewm(span=9, adjust=False).mean()
    for name, ref, first in [
        ("rsi_14", rsi, 14),
        ("atr_14", atr, 14),
        ("macd", macd, 33),
        ("macd_signal", signal, 33),
        ("macd_hist", macd - signal, 33),
    ]:
        got = column(stream, name)
        assert np.isnan(got[:first]).all()
        assert_close(got[first:], ref.to_numpy()[first:], name)


def test_window_features_equal_pandas_references(long_series) -> None:
    _, candles, stream = long_series
    c = pd.Series(candles.close)
    r1 = np.log(c / c.shift(1))

    def std(x: pd.Series) -> pd.Series:
        # two passes per window: pandas' own rolling std is an online update whose rounding
        # reaches 1e-8 of a z-score on 50,000 prices
        return x.rolling(20).apply(lambda w: w.std(ddof=0), raw=True)

    refs: dict[str, pd.Series] = {
        "ret_1": r1,
        "ret_5": np.log(c / c.shift(5)),
        "ret_20": np.log(c / c.shift(20)),
        "vol_20": std(r1),
        "bb_z_20": (c - c.rolling(20).mean()) / std(c),
        "range_hl": (pd.Series(candles.high) - pd.Series(candles.low)) / c,
    }
    v = pd.Series(candles.tick_volume, dtype=float)
    refs["volume_z_20"] = (v - v.rolling(20).mean()) / v.rolling(20).std(ddof=0)
    tr = np.maximum(
        candles.high[1:] - candles.low[1:],
        np.maximum(
            np.abs(candles.high[1:] - candles.close[:-1]),
            np.abs(candles.low[1:] - candles.close[:-1]),
        ),
    )
    atr = wilder(pd.Series(np.concatenate([[np.nan], tr])), 14)
    refs["spread_atr_14"] = pd.Series(candles.spread_mean) / atr
    for name, ref in refs.items():
        want = ref.to_numpy(dtype=float)
        got = column(stream, name)
        # a flat window (zero deviation) is 0 by definition, NaN or inf in pandas
        defined = np.isfinite(want)
        assert_close(got[defined], want[defined], name)
        flat = ~defined & ~np.isnan(got)
        assert (got[flat] == 0.0).all(), name

    times = pd.to_datetime(candles.open_time_ms, unit="ms", utc=True)
    seconds = times.hour * 3600 + times.minute * 60 + times.second
    angle_day = 2 * np.pi * np.asarray(seconds) / 86_400
    angle_week = 2 * np.pi * np.asarray(times.dayofweek) / 7  # pandas: Monday = 0
    assert_close(column(stream, "tod_sin"), np.sin(angle_day), "tod_sin")
    assert_close(column(stream, "tod_cos"), np.cos(angle_day), "tod_cos")
    assert_close(column(stream, "dow_sin"), np.sin(angle_week), "dow_sin")
    assert_close(column(stream, "dow_cos"), np.cos(angle_week), "dow_cos")


@pytest.mark.parametrize("level", [1.1, 150.5, 30_000.0])
def test_a_flat_stretch_is_flat_in_both_forms(level: float) -> None:
    """A symbol whose close does not move for longer than a window (only the ask ticks, a
    halted market): the incremental form must call it flat as the batch form does, at
    whatever point of its periodic recompute the stretch begins."""
    rng = np.random.default_rng(7)
    for phase in range(21):
        moving = np.round(level * (1 + rng.normal(0, 3e-4, 20 + phase).cumsum()), 5)
        closes = np.concatenate([moving, np.full(25, moving[-1]), moving[::-1]])
        n = len(closes)
        candles = Candles(
            open_time_ms=START_MS + 60_000 * np.arange(n, dtype=np.int64),
            open=closes,
            high=closes + 0.01,
            low=closes - 0.01,
            close=closes,
            tick_volume=np.full(n, 3, dtype=np.int64),
            spread_mean=np.full(n, 0.02),
        )
        bars = [candles.row(i) for i in range(n)]
        stream, batch = DEFAULT.engine().run(bars), DEFAULT.batch(candles)
        for name in ("bb_z_20", "vol_20", "volume_z_20"):
            assert_close(column(stream, name), column(batch, name), f"{name} phase {phase}")
        # independently: a window of equal closes has no deviation, so its z-score is 0,
        # and 21 equal closes make 20 returns of 0, so no volatility
        c = pd.Series(closes)
        for name, bars_ in (("bb_z_20", 20), ("vol_20", 21)):
            flat = (c.rolling(bars_).max() == c.rolling(bars_).min()).to_numpy()
            assert flat.sum() >= 5
            assert (column(stream, name)[flat] == 0.0).all(), f"{name} phase {phase}"


@pytest.mark.parametrize(("level", "digits"), [(1.1, 5), (150.5, 3), (30_000.0, 1), (100_000.0, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_stretches_volatile_quiet_and_flat_agree_in_both_forms(
    level: float, digits: int, seed: int
) -> None:
    """Volatility that switches every 20 to 400 candles between normal, a tenth, a
    hundredth (below a pip) and none: where a window's variance collapses, what the O(1)
    updates rounded off the larger one must not show."""
    rng = np.random.default_rng(seed)
    n = 6000
    vol = np.empty(n)
    at = 0
    while at < n:
        k = int(rng.integers(20, 400))
        vol[at : at + k] = rng.choice([3e-4, 3e-5, 3e-6, 0.0])
        at += k
    closes = np.round(level * np.exp(np.cumsum(rng.normal(0, 1, n) * vol)), digits)
    tick = 10.0**-digits
    candles = Candles(
        open_time_ms=START_MS + 60_000 * np.arange(n, dtype=np.int64),
        open=closes,
        high=closes + tick,
        low=closes - tick,
        close=closes,
        tick_volume=rng.integers(1, 50, n).astype(np.int64),
        spread_mean=np.full(n, 2 * tick),
    )
    stream = DEFAULT.engine().run([candles.row(i) for i in range(n)])
    batch = DEFAULT.batch(candles)
    for j, name in enumerate(DEFAULT.names):
        assert_close(stream[:, j], batch[:, j], name)


def at_close(closes: Array, *, spread: float, volume: int = 3) -> Candles:
    """M1 candles whose open, high and low are their close (one price a minute)."""
    n = len(closes)
    return Candles(
        open_time_ms=START_MS + 60_000 * np.arange(n, dtype=np.int64),
        open=closes,
        high=closes,
        low=closes,
        close=closes,
        tick_volume=np.full(n, volume, dtype=np.int64),
        spread_mean=np.full(n, spread),
    )


def test_a_price_whose_square_is_past_the_float_range_stops_neither_form() -> None:
    """A close of 1e200 (finite, so valid input) in a window: its squared deviation is
    past the float range. Both forms carry on and agree; the window's deviation is inf."""
    n = 60
    closes = 1.1 + np.arange(n) * 1e-4
    closes[40] = 1e200
    candles = at_close(closes, spread=2e-5)
    stream = DEFAULT.engine().run([candles.row(i) for i in range(n)])
    with np.errstate(over="ignore", invalid="ignore"):
        batch = DEFAULT.batch(candles)
    for j, name in enumerate(DEFAULT.names):
        assert_close(stream[:, j], batch[:, j], name)
    assert (column(stream, "bb_z_20")[40:60] == 0.0).all()  # over an infinite deviation


def test_a_price_next_to_nothing_stops_neither_form() -> None:
    """A close of 5e-324 (the smallest double, an integer 1 read as one: positive, so valid
    input) after closes of 2.5: their ratio underflows to 0. Its log return is -inf in both
    forms, never an error, the one after it +inf, and both forms carry on and agree."""
    n = 80
    closes = 2.5 + np.arange(n) * 1e-4
    closes[40] = 5e-324
    candles = at_close(closes, spread=2e-5)
    stream = DEFAULT.engine().run([candles.row(i) for i in range(n)])
    with np.errstate(invalid="ignore"):
        batch = DEFAULT.batch(candles)
    for j, name in enumerate(DEFAULT.names):
        assert_close(stream[:, j], batch[:, j], name)
    assert column(stream, "ret_1")[40] == -np.inf
    assert column(stream, "ret_1")[41] == np.inf
    assert np.isfinite(stream[62:]).all()  # every window past it again


def test_a_halted_market_keeps_its_spread_to_atr_finite() -> None:
    """The bid does not move for a week of M1 candles while the spread stays (OHLC from the
    bid): ATR decays by 13/14 a candle, towards nothing but never to 0. Below ``FLAT`` times
    the price it is a flat window, whose ratio is 0, in both forms: the spread over a
    vanishing ATR would overflow to inf and refuse every vector of the symbol."""
    rng = np.random.default_rng(1)
    walk = np.round(1.1 + np.cumsum(rng.normal(0, 1e-4, 40)), 5)
    closes = np.concatenate([walk, np.full(10_080, walk[-1])])
    candles = at_close(closes, spread=1e-5, volume=1)
    stream = DEFAULT.engine().run([candles.row(i) for i in range(len(closes))])
    batch = DEFAULT.batch(candles)
    got = column(stream, "spread_atr_14")
    assert_close(got, column(batch, "spread_atr_14"), "spread_atr_14")
    assert np.isfinite(got[DEFAULT.warmup :]).all()
    # ATR itself, independently: Wilder's smoothing of true ranges that are 0 once flat
    assert (got[-100:] == 0.0).all()


def test_a_clone_is_independent_of_the_series_it_came_from() -> None:
    bars = series(200, seed=8)
    engine = DEFAULT.engine()
    for b in bars[:100]:
        engine.step(b)
    fork = engine.clone()
    other = series(200, seed=9, start_ms=bars[100].open_time_ms)
    for b in other[100:150]:  # a different future for the fork
        fork.step(b)
    rest = [engine.step(b) for b in bars[100:]]
    want = DEFAULT.batch(Candles.from_bars(bars))[100:]
    assert_close(np.asarray(rest), want, "original after fork")


# --- the feature-set id ---------------------------------------------------------------


def test_the_default_id_is_pinned() -> None:
    # Changing a definition's parameters, the set or LIBRARY_VERSION changes this on
    # purpose: models trained on the old set are refused by the scorer.
    assert DEFAULT.id == "fs-6b96a736becbbd47"


def test_changing_a_parameter_changes_the_id() -> None:
    changed = FeatureSet(
        tuple(
            dataclasses.replace(f, period=21) if isinstance(f, Rsi) else f for f in DEFAULT.features
        )
    )
    assert changed.id != DEFAULT.id
    signal = FeatureSet(
        tuple(
            dataclasses.replace(f, signal=8) if isinstance(f, Macd) else f for f in DEFAULT.features
        )
    )
    assert len({DEFAULT.id, changed.id, signal.id}) == 3
    reordered = FeatureSet(DEFAULT.features[::-1])
    assert reordered.id != DEFAULT.id  # values are published in the set's order
    assert FeatureSet(tuple(DEFAULT.features)).id == DEFAULT.id


def test_the_id_is_the_same_in_another_process() -> None:
    code = "from workers.features import DEFAULT; print(DEFAULT.id)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == DEFAULT.id


# --- look-ahead -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeekNext(Feature):
    """Planted: the return from this close to the next one, a label posing as a feature."""

    kind: ClassVar[str] = "peek_next"

    @property
    def names(self) -> tuple[str, ...]:
        return ("next_ret",)

    @property
    def warmup(self) -> int:
        return 1

    def stepper(self) -> Stepper:
        return _Zero()

    def batch(self, candles: Candles) -> Array:
        out = empty(len(candles))
        c = candles.close
        out[:-1, 0] = np.log(c[1:] / c[:-1])
        out[-1:, 0] = 0.0
        return out


class _Zero(Stepper):
    __slots__ = ()

    def step(self, bar: Bar, out: list[float], at: int) -> None:
        out[at] = 0.0

    def clone(self) -> _Zero:
        return self


def test_no_default_feature_reads_ahead() -> None:
    candles = Candles.from_bars(series(3_000, seed=12))
    assert violations(DEFAULT, candles) == []


def test_a_feature_that_peeks_at_the_next_candle_is_reported_by_name() -> None:
    candles = Candles.from_bars(series(3_000, seed=12))
    found = violations((*DEFAULT.features, PeekNext()), candles)
    assert {v.name for v in found} == {"next_ret"}
    assert {v.check for v in found} == {"prefix", "stream"}
    prefix = next(v for v in found if v.check == "prefix")
    assert prefix.other == 0.0
    assert not math.isclose(prefix.full, 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_macd_of_a_symbol_quoted_in_millions_is_not_taken_for_a_peek(seed: int) -> None:
    """BTCJPY trades near 15,000,000 yen. MACD, a difference of two EMAs of that price,
    rounds at the price's size, a few 1e-9 of it, not at its own (about 1): its stepped and
    batch forms differ by more than 1e-9 of the value. That is rounding, no look-ahead; the
    trainer must not refuse the symbol for it. A MACD that does read the next candle is
    still caught by both checks."""
    candles = Candles.from_bars(series(3_000, seed=seed, price=15_000_000.0, digits=0))
    assert violations(DEFAULT, candles) == []
    found = violations([MacdOfNext()], candles)
    assert {v.name for v in found} == {"macd", "macd_signal", "macd_hist"}
    assert {v.check for v in found} == {"prefix", "stream"}


@dataclass(frozen=True, slots=True)
class MacdOfNext(Macd):
    """Planted: the MACD of the next candle."""

    kind: ClassVar[str] = "macd_of_next"

    def batch(self, candles: Candles) -> Array:
        out = Macd.batch(self, candles)
        out[:-1] = out[1:]
        return out
