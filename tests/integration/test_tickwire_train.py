"""``tickwire train`` end to end: candles in a real PostgreSQL, the model into the registry on
a real NATS server, each test in its own database and registry namespace.

What the card says is checked against values computed here: the holdout AUC is recomputed
from the stored model, labels made with pandas and pairwise counting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pandas as pd
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from contracts.messages import Timeframe
from contracts.models import ActiveModel, ModelStatus
from db.migrate import migrate
from tests import scorer_models
from tests.trainer_market import M5_MS, market
from workers.features import DEFAULT, Candles
from workers.registry import Registry, RegistryError, bucket_name
from workers.trainer import evaluate
from workers.trainer.cli import card_for, store
from workers.trainer.dataset import WARM_UP_CANDLES, build, load_candles
from workers.trainer.train import Params, model_bytes, train

pytestmark = pytest.mark.integration

FEED, SYMBOL, TF, H = "demo", "EURUSD", "M5", 3
N = 2400
CANDLES = market(N, seed=4, pattern=True)


def iso(i: int) -> str:
    """Open time of candle ``i`` (``i == N``: the end of the last one)."""
    ms = int(CANDLES.open_time_ms[0]) + i * M5_MS
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


@pytest.fixture
async def candles_db(pg_dsn: str) -> str:
    await migrate(pg_dsn)
    c = CANDLES
    t = [datetime.fromtimestamp(ms / 1000, UTC) for ms in c.open_time_ms.tolist()]
    rows = [
        (FEED, SYMBOL, TF, t[i], datetime.fromtimestamp((int(c.open_time_ms[i]) + M5_MS) / 1000, UTC),
         float(c.open[i]), float(c.high[i]), float(c.low[i]), float(c.close[i]),
         int(c.tick_volume[i]), 0.0, float(c.spread_mean[i]), float(c.spread_mean[i]),
         int(c.open_time_ms[i]), int(c.open_time_ms[i]) + M5_MS - 1, 0, 1)
        for i in range(N)
    ]  # fmt: skip
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_records_to_table("candles", schema_name="market", records=rows)
    finally:
        await conn.close()
    return pg_dsn


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    for delete in (js.delete_object_store, js.delete_key_value):
        with contextlib.suppress(NotFoundError):  # a bad input never made the buckets
            await delete(bucket_name(unique))


async def tickwire_train(
    nats_url: str, dsn: str, namespace: str, out: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "TICKWIRE_NATS_URL": nats_url,
        "TICKWIRE_POSTGRES_DSN": dsn,
        "TICKWIRE_NAMESPACE": namespace,
    }
    argv = [sys.executable, "-m", "workers.cli", "train", "--feed", FEED, "--tf", TF]
    argv += ["--horizon", str(H), "--out", str(out), *args]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=120, env=env
    )


async def train_and_promote(
    nats_url: str, dsn: str, namespace: str, js: JetStreamContext, out: Path
) -> tuple[Registry, ActiveModel]:
    """Train on every candle and promote: with no active model the gate lets it through."""
    proc = await tickwire_train(
        nats_url, dsn, namespace, out, "--symbol", SYMBOL,
        "--from", iso(0), "--to", iso(N), "--promote",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "promoted" in proc.stdout
    registry = await Registry.open(js, namespace=namespace, create=False)
    active = await registry.active(FEED, SYMBOL, TF)
    assert active is not None
    return registry, active


def pairwise_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


async def test_a_window_is_read_with_the_candles_before_it_that_warm_it_up(
    candles_db: str,
) -> None:
    """The window [candle 1000, candle 1800) comes with the 500 candles before it, oldest
    first, and a window near the start with as many as there are."""
    start, end = datetime.fromisoformat(iso(1000)), datetime.fromisoformat(iso(1800))
    got = await load_candles(candles_db, FEED, SYMBOL, TF, start, end)
    want = CANDLES.open_time_ms[1000 - WARM_UP_CANDLES : 1800]
    np.testing.assert_array_equal(got.open_time_ms, want)
    np.testing.assert_array_equal(got.close, CANDLES.close[1000 - WARM_UP_CANDLES : 1800])
    early = await load_candles(candles_db, FEED, SYMBOL, TF, datetime.fromisoformat(iso(100)), end)
    np.testing.assert_array_equal(early.open_time_ms, CANDLES.open_time_ms[:1800])


async def test_train_stores_a_candidate_whose_card_holds_up(
    candles_db: str, nats_url: str, namespace: str, js: JetStreamContext, tmp_path: Path
) -> None:
    proc = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path, "--symbol", SYMBOL,
        "--from", iso(0), "--to", iso(N),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "walk-forward" in proc.stdout
    assert "walk-forward folds" in proc.stderr  # the progress bar

    registry = await Registry.open(js, namespace=namespace, create=False)
    [card] = await registry.list()
    assert card.status is ModelStatus.CANDIDATE
    assert await registry.active(FEED, SYMBOL, TF) is None
    assert card.version in proc.stdout
    assert card.feature_set_id == DEFAULT.id
    assert card.feature_names == list(DEFAULT.names)
    assert card.train_from_ms == CANDLES.open_time_ms[0]
    assert card.train_to_ms == CANDLES.open_time_ms[-1] + M5_MS
    assert len(card.data_hash) == 64
    assert set(card.library_versions) >= {"lightgbm", "numpy", "tickwire"}

    # the holdout AUC, recomputed from the stored model and labels made here
    _, booster = await registry.get(card.version)
    df = pd.DataFrame({"t": CANDLES.open_time_ms, "close": CANDLES.close})
    future = df["close"].shift(-H)
    up = (future - df["close"] - CANDLES.spread_mean) / df["close"] > 0
    x = DEFAULT.batch(Candles(**{k: getattr(CANDLES, k) for k in Candles.__dataclass_fields__}))
    rows = (df["t"] >= card.metrics["holdout_from_ms"]) & future.notna()
    assert rows.sum() == card.metrics["holdout_rows"]
    p = booster.predict(x[rows.to_numpy()])
    auc = pairwise_auc(up[rows].to_numpy().astype(int), p)
    assert card.metrics["auc"] == pytest.approx(auc, abs=1e-9)
    assert auc > 0.6

    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["folds"]) == 4
    assert report["holdout"]["auc"] == pytest.approx(auc, abs=1e-9)
    for png in ("equity.png", "thresholds.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")


def gate_figures(stdout: str) -> tuple[bool, float, float]:
    """Whether the summary says promoted, and the candidate's and the active model's AUC."""
    m = re.search(r"candidate auc=([0-9.e+-]+) vs active ([0-9.e+-]+)", stdout)
    assert m is not None, stdout
    promoted = re.search(r"^promoted ", stdout, re.MULTILINE) is not None
    assert promoted or "stays a candidate" in stdout, stdout
    return promoted, float(m.group(1)), float(m.group(2))


def holdout_auc(booster: Any, from_ms: float) -> float:
    """AUC of ``booster`` on the rows from ``from_ms`` on, labels made here with pandas."""
    df = pd.DataFrame({"t": CANDLES.open_time_ms, "close": CANDLES.close})
    future = df["close"].shift(-H)
    up = (future - df["close"] - CANDLES.spread_mean) / df["close"] > 0
    x = DEFAULT.batch(Candles(**{k: getattr(CANDLES, k) for k in Candles.__dataclass_fields__}))
    rows = ((df["t"] >= from_ms) & future.notna()).to_numpy()
    return pairwise_auc(up[rows].to_numpy().astype(int), booster.predict(x[rows]))


async def test_promote_scores_the_active_model_on_the_holdout_after_its_training(
    candles_db: str, nats_url: str, namespace: str, js: JetStreamContext, tmp_path: Path
) -> None:
    """The active model was trained on the first 1,600 candles; the candidate on all 2,400,
    its latest holdout after them. The gate scores the active model there, the figure
    recomputed here from the stored model, and decides by the two AUCs it prints."""
    first = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path / "a", "--symbol", SYMBOL,
        "--from", iso(0), "--to", iso(1600), "--promote",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    registry = await Registry.open(js, namespace=namespace, create=False)
    active = await registry.active(FEED, SYMBOL, TF)
    assert active is not None
    second = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path / "b", "--symbol", SYMBOL,
        "--from", iso(0), "--to", iso(N), "--promote",
    )  # fmt: skip
    assert second.returncode in (0, 1), second.stderr
    assert "scored on the same holdout" in second.stdout
    promoted, candidate_auc, active_auc = gate_figures(second.stdout)
    [candidate] = [c for c in await registry.list() if c.version != active.version]
    assert candidate.metrics["holdout_from_ms"] >= int(CANDLES.open_time_ms[1600])
    _, booster = await registry.get(active.version)
    assert active_auc == pytest.approx(holdout_auc(booster, candidate.metrics["holdout_from_ms"]))
    assert candidate_auc == pytest.approx(candidate.metrics["auc"])
    assert promoted == (candidate_auc > active_auc) == (second.returncode == 0)
    now = await registry.active(FEED, SYMBOL, TF)
    assert now is not None
    assert now.version == (candidate.version if promoted else active.version)


async def test_promote_never_scores_the_active_model_on_rows_it_was_trained_on(
    candles_db: str, nats_url: str, namespace: str, js: JetStreamContext, tmp_path: Path
) -> None:
    """The active model was trained on every candle; the candidate on the last 800 only,
    its holdout inside the active model's window. There the active model would be scored in
    sample, better than it is: the AUC it stored on its own holdout stands for it."""
    registry, active = await train_and_promote(nats_url, candles_db, namespace, js, tmp_path / "a")
    second = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path / "b", "--symbol", SYMBOL,
        "--from", iso(N - 800), "--to", iso(N), "--folds", "2", "--promote",
    )  # fmt: skip
    assert second.returncode in (0, 1), second.stderr
    assert "trained past this holdout: its stored metrics" in second.stdout
    promoted, candidate_auc, active_auc = gate_figures(second.stdout)
    active_card, booster = await registry.get(active.version)
    assert active_auc == pytest.approx(active_card.metrics["auc"])
    [candidate] = [c for c in await registry.list() if c.version != active.version]
    assert candidate_auc == pytest.approx(candidate.metrics["auc"])
    in_sample = holdout_auc(booster, candidate.metrics["holdout_from_ms"])
    assert in_sample > active_auc  # what the gate would otherwise have compared against
    assert promoted == (candidate_auc > active_auc) == (second.returncode == 0)
    now = await registry.active(FEED, SYMBOL, TF)
    assert now is not None
    assert now.version == (candidate.version if promoted else active.version)
    assert candidate.status is (ModelStatus.ACTIVE if promoted else ModelStatus.CANDIDATE)


@pytest.mark.parametrize(
    ("symbol", "start", "end", "says"),
    [
        (SYMBOL, 0, 150, "too few"),
        ("GBPUSD", 0, N, "no candles for demo GBPUSD M5"),
        (SYMBOL, 5, 5, "is not before --to"),
    ],
)
async def test_bad_input_is_one_line_and_leaves_the_registry_alone(
    candles_db: str,
    nats_url: str,
    namespace: str,
    js: JetStreamContext,
    tmp_path: Path,
    symbol: str,
    start: int,
    end: int,
    says: str,
) -> None:
    proc = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path, "--symbol", symbol,
        "--from", iso(start), "--to", iso(end), "--promote",
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tickwire")]
    assert len(lines) == 1, proc.stderr
    assert says in lines[0]
    assert proc.stdout == ""
    with pytest.raises(RegistryError, match="does not exist"):
        await Registry.open(js, namespace=namespace, create=False)


async def test_a_corrupt_active_model_stops_promotion_and_changes_nothing(
    candles_db: str, nats_url: str, namespace: str, js: JetStreamContext, tmp_path: Path
) -> None:
    registry, active = await train_and_promote(nats_url, candles_db, namespace, js, tmp_path / "a")
    objects = await js.object_store(bucket_name(namespace))
    await objects.put(f"{active.version}.model", b"tree\nnot a model\n")

    second = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path / "b", "--symbol", SYMBOL,
        "--from", iso(N - 800), "--to", iso(N), "--folds", "2", "--promote",
    )  # fmt: skip
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.startswith("tickwire")]
    assert len(lines) == 1, second.stderr
    assert active.version in lines[0]
    assert [c.version for c in await registry.list()] == [active.version]
    assert await registry.active(FEED, SYMBOL, TF) == active


async def test_a_promotion_landing_while_the_candidate_is_stored_is_gated_against(
    js: JetStreamContext, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train --promote`` gates, then stores, then commits: a model made active in between
    (ops, another training) is what the candidate must be compared with, never one it
    replaces unseen."""
    registry = await Registry.open(js, namespace=namespace)
    ds = build(CANDLES, DEFAULT, H)
    training = train(ds, Params(folds=2, rounds=50), progress=False)
    end_ms = int(CANDLES.open_time_ms[-1]) + M5_MS
    args = argparse.Namespace(feed=FEED, symbol=SYMBOL, tf=TF)
    candidate = card_for(args, ds, evaluate.report(ds, training), int(ds.open_time_ms[0]), end_ms)
    booster = scorer_models.train(5)
    # its card claims an AUC no model of this market reaches, and no horizon: the gate takes
    # its stored figures, so the candidate must lose to it
    better = await registry.put(
        booster.model_to_string().encode(),
        scorer_models.card_for(booster, FEED, SYMBOL, Timeframe(TF), auc=0.99),
    )
    put = Registry.put

    async def put_while_ops_promotes(self: Registry, artifact: bytes, card: Any) -> str:
        version = await put(self, artifact, card)
        assert (await self.promote(better))[0]
        return version

    monkeypatch.setattr(Registry, "put", put_while_ops_promotes)
    outcome = await store(
        registry, model_bytes(training.holdout), candidate, ds, training, promote=True
    )
    assert outcome.promoted is False, outcome
    assert f"active {better}" in outcome.reason
    pointer = await registry.active(FEED, SYMBOL, TF)
    assert pointer is not None
    assert pointer.version == better
    assert (await registry.card(outcome.version)).status is ModelStatus.CANDIDATE


async def test_training_the_same_window_again_leaves_the_active_model_as_it_is(
    nats_url: str, candles_db: str, namespace: str, js: JetStreamContext, tmp_path: Path
) -> None:
    registry, active = await train_and_promote(nats_url, candles_db, namespace, js, tmp_path / "a")
    again = await tickwire_train(
        nats_url, candles_db, namespace, tmp_path / "b", "--symbol", SYMBOL,
        "--from", iso(0), "--to", iso(N), "--promote",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"model {active.version}: {active.version} is already active" in again.stdout
    assert await registry.active(FEED, SYMBOL, TF) == active
