"""signal-publisher on the real NATS: signals equal a reference decision written here,
replayed scores add nothing, bad scores are dead letters, a policy put into KV takes effect
while running, latency is on /metrics, and kill -9 in the middle changes no byte of SIGNALS.

Each test runs in its own namespace (its own SCORES, SIGNALS and DLQ streams, its own
policy bucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import DeadLetter, Score, Side, Signal, Timeframe
from infra.stack import StackUrls
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
from workers.runtime.errors import TransientError
from workers.signal_publisher.app import Settings, Signals, build
from workers.signal_publisher.state import side_key

pytestmark = pytest.mark.integration

DURABLE = "signal-publisher"
M1 = 60_000
T0 = 1_767_225_600_000  # 2026-01-01


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
    for bucket in ("signal-policy", "signal-sides"):
        with contextlib.suppress(Exception):
            await js.delete_key_value(f"ns-{namespace}-{bucket}")


def settings(stack: StackUrls, namespace: str, **kw: Any) -> Settings:
    return Settings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1, **kw)


def make_score(symbol: str, bar: int, value: float, revision: int = 0) -> Score:
    close = 1.1 + bar * 1e-4
    return Score(
        feed="fx",
        symbol=symbol,
        tf=Timeframe.M1,
        open_time_ms=T0 + bar * M1,
        candle_revision=revision,
        close=close,
        close_time_ms=T0 + (bar + 1) * M1,
        last_tick_ms=T0 + (bar + 1) * M1 - 250,
        feature_set_id="fs-test",
        model_version="m-1",
        probabilities=[(1 - value) / 2, (1 + value) / 2],
        score=value,
    )


def walk(symbol: str, n: int, seed: int) -> list[Score]:
    """A random walk of scores in [-1, 1] that crosses the thresholds now and then."""
    rng = random.Random(seed)
    value, out = 0.0, []
    for bar in range(n):
        value = max(-1.0, min(1.0, value + rng.uniform(-0.35, 0.35)))
        out.append(make_score(symbol, bar, round(value, 3)))
    return out


def interleave(*parts: list[Score]) -> list[Score]:
    return sorted((s for p in parts for s in p), key=lambda s: (s.open_time_ms, s.symbol))


def reference(scores: list[Score]) -> list[tuple[str, int, str]]:
    """(symbol, bar open, side) by the default policy, written from its definition: flat
    enters at >= 0.6 / <= -0.6; long leaves at <= 0.2 (reversing at <= -0.6); short
    leaves at >= -0.2 (reversing at >= 0.6); a signal only when the side changes."""
    side: dict[str, str] = {}
    out = []
    for s in scores:
        now = side.get(s.symbol, "FLAT")
        v = s.score
        if now == "FLAT":
            new = "BUY" if v >= 0.6 else "SELL" if v <= -0.6 else "FLAT"
        elif now == "BUY":
            new = "SELL" if v <= -0.6 else "FLAT" if v <= 0.2 else "BUY"
        else:
            new = "BUY" if v >= 0.6 else "FLAT" if v >= -0.2 else "SELL"
        if new != now:
            out.append((s.symbol, s.open_time_ms, new))
        side[s.symbol] = new
    return out


async def publish(js: JetStreamContext, scores: list[Score], namespace: str) -> None:
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    futures = []
    for s in scores:
        subject = subjects.scores(s.feed, s.symbol, s.tf, namespace=namespace)
        msg_id = f"{s.feed}|{s.symbol}|{s.tf.value}|{s.open_time_ms}|{s.candle_revision}"
        futures.append(
            await js.publish_async(subject, msgspec.json.encode(s), headers={"Nats-Msg-Id": msg_id})
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


async def signals_of(js: JetStreamContext, namespace: str) -> list[Signal]:
    decode = msgspec.json.Decoder(Signal).decode
    return [decode(m) for m in await stream_messages(js, streams.SIGNALS, namespace)]


async def consumed(js: JetStreamContext, namespace: str) -> bool:
    stream = streams.stream_name(streams.SCORES, namespace=namespace)
    info = await js.consumer_info(stream, DURABLE)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def run_worker(worker: Any) -> asyncio.Task[None]:
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    if task.done():
        task.result()
    return task


async def stop_worker(worker: Any, task: asyncio.Task[None]) -> None:
    worker.stop()
    await asyncio.wait_for(task, 60)


async def policy_applied(js: JetStreamContext, worker: Any, namespace: str, data: bytes) -> None:
    """Put ``data`` into the policy's KV entry; until the running worker applied it."""
    kv = await js.key_value(f"ns-{namespace}-signal-policy")
    await kv.put("policy", data)
    applied = {"worker": DURABLE, "outcome": "applied"}
    sample = worker.metrics.registry.get_sample_value
    await eventually(
        lambda: sample("tickwire_signal_policy_updates_total", applied) == 1,
        what="the update applied",
    )


async def run_once(
    stack: StackUrls, js: JetStreamContext, namespace: str, scores: list[Score]
) -> None:
    """Start a worker, have it take ``scores``, stop it."""
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, scores, namespace)
        await eventually(lambda: consumed(js, namespace), what="the scores consumed")
    finally:
        await stop_worker(worker, task)


async def test_signals_follow_the_policy_and_replayed_scores_add_none(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    scores = interleave(walk("EURUSD", 300, 1), walk("US500.cash", 300, 2))
    want = reference(scores)
    assert len(want) >= 30
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, scores, namespace)
        await eventually(lambda: consumed(js, namespace), timeout=60, what="all scores")
    finally:
        await stop_worker(worker, task)
    got = await signals_of(js, namespace)
    assert [(s.symbol, s.open_time_ms, s.side.value) for s in got] == want
    by_key = {(s.symbol, s.open_time_ms): s for s in scores}
    for s in got:
        sc = by_key[s.symbol, s.open_time_ms]
        assert s.signal_id == f"fx|{s.symbol}|M1|{s.open_time_ms}|m-1"
        assert s.ref_price == sc.close
        assert s.expires_ms == sc.close_time_ms + 300_000
        assert s.strength == (0.0 if s.side.value == "FLAT" else abs(sc.score))
    sample = worker.metrics.registry.get_sample_value
    for stage in ("tick_to_signal", "close_to_signal"):
        n = sample("tickwire_e2e_latency_seconds_count", {"worker": DURABLE, "stage": stage})
        assert n == len(want)

    # the same scores once more, from the start of the stream: the same ids, dropped
    stream = streams.stream_name(streams.SCORES, namespace=namespace)
    await js.delete_consumer(stream, DURABLE)
    again = build(settings(stack, namespace))
    task = await run_worker(again)
    try:
        await eventually(lambda: consumed(js, namespace), timeout=60, what="the replay")
    finally:
        await stop_worker(again, task)
    assert [s.signal_id for s in await signals_of(js, namespace)] == [s.signal_id for s in got]


async def test_bad_scores_are_dead_lettered_with_reasons_and_the_worker_goes_on(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    good = walk("EURUSD", 80, 3)
    subject = subjects.scores("fx", "EURUSD", Timeframe.M1, namespace=namespace)
    enc = msgspec.json.encode
    plain = msgspec.structs.asdict(good[50]) | {"type": "score"}

    def bad(**kw: Any) -> bytes:
        return enc(msgspec.structs.replace(good[50], **kw))

    cases = [
        ("malformed_json", b'{"type":"score","feed":'),
        ("unknown_schema_version", enc(plain | {"v": 9})),
        ("missing_field", enc({k: v for k, v in plain.items() if k != "score"})),
        ("bad_score", bad(score=1.5)),
        # JSON has no NaN: msgspec writes null, which the codec refuses
        ("invalid_value", enc(plain | {"score": float("nan")})),
        ("bad_price", bad(close=0.0)),
        ("bad_price", bad(close=-1.2)),
        ("subject_mismatch", bad(symbol="GBPUSD")),
        ("out_of_order", enc(good[10])),
    ]
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, good[:50], namespace)
        for _, payload in cases:
            await js.publish(subject, payload)
        await publish(js, good[50:], namespace)
        await eventually(lambda: consumed(js, namespace), what="all consumed")
    finally:
        await stop_worker(worker, task)
    letters = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, namespace)
    ]
    assert sorted(d.reason for d in letters) == sorted(r for r, _ in cases)
    assert {d.payload for d in letters} == {p for _, p in cases}
    got = await signals_of(js, namespace)
    assert [(s.symbol, s.open_time_ms, s.side.value) for s in got] == reference(good)
    sample = worker.metrics.registry.get_sample_value
    assert sample("tickwire_dead_letters_total", {"worker": DURABLE, "reason": "bad_price"}) == 2


async def test_a_policy_put_into_kv_takes_effect_without_a_restart(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """Scores of 0.5 never enter by the default policy (0.6); after the KV entry lowers the
    entry to 0.4 the next one does. A bad update is refused and changes nothing. Deleting
    the entry brings the default policy back at once."""
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, [make_score("EURUSD", 0, 0.5), make_score("EURUSD", 1, 0.5)], namespace)
        await eventually(lambda: consumed(js, namespace), what="first scores")
        assert await signals_of(js, namespace) == []
        kv = await js.key_value(f"ns-{namespace}-signal-policy")
        sample = worker.metrics.registry.get_sample_value

        def updates(outcome: str) -> float:
            labels = {"worker": DURABLE, "outcome": outcome}
            return sample("tickwire_signal_policy_updates_total", labels) or 0.0

        await kv.put("policy", b'{"defaults": {"entry_long": 0.3, "exit_long": 0.4}}')
        await eventually(lambda: updates("refused") == 1, what="the bad update refused")
        await kv.put("policy", b"")  # empty: no policy either (a deletion is another thing)
        await eventually(lambda: updates("refused") == 2, what="the empty update refused")
        assert updates("deleted") == 0
        await publish(js, [make_score("EURUSD", 2, 0.5)], namespace)
        await eventually(lambda: consumed(js, namespace), what="a score after the bad one")
        assert await signals_of(js, namespace) == []

        await kv.put("policy", b'{"defaults": {"entry_long": 0.4, "exit_long": 0.1}}')
        await eventually(lambda: updates("applied") == 1, what="the update applied")
        await publish(js, [make_score("EURUSD", 3, 0.5)], namespace)
        await eventually(lambda: consumed(js, namespace), what="a score after the update")
        await publish(js, [make_score("EURUSD", 4, 0.15)], namespace)  # above its exit
        await eventually(lambda: consumed(js, namespace), what="a held score")

        # the entry deleted: the defaults again, without a restart (0.15 is below 0.2)
        await kv.delete("policy")
        await eventually(lambda: updates("deleted") == 1, what="the deletion taken")
        await publish(js, [make_score("EURUSD", 5, 0.15)], namespace)
        await eventually(lambda: consumed(js, namespace), what="a score after the deletion")
    finally:
        await stop_worker(worker, task)
    got = await signals_of(js, namespace)
    assert [(s.open_time_ms, s.side.value) for s in got] == [
        (T0 + 3 * M1, "BUY"),
        (T0 + 5 * M1, "FLAT"),
    ]


async def test_after_a_restart_a_series_holds_the_side_subscribers_were_told(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """BUY at bar 0 by the default policy; then the KV entry raises the entry to 0.9 and a
    restart decides bar 0 again under it (no entry). Subscribers hold BUY, so bar 2's 0.1
    must still exit to FLAT, as it would have without the restart."""
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, [make_score("EURUSD", 0, 0.7)], namespace)
        await eventually(lambda: consumed(js, namespace), what="the entry")
        await policy_applied(js, worker, namespace, b'{"defaults": {"entry_long": 0.9}}')
        await publish(js, [make_score("EURUSD", 1, 0.5)], namespace)  # held
        await eventually(lambda: consumed(js, namespace), what="a held score")
    finally:
        await stop_worker(worker, task)
    await run_once(stack, js, namespace, [make_score("EURUSD", 2, 0.1)])
    got = [(s.open_time_ms, s.side.value) for s in await signals_of(js, namespace)]
    assert got == [(T0, "BUY"), (T0 + 2 * M1, "FLAT")]


async def test_an_entry_gone_from_scores_still_has_its_exit(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """SCORES keeps less than SIGNALS: once the score of a (D1, say) entry is past SCORES'
    age limit, a restart has only the held scores after it. The exit must still come."""
    entry_and_held = [make_score("EURUSD", 0, 0.7)]
    entry_and_held += [make_score("EURUSD", bar, 0.5) for bar in (1, 2, 3)]
    await run_once(stack, js, namespace, entry_and_held)
    scores = streams.stream_name(streams.SCORES, namespace=namespace)
    await js.purge_stream(scores, seq=2)  # the entry's score ages out
    assert (await js.stream_info(scores)).state.first_seq == 2
    # and something that is no signal is the last word of another series: it told no one
    # anything, and does not stop the start
    junk = subjects.signals("fx", "GBPUSD", Timeframe.M1, namespace=namespace)
    await js.publish(junk, b'{"not": "a signal"}')
    await run_once(stack, js, namespace, [make_score("EURUSD", 4, 0.1)])
    got = await stream_messages(js, streams.SIGNALS, namespace)
    assert got[1] == b'{"not": "a signal"}'
    decoded = [msgspec.json.decode(m, type=Signal) for m in got[:1] + got[2:]]
    assert [(s.open_time_ms, s.side.value) for s in decoded] == [(T0, "BUY"), (T0 + 4 * M1, "FLAT")]


async def test_an_entry_gone_from_signals_too_still_has_its_exit(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """A (D1, say) position may be held longer than SIGNALS keeps its entry, a month. Once
    the entry's score and its signal are both past their streams' age limits, a restart has
    only the held scores, which enter nothing. The exit must still come."""
    entry_and_held = [make_score("EURUSD", 0, 0.7)]
    entry_and_held += [make_score("EURUSD", bar, 0.5) for bar in (1, 2, 3)]
    await run_once(stack, js, namespace, entry_and_held)
    assert [s.side.value for s in await signals_of(js, namespace)] == ["BUY"]
    await js.purge_stream(streams.stream_name(streams.SCORES, namespace=namespace), seq=2)
    await js.purge_stream(streams.stream_name(streams.SIGNALS, namespace=namespace))
    await run_once(stack, js, namespace, [make_score("EURUSD", 4, 0.1)])
    got = [(s.open_time_ms, s.side.value) for s in await signals_of(js, namespace)]
    assert got == [(T0 + 4 * M1, "FLAT")]


async def test_a_correction_for_an_earlier_candle_does_not_undo_a_later_signal(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """BUY at bar 0, FLAT at bar 2. Then ``tickwire rebuild`` of a range that ends before
    bar 2 corrects bar 1 to SELL: the last message on SIGNALS, but subscribers' last word is
    still bar 2's FLAT. After a restart the series is flat, so -0.7 at bar 4 enters SELL."""
    await run_once(stack, js, namespace, [make_score("EURUSD", b, v) for b, v in enumerate(
        (0.7, 0.5, 0.1, 0.0))])  # fmt: skip
    live = await signals_of(js, namespace)
    assert [(s.open_time_ms, s.side.value) for s in live] == [(T0, "BUY"), (T0 + 2 * M1, "FLAT")]
    fix = msgspec.structs.replace(
        live[1], open_time_ms=T0 + M1, side=Side.SELL, signal_id="fix|rebuild-1", rebuild=1
    )
    subject = subjects.signals("fx", "EURUSD", Timeframe.M1, namespace=namespace)
    await js.publish(subject, msgspec.json.encode(fix), headers={"Nats-Msg-Id": fix.signal_id})
    await run_once(stack, js, namespace, [make_score("EURUSD", 4, -0.7)])
    got = [(s.open_time_ms, s.side.value) for s in (await signals_of(js, namespace))[3:]]
    assert got == [(T0 + 4 * M1, "SELL")]


async def test_after_a_restart_a_series_never_told_a_side_holds_none(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """0.55 and 0.4 enter nothing under the default policy; then the KV entry lowers the
    long entry to 0.5. A restart decides 0.55 again under it (BUY), but subscribers were
    never told a side: the later 0.1 exits nothing, and nothing at all is published, as
    without the restart."""
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, [make_score("EURUSD", 0, 0.55), make_score("EURUSD", 1, 0.4)], namespace)
        await eventually(lambda: consumed(js, namespace), what="the scores")
        await policy_applied(js, worker, namespace, b'{"defaults": {"entry_long": 0.5}}')
    finally:
        await stop_worker(worker, task)
    later = [make_score("EURUSD", 2, 0.3), make_score("EURUSD", 3, 0.1)]
    await run_once(stack, js, namespace, later)
    assert await signals_of(js, namespace) == []


async def test_a_start_whose_restore_fails_is_tried_again_whole(
    stack: StackUrls, js: JetStreamContext, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebuilding the series fails at start (a replay that stalled). The start is tried
    again after its backoff, the policy watch of the failed try ended: a policy put into KV
    afterwards is applied once, by the running worker, and its signals follow it."""
    tries = fails_first(monkeypatch, Signals, "restore", TransientError("replay stalled"))
    worker = build(settings(stack, namespace))
    sample = worker.metrics.registry.get_sample_value

    def applied() -> float:
        labels = {"worker": DURABLE, "outcome": "applied"}
        return sample("tickwire_signal_policy_updates_total", labels) or 0.0

    task = await run_worker(worker)
    try:
        assert len(tries) == 2
        kv = await js.key_value(f"ns-{namespace}-signal-policy")
        await kv.put("policy", b'{"defaults": {"entry_long": 0.4, "exit_long": 0.1}}')
        await eventually(lambda: applied() > 0, what="the update applied")
        await publish(js, [make_score("EURUSD", 0, 0.5)], namespace)
        await eventually(lambda: consumed(js, namespace), what="the score")
    finally:
        await stop_worker(worker, task)
    got = await signals_of(js, namespace)
    assert [(s.open_time_ms, s.side.value) for s in got] == [(T0, "BUY")]
    assert applied() == 1  # a watch left over from the failed try would apply it again


async def delivered_at_least(js: JetStreamContext, namespace: str, point: int) -> bool:
    stream = streams.stream_name(streams.SCORES, namespace=namespace)
    try:
        info = await js.consumer_info(stream, DURABLE)
    except APIError:
        return False
    return bool(info.delivered) and info.delivered.stream_seq >= point


async def delivered(js: JetStreamContext, namespace: str) -> int:
    info = await js.consumer_info(streams.stream_name(streams.SCORES, namespace=namespace), DURABLE)
    return info.delivered.stream_seq if info.delivered else 0


async def delivered_beyond(js: JetStreamContext, namespace: str, seq: int, seconds: float) -> int:
    """How many scores past ``seq`` were delivered within ``seconds`` (0 if none)."""

    async def beyond() -> int:
        return max(0, await delivered(js, namespace) - seq)

    try:
        return await eventually(beyond, timeout=seconds, what="a delivery")
    except AssertionError:
        return 0


def with_revisions(scores: list[Score]) -> list[Score]:
    """Every 37th score is revised right after it, with the opposite conviction."""
    out = []
    for n, s in enumerate(scores, 1):
        out.append(s)
        if n % 37 == 0:
            out.append(msgspec.structs.replace(s, score=-s.score, candle_revision=1))
    return out


async def test_kill_9_in_the_middle_changes_no_byte_of_the_signals(
    stack: StackUrls, js: JetStreamContext, namespace: str, namespace_b: str, tmp_path: Path
) -> None:
    scores = with_revisions(
        interleave(walk("EURUSD", 400, 4), walk("US500.cash", 400, 5), walk("GBPUSD", 400, 6))
    )
    broken = msgspec.structs.replace(scores[300], close=-1.0, candle_revision=5)
    payloads = [*scores[:500], broken, *scores[500:]]
    chaos, calm = namespace, namespace_b
    await publish(js, payloads, calm)
    calm_worker = build(settings(stack, calm))
    task = await run_worker(calm_worker)
    try:
        await eventually(lambda: consumed(js, calm), timeout=120, what="the calm run")
    finally:
        await stop_worker(calm_worker, task)

    env = worker_env(stack, chaos, handler_batch="20", fetch_batch="20")
    log = tmp_path / "signal-publisher.log"
    chunk, kills = 150, 0
    frozen_with: list[int] = []  # delivered to a frozen worker: never acked by it, sent again
    # the last scores go out once the last process runs: it must have work to finish
    body, tail = payloads[:-30], payloads[-30:]
    for start in range(0, len(body), chunk):
        head, rest = body[start : start + chunk - 50], body[start + chunk - 50 : start + chunk]
        await publish(js, head, chaos)
        proc = spawn(DURABLE, env, log)
        point = start + len(head) // 2
        await eventually(
            lambda point=point, proc=proc: (
                running(proc, log) and delivered_at_least(js, chaos, point)
            ),
            timeout=120,
            what=f"progress to seq {point}",
        )
        # frozen wherever it is; what it has asked for meanwhile arrives and is never acked
        proc.send_signal(signal.SIGSTOP)
        seen = await delivered(js, chaos)
        await publish(js, rest, chaos)
        frozen_with.append(await delivered_beyond(js, chaos, seen, 5.0))
        proc.kill()
        proc.wait()
        kills += 1
    proc = spawn(DURABLE, env, log)
    try:
        await publish(js, tail, chaos)
        await eventually(lambda: consumed(js, chaos), timeout=120, what="the end")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert kills >= 8
    assert any(frozen_with), frozen_with
    assert proc.returncode == 0, log.read_text()[-3000:]

    calm_out = await stream_messages(js, streams.SIGNALS, calm)
    chaos_out = await stream_messages(js, streams.SIGNALS, chaos)
    # signals decided again after a revision carry it in their ids
    corrections = [s for s in await signals_of(js, calm) if "|r1" in s.signal_id]
    assert len(calm_out) >= 100
    assert corrections
    assert Counter(chaos_out) == Counter(calm_out)  # byte for byte, none missing or doubled
    dead = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.DLQ, chaos)
    ]
    assert [d.reason for d in dead] == ["bad_price"]


async def test_a_correction_for_an_earlier_candle_leaves_the_later_word_in_the_sides_bucket(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """SELL, exit, BUY; then bar 0 revised to a BUY: its correction is the last signal
    published, but bar 2's BUY stays the series' last word, in the bucket a restart reads
    (and so the cooldown still counts from bar 2)."""
    worker = build(settings(stack, namespace))
    task = await run_worker(worker)
    try:
        scores = [make_score("EURUSD", bar, v) for bar, v in enumerate((-0.7, -0.1, 0.7))]
        await publish(js, scores, namespace)
        await eventually(lambda: consumed(js, namespace), what="the scores")
        await publish(js, [make_score("EURUSD", 0, 0.7, revision=1)], namespace)
        await eventually(lambda: consumed(js, namespace), what="the revision")
    finally:
        await stop_worker(worker, task)
    got = await signals_of(js, namespace)
    assert [(s.open_time_ms, s.side.value) for s in got] == [
        (T0, "SELL"),
        (T0 + M1, "FLAT"),
        (T0 + 2 * M1, "BUY"),
        (T0, "BUY"),  # the correction, published last
    ]
    kv = await js.key_value(f"ns-{namespace}-signal-sides")
    entry = await kv.get(side_key(got[2]))
    assert entry.value is not None
    assert msgspec.json.decode(entry.value, type=Signal) == got[2]


async def test_a_candle_of_a_period_that_had_none_coming_after_the_next_is_decided_in_its_place(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """With an allowed lateness over the timeframe, bar 1's first tick comes after bars 2
    and 3 are out, and its score after theirs. It is no dead letter: decided in its place,
    it enters BUY, and bar 3 then exits (a correction, its id adding bar 1). The signals are
    those of the scores decided in time order, and a replay of SCORES adds none."""
    values = {0: 0.1, 1: 0.7, 2: 0.5, 3: 0.1, 4: 0.7}
    scores = [make_score("EURUSD", bar, values[bar]) for bar in (0, 2, 3, 1, 4)]
    want = reference(sorted(scores, key=lambda s: s.open_time_ms))
    worker = build(settings(stack, namespace, allowed_lateness_s=180.0))
    task = await run_worker(worker)
    try:
        await publish(js, scores, namespace)
        await eventually(lambda: consumed(js, namespace), what="the scores")
    finally:
        await stop_worker(worker, task)
    got = await signals_of(js, namespace)
    assert [(s.symbol, s.open_time_ms, s.side.value) for s in got] == want
    assert await stream_messages(js, streams.DLQ, namespace) == []
    assert [(s.signal_id, s.corrects) for s in got] == [
        (f"fx|EURUSD|M1|{T0 + M1}|m-1", None),
        (f"fx|EURUSD|M1|{T0 + 3 * M1}|m-1|r0@{T0 + M1}", None),
        (f"fx|EURUSD|M1|{T0 + 4 * M1}|m-1", None),
    ]
    kv = await js.key_value(f"ns-{namespace}-signal-sides")
    entry = await kv.get(side_key(got[-1]))
    assert entry.value is not None
    assert msgspec.json.decode(entry.value, type=Signal) == got[-1]

    # SCORES read again from its start: the same ids, dropped
    await js.delete_consumer(streams.stream_name(streams.SCORES, namespace=namespace), DURABLE)
    await run_once(stack, js, namespace, [])
    assert await signals_of(js, namespace) == got


async def test_a_restart_after_the_duplicate_window_publishes_no_signal_twice(
    stack: StackUrls, js: JetStreamContext, namespace: str, tmp_path: Path
) -> None:
    """A process killed after SIGNALS stored its first signals and before it acked their
    scores, and down longer than the stream's duplicate window: its restart publishes the
    signals the unacked scores owe, but not those subscribers were sent already."""
    window = 1.0
    scores = interleave(walk("EURUSD", 200, 5), walk("US500.cash", 200, 6))
    want = reference(scores)
    await publish(js, scores, namespace)
    await shorten_windows(js, namespace, window)
    env = worker_env(
        stack,
        namespace,
        handler_batch="50",
        fetch_batch="50",
        test_duplicate_window_s=str(window),
    )
    log = tmp_path / "signal-publisher.log"
    signals = subjects.wildcard(subjects.SIGNALS, namespace=namespace).split("*")[0]
    await killed_after_its_first_publish(DURABLE, env, log, signals)
    output = streams.stream_name(streams.SIGNALS, namespace=namespace)
    before = await stored_messages(js, output)
    info = await js.consumer_info(streams.stream_name(streams.SCORES, namespace=namespace), DURABLE)
    sent = [msgspec.json.decode(p, type=Signal) for _, p in before]
    assert sent, "killed after its first signals were stored"
    # their scores not acked
    assert info.ack_floor.stream_seq < max(scores.index(by(s, scores)) + 1 for s in sent)
    await window_gone_by(js, f"{namespace}_WINDOW", window)

    async with started_worker(DURABLE, env, log, module=CRASHING):
        await eventually(lambda: consumed(js, namespace), timeout=120, what="every score")
    got = await stored_messages(js, output)
    assert doubled(got) == []
    told = [msgspec.json.decode(p, type=Signal) for _, p in got]
    assert sorted((s.symbol, s.open_time_ms, s.side.value) for s in told) == sorted(want)


def by(signal: Signal, scores: list[Score]) -> Score:
    """The score ``signal`` was decided on."""
    (score,) = (
        s for s in scores if (s.symbol, s.open_time_ms) == (signal.symbol, signal.open_time_ms)
    )
    return score
