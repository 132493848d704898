"""Reading a worker's input stream again from its start, to rebuild state at start-up.

A stateful worker (feature-builder, signal-publisher) rebuilds its state from the stream it
consumes: every message up to the last one its durable consumer was given. It reads them
through a short-lived consumer of its own, named after its durable, so that its NATS user
may read that consumer and no other; a crashed process may have left one behind (it expires
after 60 s idle), which is deleted first.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, TypeVar

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from tqdm import tqdm

from contracts.codec import Codec, ContractError
from workers.runtime.errors import TransientError
from workers.runtime.partition import PartitionedSettings
from workers.runtime.pull import AckInfo, PullSource, parse_reply
from workers.runtime.worker import Context, Delivery

BATCH = 1000
WARM_UP_SUFFIX: Final = "-warmup"
"""The warm-up consumer is the worker's durable with this suffix."""

T = TypeVar("T")


async def read_stream(
    ctx: Context,
    stream: str,
    *,
    consumer: str,
    filter_subjects: Sequence[str],
    last: int,
    desc: str,
) -> AsyncIterator[list[tuple[AckInfo, Msg]]]:
    """Batches of ``(ack info, message)`` from the stream's first message up to ``last``
    (fewer if the rest is gone from the stream), with a progress bar. A stall while messages
    are still pending raises ``TransientError``."""
    js = ctx.js
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, consumer)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            name=consumer,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            filter_subjects=list(filter_subjects),
            inactive_threshold=60.0,
            mem_storage=True,
        ),
    )
    source = PullSource(ctx.nc, stream, consumer, batch=BATCH)
    await source.start()
    progress = tqdm(total=last, desc=desc, unit="seq", disable=None)
    seq = 0
    try:
        while seq < last:
            msgs = await source.take(BATCH, 5.0)
            if not msgs:
                if (await js.consumer_info(stream, consumer)).num_pending == 0:
                    return  # the rest up to `last` is gone from the stream
                raise TransientError(f"{desc} stalled at seq {seq}")
            batch = []
            for msg in msgs:
                info = parse_reply(msg.reply)
                if info.stream_seq > last:
                    break
                batch.append((info, msg))
            if batch:
                seq = batch[-1][0].stream_seq
                yield batch
            if len(batch) < len(msgs):
                return
            progress.update(seq - progress.n)
    finally:
        progress.close()
        await source.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, consumer)


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
        ctx,
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
