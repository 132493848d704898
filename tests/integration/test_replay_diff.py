"""Replays are deterministic: the live pipeline on a tick range, then the same workers in a
replay namespace of that range, give byte-identical candles, feature vectors, scores and
signals; ``tickwire replay diff`` says so, and reports a planted difference.

The live streams, the live model registry and the live policy bucket exist for this test
only (a test's own feed keeps it apart from anything else on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BucketNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from contracts import streams, subjects
from contracts.codec import encode
from contracts.messages import Candle, Signal, Tick, Timeframe, Watermark
from infra.stack import QuestDBUrls, StackUrls
from tests.scorer_models import card_for, train
from tests.waiting import eventually
from workers import replay
from workers.registry.store import Registry, bucket_name
from workers.signal_publisher.policy import POLICY_BUCKET, POLICY_KEY

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYMBOLS = ("EURUSD", "US500.cash")
MINUTES = 75
PIPELINE = (
    (streams.TICKS, streams.CANDLE_INGEST),
    (streams.CANDLES, streams.FEATURE_BUILDER),
    (streams.FEATURES, streams.MODEL_SCORER),
    (streams.SCORES, streams.SIGNAL_PUBLISHER),
)
OUTPUTS = (streams.CANDLES, streams.FEATURES, streams.SCORES, streams.SIGNALS)


@pytest.fixture
async def live(js: JetStreamContext) -> AsyncIterator[JetStreamContext]:
    """Live streams and buckets for this test only; what it made is removed afterwards."""
    before = {i.config.name for i in await js.streams_info()}
    await streams.ensure(js, streams.stream_specs())
    yield js
    after = {i.config.name for i in await js.streams_info()}
    live_made = {s.name for s in streams.stream_specs()} | {
        f"KV_{bucket_name()}",
        f"OBJ_{bucket_name()}",
        f"KV_{POLICY_BUCKET}",
    }
    for name in sorted((after - before) & live_made):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)


def ticks(feed: str, seed: int) -> list[Tick]:
    """Ticks per symbol over at most ``MINUTES`` ending a minute ago, a few of them late
    within the allowed lateness (they revise their candle), in arrival order. None is near
    the future-skew limit, which the live run and the replay, seconds apart, would judge
    differently."""
    rng = random.Random(seed)
    end = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).timestamp() * 1000
    start = int(end) - MINUTES * 60_000
    start -= start % 60_000
    out: list[Tick] = []
    for s, symbol in enumerate(SYMBOLS):
        mid = 1.1 if symbol == "EURUSD" else 5000.0
        digits = 5 if mid < 10 else 2
        t = start + s * 137
        for i in range(MINUTES * 12):
            t += rng.randrange(2_000, 7_000)  # 4.5 s on average: 67.5 of the 75 minutes
            mid *= 1 + rng.gauss(0, 4e-4)
            bid = round(mid, digits)
            ask = round(bid + 10**-digits * rng.randrange(1, 5), digits)
            out.append(Tick(feed=feed, symbol=symbol, time_ms=t, bid=bid, ask=ask, seq=i + 1))
    out.sort(key=lambda k: k.time_ms)
    # every 50th tick arrives after the next 5 ticks of its symbol: late, within a minute
    for i in range(0, len(out) - 12, 50):
        out.insert(i + 12, out.pop(i))
    return out


async def publish_ticks(js: JetStreamContext, feed: str, seed: int) -> list[Tick]:
    sent = ticks(feed, seed)
    futures = []
    for i, tick in enumerate(sent):
        subject = subjects.ticks(feed, tick.symbol)
        headers = {"Nats-Msg-Id": f"{feed}|{i}"}
        futures.append(await js.publish_async(subject, encode(tick), headers=headers))
    # the EA's last word: event time has moved on, every open candle may close
    last = max(t.time_ms for t in sent)
    for symbol in SYMBOLS:
        wm = Watermark(feed=feed, symbol=symbol, time_ms=last + 86_400_000)
        headers = {"Nats-Msg-Id": wm.msg_id}  # tickwire's own: an EA's would be refused
        futures.append(
            await js.publish_async(subjects.ticks(feed, symbol), encode(wm), headers=headers)
        )
    await asyncio.gather(*futures)
    return sent


async def promote_models(js: JetStreamContext, feed: str) -> list[str]:
    """One model per symbol on M1, promoted in the live registry."""
    registry = await Registry.open(js)
    versions = []
    for seed, symbol in enumerate(SYMBOLS, start=3):
        booster = train(seed)
        version = await registry.put(
            booster.model_to_string().encode(), card_for(booster, feed, symbol, Timeframe.M1)
        )
        promoted, why = await registry.promote(version, force=True)
        assert promoted, why
        versions.append(version)
    return versions


async def put_live_policy(js: JetStreamContext, feed: str) -> None:
    """A run-time policy for this feed that differs from the defaults, so that a replay
    without it would decide otherwise."""
    policy = {
        "overrides": [
            {
                "feed": feed,
                "entry_long": 0.05,
                "exit_long": -0.02,
                "entry_short": -0.05,
                "exit_short": 0.02,
                "expiry_s": 120.0,
            }
        ]
    }
    try:
        kv = await js.key_value(POLICY_BUCKET)
    except BucketNotFoundError:
        kv = await js.create_key_value(bucket=POLICY_BUCKET, history=5)
    await kv.put(POLICY_KEY, msgspec.json.encode(policy))


def workers(stack: StackUrls, questdb: QuestDBUrls, namespace: str | None) -> list[Any]:
    """candle-ingest, feature-builder, model-scorer, signal-publisher, as production runs
    them but for idle closing: in a replay it must be off (event time comes from the
    stream), and live the EA's watermark closes the candles here."""
    from workers.candle_ingest import app as candle_ingest
    from workers.feature_builder import app as feature_builder
    from workers.model_scorer import app as model_scorer
    from workers.signal_publisher import app as signal_publisher

    common: dict[str, Any] = {
        "nats_url": stack.nats_url,
        "namespace": namespace,
        "pull_expires_s": 1,
    }
    return [
        candle_ingest.build(
            candle_ingest.Settings(
                **common,
                questdb_ilp=questdb.ilp_conf,
                questdb_http=questdb.http,
                idle_close=False,
            )
        ),
        feature_builder.build(feature_builder.Settings(**common)),
        model_scorer.build(model_scorer.Settings(**common)),
        signal_publisher.build(signal_publisher.Settings(**common)),
    ]


async def drained(js: JetStreamContext, namespace: str | None) -> bool:
    """Every worker has acked everything on its input stream."""
    for base, durable in PIPELINE:
        stream = streams.stream_name(base, namespace=namespace)
        last = (await js.stream_info(stream)).state.last_seq
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            return False
        if info.ack_floor.stream_seq < last or info.num_ack_pending or info.num_pending:
            return False
    return True


async def run_pipeline(
    js: JetStreamContext, stack: StackUrls, questdb: QuestDBUrls, namespace: str | None
) -> None:
    running = workers(stack, questdb, namespace)
    tasks = [asyncio.create_task(w.run()) for w in running]
    try:
        await eventually(
            lambda: all(w.started.is_set() for w in running) or any(t.done() for t in tasks),
            timeout=60,
            what="workers started",
        )
        for task in tasks:
            if task.done():
                task.result()
        await eventually(lambda: drained(js, namespace), timeout=120, what="pipeline drained")
    finally:
        for w in running:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def payloads(js: JetStreamContext, base: str, feed: str, namespace: str | None) -> Any:
    """Every payload of ``feed`` on a stream, by subject (without the namespace prefix), in
    stream order."""
    stream = streams.stream_name(base, namespace=namespace)
    domain = replay.DOMAINS[base]
    prefix = "" if namespace is None else f"{subjects.NAMESPACE}.{namespace}."
    sub = await js.pull_subscribe(
        f"{prefix}{domain}.{feed}.>",
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
    )
    info = await sub.consumer_info()
    out: dict[str, list[bytes]] = defaultdict(list)
    got = 0
    while got < (info.num_pending or 0):
        for msg in await sub.fetch(500, timeout=5):
            out[msg.subject.removeprefix(prefix)].append(msg.data)
            got += 1
    await sub.unsubscribe()
    return dict(out)


def cli(*args: str, nats_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "replay", *args],
        cwd=ROOT,
        env={**os.environ, "TICKWIRE_NATS_URL": nats_url, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


async def test_a_replay_of_the_live_range_yields_byte_identical_outputs(
    live: JetStreamContext, nc: NATS, stack: StackUrls, questdb: QuestDBUrls, unique: str
) -> None:
    js = live
    feed = f"f{unique}"
    versions = await promote_models(js, feed)
    await put_live_policy(js, feed)
    sent = await publish_ticks(js, feed, seed=11)
    await run_pipeline(js, stack, questdb, None)

    ticks_info = (await js.stream_info(streams.TICKS)).state
    start = (await js.get_msg(streams.TICKS, ticks_info.first_seq)).time
    end = (await js.get_msg(streams.TICKS, ticks_info.last_seq)).time
    assert start is not None
    assert end is not None
    r = await replay.create(
        js, unique, stream="TICKS", start=start, end=end + dt.timedelta(milliseconds=1), feed=feed
    )
    assert r.copied == len(sent) + len(SYMBOLS)
    assert sorted(r.models) == sorted(versions)
    assert r.policy
    try:
        await run_pipeline(js, stack, questdb, unique)

        # the outputs, compared here directly: the same payloads, in the same order
        for base in OUTPUTS:
            want = await payloads(js, base, feed, None)
            got = await payloads(js, base, feed, unique)
            assert want, base
            assert got == want, base
        candles = [
            msgspec.json.decode(p, type=Candle)
            for ps in (await payloads(js, streams.CANDLES, feed, None)).values()
            for p in ps
        ]
        assert any(c.revision > 0 for c in candles)  # the late ticks revised candles
        signals = [
            msgspec.json.decode(p, type=Signal)
            for ps in (await payloads(js, streams.SIGNALS, feed, None)).values()
            for p in ps
        ]
        assert {s.model_version for s in signals} == set(versions)

        result = await replay.diff(nc, unique)
        assert result.identical
        for d in result.streams:
            assert d.live, d.stream
            assert len(d.equal) == len(d.live) == len(d.replay), d.stream
        shown = await asyncio.to_thread(cli, "diff", unique, nats_url=stack.nats_url or "")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert shown.stdout.rstrip().endswith("identical")
    finally:
        await replay.delete(js, unique, questdb_http=questdb.http)


def candle(feed: str, symbol: str, minute: int, close: float, revision: int = 0) -> Candle:
    t = 1_741_039_200_000 + minute * 60_000
    return Candle(
        feed=feed,
        symbol=symbol,
        tf=Timeframe.M1,
        open_time_ms=t,
        close_time_ms=t + 60_000,
        open=1.0,
        high=1.5,
        low=0.5,
        close=close,
        tick_volume=3,
        first_tick_ms=t + 1,
        last_tick_ms=t + 59_000,
        revision=revision,
    )


async def test_diff_reports_what_differs_and_only_within_the_replayed_range(
    live: JetStreamContext, nc: NATS, stack: StackUrls, unique: str
) -> None:
    """Candles planted on both sides: counts, keys and fields as planted, exit code 1."""
    js = live
    feed = f"f{unique}"
    base_ms = 1_741_039_200_000
    for minute in (10, 20):  # the replayed range covers minutes 10..20 of event time
        tick = Tick(feed=feed, symbol="EURUSD", time_ms=base_ms + minute * 60_000, bid=1, ask=1.1)
        await js.publish(subjects.ticks(feed, "EURUSD"), encode(tick))
    info = (await js.stream_info(streams.TICKS)).state
    first = (await js.get_msg(streams.TICKS, info.last_seq - 1)).time
    assert first is not None
    await replay.create(
        js, unique, stream="TICKS", start=first, end=first + dt.timedelta(hours=1), feed=feed
    )

    same = [candle(feed, "EURUSD", m, 1.05) for m in (11, 12, 13)]
    revised = candle(feed, "EURUSD", 12, 1.06, revision=1)
    live_side = [
        *same,
        candle(feed, "EURUSD", 14, 1.07),  # replay has another close
        candle(feed, "EURUSD", 15, 1.02),  # only live
        candle(feed, "EURUSD", 40, 1.02),  # outside the range: not compared
        candle(f"x{unique}", "EURUSD", 16, 1.02),  # another feed: not compared
        # a D1 candle 23 h long (its server's clock went ahead) that ended before the range
        # began: not compared, though 24 h from its open would reach into the range
        msgspec.structs.replace(
            candle(feed, "EURUSD", 0, 1.02),
            tf=Timeframe.D1,
            open_time_ms=base_ms + 10 * 60_000 - 23 * 3_600_000 - 30 * 60_000,
            close_time_ms=base_ms + 10 * 60_000 - 30 * 60_000,
            first_tick_ms=base_ms - 23 * 3_600_000,
            last_tick_ms=base_ms - 3_600_000,
        ),
        revised,
    ]
    replay_side = [
        *same,
        candle(feed, "EURUSD", 14, 1.08),
        candle(feed, "EURUSD", 17, 1.04),  # only replayed
        revised,
    ]
    for c in live_side:
        await js.publish(subjects.candles(c.feed, c.symbol, c.tf), encode(c))
    for c in replay_side:
        await js.publish(subjects.candles(c.feed, c.symbol, c.tf, namespace=unique), encode(c))
    try:
        result = await replay.diff(nc, unique)
        assert not result.identical
        assert [d.stream for d in result.streams] == list(OUTPUTS)
        c = result.streams[0]
        assert (len(c.live), len(c.replay)) == (6, 6)
        assert (len(c.equal), len(c.differing), len(c.only_live), len(c.only_replay)) == (
            4,
            1,
            1,
            1,
        )
        key = (feed, "EURUSD", "M1", base_ms + 14 * 60_000, 0)
        assert c.differing == [key]
        assert c.fields(key) == [("close", 1.07, 1.08)]
        assert all(d.identical and not d.live for d in result.streams[1:])

        shown = await asyncio.to_thread(cli, "diff", unique, nats_url=stack.nats_url or "")
        assert shown.returncode == 1, shown.stdout + shown.stderr
        lines = shown.stdout.splitlines()
        table = next(ln.split() for ln in lines if ln.startswith("CANDLES "))
        assert table == ["CANDLES", "6", "6", "4", "1", "1", "1"]
        assert f"CANDLES differs at {replay.label(key)}: close live=1.07 replay=1.08" in lines
        assert lines[-1] == "differ"
    finally:
        await replay.delete(js, unique)


async def test_every_active_model_is_copied_whatever_a_kv_watch_says(
    live: JetStreamContext, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay copies the live registry's pointers from the list its stream keeps.

    nats-py's ``KeyValue.keys()`` reads a watch that can say every entry was delivered
    before the entries arrive (nats-io/nats.py#842); here it says so before any, as
    when the race is lost, and the copy must still hold every active model."""
    js = live
    feed = f"f{unique}"
    versions = await promote_models(js, feed)

    async def marker_first(self: KeyValue, **kwargs: Any) -> list[str]:
        raise NoKeysError

    monkeypatch.setattr(KeyValue, "keys", marker_first)
    try:
        copied = await replay.copy_models(js, unique, feed, SYMBOLS)
        assert sorted(copied) == sorted(versions)
        target = await Registry.open(js, namespace=unique, create=False)
        for symbol in SYMBOLS:
            active = await target.active(feed, symbol, Timeframe.M1)
            assert active is not None
            assert active.version in versions
    finally:
        await replay.delete(js, unique)
