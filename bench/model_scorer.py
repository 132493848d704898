"""model-scorer: single-vector latency, vectors/s end to end, and the in-process scoring
path, against ``Booster.predict`` on the same arrays in the same run.

- latency: one FeatureVector published, its Score awaited on a plain subscription, again
  and again; p50 and p99 against the target of 2 ms (and the same loop with nothing but a
  JetStream publish and its echo, as the floor the machine allows).
- end to end: vectors already on FEATURES when the worker starts; from its first pull until
  every one is acked, its Score published and acked by JetStream.
- in process: decode, matrix, predict and encode of the same payloads in batches of the
  worker's size, without NATS; once with the small model the tests train (24 trees of 7
  leaves, where predict costs next to nothing) and once with a model the size the trainer
  makes at most (``workers.trainer.train.Params``: 300 rounds of 15 leaves).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import lightgbm
import msgspec
import nats
import numpy as np
from nats.aio.client import Client
from tqdm import tqdm

from bench.report import Figure, counted
from contracts import streams, subjects
from contracts.codec import encode
from contracts.messages import FeatureVector, Timeframe
from infra.stack import StackUrls
from tests.scorer_models import NAMES, card_for, train, vectors
from workers.model_scorer import scoring
from workers.model_scorer.app import Settings, build
from workers.registry import Registry, bucket_name
from workers.trainer.train import Params

NS = "benchms"
FEED = "bench"
BATCH = 1000


def _stream(symbols: int, per_symbol: int) -> list[FeatureVector]:
    parts = [vectors(FEED, f"SYM{k:03d}", Timeframe.M1, per_symbol, seed=k) for k in range(symbols)]
    return [v for i in range(per_symbol) for v in (p[i] for p in parts)]


async def _registry(js: nats.js.JetStreamContext, symbols: int) -> None:
    """A model of its own per symbol (the same bytes would be one version of one key)."""
    registry = await Registry.open(js, namespace=NS)
    for k in range(symbols):
        booster = train(k + 1)
        card = card_for(booster, FEED, f"SYM{k:03d}", Timeframe.M1)
        version = await registry.put(booster.model_to_string().encode(), card)
        await registry.promote(version, force=True)


async def _publish(js: nats.js.JetStreamContext, items: list[FeatureVector]) -> None:
    pending = []
    for v in items:
        subject = subjects.features(v.feed, v.symbol, v.tf, namespace=NS)
        pending.append(await js.publish_async(subject, encode(v)))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def _cleanup(js: nats.js.JetStreamContext) -> None:
    for spec in streams.stream_specs(namespace=NS):
        with contextlib.suppress(Exception):
            await js.delete_stream(spec.name)
    with contextlib.suppress(Exception):
        await js.delete_object_store(bucket_name(NS))
    with contextlib.suppress(Exception):
        await js.delete_key_value(bucket_name(NS))


async def _round_trips(nc: Client, items: list[FeatureVector], out: str) -> list[float]:
    """Seconds from publishing each vector to receiving a message on ``out``."""
    js = nc.jetstream()
    got: asyncio.Queue[None] = asyncio.Queue()

    async def on_msg(_: object) -> None:
        got.put_nowait(None)

    sub = await nc.subscribe(out, cb=on_msg)
    times = []
    for v in tqdm(items, desc="latency", unit="vector", disable=None):
        subject = subjects.features(v.feed, v.symbol, v.tf, namespace=NS)
        t0 = time.perf_counter()
        await js.publish(subject, encode(v))
        await asyncio.wait_for(got.get(), 10)
        times.append(time.perf_counter() - t0)
    await sub.unsubscribe()
    return times


async def _measure(urls: StackUrls, symbols: int, per_symbol: int) -> dict[str, float]:
    nc = await nats.connect(str(urls.nats_url))
    js = nc.jetstream()
    booster = train(1)  # SYM000's model
    result: dict[str, float] = {}
    try:
        await _cleanup(js)
        await streams.ensure(js, streams.stream_specs(namespace=NS))
        await _registry(js, symbols)
        items = _stream(symbols, per_symbol)
        await _publish(js, items)

        worker = build(Settings(nats_url=urls.nats_url, namespace=NS, handler_batch=BATCH))
        task = asyncio.create_task(worker.run())
        await worker.started.wait()
        labels = {"worker": worker.name, "outcome": "ok"}
        elapsed = await counted(
            worker.metrics.registry, "tickwire_messages_in_total", labels, len(items)
        )
        result["end_to_end"] = len(items) / elapsed

        # one at a time: the next vector of the same series, the score on a plain subscription
        single = vectors(FEED, "SYM000", Timeframe.M1, 1000, seed=0, start=per_symbol)
        out = subjects.scores(FEED, "SYM000", Timeframe.M1, namespace=NS)
        lat = await _round_trips(nc, single[:500], out)
        worker.stop()
        await task
        # the floor: a JetStream publish and its echo on the same subject, no worker
        echo = await _round_trips(
            nc, single[500:], subjects.wildcard(subjects.FEATURES, namespace=NS)
        )
        result["p50"], result["p99"] = _pct(lat, 50), _pct(lat, 99)
        result["echo_p50"], result["echo_p99"] = _pct(echo, 50), _pct(echo, 99)

        payloads = [encode(v) for v in items]
        result["in_process"], result["predict"] = _in_process(booster, payloads)
        big = _trainer_sized()
        result["in_process_big"], result["predict_big"] = _in_process(big, payloads)
        result["trees_big"] = big.num_trees()
    finally:
        await _cleanup(js)
        await nc.close()
    return result


def _trainer_sized(seed: int = 1) -> lightgbm.Booster:
    """A booster as large as the trainer makes: every round of ``Params``, no early stop."""
    params = Params()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20_000, len(NAMES)))
    signal = x[:, 0] + 0.5 * x[:, 1] - 0.3 * x[:, 2] + rng.normal(scale=1.0, size=len(x))
    data = lightgbm.Dataset(x, (signal > 0).astype(int), feature_name=NAMES)
    return lightgbm.train(params.lightgbm(), data, num_boost_round=params.rounds)


def _pct(xs: list[float], p: int) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, p))


def _in_process(
    booster: lightgbm.Booster, payloads: list[bytes], repeats: int = 3
) -> tuple[float, float]:
    """Vectors/s of decode + matrix + predict + encode, and of Booster.predict alone on the
    same arrays in the same batches (best of ``repeats`` each)."""
    codec = scoring.VectorCodec(FeatureVector)
    first = codec.decode(payloads[0])
    card = msgspec.structs.replace(
        card_for(booster, FEED, first.symbol, first.tf), version="0" * 16
    )
    model = scoring.Model.load(card, booster)
    arrays = [
        np.array([codec.decode(p).values for p in payloads[i : i + BATCH]])[:, model.columns]
        for i in range(0, len(payloads), BATCH)
    ]
    path, bare = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(payloads), BATCH):
            vs = [codec.decode(p) for p in payloads[i : i + BATCH]]
            values = np.array([v.values for v in vs], dtype=np.float64)
            for s in scoring.scores(vs, model, values):
                encode(s)
        path.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x in arrays:
            booster.predict(x, num_threads=1)
        bare.append(time.perf_counter() - t0)
    n = len(payloads)
    return n / min(path), n / min(bare)


def measure(urls: StackUrls) -> list[Figure]:
    print("model-scorer: 40,000 vectors of 20 symbols, latency and end to end ...", flush=True)
    r = asyncio.run(_measure(urls, 20, 2_000))
    return [
        Figure(
            "model-scorer, single vector p50",
            r["p50"] * 1000,
            "us",
            "2 ms target",
            2000.0,
            lower_is_better=True,
        ),
        Figure(
            "model-scorer, single vector p99",
            r["p99"] * 1000,
            "us",
            "2 ms target",
            2000.0,
            lower_is_better=True,
        ),
        Figure(
            "JetStream publish + echo p99 (floor)",
            r["echo_p99"] * 1000,
            "us",
            "2 ms target",
            2000.0,
            lower_is_better=True,
        ),
        Figure(
            "model-scorer, vectors to scores",
            r["end_to_end"],
            "vectors/s",
            "Booster.predict, same arrays",
            r["predict"],
            0.5,
            50_000,
        ),
        Figure(
            "scoring path in process",
            r["in_process"],
            "vectors/s",
            "Booster.predict, same arrays",
            r["predict"],
            0.5,
            50_000,
        ),
        Figure(
            f"scoring path in process, trainer-size model ({r['trees_big']:.0f} trees)",
            r["in_process_big"],
            "vectors/s",
            "Booster.predict, same arrays",
            r["predict_big"],
            0.5,
            50_000,
        ),
    ]
