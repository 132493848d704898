"""The worker runtime's consume rate against bare nats-py consumers on the same stream.

One stream of single-tick JSON messages (~110 bytes, as an EA publishing one tick per
message sends them). Each consumer gets its own durable consumer, decodes every message
into a ``Tick`` and acks it:

- ``nats-py fetch``: ``pull_subscribe`` + ``fetch(1000)`` + ``msg.ack()``, the bare client
  as documented;
- ``raw MSG.NEXT``: the fastest bare consumer we can write, one subscription plus batched
  pull requests and an ack per message, no bookkeeping at all;
- ``runtime``: ``workers.runtime.Worker`` with a handler that does nothing, so the figure is
  the runtime's own cost (decode, dead-letter checks, metrics, acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from bench import bare
from bench.report import Figure, median_rate
from contracts.codec import Codec
from contracts.messages import Tick, TickInput
from workers.runtime.settings import RuntimeSettings
from workers.runtime.worker import Batch, Context, Worker

STREAM = "BENCH_RUNTIME"
SUBJECT = "bench.runtime.ticks"


async def _fill(js: nats.js.JetStreamContext, n: int) -> None:
    enc = msgspec.json.Encoder()
    futures = []
    for i in range(n):
        tick = Tick(
            feed="bench", symbol="EURUSD", time_ms=1_700_000_000_000 + i, bid=1.1, ask=1.1001
        )
        futures.append(await js.publish_async(SUBJECT, enc.encode(tick)))
        if len(futures) >= 2000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)


async def _consumer(js: nats.js.JetStreamContext, name: str) -> str:
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=60, max_ack_pending=-1
        ),
    )
    return name


async def bare_fetch(nc: Client, n: int, run: int) -> float:
    js = nc.jetstream()
    durable = await _consumer(js, f"fetch{run}")
    sub = await js.pull_subscribe(SUBJECT, durable=durable, stream=STREAM)
    decode = msgspec.json.Decoder(Tick).decode
    done = 0
    t0 = time.perf_counter()
    while done < n:
        for msg in await sub.fetch(1000, timeout=5):
            decode(msg.data)
            await msg.ack()
            done += 1
    await nc.flush()
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return elapsed


async def bare_raw(nc: Client, n: int, run: int) -> float:
    js = nc.jetstream()
    durable = await _consumer(js, f"raw{run}")
    return await bare.drain(nc, STREAM, durable, msgspec.json.Decoder(Tick).decode, n)


async def runtime(nats_url: str, n: int, run: int) -> float:
    nc = await nats.connect(nats_url)
    durable = await _consumer(nc.jetstream(), f"rt{run}")
    await nc.close()
    worker: Worker[TickInput] = Worker(
        f"bench-rt{run}",
        stream=STREAM,
        durable=durable,
        codec=Codec(TickInput),
        settings=RuntimeSettings(nats_url=nats_url, fetch_batch=1000, handler_batch=1000),
    )
    done = 0
    finished = asyncio.Event()

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        nonlocal done
        done += len(batch)
        if done >= n:
            finished.set()

    task = asyncio.create_task(worker.run())
    await worker.started.wait()
    t0 = time.perf_counter()
    await finished.wait()
    await worker.context.nc.flush()  # acks on the wire
    elapsed = time.perf_counter() - t0
    worker.stop()
    await task
    return elapsed


async def measure(nats_url: str, n: int = 200_000, repeats: int = 3) -> list[Figure]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT]))
    print(f"runtime: publishing {n:,} single-tick messages ...", flush=True)
    await _fill(js, n)
    runs = iter(range(1000))
    fetch = await median_rate(n, lambda: bare_fetch(nc, n, next(runs)), repeats)
    raw = await median_rate(n, lambda: bare_raw(nc, n, next(runs)), repeats)
    rt = await median_rate(n, lambda: runtime(nats_url, n, next(runs)), repeats)
    await js.delete_stream(STREAM)
    await nc.close()
    return [
        Figure("runtime consume (1 tick/msg)", rt, "msg/s", "nats-py fetch()", fetch),
        Figure("runtime consume (1 tick/msg)", rt, "msg/s", "raw MSG.NEXT", raw),
    ]
