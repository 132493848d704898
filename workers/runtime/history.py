"""Reading a worker's input stream again from its start, to rebuild state at start-up.

A stateful worker (feature-builder, signal-publisher) rebuilds its state from the stream it
consumes: every message up to the last one its durable consumer was given (after the stream
sequence a snapshot of its state covers, if it has one). It reads them
through a short-lived consumer of its own, named after its durable, so that its NATS user
may read that consumer and no other; a crashed process may have left one behind (it expires
after 60 s idle), which is deleted first. A message whose applying raises is left out, and
the start made again without it (``workers.runtime.worker``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final, TypeVar

from contracts.codec import Codec, ContractError
from workers.runtime.errors import ReplayFailed
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
    live_from: int,
    desc: str,
    apply: Callable[[Delivery[T], bool], object],
    first: int = 1,
) -> int:
    """``apply(delivery, output)`` each message of the worker's own input from ``first`` up
    to ``last``, in stream order, ``output`` True from ``live_from`` on (not acked yet: its
    effects may not have gone out); the number applied. Left out: messages of another partition, those that
    do not decode (the runtime dead-letters them when they come again) and those the start
    leaves out (``Context.skipped``). One whose applying raises raises ``ReplayFailed``."""
    accept = settings.acceptor(feed_symbol)
    skipped = ctx.skipped
    done = 0
    reading = read_stream(
        ctx.nc,
        ctx.js,
        stream,
        consumer=settings.durable + WARM_UP_SUFFIX,
        filter_subjects=settings.consumer_spec().filter_subjects,
        first=first,
        last=last,
        desc=desc,
    )
    async with contextlib.aclosing(reading) as batches:  # its consumer gone with a failure too
        async for batch in batches:
            for info, msg in batch:
                seq = info.stream_seq
                if (accept is not None and not accept(msg.subject)) or seq in skipped:
                    continue
                try:
                    d = Delivery(msg, codec.decode(msg.data), info)
                except ContractError:
                    continue
                try:
                    apply(d, seq >= live_from)
                except Exception as exc:
                    raise ReplayFailed(msg, info, exc, acked=seq < live_from) from exc
                done += 1
    return done
