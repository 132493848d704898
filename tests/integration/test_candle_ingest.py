"""candle-ingest on the real NATS and QuestDB: candles equal a pandas reference, in both sinks.

Each test runs in its own namespace (its own TICKS, CANDLES and DLQ streams and its own
QuestDB table) so tests never see each other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import Candle, DeadLetter
from db.questdb import query, wait_for_wal
from infra.stack import QuestDBUrls, StackUrls
from tests import market, reference
from tests.waiting import eventually
from workers.candle_ingest.app import Settings, build

pytestmark = pytest.mark.integration

DAY_START_MS = 22 * 3_600_000  # a UTC+2 broker: its day starts at 22:00 UTC


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(f"ns-{unique}-candle-ingest-state")


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
    js: JetStreamContext, sc: market.Scenario, namespace: str, *, close: bool = True
) -> None:
    """The scenario's messages in order, then a watermark per symbol that closes everything."""
    futures = []
    for feed, symbol, payload, msg_id in sc.messages:
        subject = subjects.ticks(feed, symbol, namespace=namespace)
        futures.append(await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id}))
    if close:
        for feed, symbol in sc.symbols:
            subject = subjects.ticks(feed, symbol, namespace=namespace)
            end = sc.last_ms + 3 * 86_400_000
            futures.append(await js.publish_async(subject, market.watermark(feed, symbol, end)))
    await asyncio.gather(*futures)


async def stream_messages(js: JetStreamContext, stream: str) -> list[bytes]:
    info = await js.stream_info(stream)
    if info.state.messages == 0:
        return []
    return [
        (await js.get_msg(stream, seq)).data
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


def latest(candles: list[Candle]) -> dict[tuple, dict[str, Any]]:
    best: dict[tuple, Candle] = {}
    for c in candles:
        key = (c.feed, c.symbol, c.tf.value, c.open_time_ms)
        if key not in best or c.revision > best[key].revision:
            best[key] = c
    return {k: msgspec.structs.asdict(c) for k, c in best.items()}


async def consumed(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def test_candles_equal_a_pandas_reference_in_stream_and_questdb(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    sc = market.scenario(seed=11, ticks=20_000)
    worker = build(settings(stack, questdb, namespace))
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
    try:
        await publish(js, sc, namespace)
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        await eventually(
            lambda: consumed(js, ticks, "candle-ingest"), timeout=120, what="all ticks"
        )
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)

    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)
    decode = msgspec.json.Decoder(Candle).decode
    published = [
        decode(m)
        for m in await stream_messages(
            js, streams.stream_name(streams.CANDLES, namespace=namespace)
        )
    ]
    keys = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    assert max(keys.values()) == 1, "a candle revision was published twice"
    got = latest(published)
    assert reference.differences(got, want) == []
    assert any(c.revision > 0 for c in published), "late ticks should have revised candles"
    d1 = [k for k in want if k[2] == "D1"]
    assert all(open_ms % 86_400_000 == DAY_START_MS for *_, open_ms in d1)

    # QuestDB holds exactly the latest revision of every candle
    table = f"ns_{namespace}_candles"
    wait_for_wal(questdb.http, table, timeout=60)
    rows = query(questdb.http, "SELECT * FROM {prefix}candles", table_prefix=f"ns_{namespace}_")
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
    letters = [
        msgspec.json.decode(m, type=DeadLetter)
        for m in await stream_messages(js, streams.stream_name(streams.DLQ, namespace=namespace))
    ]
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
