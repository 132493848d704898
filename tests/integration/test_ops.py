"""``tickwire dlq`` and ``tickwire status`` on the real NATS, with real workers.

Dead letters come from the runtime's own dead-letter path: feature-builder refusing bad
candles, and a runtime worker named candle-ingest refusing undecodable ticks. Every
command runs as the console script does, in a subprocess; what it reports is checked
against the streams read directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from contracts import streams, subjects
from contracts.codec import Codec
from contracts.messages import DeadLetter, TickInput, Timeframe
from infra.stack import NatsServer, StackUrls
from tests.candles import series
from tests.integration.test_feature_builder import close_enough, expected, run_worker
from tests.integration.test_registry import card, train
from tests.processes import free_port
from tests.waiting import eventually
from workers.feature_builder.app import Settings, build
from workers.registry import Registry, bucket_name
from workers.runtime.metrics import WorkerMetrics
from workers.runtime.publish import Publisher
from workers.runtime.settings import RuntimeSettings
from workers.runtime.worker import Batch, Context, Worker
from workers.signal_publisher import delivery

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FB = "feature-builder"
CI = "candle-ingest"


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(bucket_name(unique))
    with contextlib.suppress(APIError):
        await js.delete_key_value(bucket_name(unique))


def tickwire(
    stack: StackUrls, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.nats_url),
        "TICKWIRE_NATS_CONNECT_TIMEOUT_S": "2",
        "TICKWIRE_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


async def run(stack: StackUrls, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(tickwire, stack, *args, **kw)


async def run_ok(stack: StackUrls, *args: str, **kw: Any) -> str:
    proc = await run(stack, *args, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tick_refuser(stack: StackUrls, namespace: str) -> Worker[Any]:
    """The runtime with candle-ingest's name and stream: undecodable ticks are its dead
    letters, exactly as for the real worker (which also needs QuestDB)."""
    settings = RuntimeSettings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1)
    spec = next(c for c in streams.consumer_specs(namespace=namespace) if c.durable == CI)
    worker: Worker[Any] = Worker(
        CI, stream=spec.stream, durable=CI, codec=Codec(TickInput), settings=settings
    )

    @worker.on_startup
    async def ensure(ctx: Context) -> None:
        await streams.ensure(ctx.js, streams.stream_specs(namespace=namespace), [spec])

    @worker.handler
    async def accept(batch: Batch[Any], ctx: Context) -> None:
        return None

    return worker


async def letters(js: JetStreamContext, namespace: str) -> dict[int, DeadLetter]:
    """Every dead letter in the namespace's DLQ stream by sequence, read directly."""
    name = streams.stream_name(streams.DLQ, namespace=namespace)
    state = (await js.stream_info(name)).state
    out = {}
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            msg = await js.get_msg(name, seq)
        except NotFoundError:
            continue
        with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
            out[seq] = msgspec.json.decode(msg.data or b"", type=DeadLetter)
    return out


def counts(found: dict[int, DeadLetter]) -> Counter[tuple[str, str]]:
    return Counter((d.worker, d.reason) for d in found.values())


async def consumed(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def state(js: JetStreamContext, *names: str) -> list[tuple[int, int, int, int]]:
    out = []
    for name in names:
        s = (await js.stream_info(name)).state
        out.append((s.messages, s.bytes, s.first_seq, s.last_seq))
    return out


def table_rows(text: str, title: str | None = None) -> list[list[str]]:
    """Rows under the dashed line of a table (of one ``== title ==`` section)."""
    if title is not None:
        text = text.split(f"== {title} ==\n", 1)[1].split("\n\n", 1)[0]
    lines = text.splitlines()
    dashes = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "})
    return [line.split() for line in lines[dashes + 1 :]]


def ms_text(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


async def test_dead_letters_list_show_requeue_purge(
    stack: StackUrls, js: JetStreamContext, namespace: str, tmp_path: Path
) -> None:
    ns = ("--namespace", namespace)
    good = series(51, seed=41)
    last = good[50]
    enc = msgspec.json.encode
    candles_subject = subjects.candles("feed-a", "EURUSD", Timeframe.M1, namespace=namespace)
    ticks_subject = subjects.ticks("feed-a", "EURUSD", namespace=namespace)
    malformed = [b'{"type":"candle","feed":', b"not json at all"]
    below = [
        enc(msgspec.structs.replace(last, high=last.low - 0.001)),
        enc(msgspec.structs.replace(last, high=last.low - 0.002)),
    ]
    broken = enc(msgspec.structs.replace(last, open=-1.0))  # the one to fix
    bad_ticks = [b"{", b"[1,2", b'{"type":"tick"']
    await streams.ensure(js, streams.stream_specs(namespace=namespace))

    fb = build(Settings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1))
    ci = tick_refuser(stack, namespace)
    tasks = [await run_worker(fb), await run_worker(ci)]
    candles = streams.stream_name(streams.CANDLES, namespace=namespace)
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    dlq = streams.stream_name(streams.DLQ, namespace=namespace)
    try:
        for i, c in enumerate(good[:50]):
            await js.publish(candles_subject, enc(c), headers={"Nats-Msg-Id": f"c{i}"})
        for n, payload in enumerate([*malformed, *below]):
            await js.publish(candles_subject, payload, headers={"Nats-Msg-Id": f"bad{n}"})
        original_id = "c50|broken"
        await js.publish(
            candles_subject, broken, headers={"Nats-Msg-Id": original_id, "X-Trace": "ea-7"}
        )
        for n, payload in enumerate(bad_ticks):
            await js.publish(ticks_subject, payload, headers={"Nats-Msg-Id": f"t{n}"})
        # someone else's message on a dlq subject: not a dead letter
        junk = await js.publish(subjects.dlq("timescale-replicator", namespace=namespace), b"junk")
        await eventually(lambda: consumed(js, candles, FB), what="candles consumed")
        await eventually(lambda: consumed(js, ticks, CI), what="ticks consumed")
        found = await letters(js, namespace)
        assert counts(found) == {
            (FB, "malformed_json"): 2,
            (FB, "high_below_low"): 2,
            (FB, "bad_price"): 1,
            (CI, "malformed_json"): 2,
            (CI, "invalid_value"): 1,
        }

        # list: counts per worker and reason, first and last refusal time
        rows = table_rows(await run_ok(stack, "dlq", "list", *ns))
        by_key = {(r[0], r[1]): r for r in rows}
        assert {k: int(r[2]) for k, r in by_key.items()} == counts(found)
        for key, row in by_key.items():
            times = [d.failed_at_ms for d in found.values() if (d.worker, d.reason) == key]
            assert " ".join(row[3:5]) == ms_text(min(times))
            assert " ".join(row[5:7]) == ms_text(max(times))
        only = table_rows(
            await run_ok(
                stack,
                *("dlq", "list", "--worker", FB, "--reason", "high_below_low"),
                env={"TICKWIRE_NAMESPACE": namespace},  # instead of --namespace
            )
        )
        assert [(r[0], r[1], r[2]) for r in only] == [(FB, "high_below_low", "2")]

        # show: everything about one dead letter, the JSON payload pretty-printed
        seq = next(s for s, d in found.items() if d.reason == "bad_price")
        shown = await run_ok(stack, "dlq", "show", str(seq), *ns)
        assert "reason:      bad_price" in shown
        assert f"subject:     {candles_subject}" in shown
        assert f"Nats-Msg-Id: {original_id}" in shown
        assert "X-Trace: ea-7" in shown
        assert '"open": -1.0' in shown
        assert f"deliveries:  {found[seq].deliveries}" in shown

        # bad arguments: one line, exit 2, no stream changed
        not_valid = tmp_path / "missing-field.json"
        fields = msgspec.to_builtins(last)
        not_valid.write_bytes(enc({k: v for k, v in fields.items() if k != "close"}))
        other_series = tmp_path / "other-symbol.json"
        other_series.write_bytes(enc(msgspec.structs.replace(last, symbol="GBPUSD")))
        before = await state(js, dlq, candles, ticks)
        refusals = [
            ("dlq", "list", "--worker", "nosuch", *ns),
            ("dlq", "show", "99999", *ns),
            ("dlq", "show", str(junk.seq), *ns),
            ("dlq", "show", "0", *ns),
            ("dlq", "requeue", str(seq), "--payload-file", str(not_valid), *ns),
            ("dlq", "requeue", str(seq), "--payload-file", str(other_series), *ns),
            ("dlq", "requeue", str(seq), "--payload-file", str(tmp_path / "none.json"), *ns),
            ("dlq", "requeue", "--worker", FB, *ns),
            ("dlq", "requeue", str(seq), "--worker", FB, *ns),
            ("dlq", "purge", "--worker", FB, "--reason", "high_below_low", *ns),
            ("dlq", "purge", "--worker", FB, "--reason", "nosuch", "--yes", *ns),
            ("dlq", "list", "--namespace", "bad.name"),
        ]
        for args in refusals:
            proc = await run(stack, *args)
            assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
        closed = f"nats://127.0.0.1:{free_port()}"
        proc = await run(stack, "dlq", "requeue", str(seq), *ns, env={"TICKWIRE_NATS_URL": closed})
        assert proc.returncode == 2
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(f"tickwire: dlq: NATS at {closed} did not answer: TimeoutError(")
        assert "Connect call failed" in line
        assert await state(js, dlq, candles, ticks) == before
        assert await letters(js, namespace) == found

        # requeue with a fixed payload: it flows through the worker, the dead letter goes
        fixed = tmp_path / "fixed.json"
        fixed.write_bytes(enc(last))
        out = await run_ok(stack, "dlq", "requeue", str(seq), "--payload-file", str(fixed), *ns)
        assert out.startswith(f"requeued {seq} to {candles_subject}")
        await eventually(lambda: consumed(js, candles, FB), what="fixed candle consumed")
        assert seq not in await letters(js, namespace)
        requeued = await js.get_last_msg(candles, candles_subject)
        assert requeued.data == enc(last)
        assert requeued.headers is not None
        assert requeued.headers["Nats-Msg-Id"] == f"requeue|{dlq}|{seq}"
        assert requeued.headers["Tickwire-Original-Msg-Id"] == original_id
        assert requeued.headers["X-Trace"] == "ea-7"
        features = streams.stream_name(streams.FEATURES, namespace=namespace)
        got = [
            (await js.get_msg(features, s)).data or b""
            for s in range(1, (await js.stream_info(features)).state.last_seq + 1)
        ]
        assert close_enough(got, expected(good)) == []  # the 51st vector, once
        assert len(got) == len(good)
        again = await run(stack, "dlq", "requeue", str(seq), "--payload-file", str(fixed), *ns)
        assert again.returncode == 2

        # requeue without a fix: a still-bad message is a dead letter again, not lost
        old = {s for s, d in found.items() if (d.worker, d.reason) == (FB, "malformed_json")}
        out = await run_ok(
            stack, "dlq", "requeue", "--worker", FB, "--reason", "malformed_json", *ns
        )
        assert out.strip().endswith(f"requeued 2 dead letters of {FB} (malformed_json)")

        async def refused_again() -> dict[int, DeadLetter]:
            now = await letters(js, namespace)
            fresh = {
                s: d
                for s, d in now.items()
                if (d.worker, d.reason) == (FB, "malformed_json") and s not in old
            }
            return fresh if len(fresh) == 2 else {}

        fresh = await eventually(refused_again, what="requeued bad candles dead-lettered again")
        assert sorted(d.payload for d in fresh.values()) == sorted(malformed)
        assert all(
            d.headers["Tickwire-Requeued-From"].startswith(f"{dlq}:") for d in fresh.values()
        )
        now = await letters(js, namespace)
        assert not old & now.keys()
        assert counts(now) == {
            (FB, "malformed_json"): 2,
            (FB, "high_below_low"): 2,
            (CI, "malformed_json"): 2,
            (CI, "invalid_value"): 1,
        }

        # --limit: only the oldest one, refused again by candle-ingest's runtime
        ci_old = sorted(s for s, d in now.items() if (d.worker, d.reason) == (CI, "malformed_json"))
        await run_ok(
            stack,
            "dlq",
            "requeue",
            "--worker",
            CI,
            "--reason",
            "malformed_json",
            "--limit",
            "1",
            *ns,
        )

        async def ci_refused_again() -> bool:
            mine = {
                s for s, d in (await letters(js, namespace)).items() if d.worker == CI
            } - now.keys()
            return len(mine) == 1

        await eventually(ci_refused_again, what="requeued tick dead-lettered again")
        later = await letters(js, namespace)
        assert ci_old[0] not in later
        assert ci_old[1] in later
        assert counts(later) == counts(now)
        now = later

        # purge one reason: only that reason goes
        await run_ok(
            stack, "dlq", "purge", "--worker", FB, "--reason", "high_below_low", "--yes", *ns
        )
        after = await letters(js, namespace)
        assert after == {s: d for s, d in now.items() if d.reason != "high_below_low"}
        # purge a whole worker: only that worker's go
        await run_ok(stack, "dlq", "purge", "--worker", CI, "--yes", *ns)
        assert await letters(js, namespace) == {s: d for s, d in after.items() if d.worker != CI}
        assert (await js.get_msg(dlq, junk.seq)).data == b"junk"
    finally:
        for worker in (fb, ci):
            worker.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def test_status_shows_streams_consumers_workers_and_models(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    good = series(30, seed=43)
    subject = subjects.candles("feed-a", "EURUSD", Timeframe.M1, namespace=namespace)
    candles = streams.stream_name(streams.CANDLES, namespace=namespace)
    fb = build(Settings(nats_url=stack.nats_url, namespace=namespace, pull_expires_s=1))
    task = await run_worker(fb)
    assert fb.metrics_server is not None
    health = f"{FB}=127.0.0.1:{fb.metrics_server.port},{CI}=127.0.0.1:{free_port()}"
    env = {"TICKWIRE_HEALTH": health, "TICKWIRE_NAMESPACE": namespace}
    try:
        for c in good:
            await js.publish(subject, msgspec.json.encode(c))
        await eventually(lambda: consumed(js, candles, FB), what="candles consumed")
        running = await run_ok(stack, "status", env=env)
    finally:
        fb.stop()
        await asyncio.wait_for(task, 60)

    # streams: as the server counts them, first and last message time
    info = (await js.stream_info(candles)).state
    first = (await js.get_msg(candles, info.first_seq)).time
    last = (await js.get_msg(candles, info.last_seq)).time
    assert first is not None
    assert last is not None
    rows = {r[0]: r for r in table_rows(running, "streams")}
    row = rows[candles]
    assert (int(row[1]), int(row[2])) == (len(good), info.bytes)
    assert " ".join(row[3:5]) == first.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert " ".join(row[5:7]) == last.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    features = streams.stream_name(streams.FEATURES, namespace=namespace)
    assert int(rows[features][1]) == len(good)
    # consumers: caught up
    consumer = {(r[0], r[1]): r for r in table_rows(running, "consumers")}[candles, FB]
    # last seq, ack floor, not delivered, ack pending, lag msgs, lag s; pulls waiting: the
    # running worker's
    assert consumer[2:8] == [str(len(good)), str(len(good)), "0", "0", "0", "0.0"]
    assert int(consumer[8]) >= 1
    # workers: the running one up, the one that is not running down
    workers = {r[0]: r for r in table_rows(running, "workers")}
    assert workers[FB][2] == "up"
    assert workers[CI][2] == "down"
    # no registry in this namespace yet: said in its section
    assert f"model registry {bucket_name(namespace)!r} does not exist" in running

    # with the worker stopped and a promoted model
    artifact, _ = train(seed=5)
    registry = await Registry.open(js, namespace=namespace)
    version = await registry.put(artifact, card(0.61))
    other = await registry.put(train(seed=6)[0], card(0.55, symbol="EURUSD"))
    assert (await registry.promote(version, force=True))[0]
    stopped = await run_ok(stack, "status", env=env)
    workers = {r[0]: r for r in table_rows(stopped, "workers")}
    assert workers[FB][2] == "down"
    consumer = {(r[0], r[1]): r for r in table_rows(stopped, "consumers")}[candles, FB]
    assert consumer[8] == "0", "no instance consumes on it"
    models = table_rows(stopped, "active models")
    assert models == [["demo", "US500.cash", "M5", version, "fs-0123456789abcdef", "0.6100"]]
    assert other not in stopped  # a candidate is not active


async def test_a_batch_requeue_leaves_dead_letters_without_a_message_and_takes_the_rest(
    stack: StackUrls, nc: Client, js: JetStreamContext, namespace: str, tmp_path: Path
) -> None:
    """candle-ingest lost holding three ticks on their last delivery: the server's
    advisories make them its dead letters, one of a tick already gone from TICKS (no
    subject, no payload: nothing to send back). The batch requeue sends the other two."""
    ns = ("--namespace", namespace)
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    await streams.ensure(js, [], [streams.exhausted_deliveries(namespace=namespace)])
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    dlq = streams.stream_name(streams.DLQ, namespace=namespace)
    subject = subjects.ticks("feed-a", "EURUSD", namespace=namespace)
    payloads = [
        msgspec.json.encode(
            {"type": "tick", "v": 1, "feed": "feed-a", "symbol": "EURUSD", "time_ms": n,
             "bid": 1.1, "ask": 1.2}
        )
        for n in (1, 2, 3)
    ]  # fmt: skip
    for n, payload in enumerate(payloads, 1):
        await js.publish(subject, payload, headers={"Nats-Msg-Id": f"tick-{n}"})
    await js.delete_msg(ticks, 2)  # as past the stream's age limit
    for seq in (1, 2, 3):
        body = {
            "type": "io.nats.jetstream.advisory.v1.max_deliver",
            "id": f"adv-{seq}",
            "timestamp": "2026-01-01T00:00:00Z",
            "stream": ticks,
            "consumer": CI,
            "stream_seq": seq,
            "deliveries": 10,
        }
        await js.publish(subjects.max_deliveries(ticks, CI), msgspec.json.encode(body))
    metrics = WorkerMetrics("signal-publisher")
    exhausted = delivery.Exhausted(
        nc, js, Publisher(nc, metrics, 10.0), metrics, namespace, expires_s=1.0
    )
    await exhausted.start()
    try:

        async def three() -> bool:
            return (await js.stream_info(dlq)).state.messages == 3

        await eventually(three, what="three dead letters")
    finally:
        await exhausted.stop()
    found = await letters(js, namespace)
    gone = next(s for s, d in found.items() if d.stream_seq == 2)
    assert found[gone].subject == ""

    proc = await run(stack, "dlq", "requeue", "--worker", CI, "--reason", "max_deliveries", *ns)
    assert proc.returncode == 0, proc.stderr
    assert f"requeued 2 dead letters of {CI} (max_deliveries)" in proc.stdout
    assert str(gone) in proc.stdout  # said to be left, and why
    assert set(await letters(js, namespace)) == {gone}
    requeued = [(await js.get_msg(ticks, seq)) for seq in (4, 5)]
    assert [m.data for m in requeued] == [payloads[0], payloads[2]]
    assert [m.headers["Tickwire-Original-Msg-Id"] for m in requeued if m.headers] == [
        "tick-1",
        "tick-3",
    ]
    assert (await js.stream_info(ticks)).state.last_seq == 5

    # alone, and with a fixed payload: one line, exit 2, nothing changed
    fixed = tmp_path / "fixed.json"
    fixed.write_bytes(payloads[1])
    for extra in ((), ("--payload-file", str(fixed))):
        proc = await run(stack, "dlq", "requeue", str(gone), *extra, *ns)
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [
            f"tickwire: dlq: dead letter {gone} has no message to requeue: seq 2 was no longer"
            f" in {ticks} when it was dead-lettered (purge it)"
        ]
    assert set(await letters(js, namespace)) == {gone}
    assert (await js.stream_info(ticks)).state.last_seq == 5
    assert (await js.stream_info(dlq)).state.messages == 1


class NatsWithoutJetStream(NatsServer):
    """A NATS server whose JetStream does not answer, as a cluster that lost its quorum."""

    def _prepare(self) -> None:
        self.config_path.write_text("server_name: no-jetstream\n")

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False


async def test_status_without_jetstream_says_so_and_still_shows_the_workers(
    stack: StackUrls, tmp_path: Path
) -> None:
    server = NatsWithoutJetStream(tmp_path / "nats")
    await asyncio.to_thread(server.start)
    health = f"127.0.0.1:{free_port()}"
    env = {"TICKWIRE_NATS_URL": server.url, "TICKWIRE_HEALTH": f"{FB}={health}"}
    try:
        proc = await run(stack, "status", env=env)
    finally:
        await asyncio.to_thread(server.stop)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == ""
    for title in ("streams", "consumers", "active models"):
        said = proc.stdout.split(f"== {title} ==\n", 1)[1].split("\n", 1)[0]
        assert said.startswith(f"(JetStream at {server.url} did not answer: "), said
    assert table_rows(proc.stdout, "workers")[0][:3] == [FB, health, "down"]


async def test_a_bad_namespace_setting_is_one_line_and_exit_2(stack: StackUrls) -> None:
    for command in (("status",), ("dlq", "list")):
        proc = await run(stack, *command, env={"TICKWIRE_NAMESPACE": "bad.name"})
        assert proc.returncode == 2, (command, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (command, proc.stderr)
        assert lines[0].startswith("tickwire: bad setting TICKWIRE_NAMESPACE: "), lines


class NatsWithPassword(NatsServer):
    """A NATS server that lets in the user ops with the password right, no one else."""

    def _prepare(self) -> None:
        super()._prepare()
        with self.config_path.open("a") as conf:
            conf.write("authorization { user: ops, password: right }\n")


async def test_a_wrong_password_is_said_not_taken_for_nats_down(
    stack: StackUrls, tmp_path: Path
) -> None:
    server = NatsWithPassword(tmp_path / "nats")
    await asyncio.to_thread(server.start)
    env = {
        "TICKWIRE_NATS_URL": server.url,
        "TICKWIRE_NATS_USER": "ops",
        "TICKWIRE_NATS_PASSWORD": "wrong",
        "TICKWIRE_HEALTH": "",
    }
    try:
        dlq = await run(stack, "dlq", "list", env=env)
        status = await run(stack, "status", env=env)
    finally:
        await asyncio.to_thread(server.stop)
    assert dlq.returncode == 2
    [line] = dlq.stderr.strip().splitlines()
    assert line.startswith(f"tickwire: dlq: NATS at {server.url} did not answer: "), line
    assert "Authorization Violation" in line
    assert status.returncode == 1
    said = status.stdout.split("== streams ==\n", 1)[1].split("\n", 1)[0]
    assert "Authorization Violation" in said
    assert "wrong" not in dlq.stderr + status.stdout


async def test_purging_a_worker_deletes_its_dead_letters_and_nothing_else(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """A message on dlq.<worker> that this tickwire cannot read as a dead letter (another
    schema version, someone else's) is never listed or counted, so it is not purged."""
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    dlq = subjects.dlq(CI, namespace=namespace)

    def letter(n: int) -> bytes:
        return msgspec.json.encode(
            DeadLetter(
                worker=CI,
                reason="malformed_json",
                detail="",
                subject=subjects.ticks("feed-a", "EURUSD", namespace=namespace),
                payload=b"{",
                failed_at_ms=n,
            )
        )

    newer = msgspec.json.encode({"type": "dead_letter", "v": 2, "worker": CI})
    for payload in (letter(1), newer, b"junk", letter(2)):
        await js.publish(dlq, payload)
    proc = await run(stack, "dlq", "purge", "--worker", CI, "--yes", "--namespace", namespace)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"purged 2 dead letters of {CI}"
    name = streams.stream_name(streams.DLQ, namespace=namespace)
    assert [(await js.get_msg(name, seq)).data for seq in (2, 3)] == [newer, b"junk"]
    assert (await js.stream_info(name)).state.messages == 2


async def test_a_subscribers_dead_letters_are_listed_and_purged_by_its_name(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """Signals two subscribers never acked (as signal-publisher writes them: the
    subscriber's name as the worker, on dlq.subscribers) and a worker's dead letter."""
    ns = ("--namespace", namespace)
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    signal = subjects.signals("feed-a", "EURUSD", Timeframe.M1, namespace=namespace)
    for worker, on, n in (("alice", "subscribers", 1), ("bob", "subscribers", 2),
                          ("alice", "subscribers", 3), (CI, CI, 4)):  # fmt: skip
        letter = DeadLetter(
            worker=worker,
            reason="max_deliveries",
            detail="",
            subject=signal,
            payload=b"{}",
            failed_at_ms=n,
        )
        await js.publish(subjects.dlq(on, namespace=namespace), msgspec.json.encode(letter))

    listed = table_rows(await run_ok(stack, "dlq", "list", *ns))
    assert [row[:3] for row in listed] == [
        [CI, "max_deliveries", "1"],
        ["subscribers/alice", "max_deliveries", "2"],
        ["subscribers/bob", "max_deliveries", "1"],
    ]
    # what the list says is what --worker takes
    alice = table_rows(await run_ok(stack, "dlq", "list", "--worker", "subscribers/alice", *ns))
    assert [row[:3] for row in alice] == [["subscribers/alice", "max_deliveries", "2"]]
    every = table_rows(await run_ok(stack, "dlq", "list", "--worker", "subscribers", *ns))
    assert [row[0] for row in every] == ["subscribers/alice", "subscribers/bob"]
    purged = await run_ok(stack, "dlq", "purge", "--worker", "subscribers/alice", "--yes", *ns)
    assert purged.strip() == "purged 2 dead letters of subscribers/alice"
    assert counts(await letters(js, namespace)) == Counter(
        {("bob", "max_deliveries"): 1, (CI, "max_deliveries"): 1}
    )
    for bad in ("subscribers/", "subscribers/a.b", "alice"):
        proc = await run(stack, "dlq", "list", "--worker", bad, *ns)
        assert proc.returncode == 2, bad
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
