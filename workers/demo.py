"""``make demo``: the main job on a local stack, and an honest account of what runs.

Today it sets up everything the pipeline stands on and drives ticks through the shared
worker runtime: local NATS, PostgreSQL and QuestDB; migrations; QuestDB tables; JetStream
streams and consumers; EA-style ticks from two feeds (one malformed on purpose) consumed,
dead-lettered and acked by the runtime. It then lists the workers not built yet.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts import subjects
from contracts.codec import Codec, encode
from contracts.messages import Tick, TickInput
from contracts.streams import TICKS, consumer_specs, ensure, stream_name, stream_specs
from workers.cli import WORKERS
from workers.runtime.settings import RuntimeSettings
from workers.runtime.worker import Batch, Context, Worker

FEEDS = ("icmarkets-live", "pepperstone-demo")
SYMBOLS = ("EURUSD", "US500.cash", "XAUUSD")
PROBE = "demo-probe"
"""The demo's own durable on TICKS: it never takes messages from a pipeline worker."""


@dataclass
class Tally:
    published: int = 0
    handled: int = 0
    dead: int = 0
    by_feed: dict[str, int] = field(default_factory=dict)


def _ticks(n: int, seed: int = 7) -> list[Tick]:
    rng = random.Random(seed)
    t0 = 1_763_800_000_000
    mids = {"EURUSD": 1.1650, "US500.cash": 6650.0, "XAUUSD": 4050.0}
    out = []
    for i, (feed, symbol) in zip(range(n), itertools.cycle(itertools.product(FEEDS, SYMBOLS))):
        mids[symbol] *= 1 + rng.gauss(0, 2e-5)
        spread = mids[symbol] * 1e-5 * (1 + rng.random())
        bid = round(mids[symbol], 5)
        out.append(
            Tick(
                feed=feed,
                symbol=symbol,
                time_ms=t0 + i * 25,
                bid=bid,
                ask=round(bid + spread, 5),
                seq=i,
            )
        )
    return out


async def _drive(nats_url: str, n: int) -> Tally:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    report = await ensure(js, stream_specs(), consumer_specs())
    created = [k for k, v in report.items() if v != "unchanged"]
    print(f"  streams and consumers: {len(report)} ensured ({len(created)} created or updated)")
    tally = Tally()
    futures = []
    for tick in _ticks(n):
        futures.append(await js.publish_async(subjects.ticks(tick.feed, tick.symbol), encode(tick)))
        tally.published += 1
    futures.append(await js.publish_async(subjects.ticks(FEEDS[0], "EURUSD"), b'{"type":"tick",'))
    tally.published += 1
    acks = await asyncio.gather(*futures)

    # the demo reads what it just published on a durable of its own
    if await _exists(js, PROBE):
        await js.delete_consumer(stream_name(TICKS), PROBE)
    await js.add_consumer(
        stream_name(TICKS),
        ConsumerConfig(
            durable_name=PROBE,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=acks[0].seq,
        ),
    )
    await nc.close()

    worker: Worker[TickInput] = Worker(
        PROBE,
        stream=stream_name(TICKS),
        durable=PROBE,
        codec=Codec(TickInput),
        settings=RuntimeSettings(nats_url=nats_url),
    )

    all_good = asyncio.Event()

    @worker.handler
    async def count(batch: Batch[TickInput], ctx: Context) -> None:
        for d in batch:
            tally.handled += 1
            tally.by_feed[d.value.feed] = tally.by_feed.get(d.value.feed, 0) + 1
        if tally.handled >= n:
            all_good.set()

    task = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(all_good.wait(), 120)
    finally:
        worker.stop()  # the batch in hand (with the malformed tick) is finished first
        await task
    tally.dead = _dead(worker)
    nc = await nats.connect(nats_url)
    await nc.jetstream().delete_consumer(stream_name(TICKS), PROBE)
    await nc.close()
    return tally


async def _exists(js: nats.js.JetStreamContext, durable: str) -> bool:
    try:
        await js.consumer_info(stream_name(TICKS), durable)
    except nats.js.errors.NotFoundError:
        return False
    return True


def _dead(worker: Worker[TickInput]) -> int:
    value = worker.metrics.registry.get_sample_value(
        "tickwire_messages_in_total", {"worker": worker.name, "outcome": "dead_letter"}
    )
    return int(value or 0)


def main(*, keep: bool = False, ticks: int = 5_000) -> int:
    from db.migrate import migrate
    from db.questdb import apply_ddl
    from infra.stack import REPO, LocalStack, describe

    root = REPO / ".stack" / "demo"
    print(f"tickwire demo: starting the local stack in {root} ...", flush=True)
    with LocalStack(root) as stack:
        urls = stack.urls
        assert urls.nats_url
        assert urls.postgres_dsn
        assert urls.questdb_http
        print(describe(urls))
        applied = asyncio.run(migrate(urls.postgres_dsn))
        print(f"  PostgreSQL migrations: {len(applied)} applied this run")
        apply_ddl(urls.questdb_http)
        print("  QuestDB tables: ready")
        started = time.perf_counter()
        tally = asyncio.run(_drive(urls.nats_url, ticks))
        elapsed = time.perf_counter() - started
        print()
        print("summary")
        print(f"  ticks published        {tally.published:,} (one malformed on purpose)")
        print(f"  handled by the runtime {tally.handled:,}  {tally.by_feed}")
        print(f"  dead letters           {tally.dead} (on dlq.{PROBE})")
        print(f"  wall time              {elapsed:.1f}s")
        print()
        missing = [name for name, module in WORKERS.items() if not _importable(module)]
        if missing:
            print("not built yet: " + ", ".join(missing))
            print("so no candles, features, scores or signals are produced by this demo yet.")
        if keep:
            print("\nstack running; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
