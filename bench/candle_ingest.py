"""candle-ingest end to end against a bare nats-py consumer that only decodes the same stream.

Ticks are already on the stream when each consumer starts, so every figure is a drain rate:
from the moment the consumer asks for messages until every message is acked. The worker's
figure includes validation, aggregation into 7 timeframes, QuestDB writes and CANDLES
publishes; the baseline only decodes and acks. Each runs twice, taking turns with the
other, and gives its best run: one slow moment of a busy machine does not decide a ratio.
Peak RSS is the worker process's high-water mark after holding 1,000 symbols x 7
timeframes open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from bench import bare, partitioned
from bench.report import Figure, best_in_turn, counted
from contracts import streams, subjects
from contracts.messages import Tick, TickBatch, TickRow
from infra.stack import StackUrls
from workers.candle_ingest.app import Settings, build

START_MS = 1_741_038_600_000
RUNS = 2
"""Runs of the worker and of the bare consumer, in turn; each figure is the best of its own."""


def _batches(
    symbols: int, per_message: int, messages: int, seed: int = 1
) -> list[tuple[str, bytes]]:
    """(symbol, payload) round-robin over symbols, ~0.25 s between a symbol's ticks."""
    rng = random.Random(seed)
    names = [f"SYM{i:04d}" for i in range(symbols)]
    clock = dict.fromkeys(names, START_MS)
    mid = {s: rng.uniform(1, 1000) for s in names}
    enc = msgspec.json.Encoder()
    out = []
    for n in range(messages):
        s = names[n % symbols]
        rows = []
        for _ in range(per_message):
            clock[s] += rng.randint(50, 450)
            mid[s] *= 1 + rng.gauss(0, 1e-4)
            bid = round(mid[s], 5)
            rows.append(TickRow(time_ms=clock[s], bid=bid, ask=round(bid + 0.0002, 5)))
        if per_message == 1:
            r = rows[0]
            msg: Tick | TickBatch = Tick(
                feed="bench", symbol=s, time_ms=r.time_ms, bid=r.bid, ask=r.ask
            )
        else:
            msg = TickBatch(feed="bench", symbol=s, ticks=rows)
        out.append((s, enc.encode(msg)))
    return out


async def _publish(js: nats.js.JetStreamContext, ns: str, items: list[tuple[str, bytes]]) -> None:
    await streams.ensure(js, streams.stream_specs(namespace=ns))
    pending = []
    for s, payload in items:
        pending.append(await js.publish_async(subjects.ticks("bench", s, namespace=ns), payload))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def _bare(nc: Client, ns: str, messages: int, per_message: int) -> float:
    """The fastest bare consumer: one subscription, batched pull requests, decode, ack."""
    js = nc.jetstream()
    stream = streams.stream_name(streams.TICKS, namespace=ns)
    durable = f"bare{random.randrange(1 << 30)}"
    await js.add_consumer(
        stream,
        ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )
    decode = msgspec.json.Decoder(TickBatch if per_message > 1 else Tick).decode
    elapsed = await bare.drain(nc, stream, durable, decode, messages)
    await js.delete_consumer(stream, durable)
    return messages * per_message / elapsed


def _settings(urls: StackUrls, ns: str, **kw: object) -> Settings:
    return Settings(
        nats_url=urls.nats_url,
        namespace=ns,
        questdb_ilp=urls.questdb_ilp_conf,
        questdb_http=urls.questdb_http,
        idle_close=False,
        metrics_port=0,
        **kw,  # type: ignore[arg-type]
    )


async def _worker(urls: StackUrls, ns: str, ticks: int) -> float:
    worker = build(_settings(urls, ns))
    task = asyncio.create_task(worker.run())
    await worker.started.wait()
    elapsed = await counted(
        worker.metrics.registry,
        "tickwire_ticks_in_total",
        {"worker": "candle-ingest", "outcome": "accepted"},
        ticks,
    )
    worker.stop()
    await task
    return ticks / elapsed


async def _cleanup(js: nats.js.JetStreamContext, ns: str) -> None:
    for spec in streams.stream_specs(namespace=ns):
        with contextlib.suppress(Exception):
            await js.delete_stream(spec.name)
    with contextlib.suppress(Exception):
        await js.delete_object_store(f"ns-{ns}-candle-ingest-state")


def _env(urls: StackUrls, ns: str) -> dict[str, str]:
    """A worker process's settings, as for ``_settings``."""
    return {
        "TICKWIRE_NAMESPACE": ns,
        "TICKWIRE_QUESTDB_ILP": str(urls.questdb_ilp_conf),
        "TICKWIRE_QUESTDB_HTTP": str(urls.questdb_http),
        "TICKWIRE_IDLE_CLOSE": "false",
    }


def _peak_rss(urls: StackUrls, ns: str, messages: int) -> float:
    """MB high-water mark of a worker process that consumed ``messages`` ticks."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(urls.nats_url),
        "TICKWIRE_LOG_LEVEL": "WARNING",
        **_env(urls, ns),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "run", "candle-ingest"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )

    async def wait_consumed() -> None:
        nc = await nats.connect(str(urls.nats_url))
        js = nc.jetstream()
        stream = streams.stream_name(streams.TICKS, namespace=ns)
        while True:
            with contextlib.suppress(Exception):
                info = await js.consumer_info(stream, "candle-ingest")
                if info.ack_floor.stream_seq >= messages:
                    break
            await asyncio.sleep(0.2)  # timing a benchmark run
        await nc.close()

    try:
        asyncio.run(asyncio.wait_for(wait_consumed(), 300))
        status = Path(f"/proc/{proc.pid}/status").read_text()
        hwm_kb = next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return hwm_kb / 1024


async def _throughput(
    urls: StackUrls, ns: str, per_message: int, messages: int, symbols: int
) -> tuple[float, float, float]:
    """Ticks/s of one worker, of two partitions (one process each), and of the bare
    consumer, on the same ticks. The worker and the bare consumer run ``RUNS`` times each,
    in turn, each worker run on a stream of its own; each gives its best run."""
    nc = await nats.connect(str(urls.nats_url))
    js = nc.jetstream()
    split = f"{ns}p"
    runs = [f"{ns}{k}" for k in range(RUNS)]
    try:
        items = _batches(symbols, per_message, messages)
        for name in (*runs, split):
            await _publish(js, name, items)
        rate, bare_rate = await best_in_turn(
            runs,
            lambda name: _worker(urls, name, messages * per_message),
            lambda: _bare(nc, runs[0], messages, per_message),
            "ticks/s",
        )
        stream = streams.stream_name(streams.TICKS, namespace=split)
        env = _env(urls, split)
        scaled = await partitioned.drain_rate(
            str(urls.nats_url), "candle-ingest", env, stream, messages
        )
        return rate, scaled * per_message, bare_rate
    finally:
        for name in (*runs, split):
            await _cleanup(js, name)
        await nc.close()


def measure(urls: StackUrls) -> list[Figure]:
    print("candle-ingest: 100-tick batches ...", flush=True)
    batch_rate, batch_split, batch_bare = asyncio.run(_throughput(urls, "benchb", 100, 40_000, 20))
    print("candle-ingest: single-tick messages ...", flush=True)
    single_rate, single_split, single_bare = asyncio.run(
        _throughput(urls, "benchs", 1, 200_000, 20)
    )
    print("candle-ingest: 1,000 symbols x 7 timeframes open, peak RSS ...", flush=True)

    async def fill() -> None:
        nc = await nats.connect(str(urls.nats_url))
        await _publish(nc.jetstream(), "benchm", _batches(1000, 50, 2000))
        await nc.close()

    asyncio.run(fill())
    rss = _peak_rss(urls, "benchm", 2000)

    async def clean() -> None:
        nc = await nats.connect(str(urls.nats_url))
        await _cleanup(nc.jetstream(), "benchm")
        await nc.close()

    asyncio.run(clean())
    return [
        Figure(
            "candle-ingest, 100-tick batches",
            batch_rate,
            "ticks/s",
            "bare decode-only",
            batch_bare,
            0.4,
            400_000,
        ),
        Figure(
            "candle-ingest, 100-tick batches, 2 partitions",
            batch_split,
            "ticks/s",
            "bare decode-only (1 process)",
            batch_bare,
            0.4,
            400_000,
        ),
        Figure(
            "candle-ingest, single-tick messages",
            single_rate,
            "ticks/s",
            "bare decode-only",
            single_bare,
            0.5,
        ),
        Figure(
            "candle-ingest, single-tick messages, 2 partitions",
            single_split,
            "ticks/s",
            "bare decode-only (1 process)",
            single_bare,
            0.5,
        ),
        Figure(
            "candle-ingest peak RSS, 1,000 symbols x 7 TF",
            rss,
            "MB",
            "limit",
            300.0,
            None,
            None,
            lower_is_better=True,
        ),
    ]
