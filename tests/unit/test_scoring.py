"""The model-scorer's pure part: models read features by name, scores are the boosters'
probabilities, and bad vectors are told apart with the right reason."""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest

from contracts.codec import ContractError
from contracts.messages import FeatureVector, Timeframe
from tests.scorer_models import NAMES, card_for, expected_probabilities, train, vectors
from workers.model_scorer import scoring
from workers.model_scorer.scoring import Model, ModelError, VectorCodec

TF = Timeframe.M5


def loaded(booster: object) -> Model:
    card = card_for(booster, "demo", "EURUSD", TF)  # type: ignore[arg-type]
    card = msgspec.structs.replace(card, version="0123456789abcdef")
    return Model.load(card, booster)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("objective", "columns"),
    [("binary", None), ("binary", NAMES[::-1]), ("multiclass", NAMES[5:] + NAMES[:5])],
)
def test_scores_are_the_boosters_probabilities_read_by_name(
    objective: str, columns: list[str] | None
) -> None:
    booster = train(3, objective=objective, columns=columns)
    model = loaded(booster)
    vs = vectors("demo", "EURUSD", TF, 40, seed=4)
    values = np.array([v.values for v in vs])
    out = scoring.scores(vs, model, values)
    for v, s in zip(vs, out, strict=True):
        want = expected_probabilities(booster, v)
        assert s.probabilities == want
        assert s.score == want[-1] - want[0]
        assert -1.0 <= s.score <= 1.0
        assert (s.open_time_ms, s.close, s.feature_set_id) == (
            v.open_time_ms,
            v.close,
            v.feature_set_id,
        )
        assert s.model_version == "0123456789abcdef"
    assert scoring.message_id(out[0]) == (f"demo|EURUSD|M5|{vs[0].open_time_ms}|0|0123456789abcdef")


def test_models_that_give_no_classes_or_read_unknown_features_are_refused() -> None:
    with pytest.raises(ModelError, match="objective 'regression'"):
        loaded(train(3, objective="regression"))
    booster = train(3)
    card = card_for(booster, "demo", "EURUSD", TF)
    with pytest.raises(ModelError, match="unknown here"):
        Model.load(msgspec.structs.replace(card, feature_set_id="fs-0000000000000000"), booster)
    with pytest.raises(ModelError, match=r"\['nope'\] are not in"):
        Model.load(msgspec.structs.replace(card, feature_names=[*NAMES[:-1], "nope"]), booster)


def test_check_refuses_other_feature_sets_and_wrong_widths() -> None:
    model = loaded(train(3))
    v = vectors("demo", "EURUSD", TF, 1, seed=5)[0]
    assert scoring.check(v, model) is None
    other = msgspec.structs.replace(v, feature_set_id="fs-ffffffffffffffff")
    assert scoring.check(other, model)[0] == scoring.FEATURE_SET_MISMATCH  # type: ignore[index]
    for values in (v.values[:-1], [*v.values, 0.5]):
        short = msgspec.structs.replace(v, values=values)
        assert scoring.check(short, model)[0] == scoring.BAD_VALUES  # type: ignore[index]
    rows = np.array([[1.0, 2.0], [math.nan, 0.0], [0.0, math.inf], [3.0, -4.0]])
    assert scoring.non_finite(rows).tolist() == [False, True, True, False]


def test_non_finite_values_are_bad_values_however_they_are_written() -> None:
    codec = VectorCodec(FeatureVector)
    seen: list[str] = []
    codec.refused = seen.append
    v = vectors("demo", "EURUSD", TF, 1, seed=6)[0]
    good = msgspec.json.encode(v)
    assert codec.decode(good) == v
    text = good.decode()
    first = repr(v.values[0])
    for token in ("null", "NaN", "Infinity", "-Infinity", "1e999"):
        with pytest.raises(ContractError) as info:
            codec.decode(text.replace(first, token, 1).encode())
        assert info.value.reason == scoring.BAD_VALUES, token
    for payload, reason in (
        (b'{"type":"features",', "malformed_json"),
        (text.replace('"feed":"demo"', '"feed":"de mo"').encode(), "invalid_value"),
        (text.replace('"v":1', '"v":9').encode(), "unknown_schema_version"),
    ):
        with pytest.raises(ContractError) as info:
            codec.decode(payload)
        assert info.value.reason == reason
    assert seen == [scoring.BAD_VALUES] * 5 + ["malformed_json", "invalid_value"] + [
        "unknown_schema_version"
    ]
