"""``tickwire train``: candles from PostgreSQL -> walk-forward LightGBM -> report -> registry.

Every check of the input (arguments, candles, look-ahead, folds) runs before the registry
is touched, and so does reading the active model with ``--promote``: bad input gives one
line and exit code 2 and leaves the registry as it was. The new model is stored as a
candidate; with ``--promote`` it replaces the active model only if it beats it on the same
latest holdout, otherwise the reason is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import importlib.metadata
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import asyncpg
import lightgbm
import numpy as np
from pydantic import SecretStr

from contracts.messages import Timeframe
from contracts.models import ActiveModel, ModelCard
from workers.cli import fail
from workers.features import DEFAULT, LIBRARY_VERSION, FeatureSet
from workers.registry import (
    Registry,
    RegistryConflict,
    RegistryError,
    active_key,
    should_promote,
)
from workers.runtime.connection import connect_once
from workers.runtime.settings import RuntimeSettings, load
from workers.trainer import evaluate
from workers.trainer.dataset import Dataset, DatasetError, build, load_candles
from workers.trainer.split import SplitError
from workers.trainer.train import Params, Training, model_bytes, train

log = logging.getLogger(__name__)

METRIC: Final = "auc"
"""The metric the promotion gate compares on the latest holdout."""


class Settings(RuntimeSettings):
    postgres_dsn: SecretStr | None = None
    """DSN of a role that can read ``market.candles`` (hidden in repr and logs)."""


def _time(text: str, flag: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        fail(f"{flag}: not an ISO date or time: {text!r}")
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclasses.dataclass(frozen=True)
class Outcome:
    version: str
    promoted: bool | None
    """None without ``--promote``, or when the candidate is the active model already."""
    reason: str


def card_for(
    args: argparse.Namespace, ds: Dataset, rep: dict[str, Any], start_ms: int, end_ms: int
) -> ModelCard:
    holdout, wf, bt = rep["holdout"], rep["walk_forward"], rep["backtest"]
    metrics = {
        "auc": holdout["auc"],
        "logloss": holdout["logloss"],
        "holdout_from_ms": float(holdout["test_from_ms"]),
        "holdout_rows": float(holdout["test_rows"]),
        "walk_forward_auc": wf["auc"],
        "walk_forward_logloss": wf["logloss"],
        "sharpe": bt["sharpe"],
        "hit_rate": bt["hit_rate"],
        "max_drawdown": bt["max_drawdown"],
        "horizon": float(ds.horizon),
    }
    return ModelCard(
        feed=args.feed,
        symbol=args.symbol,
        tf=Timeframe(args.tf),
        feature_set_id=ds.feature_set_id,
        feature_names=list(ds.names),
        train_from_ms=start_ms,
        train_to_ms=end_ms,
        data_hash=ds.data_hash,
        # a figure that could not be computed (no trade in the backtest: no hit rate; one class
        # in the holdout: no AUC) is left out, never stored as NaN: the gate treats it as absent
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
        library_versions={
            "lightgbm": lightgbm.__version__,
            "numpy": np.__version__,
            "features": LIBRARY_VERSION,
            "tickwire": importlib.metadata.version("tickwire"),
        },
        created_at_ms=time.time_ns() // 1_000_000,
    )


def compared(
    ds: Dataset,
    training: Training,
    candidate: Mapping[str, float],
    active_card: ModelCard,
    active: lightgbm.Booster,
) -> tuple[Mapping[str, float], Mapping[str, float], str]:
    """The candidate's and the active model's metrics for the gate, and how they were had.

    Both are scored on the rows of the latest holdout that the active model was not
    trained on: its candles end at ``train_to_ms``, and on rows before that it would be
    scored in sample, better than it is. Where it reads other features, predicts another
    horizon, or no such row is left (or they hold one class only), the metrics each model
    measured on its own holdout stand for it.
    """
    if active_card.feature_names != list(ds.names):
        return candidate, active_card.metrics, "reads other features: its stored metrics"
    if active_card.metrics.get("horizon") != ds.horizon:
        return candidate, active_card.metrics, "predicts another horizon: its stored metrics"
    test = np.arange(len(ds))[training.holdout.fold.test]
    unseen = ds.open_time_ms[test] >= active_card.train_to_ms
    if unseen.any():
        rows = test[unseen]
        mine = evaluate.holdout_metrics(ds.target[rows], training.holdout.predictions[unseen])
        p = np.asarray(active.predict(ds.features[rows]), dtype=np.float64)
        theirs = evaluate.holdout_metrics(ds.target[rows], p)
        if math.isfinite(mine[METRIC]) and math.isfinite(theirs[METRIC]):
            if unseen.all():
                return mine, theirs, "scored on the same holdout"
            return mine, theirs, f"scored on the {len(rows)} holdout rows after its training"
    return candidate, active_card.metrics, "trained past this holdout: its stored metrics"


GATE_ATTEMPTS: Final = 5
"""How often the gate is run again when the active model changes under it."""


@dataclasses.dataclass(frozen=True)
class _Gated:
    pointer: ActiveModel | None
    """The active pointer the gate compared against."""
    candidate: Mapping[str, float]
    active: Mapping[str, float] | None
    note: str


async def _gate(registry: Registry, card: ModelCard, ds: Dataset, training: Training) -> _Gated:
    pointer = await registry.active(card.feed, card.symbol, card.tf)
    if pointer is None:
        return _Gated(None, card.metrics, None, "")
    active_card, booster = await registry.get(pointer.version)
    candidate, active, how = compared(ds, training, card.metrics, active_card, booster)
    return _Gated(pointer, candidate, active, f" (active {pointer.version} {how})")


async def store(
    registry: Registry,
    artifact: bytes,
    card: ModelCard,
    ds: Dataset,
    training: Training,
    *,
    promote: bool,
) -> Outcome:
    """Put the candidate; with ``promote``, gate it against the active model on the same
    latest holdout. The active model is read (and verified) before anything is written.

    The promotion is committed on the very pointer the gate compared against: when another
    promotion or a rollback lands in between, the candidate is gated again against the
    model active then, never made active over one it was not compared with.
    """
    gated = await _gate(registry, card, ds, training) if promote else None
    version = await registry.put(artifact, card)
    if gated is None:
        return Outcome(version, None, "stored as a candidate")
    for _ in range(GATE_ATTEMPTS):
        prepared = await registry.prepare_promotion(version, force=True)
        if prepared.current == gated.pointer:
            if prepared.already_active:  # the same bytes as the active model
                return Outcome(version, None, f"{version} is already active: nothing changed")
            ok, reason = should_promote(gated.candidate, gated.active, metric=METRIC)
            reason += gated.note
            if not ok:
                return Outcome(version, False, reason)
            try:
                await registry.commit(dataclasses.replace(prepared, reason=reason))
            except RegistryConflict:
                pass
            else:
                return Outcome(version, True, reason)
        log.info("the active model of %s changed while gating; gating again", prepared.key)
        gated = await _gate(registry, card, ds, training)
    raise RegistryConflict(
        f"the active model of {card.feed} {card.symbol} {card.tf} kept changing;"
        f" {version} stays a candidate"
    )


def summary(rep: dict[str, Any], outcome: Outcome, paths: list[Path]) -> str:
    rows = [("part", "rows", "auc", "logloss", "best iter")]
    for f in rep["folds"]:
        rows.append(
            (
                f"fold {f['fold']}",
                str(f["test_rows"]),
                f"{f['auc']:.4f}",
                f"{f['logloss']:.4f}",
                str(f["best_iteration"]),
            )
        )
    wf = rep["walk_forward"]
    rows.append(
        (
            "walk-forward",
            str(sum(f["test_rows"] for f in rep["folds"])),
            f"{wf['auc']:.4f}",
            f"{wf['logloss']:.4f}",
            "",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    bt = rep["backtest"]
    lines.append(
        f"backtest (long when P(up) >= {bt['threshold']:g}, spread paid): {bt['trades']} trades,"
        f" hit rate {bt['hit_rate']:.3f}, total {bt['total_return']:+.5f},"
        f" Sharpe {bt['sharpe']:.2f}, max drawdown {bt['max_drawdown']:.5f}"
    )
    lines.append(f"report: {', '.join(str(p) for p in paths)}")
    lines.append(outcome_line(outcome))
    return "\n".join(lines)


def outcome_line(outcome: Outcome) -> str:
    """What became of the model, in one line (the last of the summary)."""
    if outcome.promoted is None:
        return f"model {outcome.version}: {outcome.reason}"
    if outcome.promoted:
        return f"promoted {outcome.version}: {outcome.reason}"
    return f"not promoted, {outcome.version} stays a candidate: {outcome.reason}"


async def _nats_answers(settings: Settings) -> None:
    nc = await connect_once(settings, "tickwire-train")
    await nc.close()


def run(args: argparse.Namespace, fs: FeatureSet = DEFAULT) -> int:
    """``tickwire train``: 1 when the gate kept the model a candidate, else 0."""
    outcome = train_and_store(args, fs)
    if outcome.promoted is False:
        log.info("model %s not promoted: %s", outcome.version, outcome.reason)
        return 1
    return 0


def train_and_store(args: argparse.Namespace, fs: FeatureSet = DEFAULT) -> Outcome:
    """Train, report, store (and gate) the model; print the summary; what became of it."""
    settings = load(Settings)
    try:
        active_key(args.feed, args.symbol, args.tf)
    except RegistryError as exc:
        fail(str(exc))
    start, end = _time(args.start, "--from"), _time(args.end, "--to")
    if start >= end:
        fail(f"--from {start.isoformat()} is not before --to {end.isoformat()}")
    if args.horizon < 1:
        fail(f"--horizon must be at least 1 bar, not {args.horizon}")
    if settings.postgres_dsn is None:
        fail("no PostgreSQL DSN: set TICKWIRE_POSTGRES_DSN")
    dsn = settings.postgres_dsn.get_secret_value()
    series = f"{args.feed} {args.symbol} {args.tf}"
    try:  # where the report goes, before the work whose report it is
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"--out {args.out}: {exc.strerror or exc}")
    try:
        candles = asyncio.run(load_candles(dsn, args.feed, args.symbol, args.tf, start, end))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        fail(f"PostgreSQL did not give the candles: {exc}")
    try:  # NATS answers, before the work that ends with its registry
        asyncio.run(_nats_answers(settings))
    except (TimeoutError, OSError) as exc:
        fail(f"NATS at {settings.nats_url} did not answer: {exc!r}")
    from_ms = int(start.timestamp() * 1000)
    in_window = int(np.count_nonzero(candles.open_time_ms >= from_ms))
    if in_window == 0:
        fail(f"no candles for {series} in [{start.isoformat()}, {end.isoformat()})")
    log.info("%d candles of %s, after %d to warm up", in_window, series, len(candles) - in_window)
    try:
        ds = build(candles, fs, args.horizon, from_ms=from_ms)
        training = train(ds, Params(folds=args.folds))
    except (DatasetError, SplitError) as exc:
        fail(f"{series}: {exc}")
    rep = evaluate.report(ds, training)
    paths = evaluate.save(rep, args.out)
    start_ms = int(candles.open_time_ms[candles.open_time_ms >= from_ms][0])
    end_ms = int(candles.open_time_ms[-1]) + Timeframe(args.tf).ms
    card = card_for(args, ds, rep, start_ms, end_ms)
    artifact = model_bytes(training.holdout)

    async def go() -> Outcome:
        nc = await connect_once(settings, "tickwire-train")
        try:
            registry = await Registry.open(nc.jetstream(), namespace=settings.namespace)
            return await store(registry, artifact, card, ds, training, promote=args.promote)
        finally:
            await nc.close()

    try:
        outcome = asyncio.run(go())
    except RegistryError as exc:
        fail(str(exc))
    except (TimeoutError, OSError) as exc:
        fail(f"NATS at {settings.nats_url} did not answer: {exc!r}; the model is not stored")
    print(summary(rep, outcome, paths))
    return outcome
