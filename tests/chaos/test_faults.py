"""Faults of the servers under a running worker (``make chaos``), each printing its figures.

QuestDB down for 30 s mid-stream: candle-ingest must hold the acks of what it could not
store, never ack past it, and catch up once QuestDB is back, with the candles in QuestDB and
on CANDLES equal to a pandas reference: none lost, none doubled.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.js import JetStreamContext

from contracts import streams
from infra.stack import LocalStack, QuestDBUrls, StackUrls
from tests import market
from tests.integration.test_candle_ingest import (
    candles_equal_the_reference,
    consumed,
    latest,
    namespace,  # noqa: F401 - the fixture
    publish,
    questdb_rows,
    run_worker,
    settings,
)
from tests.waiting import eventually
from workers.candle_ingest.app import build

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

OUTAGE_S = 30.0


async def test_questdb_down_for_30_s_holds_the_acks_and_loses_nothing(
    local_stack: LocalStack,
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,  # noqa: F811
) -> None:
    server = local_stack.questdb
    assert server is not None
    sc = market.scenario(seed=31, ticks=12_000, troubles=True)
    first, second = sc.halves()
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)

    worker = build(settings(stack, questdb, namespace))
    task = await run_worker(worker)
    try:
        await publish(js, first, namespace, close=False)
        await eventually(lambda: consumed(js, ticks, "candle-ingest"), timeout=120, what="half")
        floor_before = (await js.consumer_info(ticks, "candle-ingest")).ack_floor.stream_seq

        server.stop()
        down_at = time.monotonic()
        await publish(js, second, namespace)  # the rest, and the watermarks that close all
        last_seq = (await js.stream_info(ticks)).state.last_seq
        seen = {"held": 0, "redelivered": 0, "floor": floor_before}

        async def outage_over() -> bool:
            """Watches the worker through the outage; true once it has lasted OUTAGE_S."""
            info = await js.consumer_info(ticks, "candle-ingest")
            seen["held"] = max(seen["held"], info.num_ack_pending)
            seen["redelivered"] = max(seen["redelivered"], info.num_redelivered)
            seen["floor"] = max(seen["floor"], info.ack_floor.stream_seq)
            assert info.ack_floor.stream_seq < last_seq, "acked what QuestDB never stored"
            assert task.done() is False, "the worker gave up"
            return time.monotonic() - down_at >= OUTAGE_S

        await eventually(outage_over, timeout=OUTAGE_S + 30, interval=0.5, what="the outage")
        held, redelivered, floor = seen["held"], seen["redelivered"], seen["floor"]
        server.start()
        up_at = time.monotonic()
        await eventually(
            lambda: consumed(js, ticks, "candle-ingest"), timeout=300, what="the catch-up"
        )
        recovery_s = time.monotonic() - up_at
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    want, published = await candles_equal_the_reference(js, namespace, sc)

    rows = await questdb_rows(questdb, namespace, wal_wait_s=120)
    stored = {(r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): r for r in rows}
    assert len(rows) == len(want)
    for key, c in latest(published).items():
        row = stored[key[0], key[1], key[2], c["first_tick_ms"]]
        assert (row["close"], row["tick_volume"], row["revision"]) == (
            c["close"],
            c["tick_volume"],
            c["revision"],
        )
    print(
        f"\nQuestDB down {OUTAGE_S:.0f} s: ack floor {floor_before} when it went down, at most "
        f"{floor} of {last_seq} during the outage, up to {held} messages "
        f"held unacked, {redelivered} redelivered; caught up {recovery_s:.1f} s after "
        f"QuestDB came back; candles {len(want)} in QuestDB and on CANDLES, 0 missing, "
        f"0 doubled"
    )
