"""timescale-replicator: rows/s from a stream to committed rows, against a plain COPY.

The same candles are on CANDLES before the worker starts. The baseline is asyncpg's COPY
of the same rows, already built, into an empty ``market.candles`` of a database of its
own: what writing these rows into that table costs with nothing around it. The worker's
figure runs from the moment it consumes until its last batch is committed, and includes
pulling, decoding, checks, the COPY into staging, the upsert on the natural key, the stored
sequence and the acks.

The worker runs as ops run it, a process of its own (``python -m workers.cli run
timescale-replicator``): what it costs is its own, not that of the candles this process
holds or of the benchmarks it imported, and its ``main()`` sets the process up as it does
in production. It consumes from the moment /healthz answers (connected, caught up,
subscribed); the last batch is committed when the stored sequence, read from PostgreSQL,
reaches the stream's last.

A third figure times the database part alone: the worker's own ``Store.write`` (COPY into
staging, upsert, stored sequence, commit) of the same rows in the worker's batches, with no
NATS and nothing else in the process. The upsert costs more than a plain COPY, so this is
as near to the baseline as the worker can come.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import nats
from tqdm import tqdm

from bench.report import Figure
from contracts import streams, subjects
from contracts.codec import encode
from contracts.messages import Candle, Timeframe
from db.migrate import migrate
from infra.stack import LocalStack
from tests.processes import free_port, healthy
from workers.timescale_replicator.app import Settings
from workers.timescale_replicator.store import Store
from workers.timescale_replicator.tables import TABLES

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "benchrepl"
SCHEMA = f"ns_{NAMESPACE}"  # market.open_namespace's schema of the namespace
STORED = "SELECT coalesce(max(last_seq), 0) FROM replication_state"
START_MS = 1_741_038_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def _candles(n: int, symbols: int = 50, seed: int = 1) -> list[Candle]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        o, c = round(rng.uniform(1, 2), 5), round(rng.uniform(1, 2), 5)
        open_ms = START_MS + (i // symbols) * 60_000
        out.append(
            Candle(
                feed="bench",
                symbol=f"SYM{i % symbols:03d}",
                tf=Timeframe.M1,
                open_time_ms=open_ms,
                close_time_ms=open_ms + 60_000,
                open=o,
                high=max(o, c) + 0.01,
                low=min(o, c) - 0.01,
                close=c,
                tick_volume=rng.randrange(1, 300),
                spread_mean=0.0001,
                spread_max=0.0003,
                first_tick_ms=open_ms + 5,
                last_tick_ms=open_ms + 59_000,
            )
        )
    return out


def _table_row(c: Candle) -> tuple[object, ...]:
    """A market.candles row, in the table's column order."""
    return (
        c.feed, c.symbol, c.tf.value, EPOCH + c.open_time_ms * MS, EPOCH + c.close_time_ms * MS,
        c.open, c.high, c.low, c.close, c.tick_volume, c.real_volume, c.spread_mean,
        c.spread_max, c.first_tick_ms, c.last_tick_ms, c.revision, c.v,
    )  # fmt: skip


async def _publish(url: str, candles: list[Candle]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    consumers = [
        c
        for c in streams.consumer_specs(namespace=NAMESPACE)
        if c.durable == streams.TIMESCALE_REPLICATOR and c.stream.endswith(streams.CANDLES)
    ]
    await streams.ensure(js, streams.stream_specs(namespace=NAMESPACE), consumers)
    pending = []
    for c in tqdm(candles, desc="publishing candles", unit="msg", leave=False):
        subject = subjects.candles(c.feed, c.symbol, c.tf, namespace=NAMESPACE)
        pending.append(await js.publish_async(subject, encode(c)))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await nc.close()


async def _copy(dsn: str, rows: list[tuple[object, ...]]) -> float:
    """Rows/s of one asyncpg COPY of ``rows`` into an empty market.candles."""
    await migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        await conn.copy_records_to_table("candles", records=rows, schema_name="market")
        return len(rows) / (time.perf_counter() - t0)
    finally:
        await conn.close()


async def _store_only(dsn: str, candles: list[Candle]) -> float:
    """Rows/s of the worker's ``Store.write`` of the same rows in the worker's batches."""
    await migrate(dsn)
    table = TABLES[streams.CANDLES]
    rows = [table.row(c) for c in candles]
    batch = Settings.model_fields["handler_batch"].default
    store = Store(dsn, table, stream=streams.CANDLES, consumer=streams.TIMESCALE_REPLICATOR)
    try:
        await store.connect()
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            part = rows[i : i + batch]
            await store.write(list(enumerate(part, i + 1)), i + len(part))
        return len(rows) / (time.perf_counter() - t0)
    finally:
        await store.close()


async def _replicate(url: str, dsn: str, n: int) -> float:
    """Rows/s of the worker process draining the stream into an empty market.candles."""
    await migrate(dsn)
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": url,
        "TICKWIRE_NAMESPACE": NAMESPACE,
        "TICKWIRE_POSTGRES_DSN": dsn,
        "TICKWIRE_REPLICATE": streams.CANDLES,
        "TICKWIRE_METRICS_PORT": str(port),
        "TICKWIRE_LOG_LEVEL": "WARNING",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.cli", "run", streams.TIMESCALE_REPLICATOR,
        env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA})
        try:
            while not await asyncio.to_thread(healthy, port):
                _alive(proc)
                await asyncio.sleep(0.005)  # waiting for a process to start, in a benchmark
            t0 = time.perf_counter()
            while await conn.fetchval(STORED) < n:
                _alive(proc)
                await asyncio.sleep(0.01)  # sampling progress to time a run
            elapsed = time.perf_counter() - t0
        finally:
            await conn.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return n / elapsed


def _alive(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is not None:
        raise RuntimeError(f"timescale-replicator exited with {proc.returncode}")


async def _cleanup(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for spec in streams.stream_specs(namespace=NAMESPACE):
        with contextlib.suppress(Exception):
            await js.delete_stream(spec.name)
    await nc.close()


def measure(stack: LocalStack, n: int = 200_000, repeats: int = 2) -> list[Figure]:
    urls = stack.urls
    postgres = stack.postgres
    assert urls.nats_url is not None
    assert postgres is not None
    print(f"timescale-replicator: {n:,} candles on CANDLES ...", flush=True)
    candles = _candles(n)
    rows = [_table_row(c) for c in candles]
    copy_rates, store_rates, worker_rates = [], [], []
    try:
        for run in range(repeats):
            asyncio.run(_publish(urls.nats_url, candles))
            copy_rates.append(asyncio.run(_copy(postgres.create_database(f"bcopy{run}"), rows)))
            dsn = postgres.create_database(f"bstore{run}")
            store_rates.append(asyncio.run(_store_only(dsn, candles)))
            dsn = postgres.create_database(f"brepl{run}")
            worker_rates.append(asyncio.run(_replicate(urls.nats_url, dsn, n)))
            asyncio.run(_cleanup(urls.nats_url))
            for name in (f"bcopy{run}", f"bstore{run}", f"brepl{run}"):
                postgres.drop_database(name)
    finally:
        asyncio.run(_cleanup(urls.nats_url))
    return [
        Figure(
            "timescale-replicator, stream to committed rows",
            statistics.median(worker_rates),
            "rows/s",
            "asyncpg COPY of the same rows",
            statistics.median(copy_rates),
            0.5,
            50_000,
        ),
        Figure(
            "timescale-replicator, database part alone",
            statistics.median(store_rates),
            "rows/s",
            "asyncpg COPY of the same rows",
            statistics.median(copy_rates),
        ),
    ]
