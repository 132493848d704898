"""candle-ingest on the real NATS and QuestDB: candles equal a pandas reference, in both sinks.

Each test runs in its own namespace (its own TICKS, CANDLES and DLQ streams and its own
QuestDB table) so tests never see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import Candle, DeadLetter, Timeframe
from db.questdb import query, wait_for_wal
from infra.stack import QuestDBUrls, StackUrls
from tests import market, reference
from tests.crashing_worker import (
    CRASHING,
    doubled,
    killed_after_its_first_publish,
    shorten_windows,
    stored_messages,
    window_gone_by,
)
from tests.faults import fails_first, losing_source
from tests.processes import running, spawn, started_worker, tail, worker_env
from tests.waiting import eventually
from workers.candle_ingest import importer
from workers.candle_ingest.aggregate import Aggregator
from workers.candle_ingest.app import Ingest, Settings, build
from workers.candle_ingest.sink import QuestDBSink
from workers.runtime import worker as worker_module
from workers.runtime.errors import TransientError
from workers.runtime.partition import StaleDurable
from workers.runtime.worker import CommitFailed
from workers.status import every_lag
from workers.status import table as status_table

pytestmark = pytest.mark.integration

T = TypeVar("T")
DAY_START_MS = 22 * 3_600_000  # a UTC+2 broker: its day starts at 22:00 UTC


async def drop_namespace(js: JetStreamContext, name: str) -> None:
    """A test's streams and state bucket go when it ends: the server's disk is shared."""
    for spec in streams.stream_specs(namespace=name):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(f"ns-{name}-candle-ingest-state")


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    await drop_namespace(js, unique)


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
    js: JetStreamContext,
    sc: market.Scenario,
    namespace: str,
    *,
    close: bool = True,
    ensure: bool = True,
) -> None:
    """The scenario's messages in order, then a watermark per symbol that closes everything."""
    if ensure:
        await streams.ensure(js, streams.stream_specs(namespace=namespace))
    futures = []
    for feed, symbol, payload, msg_id in sc.messages:
        subject = subjects.ticks(feed, symbol, namespace=namespace)
        futures.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id}))
    if close:
        for feed, symbol in sc.symbols:
            subject = subjects.ticks(feed, symbol, namespace=namespace)
            end = sc.last_ms + 3 * 86_400_000
            mark, headers = (
                market.watermark(feed, symbol, end),
                market.watermark_headers(feed, symbol, end),
            )
            futures.append(await js.publish_async(subject, mark, headers=headers))
    await asyncio.gather(*futures)


async def stream_messages(js: JetStreamContext, stream: str) -> list[bytes]:
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    return [
        (await js.get_msg(stream, seq)).data
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def on_stream(js: JetStreamContext, base: str, namespace: str, tp: type[T]) -> list[T]:
    """Every message of a namespaced stream, decoded."""
    raw = await stream_messages(js, streams.stream_name(base, namespace=namespace))
    return [msgspec.json.decode(m, type=tp) for m in raw]


def latest(candles: list[Candle]) -> dict[tuple, dict[str, Any]]:
    best: dict[tuple, Candle] = {}
    for c in candles:
        key = (c.feed, c.symbol, c.tf.value, c.open_time_ms)
        if key not in best or c.revision > best[key].revision:
            best[key] = c
    return {k: msgspec.structs.asdict(c) for k, c in best.items()}


async def candles_equal_the_reference(
    js: JetStreamContext, namespace: str, sc: market.Scenario
) -> tuple[dict[tuple, dict[str, Any]], list[Candle]]:
    """The reference candles of the scenario's accepted ticks, and what CANDLES holds: each
    revision once, the latest of each candle equal to the reference."""
    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)
    published = await on_stream(js, streams.CANDLES, namespace, Candle)
    keys = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    assert max(keys.values()) == 1, "a candle revision was published twice"
    assert reference.differences(latest(published), want) == []
    return want, published


async def consumed(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def all_ticks_consumed(js: JetStreamContext, namespace: str) -> None:
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    await eventually(lambda: consumed(js, ticks, "candle-ingest"), timeout=120, what="all ticks")


async def test_candles_equal_a_pandas_reference_in_stream_and_questdb(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    sc = market.scenario(seed=11, ticks=20_000)
    worker = build(settings(stack, questdb, namespace))
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    try:
        await publish(js, sc, namespace)
        await all_ticks_consumed(js, namespace)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    want, published = await candles_equal_the_reference(js, namespace, sc)
    got = latest(published)
    assert any(c.revision > 0 for c in published), "late ticks should have revised candles"
    d1 = [k for k in want if k[2] == "D1"]
    assert all(open_ms % 86_400_000 == DAY_START_MS for *_, open_ms in d1)

    # QuestDB holds exactly the latest revision of every candle
    rows = await questdb_rows(questdb, namespace)
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
    letters = await on_stream(js, streams.DLQ, namespace, DeadLetter)
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


async def test_ticks_whose_delivery_is_lost_on_the_way_still_count(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deliveries that never arrive (a failover with messages in flight) are read back from
    TICKS in stream order: every candle as the reference, long before the server sends them
    again, and not one tick taken for a redelivery of what was applied."""
    sc = market.scenario(seed=12, ticks=20_000)
    lose = {50, 51, 52, 700, 1_500}
    lost: list[int] = []
    monkeypatch.setattr(worker_module, "PullSource", losing_source(lose, lost))
    worker = build(settings(stack, questdb, namespace))
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)

    async def as_the_reference() -> bool:
        published = await on_stream(js, streams.CANDLES, namespace, Candle)
        return reference.differences(latest(published), want) == []

    try:
        await publish(js, sc, namespace)
        # the lost ticks' own redelivery comes only after the consumer's ack wait (30 s)
        await eventually(as_the_reference, timeout=60, what="every candle as the reference")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    assert sorted(lost) == sorted(lose)
    await candles_equal_the_reference(js, namespace, sc)
    registry = worker.metrics.registry
    read_back = registry.get_sample_value("tickwire_read_back_total", {"worker": "candle-ingest"})
    assert read_back == len(lose)


async def test_a_start_whose_state_rebuild_fails_is_tried_again_whole(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rebuilding the open state fails at start (a replay of TICKS that stalled). The start
    is tried again after its backoff, the QuestDB sender of the failed try closed, and the
    worker then runs as ever: candles as the reference, every tick counted once."""
    tries = fails_first(monkeypatch, Ingest, "restore", TransientError("replay stalled"))
    closed: list[QuestDBSink] = []
    close = QuestDBSink.close

    def closing(sink: QuestDBSink) -> None:
        closed.append(sink)
        close(sink)

    monkeypatch.setattr(QuestDBSink, "close", closing)
    sc = market.scenario(seed=31, ticks=3_000)
    worker = build(settings(stack, questdb, namespace))
    task = await run_worker(worker)
    try:
        assert len(tries) == 2
        assert len(closed) == 1  # the failed try's sender; the running one still open
        await publish(js, sc, namespace)
        await all_ticks_consumed(js, namespace)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    await candles_equal_the_reference(js, namespace, sc)
    sample = worker.metrics.registry.get_sample_value
    accepted = sample("tickwire_ticks_in_total", {"worker": "candle-ingest", "outcome": "accepted"})
    assert accepted == len(sc.accepted)


async def test_candles_refused_by_jetstream_for_a_while_are_published_again_in_order(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    """CANDLES stops taking publishes (its subjects moved away: every publish gets no
    responder) while ticks keep coming, then takes them again. Candles are published as
    batches are handled and QuestDB writes are shared between commits; through the outage
    each revision reaches CANDLES once, in order, and QuestDB holds the reference."""
    sc = market.scenario(seed=23, ticks=6_000)
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    candles_stream = streams.stream_name(streams.CANDLES, namespace=namespace)
    config = (await js.stream_info(candles_stream)).config
    worker = build(
        settings(
            stack, questdb, namespace, handler_batch=200, retry_backoff_s=0.1, publish_timeout_s=1
        )
    )
    sample = worker.metrics.registry.get_sample_value

    def publish_failures() -> float:
        return sample("tickwire_publish_failures_total", {"worker": "candle-ingest"}) or 0.0

    task = await run_worker(worker)
    try:
        away = dataclasses.replace(config, subjects=[f"{namespace}.nowhere.>"])
        await js.update_stream(away)
        await publish(js, sc, namespace, ensure=False)
        await eventually(lambda: publish_failures() >= 3, what="publishes refused")
        await js.update_stream(config)
        await all_ticks_consumed(js, namespace)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    want, published = await candles_equal_the_reference(js, namespace, sc)
    revisions: dict[tuple[Any, ...], list[int]] = {}
    for c in published:
        revisions.setdefault((c.feed, c.symbol, c.tf, c.open_time_ms), []).append(c.revision)
    assert all(r == list(range(len(r))) for r in revisions.values()), "revisions out of order"
    assert any(len(r) > 1 for r in revisions.values())
    rows = await questdb_rows(questdb, namespace)
    stored = {
        (r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): (r["close"], r["revision"])
        for r in rows
    }
    assert len(rows) == len(want)
    assert stored == {
        (c["feed"], c["symbol"], c["tf"].value, c["first_tick_ms"]): (c["close"], c["revision"])
        for c in latest(published).values()
    }
    info = await js.consumer_info(
        streams.stream_name(streams.TICKS, namespace=namespace), "candle-ingest"
    )
    assert info.num_redelivered == 0


@pytest.fixture
async def namespace_b(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    name = f"{unique}b"
    yield name
    await drop_namespace(js, name)


async def questdb_rows(
    questdb: QuestDBUrls, namespace: str, *, wal_wait_s: float = 60
) -> list[dict[str, Any]]:
    """Every row of the namespace's QuestDB candles, once its WAL is applied."""
    prefix = f"ns_{namespace}_"
    await asyncio.to_thread(wait_for_wal, questdb.http, f"{prefix}candles", timeout=wal_wait_s)
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
    env = worker_env(
        stack,
        chaos,
        questdb_ilp=questdb.ilp_conf,
        questdb_http=questdb.http,
        day_start_minutes=str(DAY_START_MS // 60_000),
        idle_close="false",
        snapshot_interval_s="0.3",
    )
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
            await eventually(lambda start=start: _at_least(progress, start, None, log), timeout=300)
        await publish(js, market.Scenario(symbols=sc.symbols, last_ms=sc.last_ms), chaos)

    publisher = asyncio.create_task(feed())
    rng = random.Random(2024)
    kill_points = sorted(rng.sample(range(total // 20, total * 19 // 20), 6))
    proc = spawn("candle-ingest", env, log)
    proc.kill()  # before it even connected
    proc.wait()
    kills = 1
    for point in kill_points:
        proc = spawn("candle-ingest", env, log)
        await eventually(
            lambda point=point, proc=proc: _at_least(progress, point, proc, log),
            timeout=180,
            what=f"progress to seq {point}",
        )
        proc.kill()
        proc.wait()
        kills += 1
    async with started_worker("candle-ingest", env, log) as proc:
        await asyncio.wait_for(publisher, 300)
        await eventually(
            lambda: consumed(js, ticks_chaos, "candle-ingest"), timeout=300, what="the end"
        )
    assert kills == 7
    assert proc.returncode == 0, tail(log)
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
    probe: Callable[[], Awaitable[int]],
    point: int,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
) -> bool:
    return (proc is None or running(proc, log)) and await probe() >= point


async def run_worker(worker: Any) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    if task.done():
        task.result()
    return task


async def test_every_kind_of_bad_input_is_dead_lettered_and_the_worker_goes_on(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    now = int(time.time() * 1000)
    feed, symbol = "feed-a", "EURUSD"
    subject = subjects.ticks(feed, symbol, namespace=namespace)

    def tick(**kw: Any) -> bytes:
        body = {"type": "tick", "v": 1, "feed": feed, "symbol": symbol, "time_ms": now - 5_000}
        body |= {"bid": 1.1, "ask": 1.2, "seq": None} | kw
        return msgspec.json.encode(body)

    minute = now - now % 60_000 - 60_000

    def bar(**kw: Any) -> bytes:
        body = {"type": "bar", "v": 1, "feed": feed, "symbol": symbol, "tf": "M1"}
        body |= {"open_time_ms": minute, "open": 1.1, "high": 1.2, "low": 1.0, "close": 1.15}
        return msgspec.json.encode(body | kw)

    far = now + 3_600_000
    ours = market.watermark(feed, symbol, far)
    bad_row = {"time_ms": -5, "bid": 1.1, "ask": 1.2}  # tickwire's message id, but in the future
    bad: list[tuple[str, bytes, str]] = [
        ("malformed_json", b'{"type":"tick","feed":"feed-a",', subject),
        ("unknown_schema_version", tick(v=9, extra=[1, 2]), subject),
        ("missing_field", b'{"type":"tick","v":1,"feed":"feed-a","symbol":"EURUSD"}', subject),
        ("invalid_value", tick(bid=1e999), subject),  # inf
        ("invalid_value", tick(bid=None), subject),  # NaN is not JSON: encoders send null
        ("bad_price", tick(bid=0.0), subject),
        ("bad_price", tick(ask=-1.2), subject),
        ("bid_above_ask", tick(bid=1.3), subject),
        ("negative_volume", tick(volume=-2.0), subject),
        ("future_time", tick(time_ms=now + 3_600_000), subject),
        ("too_late", tick(time_ms=now - 3_600_000), subject),
        ("oversized", tick(pad="x" * 70_000), subject),  # the stream alone allows 1 MiB
        ("misaligned_bar", bar(open_time_ms=minute + 30_000), subject),
        ("bad_ohlc", bar(high=1.12), subject),  # below the close
        ("future_time", bar(open_time_ms=minute + 3_600_000), subject),
        ("illegal_symbol", tick(symbol="EUR\x00USD"), subject),
        # an EA's watermark would close every open candle of the symbol for good
        ("unknown_type", market.watermark(feed, symbol, far + 1), subject),
        ("future_time", ours, subject),
        ("subject_mismatch", tick(feed="feed-b"), subject),
        (
            "unknown_symbol",
            tick(symbol="GBPUSD"),
            subjects.ticks(feed, "GBPUSD", namespace=namespace),
        ),
    ]
    worker = build(
        settings(stack, questdb, namespace, max_payload_bytes=64 * 1024, symbols="EURUSD")
    )
    task = await run_worker(worker)
    try:
        await streams.ensure(js, streams.stream_specs(namespace=namespace))
        await js.publish(subject, tick(), headers={"Nats-Msg-Id": "good-1"})
        for _, payload, subj in bad:
            headers = market.watermark_headers(feed, symbol, far) if payload == ours else None
            await js.publish(subj, payload, headers=headers)
        # a batch with one tick that does not decode: that tick alone is a dead letter
        good_row = {"time_ms": now - 4_500, "bid": 1.1, "ask": 1.2}
        await js.publish(subject, msgspec.json.encode(
            {"type": "tick_batch", "v": 1, "feed": feed, "symbol": symbol,
             "ticks": [good_row, bad_row]}
        ))  # fmt: skip
        await js.publish(subject, tick(time_ms=now - 4_000), headers={"Nats-Msg-Id": "good-2"})
        await js.publish(subject, tick(time_ms=now - 4_000), headers={"Nats-Msg-Id": "good-2"})
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), what="all consumed")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    letters = await on_stream(js, streams.DLQ, namespace, DeadLetter)
    [part] = [d for d in letters if d.payload == msgspec.json.encode(bad_row)]
    assert part.reason == "invalid_value"
    letters.remove(part)
    assert sorted(d.reason for d in letters) == sorted(reason for reason, _, _ in bad)
    subject_of = {payload: subj for _, payload, subj in bad}
    for letter in letters:
        assert letter.worker == "candle-ingest"
        assert letter.subject == subject_of.get(letter.payload, subject)
    by_payload = {d.payload for d in letters}
    assert {payload for _, payload, _ in bad} <= by_payload
    accepted = worker.metrics.registry.get_sample_value(
        "tickwire_ticks_in_total", {"worker": "candle-ingest", "outcome": "accepted"}
    )
    assert accepted == 3  # the good ones around the bad ones (one in the batch), once each
    dead = worker.metrics.registry.get_sample_value(
        "tickwire_dead_letters_total", {"worker": "candle-ingest", "reason": "bad_price"}
    )
    assert dead == 2


async def m1_candles(js: JetStreamContext, namespace: str) -> list[Candle]:
    try:
        raw = await stream_messages(js, streams.stream_name(streams.CANDLES, namespace=namespace))
    except APIError:
        return []
    return [c for c in (msgspec.json.decode(m, type=Candle) for m in raw) if c.tf.value == "M1"]


def idle_settings(stack: StackUrls, questdb: QuestDBUrls, namespace: str) -> Settings:
    return settings(stack, questdb, namespace).model_copy(
        update={"idle_close": True, "idle_grace_s": 0.5}
    )


async def test_an_idle_symbol_closes_its_candle_by_the_wall_clock(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    """Three ticks in the last seconds of a minute, then nothing: once the symbol's clock
    (its EA's, which runs two minutes behind here) passes the minute's end and the grace,
    the candle closes without a later tick."""
    now = int(time.time() * 1000)
    end = now // 60_000 * 60_000 - 120_000  # the EA's clock is two minutes behind
    feed, symbol = "feed-a", "XAUUSD"
    subject = subjects.ticks(feed, symbol, namespace=namespace)
    worker = build(idle_settings(stack, questdb, namespace))
    task = await run_worker(worker)
    try:
        for i, bid in enumerate((2000.5, 2001.25, 1999.75)):
            t = end - 3000 + i * 1000
            body = {"type": "tick", "feed": feed, "symbol": symbol, "time_ms": t}
            await js.publish(subject, msgspec.json.encode(body | {"bid": bid, "ask": bid + 0.5}))
        (candle,) = await eventually(
            lambda: m1_candles(js, namespace), timeout=30, what="the idle M1 candle closed"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    assert (candle.open, candle.high, candle.low, candle.close) == (
        2000.5,
        2001.25,
        1999.75,
        1999.75,
    )
    assert candle.open_time_ms == end - 60_000
    assert candle.tick_volume == 3
    # the decision is in the stream, so a replay of TICKS closes it the same way
    ticks = await stream_messages(js, streams.stream_name(streams.TICKS, namespace=namespace))
    assert any(b'"type":"watermark"' in m for m in ticks)


async def test_an_ea_whose_clock_runs_behind_is_not_taken_for_idle(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    """An EA stamps its ticks seconds (here up to a minute) behind the wall clock and ticks
    every 100 ms across one of its minute boundaries. By the wall clock that minute ended
    long ago; by the symbol's own clock it ends only when the EA gets there. Its candle
    must close once, whole, by the EA's first tick of the next minute: no revision."""
    feed, symbol = "feed-a", "EURUSD"
    subject = subjects.ticks(feed, symbol, namespace=namespace)
    worker = build(idle_settings(stack, questdb, namespace))
    task = await run_worker(worker)
    sent: list[tuple[int, float]] = []
    try:
        w0 = int(time.time() * 1000)
        boundary = w0 // 60_000 * 60_000
        if w0 - boundary < 5_000:  # the wall clock must be well past it
            boundary -= 60_000
        lag = w0 - boundary + 2_000  # the EA's clock: 2 s before its boundary now
        for i in range(40):
            t = int(time.time() * 1000) - lag
            bid = round(1.1 + 1e-5 * ((i * 7) % 13), 5)
            body = {"type": "tick", "feed": feed, "symbol": symbol, "time_ms": t, "seq": i + 1}
            await js.publish(subject, msgspec.json.encode(body | {"bid": bid, "ask": bid + 1e-4}))
            sent.append((t, bid))
            await eventually(lambda t=t: time.time() * 1000 - lag >= t + 100, what="the EA")
        assert sent[0][0] < boundary <= sent[-1][0]
        closed = await eventually(
            lambda: m1_candles(js, namespace), timeout=30, what="the EA's minute closed"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    before = [bid for t, bid in sent if t < boundary]
    assert [(c.open_time_ms, c.revision) for c in closed] == [(boundary - 60_000, 0)]
    (candle,) = closed
    assert (candle.open, candle.high, candle.low, candle.close, candle.tick_volume) == (
        before[0],
        max(before),
        min(before),
        before[-1],
        len(before),
    )
    revisions = worker.metrics.registry.get_sample_value(
        "tickwire_candle_revisions_total", {"worker": "candle-ingest"}
    )
    assert not revisions


async def test_two_instances_split_the_symbols_and_together_make_every_candle(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    sc = market.scenario(seed=5, ticks=12_000, troubles=False)
    workers = [
        build(settings(stack, questdb, namespace, partitions=2, partition=k)) for k in (0, 1)
    ]
    tasks = [await run_worker(w) for w in workers]
    try:
        await publish(js, sc, namespace)
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        for durable in ("candle-ingest-0of2", "candle-ingest-1of2"):
            await eventually(lambda d=durable: consumed(js, ticks, d), timeout=120, what=durable)
    finally:
        for w in workers:
            w.stop()
        await asyncio.gather(*(asyncio.wait_for(t, 60) for t in tasks))
    owned = [set(w.context.state["ingest"].agg.symbols()) for w in workers]
    assert owned[0], "both instances should own symbols"
    assert owned[1], "both instances should own symbols"
    assert not owned[0] & owned[1], "a symbol's ticks were split between instances"
    assert owned[0] | owned[1] == set(sc.symbols)
    published = await on_stream(js, streams.CANDLES, namespace, Candle)
    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)
    assert reference.differences(latest(published), want) == []


async def test_scaling_out_and_back_in_handles_each_tick_once(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One instance handles the first third of the stream and stops. `tickwire streams ensure
    --partitions candle-ingest=2` makes the partitions' durables start after its ack floor:
    each partition rebuilds its symbols' state from the stream up to there without output,
    then is given only the second third. The single instance, started again, refuses its
    durable, now stale; deleted, the durable is made again after the partitions' floors and
    the instance carries on with the last third. Together: every candle once, as the
    reference."""
    caplog.set_level(logging.INFO, logger="workers")
    sc = market.scenario(seed=9, ticks=9_000, troubles=False)
    third = len(sc.messages) // 3
    parts = [market.Scenario(messages=m) for m in (sc.messages[:third], sc.messages[third:-third])]
    last_part = market.Scenario(messages=sc.messages[-third:], symbols=sc.symbols)
    last_part.last_ms = sc.last_ms
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)

    async def run_until_consumed(
        workers: list[Any], part: market.Scenario, close: bool = False
    ) -> None:
        tasks = [await run_worker(w) for w in workers]
        try:
            await publish(js, part, namespace, close=close)
            for w in workers:
                durable = w.settings.durable
                await eventually(
                    lambda d=durable: consumed(js, ticks, d), timeout=120, what=durable
                )
        finally:
            for w in workers:
                w.stop()
            await asyncio.gather(*(asyncio.wait_for(t, 60) for t in tasks))

    async def given(durable: str) -> int:
        return (await js.consumer_info(ticks, durable)).delivered.consumer_seq

    # one instance, the first third
    await run_until_consumed([build(settings(stack, questdb, namespace))], parts[0])
    floor = (await js.consumer_info(ticks, "candle-ingest")).ack_floor.stream_seq
    assert floor == third

    async def ensure_streams(*partitions: str) -> str:
        """`tickwire streams ensure` as ops run it; its report."""
        done = await asyncio.to_thread(
            subprocess.run,
            [
                *(sys.executable, "-m", "workers.cli", "streams", "ensure"),
                *("--namespace", namespace, *partitions),
            ],
            env={**os.environ, "TICKWIRE_NATS_URL": str(stack.nats_url)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    # two partitions, their durables made by ops; the second third
    assert "stale" not in await ensure_streams("--partitions", "candle-ingest=2")
    partitions = [
        build(settings(stack, questdb, namespace, partitions=2, partition=k)) for k in (0, 1)
    ]
    await run_until_consumed(partitions, parts[1])
    seen = (await js.stream_info(ticks)).state.last_seq
    for k in (0, 1):
        assert await given(f"candle-ingest-{k}of2") == seen - floor, "given the first third"
    rebuilt = f"state rebuilt from seq 1 to {floor}, output from {floor + 1}"
    assert caplog.text.count(rebuilt) == 2

    # back to one: its durable is stale until it is made again
    report = await ensure_streams()
    assert re.search(rf"^{ticks}/candle-ingest +stale: .* is behind ", report, re.M), report
    lags = {lag.consumer: lag for lag in await every_lag(js) if lag.stream == ticks}
    assert lags["candle-ingest"].ahead == ("candle-ingest-0of2", "candle-ingest-1of2")
    assert lags["candle-ingest-0of2"].ahead == lags["candle-ingest-1of2"].ahead == ()
    assert "stale: behind candle-ingest-0of2, candle-ingest-1of2" in status_table(
        list(lags.values())
    )
    stale = build(settings(stack, questdb, namespace))
    with pytest.raises(StaleDurable, match="is behind candle-ingest-0of2, candle-ingest-1of2"):
        await asyncio.wait_for(stale.run(), 60)
    # as a process: one line and exit code 1
    env = worker_env(stack, namespace, questdb_ilp=questdb.ilp_conf, questdb_http=questdb.http)
    refused = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "workers.cli", "run", "candle-ingest"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "candle-ingest refuses to start: " in line
    assert f"{ticks}/candle-ingest is behind candle-ingest-0of2, candle-ingest-1of2" in line
    await js.delete_consumer(ticks, "candle-ingest")
    # not made again by ops unless told the worker runs alone: the instance does it
    report = await ensure_streams()
    assert re.search(rf"^{ticks}/candle-ingest +not made: ", report, re.M), report
    assert "candle-ingest" not in {c.name for c in await js.consumers_info(ticks)}
    await run_until_consumed([build(settings(stack, questdb, namespace))], last_part, close=True)
    assert await given("candle-ingest") == (await js.stream_info(ticks)).state.last_seq - seen
    # from its own snapshot, taken at its clean stop after the first third
    assert f"state rebuilt from seq {floor + 1} to {seen}, output from {seen + 1}" in caplog.text

    published = await on_stream(js, streams.CANDLES, namespace, Candle)
    versions = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    assert max(versions.values()) == 1, "a candle was published twice"
    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)
    assert reference.differences(latest(published), want) == []


async def test_an_instance_of_another_layout_waits_until_the_running_one_stopped(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A partition of two started while the single instance runs would consume the same
    ticks beside it: it makes no durable and does not consume until the single instance has
    stopped, then starts after everything that one handled."""
    sc = market.scenario(seed=4, ticks=600, troubles=False)
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    quick = {"retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2}
    alone = build(settings(stack, questdb, namespace, **quick))
    alone_task = await run_worker(alone)
    partition = build(settings(stack, questdb, namespace, partitions=2, partition=0, **quick))
    partition_task = asyncio.create_task(partition.run())
    try:
        await eventually(
            lambda: f"candle-ingest of another layout consume on {ticks}" in caplog.text,
            what="the partition waiting",
        )
        await publish(js, sc, namespace, close=False)
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), what="ticks consumed")
        assert not partition.started.is_set()
        assert {c.name for c in await js.consumers_info(ticks)} == {"candle-ingest"}
        alone.stop()
        await asyncio.wait_for(alone_task, 60)
        await eventually(
            lambda: partition.started.is_set() or partition_task.done(),
            what="the partition consuming",
        )
        if partition_task.done():
            partition_task.result()
        floor = (await js.consumer_info(ticks, "candle-ingest")).ack_floor.stream_seq
        mine = await js.consumer_info(ticks, "candle-ingest-0of2")
        assert mine.config.opt_start_seq == floor + 1
        assert mine.delivered.consumer_seq == 0, "given what the single instance handled"
    finally:
        alone.stop()
        partition.stop()
        await asyncio.wait_for(asyncio.gather(alone_task, partition_task), 60)


BarRow = tuple[datetime, int, int, int, int, int]
"""Server time, open, high, low, close (in points of 1e-5), tick volume."""


def m1_export(path: Path, start: datetime, n: int) -> list[BarRow]:
    """An MT5 export of ``n`` M1 bars from ``start`` (server time), spread 5 points."""
    rng = random.Random(3)
    lines = ["<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"]
    bars = []
    price = 110_000
    for i in range(n):
        o = price
        c = o + rng.randint(-30, 30)
        h, lo = max(o, c) + rng.randint(0, 10), min(o, c) - rng.randint(0, 10)
        t = start + timedelta(minutes=i)
        bars.append((t, o, h, lo, c, 10 + i))
        lines.append(
            f"{t:%Y.%m.%d}\t{t:%H:%M:%S}\t{o / 1e5:.5f}\t{h / 1e5:.5f}\t{lo / 1e5:.5f}\t"
            f"{c / 1e5:.5f}\t{10 + i}\t0\t5"
        )
        price = c
    path.write_text("\n".join(lines) + "\n")
    return bars


def m1_import(path: Path, feed: str, symbol: str) -> list[str]:
    """`tickwire import` arguments of an ``m1_export`` of a UTC+2 server."""
    args = ["mt5-bars", str(path), "--feed", feed, "--symbol", symbol, "--tf", "M1"]
    return [*args, "--utc-offset", "2"]


async def test_backfilled_bars_become_candles(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An MT5 M1 bar export goes through `tickwire import` and candle-ingest: every bar is an
    M1 candle, and the M5 candles are the bars merged five at a time."""
    start = datetime(2025, 3, 4, 10, 0)  # server time, UTC+2
    csv = tmp_path / "EURUSD_M1.csv"
    bars = m1_export(csv, start, 20)
    worker = build(settings(stack, questdb, namespace))
    task = await run_worker(worker)
    try:
        monkeypatch.setenv("TICKWIRE_NATS_URL", str(stack.nats_url))
        monkeypatch.setenv("TICKWIRE_NAMESPACE", namespace)
        assert await asyncio.to_thread(importer.main, m1_import(csv, "hist", "EURUSD")) == 0
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), what="bars consumed")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    published = await on_stream(js, streams.CANDLES, namespace, Candle)
    m1 = {c.open_time_ms: c for c in published if c.tf.value == "M1"}
    assert len(m1) == 20
    for t, o, h, lo, c, vol in bars:
        utc_ms = int((t - timedelta(hours=2)).replace(tzinfo=UTC).timestamp() * 1000)
        got = m1[utc_ms]
        assert (got.open, got.high, got.low, got.close) == (o / 1e5, h / 1e5, lo / 1e5, c / 1e5)
        assert got.tick_volume == vol
        assert got.source == "bars"
    m5 = sorted((c for c in published if c.tf.value == "M5"), key=lambda c: c.open_time_ms)
    assert len(m5) >= 3  # the last one closes only on a later bar
    for k, candle in enumerate(m5):
        group = bars[5 * k : 5 * k + 5]
        assert candle.open == group[0][1] / 1e5
        assert candle.close == group[-1][4] / 1e5
        assert candle.high == max(b[2] for b in group) / 1e5
        assert candle.low == min(b[3] for b in group) / 1e5
        assert candle.tick_volume == sum(b[5] for b in group)


async def test_a_backfill_then_the_live_ticks_make_each_candle_once(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """M1 bars exported at 10:19:20 server time, the 10:19 bar still forming, go through
    `tickwire import`; then the EA's live ticks from 10:19:10. The ticks of the last bar's
    minute are dead-lettered as `covered_by_bars`; every other candle is published once, and
    those of the hour and the day hold the bars' part and the ticks' part."""
    start = datetime(2025, 3, 4, 10, 0)  # server time, UTC+2
    csv = tmp_path / "EURUSD_M1.csv"
    rows = m1_export(csv, start, 20)
    bars = [
        {"feed": "live", "symbol": "EURUSD", "tf": "M1",
         "open_time_ms": int((t - timedelta(hours=2)).replace(tzinfo=UTC).timestamp()) * 1000,
         "open": o / 1e5, "high": h / 1e5, "low": lo / 1e5, "close": c / 1e5,
         "tick_volume": vol, "real_volume": 0.0, "spread": 5 / 1e5}
        for t, o, h, lo, c, vol in rows
    ]  # fmt: skip
    handover = bars[-1]["open_time_ms"] + 60_000
    rng = random.Random(8)
    ticks, t, mid = [], handover - 50_000, 1.1
    while t < handover + 50 * 60_000:
        mid = round(mid + rng.randint(-20, 20) / 1e5, 5)
        ticks.append({"type": "tick", "v": 1, "feed": "live", "symbol": "EURUSD",
                      "time_ms": t, "bid": mid, "ask": round(mid + 0.00007, 5),
                      "volume": None, "seq": len(ticks) + 1})  # fmt: skip
        t += rng.randint(1_000, 20_000)
    worker = build(settings(stack, questdb, namespace))
    task = await run_worker(worker)
    try:
        monkeypatch.setenv("TICKWIRE_NATS_URL", str(stack.nats_url))
        monkeypatch.setenv("TICKWIRE_NAMESPACE", namespace)
        assert await asyncio.to_thread(importer.main, m1_import(csv, "live", "EURUSD")) == 0
        subject = subjects.ticks("live", "EURUSD", namespace=namespace)
        for tick in ticks:
            await js.publish(subject, msgspec.json.encode(tick))
        end = t + 3 * 86_400_000
        await js.publish(
            subject,
            market.watermark("live", "EURUSD", end),
            headers=market.watermark_headers("live", "EURUSD", end),
        )
        await all_ticks_consumed(js, namespace)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    covered = [tk for tk in ticks if tk["time_ms"] < handover]
    assert covered  # the export's forming bar and the EA overlap
    dead = await on_stream(js, streams.DLQ, namespace, DeadLetter)
    assert sorted((d.reason, msgspec.json.decode(d.payload)["seq"]) for d in dead) == [
        ("covered_by_bars", tk["seq"]) for tk in covered
    ]
    published = await on_stream(js, streams.CANDLES, namespace, Candle)
    keys = Counter((c.tf, c.open_time_ms, c.revision) for c in published)
    assert max(keys.values()) == 1, "a candle revision was published twice"
    want = reference.with_bars(bars, ticks[len(covered) :], day_start_ms=DAY_START_MS)
    assert reference.differences(latest(published), want) == []
    hour = latest(published)["live", "EURUSD", "H1", bars[0]["open_time_ms"]]
    assert (hour["first_tick_ms"], hour["source"]) == (bars[0]["open_time_ms"], "ticks")
    in_hour = [tk for tk in ticks if handover <= tk["time_ms"] < hour["close_time_ms"]]
    assert hour["tick_volume"] == sum(b["tick_volume"] for b in bars) + len(in_hour)
    stored = {(r["tf"], r["ts"]): r["revision"] for r in await questdb_rows(questdb, namespace)}
    assert len(stored) == len(want)


async def test_bars_of_a_daylight_saving_server_make_its_d1_and_h4_all_year(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A New York close broker (New York time + 7 h) around New York's autumn change: its
    D1 bars and the H4 candles built from its H1 bars open at its midnight and every 4 hours
    of its clock, 21:00 UTC before the change and 22:00 UTC after; no bar is refused."""

    def offset_h(server: datetime) -> int:  # UTC+3 until the clock went back on Sunday
        return 3 if server < datetime(2026, 11, 1, 9) else 2

    def utc_ms(server: datetime) -> int:
        utc = (server - timedelta(hours=offset_h(server))).replace(tzinfo=UTC)
        return int(utc.timestamp()) * 1000

    header = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
    days = [datetime(2026, 10, 28) + timedelta(days=k) for k in range(8)]
    days = [d for d in days if d.weekday() < 5]  # Wed 28 .. Fri 30, Mon 2 .. Wed 4
    rng = random.Random(5)
    d1_lines, h1_lines, h1 = [header], [header], []
    for day in days:
        d1_lines.append(f"{day:%Y.%m.%d}\t00:00\t1.1\t1.2\t1.0\t1.15\t100\t0\t5")
        for hour in range(24):
            t = day + timedelta(hours=hour)
            o, c = rng.randint(110_000, 110_100), rng.randint(110_000, 110_100)
            h, lo = max(o, c) + rng.randint(0, 9), min(o, c) - rng.randint(0, 9)
            h1.append((t, o, h, lo, c))
            h1_lines.append(f"{t:%Y.%m.%d}\t{t:%H:%M}\t{o / 1e5:.5f}\t{h / 1e5:.5f}\t"
                            f"{lo / 1e5:.5f}\t{c / 1e5:.5f}\t7\t0\t5")  # fmt: skip
    (tmp_path / "d1.csv").write_text("\n".join(d1_lines) + "\n")
    (tmp_path / "h1.csv").write_text("\n".join(h1_lines) + "\n")
    worker = build(
        settings(stack, questdb, namespace).model_copy(
            update={"day_start_minutes": 0, "server_tz": "America/New_York+7"}
        )
    )
    task = await run_worker(worker)
    try:
        monkeypatch.setenv("TICKWIRE_NATS_URL", str(stack.nats_url))
        monkeypatch.setenv("TICKWIRE_NAMESPACE", namespace)
        for symbol, name, tf in (("EURUSD", "d1.csv", "D1"), ("GBPUSD", "h1.csv", "H1")):
            args = ["mt5-bars", str(tmp_path / name), "--feed", "hist", "--symbol", symbol]
            args += ["--tf", tf, "--utc-offset", "America/New_York+7"]
            assert await asyncio.to_thread(importer.main, args) == 0
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), what="bars consumed")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    assert await on_stream(js, streams.DLQ, namespace, DeadLetter) == []
    published = await on_stream(js, streams.CANDLES, namespace, Candle)
    d1 = {c.open_time_ms for c in published if (c.symbol, c.tf) == ("EURUSD", Timeframe.D1)}
    assert d1 == {utc_ms(day) for day in days}
    assert {o // 1000 % 86_400 for o in d1} == {21 * 3600, 22 * 3600}
    h4 = {c.open_time_ms: c for c in published if (c.symbol, c.tf) == ("GBPUSD", Timeframe.H4)}
    buckets: dict[datetime, list[tuple[datetime, int, int, int, int]]] = {}
    for bar in h1:
        buckets.setdefault(bar[0].replace(hour=bar[0].hour // 4 * 4), []).append(bar)
    # each closes with its last hour's bar: the bar's end is the bars' watermark
    assert sorted(h4) == [utc_ms(b) for b in sorted(buckets)]
    for start in buckets:
        group, candle = buckets[start], h4[utc_ms(start)]
        assert candle.close_time_ms == utc_ms(start + timedelta(hours=4))
        assert (candle.open, candle.close) == (group[0][1] / 1e5, group[-1][4] / 1e5)
        assert candle.high == max(b[2] for b in group) / 1e5
        assert candle.low == min(b[3] for b in group) / 1e5


async def test_a_message_the_aggregator_fails_on_stops_the_worker_and_is_left_out_after(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug one message's ticks trigger, every time, after the state took them in. The
    worker stops rather than go on with that state (no snapshot of it, no idle close from
    it). Its next start rebuilds the state from the stream without the message and
    dead-letters it: the candles are then a pandas resample of every other tick."""
    sc = market.scenario(seed=3, ticks=3_000, troubles=False)
    feed, symbol, payload, _ = sc.messages[len(sc.messages) // 2]
    poison = msgspec.json.decode(payload)
    rows = poison.get("ticks") or [poison]
    first_ms = rows[0]["time_ms"]
    add_rows = Aggregator.add_rows

    def buggy(self: Aggregator, f: str, s: str, ticks: Any, **kw: Any) -> Any:
        result = add_rows(self, f, s, ticks, **kw)
        if (f, s, ticks[0].time_ms) == (feed, symbol, first_ms):
            raise ZeroDivisionError("a bug these ticks trigger")
        return result

    monkeypatch.setattr(Aggregator, "add_rows", buggy)
    await publish(js, sc, namespace)
    with pytest.raises(CommitFailed, match="handler failed: ZeroDivisionError"):
        await asyncio.wait_for(build(settings(stack, questdb, namespace)).run(), 60)
    worker = build(settings(stack, questdb, namespace))
    task = await run_worker(worker)
    try:
        await all_ticks_consumed(js, namespace)
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    times = {(feed, symbol, r["time_ms"]) for r in rows}
    sc.accepted = [t for t in sc.accepted if (t["feed"], t["symbol"], t["time_ms"]) not in times]
    await candles_equal_the_reference(js, namespace, sc)
    [letter] = await on_stream(js, streams.DLQ, namespace, DeadLetter)
    assert (letter.worker, letter.reason, letter.payload) == (
        "candle-ingest",
        "handler_error",
        payload,
    )
    assert "a bug these ticks trigger" in letter.detail


async def test_a_state_rebuilt_from_the_stream_equals_the_live_one_byte_for_byte(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    """Live, a tick 3 s ahead of its arrival is refused (skew 1 s). By the time the state is
    rebuilt from the stream (the snapshot lost) that tick's time is past: the rebuild must
    refuse it all the same, and end in exactly the live state."""
    sc = market.scenario(seed=5, ticks=2_000)
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    ingest_settings = settings(stack, questdb, namespace, max_future_skew_s=1.0)
    first = build(ingest_settings)
    task = await run_worker(first)
    future_ms = int(time.time() * 1000) + 3_000
    try:
        await publish(js, sc, namespace, close=False)
        feed, symbol = sc.symbols[0]
        body = {"type": "tick", "v": 1, "feed": feed, "symbol": symbol, "time_ms": future_ms}
        ahead = msgspec.json.encode(body | {"bid": 1.1, "ask": 1.2})
        await js.publish(subjects.ticks(feed, symbol, namespace=namespace), ahead)
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), what="live run")
    finally:
        first.stop()
        await asyncio.wait_for(task, 60)
    letters = await on_stream(js, streams.DLQ, namespace, DeadLetter)
    assert [d.reason for d in letters if d.payload == ahead] == ["future_time"]
    live = first.context.state["ingest"].agg.snapshot()

    await eventually(lambda: time.time() * 1000 > future_ms + 1_000, what="the tick's time")
    store = await js.object_store(f"ns-{namespace}-candle-ingest-state")
    await store.put("candle-ingest", b"lost")  # not a snapshot: rebuilt from the stream
    second = build(ingest_settings)
    task = await run_worker(second)
    second.stop()
    await asyncio.wait_for(task, 60)
    assert second.context.state["ingest"].agg.snapshot() == live
    # every tick was acked by the first: the second took none, whatever it read again
    taken = second.metrics.registry.get_sample_value
    for outcome in ("accepted", "duplicate", "rejected"):
        labels = {"worker": "candle-ingest", "outcome": outcome}
        assert taken("tickwire_ticks_in_total", labels) == 0, outcome


async def test_a_snapshot_from_other_settings_is_rebuilt_from_the_stream(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    sc = market.scenario(seed=9, ticks=3_000, troubles=False)
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    first = build(settings(stack, questdb, namespace, snapshot_interval_s=0.01))
    task = await run_worker(first)
    try:
        await publish(js, sc, namespace, close=False)
        # last, a message that closes candles: one symbol's clock moves on 5 minutes
        feed, symbol = sc.symbols[0]
        end = sc.last_ms + 300_000
        await js.publish(
            subjects.ticks(feed, symbol, namespace=namespace),
            market.watermark(feed, symbol, end),
            headers=market.watermark_headers(feed, symbol, end),
        )
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), what="first run")
    finally:
        first.stop()
        await asyncio.wait_for(task, 60)
    held = first.context.state["ingest"].agg.open_candles()
    assert held > 0

    # the broker's day start changes: the old snapshot cannot be used
    second = build(settings(stack, questdb, namespace).model_copy(update={"day_start_minutes": 0}))
    task = await run_worker(second)
    second.stop()
    await asyncio.wait_for(task, 60)
    rebuilt = second.context.state["ingest"].agg
    assert rebuilt.open_candles() == held  # every symbol's open candles are back
    assert sorted(rebuilt.symbols()) == sorted(sc.symbols)
    # everything was acked, so its candles are durable: the rebuild publishes none again
    # (past the stream's duplicate window, each would be stored twice)
    sample = second.metrics.registry.get_sample_value
    labels = [{"worker": "candle-ingest", "tf": tf.value} for tf in Timeframe]
    assert sum(sample("tickwire_candles_out_total", x) or 0 for x in labels) == 0


async def test_a_restart_after_the_duplicate_window_publishes_no_candle_twice(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    tmp_path: Path,
) -> None:
    """A process killed after CANDLES stored its first candles and before it acked their
    ticks, and down longer than the stream's duplicate window: its restart publishes the
    candles the unacked ticks owe, but not those CANDLES holds already, and writes them all
    to QuestDB (the kill may have come before they were written)."""
    window = 1.0
    sc = market.scenario(seed=11, ticks=6_000)
    await publish(js, sc, namespace)
    await shorten_windows(js, namespace, window)
    env = worker_env(
        stack,
        namespace,
        questdb_ilp=questdb.ilp_conf,
        questdb_http=questdb.http,
        day_start_minutes=str(DAY_START_MS // 60_000),
        idle_close="false",
        handler_batch="50",
        fetch_batch="50",
        test_duplicate_window_s=str(window),
    )
    log = tmp_path / "candle-ingest.log"
    candles = subjects.wildcard(subjects.CANDLES, namespace=namespace).split("*")[0]
    await killed_after_its_first_publish("candle-ingest", env, log, candles)
    output = streams.stream_name(streams.CANDLES, namespace=namespace)
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    before = await stored_messages(js, output)
    info = await js.consumer_info(ticks, "candle-ingest")
    assert before, "killed after its first candles were stored"
    assert info.ack_floor.stream_seq < info.delivered.stream_seq, "and before it acked"
    await window_gone_by(js, f"{namespace}_WINDOW", window)

    async with started_worker("candle-ingest", env, log, module=CRASHING):
        await all_ticks_consumed(js, namespace)
    got = await stored_messages(js, output)
    assert doubled(got) == []
    want, _ = await candles_equal_the_reference(js, namespace, sc)
    assert len(await questdb_rows(questdb, namespace)) == len(want)
