"""Scaling a stateful worker out by feed and symbol (design invariant 3).

``TICKWIRE_PARTITIONS`` instances each own a stable share of the feed+symbol pairs: every
message of one pair goes to the same instance, which consumes on a durable of its own
(``<worker>-<k>of<n>``) and acks the others' messages unread.

Changing the layout of a running deployment (one instance to n, n to m, n back to one):
stop the worker, make the new layout's durables (``tickwire streams ensure --partitions
WORKER=N``, or the instances themselves at start-up), start it. A durable made while
durables of another layout are on the stream starts right after the lowest of their ack
floors (``placed``), so nothing handled before is handled and published again; a stateful
instance rebuilds its state from the stream up to there without output, as after a crash.
A durable left behind by a layout that moved on is stale: an instance refuses to consume
on it (``StaleDurable``) until it is deleted and made again.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Callable, Mapping
from typing import Annotated, ClassVar, Final

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
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
from workers.runtime.errors import TransientError
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


class StaleDurable(Exception):
    """The worker's durable is behind a durable of another of its layouts: consuming on it
    would handle again what that layout handled."""


def layout_of(durable: str, worker: str) -> int | None:
    """The partition count a durable of ``worker`` belongs to (1: the worker alone); None
    for a consumer that is not one of the worker's durables."""
    if durable == worker:
        return 1
    m = re.fullmatch(rf"{re.escape(worker)}-\d+of(\d+)", durable)
    return int(m.group(1)) if m else None


async def placed(
    js: JetStreamContext, spec: ConsumerSpec, worker: str
) -> tuple[ConsumerSpec, str | None]:
    """``spec``, a durable of ``worker``, placed after the worker's durables of its other
    layouts on the stream (the single one, or those of other partition counts).

    A durable not made yet starts right after the lowest of their ack floors, so nothing
    they handled is handled and published again (``start_seq``; none there: ``spec`` as it
    is). One that exists and is behind one of them comes with why it is stale.
    """
    mine = layout_of(spec.durable, worker)
    infos: list[ConsumerInfo] = []
    with contextlib.suppress(NotFoundError):  # no stream yet: no durables either
        while page := await js.consumers_info(spec.stream, offset=len(infos) or None):
            infos += page
    floors = {i.name: i.ack_floor.stream_seq if i.ack_floor else 0 for i in infos if i.name}
    if spec.durable not in floors:
        others = [f for n, f in floors.items() if layout_of(n, worker) not in (None, mine)]
        if not others:
            return spec, None
        return msgspec.structs.replace(spec, start_seq=min(others) + 1), None
    ahead = behind(spec.durable, floors)
    if not ahead:
        return spec, None
    return spec, (
        f"{spec.label} is behind {', '.join(ahead)} (acked to {floors[spec.durable]}, they to "
        f"{max(floors[n] for n in ahead)}): run {worker} as that layout, or delete "
        f"{spec.durable} and let it be made again after them"
    )


def behind(durable: str, floors: Mapping[str, int]) -> list[str]:
    """The durables of another layout of the same worker whose ack floor is past that of
    ``durable``, among ``floors`` (every durable of a stream by name): [] unless it is stale.
    """
    worker = next((w for w in PARTITIONED if layout_of(durable, w) is not None), None)
    if worker is None or durable not in floors:
        return []
    mine, floor = layout_of(durable, worker), floors[durable]
    return sorted(
        n for n, f in floors.items() if layout_of(n, worker) not in (None, mine) and f > floor
    )


async def own_durable(js: JetStreamContext, settings: PartitionedSettings) -> ConsumerSpec:
    """The durable the worker consumes on, placed for ``ensure`` at start-up; a stale one
    stops the worker (``StaleDurable``) rather than handle again what another layout did."""
    spec = settings.consumer_spec()
    try:
        spec, stale = await placed(js, spec, settings.worker)
    except (TimeoutError, nats.errors.Error) as exc:  # a failover, a restarting server...
        raise TransientError(f"listing the durables of {spec.stream}: {exc!r}") from exc
    if stale:
        raise StaleDurable(stale)
    return spec


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
