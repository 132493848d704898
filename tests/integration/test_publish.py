"""The runtime's JetStream publisher on a real server: every message stored once, a refusal
named at once, and more messages in one call than may await their ack together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StreamConfig
from nats.js.errors import APIError

from workers.runtime.metrics import WorkerMetrics
from workers.runtime.publish import MAX_PENDING, Outgoing, Publisher, PublishError

pytestmark = pytest.mark.integration


@pytest.fixture
async def two_streams(js: JetStreamContext, unique: str) -> AsyncIterator[tuple[str, str]]:
    names = (f"PUBA{unique}", f"PUBB{unique}")
    for name in names:
        await js.add_stream(
            StreamConfig(name=name, subjects=[f"{name.lower()}.>"], duplicate_window=60.0)
        )
    yield names
    for name in names:
        with contextlib.suppress(APIError):
            await js.delete_stream(name)


def _messages(stream: str, n: int, start: int = 0) -> list[Outgoing]:
    return [
        Outgoing(f"{stream.lower()}.s{i % 7}", f"{stream}-{i}".encode(), f"{stream}|{i}")
        for i in range(start, start + n)
    ]


def _out(metrics: WorkerMetrics, stream: str) -> float:
    labels = {"worker": "publish-test", "stream": stream}
    return metrics.registry.get_sample_value("tickwire_messages_out_total", labels) or 0.0


async def _stored(js: JetStreamContext, stream: str) -> list[bytes]:
    sub = await js.subscribe(f"{stream.lower()}.>", ordered_consumer=True)
    total = (await js.stream_info(stream)).state.messages
    try:
        return [(await sub.next_msg(timeout=10)).data for _ in range(total)]
    finally:
        await sub.unsubscribe()


async def test_more_than_may_await_their_ack_at_once_are_all_stored_once(
    nc: Client, js: JetStreamContext, two_streams: tuple[str, str]
) -> None:
    a, b = two_streams
    metrics = WorkerMetrics("publish-test")
    publisher = Publisher(nc, metrics, 10.0)
    big = _messages(a, 2 * MAX_PENDING + 500)
    # two calls at once, one of them larger than the room for unacknowledged publishes
    await asyncio.gather(publisher.publish(big), publisher.publish(_messages(b, 300)))
    # the same ids again: the duplicate window makes them no-ops, and the call still returns
    await publisher.publish(big[:1000] + _messages(a, 10, start=len(big)))

    stored_a, stored_b = await _stored(js, a), await _stored(js, b)
    expected_a = [m.payload for m in big] + [m.payload for m in _messages(a, 10, len(big))]
    assert sorted(stored_a) == sorted(expected_a)
    assert sorted(stored_b) == sorted(m.payload for m in _messages(b, 300))
    # acknowledged publishes are counted per stream, duplicates included
    assert _out(metrics, a) == len(big) + 1010
    assert _out(metrics, b) == 300


async def test_a_refused_publish_fails_at_once_with_the_servers_reason(
    nc: Client, js: JetStreamContext, unique: str
) -> None:
    name = f"PUBFULL{unique}"
    await js.add_stream(
        StreamConfig(
            name=name, subjects=[f"{name.lower()}.>"], max_msgs=5, discard=DiscardPolicy.NEW
        )
    )
    metrics = WorkerMetrics("publish-test")
    try:
        # a timeout far beyond the test's: only the refusal itself can end the call
        publisher = Publisher(nc, metrics, 3600.0)
        with pytest.raises(PublishError) as refused:
            await asyncio.wait_for(publisher.publish(_messages(name, 8)), 60)
        assert "JetStream refused" in str(refused.value)
        assert "maximum messages exceeded" in str(refused.value)
        assert "err_code 10077" in str(refused.value)
        assert (await js.stream_info(name)).state.messages == 5
        failures = metrics.registry.get_sample_value(
            "tickwire_publish_failures_total", {"worker": "publish-test"}
        )
        assert failures == 1

        # no stream takes the subject: said so, not waited out
        with pytest.raises(PublishError, match="no stream stores nostream"):
            await asyncio.wait_for(
                publisher.publish([Outgoing(f"nostream{unique}.x", b"{}", "x")]), 60
            )
    finally:
        await js.delete_stream(name)


async def test_a_message_is_stored_with_its_id_and_its_own_headers(
    nc: Client, js: JetStreamContext, two_streams: tuple[str, str]
) -> None:
    a, _ = two_streams
    publisher = Publisher(nc, WorkerMetrics("publish-test"), 10.0)
    plain = Outgoing(f"{a.lower()}.plain", b"p", "id-plain")
    traced = Outgoing(f"{a.lower()}.traced", b"t", "id-traced", {"X-Trace": "abc-1"})
    await publisher.publish([plain, traced])
    await publisher.publish([traced])  # the id again: not stored twice

    sub = await js.subscribe(f"{a.lower()}.>", ordered_consumer=True)
    try:
        got = [await sub.next_msg(timeout=10) for _ in range(2)]
    finally:
        await sub.unsubscribe()
    assert (await js.stream_info(a)).state.messages == 2
    assert [(m.subject, m.data) for m in got] == [(plain.subject, b"p"), (traced.subject, b"t")]
    assert got[0].headers == {"Nats-Msg-Id": "id-plain"}
    assert got[1].headers == {"Nats-Msg-Id": "id-traced", "X-Trace": "abc-1"}
