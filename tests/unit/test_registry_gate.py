"""The promotion gate and the registry's naming, without a server."""

from __future__ import annotations

import hashlib
import math

import pytest

from workers.registry import RegistryError, active_key, bucket_name, should_promote, version_of


@pytest.mark.parametrize(
    ("candidate", "active", "metric", "min_gain", "promote"),
    [
        ({"auc": 0.62}, {"auc": 0.60}, "auc", 0.0, True),
        ({"auc": 0.60}, {"auc": 0.60}, "auc", 0.0, False),  # a tie is not a gain
        ({"auc": 0.59}, {"auc": 0.60}, "auc", 0.0, False),
        ({"auc": 0.605}, {"auc": 0.60}, "auc", 0.01, False),
        ({"auc": 0.62}, {"auc": 0.60}, "auc", 0.01, True),
        ({"logloss": 0.50}, {"logloss": 0.55}, "logloss", 0.0, True),  # lower is better
        ({"logloss": 0.60}, {"logloss": 0.55}, "logloss", 0.0, False),
        ({"auc": 0.55}, None, "auc", 0.0, True),  # nothing active yet
        ({"auc": 0.55}, {"logloss": 0.5}, "auc", 0.0, True),  # active cannot be compared
        ({"logloss": 0.5}, {"auc": 0.6}, "auc", 0.0, False),  # candidate cannot be compared
        ({"auc": math.nan}, {"auc": 0.6}, "auc", 0.0, False),
        # no better than chance: never, whatever is active
        ({"auc": 0.5}, None, "auc", 0.0, False),
        ({"auc": 0.47}, {"logloss": 0.5}, "auc", 0.0, False),
        ({"auc": 0.48}, {"auc": 0.40}, "auc", 0.0, False),
        ({"auc": 0.501}, None, "auc", 0.0, True),
    ],
)
def test_gate_decides_on_the_gain(
    candidate: dict[str, float],
    active: dict[str, float] | None,
    metric: str,
    min_gain: float,
    promote: bool,
) -> None:
    ok, reason = should_promote(candidate, active, metric=metric, min_gain=min_gain)
    assert ok is promote
    assert reason
    assert "\n" not in reason
    if metric == "auc" and candidate.get(metric, 1.0) <= 0.5:
        assert "no better than chance" in reason
    elif active is not None and metric in active and math.isfinite(candidate.get(metric, math.nan)):
        assert f"{metric}={candidate[metric]:.6g} vs active {active[metric]:.6g}" in reason


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_gate_refuses_a_bad_min_gain(bad: float) -> None:
    with pytest.raises(ValueError, match="min_gain"):
        should_promote({"auc": 0.7}, {"auc": 0.6}, min_gain=bad)


def test_version_is_a_hash_of_the_bytes() -> None:
    assert version_of(b"tree\n") == hashlib.sha256(b"tree\n").hexdigest()[:16]
    assert version_of(b"tree\n") != version_of(b"tree \n")


def test_keys_escape_symbols_and_buckets_follow_the_namespace() -> None:
    assert active_key("demo", "US500.cash", "M5") == "active.demo.US500=2Ecash.M5"
    assert active_key("demo", "BRK B", "H1") == "active.demo.BRK=20B.H1"
    assert bucket_name() == "models"
    assert bucket_name("t1") == "ns-t1-models"
    with pytest.raises(RegistryError, match="timeframe"):
        active_key("demo", "EURUSD", "M7")
    with pytest.raises(RegistryError, match="feed"):
        active_key("de mo", "EURUSD", "M5")
