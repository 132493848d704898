"""The model registry on a real NATS server: object store + KV, each test in its own buckets.

Models are trained here on synthetic data in well under a second; predictions of what the
registry hands back are compared with the booster that was trained, not with stored values.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import lightgbm
import msgspec
import numpy as np
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from contracts.messages import Timeframe
from contracts.models import ActiveModel, ModelCard, ModelStatus
from workers.registry import Registry, RegistryConflict, RegistryError, bucket_name

pytestmark = pytest.mark.integration

FEATURES = ["ret_1", "ret_5", "range_10"]
FEED, SYMBOL, TF = "demo", "US500.cash", Timeframe.M5
ESCAPED_KEY = "active.demo.US500=2Ecash.M5"


def train(seed: int, rounds: int = 8) -> tuple[bytes, lightgbm.Booster]:
    """A tiny binary classifier on a planted pattern; its text model is the artifact."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, len(FEATURES)))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=400) > 0).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": seed}
    booster = lightgbm.train(
        params, lightgbm.Dataset(x, y, feature_name=FEATURES), num_boost_round=rounds
    )
    return booster.model_to_string().encode(), booster


def card(auc: float, *, symbol: str = SYMBOL, **changes: object) -> ModelCard:
    base = ModelCard(
        feed=FEED,
        symbol=symbol,
        tf=TF,
        feature_set_id="fs-0123456789abcdef",
        feature_names=FEATURES,
        train_from_ms=1_700_000_000_000,
        train_to_ms=1_700_600_000_000,
        data_hash="d" * 64,
        metrics={"auc": auc, "logloss": 0.6},
        library_versions={"lightgbm": lightgbm.__version__, "numpy": np.__version__},
        created_at_ms=1_700_700_000_000,
    )
    return msgspec.structs.replace(base, **changes)


@pytest.fixture
async def registry(js: JetStreamContext, unique: str) -> AsyncIterator[Registry]:
    yield await Registry.open(js, namespace=unique)
    await js.delete_object_store(bucket_name(unique))
    await js.delete_key_value(bucket_name(unique))


async def test_put_list_get_gives_back_the_same_model(registry: Registry) -> None:
    artifact, original = train(1)
    version = await registry.put(artifact, card(0.61))
    assert version == hashlib.sha256(artifact).hexdigest()[:16]
    assert await registry.put(artifact, card(0.99)) == version  # same bytes: no new version

    other_artifact, _ = train(2)
    other = await registry.put(other_artifact, card(0.58, symbol="EUR/USD"))
    assert other != version

    listed = await registry.list()
    assert [c.version for c in listed] == sorted([version, other])
    only = await registry.list(feed=FEED, symbol=SYMBOL, tf="M5")
    assert [(c.version, c.status, c.metrics["auc"]) for c in only] == [
        (version, ModelStatus.CANDIDATE, 0.61)
    ]
    assert await registry.list(symbol="GBPUSD") == []

    got_card, booster = await registry.get(version)
    assert got_card.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    assert got_card.feature_names == FEATURES
    x = np.random.default_rng(99).normal(size=(200, len(FEATURES)))
    np.testing.assert_array_equal(booster.predict(x), original.predict(x))


async def test_every_version_is_listed_whatever_an_object_store_watch_says(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry lists its versions from the stream's list of subjects.

    nats-py's ``ObjectStore.list()`` reads a watch that can say every entry was delivered
    before the entries arrive (nats-io/nats.py#842); here it says so before any, as when
    the race is lost, and every stored version must still be listed."""
    versions = [await registry.put(train(seed)[0], card(0.6)) for seed in (1, 2, 3)]

    async def marker_first(self: ObjectStore, **kwargs: object) -> list[object]:
        raise NotFoundError

    monkeypatch.setattr(ObjectStore, "list", marker_first)
    assert [c.version for c in await registry.list()] == sorted(versions)


async def test_promote_and_rollback_move_the_escaped_key(
    registry: Registry, js: JetStreamContext
) -> None:
    a = await registry.put(train(1)[0], card(0.60))
    b = await registry.put(train(2)[0], card(0.70))
    assert await registry.active(FEED, SYMBOL, TF) is None

    assert (await registry.promote(a))[0]
    assert (await registry.promote(b))[0]
    kv = await js.key_value(registry.bucket)
    stored = msgspec.json.decode((await kv.get(ESCAPED_KEY)).value, type=ActiveModel)
    assert (stored.version, stored.previous) == (b, [a])
    statuses = {c.version: c.status for c in await registry.list()}
    assert statuses == {a: ModelStatus.RETIRED, b: ModelStatus.ACTIVE}

    back = await registry.rollback(FEED, SYMBOL, TF)
    assert (back.version, back.previous, back.retired) == (a, [], [b])
    assert (await registry.card(b)).status is ModelStatus.RETIRED
    assert (await registry.card(a)).status is ModelStatus.ACTIVE

    revision = (await kv.get(ESCAPED_KEY)).revision
    with pytest.raises(RegistryError, match="no previous version"):
        await registry.rollback(FEED, SYMBOL, TF)
    assert (await kv.get(ESCAPED_KEY)).revision == revision


async def test_gate_keeps_a_worse_candidate_unless_forced(registry: Registry) -> None:
    good = await registry.put(train(1)[0], card(0.70))
    worse = await registry.put(train(2)[0], card(0.65))
    assert await registry.promote(good) == (True, "no active model; candidate auc=0.7")

    promoted, reason = await registry.promote(worse)
    assert not promoted
    assert "auc=0.65 vs active 0.7" in reason
    assert (await registry.active(FEED, SYMBOL, TF)).version == good  # type: ignore[union-attr]
    assert (await registry.card(worse)).status is ModelStatus.CANDIDATE

    # log-loss: lower is better; both have 0.6, so no gain and no promotion
    assert (await registry.promote(worse, metric="logloss"))[0] is False  # equal: no gain
    assert await registry.promote(worse, force=True) == (True, "forced")
    assert (await registry.active(FEED, SYMBOL, TF)).version == worse  # type: ignore[union-attr]


async def test_two_promotions_from_the_same_revision_cannot_both_win(registry: Registry) -> None:
    a = await registry.put(train(1)[0], card(0.60))
    b = await registry.put(train(2)[0], card(0.61))
    first = await registry.prepare_promotion(a)
    second = await registry.prepare_promotion(b)
    assert first.revision == second.revision == 0

    await registry.commit(first)
    with pytest.raises(RegistryConflict):
        await registry.commit(second)
    pointer = await registry.active(FEED, SYMBOL, TF)
    assert pointer is not None
    assert (pointer.version, pointer.previous) == (a, [])


async def test_concurrent_promotions_lose_no_update(registry: Registry) -> None:
    versions = [await registry.put(train(s)[0], card(0.5)) for s in range(1, 5)]
    outcomes = await asyncio.gather(
        *(registry.promote(v, force=True) for v in versions), return_exceptions=True
    )
    won = {v for v, o in zip(versions, outcomes, strict=True) if o == (True, "forced")}
    lost = {v for v, o in zip(versions, outcomes, strict=True) if isinstance(o, RegistryConflict)}
    assert won | lost == set(versions), outcomes
    pointer = await registry.active(FEED, SYMBOL, TF)
    assert pointer is not None
    chain = [*pointer.previous, pointer.version]
    assert sorted(chain) == sorted(won)  # every reported win is in the chain, no loser is


async def test_a_corrupt_artifact_is_refused_and_changes_nothing(
    registry: Registry, js: JetStreamContext
) -> None:
    artifact_a, _ = train(1)
    artifact_b, _ = train(2, rounds=12)
    a = await registry.put(artifact_a, card(0.60))
    b = await registry.put(artifact_b, card(0.90))
    assert (await registry.promote(a))[0]

    objects = await js.object_store(registry.bucket)
    # cut in half: LightGBM could load the first trees of it, the registry must not
    await objects.put(f"{b}.model", artifact_b[: len(artifact_b) // 2])
    with pytest.raises(RegistryError, match="does not hash to its version"):
        await registry.get(b)
    with pytest.raises(RegistryError):
        await registry.promote(b, force=True)
    pointer = await registry.active(FEED, SYMBOL, TF)
    assert pointer is not None
    assert (pointer.version, pointer.previous) == (a, [])

    listed = await registry.list()
    for bad, match in [
        (b"not a model", "LightGBM cannot load it"),
        (b"\xff\xfe", "LightGBM cannot load it"),
        (artifact_b[: len(artifact_b) // 2], "not a whole LightGBM text model"),
        (artifact_b[:-30], "not a whole LightGBM text model"),
    ]:
        with pytest.raises(RegistryError, match=match):
            await registry.put(bad, card(0.99))
    with pytest.raises(RegistryError, match="booster features"):
        await registry.put(train(3)[0], card(0.99, feature_names=["a", "b", "c"]))
    with pytest.raises(RegistryError, match="invalid model card"):
        await registry.put(train(3)[0], card(0.99, feed="bad feed"))
    assert await registry.list() == listed


async def test_the_same_bytes_put_again_repair_a_lost_or_cut_model_file(
    registry: Registry, js: JetStreamContext
) -> None:
    artifact_a, original_a = train(1)
    artifact_b, original_b = train(2, rounds=12)
    a = await registry.put(artifact_a, card(0.60))
    b = await registry.put(artifact_b, card(0.70))
    assert (await registry.promote(a))[0]
    assert (await registry.promote(b))[0]
    objects = await js.object_store(registry.bucket)
    await objects.delete(f"{a}.model")
    await objects.put(f"{b}.model", artifact_b[: len(artifact_b) // 2])
    with pytest.raises(RegistryError, match="artifact is missing"):
        await registry.rollback(FEED, SYMBOL, TF)

    assert await registry.put(artifact_a, card(0.99)) == a
    assert await registry.put(artifact_b, card(0.99)) == b
    x = np.random.default_rng(7).normal(size=(50, len(FEATURES)))
    for version, original in [(a, original_a), (b, original_b)]:
        stored_card, booster = await registry.get(version)
        assert stored_card.metrics["auc"] != 0.99  # the card stored first is kept
        np.testing.assert_array_equal(booster.predict(x), original.predict(x))
    assert (await registry.rollback(FEED, SYMBOL, TF)).version == a


async def test_a_series_whose_pointer_was_deleted_can_be_promoted_again(
    registry: Registry, js: JetStreamContext
) -> None:
    """Deleting the pointer stops the series being scored; a later promotion starts again."""
    a = await registry.put(train(1)[0], card(0.60))
    b = await registry.put(train(2)[0], card(0.70))
    assert (await registry.promote(a))[0]
    kv = await js.key_value(registry.bucket)
    await kv.delete(ESCAPED_KEY)
    assert await registry.active(FEED, SYMBOL, TF) is None

    assert await registry.promote(b) == (True, "no active model; candidate auc=0.7")
    pointer = await registry.active(FEED, SYMBOL, TF)
    assert pointer is not None
    assert pointer.version == b

    # and the compare-and-set still holds on the revision after the delete marker
    await kv.delete(ESCAPED_KEY)
    first = await registry.prepare_promotion(a)
    second = await registry.prepare_promotion(b)
    await registry.commit(first)
    with pytest.raises(RegistryConflict):
        await registry.commit(second)


def models_cli(nats_url: str, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "models", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        env={
            "PATH": os.environ.get("PATH", ""),
            "TICKWIRE_NATS_URL": nats_url,
            "TICKWIRE_NAMESPACE": namespace,
            "TICKWIRE_LOG_LEVEL": "WARNING",
        },
    )


async def test_cli_lists_promotes_and_refuses_in_one_line(
    registry: Registry, nats_url: str, unique: str
) -> None:
    a = await registry.put(train(1)[0], card(0.60))
    b = await registry.put(train(2)[0], card(0.55))

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(models_cli, nats_url, unique, *args)

    listed = await cli("list", "--symbol", SYMBOL)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert lines[0].split()[:5] == ["version", "feed", "symbol", "tf", "status"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted([a, b])

    shown = await cli("show", a)
    assert shown.returncode == 0, shown.stderr
    assert msgspec.json.decode(shown.stdout, type=ModelCard).version == a

    promoted = await cli("promote", a)
    assert promoted.returncode == 0, promoted.stderr
    again = await cli("promote", a)
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"{a} is already active: nothing changed\n"
    refused = await cli("promote", b)
    assert refused.returncode == 1
    assert "stays a candidate" in refused.stdout
    assert "auc=0.55 vs active 0.6" in refused.stdout

    for args, says in [
        (("promote", "nonsense"), "not a model version"),
        (("promote", "0123456789abcdef"), "unknown model version"),
        (("rollback", "--feed", FEED, "--symbol", SYMBOL, "--tf", "M5"), "no previous version"),
        (("rollback", "--feed", FEED, "--symbol", SYMBOL, "--tf", "M7"), "unknown timeframe"),
        (("list", "--feed", "bad feed"), "feed must match"),
    ]:
        proc = await cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert says in proc.stderr, proc.stderr
    pointer = await registry.active(FEED, SYMBOL, TF)
    assert pointer is not None
    assert (pointer.version, pointer.previous) == (a, [])
