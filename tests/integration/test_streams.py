"""Streams and consumers applied to a real JetStream server, in a namespace of their own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.codec import encode
from contracts.messages import Tick, Timeframe

pytestmark = pytest.mark.integration

DAY = 86_400.0


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    """A replay namespace for this test; its streams are deleted afterwards."""
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)


def _everything(namespace: str) -> tuple[list[streams.StreamSpec], list[streams.ConsumerSpec]]:
    return streams.stream_specs(namespace=namespace), streams.consumer_specs(namespace=namespace)


async def test_ensure_creates_every_stream_and_consumer_with_the_configured_values(
    js: JetStreamContext, namespace: str
) -> None:
    stream_specs, consumer_specs = _everything(namespace)

    report = await streams.ensure(js, stream_specs, consumer_specs)

    labels = [s.name for s in stream_specs] + [c.label for c in consumer_specs]
    assert list(report.items()) == [(label, "created") for label in labels]
    ticks = (await js.stream_info(f"NS_{namespace}_TICKS")).config
    assert ticks.subjects == [f"ns.{namespace}.ticks.*.*"]
    assert ticks.retention == "limits"
    assert ticks.storage == "file"
    assert ticks.discard == "old"
    assert ticks.max_age == 7 * DAY
    assert ticks.duplicate_window == 600.0
    assert ticks.max_msg_size == 1_048_576
    assert ticks.max_bytes == -1
    assert ticks.num_replicas == 1
    assert ticks.description == "Ticks, tick batches and backfill bars from the EAs"
    for spec in stream_specs:
        info = await js.stream_info(spec.name)
        assert info.config.subjects == list(spec.subjects)
        assert info.config.max_age == spec.max_age
        assert info.config.max_msg_size == spec.max_msg_size
        assert streams.stream_diff(spec, info.config) == []

    ingest = (await js.consumer_info(f"NS_{namespace}_TICKS", "candle-ingest")).config
    assert ingest.durable_name == "candle-ingest"
    assert ingest.filter_subjects == [f"ns.{namespace}.ticks.*.*"]
    assert ingest.ack_policy == "explicit"
    assert ingest.deliver_policy == "all"
    assert ingest.ack_wait == 30.0
    assert ingest.backoff == [30.0, 60.0, 120.0, 300.0, 600.0]
    assert ingest.max_deliver == 10
    assert ingest.max_ack_pending == 10_000
    assert ingest.deliver_subject is None  # a pull consumer
    for cspec in consumer_specs:
        cinfo = await js.consumer_info(cspec.stream, cspec.durable)
        assert cinfo.config.filter_subjects == list(cspec.filter_subjects)
        assert cinfo.config.max_ack_pending == cspec.max_ack_pending
        assert streams.consumer_diff(cspec, cinfo.config) == []


async def test_a_second_ensure_changes_nothing(js: JetStreamContext, namespace: str) -> None:
    stream_specs, consumer_specs = _everything(namespace)
    await streams.ensure(js, stream_specs, consumer_specs)
    before = {s.name: (await js.stream_info(s.name)).config for s in stream_specs}

    report = await streams.ensure(js, stream_specs, consumer_specs)

    labels = [s.name for s in stream_specs] + [c.label for c in consumer_specs]
    assert list(report.items()) == [(label, "unchanged") for label in labels]
    assert {s.name: (await js.stream_info(s.name)).config for s in stream_specs} == before


async def test_concurrent_ensures_from_starting_workers_agree(
    js: JetStreamContext, namespace: str
) -> None:
    stream_specs, consumer_specs = _everything(namespace)

    await asyncio.gather(*(streams.ensure(js, stream_specs, consumer_specs) for _ in range(3)))

    report = await streams.ensure(js, stream_specs, consumer_specs)
    assert set(report.values()) == {"unchanged"}


async def test_a_changed_spec_updates_only_what_changed(
    js: JetStreamContext, namespace: str
) -> None:
    stream_specs, consumer_specs = _everything(namespace)
    await streams.ensure(js, stream_specs, consumer_specs)
    ticks_name = f"NS_{namespace}_TICKS"
    changed_streams = [
        msgspec.structs.replace(s, max_age=3 * DAY) if s.name == ticks_name else s
        for s in stream_specs
    ]
    changed_consumers = [
        msgspec.structs.replace(c, max_ack_pending=500) if c.durable == "model-scorer" else c
        for c in consumer_specs
    ]

    report = await streams.ensure(js, changed_streams, changed_consumers)

    assert [k for k, v in report.items() if v != "unchanged"] == [
        ticks_name,
        f"NS_{namespace}_FEATURES/model-scorer",
    ]
    assert report[ticks_name] == report[f"NS_{namespace}_FEATURES/model-scorer"] == "updated"
    assert (await js.stream_info(ticks_name)).config.max_age == 3 * DAY
    scorer = await js.consumer_info(f"NS_{namespace}_FEATURES", "model-scorer")
    assert scorer.config.max_ack_pending == 500
    again = await streams.ensure(js, changed_streams, changed_consumers)
    assert set(again.values()) == {"unchanged"}


async def test_the_replica_count_of_an_existing_stream_is_left_alone_unless_rescaled(
    js: JetStreamContext, namespace: str
) -> None:
    stream_specs = streams.stream_specs(namespace=namespace)
    await streams.ensure(js, stream_specs)
    r3 = streams.stream_specs(namespace=namespace, replicas=3)

    report = await streams.ensure(js, r3)

    assert set(report.values()) == {"unchanged"}
    assert {(await js.stream_info(s.name)).config.num_replicas for s in r3} == {1}
    # asked to rescale, it does try: a single server refuses R3
    with pytest.raises(APIError, match="replicas"):
        await streams.ensure(js, r3[:1], rescale=True)


async def test_the_same_msg_id_twice_is_stored_once(js: JetStreamContext, namespace: str) -> None:
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    subject = subjects.ticks("icm-live", "US500.cash", namespace=namespace)
    tick = Tick(feed="icm-live", symbol="US500.cash", time_ms=1767225600123, bid=1.5, ask=1.75)
    msg_id = "icm-live|US500.cash|1767225600123"

    first = await js.publish(subject, encode(tick), headers={"Nats-Msg-Id": msg_id})
    again = await js.publish(subject, encode(tick), headers={"Nats-Msg-Id": msg_id})
    other = await js.publish(subject, encode(tick), headers={"Nats-Msg-Id": msg_id + "|2"})

    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert other.seq == first.seq + 1
    state = (await js.stream_info(f"NS_{namespace}_TICKS")).state
    assert state.messages == 2


async def test_a_message_over_the_size_limit_is_refused(
    js: JetStreamContext, namespace: str
) -> None:
    await streams.ensure(js, streams.stream_specs(namespace=namespace))
    subject = subjects.candles("icm-live", "EURUSD", Timeframe.M1, namespace=namespace)
    with pytest.raises(APIError):
        await js.publish(subject, b"x" * (64 * 1024 + 1))
    ack = await js.publish(subject, b"x" * 1024)
    assert ack.seq == 1


async def test_fields_ensure_does_not_manage_are_kept(js: JetStreamContext, namespace: str) -> None:
    spec = streams.stream_specs(namespace=namespace)[0]
    made_by_replay = streams.to_stream_config(spec).evolve(
        max_age=DAY, metadata={"tickwire.replay": "2026-01-01..2026-01-02"}
    )
    await js.add_stream(made_by_replay)

    assert await streams.ensure(js, [spec]) == {spec.name: "updated"}

    config = (await js.stream_info(spec.name)).config
    assert config.max_age == spec.max_age
    assert config.metadata is not None
    assert config.metadata["tickwire.replay"] == "2026-01-01..2026-01-02"
