"""The worker runtime on a real NATS server: acks, dead letters, naks and redelivery."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.codec import Codec
from contracts.messages import DeadLetter, Tick, TickBatch, TickInput
from tests.faults import losing_source
from tests.waiting import eventually
from workers.dlq import requeue_headers
from workers.runtime import worker as worker_module
from workers.runtime.errors import TransientError
from workers.runtime.pull import PullSource
from workers.runtime.settings import RuntimeSettings
from workers.runtime.worker import Batch, Commit, Context, Worker

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
async def _streams_go_with_the_test(js: JetStreamContext, unique: str) -> AsyncIterator[None]:
    """Left behind, a test's dead-letter stream (``dlq.rt-…``) would overlap the live one
    (``dlq.*``) that tests of the whole pipeline make."""
    yield
    for name in (f"RT_{unique}", f"DLQ_{unique}"):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)


async def _make_streams(
    js: JetStreamContext, unique: str, ack_wait: float = 30, max_deliver: int = -1
) -> tuple[str, str, str]:
    """An input stream with one durable consumer, and a dead-letter stream for the worker."""
    worker = f"rt-{unique}"
    stream = f"RT_{unique}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"rt.{unique}.>"]))
    await js.add_stream(StreamConfig(name=f"DLQ_{unique}", subjects=[subjects.dlq(worker)]))
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=worker,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
        ),
    )
    return worker, stream, f"DLQ_{unique}"


def _tick(symbol: str, i: int) -> bytes:
    return msgspec.json.encode(
        Tick(feed="demo", symbol=symbol, time_ms=1_700_000_000_000 + i, bid=1.1 + i * 1e-5, ask=1.2)
    )


async def _dead_letters(js: JetStreamContext, stream: str) -> list[DeadLetter]:
    info = await js.stream_info(stream)
    decoder = msgspec.json.Decoder(DeadLetter)
    out: list[DeadLetter] = []
    if not info.state.messages:
        return out
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        raw = await js.get_msg(stream, seq)
        out.append(decoder.decode(raw.data))
    return out


def _settings(nats_url: str, **kw: object) -> RuntimeSettings:
    values: dict[str, object] = {
        "pull_expires_s": 1,
        "retry_backoff_s": 0.05,
        "poison_deliveries": 3,
        "fetch_batch": 64,
    }
    return RuntimeSettings(nats_url=nats_url, **(values | kw))  # type: ignore[arg-type]


def _worker(
    name: str,
    stream: str,
    settings: RuntimeSettings,
    accept: Callable[[str], bool] | None = None,
    *,
    in_order: bool = False,
) -> Worker[TickInput]:
    return Worker(
        name,
        stream=stream,
        durable=name,
        codec=Codec(TickInput),
        settings=settings,
        accept=accept,
        in_order=in_order,
    )


async def _all_acked(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def _run(worker: Worker[TickInput]) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    if task.done():
        task.result()
    return task


async def test_acks_dead_letters_and_redelivers(stack, js: JetStreamContext, unique: str) -> None:
    worker_name, stream, dlq_stream = await _make_streams(js, unique)
    subject = f"rt.{unique}.ticks"
    seen: dict[int, list[int]] = defaultdict(list)  # stream seq -> deliveries seen
    values: dict[int, TickInput] = {}

    worker = _worker(worker_name, stream, _settings(stack.nats_url))

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        for d in batch:
            tick = d.value
            assert isinstance(tick, Tick)
            seen[d.info.stream_seq].append(d.info.deliveries)
            if tick.symbol == "FLAKY" and d.info.deliveries == 1:
                raise ConnectionError("reset by peer")  # an unexpected failure, once
            if tick.symbol == "POISON":
                raise ValueError("bug triggered by this message")
            if tick.bid > tick.ask:
                batch.reject(d, "bid_above_ask", f"bid={tick.bid} ask={tick.ask}")
                continue
            values[d.info.stream_seq] = tick

    # 50 good ticks, then one of each kind of trouble, then 50 more good ones
    payloads = [_tick("EURUSD", i) for i in range(50)]
    payloads.append(b'{"type":"tick","feed":')  # malformed JSON
    payloads.append(_tick("FLAKY", 50))  # fails once, then works
    payloads.append(_tick("POISON", 51))  # fails every time
    payloads.append(
        msgspec.json.encode(Tick(feed="demo", symbol="X", time_ms=1, bid=2.0, ask=1.0))
    )  # bid above ask: rejected by the handler
    payloads.append(b'{"type":"tick","v":7,"feed":"demo"}')  # schema from the future
    payloads += [_tick("GBPUSD", i) for i in range(50)]
    for i, p in enumerate(payloads):
        await js.publish(subject, p, headers={"Nats-Msg-Id": f"m{i}", "X-Trace": f"t{i}"})
    total = len(payloads)

    task = await _run(worker)
    try:
        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
        letters = await eventually(
            lambda: _dead_letters_if(js, dlq_stream, 4), what="four dead letters"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)

    good = [i + 1 for i in range(total) if payloads[i].startswith(b'{"type":"tick","v":1')]
    handled = sorted(values)
    # every good tick handled, the rejected/poison ones not
    assert handled == [s for s in good if s not in (53, 54)]  # all but POISON, bid>ask
    # (a failing batch is re-run one message at a time, so a delivery may be seen twice)
    assert sorted(set(seen[52])) == [1, 2]  # FLAKY: nak'd once, handled on redelivery
    assert max(seen[53]) == 3  # POISON: dead-lettered on its poison_deliveries-th failure

    by_reason = {d.reason: d for d in letters}
    assert set(by_reason) == {
        "malformed_json",
        "handler_error",
        "bid_above_ask",
        "unknown_schema_version",
    }
    malformed = by_reason["malformed_json"]
    assert malformed.payload == payloads[50]
    assert malformed.subject == subject
    assert malformed.headers["X-Trace"] == "t50"
    assert malformed.stream == stream
    assert malformed.stream_seq == 51
    assert by_reason["handler_error"].stream_seq == 53
    assert "bug triggered" in by_reason["handler_error"].detail
    assert by_reason["handler_error"].deliveries == 3
    assert by_reason["bid_above_ask"].payload == payloads[53]
    assert by_reason["unknown_schema_version"].payload == payloads[54]


async def test_transient_failure_holds_the_batch_without_redelivery(
    stack, js: JetStreamContext, unique: str
) -> None:
    """A dependency outage: the same messages are retried in place, in order, not redelivered."""
    worker_name, stream, _ = await _make_streams(js, unique)
    attempts: list[list[int]] = []
    handled: list[tuple[int, int]] = []  # (stream seq, deliveries)
    worker = _worker(worker_name, stream, _settings(stack.nats_url))

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        attempts.append([d.info.stream_seq for d in batch])
        if len(attempts) <= 3:
            raise TransientError("database is restarting")
        handled.extend((d.info.stream_seq, d.info.deliveries) for d in batch)

    for i in range(20):
        await js.publish(f"rt.{unique}.x", _tick("EURUSD", i))
    # published before the worker starts, so its first batch holds all of them
    task = await _run(worker)
    try:
        await eventually(lambda: len(handled) == 20, what="all handled")

        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert handled == [(seq, 1) for seq in range(1, 21)]  # in order, never redelivered
    assert attempts[0] == attempts[1] == attempts[2] == attempts[3]
    retries = worker.metrics.registry.get_sample_value(
        "tickwire_transient_retries_total", {"worker": worker_name}
    )
    assert retries == 3
    info = await js.consumer_info(stream, worker_name)
    assert info.num_redelivered == 0


ACK_WAIT = 2.0
"""Much shorter than the hold-ups the tests below make."""


@pytest.mark.parametrize("hold_up", ["outage", "slow_handler"])
async def test_held_up_longer_than_the_ack_wait_nothing_is_redelivered(
    stack, js: JetStreamContext, unique: str, hold_up: str
) -> None:
    """A dependency down for several ack waits (backoff steps longer than the ack wait), or a
    handler slower than the ack wait: the batch in hand, the one queued behind it and what
    the pull source has buffered are all kept alive. Every message is handled once, in
    order, and the server redelivers none."""
    worker_name, stream, _ = await _make_streams(js, unique, ack_wait=ACK_WAIT)
    settings = _settings(
        stack.nats_url, handler_batch=10, retry_backoff_s=0.25, retry_backoff_max_s=3 * ACK_WAIT
    )
    worker = _worker(worker_name, stream, settings)
    handled: list[tuple[int, int]] = []
    failures = 0

    def retries() -> float:
        value = worker.metrics.registry.get_sample_value(
            "tickwire_transient_retries_total", {"worker": worker_name}
        )
        return value or 0.0

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        nonlocal failures
        if hold_up == "outage" and failures < 6:
            # 0.25 + 0.5 + 1 + 2 + 4 + 6 s of backoff: about 7 ack waits
            failures += 1
            raise TransientError("database is restarting")
        if hold_up == "slow_handler" and not handled:
            await asyncio.sleep(3.5 * ACK_WAIT)  # the slow work itself, not a wait on it
        handled.extend((d.info.stream_seq, d.info.deliveries) for d in batch)

    for i in range(200):
        await js.publish(f"rt.{unique}.x", _tick("EURUSD", i))
    task = await _run(worker)
    try:
        await eventually(lambda: len(handled) == 200, timeout=60, what="all handled")
        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert handled == [(seq, 1) for seq in range(1, 201)]
    info = await js.consumer_info(stream, worker_name)
    assert info.num_redelivered == 0
    assert info.delivered.stream_seq == 200
    assert retries() == (6 if hold_up == "outage" else 0)
    keepalives = worker.metrics.registry.get_sample_value(
        "tickwire_keepalives_total", {"worker": worker_name}
    )
    assert keepalives is not None
    assert keepalives >= 3


async def test_consumer_pending_shows_the_backlog_growing_while_a_dependency_is_down(
    stack, js: JetStreamContext, unique: str
) -> None:
    """No batch is acked while the handler waits out an outage, so no ack reply tells the
    backlog: tickwire_consumer_pending still follows the consumer's, not the last batch's."""
    worker_name, stream, _ = await _make_streams(js, unique, ack_wait=3)
    settings = _settings(stack.nats_url, fetch_batch=1, handler_batch=1, retry_backoff_s=0.5)
    worker = _worker(worker_name, stream, settings)
    down = False

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        if down:
            raise TransientError("database is restarting")

    def pending() -> float | None:
        labels = {"worker": worker_name, "stream": stream, "consumer": worker_name}
        return worker.metrics.registry.get_sample_value("tickwire_consumer_pending", labels)

    async def shown() -> bool:
        info = await js.consumer_info(stream, worker_name)
        return info.num_pending > 0 and pending() == info.num_pending

    task = await _run(worker)
    try:
        await js.publish(f"rt.{unique}.x", _tick("EURUSD", 0))
        await eventually(lambda: pending() == 0, what="the first message acked")
        down = True
        for i in range(1, 101):
            await js.publish(f"rt.{unique}.x", _tick("EURUSD", i))
        await eventually(shown, timeout=30, what="the backlog on /metrics")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("depth", [2, 4])
async def test_a_commit_overlaps_the_next_batch_and_batches_are_acked_in_order(
    stack, js: JetStreamContext, unique: str, depth: int
) -> None:
    """A handler that returns a commit: the next batches (up to ``commit_depth`` in all) are
    handled while it runs, nothing is acked before its own commit, commits run in batch
    order, a commit's TransientError is retried in place, and a message the commit refuses
    is dead-lettered."""
    worker_name, stream, dlq_stream = await _make_streams(js, unique)
    settings = _settings(stack.nats_url, handler_batch=10, commit_depth=depth)
    worker = _worker(worker_name, stream, settings)
    handled: list[list[int]] = []
    committed: list[list[int]] = []
    tries: defaultdict[int, int] = defaultdict(int)
    gate = asyncio.Event()

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> Commit:
        seqs = [d.info.stream_seq for d in batch]
        handled.append(seqs)

        async def commit() -> None:
            tries[seqs[0]] += 1
            if seqs[0] == 1:
                await gate.wait()
            if len(committed) == 1 and tries[seqs[0]] == 1:
                raise TransientError("store restarting")
            for d in batch:
                if d.info.stream_seq == 15:
                    batch.reject(d, "db_refused", "violates check constraint")
            committed.append(seqs)

        return commit

    for i in range(60):
        await js.publish(f"rt.{unique}.x", _tick("EURUSD", i))
    task = await _run(worker)
    try:
        await eventually(lambda: len(handled) >= depth, what="batches handled meanwhile")
        # the first commit waits: depth - 1 batches were handled meanwhile, no more,
        # nothing committed, nothing acked
        assert len(handled) == depth
        assert committed == []
        assert (await js.consumer_info(stream, worker_name)).ack_floor.stream_seq == 0
        gate.set()
        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert committed == handled  # each batch committed once it succeeded, in batch order
    assert [seq for seqs in committed for seq in seqs] == list(range(1, 61))
    assert tries[committed[1][0]] == 2  # the TransientError was retried in place
    letters = await _dead_letters(js, dlq_stream)
    assert [(d.reason, d.stream_seq) for d in letters] == [("db_refused", 15)]
    info = await js.consumer_info(stream, worker_name)
    assert info.num_redelivered == 0
    ok = worker.metrics.registry.get_sample_value(
        "tickwire_messages_in_total", {"worker": worker_name, "outcome": "ok"}
    )
    assert ok == 59


async def _dead_letters_if(js: JetStreamContext, stream: str, n: int) -> list[DeadLetter] | None:
    letters = await _dead_letters(js, stream)
    return letters if len(letters) >= n else None


async def test_metrics_and_health_endpoints(stack, js: JetStreamContext, unique: str) -> None:
    worker_name, stream, dlq_stream = await _make_streams(js, unique)
    worker = _worker(worker_name, stream, _settings(stack.nats_url))
    handled: list[int] = []

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        handled.extend(d.info.stream_seq for d in batch)

    await js.publish(f"rt.{unique}.x", _tick("EURUSD", 1))
    await js.publish(f"rt.{unique}.x", b"not json")
    await js.publish(f"rt.{unique}.x", _tick("EURUSD", 2))
    task = await _run(worker)
    try:
        await eventually(lambda: len(handled) == 2, what="two ticks handled")
        assert worker.metrics_server is not None
        base = f"http://127.0.0.1:{worker.metrics_server.port}"

        def get(path: str) -> tuple[int, str]:
            with urllib.request.urlopen(f"{base}{path}", timeout=5) as r:
                return r.status, r.read().decode()

        async def scrape() -> str:
            # the server runs on this event loop: the blocking client goes to a thread
            return (await asyncio.to_thread(get, "/metrics"))[1]

        def metric(text: str, line_start: str) -> float | None:
            for line in text.splitlines():
                if line.startswith(line_start):
                    return float(line.rsplit(" ", 1)[1])
            return None

        dead_series = (
            f'tickwire_dead_letters_total{{reason="malformed_json",worker="{worker_name}"}}'
        )

        async def counted() -> str | None:
            text = await scrape()
            return text if metric(text, dead_series) == 1 else None

        text = await eventually(counted, what="dead letter counted")
        assert (
            metric(text, f'tickwire_messages_in_total{{outcome="ok",worker="{worker_name}"}}') == 2
        )
        assert metric(text, f'tickwire_up{{worker="{worker_name}"}}') == 1
        assert await asyncio.to_thread(get, "/healthz") == (200, "ok\n")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert not worker.healthy()
    letters = await _dead_letters(js, dlq_stream)
    assert [d.payload for d in letters] == [b"not json"]


async def test_stop_then_restart_handles_each_message_once(
    stack, js: JetStreamContext, unique: str
) -> None:
    """Stopping mid-stream acks what was handled and hands the rest back at once."""
    worker_name, stream, _ = await _make_streams(js, unique)
    for i in range(200):
        await js.publish(f"rt.{unique}.x", _tick("EURUSD", i))

    def make(handled: list[int], stop_after: int | None) -> Worker[TickInput]:
        w = _worker(worker_name, stream, _settings(stack.nats_url, handler_batch=10))

        @w.handler
        async def handle(batch: Batch[TickInput], ctx: Context) -> None:
            handled.extend(d.info.stream_seq for d in batch)
            if stop_after is not None and len(handled) >= stop_after:
                w.stop()

        return w

    first: list[int] = []
    w1 = make(first, stop_after=30)
    await asyncio.wait_for(await _run(w1), 30)
    assert 30 <= len(first) < 200

    second: list[int] = []
    w2 = make(second, stop_after=None)
    task = await _run(w2)
    try:
        await eventually(
            lambda: len(first) + len(second) >= 200,
            what=f"all 200 handled {len(first)} {len(second)}",
        )

        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
    finally:
        w2.stop()
        await asyncio.wait_for(task, 30)
    assert sorted(first + second) == list(range(1, 201))


@pytest.mark.parametrize("filtered", [False, True])
async def test_lost_deliveries_are_read_back_and_applied_in_stream_order(
    stack, js: JetStreamContext, unique: str, monkeypatch: pytest.MonkeyPatch, filtered: bool
) -> None:
    """A stateful handler sees every message once, in stream order, although some
    deliveries never arrive; when they come again they find themselves applied."""
    name, stream = f"rt-{unique}", f"RT_{unique}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"rt.{unique}.>"]))
    await js.add_stream(StreamConfig(name=f"DLQ_{unique}", subjects=[subjects.dlq(name)]))
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=2,  # the lost deliveries come again within the test
            filter_subject=f"rt.{unique}.a" if filtered else None,
        ),
    )
    # with a filter, every other message is another subject's: stream seqs 1, 3, 5...
    for i in range(400):
        await js.publish(f"rt.{unique}.{'ab'[i % 2] if filtered else 'a'}", _tick("EURUSD", i))
    wanted = list(range(1, 401, 2 if filtered else 1))
    lose = {wanted[40], wanted[41], wanted[150]}
    lost: list[int] = []
    monkeypatch.setattr(worker_module, "PullSource", losing_source(lose, lost))

    applied: list[int] = []
    again: list[tuple[int, int]] = []  # (stream seq, deliveries) of messages seen again
    worker = _worker(name, stream, _settings(stack.nats_url, handler_batch=20), in_order=True)

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        for d in batch:  # what every stateful worker does: at or below the last, applied
            seq = d.info.stream_seq
            if applied and seq <= applied[-1]:
                again.append((seq, d.info.deliveries))
            else:
                applied.append(seq)

    task = await _run(worker)
    try:
        await eventually(lambda: len(applied) >= len(wanted), what="every message applied")
        # the lost deliveries come again after their ack wait and are acked as applied
        await eventually(
            lambda: {s for s, n in again if n > 1} >= lose, what=f"redelivery of {lose}"
        )
        await eventually(lambda: _all_acked(js, stream, name), what="every message acked")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    assert sorted(lost) == sorted(lose)
    assert applied == wanted
    read_back = worker.metrics.registry.get_sample_value(
        "tickwire_read_back_total", {"worker": name}
    )
    assert read_back == len(lose)
    # the short-lived reader is gone
    assert [c.name for c in await js.consumers_info(stream)] == [name]


def test_batch_type_is_what_ticks_decode_into() -> None:
    codec: Codec[TickInput] = Codec(TickInput)
    batch = codec.decode(
        b'{"type":"tick_batch","feed":"f","symbol":"US500.cash","ticks":'
        b'[{"time_ms":1,"bid":1.5,"ask":1.75},{"time_ms":2,"bid":1.5,"ask":1.5}]}'
    )
    assert isinstance(batch, TickBatch)
    assert [t.time_ms for t in batch.ticks] == [1, 2]


async def test_partition_filter_and_dead_lettered_pieces(
    stack, js: JetStreamContext, unique: str
) -> None:
    """Messages of another partition are acked unread; a refused piece of a batch goes to the
    dead letters with its own payload while the rest of the message is handled."""
    worker_name, stream, dlq_stream = await _make_streams(js, unique)
    handled: list[tuple[str, int]] = []
    worker = _worker(
        worker_name,
        stream,
        _settings(stack.nats_url),
        accept=lambda subject: subject.endswith(".mine"),
    )

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        for d in batch:
            assert isinstance(d.value, TickBatch)
            for i, row in enumerate(d.value.ticks):
                if row.bid > row.ask:
                    batch.reject_part(d, i, msgspec.json.encode(row), "bid_above_ask")
                else:
                    handled.append((d.msg.subject, row.time_ms))

    def tick_batch(times: list[int], bad: int | None = None) -> bytes:
        rows = [{"time_ms": t, "bid": 2.0 if t == bad else 1.0, "ask": 1.5} for t in times]
        return msgspec.json.encode(
            {"type": "tick_batch", "feed": "demo", "symbol": "EURUSD", "ticks": rows}
        )

    await js.publish(f"rt.{unique}.theirs", tick_batch([1, 2, 3]))
    await js.publish(f"rt.{unique}.mine", tick_batch([4, 5, 6], bad=5))
    await js.publish(f"rt.{unique}.theirs", b"not even json")
    await js.publish(f"rt.{unique}.mine", tick_batch([7]))
    task = await _run(worker)
    try:
        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
        letters = await eventually(lambda: _dead_letters_if(js, dlq_stream, 1), what="a letter")
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
    subject = f"rt.{unique}.mine"
    assert handled == [(subject, 4), (subject, 6), (subject, 7)]
    assert len(letters) == 1
    (letter,) = letters
    assert letter.reason == "bid_above_ask"
    assert msgspec.json.decode(letter.payload) == {
        "time_ms": 5,
        "bid": 2.0,
        "ask": 1.5,
        "last": None,
        "volume": None,
        "seq": None,
        "flags": 0,
    }
    assert letter.stream_seq == 2
    skipped = worker.metrics.registry.get_sample_value(
        "tickwire_messages_in_total", {"worker": worker_name, "outcome": "other_partition"}
    )
    assert skipped == 2


async def test_a_requeued_message_goes_to_the_worker_that_refused_it_alone(
    stack, js: JetStreamContext, unique: str
) -> None:
    """Two workers consume the same subject; one refuses a tick. Requeued as ``tickwire dlq
    requeue`` sends it, it is handled again by that worker only: the other took the
    original, and acks the copy unread."""
    refuser, stream, dlq_stream = await _make_streams(js, unique)
    other = f"rt2-{unique}"
    await js.add_consumer(stream, ConsumerConfig(durable_name=other, ack_policy=AckPolicy.EXPLICIT))
    seen: dict[str, list[tuple[int, int]]] = {refuser: [], other: []}
    fixed = asyncio.Event()
    workers = []
    for name in (refuser, other):
        worker = _worker(name, stream, _settings(stack.nats_url))

        async def handle(batch: Batch[TickInput], ctx: Context, name: str = name) -> None:
            for d in batch:
                assert isinstance(d.value, Tick)
                seen[name].append((d.value.time_ms, d.info.stream_seq))
                if name == refuser and d.value.symbol == "HELD" and not fixed.is_set():
                    batch.reject(d, "not_yet", "its dependency is missing")

        worker.handler(handle)
        workers.append(worker)
    subject = f"rt.{unique}.ticks"
    for i, symbol in enumerate(("EURUSD", "HELD", "GBPUSD")):
        await js.publish(subject, _tick(symbol, i), headers={"Nats-Msg-Id": f"tick-{i}"})
    tasks = [await _run(w) for w in workers]
    try:
        letters = await eventually(lambda: _dead_letters_if(js, dlq_stream, 1), what="a letter")
        fixed.set()
        (letter,) = letters
        await js.publish(letter.subject, letter.payload, headers=requeue_headers(letter, "DLQ", 1))
        await js.publish(subject, _tick("USDJPY", 3), headers={"Nats-Msg-Id": "tick-3"})
        for name, n in ((refuser, 5), (other, 4)):
            await eventually(lambda name=name: _all_acked(js, stream, name), what=f"{name} done")
            await eventually(lambda name=name, n=n: len(seen[name]) >= n, what=f"{name} handled")
    finally:
        for w in workers:
            w.stop()
        for task in tasks:
            await asyncio.wait_for(task, 30)
    base = 1_700_000_000_000
    assert seen[refuser] == [(base, 1), (base + 1, 2), (base + 2, 3), (base + 1, 4), (base + 3, 5)]
    assert seen[other] == [(base, 1), (base + 1, 2), (base + 2, 3), (base + 3, 5)]
    passed_by = workers[1].metrics.registry.get_sample_value(
        "tickwire_messages_in_total", {"worker": other, "outcome": "requeued_for_other"}
    )
    assert passed_by == 1


@pytest.mark.parametrize(
    "down",
    [
        TransientError("database starting up"),
        nats.errors.TimeoutError(),  # a JetStream request the busy server did not answer
        nats.errors.NoRespondersError(),  # JetStream not there yet
    ],
    ids=repr,
)
async def test_a_start_up_hook_whose_dependency_is_down_is_retried(
    stack, js: JetStreamContext, unique: str, down: Exception
) -> None:
    worker_name, stream, _ = await _make_streams(js, unique)
    worker = _worker(worker_name, stream, _settings(stack.nats_url))
    tries: list[int] = []

    @worker.on_startup
    async def connect_database(ctx: Context) -> None:
        tries.append(len(tries))
        if len(tries) < 3:
            raise down

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        pass

    task = await _run(worker)
    worker.stop()
    await asyncio.wait_for(task, 30)
    assert tries == [0, 1, 2]


async def test_a_start_up_hook_that_fails_otherwise_stops_the_worker(
    stack, js: JetStreamContext, unique: str
) -> None:
    worker_name, stream, _ = await _make_streams(js, unique)
    worker = _worker(worker_name, stream, _settings(stack.nats_url))

    @worker.on_startup
    async def misconfigured(ctx: Context) -> None:
        raise ValueError("no such table")

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        pass

    with pytest.raises(ValueError, match="no such table"):
        await asyncio.wait_for(worker.run(), 30)
    assert not worker.started.is_set()


async def test_a_stateful_worker_waits_while_another_instance_consumes_on_its_durable(
    stack, js: JetStreamContext, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two instances on one durable would split its messages between them, and neither
    would see every message in order: a second one waits until the first has stopped, then
    takes over where it left off."""
    name, stream, _ = await _make_streams(js, unique)
    subject = f"rt.{unique}.ticks"
    applied: dict[str, list[int]] = {"first": [], "second": []}

    def instance(label: str) -> Worker[TickInput]:
        settings = _settings(stack.nats_url, retry_backoff_max_s=0.2)
        worker = _worker(name, stream, settings, in_order=True)

        @worker.handler
        async def handle(batch: Batch[TickInput], ctx: Context) -> None:
            applied[label].extend(d.info.stream_seq for d in batch)

        return worker

    async def publish(first: int, last: int) -> None:
        for i in range(first, last + 1):
            await js.publish(subject, _tick("EURUSD", i))

    first, second = instance("first"), instance("second")
    await publish(1, 100)
    first_task = await _run(first)
    second_task: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: len(applied["first"]) >= 100, what="the first hundred")
        second_task = asyncio.create_task(second.run())
        await eventually(
            lambda: f"another instance consumes on {stream}/{name}" in caplog.text,
            what="the second instance waiting",
        )
        await publish(101, 200)
        await eventually(lambda: len(applied["first"]) >= 200, what="the second hundred")
        assert not second.started.is_set()
        first.stop()
        await asyncio.wait_for(first_task, 30)
        await eventually(lambda: second.started.is_set(), what="the second instance consuming")
        await publish(201, 300)
        await eventually(lambda: len(applied["second"]) >= 100, what="the third hundred")
        await eventually(lambda: _all_acked(js, stream, name), what="every message acked")
    finally:
        first.stop()
        second.stop()
        await asyncio.wait_for(first_task, 30)
        if second_task is not None:
            await asyncio.wait_for(second_task, 30)
    assert applied == {"first": list(range(1, 201)), "second": list(range(201, 301))}


async def test_stop_while_nats_is_unreachable_returns_at_once(unique: str) -> None:
    worker: Worker[TickInput] = Worker(
        f"rt-{unique}",
        stream="NOWHERE",
        durable="nobody",
        codec=Codec(TickInput),
        settings=_settings("nats://127.0.0.1:1"),
    )

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        pass

    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0)  # let it start connecting
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert not worker.started.is_set()


async def test_unanswered_pull_requests_are_told_once_and_their_end_too(
    nc: Client, js: JetStreamContext, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer deleted under a running pull source: its requests, asked again at every
    take, end with no responders; one line says so, one says when the server answers again."""
    caplog.set_level(logging.INFO, logger="workers.runtime.pull")
    durable, stream, _ = await _make_streams(js, unique)
    config = (await js.consumer_info(stream, durable)).config
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    source = PullSource(nc, stream, durable, batch=10, expires_s=1.0)
    await source.start()

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "workers.runtime.pull"]

    async def taken() -> list[Msg]:
        return await source.take(10, 0.05)  # asks again when nothing is buffered

    try:
        await js.delete_consumer(stream, durable)

        async def asked_in_vain() -> bool:
            await taken()
            return any("no responders" in line for line in said())

        await eventually(asked_in_vain, what="a pull request without responders")
        for _ in range(20):  # many more of them: nothing more is said
            await taken()
        await js.add_consumer(stream, config)
        await js.publish(f"rt.{unique}.EURUSD", _tick("EURUSD", 1))
        got = await eventually(taken, what="the message once the consumer is back")
        assert [m.data for m in got] == [_tick("EURUSD", 1)]
    finally:
        await source.stop()
    lines = said()
    assert len(lines) == 2, lines
    assert lines[0] == f"pull request ended: no responders on {next_subject}; asking again"
    assert lines[1].startswith(f"pull requests on {next_subject} answered again after ")


async def test_a_worker_whose_consumer_is_gone_says_it_is_unhealthy_until_it_is_back(
    stack, js: JetStreamContext, unique: str
) -> None:
    """Connected to NATS, but nothing can come: /healthz must not say all is well."""
    worker_name, stream, _ = await _make_streams(js, unique)
    config = (await js.consumer_info(stream, worker_name)).config
    worker = _worker(worker_name, stream, _settings(stack.nats_url, unanswered_unhealthy_s=1))
    handled: list[int] = []

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        handled.extend(d.info.stream_seq for d in batch)

    task = await _run(worker)
    try:
        await eventually(worker.healthy, what="healthy once consuming")
        await js.delete_consumer(stream, worker_name)
        await eventually(lambda: not worker.healthy(), what="unhealthy while nothing answers")
        await js.add_consumer(stream, config)
        await js.publish(f"rt.{unique}.EURUSD", _tick("EURUSD", 1))
        await eventually(lambda: handled == [1], what="the message once the consumer is back")
        assert worker.healthy()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def test_a_stopped_pull_source_leaves_nothing_at_the_server_and_hands_everything_back(
    nc: Client, js: JetStreamContext, unique: str
) -> None:
    """Stopping withdraws the inbox's interest before handing back what the source holds:
    the server drops the open pull requests, no later message goes to them, and every
    message the source held comes again at once (long before its 30 s ack wait) and only
    once, not bounced back and forth by requests still open."""
    durable, stream, _ = await _make_streams(js, unique)
    for i in range(5):
        await js.publish(f"rt.{unique}.EURUSD", _tick("EURUSD", i))
    # asks for 10 and gets 5: the request stays open for its 60 s
    source = PullSource(nc, stream, durable, batch=10, expires_s=60.0)
    await source.start()

    async def all_given() -> bool:
        return (await js.consumer_info(stream, durable)).num_ack_pending == 5

    await eventually(all_given, what="all 5 messages delivered to the source")
    await asyncio.wait_for(source.stop(), 10)

    async def no_request_open() -> bool:
        return (await js.consumer_info(stream, durable)).num_waiting == 0

    await eventually(no_request_open, what="no pull request of the stopped source open")
    # a message published now is not taken by a request of the stopped source, and the 5
    # naked ones come again at once: the new source gets all 6 well within the ack wait
    await js.publish(f"rt.{unique}.EURUSD", _tick("EURUSD", 5))
    again = PullSource(nc, stream, durable, batch=10, expires_s=1.0)
    await again.start()
    got: list[Msg] = []

    async def all_again() -> bool:
        got.extend(await again.take(10, 0.2))
        return len(got) >= 6

    try:
        await eventually(all_again, what="the 6 messages at a new source", timeout=10)
    finally:
        await again.stop()
    assert sorted(m.data for m in got) == sorted(_tick("EURUSD", i) for i in range(6))
    # handed back once: delivered to the stopped source, then to the new one; the last
    # only to the new one
    deliveries = {m.data: m.metadata.num_delivered for m in got}
    assert deliveries == {_tick("EURUSD", i): 2 if i < 5 else 1 for i in range(6)}


async def _spend_deliveries(
    js: JetStreamContext, stream: str, durable: str, data: bytes, n: int
) -> None:
    """``n`` deliveries of the consumer's next message (``data``) spent, as ``n`` crashed
    workers would: taken, never acked."""
    sub = await js.pull_subscribe_bind(durable, stream=stream)
    try:
        for want in range(1, n + 1):
            (got,) = await sub.fetch(1, timeout=10)
            assert (got.data, got.metadata.num_delivered) == (data, want)
            await got.nak()
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize("in_order", [False, True], ids=["any-order", "in-order"])
async def test_a_message_on_its_last_delivery_is_dead_lettered_not_handled(
    stack, js: JetStreamContext, unique: str, in_order: bool
) -> None:
    """Deliveries run out without a handler failing when a message kills its worker, or
    restarts hand it back. Handled on its last delivery and failing once more, it would be
    gone without a trace (the server delivers it no more): it is dead-lettered instead."""
    worker_name, stream, dlq_stream = await _make_streams(js, unique, max_deliver=3)
    subject = f"rt.{unique}.ticks"
    doomed = _tick("DOOMED", 0)
    await js.publish(subject, doomed, headers={"Nats-Msg-Id": "doomed", "X-Trace": "t0"})
    await _spend_deliveries(js, stream, worker_name, doomed, 2)
    good = [_tick("EURUSD", i) for i in range(1, 4)]
    for p in good:
        await js.publish(subject, p)

    handled: list[tuple[bytes, int]] = []
    worker = _worker(worker_name, stream, _settings(stack.nats_url), in_order=in_order)

    @worker.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        handled.extend((d.msg.data, d.info.deliveries) for d in batch)

    task = await _run(worker)
    try:
        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
        assert handled == [(p, 1) for p in good]  # never the doomed one
        (letter,) = await eventually(
            lambda: _dead_letters_if(js, dlq_stream, 1), what="the dead letter"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)

    assert letter.reason == "max_deliveries"
    assert (letter.payload, letter.subject, letter.headers["X-Trace"]) == (doomed, subject, "t0")
    assert (letter.stream, letter.stream_seq, letter.deliveries) == (stream, 1, 3)
    sample = worker.metrics.registry.get_sample_value
    labels = {"worker": worker_name, "reason": "max_deliveries"}
    assert sample("tickwire_dead_letters_total", labels) == 1


async def test_a_stopping_worker_dead_letters_what_it_holds_on_its_last_delivery(
    stack, js: JetStreamContext, unique: str
) -> None:
    """Stopping while a dependency is down hands the held batch back. A message of it on
    its last delivery is dead-lettered then, not naked: the server would drop it."""
    worker_name, stream, dlq_stream = await _make_streams(js, unique, max_deliver=3)
    subject = f"rt.{unique}.ticks"
    doomed = _tick("DOOMED", 0)
    await js.publish(subject, doomed)
    await _spend_deliveries(js, stream, worker_name, doomed, 2)
    good = [_tick("EURUSD", i) for i in range(1, 3)]
    for p in good:
        await js.publish(subject, p)

    held: list[list[bytes]] = []
    # its pull request stays open for 30 s: what it hands back must not go into it
    down = _worker(worker_name, stream, _settings(stack.nats_url, pull_expires_s=30))

    @down.handler
    async def refuse(batch: Batch[TickInput], ctx: Context) -> None:
        held.append([d.msg.data for d in batch])
        raise TransientError("QuestDB is down")

    task = await _run(down)
    try:
        await eventually(lambda: len(held) >= 2, what="the batch held and tried again")
    finally:
        down.stop()
        await asyncio.wait_for(task, 30)
    assert held[0] == good  # the doomed one was never handed to the handler
    (letter,) = await eventually(
        lambda: _dead_letters_if(js, dlq_stream, 1), what="the dead letter", timeout=5
    )
    assert (letter.reason, letter.payload, letter.deliveries) == ("max_deliveries", doomed, 3)

    # the held ones come again, at once; the doomed one never
    handled: list[tuple[bytes, int]] = []
    up = _worker(worker_name, stream, _settings(stack.nats_url))

    @up.handler
    async def handle(batch: Batch[TickInput], ctx: Context) -> None:
        handled.extend((d.msg.data, d.info.deliveries) for d in batch)

    task = await _run(up)
    try:
        await eventually(lambda: len(handled) >= 2, what="the held messages handled")
        await eventually(lambda: _all_acked(js, stream, worker_name), what="every message acked")
    finally:
        up.stop()
        await asyncio.wait_for(task, 30)
    assert sorted(handled) == sorted((p, 2) for p in good)
    assert len(await _dead_letters(js, dlq_stream)) == 1


async def test_a_stopped_pull_source_returns_what_is_on_its_last_delivery(
    nc: Client, js: JetStreamContext, unique: str
) -> None:
    """What a stopping source holds goes back to the server, except a message on its last
    delivery, which it returns: naked, the server would drop it."""
    durable, stream, _ = await _make_streams(js, unique, max_deliver=3)
    doomed = _tick("DOOMED", 0)
    await js.publish(f"rt.{unique}.x", doomed)
    await _spend_deliveries(js, stream, durable, doomed, 2)
    await js.publish(f"rt.{unique}.x", _tick("EURUSD", 1))
    source = PullSource(nc, stream, durable, batch=10, expires_s=60.0, last_delivery=3)
    await source.start()

    async def both_given() -> bool:
        return (await js.consumer_info(stream, durable)).num_ack_pending == 2

    await eventually(both_given, what="both messages delivered to the source")
    kept = await asyncio.wait_for(source.stop(), 10)
    assert [(m.data, m.metadata.num_delivered) for m in kept] == [(doomed, 3)]
    # the other one comes again at once; the kept one stays with its taker, unacked
    again = PullSource(nc, stream, durable, batch=10, expires_s=1.0)
    await again.start()
    got: list[Msg] = []

    async def given_again() -> bool:
        got.extend(await again.take(10, 0.2))
        return bool(got)

    try:
        await eventually(given_again, what="the naked message at a new source", timeout=10)
    finally:
        await again.stop()
    assert [(m.data, m.metadata.num_delivered) for m in got] == [(_tick("EURUSD", 1), 2)]
