"""Scaling a stateful worker out by feed and symbol (design invariant 3).

``TICKWIRE_PARTITIONS`` instances each own a stable share of the feed+symbol pairs: every
message of one pair goes to the same instance, which consumes on a durable of its own
(``<worker>-<k>of<n>``) and acks the others' messages unread.

Scaling out a running deployment: stop the worker, make the partitions' durables with
``tickwire streams ensure --partitions WORKER=N`` (``scale_out``), start the partitions.
Each new durable starts right after the lowest ack floor of the worker's durables already
on the stream (the single one, or those of an earlier partitioning), so nothing the worker
has handled is handled and published again; a stateful partition rebuilds its state from
the stream up to there without output, as it does after a crash.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Annotated, ClassVar

import msgspec
from nats.js import JetStreamContext
from pydantic import Field, ValidationInfo, field_validator

from contracts.streams import ConsumerSpec, consumer_specs
from workers.runtime.settings import RuntimeSettings


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


async def scale_out(
    js: JetStreamContext, specs: list[ConsumerSpec], worker: str, partitions: int
) -> list[ConsumerSpec]:
    """``partition_specs``, each starting after the worker's durables already there."""
    new = partition_specs(specs, worker, partitions)
    stream, names = new[0].stream, {c.durable for c in new}
    earlier = re.compile(rf"{re.escape(worker)}(-\d+of\d+)?")
    floors = [
        info.ack_floor.stream_seq if info.ack_floor else 0
        for info in await js.consumers_info(stream)
        if info.name not in names and earlier.fullmatch(info.name or "")
    ]
    if not floors:
        return new
    return [msgspec.structs.replace(c, start_seq=min(floors) + 1) for c in new]


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
