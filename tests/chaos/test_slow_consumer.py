"""candle-ingest's commit takes longer than its consumer's ack wait (``make chaos``).

QuestDB of the test's own is frozen with SIGSTOP for 45 s while ticks flow: a hang, not a
refusal, so the worker's ILP/HTTP write blocks until its request timeout, again and again.
The runtime keeps everything it was given alive with in-progress acks: the server must
redeliver nothing, and once QuestDB thaws the candles on CANDLES and in QuestDB equal a
pandas reference, each revision published once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext

from contracts import streams
from contracts.messages import DeadLetter
from infra.stack import QuestDBServer, QuestDBUrls, StackUrls
from tests import market
from tests.chaos.ingest_process import start_ingest
from tests.integration.test_candle_ingest import (
    DAY_START_MS,
    candles_equal_the_reference,
    consumed,
    latest,
    namespace,  # noqa: F401 - the fixture
    publish,
    questdb_rows,
    stream_messages,
)
from tests.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

STALL_S = 45.0


@pytest.fixture
async def own_questdb(tmp_path: Path) -> AsyncIterator[QuestDBServer]:
    """A QuestDB to freeze: the session's shared one is never stopped."""
    server = QuestDBServer(tmp_path)
    await asyncio.to_thread(server.start)
    yield server
    if server.pid is not None:
        os.kill(server.pid, signal.SIGCONT)  # a failed test may leave it frozen
    await asyncio.to_thread(server.stop)


async def test_a_commit_slower_than_the_ack_wait_redelivers_nothing(
    stack: StackUrls,
    own_questdb: QuestDBServer,
    js: JetStreamContext,
    namespace: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    server = own_questdb
    assert server.pid is not None
    qdb = QuestDBUrls(server.http_url, server.ilp_conf, server.pg_dsn)
    sc = market.scenario(seed=43, ticks=12_000, troubles=True)
    first, second = sc.halves()
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)

    assert stack.nats_url is not None
    ingest = start_ingest(
        stack.nats_url,
        qdb,
        namespace,
        tmp_path / "candle-ingest.log",
        day_start_minutes=str(DAY_START_MS // 60_000),
    )
    try:
        await eventually(ingest.ready, timeout=60, what="candle-ingest up")
        await publish(js, first, namespace, close=False)
        await eventually(
            lambda: ingest.alive_and(consumed(js, ticks, "candle-ingest")),
            timeout=120,
            what="the first half",
        )
        before = await js.consumer_info(ticks, "candle-ingest")
        ack_wait = float(before.config.ack_wait or 0)
        assert STALL_S > ack_wait > 0
        keepalives_before = await ingest.metric("tickwire_keepalives_total")

        os.kill(server.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        await publish(js, second, namespace)  # the rest, and the watermarks that close all
        last_seq = (await js.stream_info(ticks)).state.last_seq
        seen = {"held": 0, "redelivered": 0}

        async def stalled_long_enough() -> bool:
            info = await js.consumer_info(ticks, "candle-ingest")
            seen["held"] = max(seen["held"], info.num_ack_pending + info.num_pending)
            seen["redelivered"] = max(seen["redelivered"], info.num_redelivered)
            assert info.ack_floor.stream_seq < last_seq, "acked what QuestDB never stored"
            assert ingest.alive(), ingest.log.read_text()[-3000:]
            return time.monotonic() - frozen_at >= STALL_S

        await eventually(stalled_long_enough, timeout=STALL_S + 30, interval=0.5, what="stall")
        os.kill(server.pid, signal.SIGCONT)
        stall_s = time.monotonic() - frozen_at
        thawed_at = time.monotonic()
        await eventually(
            lambda: ingest.alive_and(consumed(js, ticks, "candle-ingest")),
            timeout=300,
            what="the catch-up",
        )
        recovery_s = time.monotonic() - thawed_at
        after = await js.consumer_info(ticks, "candle-ingest")
        keepalives = await ingest.metric("tickwire_keepalives_total") - keepalives_before
        retries = await ingest.metric("tickwire_transient_retries_total")
        assert ingest.stop() == 0, ingest.log.read_text()[-3000:]
    finally:
        ingest.stop()

    want, published = await candles_equal_the_reference(js, namespace, sc)  # none doubled
    got = latest(published)
    rows = await questdb_rows(qdb, namespace, wal_wait_s=120)
    stored = {(r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): r for r in rows}
    missing = [k for k, c in got.items() if (*k[:3], c["first_tick_ms"]) not in stored]
    for key, c in got.items():
        row = stored[key[0], key[1], key[2], c["first_tick_ms"]]
        assert (row["close"], row["tick_volume"], row["revision"]) == (
            c["close"], c["tick_volume"], c["revision"],
        )  # fmt: skip
    letters = await stream_messages(js, streams.stream_name(streams.DLQ, namespace=namespace))
    dead = Counter(msgspec.json.decode(m, type=DeadLetter).reason for m in letters)

    print(
        f"\nQuestDB frozen (SIGSTOP) {stall_s:.0f} s under candle-ingest, ack wait "
        f"{ack_wait:.0f} s: up to {seen['held']} ticks in flight, num_redelivered "
        f"{before.num_redelivered} before, at most {seen['redelivered']} during, "
        f"{after.num_redelivered} after; {keepalives:.0f} keepalive rounds (+WPI), "
        f"{retries:.0f} retries of a held commit; caught up {recovery_s:.1f} s after the "
        f"thaw; candles {len(want)} expected, {len(got)} on CANDLES, {len(rows)} in "
        f"QuestDB, {len(missing)} missing, 0 doubled; dead letters {dict(dead)}"
    )
    assert after.num_redelivered == before.num_redelivered == 0, "a redelivery storm"
    assert seen["redelivered"] == 0
    assert keepalives > 0
    assert len(rows) == len(want)
    assert missing == []
    assert dead == sc.dead
