"""Scaling a stateful worker out by feed and symbol (design invariant 3).

``TICKWIRE_PARTITIONS`` instances each own a stable share of the feed+symbol pairs: every
message of one pair goes to the same instance, which consumes on a durable of its own
(``<worker>-<k>of<n>``) and acks the others' messages unread.

Changing the layout of a running deployment (one instance to n, n to m, n back to one):
stop the worker, make the new layout's durables (``tickwire streams ensure --partitions
WORKER=N``, or the first instance to start, which makes every durable of its layout), start
it. A durable made while the
worker has durables on the stream starts right after the layout that got furthest (the
lowest ack floor of its durables: ``start_of``), so nothing is skipped and nothing that
whole layout handled is handled again (what a faster partition of it handled past that
floor is, with the same message ids); a stateful instance rebuilds its state from the stream up to there
without output, as after a crash. A durable left behind by a layout that moved on is stale
(``behind``): an instance refuses to consume on it (``StaleDurable``) until it is deleted
and made again. An instance does not start while a durable of another layout has pull
requests waiting (an instance of that layout is running, ``consuming``): it waits until that
layout stopped, so two layouts never consume beside each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Annotated, ClassVar, Final

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StreamInfo
from nats.js.errors import NotFoundError
from pydantic import Field, ValidationInfo, field_validator

from contracts.streams import (
    CANDLE_INGEST,
    FEATURE_BUILDER,
    MODEL_SCORER,
    SIGNAL_PUBLISHER,
    ConsumerSpec,
    consumer_specs,
)
from workers.runtime.errors import Misdeployed, TransientError
from workers.runtime.pull import LOOK_AGAIN_S
from workers.runtime.settings import RuntimeSettings

PARTITIONED: Final = (CANDLE_INGEST, FEATURE_BUILDER, MODEL_SCORER, SIGNAL_PUBLISHER)
"""The workers that may run as partitions."""


def partition_of(feed_symbol: str, partitions: int) -> int:
    """Stable partition of ``"<feed>.<symbol token>"`` (crc32, never Python's hash)."""
    return zlib.crc32(feed_symbol.encode()) % partitions


def durable_of(worker: str, partition: int, partitions: int) -> str:
    """The durable consumer of one partition of ``worker``; the worker's name when alone."""
    if partitions == 1:
        return worker
    return f"{worker}-{partition}of{partitions}"


def partition_specs(specs: list[ConsumerSpec], worker: str, partitions: int) -> list[ConsumerSpec]:
    """``worker``'s consumer in ``specs``, once on each partition's durable."""
    base = next(c for c in specs if c.durable == worker)
    return [
        msgspec.structs.replace(base, durable=durable_of(worker, k, partitions))
        for k in range(partitions)
    ]


class StaleDurable(Misdeployed):
    """The worker's durable is behind a durable of another of its layouts: consuming on it
    would handle again what that layout handled."""


def layout_of(durable: str, worker: str) -> int | None:
    """The partition count a durable of ``worker`` belongs to (1: the worker alone); None
    for a consumer that is not one of the worker's durables."""
    if durable == worker:
        return 1
    m = re.fullmatch(rf"{re.escape(worker)}-\d+of(\d+)", durable)
    return int(m.group(1)) if m else None


def progress(floors: Mapping[str, int], worker: str) -> dict[int, int]:
    """How far each layout of ``worker`` among ``floors`` (ack floor of every durable of a
    stream, by name) has handled everything: the lowest ack floor of its durables."""
    out: dict[int, int] = {}
    for name, floor in floors.items():
        n = layout_of(name, worker)
        if n is not None:
            out[n] = min(floor, out.get(n, floor))
    return out


def start_of(durable: str, worker: str, floors: Mapping[str, int]) -> int | None:
    """Where a durable of ``worker`` made now starts: right after the layout that got
    furthest (its lowest ack floor), so that nothing handled is handled again; None (the
    spec's deliver policy) when the worker has no durable on the stream yet."""
    done = progress({n: f for n, f in floors.items() if n != durable}, worker)
    return max(done.values()) + 1 if done else None


def behind(durable: str, floors: Mapping[str, int]) -> list[str]:
    """The durables of each other layout of the same worker that has handled everything past
    the ack floor of ``durable`` (``floors``: every durable of its stream): [] unless it is
    stale, left behind by a layout that moved on."""
    worker = next((w for w in PARTITIONED if layout_of(durable, w) is not None), None)
    if worker is None or durable not in floors:
        return []
    mine, floor = layout_of(durable, worker), floors[durable]
    ahead = {n for n, done in progress(floors, worker).items() if n != mine and done > floor}
    return sorted(name for name in floors if layout_of(name, worker) in ahead)


async def consumers_of(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    """Every consumer of ``stream``, however many pages the server answers in."""
    infos: list[ConsumerInfo] = []
    while page := await js.consumers_info(stream, offset=len(infos) or None):
        infos += page
    return infos


async def every_stream(js: JetStreamContext) -> list[StreamInfo]:
    """Every stream on the server, however many pages (256 each) it answers in."""
    infos: list[StreamInfo] = []
    while page := await js.streams_info(offset=len(infos)):
        infos += page
    return infos


def ack_floors(infos: list[ConsumerInfo]) -> dict[str, int]:
    """The ack floor of each consumer, by name."""
    return {i.name: i.ack_floor.stream_seq if i.ack_floor else 0 for i in infos if i.name}


async def floors_of(js: JetStreamContext, stream: str) -> dict[str, int]:
    """``ack_floors`` of every consumer of ``stream``; none while the stream does not exist."""
    return ack_floors(await _consumers(js, stream))


async def _consumers(js: JetStreamContext, stream: str) -> list[ConsumerInfo]:
    with contextlib.suppress(NotFoundError):
        return await consumers_of(js, stream)
    return []


def consuming(infos: list[ConsumerInfo], worker: str, partitions: int) -> list[str]:
    """The durables of ``worker`` in another layout than ``partitions`` with pull requests
    waiting at the server: an instance of that layout is running."""
    return sorted(
        i.name
        for i in infos
        if i.name and i.num_waiting and layout_of(i.name, worker) not in (None, partitions)
    )


def placed(
    spec: ConsumerSpec, worker: str, floors: Mapping[str, int]
) -> tuple[ConsumerSpec, str | None]:
    """``spec``, a durable of ``worker``, placed among the durables of its stream
    (``floors``): one not made yet with its ``start_seq`` (``start_of``), one that exists
    with why it is stale (``behind``), if it is."""
    if spec.durable not in floors:
        start = start_of(spec.durable, worker, floors)
        return (
            (spec, None)
            if start is None
            else (msgspec.structs.replace(spec, start_seq=start), None)
        )
    ahead = behind(spec.durable, floors)
    if not ahead:
        return spec, None
    return spec, (
        f"{spec.label} is behind {', '.join(ahead)} (acked to {floors[spec.durable]}, they "
        f"to {min(floors[n] for n in ahead)} at least): run {worker} as that layout, or "
        f"delete {spec.durable} and let it be made again after them"
    )


async def own_durables(js: JetStreamContext, settings: PartitionedSettings) -> list[ConsumerSpec]:
    """The durable the worker consumes on, then the other durables of its layout not made
    yet, placed for ``ensure`` at start-up. Made one at a time as their instances start, a
    later one would start after what the earlier ones acked, their siblings' shares acked
    unread among it: every one is made with the first, at the same start. A stale durable
    stops the worker (``StaleDurable``) rather than handle again what another layout did,
    and while another layout runs it waits (``TransientError``: tried again with backoff)."""
    spec = settings.consumer_spec()
    for look in range(2):
        if look:
            await asyncio.sleep(LOOK_AGAIN_S)
        try:
            infos = await _consumers(js, spec.stream)
        except (TimeoutError, nats.errors.Error) as exc:  # a failover, a restarting server...
            raise TransientError(f"listing the durables of {spec.stream}: {exc!r}") from exc
        running = consuming(infos, settings.worker, settings.partitions)
        if running:
            raise TransientError(
                f"{', '.join(running)} of another layout consume on {spec.stream}: stop that"
                f" layout before {settings.worker} runs as {settings.partitions} partition(s)"
            )
    floors = ack_floors(infos)
    spec, stale = placed(spec, settings.worker, floors)
    if stale:
        raise StaleDurable(stale)
    specs = consumer_specs(namespace=settings.namespace)
    siblings = [
        placed(s, settings.worker, floors)[0]
        for s in partition_specs(specs, settings.worker, settings.partitions)
        if s.durable != spec.durable and s.durable not in floors
    ]
    return [spec, *siblings]


class PartitionedSettings(RuntimeSettings):
    """Settings of a worker that may run as several partitions."""

    worker: ClassVar[str]
    """The worker's name: its durable consumer when it runs alone."""

    partitions: Annotated[int, Field(ge=1, le=64)] = 1
    partition: Annotated[int, Field(ge=0)] = 0

    @field_validator("partition")
    @classmethod
    def _below_partitions(cls, value: int, info: ValidationInfo) -> int:
        partitions = info.data.get("partitions", 1)
        if value >= partitions:
            raise ValueError(f"must be below TICKWIRE_PARTITIONS ({partitions})")
        return value

    @property
    def durable(self) -> str:
        return durable_of(self.worker, self.partition, self.partitions)

    def consumer_spec(self) -> ConsumerSpec:
        """The worker's consumer from ``contracts.streams``, on this partition's durable."""
        specs = consumer_specs(namespace=self.namespace)
        return partition_specs(specs, self.worker, self.partitions)[self.partition]

    def acceptor(self, feed_symbol: Callable[[str], str]) -> Callable[[str], bool] | None:
        """``accept(subject)`` for the runtime's ``Worker``: None when running alone."""
        n, k = self.partitions, self.partition
        if n == 1:
            return None
        return lambda subject: partition_of(feed_symbol(subject), n) == k
