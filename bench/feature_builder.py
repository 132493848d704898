"""feature-builder end to end against a bare consumer of the same stream, and the feature
library's incremental form against its batch form over the same candles.

Candles are already on CANDLES when each consumer starts, so the end-to-end figure is a
drain rate: from the moment the worker asks for candles until every one is acked, with
every feature vector published to FEATURES and acked by JetStream. The baseline only
decodes and acks. Each runs twice, taking turns with the other, and gives its best run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from bench import bare, partitioned
from bench.report import Figure, best_in_turn, counted
from contracts import streams, subjects
from contracts.messages import Candle, Timeframe
from infra.stack import StackUrls
from workers.feature_builder.app import Settings, build
from workers.features import DEFAULT, Candles

START_MS = 1_741_038_600_000
RUNS = 2
"""Runs of the worker and of the bare consumer, in turn; each figure is the best of its own."""


def _series(symbol: str, n: int, rng: random.Random) -> list[Candle]:
    """A random-walk M1 series of ``n`` candles."""
    out = []
    price = rng.uniform(1.0, 2000.0)
    for i in range(n):
        t = START_MS + i * 60_000
        o = price
        c = round(o * math.exp(rng.gauss(0, 3e-4)), 5)
        h = round(max(o, c) * (1 + abs(rng.gauss(0, 1e-4))), 5)
        lo = round(min(o, c) * (1 - abs(rng.gauss(0, 1e-4))), 5)
        out.append(
            Candle(
                feed="bench",
                symbol=symbol,
                tf=Timeframe.M1,
                open_time_ms=t,
                close_time_ms=t + 60_000,
                open=o,
                high=max(h, o, c),
                low=min(lo, o, c),
                close=c,
                tick_volume=rng.randint(1, 200),
                spread_mean=round(o * 3e-5, 6),
                first_tick_ms=t,
                last_tick_ms=t + 59_000,
            )
        )
        price = c
    return out


def _candles(symbols: int, per_symbol: int) -> list[Candle]:
    rng = random.Random(5)
    parts = [_series(f"SYM{k:03d}", per_symbol, rng) for k in range(symbols)]
    return [c for i in range(per_symbol) for c in (p[i] for p in parts)]


async def _publish(js: nats.js.JetStreamContext, ns: str, candles: list[Candle]) -> None:
    await streams.ensure(js, streams.stream_specs(namespace=ns))
    pending = []
    enc = msgspec.json.Encoder()
    for c in candles:
        subject = subjects.candles(c.feed, c.symbol, c.tf, namespace=ns)
        pending.append(await js.publish_async(subject, enc.encode(c)))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def _bare(nc: Client, ns: str, messages: int) -> float:
    js = nc.jetstream()
    stream = streams.stream_name(streams.CANDLES, namespace=ns)
    durable = f"bare{random.randrange(1 << 30)}"
    await js.add_consumer(
        stream,
        ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )
    elapsed = await bare.drain(nc, stream, durable, msgspec.json.Decoder(Candle).decode, messages)
    await js.delete_consumer(stream, durable)
    return messages / elapsed


async def _worker(urls: StackUrls, ns: str, messages: int) -> float:
    worker = build(Settings(nats_url=urls.nats_url, namespace=ns, metrics_port=0))
    task = asyncio.create_task(worker.run())
    await worker.started.wait()
    labels = {"worker": worker.name, "outcome": "ok"}
    elapsed = await counted(worker.metrics.registry, "tickwire_messages_in_total", labels, messages)
    worker.stop()
    await task
    return messages / elapsed


async def _end_to_end(urls: StackUrls, symbols: int, per_symbol: int) -> tuple[float, float, float]:
    """Candles/s of one worker, of two partitions (one process each), and of the bare
    consumer, on the same candles. The worker and the bare consumer run ``RUNS`` times
    each, in turn, each worker run on a stream of its own; each gives its best run."""
    runs, split = [f"benchfb{k}" for k in range(RUNS)], "benchfbp"
    nc = await nats.connect(str(urls.nats_url))
    js = nc.jetstream()
    try:
        candles = _candles(symbols, per_symbol)
        for name in (*runs, split):
            await _publish(js, name, candles)
        rate, baseline = await best_in_turn(
            runs,
            lambda name: _worker(urls, name, len(candles)),
            lambda: _bare(nc, runs[0], len(candles)),
            "candles/s",
        )
        scaled = await partitioned.drain_rate(
            str(urls.nats_url),
            "feature-builder",
            {"TICKWIRE_NAMESPACE": split},
            streams.stream_name(streams.CANDLES, namespace=split),
            len(candles),
        )
        return rate, scaled, baseline
    finally:
        for name in (*runs, split):
            for spec in streams.stream_specs(namespace=name):
                with contextlib.suppress(Exception):
                    await js.delete_stream(spec.name)
        await nc.close()


def _library(n: int, repeats: int = 3) -> tuple[float, float]:
    """Nanoseconds per candle: stepping one engine through ``n`` candles, and the batch
    form over the same candles (best of ``repeats`` each)."""
    bars = _series("LIB", n, random.Random(9))
    candles = Candles.from_bars(bars)
    step, batch = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        DEFAULT.engine().run(bars)
        step.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        DEFAULT.batch(candles)
        batch.append(time.perf_counter() - t0)
    return min(step) / n * 1e9, min(batch) / n * 1e9


def measure(urls: StackUrls) -> list[Figure]:
    print("feature-builder: 100,000 candles of 50 symbols, end to end ...", flush=True)
    rate, scaled, baseline = asyncio.run(_end_to_end(urls, 50, 2_000))
    print("feature library: 50,000 candles, incremental and batch ...", flush=True)
    step_ns, batch_ns = _library(50_000)
    return [
        Figure(
            "feature-builder, candles to vectors",
            rate,
            "candles/s",
            "bare decode-only",
            baseline,
            None,
            20_000,
        ),
        Figure(
            "feature-builder, candles to vectors, 2 partitions",
            scaled,
            "candles/s",
            "bare decode-only (1 process)",
            baseline,
            None,
            20_000,
        ),
        Figure(
            f"feature library, incremental ({len(DEFAULT.names)} values)",
            step_ns,
            "ns/candle",
            "batch form, same candles",
            batch_ns,
        ),
    ]
