"""candle-ingest on the real NATS and QuestDB: candles equal a pandas reference, in both sinks.

Each test runs in its own namespace (its own TICKS, CANDLES and DLQ streams and its own
QuestDB table) so tests never see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import Candle, DeadLetter
from db.questdb import query, wait_for_wal
from infra.stack import QuestDBUrls, StackUrls
from tests import market, reference
from tests.waiting import eventually
from workers.candle_ingest.app import Settings, build

pytestmark = pytest.mark.integration

DAY_START_MS = 22 * 3_600_000  # a UTC+2 broker: its day starts at 22:00 UTC


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(f"ns-{unique}-candle-ingest-state")


def settings(stack: StackUrls, questdb: QuestDBUrls, namespace: str, **kw: Any) -> Settings:
    return Settings(
        nats_url=stack.nats_url,
        namespace=namespace,
        questdb_ilp=questdb.ilp_conf,
        questdb_http=questdb.http,
        day_start_minutes=DAY_START_MS // 60_000,
        idle_close=False,
        pull_expires_s=1,
        **kw,
    )


async def publish(
    js: JetStreamContext, sc: market.Scenario, namespace: str, *, close: bool = True
) -> None:
    """The scenario's messages in order, then a watermark per symbol that closes everything."""
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    futures = []
    for feed, symbol, payload, msg_id in sc.messages:
        subject = subjects.ticks(feed, symbol, namespace=namespace)
        futures.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id}))
    if close:
        for feed, symbol in sc.symbols:
            subject = subjects.ticks(feed, symbol, namespace=namespace)
            end = sc.last_ms + 3 * 86_400_000
            futures.append(await js.publish_async(subject, market.watermark(feed, symbol, end)))
    await asyncio.gather(*futures)


async def stream_messages(js: JetStreamContext, stream: str) -> list[bytes]:
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    return [
        (await js.get_msg(stream, seq)).data
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


def latest(candles: list[Candle]) -> dict[tuple, dict[str, Any]]:
    best: dict[tuple, Candle] = {}
    for c in candles:
        key = (c.feed, c.symbol, c.tf.value, c.open_time_ms)
        if key not in best or c.revision > best[key].revision:
            best[key] = c
    return {k: msgspec.structs.asdict(c) for k, c in best.items()}


async def consumed(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_candles_equal_a_pandas_reference_in_stream_and_questdb(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    sc = market.scenario(seed=11, ticks=20_000)
    worker = build(settings(stack, questdb, namespace))
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    try:
        await publish(js, sc, namespace)
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        await eventually(
            lambda: consumed(js, ticks, "candle-ingest"), timeout=120, what="all ticks"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)
    decode = msgspec.json.Decoder(Candle).decode
    published = [
        decode(m)
        for m in await stream_messages(
            js, streams.stream_name(streams.CANDLES, namespace=namespace)
        )
    ]
    keys = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    assert max(keys.values()) == 1, "a candle revision was published twice"
    got = latest(published)
    assert reference.differences(got, want) == []
    assert any(c.revision > 0 for c in published), "late ticks should have revised candles"
    d1 = [k for k in want if k[2] == "D1"]
    assert all(open_ms % 86_400_000 == DAY_START_MS for *_, open_ms in d1)

    # QuestDB holds exactly the latest revision of every candle
    table = f"ns_{namespace}_candles"
    wait_for_wal(questdb.http, table, timeout=60)
    rows = query(questdb.http, "SELECT * FROM {prefix}candles", table_prefix=f"ns_{namespace}_")
    assert len(rows) == len(want)
    by_key = {(r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): r for r in rows}
    for key, c in got.items():
        row = by_key[key[0], key[1], key[2], c["first_tick_ms"]]
        assert (row["open"], row["high"], row["low"], row["close"]) == (
            c["open"],
            c["high"],
            c["low"],
            c["close"],
        )
        assert (row["tick_volume"], row["revision"]) == (c["tick_volume"], c["revision"])

    # every refused tick is a dead letter with its reason; duplicates counted once
    letters = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.stream_name(streams.DLQ, namespace=namespace))
    ]
    assert Counter(d.reason for d in letters) == sc.dead
    registry = worker.metrics.registry
    sample = registry.get_sample_value
    assert (
        sample("tickwire_ticks_in_total", {"worker": "candle-ingest", "outcome": "duplicate"})
        == sc.duplicates
    )
    assert sample(
        "tickwire_ticks_in_total", {"worker": "candle-ingest", "outcome": "accepted"}
    ) == len(sc.accepted)


@pytest.fixture
async def namespace_b(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    name = f"{unique}b"
    yield name
    for spec in streams.stream_specs(namespace=name):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(f"ns-{name}-candle-ingest-state")


def worker_env(stack: StackUrls, questdb: QuestDBUrls, namespace: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.nats_url),
        "TICKWIRE_NAMESPACE": namespace,
        "TICKWIRE_QUESTDB_ILP": questdb.ilp_conf,
        "TICKWIRE_QUESTDB_HTTP": questdb.http,
        "TICKWIRE_DAY_START_MINUTES": str(DAY_START_MS // 60_000),
        "TICKWIRE_IDLE_CLOSE": "false",
        "TICKWIRE_PULL_EXPIRES_S": "1",
        "TICKWIRE_SNAPSHOT_INTERVAL_S": "0.3",
        "TICKWIRE_LOG_LEVEL": "WARNING",
    }


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "run", "candle-ingest"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )


async def questdb_rows(questdb: QuestDBUrls, namespace: str) -> list[dict[str, Any]]:
    prefix = f"ns_{namespace}_"
    await asyncio.to_thread(wait_for_wal, questdb.http, f"{prefix}candles", timeout=60)
    return await asyncio.to_thread(
        query,
        questdb.http,
        "SELECT * FROM {prefix}candles ORDER BY ts, feed, symbol, tf",
        table_prefix=prefix,
    )


async def test_kill_9_at_random_moments_changes_nothing(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    namespace_b: str,
    tmp_path: Path,
) -> None:
    """200 k ticks with late and duplicate ones; the worker is killed with SIGKILL six times
    at random points of its progress. Afterwards CANDLES and QuestDB hold exactly what an
    uninterrupted run of the same stream produced: nothing missing, nothing doubled."""
    sc = market.scenario(seed=7, ticks=200_000)
    chaos, calm = namespace, namespace_b
    await publish(js, sc, calm)
    ticks_chaos = streams.stream_name(streams.TICKS, namespace=chaos)
    ticks_calm = streams.stream_name(streams.TICKS, namespace=calm)
    total = (await js.stream_info(ticks_calm)).state.last_seq

    # the uninterrupted run
    calm_worker = build(settings(stack, questdb, calm))
    calm_task = asyncio.create_task(calm_worker.run())
    await eventually(lambda: calm_worker.started.is_set() or calm_task.done(), what="start")
    await eventually(lambda: consumed(js, ticks_calm, "candle-ingest"), timeout=300, what="calm")
    calm_worker.stop()
    await asyncio.wait_for(calm_task, 60)

    # the same stream, published while the worker is killed at random points of its progress
    # (the publisher stays a little ahead, so every kill lands in the middle of work)
    env = worker_env(stack, questdb, chaos)
    log = tmp_path / "candle-ingest.log"

    async def progress() -> int:
        """Highest seq delivered to the worker (acks of a killed one come 30 s later)."""
        try:
            info = await js.consumer_info(ticks_chaos, "candle-ingest")
        except APIError:
            return 0
        return info.delivered.stream_seq if info.delivered else 0

    async def feed() -> None:
        await streams.ensure(js, streams.stream_specs(namespace=chaos))
        chunk = 5_000
        for start in range(0, len(sc.messages), chunk):
            part = market.Scenario(messages=sc.messages[start : start + chunk])
            await publish(js, part, chaos, close=False)
            await eventually(lambda start=start: _at_least(progress, start, None), timeout=300)
        await publish(js, market.Scenario(symbols=sc.symbols, last_ms=sc.last_ms), chaos)

    publisher = asyncio.create_task(feed())
    rng = random.Random(2024)
    kill_points = sorted(rng.sample(range(total // 20, total * 19 // 20), 6))
    proc = spawn(env, log)
    proc.kill()  # before it even connected
    proc.wait()
    kills = 1
    for point in kill_points:
        proc = spawn(env, log)
        await eventually(
            lambda point=point, proc=proc: _at_least(progress, point, proc),
            timeout=180,
            what=f"progress to seq {point}",
        )
        proc.kill()
        proc.wait()
        kills += 1
    proc = spawn(env, log)
    try:
        await asyncio.wait_for(publisher, 300)
        await eventually(
            lambda: consumed(js, ticks_chaos, "candle-ingest"), timeout=300, what="the end"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert kills == 7
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert (await js.stream_info(ticks_chaos)).state.last_seq == total

    calm_out = await stream_messages(js, streams.stream_name(streams.CANDLES, namespace=calm))
    chaos_out = await stream_messages(js, streams.stream_name(streams.CANDLES, namespace=chaos))
    assert len(calm_out) > 1000
    assert Counter(chaos_out) == Counter(calm_out)  # byte for byte, none missing or doubled
    assert await questdb_rows(questdb, chaos) == await questdb_rows(questdb, calm)

    def letters(raw: list[bytes]) -> Counter[tuple[str, int | None]]:
        decoded = [msgspec.json.decode(m, type=DeadLetter) for m in raw]
        return Counter((d.reason, d.stream_seq) for d in decoded)

    dlq = streams.DLQ
    chaos_dead = letters(await stream_messages(js, streams.stream_name(dlq, namespace=chaos)))
    calm_dead = letters(await stream_messages(js, streams.stream_name(dlq, namespace=calm)))
    assert chaos_dead.keys() == calm_dead.keys()
    assert sum(calm_dead.values()) == sum(sc.dead.values())


async def _at_least(
    probe: Callable[[], Awaitable[int]], point: int, proc: subprocess.Popen[bytes] | None
) -> bool:
    if proc is not None and proc.poll() is not None:
        raise AssertionError(f"worker exited with {proc.returncode}")
    return await probe() >= point
