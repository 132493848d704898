"""model-scorer on the real NATS: scores are the boosters' own predictions, a promotion or a
rollback takes effect mid-stream without a restart, refused vectors are dead letters with
their reason while the rest of the batch is scored, and kill -9 changes no byte of SCORES,
even when the restart comes after SCORES' duplicate window.

Each test runs in its own namespace: its own streams and its own model registry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lightgbm
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import DeadLetter, FeatureVector, Score, Timeframe
from infra.stack import StackUrls
from tests.crashing_worker import (
    CRASHING,
    doubled,
    killed_after_its_first_publish,
    shorten_windows,
    stored_messages,
    window_gone_by,
)
from tests.integration.test_feature_builder import run_worker, stream_messages
from tests.processes import running, spawn, started_worker, worker_env
from tests.scorer_models import card_for, expected_probabilities, train, vectors
from tests.waiting import eventually
from workers.model_scorer import models as models_module
from workers.model_scorer.app import NAME, Metrics, Settings, build
from workers.model_scorer.models import ActiveModels
from workers.model_scorer.scoring import ModelError, VectorCodec
from workers.registry import Registry, active_key, bucket_name
from workers.runtime.worker import Worker

pytestmark = pytest.mark.integration

DURABLE = "model-scorer"
FEED = "demo"
EURUSD = ("EURUSD", Timeframe.M5)
US500 = ("US500.cash", Timeframe.M1)


async def drop(js: JetStreamContext, namespace: str) -> None:
    for spec in streams.stream_specs(namespace=namespace):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(Exception):
        await js.delete_object_store(bucket_name(namespace))
    with contextlib.suppress(Exception):
        await js.delete_key_value(bucket_name(namespace))


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    await drop(js, unique)


@pytest.fixture
async def namespace_b(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield f"{unique}b"
    await drop(js, f"{unique}b")


def settings(stack: StackUrls, namespace: str, **kw: Any) -> Settings:
    return Settings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1, **kw)


async def put(registry: Registry, booster: lightgbm.Booster, series: tuple[str, Timeframe]) -> str:
    card = card_for(booster, FEED, *series)
    return await registry.put(booster.model_to_string().encode(), card)


async def publish(
    js: JetStreamContext,
    namespace: str,
    items: list[FeatureVector | tuple[str, bytes]],
    *,
    as_specified: bool = True,
) -> None:
    """Vectors on their own subjects (or raw payloads on a given subject), in order;
    ``as_specified``: the namespace's streams made or updated as specified first."""
    if as_specified:
        await streams.ensure(js, streams.stream_specs(namespace=namespace))
    futures = []
    for item in items:
        if isinstance(item, tuple):
            subject, payload = item
            futures.append(await js.publish_async(subject, payload))
            continue
        v = item
        subject = subjects.features(v.feed, v.symbol, v.tf, namespace=namespace)
        msg_id = f"{v.feed}|{v.symbol}|{v.tf.value}|{v.open_time_ms}|{v.candle_revision}"
        futures.append(
            await js.publish_async(subject, msgspec.json.encode(v), headers={"Nats-Msg-Id": msg_id})
        )
    await asyncio.gather(*futures)


async def scores_of(js: JetStreamContext, namespace: str) -> list[Score]:
    decode = msgspec.json.Decoder(Score).decode
    return [decode(m) for m in await stream_messages(js, streams.SCORES, namespace)]


async def consumed(js: JetStreamContext, namespace: str) -> bool:
    stream = streams.stream_name(streams.FEATURES, namespace=namespace)
    try:
        info = await js.consumer_info(stream, DURABLE)
    except APIError:
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


def active_version(worker: Any, series: tuple[str, Timeframe]) -> str | None:
    """The version the worker's gauge says it scores ``series`` by now."""
    key = f"active.{FEED}.{subjects.escape(series[0])}.{series[1].value}"
    for metric in worker.metrics.registry.collect():
        if metric.name != "tickwire_scorer_active_model":
            continue
        for sample in metric.samples:
            if sample.labels["key"] == key and sample.value == 1:
                return str(sample.labels["version"])
    return None


def check_scores(
    got: list[Score],
    sent: list[FeatureVector],
    boosters: dict[str, lightgbm.Booster],
    version_of: dict[tuple[str, int], str],
) -> list[str]:
    """Each vector scored once, by the expected version, with that booster's predictions."""
    problems = []
    by_key = {(v.symbol, v.open_time_ms): v for v in sent}
    seen = Counter((s.symbol, s.open_time_ms) for s in got)
    problems += [f"doubled {k}" for k, n in seen.items() if n > 1]
    problems += [f"missing {k}" for k in by_key.keys() - seen.keys()]
    for s in got:
        key = (s.symbol, s.open_time_ms)
        v = by_key[key]
        if s.model_version != version_of[key]:
            problems.append(f"{key}: scored by {s.model_version}, not {version_of[key]}")
            continue
        want = expected_probabilities(boosters[s.model_version], v)
        if s.probabilities != want or s.score != want[-1] - want[0]:
            problems.append(f"{key}: {s.probabilities} != {want}")
        if (s.close, s.close_time_ms, s.last_tick_ms, s.candle_revision) != (
            v.close,
            v.close_time_ms,
            v.last_tick_ms,
            v.candle_revision,
        ):
            problems.append(f"{key}: candle fields differ")
    return problems[:10]


async def test_promotion_and_rollback_take_effect_mid_stream(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    registry = await Registry.open(js, namespace=namespace)
    first = train(1)
    # the second model reads the features in another order than the vectors carry them
    second = train(2, objective="multiclass", columns=list(first.feature_name())[::-1])
    other = train(3)
    boosters = {}
    for b in (first, second):
        boosters[await put(registry, b, EURUSD)] = b
    a, b = list(boosters)
    c = await put(registry, other, US500)
    boosters[c] = other
    assert (await registry.promote(a))[0]
    assert (await registry.promote(c))[0]

    eur = vectors(FEED, *EURUSD, 240, seed=11)
    us = vectors(FEED, *US500, 240, seed=12)
    phases = [(a, slice(0, 80)), (b, slice(80, 160)), (a, slice(160, 240))]
    version_of: dict[tuple[str, int], str] = {}
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        assert active_version(worker, EURUSD) == a
        for n, (version, part) in enumerate(phases):
            if n == 1:
                assert (await registry.promote(b, force=True))[0]
            if n == 2:
                assert (await registry.rollback(FEED, *EURUSD)).version == a
            await eventually(
                lambda version=version: active_version(worker, EURUSD) == version,
                what=f"{version} active in the worker",
            )
            sent = [x for pair in zip(eur[part], us[part], strict=True) for x in pair]
            await publish(js, namespace, list(sent))
            for v in sent:
                version_of[v.symbol, v.open_time_ms] = version if v.symbol == "EURUSD" else c
            total = len(version_of)
            await eventually(
                lambda total=total: _count_at_least(js, namespace, total),
                what=f"{total} scores",
            )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    got = await scores_of(js, namespace)
    assert len(got) == len(eur) + len(us)
    assert check_scores(got, eur + us, boosters, version_of) == []
    assert {s.model_version for s in got if s.symbol == "EURUSD"} == {a, b}
    assert all(len(s.probabilities) == 3 for s in got if s.model_version == b)
    sample = worker.metrics.registry.get_sample_value
    assert sample("tickwire_scorer_vectors_total", {"worker": DURABLE, "outcome": "scored"}) == 480
    rows = sample("tickwire_scorer_predict_rows_sum", {"worker": DURABLE})
    calls = sample("tickwire_scorer_predict_rows_count", {"worker": DURABLE})
    assert rows == 480
    assert calls is not None
    assert calls < 480  # micro-batches, not one by one
    latency = {"worker": DURABLE, "stage": "feature_to_score"}
    assert sample("tickwire_e2e_latency_seconds_count", latency) == 480


async def _count_at_least(js: JetStreamContext, namespace: str, n: int) -> bool:
    info = await js.stream_info(streams.stream_name(streams.SCORES, namespace=namespace))
    return info.state.messages >= n


async def test_refused_vectors_are_dead_letters_and_the_rest_of_the_batch_is_scored(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    registry = await Registry.open(js, namespace=namespace)
    booster = train(1)
    version = await put(registry, booster, EURUSD)
    assert (await registry.promote(version))[0]
    broken = ("BROKEN", Timeframe.M1)
    regression = await put(registry, train(4, objective="regression"), broken)
    assert (await registry.promote(regression))[0]

    good = vectors(FEED, *EURUSD, 60, seed=21, warming=10)
    subject = subjects.features(FEED, "EURUSD", Timeframe.M5, namespace=namespace)
    enc = msgspec.json.encode
    v = vectors(FEED, *EURUSD, 1, seed=22, start=100)[0]
    text = enc(v).decode()
    first = repr(v.values[0])

    def raw(payload: str | bytes) -> tuple[str, bytes]:
        return subject, payload.encode() if isinstance(payload, str) else payload

    nobody = vectors(FEED, "GBPUSD", Timeframe.M5, 1, seed=23)[0]
    cases: list[tuple[str, FeatureVector | tuple[str, bytes]]] = [
        ("feature_set_mismatch", msgspec.structs.replace(v, feature_set_id="fs-ffffffffffffffff")),
        ("no_model", nobody),
        ("bad_values", raw(text.replace(first, "null", 1))),
        ("bad_values", raw(text.replace(first, "NaN", 1))),
        ("bad_values", msgspec.structs.replace(v, open_time_ms=1, values=v.values[:-1])),
        ("bad_values", msgspec.structs.replace(v, open_time_ms=2, values=[*v.values, 1.0])),
        ("model_unusable", vectors(FEED, *broken, 1, seed=24)[0]),
        ("subject_mismatch", raw(enc(msgspec.structs.replace(v, symbol="GBPUSD")))),
        ("malformed_json", raw(b'{"type":"features","feed":')),
        ("unknown_schema_version", raw(text.replace('"v":1', '"v":7'))),
        ("missing_field", raw(text.replace(',"close":', ',"closed":'))),
    ]
    items: list[FeatureVector | tuple[str, bytes]] = list(good[:30])
    items += [payload for _, payload in cases]
    items += good[30:]
    # all on the stream before the worker starts: they come in one batch
    await publish(js, namespace, items)
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await eventually(lambda: consumed(js, namespace), what="all consumed")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    letters = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, namespace)
    ]
    assert sorted(d.reason for d in letters) == sorted(reason for reason, _ in cases)
    assert all(d.worker == DURABLE for d in letters)
    sent = {p[1] if isinstance(p, tuple) else enc(p) for _, p in cases}
    assert {d.payload for d in letters} == sent
    got = await scores_of(js, namespace)
    warm = [g for g in good if not g.warming_up]
    assert len(got) == len(warm) == 50
    assert (
        check_scores(
            got,
            warm,
            {version: booster},
            dict.fromkeys(((g.symbol, g.open_time_ms) for g in warm), version),
        )
        == []
    )
    sample = worker.metrics.registry.get_sample_value

    def outcome(name: str) -> float | None:
        return sample("tickwire_scorer_vectors_total", {"worker": DURABLE, "outcome": name})

    assert outcome("warming_up") == 10
    assert outcome("scored") == 50
    assert outcome("bad_values") == 4
    assert outcome("no_model") == outcome("feature_set_mismatch") == 1
    assert sample("tickwire_dead_letters_total", {"worker": DURABLE, "reason": "no_model"}) == 1
    assert sample("tickwire_messages_in_total", {"worker": DURABLE, "outcome": "ok"}) == 60


async def delivered_at_least(js: JetStreamContext, namespace: str, point: int) -> bool:
    stream = streams.stream_name(streams.FEATURES, namespace=namespace)
    try:
        info = await js.consumer_info(stream, DURABLE)
    except APIError:
        return False
    return info.delivered.stream_seq >= point


async def test_kill_9_in_the_middle_changes_no_byte_of_the_scores(
    stack: StackUrls, js: JetStreamContext, namespace: str, namespace_b: str, tmp_path: Path
) -> None:
    """The same vectors (some warming up, one bad) through an uninterrupted worker and
    through worker processes killed with SIGKILL mid-stream: SCORES end up byte-identical,
    nothing missing, nothing doubled."""
    chaos, calm = namespace, namespace_b
    eur = vectors(FEED, *EURUSD, 1000, seed=31, warming=20)
    us = vectors(FEED, *US500, 1000, seed=32, warming=20)
    bad = msgspec.structs.replace(eur[500], open_time_ms=1, values=eur[500].values[:3])
    payloads: list[FeatureVector | tuple[str, bytes]] = [
        x for pair in zip(eur, us, strict=True) for x in pair
    ]
    payloads.insert(900, bad)
    for ns in (calm, chaos):
        registry = await Registry.open(js, namespace=ns)
        for booster, series in ((train(1), EURUSD), (train(2, objective="multiclass"), US500)):
            assert (await registry.promote(await put(registry, booster, series)))[0]

    await publish(js, calm, payloads)
    calm_worker = build(settings(stack, calm))
    task = await run_worker(calm_worker)
    await eventually(lambda: consumed(js, calm), timeout=120, what="the calm run")
    calm_worker.stop()
    await asyncio.wait_for(task, 60)

    # small batches: a kill lands between publishes and acks more often
    env = worker_env(stack, chaos, handler_batch="40", fetch_batch="40")
    log = tmp_path / "model-scorer.log"
    total, chunk = len(payloads), 400
    kills = 0
    left: list[int] = []
    for start in range(0, total, chunk):
        await publish(js, chaos, payloads[start : start + chunk])
        proc = spawn(DURABLE, env, log)
        point = min(start + chunk // 2, total)
        await eventually(
            lambda point=point, proc=proc: (
                running(proc, log) and delivered_at_least(js, chaos, point)
            ),
            timeout=120,
            what=f"progress to seq {point}",
        )
        proc.kill()
        proc.wait()
        kills += 1
        info = await js.consumer_info(
            streams.stream_name(streams.FEATURES, namespace=chaos), DURABLE
        )
        left.append(info.delivered.stream_seq - info.ack_floor.stream_seq)
    async with started_worker(DURABLE, env, log) as proc:
        await eventually(lambda: consumed(js, chaos), timeout=180, what="the end")
    assert kills >= 5
    assert any(left), left
    assert proc.returncode == 0, log.read_text()[-3000:]

    calm_out = await stream_messages(js, streams.SCORES, calm)
    chaos_out = await stream_messages(js, streams.SCORES, chaos)
    assert len(calm_out) == 2 * (1000 - 20)
    assert Counter(chaos_out) == Counter(calm_out)  # byte for byte, none missing or doubled
    dead = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, chaos)
    ]
    assert [(d.reason, d.payload) for d in dead] == [("bad_values", msgspec.json.encode(bad))]


async def test_a_restart_after_the_duplicate_window_publishes_no_score_twice(
    stack: StackUrls, js: JetStreamContext, namespace: str, tmp_path: Path
) -> None:
    """A process killed after SCORES stored its first scores and before it acked their
    vectors, and down longer than the stream's duplicate window: its restart scores newer
    vectors first, then the vectors the killed one held, redelivered an ack wait later, and
    publishes the scores of those it had not published only."""
    window, ack_wait = 1.0, 20.0  # the restart scores the newer ones first, also on a busy machine
    registry = await Registry.open(js, namespace=namespace)
    boosters = {}
    version_of: dict[tuple[str, int], str] = {}
    eur = vectors(FEED, *EURUSD, 100, seed=41)
    us = vectors(FEED, *US500, 100, seed=42)
    for booster, series, sent in (
        (train(1), EURUSD, eur),
        (train(2, objective="multiclass"), US500, us),
    ):
        version = await put(registry, booster, series)
        assert (await registry.promote(version))[0]
        boosters[version] = booster
        version_of |= {(v.symbol, v.open_time_ms): version for v in sent}
    items: list[FeatureVector] = [x for pair in zip(eur, us, strict=True) for x in pair]
    held, newer = items[:80], items[80:]
    await publish(js, namespace, list(held))
    await shorten_windows(js, namespace, window)
    env = worker_env(
        stack,
        namespace,
        handler_batch="20",
        fetch_batch="20",
        test_duplicate_window_s=str(window),
        test_ack_wait_s=str(ack_wait),
    )
    log = tmp_path / "model-scorer.log"
    prefix = subjects.wildcard(subjects.SCORES, namespace=namespace).split("*")[0]
    await killed_after_its_first_publish(DURABLE, env, log, prefix)
    output = streams.stream_name(streams.SCORES, namespace=namespace)
    features = streams.stream_name(streams.FEATURES, namespace=namespace)
    before = await stored_messages(js, output)
    assert before, "killed after its first scores were stored"
    info = await js.consumer_info(features, DURABLE)
    assert info.ack_floor.stream_seq == 0  # their vectors not acked
    await publish(js, namespace, list(newer), as_specified=False)
    await window_gone_by(js, f"{namespace}_WINDOW", window)

    async with started_worker(DURABLE, env, log, module=CRASHING):
        await eventually(
            lambda: _count_at_least(js, namespace, len(before) + len(newer)),
            timeout=60,
            what="the newer vectors scored",
        )
        info = await js.consumer_info(features, DURABLE)
        # the held vectors come back behind the newer ones
        assert info.ack_floor.stream_seq == 0, "redelivered before the newer vectors were scored"
        await eventually(lambda: consumed(js, namespace), timeout=120, what="every vector")
    got = await stored_messages(js, output)
    assert doubled(got) == []
    scores = [msgspec.json.decode(p, type=Score) for _, p in got]
    assert check_scores(scores, items, boosters, version_of) == []


class _EarlyMarker:
    """A real registry watch whose "every pointer delivered" marker comes first, before the
    pointers already on their way: what nats-py does when they are in flight at the start
    of the watch (nats-io/nats.py#842)."""

    def __init__(self, watcher: Any) -> None:
        self._watcher = watcher
        self._sub = watcher._sub

    async def __aiter__(self) -> AsyncIterator[Any]:
        yield None
        async for entry in self._watcher:
            if entry is not None:
                yield entry

    async def stop(self) -> None:
        await self._watcher.stop()


async def test_scoring_starts_only_once_every_pointer_has_arrived(
    js: JetStreamContext, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = await Registry.open(js, namespace=namespace)
    booster = train(1)
    version = await put(registry, booster, EURUSD)
    assert (await registry.promote(version))[0]
    watch = Registry.watch_active

    async def early(self: Registry) -> _EarlyMarker:
        return _EarlyMarker(await watch(self))

    monkeypatch.setattr(Registry, "watch_active", early)
    models = ActiveModels(registry)
    try:
        await models.start(timeout_s=30)
        model = await models.model_for(models.key(FEED, *EURUSD))
        assert model is not None
        assert model.version == version
    finally:
        await models.stop()


async def test_a_model_whose_file_was_lost_is_not_shown_active_and_scores_once_put_back(
    js: JetStreamContext, namespace: str, stack: StackUrls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The active-model gauge names only a version that scores; putting the same bytes back
    repairs the registry, and the scorer takes the version up again without a restart."""
    registry = await Registry.open(js, namespace=namespace)
    booster = train(1)
    version = await put(registry, booster, EURUSD)
    assert (await registry.promote(version))[0]
    objects = await js.object_store(registry.bucket)
    await objects.delete(f"{version}.model")

    worker: Worker[FeatureVector] = Worker(
        NAME,
        stream="FEATURES",
        durable=NAME,
        codec=VectorCodec(FeatureVector),
        settings=settings(stack, namespace),
    )
    metrics = Metrics(worker)
    labels = {"worker": NAME, "key": active_key(FEED, *EURUSD), "version": version}

    def shown() -> float | None:
        return worker.metrics.registry.get_sample_value("tickwire_scorer_active_model", labels)

    monkeypatch.setattr(models_module, "RETRY_UNUSABLE_S", 0.0)
    models = ActiveModels(registry, on_change=metrics.show_active)
    try:
        await models.start(timeout_s=30)
        key = models.key(FEED, *EURUSD)
        with pytest.raises(ModelError, match="artifact is missing"):
            await models.model_for(key)
        assert shown() in (None, 0.0)

        assert (
            await registry.put(booster.model_to_string().encode(), card_for(booster, FEED, *EURUSD))
            == version
        )
        model = await models.model_for(key)
        assert model is not None
        assert model.version == version
        assert shown() == 1.0
    finally:
        await models.stop()
