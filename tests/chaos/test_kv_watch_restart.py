"""Run-time changes through KV watches survive a restart of the one NATS server (``make chaos``).

A NATS server of the test's own, restarted (stopped cleanly, started on the same store and
port) as ops do for an upgrade, while the workers run as processes:

- model-scorer follows the registry's active pointers with a watch: a promotion made after
  a restart, and a rollback after a second one, take effect for the next vectors, and
  every vector is scored once, by the booster the score names.
- signal-publisher follows its policy's KV entry with a watch: a policy put after a
  restart, and its deletion after a second one, take effect for the next scores, and
  every signal is published once.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import lightgbm
import nats
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from contracts import streams, subjects
from contracts.messages import Timeframe
from infra.stack import NatsServer, StackUrls
from tests.integration import test_model_scorer as scorer_tests
from tests.integration import test_signal_publisher as publisher_tests
from tests.processes import free_port, healthy, running, spawn, tail, worker_env
from tests.scorer_models import card_for, train, vectors
from tests.waiting import eventually
from workers.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SWITCH_S = 30.0
"""How long a change made after a restart may take to reach the worker."""
BULK = 2000
"""Vectors published just before a restart: the scorer is still at them when it comes."""
FEED = scorer_tests.FEED
EURUSD = ("EURUSD", Timeframe.M5)
EURUSD_KEY = f"active.{FEED}.{subjects.escape(EURUSD[0])}.{EURUSD[1].value}"


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_nc(own_nats: NatsServer) -> AsyncIterator[Client]:
    nc = await nats.connect(own_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield nc
    await nc.close()


def env_on(server: NatsServer, namespace: str, port: int, **settings: str) -> dict[str, str]:
    urls = StackUrls(server.url, server.monitor_url, None, None, None, None)
    return {**worker_env(urls, namespace, **settings), "TICKWIRE_METRICS_PORT": str(port)}


def samples(port: int, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one metric of a worker process, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def active_version(port: int) -> str | None:
    for labels, value in samples(port, "tickwire_scorer_active_model"):
        if labels["key"] == EURUSD_KEY and value == 1:
            return labels["version"]
    return None


def policy_updates(port: int, outcome: str) -> float:
    got = samples(port, "tickwire_signal_policy_updates_total")
    return sum(v for labels, v in got if labels["outcome"] == outcome)


@contextlib.asynccontextmanager
async def started(
    worker: str, env: dict[str, str], log: Path, port: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``worker`` as a process whose metrics answer on ``port``, until the block ends; then
    SIGTERM and a clean exit."""
    proc = spawn(worker, env, log)

    async def up() -> bool:
        return running(proc, log) and await asyncio.to_thread(healthy, port)

    await eventually(up, timeout=300, what=f"{worker} started")
    try:
        yield proc
    finally:
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, f"{worker} exited with {code}: {tail(log)}"


async def restarted(server: NatsServer, nc: Client) -> None:
    """The server stopped cleanly and started again; the test's own client back on it."""
    await asyncio.to_thread(server.restart)
    await eventually(lambda: nc.is_connected, what="the test's client reconnected")


async def test_a_promotion_and_a_rollback_after_server_restarts_reach_model_scorer(
    own_nats: NatsServer, own_nc: Client, unique: str, tmp_path: Path
) -> None:
    js, ns = own_nc.jetstream(), unique
    registry = await Registry.open(js, namespace=ns)
    boosters: dict[str, lightgbm.Booster] = {}
    for booster in (train(1), train(2)):
        card = card_for(booster, FEED, *EURUSD)
        boosters[await registry.put(booster.model_to_string().encode(), card)] = booster
    a, b = list(boosters)
    assert (await registry.promote(a))[0]

    # per phase: vectors that are being scored when the server restarts (by the version
    # active before it), then, once the change made after the restart is in force, more
    sent = vectors(FEED, *EURUSD, 3 * (BULK + 40), seed=11)
    parts = [sent[i : i + BULK + 40] for i in range(0, len(sent), BULK + 40)]
    changes = [(a, a), (a, b), (b, a)]  # (active before the restart, after the change)
    version_of: dict[tuple[str, int], str] = {}
    port = free_port()
    log = tmp_path / "model-scorer.log"
    env = env_on(own_nats, ns, port, handler_batch="20", fetch_batch="20")
    stream = streams.stream_name(streams.FEATURES, namespace=ns)
    mid_stream = []
    async with started("model-scorer", env, log, port):
        await eventually(lambda: active_version(port) == a, what=f"{a} active")
        for n, ((before, after), part) in enumerate(zip(changes, parts, strict=True)):
            bulk, rest = part[:BULK], part[BULK:]
            if n:
                published = (await js.stream_info(stream)).state.last_seq
                await scorer_tests.publish(js, ns, list(bulk))
                version_of |= {(v.symbol, v.open_time_ms): before for v in bulk}
                await eventually(
                    lambda p=published: scorer_tests.delivered_at_least(js, ns, p + BULK // 10),
                    timeout=60,
                    what="the scorer into the bulk",
                )
                info = await js.consumer_info(stream, scorer_tests.DURABLE)
                mid_stream.append(info.num_pending + info.num_ack_pending)
                await restarted(own_nats, own_nc)
                await eventually(
                    lambda: scorer_tests.consumed(js, ns), timeout=120, what="the bulk consumed"
                )
                if n == 1:
                    assert (await registry.promote(b, force=True))[0]
                if n == 2:
                    assert (await registry.rollback(FEED, *EURUSD)).version == a
            else:
                rest = part
            await eventually(
                lambda version=after: active_version(port) == version,
                timeout=SWITCH_S,
                what=f"{after} active in model-scorer after the server's restart",
            )
            await scorer_tests.publish(js, ns, list(rest))
            version_of |= {(v.symbol, v.open_time_ms): after for v in rest}
            await eventually(
                lambda: scorer_tests.consumed(js, ns), timeout=120, what="the vectors consumed"
            )
    assert any(mid_stream), "every restart came after the bulk was scored"
    got = await scorer_tests.scores_of(js, ns)
    assert scorer_tests.check_scores(got, sent[: len(version_of)], boosters, version_of) == []
    assert len(got) == len(version_of)


async def test_a_policy_put_and_deleted_after_server_restarts_reaches_signal_publisher(
    own_nats: NatsServer, own_nc: Client, unique: str, tmp_path: Path
) -> None:
    """0.5 enters nothing by the default policy (0.6); the KV entry put after a restart
    lowers the entry to 0.4, so the next 0.5 is a BUY; its deletion after a second restart
    brings the default exit (0.2) back, so 0.15 is a FLAT."""
    js, ns = own_nc.jetstream(), unique
    score = publisher_tests.make_score
    port = free_port()
    log = tmp_path / "signal-publisher.log"
    await publisher_tests.publish(js, [score("EURUSD", 0, 0.5)], ns)
    async with started("signal-publisher", env_on(own_nats, ns, port), log, port):
        await eventually(lambda: publisher_tests.consumed(js, ns), what="the first score")

        await restarted(own_nats, own_nc)
        kv = await js.key_value(f"ns-{ns}-signal-policy")
        await kv.put("policy", b'{"defaults": {"entry_long": 0.4, "exit_long": 0.1}}')
        await eventually(
            lambda: policy_updates(port, "applied") == 1,
            timeout=SWITCH_S,
            what="the policy put after the restart applied",
        )
        await publisher_tests.publish(js, [score("EURUSD", 1, 0.5)], ns)
        await eventually(lambda: publisher_tests.consumed(js, ns), what="a score after the put")
        await publisher_tests.publish(js, [score("EURUSD", 2, 0.15)], ns)  # above its exit
        await eventually(lambda: publisher_tests.consumed(js, ns), what="a held score")

        await restarted(own_nats, own_nc)
        await kv.delete("policy")
        await eventually(
            lambda: policy_updates(port, "deleted") == 1,
            timeout=SWITCH_S,
            what="the deletion after the restart taken",
        )
        await publisher_tests.publish(js, [score("EURUSD", 3, 0.15)], ns)
        await eventually(lambda: publisher_tests.consumed(js, ns), what="a score after it")
    got = await publisher_tests.signals_of(js, ns)
    t0, m1 = publisher_tests.T0, publisher_tests.M1
    assert [(s.open_time_ms, s.side.value) for s in got] == [
        (t0 + 1 * m1, "BUY"),
        (t0 + 3 * m1, "FLAT"),
    ]
