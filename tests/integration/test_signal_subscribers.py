"""Delivery of signals to subscribers on the real NATS: redelivery after a crash before the
ack and never after it, every subscriber gets every signal, a slow one does not hold up
another, an expired signal is never acted on, exhausted deliveries become dead letters,
a rewind replays to one subscriber only, and the CLI refuses bad arguments.

Test consumers use ack waits of a second instead of the production ten, so that the
redeliveries the tests wait for come quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import DeadLetter, Side, Signal, Timeframe
from infra.stack import StackUrls
from tests.waiting import eventually
from workers.runtime.metrics import WorkerMetrics
from workers.runtime.publish import Publisher
from workers.signal_publisher import delivery

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    await streams.ensure(js, streams.stream_specs(namespace=unique))
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    for bucket in ("signal-policy", "signal-sides"):  # made by signal-publisher when it ran
        with contextlib.suppress(Exception):
            await js.delete_key_value(f"ns-{unique}-{bucket}")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_signal(n: int, *, expires_ms: int | None = None, symbol: str = "EURUSD") -> Signal:
    open_ms = 1_767_225_600_000 + n * 60_000
    return Signal(
        signal_id=f"fx|{symbol}|M1|{open_ms}|m-1",
        feed="fx",
        symbol=symbol,
        tf=Timeframe.M1,
        open_time_ms=open_ms,
        candle_revision=0,
        side=Side.BUY if n % 2 else Side.SELL,
        strength=0.7,
        ref_price=1.1,
        expires_ms=now_ms() + 600_000 if expires_ms is None else expires_ms,
        model_version="m-1",
        feature_set_id="fs-test",
    )


async def publish(js: JetStreamContext, signals: list[Signal], namespace: str) -> None:
    for s in signals:
        subject = subjects.signals(s.feed, s.symbol, s.tf, namespace=namespace)
        await js.publish(subject, msgspec.json.encode(s), headers={"Nats-Msg-Id": s.signal_id})


async def fast(
    js: JetStreamContext, name: str, namespace: str, *, wait: float = 1.0, max_deliver: int = 5
) -> None:
    """A subscriber's consumer as in production, with a short ack wait and backoff."""
    spec = msgspec.structs.replace(
        streams.signal_subscriber(name, namespace=namespace),
        ack_wait=wait,
        backoff=(wait, wait),
        max_deliver=max_deliver,
    )
    await streams.ensure(js, [], [spec])


class Running:
    """One reference subscriber running in a task, recording what it acted on."""

    def __init__(
        self,
        js: JetStreamContext,
        name: str,
        namespace: str,
        act: Callable[[Signal], Awaitable[None]] | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.acted: list[Signal] = []
        self.expired: list[Signal] = []
        self.stop = asyncio.Event()

        async def record(s: Signal) -> None:
            self.acted.append(s)

        async def too_late(s: Signal) -> None:
            self.expired.append(s)

        self.task = asyncio.ensure_future(
            delivery.subscribe(
                js,
                name,
                act=act or record,
                expired=too_late,
                stop=self.stop,
                namespace=namespace,
                clock=clock,
            )
        )

    async def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)

    def ids(self) -> list[str]:
        return [s.signal_id for s in self.acted]


async def consumer(js: JetStreamContext, name: str, namespace: str) -> object:
    stream = streams.stream_name(streams.SIGNALS, namespace=namespace)
    return await js.consumer_info(stream, name)


async def test_a_crash_before_the_ack_redelivers_and_an_acked_signal_never_comes_again(
    js: JetStreamContext, namespace: str
) -> None:
    await fast(js, "a", namespace)
    first, second = make_signal(1), make_signal(2)
    await publish(js, [first], namespace)

    async def crash(s: Signal) -> None:
        raise RuntimeError("the subscriber died before it could ack")

    crashing = Running(js, "a", namespace, act=crash)
    with pytest.raises(RuntimeError, match="died"):
        await asyncio.wait_for(crashing.task, 20)

    again = Running(js, "a", namespace)
    try:
        await eventually(lambda: again.ids() == [first.signal_id], what="the redelivery")
    finally:
        await again.close()
    info = await consumer(js, "a", namespace)
    assert info.ack_floor.stream_seq == 1  # type: ignore[attr-defined]

    later = Running(js, "a", namespace)
    try:
        await publish(js, [second], namespace)
        await eventually(lambda: later.acted, what="the next signal")
        # an acked signal would come before the next one: it does not
        assert later.ids() == [second.signal_id]
    finally:
        await later.close()


async def test_every_subscriber_gets_every_signal_and_a_slow_one_holds_up_no_other(
    js: JetStreamContext, namespace: str
) -> None:
    await fast(js, "slow", namespace, wait=30.0)
    await fast(js, "quick", namespace)
    release = asyncio.Event()

    async def stuck(s: Signal) -> None:
        await release.wait()
        slow.acted.append(s)

    slow = Running(js, "slow", namespace, act=stuck)
    quick = Running(js, "quick", namespace)
    sent = [make_signal(n) for n in range(20)]
    try:
        await publish(js, sent, namespace)
        want = [s.signal_id for s in sent]
        await eventually(lambda: quick.ids() == want, what="the quick subscriber")
        assert slow.acted == []  # still on its first signal
        release.set()
        await eventually(lambda: slow.ids() == want, what="the slow subscriber")
    finally:
        release.set()
        await slow.close()
        await quick.close()
    assert quick.acted == sent


async def test_a_subscriber_down_past_the_expiry_does_not_act_on_the_signal(
    js: JetStreamContext, namespace: str
) -> None:
    await fast(js, "a", namespace)
    short = make_signal(1, expires_ms=now_ms() + 1500)
    lasting = make_signal(2)
    await publish(js, [short, lasting], namespace)
    # the subscriber is down until the first signal has expired
    await eventually(lambda: now_ms() > short.expires_ms, what="the expiry")
    up = Running(js, "a", namespace)
    try:
        await eventually(lambda: up.acted and up.expired, what="both signals")
    finally:
        await up.close()
    assert up.acted == [lasting]
    assert up.expired == [short]
    info = await consumer(js, "a", namespace)
    assert info.num_ack_pending == 0  # type: ignore[attr-defined]
    assert info.num_pending == 0  # type: ignore[attr-defined]


async def test_a_signal_is_expired_from_its_expiry_millisecond_on(
    js: JetStreamContext, namespace: str
) -> None:
    """Valid until ``expires_ms``: on a clock showing exactly that, the signal is no longer
    acted on, and one expiring a millisecond later still is."""
    await fast(js, "a", namespace)
    at = now_ms() + 600_000
    ending, lasting = make_signal(1, expires_ms=at), make_signal(2, expires_ms=at + 1)
    await publish(js, [ending, lasting], namespace)
    up = Running(js, "a", namespace, clock=lambda: at)
    try:
        await eventually(lambda: up.acted and up.expired, what="both signals")
    finally:
        await up.close()
    assert up.acted == [lasting]
    assert up.expired == [ending]
    info = await consumer(js, "a", namespace)
    assert info.num_ack_pending == 0  # type: ignore[attr-defined]


async def never_acked(sub: JetStreamContext.PullSubscription, until: Callable[[], Awaitable[bool]],
                     what: str) -> int:  # fmt: skip
    """Take the subscriber's deliveries and never ack them, until ``until()``; the count.
    The server gives up on a message when it would deliver it once more: keep asking."""
    deliveries = 0

    async def taken() -> bool:
        nonlocal deliveries
        with contextlib.suppress(NatsTimeout):
            deliveries += len(await sub.fetch(1, timeout=0.5))
        return await until()

    await eventually(taken, timeout=30, what=what)
    return deliveries


async def messages(js: JetStreamContext, base: str, namespace: str) -> int:
    info = await js.stream_info(streams.stream_name(base, namespace=namespace))
    return int(info.state.messages)


def advisory(namespace: str, consumer: str, seq: int, deliveries: int) -> tuple[str, bytes]:
    """A delivery-limit advisory as the server publishes it (subject, JSON)."""
    stream = streams.stream_name(streams.SIGNALS, namespace=namespace)
    body = {
        "type": "io.nats.jetstream.advisory.v1.max_deliver",
        "id": f"adv-{consumer}-{seq}",
        "timestamp": "2026-01-01T00:00:00Z",
        "stream": stream,
        "consumer": consumer,
        "stream_seq": seq,
        "deliveries": deliveries,
    }
    return subjects.max_deliveries(stream, consumer), msgspec.json.encode(body)


def outcomes(metrics: WorkerMetrics) -> dict[str, float]:
    return {
        o: metrics.registry.get_sample_value(
            "tickwire_exhausted_advisories_total", {"worker": metrics.worker, "outcome": o}
        )
        or 0.0
        for o in ("dead_lettered", "pipeline", "ignored", "unreadable", "retry")
    }


async def test_exhausted_deliveries_end_in_the_dead_letters(
    nc: Client,
    js: JetStreamContext,
    namespace: str,
    stack: StackUrls,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await fast(js, "deaf", namespace, max_deliver=3)
    # a pipeline consumer on SIGNALS: its own worker dead-letters what it cannot take, so
    # an advisory about it says a message was lost on the way: logged as an error, and
    # dead-lettered for that worker
    await streams.ensure(js, [], streams.consumer_specs(namespace=namespace))
    # before the real one: an advisory that does not parse, one of the pipeline consumer
    # and one of a consumer that is neither (sent as the server would); none may hold up
    # the subscriber's
    for subject, body in (
        (advisory(namespace, "bogus", 1, 3)[0], b"{not json"),
        advisory(namespace, "timescale-replicator", 1, 10),
        advisory(namespace, "someone-else", 1, 4),
    ):
        await js.publish(subject, body)
    metrics = WorkerMetrics("signal-publisher")
    exhausted = delivery.Exhausted(
        nc, js, Publisher(nc, metrics, 10.0), metrics, namespace, expires_s=1.0
    )
    await exhausted.start()
    stream = streams.stream_name(streams.SIGNALS, namespace=namespace)
    sub = await js.pull_subscribe_bind(durable="deaf", stream=stream)
    signal = make_signal(1)
    try:
        await publish(js, [signal], namespace)
        dlq = streams.stream_name(streams.DLQ, namespace=namespace)

        async def letters() -> bool:
            return await messages(js, streams.DLQ, namespace) >= 2

        assert await never_acked(sub, letters, "the dead letter") == 3

        async def all_acked() -> bool:
            spec = streams.exhausted_deliveries(namespace=namespace)
            info = await js.consumer_info(spec.stream, spec.durable)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await eventually(all_acked, what="every advisory acked")
    finally:
        await exhausted.stop()
        await sub.unsubscribe()
    by_subject, seq_of = {}, {}
    for seq in (1, 2):
        raw = await js.get_msg(dlq, seq)
        by_subject[raw.subject] = msgspec.json.decode(raw.data, type=DeadLetter)
        seq_of[raw.subject] = str(seq)
    letter = by_subject[subjects.dlq("subscribers", namespace=namespace)]
    assert (letter.reason, letter.worker, letter.deliveries) == ("max_deliveries", "deaf", 3)
    assert letter.payload == msgspec.json.encode(signal)
    assert letter.stream_seq == 1
    lost = by_subject[subjects.dlq("timescale-replicator", namespace=namespace)]
    assert (lost.reason, lost.worker, lost.deliveries) == (
        "max_deliveries",
        "timescale-replicator",
        10,
    )
    assert (lost.stream, lost.stream_seq, lost.payload) == (stream, 1, msgspec.json.encode(signal))
    # a subscriber's counted as signal-publisher's, a pipeline worker's as that worker's
    for worker in ("signal-publisher", "timescale-replicator"):
        labels = {"worker": worker, "reason": "max_deliveries"}
        assert metrics.registry.get_sample_value("tickwire_dead_letters_total", labels) == 1
    assert outcomes(metrics) == {
        "dead_lettered": 1, "pipeline": 1, "ignored": 1, "unreadable": 1, "retry": 0
    }  # fmt: skip
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "ERROR" and "timescale-replicator" in r.getMessage()
    ]
    assert len(errors) == 1
    assert f"{stream} seq 1 after 10 deliveries" in errors[0]
    # ops see it, and cannot requeue it: that would send it to every subscriber again
    listed = await asyncio.to_thread(tickwire, stack, namespace, "dlq", "list", "--worker",
                                     "subscribers")  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert "max_deliveries" in listed.stdout
    signals_before = (await js.stream_info(stream)).state.messages
    subscribers = seq_of[subjects.dlq("subscribers", namespace=namespace)]
    refused = await asyncio.to_thread(tickwire, stack, namespace, "dlq", "requeue", subscribers)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "subscribers rewind" in refused.stderr
    assert (await js.stream_info(stream)).state.messages == signals_before
    assert (await js.stream_info(dlq)).state.messages == 2
    # nor a signal the replicator missed: its subscribers would get it again
    replicator = seq_of[subjects.dlq("timescale-replicator", namespace=namespace)]
    again = await asyncio.to_thread(tickwire, stack, namespace, "dlq", "requeue", replicator)
    assert again.returncode == 2
    assert "every subscriber again" in again.stderr
    assert (await js.stream_info(stream)).state.messages == signals_before


async def test_a_message_whose_worker_was_lost_on_its_last_delivery_is_a_dead_letter(
    nc: Client, js: JetStreamContext, namespace: str
) -> None:
    """A candle-ingest partition's durable, as in production but with 2 deliveries and a
    short ack wait. Its worker is killed each time it holds a tick (taken, never acked,
    never dead-lettered): the server gives up, says so, and the tick must end in
    ``dlq.candle-ingest`` as that worker's dead letter, ready to requeue."""
    await streams.ensure(js, streams.stream_specs(namespace=namespace), [])
    spec = next(
        c for c in streams.consumer_specs(namespace=namespace) if c.durable == "candle-ingest"
    )
    durable = "candle-ingest-1of2"
    fast_spec = msgspec.structs.replace(
        spec, durable=durable, ack_wait=1.0, backoff=(1.0,), max_deliver=2
    )
    await streams.ensure(js, [], [fast_spec, streams.exhausted_deliveries(namespace=namespace)])
    metrics = WorkerMetrics("signal-publisher")
    exhausted = delivery.Exhausted(
        nc, js, Publisher(nc, metrics, 10.0), metrics, namespace, expires_s=1.0
    )
    await exhausted.start()
    tick = msgspec.json.encode(
        {"type": "tick", "v": 1, "feed": "fx", "symbol": "EURUSD", "time_ms": 1, "bid": 1.1}
    )
    ticks = subjects.ticks("fx", "EURUSD", namespace=namespace)
    await js.publish(ticks, tick, headers={"Nats-Msg-Id": "tick-1"})
    sub = await js.pull_subscribe_bind(durable=durable, stream=fast_spec.stream)
    try:

        async def letters() -> bool:
            return await messages(js, streams.DLQ, namespace) >= 1

        assert await never_acked(sub, letters, "the dead letter") == 2
    finally:
        await exhausted.stop()
        await sub.unsubscribe()
    raw = await js.get_msg(streams.stream_name(streams.DLQ, namespace=namespace), 1)
    assert raw.subject == subjects.dlq("candle-ingest", namespace=namespace)
    letter = msgspec.json.decode(raw.data, type=DeadLetter)
    assert (letter.worker, letter.reason, letter.deliveries) == (
        "candle-ingest",
        "max_deliveries",
        2,
    )
    assert (letter.stream, letter.stream_seq) == (fast_spec.stream, 1)
    assert (letter.subject, letter.payload) == (ticks, tick)
    assert letter.headers == {"Nats-Msg-Id": "tick-1"}
    assert outcomes(metrics)["pipeline"] == 1


async def test_an_advisory_whose_dead_letter_was_not_stored_comes_again(
    nc: Client, js: JetStreamContext, namespace: str
) -> None:
    await fast(js, "deaf", namespace)
    signal = make_signal(1)
    await publish(js, [signal], namespace)
    dlq = next(s for s in streams.stream_specs(namespace=namespace) if s.name.endswith("_DLQ"))
    await js.delete_stream(dlq.name)  # nowhere to store a dead letter
    # signal-publisher's durable, coming again after a second instead of half a minute
    spec = msgspec.structs.replace(
        streams.exhausted_deliveries(namespace=namespace), ack_wait=1.0, backoff=(1.0,)
    )
    await streams.ensure(js, [], [spec])
    subject, body = advisory(namespace, "deaf", 1, 5)
    await js.publish(subject, body)
    metrics = WorkerMetrics("signal-publisher")
    exhausted = delivery.Exhausted(
        nc, js, Publisher(nc, metrics, 2.0), metrics, namespace, expires_s=1.0
    )
    await exhausted.start()
    try:
        await eventually(lambda: outcomes(metrics)["retry"] >= 2, what="two failed attempts")
        await streams.ensure(js, [dlq])
        await eventually(
            lambda: outcomes(metrics)["dead_lettered"] == 1, what="the dead letter at last"
        )
    finally:
        await exhausted.stop()
    letter = msgspec.json.decode((await js.get_msg(dlq.name, 1)).data, type=DeadLetter)
    assert (letter.worker, letter.deliveries, letter.stream_seq) == ("deaf", 5, 1)
    assert letter.payload == msgspec.json.encode(signal)
    assert (await js.stream_info(dlq.name)).state.messages == 1
    info = await js.consumer_info(spec.stream, spec.durable)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_a_signal_exhausted_while_signal_publisher_is_down_is_dead_lettered_once(
    js: JetStreamContext, namespace: str, stack: StackUrls
) -> None:
    from workers.signal_publisher.app import Settings, build

    await fast(js, "deaf", namespace, max_deliver=3)
    stream = streams.stream_name(streams.SIGNALS, namespace=namespace)
    sub = await js.pull_subscribe_bind(durable="deaf", stream=stream)
    signal = make_signal(1)
    await publish(js, [signal], namespace)
    # signal-publisher has not run in this namespace: not even its consumer exists
    try:

        async def advised() -> bool:
            return await messages(js, streams.ADVISORIES, namespace) == 1

        assert await never_acked(sub, advised, "the advisory kept") == 3
    finally:
        await sub.unsubscribe()
    assert await messages(js, streams.DLQ, namespace) == 0
    spec = streams.exhausted_deliveries(namespace=namespace)

    async def handled() -> bool:
        info = await js.consumer_info(spec.stream, spec.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        return floor == 1 and info.num_pending == 0 and info.num_ack_pending == 0

    settings = Settings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1)
    first = build(settings)
    task = asyncio.create_task(first.run())
    try:
        await eventually(lambda: first.started.is_set() or task.done(), what="start")
        await eventually(handled, what="the advisory acked")
    finally:
        first.stop()
        await asyncio.wait_for(task, 60)
    assert await messages(js, streams.DLQ, namespace) == 1
    raw = await js.get_msg(streams.stream_name(streams.DLQ, namespace=namespace), 1)
    letter = msgspec.json.decode(raw.data, type=DeadLetter)
    assert raw.subject == subjects.dlq("subscribers", namespace=namespace)
    assert (letter.worker, letter.reason, letter.deliveries) == ("deaf", "max_deliveries", 3)
    assert (letter.stream, letter.stream_seq) == (stream, 1)
    assert letter.payload == msgspec.json.encode(signal)
    assert letter.subject == subjects.signals("fx", "EURUSD", Timeframe.M1, namespace=namespace)

    # the advisory comes again, as after a crash between the dead letter and its ack: the
    # durable made anew delivers it from the start of ADVISORIES
    await js.delete_consumer(spec.stream, spec.durable)
    await streams.ensure(js, [], [spec])
    assert (await js.consumer_info(spec.stream, spec.durable)).num_pending == 1
    again = build(settings)
    task = asyncio.create_task(again.run())
    try:
        await eventually(lambda: again.started.is_set() or task.done(), what="restart")
        await eventually(handled, what="the advisory acked again")
        handled_again = outcomes(again.context.metrics)
    finally:
        again.stop()
        await asyncio.wait_for(task, 60)
    assert handled_again["dead_lettered"] == 1  # published again, with the same id
    assert await messages(js, streams.DLQ, namespace) == 1  # and stored once


async def test_a_rewind_delivers_again_to_that_subscriber_only(
    js: JetStreamContext, namespace: str
) -> None:
    only_fx = f"ns.{namespace}.signals.fx.>"
    await delivery.add(js, "a", filter_subject=only_fx, namespace=namespace)
    await delivery.add(js, "b", filter_subject=None, namespace=namespace)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    first = [make_signal(n) for n in range(3)]
    await publish(js, first, namespace)
    for name in ("a", "b"):
        r = Running(js, name, namespace)
        await eventually(lambda r=r: len(r.acted) == 3, what=f"{name} took the signals")
        await r.close()

    info = await delivery.rewind(js, "a", start, namespace=namespace)
    assert info.config.filter_subjects == [only_fx] or info.config.filter_subject == only_fx
    assert info.config.max_deliver == 5
    marker = make_signal(9)
    await publish(js, [marker], namespace)
    a, b = Running(js, "a", namespace), Running(js, "b", namespace)
    try:
        await eventually(lambda: len(a.acted) == 4 and b.acted, what="a again, b the marker")
    finally:
        await a.close()
        await b.close()
    assert a.acted == [*first, marker]
    assert b.acted == [marker]
    assert [i.name for i in await delivery.listing(js, namespace=namespace)] == ["a", "b"]


def tickwire(stack: StackUrls, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.nats_url),
        "TICKWIRE_NAMESPACE": namespace,
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_subscribers_commands_and_their_refusals(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    ok = tickwire(
        stack,
        namespace,
        "subscribers",
        "add",
        "ea-1",
        "--filter",
        f"ns.{namespace}.signals.*.EURUSD.M5",
    )
    assert ok.returncode == 0, ok.stderr
    before = await consumer(js, "ea-1", namespace)
    refusals = [
        ("subscribers", "add", "bad name!"),
        ("subscribers", "add", "ea-2", "--filter", "candles.>"),
        ("subscribers", "add", "ea-2", "--filter", f"ns.{namespace}.signals.fx.EURUSD.M7"),
        ("subscribers", "add", "ea-1"),
        ("subscribers", "remove", "nobody"),
        ("subscribers", "rewind", "ea-1", "--from", "yesterday"),
        ("subscribers", "rewind", "ea-1", "--from", "9999-12-31T23:59:59-14:00"),
        # after now: nothing would come again, and past 2262 the server takes it for the
        # stream's start and delivers every signal again
        ("subscribers", "rewind", "ea-1", "--from", "2263-01-01T00:00:00"),
        ("subscribers", "rewind", "ea-1", "--from", str(now_ms() + 3_600_000)),
        # epoch seconds read as milliseconds would be January 1970: every signal again
        ("subscribers", "rewind", "ea-1", "--from", str(now_ms() // 1000 - 3600)),
        ("subscribers", "rewind", "nobody", "--from", "2026-01-01T00:00:00"),
        # a pipeline worker's consumer names: taken for that worker, dead letters too
        ("subscribers", "add", "timescale-replicator"),
        ("subscribers", "add", "timescale-replicator-0of2"),
        ("subscribers", "add", "signal-publisher-warmup"),
    ]
    for args in refusals:
        out = tickwire(stack, namespace, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
    after = await consumer(js, "ea-1", namespace)
    assert after.config == before.config  # type: ignore[attr-defined]
    assert [i.name for i in await delivery.listing(js, namespace=namespace)] == ["ea-1"]
    listed = tickwire(stack, namespace, "subscribers", "list")
    assert "ea-1" in listed.stdout
    assert f"ns.{namespace}.signals.*.EURUSD.M5" in listed.stdout
    gone = tickwire(stack, namespace, "subscribers", "remove", "ea-1")
    assert gone.returncode == 0, gone.stderr
    assert await delivery.listing(js, namespace=namespace) == []


async def test_tickwire_subscribe_prints_and_acks_and_marks_expired_signals(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    await fast(js, "printer", namespace)
    stale = make_signal(1, expires_ms=now_ms() - 1)
    live = make_signal(2)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.cli",
        "subscribe",
        "printer",
        env={
            "PATH": os.environ.get("PATH", ""),
            "TICKWIRE_NATS_URL": str(stack.nats_url),
            "TICKWIRE_NAMESPACE": namespace,
        },
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert b"waiting for signals" in ready
        await publish(js, [stale, live], namespace)
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(2)]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
    assert lines[0].startswith(f"EXPIRED not actionable {stale.signal_id} ")
    assert lines[1].startswith(f"SIGNAL {live.signal_id} SELL strength=0.7 ")
    assert proc.returncode == 0
    info = await consumer(js, "printer", namespace)
    assert info.num_ack_pending == 0  # type: ignore[attr-defined]
    assert info.ack_floor.stream_seq == 2  # type: ignore[attr-defined]


async def test_a_signal_redelivered_after_a_crash_comes_before_the_signals_after_it(
    js: JetStreamContext, namespace: str
) -> None:
    """The subscriber crashes holding a signal; its correction is published meanwhile. Once
    back, it gets the signal again before the correction, never after it: the last signal of
    the series it acts on is the side the series holds."""
    await fast(js, "a", namespace)
    first = make_signal(1)  # BUY
    correction = msgspec.structs.replace(
        first,
        signal_id=f"{first.signal_id}|r1",
        candle_revision=1,
        side=Side.SELL,
        corrects=first.signal_id,
    )
    await publish(js, [first], namespace)
    taken = asyncio.Event()

    async def crash(s: Signal) -> None:
        taken.set()
        raise RuntimeError("the subscriber died before it could ack")

    crashing = Running(js, "a", namespace, act=crash)
    with pytest.raises(RuntimeError, match="died"):
        await asyncio.wait_for(crashing.task, 20)
    assert taken.is_set()
    await publish(js, [correction], namespace)
    again = Running(js, "a", namespace)
    try:
        await eventually(lambda: len(again.acted) == 2, what="both signals")
    finally:
        await again.close()
    assert again.ids() == [first.signal_id, correction.signal_id]
    assert again.acted[-1].side == Side.SELL


async def test_the_subscriber_asks_again_while_nobody_answers_its_pull_requests(
    js: JetStreamContext, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """JetStream away (a leader election, a restart) or the consumer recreated (a rewind):
    the server answers a pull request with 503, no responders. The subscriber says so, asks
    again and takes the signals once it is answered, as the pipeline's consumers do."""
    caplog.set_level(logging.INFO)
    await fast(js, "a", namespace)
    stream = streams.stream_name(streams.SIGNALS, namespace=namespace)
    up = Running(js, "a", namespace)
    signal = make_signal(1)
    try:

        async def waiting() -> bool:
            return bool((await js.consumer_info(stream, "a")).num_waiting)

        await eventually(waiting, what="the subscriber's pull request")
        await js.delete_consumer(stream, "a")

        def unanswered() -> bool:
            return any("no responders" in r.getMessage() for r in caplog.records)

        await eventually(lambda: unanswered() or up.task.done(), what="a request unanswered")
        assert not up.task.done(), up.task.exception()
        await fast(js, "a", namespace)
        await publish(js, [signal], namespace)
        await eventually(lambda: up.acted or up.task.done(), what="the signal")
        assert not up.task.done(), up.task.exception()
    finally:
        await up.close()
    assert up.acted == [signal]
