"""``make demo``: the main job on a local stack, and an honest account of what runs.

It starts NATS, PostgreSQL and QuestDB (in ``.stack/demo``, reused by the next run),
applies the migrations, creates the streams, runs every worker that is built (today:
candle-ingest, feature-builder on its candles, then timescale-replicator on both) and feeds it the last half hour of
EA-style ticks from two feeds at accelerated speed, one malformed message among them. It
ends with a summary and lists the workers that are not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import random
import time
from dataclasses import dataclass, field

import nats

from contracts import streams, subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import Tick, TickBatch, TickInput, Watermark
from infra.stack import StackUrls
from workers.candle_ingest.app import Settings, build
from workers.cli import WORKERS
from workers.features.featureset import DEFAULT

FEEDS = ("icmarkets-live", "pepperstone-demo")
SYMBOLS = ("EURUSD", "US500.cash", "XAUUSD")
MIDS = {"EURUSD": 1.1650, "US500.cash": 6650.0, "XAUUSD": 4050.0}


@dataclass
class Summary:
    published: int = 0
    accepted: float = 0.0
    candles: dict[str, float] = field(default_factory=dict)
    dead: dict[str, float] = field(default_factory=dict)
    replicated: dict[str, float] = field(default_factory=dict)
    vectors: float = 0.0
    warming: float = 0.0
    latency_p50: float | None = None
    latency_p99: float | None = None
    metrics_url: str = ""


def _ticks(n: int, start_ms: int, end_ms: int, seed: int) -> list[Tick]:
    """``n`` ticks between ``start_ms`` and ``end_ms``, round-robin over feeds and symbols."""
    rng = random.Random(seed)
    mids = dict(MIDS)
    step = max(1, (end_ms - start_ms) // n)
    out = []
    pairs = itertools.cycle(itertools.product(FEEDS, SYMBOLS))
    for i, (feed, symbol) in zip(range(n), pairs, strict=False):
        mids[symbol] *= 1 + rng.gauss(0, 2e-5)
        digits = 5 if mids[symbol] < 10 else 2
        bid = round(mids[symbol], digits)
        spread = round(mids[symbol] * 1e-5 * (1 + rng.random()), digits) or 10**-digits
        out.append(
            Tick(
                feed=feed,
                symbol=symbol,
                time_ms=end_ms - (n - i) * step,
                bid=bid,
                ask=round(bid + spread, digits),
                seq=end_ms // 1000 + i,
            )
        )
    return out


async def _latest_event_ms(js: nats.js.JetStreamContext) -> int:
    """Event time of the newest tick or watermark already on TICKS (0 if none)."""
    stream = streams.stream_name(streams.TICKS)
    last = (await js.stream_info(stream)).state.last_seq
    codec: Codec[TickInput] = Codec(TickInput)
    for seq in range(last, max(0, last - 50), -1):
        with contextlib.suppress(ContractError, nats.js.errors.NotFoundError):
            m = codec.decode((await js.get_msg(stream, seq)).data or b"")
            if isinstance(m, TickBatch):
                return max(t.time_ms for t in m.ticks)
            if isinstance(m, Tick | Watermark):
                return m.time_ms
    return 0


async def _drained(js: nats.js.JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    last = (await js.stream_info(stream)).state.last_seq
    return info.ack_floor.stream_seq >= last and not info.num_ack_pending


async def _features(urls: StackUrls) -> tuple[float, float]:
    """feature-builder turns CANDLES into FEATURES; returns (vectors, of which warming up)."""
    from workers.feature_builder.app import Settings as FeatureSettings
    from workers.feature_builder.app import build as build_features

    assert urls.nats_url is not None
    worker = build_features(FeatureSettings(nats_url=urls.nats_url, metrics_port=0))
    task = asyncio.create_task(worker.run())
    nc = await nats.connect(urls.nats_url)
    js = nc.jetstream()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not task.done():
        if worker.started.is_set() and await _drained(js, streams.CANDLES, worker.durable):
            break
        await asyncio.sleep(0.2)  # progress display of a live run
    await nc.close()
    worker.stop()
    await task
    vectors = warming = 0.0
    for metric in worker.metrics.registry.collect():
        if metric.name == "tickwire_feature_vectors_out":
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    vectors += sample.value
                    if sample.labels["warming_up"] == "true":
                        warming += sample.value
    return vectors, warming


async def _replicate(urls: StackUrls) -> dict[str, float]:
    """timescale-replicator copies CANDLES and FEATURES into PostgreSQL; rows per stream."""
    from workers.timescale_replicator.app import Replicator
    from workers.timescale_replicator.app import Settings as ReplicatorSettings

    assert urls.nats_url is not None
    assert urls.postgres_dsn is not None
    nc = await nats.connect(urls.nats_url)
    js = nc.jetstream()
    durable = streams.TIMESCALE_REPLICATOR
    copied = (streams.CANDLES, streams.FEATURES)
    labels = {f"{stream}/{durable}" for stream in copied}
    await streams.ensure(js, [], [c for c in streams.consumer_specs() if c.label in labels])
    replicator = Replicator(
        ReplicatorSettings(
            nats_url=urls.nats_url, postgres_dsn=urls.postgres_dsn, replicate=",".join(copied)
        )
    )
    task = asyncio.create_task(replicator.run())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not task.done():
        done = [await _drained(js, stream, durable) for stream in copied]
        if all(done):
            break
        await asyncio.sleep(0.2)  # progress display of a live run
    await nc.close()
    replicator.stop()
    await task
    sample = replicator.metrics.registry.get_sample_value
    return {
        stream: sample(
            "tickwire_replicated_rows_total",
            {"worker": durable, "stream": stream, "outcome": "upserted"},
        )
        or 0.0
        for stream in copied
    }


def _quantile(histogram: list[tuple[float, float]], q: float) -> float | None:
    """Upper bucket bound below which a ``q`` share of the observations fall."""
    total = histogram[-1][1] if histogram else 0
    if not total:
        return None
    for bound, count in histogram:
        if count >= q * total:
            return bound
    return None


async def _run(urls: StackUrls, n: int) -> Summary:
    assert urls.nats_url is not None
    settings = Settings(
        nats_url=urls.nats_url,
        questdb_ilp=str(urls.questdb_ilp_conf),
        questdb_http=str(urls.questdb_http),
        idle_grace_s=1.0,
    )
    worker = build(settings)
    task = asyncio.create_task(worker.run())
    await worker.started.wait()
    summary = Summary()
    assert worker.metrics_server is not None
    summary.metrics_url = f"http://127.0.0.1:{worker.metrics_server.port}/metrics"
    nc = await nats.connect(urls.nats_url)
    js = nc.jetstream()
    end_ms = time.time_ns() // 1_000_000 - 2_000
    # the last half hour, or what came after the previous run (older ticks would be too late)
    start_ms = end_ms - 30 * 60_000
    start_ms = max(start_ms, await _latest_event_ms(js) + 1_000)
    futures = []
    for tick in _ticks(n, start_ms, end_ms, seed=end_ms):
        subject = subjects.ticks(tick.feed, tick.symbol)
        msg_id = f"demo|{tick.feed}|{tick.symbol}|{tick.seq}"
        futures.append(
            await js.publish_async(subject, encode(tick), headers={"Nats-Msg-Id": msg_id})
        )
    futures.append(await js.publish_async(subjects.ticks(FEEDS[0], "EURUSD"), b'{"type":"tick",'))
    summary.published = len(futures)
    await asyncio.gather(*futures)
    print(f"  published {summary.published:,} ticks; candle-ingest is working ...", flush=True)

    sample = worker.metrics.registry.get_sample_value
    tfs = ("M1", "M5", "M15", "M30", "H1", "H4", "D1")
    deadline = time.monotonic() + 120
    ticks_stream = streams.stream_name(streams.TICKS)
    while time.monotonic() < deadline:
        info = await js.consumer_info(ticks_stream, "candle-ingest")
        closed = sample("tickwire_candles_out_total", {"worker": "candle-ingest", "tf": "M1"})
        # every tick consumed, and the idle timer has closed the last minute's candles
        if info.num_pending == 0 and info.num_ack_pending == 0 and (closed or 0) >= 6:
            break
        await asyncio.sleep(0.5)  # progress display of a live run
    await nc.close()
    worker.stop()
    await task
    print("  candle-ingest done; feature-builder turns candles into features ...", flush=True)
    summary.vectors, summary.warming = await _features(urls)
    print("  timescale-replicator copies candles and features to PostgreSQL ...", flush=True)
    summary.replicated = await _replicate(urls)

    summary.accepted = (
        sample("tickwire_ticks_in_total", {"worker": "candle-ingest", "outcome": "accepted"}) or 0.0
    )
    for tf in tfs:
        summary.candles[tf] = (
            sample("tickwire_candles_out_total", {"worker": "candle-ingest", "tf": tf}) or 0.0
        )
    for metric in worker.metrics.registry.collect():
        if metric.name == "tickwire_dead_letters":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    summary.dead[s.labels["reason"]] = s.value
        # the ticks are the last half hour replayed fast, so event-time latency would say
        # "minutes"; what the worker spends per batch is the figure that means something here
        if metric.name == "tickwire_processing_seconds":
            buckets = [
                (float(s.labels["le"]), s.value)
                for s in metric.samples
                if s.name.endswith("_bucket")
            ]
            summary.latency_p50 = _quantile(buckets, 0.5)
            summary.latency_p99 = _quantile(buckets, 0.99)
    return summary


def main(*, keep: bool = False, ticks: int = 5_000) -> int:
    from db.migrate import migrate
    from infra.stack import REPO, LocalStack, describe

    root = REPO / ".stack" / "demo"
    print(f"tickwire demo: starting the local stack in {root} ...", flush=True)
    with LocalStack(root) as stack:
        urls = stack.urls
        assert urls.postgres_dsn
        print(describe(urls))
        applied = asyncio.run(migrate(urls.postgres_dsn))
        print(f"  PostgreSQL migrations: {len(applied)} applied this run")
        started = time.perf_counter()
        s = asyncio.run(_run(urls, ticks))
        elapsed = time.perf_counter() - started
        print()
        print("summary")
        print(f"  ticks published   {s.published:,} (one malformed on purpose)")
        print(f"  ticks in candles  {s.accepted:,.0f}")
        print("  candles published " + ", ".join(f"{tf} {n:.0f}" for tf, n in s.candles.items()))
        print(f"  dead letters      {dict(s.dead) or 0}")
        if s.latency_p50 is not None:
            print(
                f"  batch handling    p50 <= {s.latency_p50 * 1000:g} ms, "
                f"p99 <= {(s.latency_p99 or float('nan')) * 1000:g} ms (decode, candles, "
                "QuestDB, CANDLES, ack)"
            )
        print(
            f"  feature vectors   {s.vectors:,.0f} ({s.warming:,.0f} still warming up: a series"
            f" needs {DEFAULT.warmup} candles of history)"
        )
        print(
            "  rows upserted     "
            + ", ".join(f"{n:,.0f} {stream.lower()}" for stream, n in s.replicated.items())
            + " into PostgreSQL (schema market)"
        )
        print(f"  wall time         {elapsed:.1f}s")
        print(
            f"  candles in QuestDB: {urls.questdb_http} (table candles); metrics were on {s.metrics_url}"
        )
        missing = [name for name, module in WORKERS.items() if not _importable(module)]
        if missing:
            print()
            print("not built yet: " + ", ".join(missing))
            print("so this demo stops at features: no scores or signals yet.")
        if keep:
            print("\nstack running; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
