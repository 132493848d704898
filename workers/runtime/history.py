"""Reading a worker's input stream again from its start, to rebuild state at start-up.

A stateful worker (feature-builder, signal-publisher) rebuilds its state from the stream it
consumes: every message up to the last one its durable consumer was given. It reads them
through a short-lived consumer of its own, named after its durable, so that its NATS user
may read that consumer and no other; a crashed process may have left one behind (it expires
after 60 s idle), which is deleted first.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Final, TypeVar

from contracts.codec import Codec, ContractError
from workers.runtime.partition import PartitionedSettings
from workers.runtime.pull import read_stream
from workers.runtime.worker import Context, Delivery

WARM_UP_SUFFIX: Final = "-warmup"
"""The warm-up consumer is the worker's durable with this suffix."""

T = TypeVar("T")


async def warm_up(
    ctx: Context,
    stream: str,
    codec: Codec[T],
    settings: PartitionedSettings,
    *,
    feed_symbol: Callable[[str], str],
    last: int,
    desc: str,
) -> AsyncIterator[tuple[int, Delivery[T] | None]]:
    """``(stream seq, delivery)`` of each message of the worker's own input up to ``last``;
    the delivery is None for a message of another partition or one that does not decode
    (the runtime dead-letters that one when it comes again)."""
    accept = settings.acceptor(feed_symbol)
    batches = read_stream(
        ctx.nc,
        ctx.js,
        stream,
        consumer=settings.durable + WARM_UP_SUFFIX,
        filter_subjects=settings.consumer_spec().filter_subjects,
        last=last,
        desc=desc,
    )
    async for batch in batches:
        for info, msg in batch:
            d: Delivery[T] | None = None
            if accept is None or accept(msg.subject):
                with contextlib.suppress(ContractError):
                    d = Delivery(msg, codec.decode(msg.data), info)
            yield info.stream_seq, d
