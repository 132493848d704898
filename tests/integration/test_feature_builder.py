"""feature-builder on the real NATS: vectors equal the feature library's batch form over the
published candles, revisions recompute, bad candles are dead letters, and kill -9 in the
middle changes no byte of FEATURES.

Each test runs in its own namespace (its own CANDLES, FEATURES and DLQ streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import Candle, DeadLetter, FeatureVector, Timeframe
from infra.stack import StackUrls
from tests.candles import series
from tests.crashing_worker import (
    CRASHING,
    doubled,
    killed_after_its_first_publish,
    shorten_windows,
    stored_messages,
    window_gone_by,
)
from tests.faults import fails_first
from tests.processes import running, spawn, started_worker, worker_env
from tests.waiting import eventually
from workers.feature_builder import app
from workers.feature_builder.app import Features, Settings, bucket_name, build
from workers.feature_builder.state import Builder
from workers.features import DEFAULT, Candles, FeatureSet
from workers.runtime.errors import TransientError
from workers.runtime.worker import CommitFailed

pytestmark = pytest.mark.integration

DURABLE = "feature-builder"
KEY = ("feed-a", "EURUSD", Timeframe.M1)
"""The series of ``tests.candles.series`` with its defaults."""


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    await drop(js, unique)


@pytest.fixture
async def namespace_b(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield f"{unique}b"
    await drop(js, f"{unique}b")


async def drop(js: JetStreamContext, namespace: str) -> None:
    for spec in streams.stream_specs(namespace=namespace):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(bucket_name(namespace))


def settings(stack: StackUrls, namespace: str, **kw: Any) -> Settings:
    return Settings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1, **kw)


def revised(c: Candle, *, close: float, revision: int) -> Candle:
    return msgspec.structs.replace(
        c, close=close, high=max(c.high, close), low=min(c.low, close), revision=revision
    )


def stream_of_candles() -> list[Candle]:
    """Three series interleaved by close time, with revisions of the latest candle and of
    older ones within the revision depth, each published a little after the original."""
    parts = [
        series(1_500, seed=21, symbol="EURUSD"),
        series(1_500, seed=22, symbol="US500.cash", price=5000.0, digits=2),
        series(300, seed=23, symbol="EURUSD", tf=Timeframe.M5),
    ]
    order = sorted(
        (c for part in parts for c in part), key=lambda c: (c.close_time_ms, c.tf.ms, c.symbol)
    )
    out: list[Candle] = []
    # revisions waiting for this many more candles of their series
    late: dict[tuple[str, Timeframe], list[tuple[int, Candle]]] = {}
    for n, c in enumerate(order, 1):
        out.append(c)
        waiting = late.setdefault((c.symbol, c.tf), [])
        out.extend(r for k, r in waiting if k == 1)
        waiting[:] = [(k - 1, r) for k, r in waiting if k > 1]
        if c.tf is Timeframe.M1 and n % 97 == 0:  # the latest candle of its series
            out.append(revised(c, close=c.close * (1 + 3e-4), revision=1))
        if c.tf is Timeframe.M1 and n % 211 == 0:  # five candles back
            waiting.append((5, revised(c, close=c.low, revision=1)))
    return out


def expected(published: list[Candle]) -> Counter[bytes]:
    """The vector of every candle message, from the batch form over its series as it stood
    (latest revisions) when the message arrived: features never read later candles, so the
    whole series can be computed at once between two revisions, or until a candle comes
    after a later one of its series (a period that had none until a late tick)."""
    current: dict[tuple[str, str, Timeframe], dict[int, Candle]] = {}
    late: set[int] = set()  # positions in ``published`` of candles later than a later one
    for n, c in enumerate(published):
        if c.revision == 0:
            known = current.setdefault((c.feed, c.symbol, c.tf), {})
            if known and c.open_time_ms < max(known):
                late.add(n)
            else:
                known[c.open_time_ms] = c
    cache: dict[tuple[str, str, Timeframe], tuple[list[int], np.ndarray]] = {}
    out: Counter[bytes] = Counter()
    for n, c in enumerate(published):
        key = (c.feed, c.symbol, c.tf)
        if c.revision or n in late:
            current[key][c.open_time_ms] = c
            cache.pop(key, None)
        if key not in cache:
            times = sorted(current[key])
            values = DEFAULT.batch(Candles.from_bars(current[key][t] for t in times))
            cache[key] = (times, values)
        times, values = cache[key]
        i = times.index(c.open_time_ms)
        row = values[i]
        warming = i + 1 < DEFAULT.warmup
        vector = FeatureVector(
            feed=c.feed,
            symbol=c.symbol,
            tf=c.tf,
            open_time_ms=c.open_time_ms,
            candle_revision=c.revision,
            close=c.close,
            close_time_ms=c.close_time_ms,
            last_tick_ms=c.last_tick_ms,
            feature_set_id=DEFAULT.id,
            values=[0.0 if np.isnan(v) else float(v) for v in row],
            warming_up=warming,
        )
        out[msgspec.json.encode(vector)] += 1
    return out


async def publish(js: JetStreamContext, candles: list[Candle], namespace: str) -> None:
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    futures = []
    for c in candles:
        subject = subjects.candles(c.feed, c.symbol, c.tf, namespace=namespace)
        msg_id = f"{c.feed}|{c.symbol}|{c.tf.value}|{c.open_time_ms}|{c.revision}"
        futures.append(
            await js.publish_async(subject, msgspec.json.encode(c), headers={"Nats-Msg-Id": msg_id})
        )
    await asyncio.gather(*futures)


async def stream_messages(js: JetStreamContext, base: str, namespace: str) -> list[bytes]:
    name = streams.stream_name(base, namespace=namespace)
    try:
        info = await js.stream_info(name)
    except APIError:
        return []
    if info.state.messages == 0:
        return []
    return [
        (await js.get_msg(name, seq)).data
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


async def consumed(js: JetStreamContext, namespace: str) -> bool:
    stream = streams.stream_name(streams.CANDLES, namespace=namespace)
    info = await js.consumer_info(stream, DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def run_worker(worker: Any) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    if task.done():
        task.result()
    return task


def close_enough(got: list[bytes], want: Counter[bytes]) -> list[str]:
    """Vectors compared by key: flags and ids exactly, values to 1e-9 (stream vs batch)."""
    problems = []
    decode = msgspec.json.Decoder(FeatureVector).decode
    wanted = {}
    for raw in want:
        v = decode(raw)
        wanted[v.feed, v.symbol, v.tf, v.open_time_ms, v.candle_revision] = v
    seen = Counter()
    for raw in got:
        v = decode(raw)
        key = (v.feed, v.symbol, v.tf, v.open_time_ms, v.candle_revision)
        seen[key] += 1
        w = wanted.get(key)
        if w is None:
            problems.append(f"unexpected vector {key}")
            continue
        if (v.warming_up, v.feature_set_id) != (w.warming_up, w.feature_set_id):
            problems.append(f"{key}: flags {v.warming_up} {v.feature_set_id}")
        a, b = np.asarray(v.values), np.asarray(w.values)
        bad = np.abs(a - b) > 1e-9 * np.maximum(1.0, np.abs(b))
        if bad.any():
            names = [DEFAULT.names[j] for j in np.flatnonzero(bad)]
            problems.append(f"{key}: {names} {a[bad]} != {b[bad]}")
    problems += [f"missing {k}" for k in wanted.keys() - seen.keys()]
    problems += [f"doubled {k}" for k, n in seen.items() if n > 1]
    return problems[:10]


async def test_vectors_equal_the_batch_features_of_the_published_candles(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    candles = stream_of_candles()
    assert sum(c.revision > 0 for c in candles) >= 20
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, candles, namespace)
        await eventually(lambda: consumed(js, namespace), timeout=120, what="all candles")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert len(got) == len(candles)
    assert close_enough(got, expected(candles)) == []
    # every vector on its own subject, warm ones only after the warm-up
    first = msgspec.json.decode(got[0], type=FeatureVector)
    assert first.warming_up
    sample = worker.metrics.registry.get_sample_value
    latency = sample(
        "tickwire_e2e_latency_seconds_count",
        {"worker": DURABLE, "stage": "candle_to_feature"},
    )
    assert latency == len(candles)
    revisions = sample("tickwire_feature_revisions_total", {"worker": DURABLE})
    assert revisions == sum(c.revision > 0 for c in candles)
    warm = sample(
        "tickwire_feature_vectors_out_total",
        {"worker": DURABLE, "tf": "M1", "warming_up": "false"},
    )
    assert warm == sum(c.tf is Timeframe.M1 for c in candles) - 2 * (DEFAULT.warmup - 1)


async def test_a_candle_of_a_period_that_had_none_coming_after_the_next_joins_its_series(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """With an allowed lateness over a minute, candle-ingest publishes the candle of a minute
    that had no tick until a late one, after the candles of the minutes after it: revision
    0, the first of its key. It is a candle like any other (the stores keep it, the trainer
    computes features over it): its vector is that of the candles up to it, the series goes
    on from it, and nothing is dead-lettered."""
    candles = series(120, seed=26, symbol="EURUSD")
    late = candles[100]
    published = [*candles[:100], *candles[101:103], late, *candles[103:]]
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, published, namespace)
        await eventually(lambda: consumed(js, namespace), timeout=60, what="all candles")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    assert await stream_messages(js, streams.DLQ, namespace) == []
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert len(got) == len(candles)
    assert close_enough(got, expected(published)) == []


async def test_a_start_whose_warm_up_fails_is_tried_again_whole(
    stack: StackUrls, js: JetStreamContext, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warming the state from CANDLES fails at start (a replay that stalled); the start is
    tried again after its backoff and the worker then runs as ever."""
    tries = fails_first(monkeypatch, Features, "restore", TransientError("replay stalled"))
    candles = series(200, seed=24, symbol="EURUSD")
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        assert len(tries) == 2
        await publish(js, candles, namespace)
        await eventually(lambda: consumed(js, namespace), timeout=60, what="all candles")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert close_enough(got, expected(candles)) == []
    sample = worker.metrics.registry.get_sample_value
    stage = {"worker": DURABLE, "stage": "candle_to_feature"}
    assert sample("tickwire_e2e_latency_seconds_count", stage) == len(candles)


async def test_bad_candles_are_dead_lettered_with_reasons_and_the_worker_goes_on(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    good = series(60, seed=31)
    subject = subjects.candles("feed-a", "EURUSD", Timeframe.M1, namespace=namespace)
    enc = msgspec.json.encode
    c = good[40]

    def bad(**kw: Any) -> bytes:
        return enc(msgspec.structs.replace(good[45], **kw))

    plain = msgspec.structs.asdict(good[45]) | {"type": "candle"}
    cases: list[tuple[str, bytes, str]] = [
        ("malformed_json", b'{"type":"candle","feed":', subject),
        ("unknown_schema_version", enc(plain | {"v": 7}), subject),
        ("missing_field", enc({k: v for k, v in plain.items() if k != "close"}), subject),
        ("invalid_value", enc(plain | {"high": 1e999}), subject),
        ("high_below_low", bad(high=c.low - 0.001, low=c.low), subject),
        ("price_outside_range", bad(close=good[45].high + 0.01), subject),
        ("bad_price", bad(open=-1.0), subject),
        ("bad_period", bad(close_time_ms=good[45].open_time_ms + 1), subject),
        ("subject_mismatch", bad(symbol="GBPUSD"), subject),
        ("out_of_order", enc(good[10]), subject),  # an old candle again, not a revision
        ("stale_revision", enc(c), subject),  # revision 0 of a candle already seen
        ("revision_too_old", enc(msgspec.structs.replace(good[5], revision=1)), subject),
    ]
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, good[:41], namespace)
        for _, payload, subj in cases:
            await js.publish(subj, payload)
        await publish(js, good[41:], namespace)
        await eventually(lambda: consumed(js, namespace), what="all consumed")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    letters = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, namespace)
    ]
    assert sorted(d.reason for d in letters) == sorted(reason for reason, _, _ in cases)
    assert {d.payload for d in letters} == {payload for _, payload, _ in cases}
    assert all(d.worker == DURABLE and d.subject == subject for d in letters)
    # the good candles all have their vectors, the same as without the bad ones
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert close_enough(got, expected(good)) == []
    sample = worker.metrics.registry.get_sample_value
    assert sample("tickwire_dead_letters_total", {"worker": DURABLE, "reason": "high_below_low"})
    assert sample("tickwire_messages_in_total", {"worker": DURABLE, "outcome": "ok"}) == len(good)


async def test_a_candle_the_builder_fails_on_stops_it_and_is_left_out_when_it_starts_again(
    stack: StackUrls, js: JetStreamContext, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug the 150th candle triggers, every time. Retried while the worker went on, the
    candle would come back behind later ones, be taken for a redelivery, and be lost without
    a word; the state could hold half of it. The worker stops instead. Its next start
    rebuilds the state, leaves the candle out and dead-letters it, and FEATURES then holds
    the batch features of the stream without it, each vector once."""
    candles = series(300, seed=25, symbol="EURUSD")
    poison = candles[150]
    apply = Builder.apply

    def buggy(self: Builder, c: Candle, subject: str) -> Any:
        result = apply(self, c, subject)
        if c.open_time_ms == poison.open_time_ms:  # after the state took it in
            raise ZeroDivisionError("a bug this candle triggers")
        return result

    monkeypatch.setattr(Builder, "apply", buggy)
    await publish(js, candles, namespace)
    first = build(settings(stack, namespace))
    with pytest.raises(CommitFailed, match="handler failed: ZeroDivisionError"):
        await asyncio.wait_for(first.run(), 60)
    stream = streams.stream_name(streams.CANDLES, namespace=namespace)
    info = await js.consumer_info(stream, DURABLE)
    assert info.ack_floor.stream_seq < 151  # the candle, and its batch, not acked
    assert await stream_messages(js, streams.DLQ, namespace) == []

    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await eventually(lambda: consumed(js, namespace), what="all candles")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert close_enough(got, expected([c for c in candles if c is not poison])) == []
    [letter] = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, namespace)
    ]
    assert (letter.worker, letter.reason, letter.stream_seq) == (DURABLE, "handler_error", 151)
    assert "a bug this candle triggers" in letter.detail
    assert msgspec.json.decode(letter.payload, type=Candle) == poison


async def test_partitions_started_after_one_instance_carry_on_where_it_stopped(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """One instance builds the vectors of the first half of the candles and stops; two
    partitions started next make their durables after its ack floor, warm up from the
    stream, and are given only the second half. Their vectors are those of an
    uninterrupted run: the batch form over each series. The second partition starts only
    after the first has taken the whole second half (acking the second's share unread):
    its durable, made with the first's, still starts where the first's did."""
    candles = stream_of_candles()
    half = len(candles) // 2
    stream = streams.stream_name(streams.CANDLES, namespace=namespace)
    single = build(settings(stack, namespace))
    task = await run_worker(single)
    try:
        await publish(js, candles[:half], namespace)
        await eventually(lambda: consumed(js, namespace), timeout=120, what="first half")
    finally:
        single.stop()
        await asyncio.wait_for(task, 60)

    partitions = [build(settings(stack, namespace, partitions=2, partition=k)) for k in (0, 1)]
    tasks = [await run_worker(partitions[0])]
    try:
        await publish(js, candles[half:], namespace)
        for w in partitions:
            if w is partitions[1]:
                tasks.append(await run_worker(w))

            async def done(durable: str = w.settings.durable) -> bool:
                info = await js.consumer_info(stream, durable)
                return info.num_pending == 0 and info.num_ack_pending == 0

            await eventually(done, timeout=120, what=w.settings.durable)
    finally:
        for w in partitions:
            w.stop()
        await asyncio.gather(*(asyncio.wait_for(t, 60) for t in tasks))

    for k in (0, 1):
        info = await js.consumer_info(stream, f"{DURABLE}-{k}of2")
        assert info.delivered.consumer_seq == len(candles) - half, "given the first half"
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert len(got) == len(candles)
    assert close_enough(got, expected(candles)) == []


async def delivered(js: JetStreamContext, namespace: str) -> int:
    stream = streams.stream_name(streams.CANDLES, namespace=namespace)
    try:
        info = await js.consumer_info(stream, DURABLE)
    except APIError:
        return 0
    return info.delivered.stream_seq if info.delivered else 0


async def test_kill_9_in_the_middle_changes_no_byte_of_the_features(
    stack: StackUrls, js: JetStreamContext, namespace: str, namespace_b: str, tmp_path: Path
) -> None:
    """The same candle stream (revisions and bad candles included) through an uninterrupted
    worker and through worker processes killed with SIGKILL in the middle of their work:
    FEATURES end up byte-identical, nothing missing, nothing doubled, and the first vectors
    after each restart are warm (state rebuilt from the last snapshot and the stream)."""
    candles = stream_of_candles()
    chaos, calm = namespace, namespace_b
    # a revision number of its own, or the stream would drop it as a duplicate message id
    broken = msgspec.structs.replace(candles[500], high=0.5, low=0.6, revision=7)
    payloads = [*candles[:700], broken, *candles[700:]]
    await publish(js, payloads, calm)

    calm_worker = build(settings(stack, calm))
    task = await run_worker(calm_worker)
    await eventually(lambda: consumed(js, calm), timeout=120, what="the calm run")
    calm_worker.stop()
    await asyncio.wait_for(task, 60)

    # small batches: a kill lands between publishes and acks more often; snapshots often:
    # most starts go on from one, taken ahead of the ack floor or behind it
    env = worker_env(stack, chaos, handler_batch="50", fetch_batch="50", snapshot_interval_s="0.2")
    log = tmp_path / "feature-builder.log"
    total = len(payloads)
    chunk = 400
    kills = 0
    left: list[int] = []  # delivered but not acked when killed: published again on restart
    for start in range(0, total, chunk):
        await publish(js, payloads[start : start + chunk], chaos)
        proc = spawn(DURABLE, env, log)
        point = min(start + chunk // 2, total)
        await eventually(
            lambda point=point, proc=proc: (
                running(proc, log) and _delivered_at_least(js, chaos, point)
            ),
            timeout=120,
            what=f"progress to seq {point}",
        )
        proc.kill()
        proc.wait()
        kills += 1
        info = await js.consumer_info(
            streams.stream_name(streams.CANDLES, namespace=chaos), DURABLE
        )
        left.append(info.delivered.stream_seq - info.ack_floor.stream_seq)
    async with started_worker(DURABLE, env, log) as proc:
        await eventually(lambda: consumed(js, chaos), timeout=180, what="the end")
    assert kills >= 8
    assert any(left), left
    assert proc.returncode == 0, log.read_text()[-3000:]

    calm_out = await stream_messages(js, streams.FEATURES, calm)
    chaos_out = await stream_messages(js, streams.FEATURES, chaos)
    assert len(calm_out) == len(candles)
    assert Counter(chaos_out) == Counter(calm_out)  # byte for byte, none missing or doubled
    dead = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, chaos)
    ]
    assert [(d.reason, d.payload) for d in dead] == [("high_below_low", encode_candle(broken))]


def encode_candle(c: Candle) -> bytes:
    return msgspec.json.encode(c)


async def _delivered_at_least(js: JetStreamContext, namespace: str, point: int) -> bool:
    return await delivered(js, namespace) >= point


async def test_a_restart_after_the_duplicate_window_publishes_no_vector_twice(
    stack: StackUrls, js: JetStreamContext, namespace: str, tmp_path: Path
) -> None:
    """A process killed after FEATURES stored its first vectors and before it acked their
    candles, and down longer than the stream's duplicate window: its restart publishes
    what the unacked candles owe, but not what FEATURES holds already."""
    window = 1.0
    candles = series(300, seed=31, symbol="EURUSD")
    await publish(js, candles, namespace)
    await shorten_windows(js, namespace, window)
    env = worker_env(
        stack,
        namespace,
        handler_batch="50",
        fetch_batch="50",
        test_duplicate_window_s=str(window),
    )
    log = tmp_path / "feature-builder.log"
    features = subjects.features(*KEY, namespace=namespace)
    await killed_after_its_first_publish(DURABLE, env, log, features)
    output = streams.stream_name(streams.FEATURES, namespace=namespace)
    before = await stored_messages(js, output)
    info = await js.consumer_info(
        streams.stream_name(streams.CANDLES, namespace=namespace), DURABLE
    )
    assert before, "killed after its first vectors were stored"
    assert info.ack_floor.stream_seq < len(before), "and before their candles were acked"
    await window_gone_by(js, f"{namespace}_WINDOW", window)

    async with started_worker(DURABLE, env, log, module=CRASHING):
        await eventually(lambda: consumed(js, namespace), timeout=120, what="every candle")
    got = await stored_messages(js, output)
    assert doubled(got) == []
    decode = msgspec.json.Decoder(FeatureVector).decode
    keys = [(v.symbol, v.open_time_ms, v.candle_revision) for v in (decode(d) for _, d in got)]
    assert sorted(keys) == sorted((c.symbol, c.open_time_ms, c.revision) for c in candles)


async def test_a_restart_after_the_stream_dropped_its_start_carries_on_from_the_snapshot(
    stack: StackUrls, js: JetStreamContext, namespace: str, namespace_b: str
) -> None:
    """CANDLES keeps 14 days: a restart after that finds only the end of each series on the
    stream. Started again after its early messages are gone (purged as retention would),
    the worker carries on from its snapshot: every vector after the restart equals, byte
    for byte, that of an uninterrupted run, and the batch form over the whole series."""
    candles = [
        *series(160, seed=27, symbol="EURUSD"),
        *series(160, seed=28, symbol="US500.cash", price=5000.0, digits=2),
    ]
    candles.sort(key=lambda c: (c.close_time_ms, c.symbol))
    first, rest = candles[:240], candles[240:]
    chaos, calm = namespace, namespace_b
    stream = streams.stream_name(streams.CANDLES, namespace=chaos)

    await publish(js, candles, calm)
    calm_worker = build(settings(stack, calm))
    task = await run_worker(calm_worker)
    try:
        await eventually(lambda: consumed(js, calm), timeout=60, what="the calm run")
    finally:
        calm_worker.stop()
        await asyncio.wait_for(task, 60)

    worker = build(settings(stack, chaos))
    task = await run_worker(worker)
    try:
        await publish(js, first, chaos)
        await eventually(lambda: consumed(js, chaos), timeout=60, what="the first part")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    # retention drops all but the last three candles
    await js.purge_stream(stream, seq=len(first) - 2)
    assert (await js.stream_info(stream)).state.messages == 3

    worker = build(settings(stack, chaos))
    task = await run_worker(worker)
    try:
        await publish(js, rest, chaos)
        await eventually(lambda: consumed(js, chaos), timeout=60, what="the rest")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    calm_out = await stream_messages(js, streams.FEATURES, calm)
    chaos_out = await stream_messages(js, streams.FEATURES, chaos)
    assert len(calm_out) == len(chaos_out) == len(candles)
    after = chaos_out[len(first) :]
    assert not any(msgspec.json.decode(v, type=FeatureVector).warming_up for v in after)
    assert after == calm_out[len(first) :]  # byte for byte, in order
    assert Counter(chaos_out) == Counter(calm_out)
    assert close_enough(chaos_out, expected(candles)) == []


@pytest.mark.parametrize("made_under", ["feature set", "revision depth"])
async def test_a_snapshot_made_under_another_feature_set_or_depth_is_not_used(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    made_under: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The state of another feature set, or of another revision depth, is not this one's:
    the worker says so and rebuilds every series from the start of the stream."""
    candles = series(120, seed=29, symbol="EURUSD")
    first, rest = candles[:80], candles[80:]
    before = settings(stack, namespace)
    if made_under == "feature set":
        monkeypatch.setattr(app, "DEFAULT", FeatureSet(DEFAULT.features[:2]))
    else:
        before = settings(stack, namespace, revision_depth=4)
    worker = build(before)
    task = await run_worker(worker)
    try:
        await publish(js, first, namespace)
        await eventually(lambda: consumed(js, namespace), what="the first part")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    store = await js.object_store(bucket_name(namespace))
    assert (await store.get(DURABLE)).data, "no snapshot saved"
    monkeypatch.undo()

    worker = build(settings(stack, namespace))
    with caplog.at_level(logging.INFO, logger=app.__name__):
        task = await run_worker(worker)
    try:
        await publish(js, rest, namespace)
        await eventually(lambda: consumed(js, namespace), what="the rest")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"snapshot not usable: taken under {made_under}" in warning
    assert "rebuilt from the first candle CANDLES holds" in warning
    sample = worker.metrics.registry.get_sample_value
    assert sample("tickwire_feature_warmup_candles_total", {"worker": DURABLE}) == len(first)
    got = (await stream_messages(js, streams.FEATURES, namespace))[len(first) :]
    later = rest[0].open_time_ms
    want = Counter(
        {v: n for v, n in expected(candles).items() if decode_vector(v).open_time_ms >= later}
    )
    assert len(got) == len(rest)
    assert close_enough(got, want) == []


async def test_a_refusal_the_start_owes_is_in_no_snapshot_before_its_dead_letter(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """A process took candles, one of them bad, and was lost before it dead-lettered or
    acked any. The next start refuses the bad one again while rebuilding, but its dead
    letter is owed until the candle comes again; that process stops first. No snapshot
    may cover the candle meanwhile: a third start would take it for done, ack it when it
    comes and never dead-letter it."""
    good = series(30, seed=37, symbol="EURUSD")
    bad = msgspec.structs.replace(good[12], high=good[12].low - 0.001)
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    await streams.ensure(js, [], [s for s in streams.consumer_specs(namespace=namespace)
                                  if s.durable == DURABLE])  # fmt: skip
    await publish(js, good[:12], namespace)
    await js.publish(subjects.candles(*KEY, namespace=namespace), encode_candle(bad))
    await publish(js, good[12:], namespace)
    candles = [*good[:12], bad, *good[12:]]
    name = streams.stream_name(streams.CANDLES, namespace=namespace)
    held = await js.pull_subscribe_bind(durable=DURABLE, stream=name)
    taken = await held.fetch(len(candles), timeout=10)  # the lost process's, never acked
    assert len(taken) == len(candles)
    for _ in range(2):  # the start that owes the dead letter, stopped; then the next one
        worker = build(settings(stack, namespace, snapshot_interval_s=1e-6))
        task = await run_worker(worker)
        worker.stop()
        await asyncio.wait_for(task, 60)
    await asyncio.gather(*(m.nak() for m in taken))  # as if their ack wait was over
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await eventually(lambda: consumed(js, namespace), what="all consumed")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    await held.unsubscribe()
    letters = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, namespace)
    ]
    assert [(d.reason, d.payload) for d in letters] == [("high_below_low", encode_candle(bad))]
    got = await stream_messages(js, streams.FEATURES, namespace)
    assert close_enough(got, expected(good)) == []


def decode_vector(raw: bytes) -> FeatureVector:
    return msgspec.json.decode(raw, type=FeatureVector)
