"""The fastest bare consumer we can write with nats-py: the baseline the runtime is held to.

One subscription on an inbox, pull requests for 500 messages kept two deep, decode every
message, ack every message. No bookkeeping, no dead letters, no metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg


async def drain(
    nc: Client, stream: str, durable: str, decode: Callable[[bytes], Any], messages: int
) -> float:
    """Seconds to decode and ack ``messages`` messages from ``stream``/``durable``."""
    inbox = nc.new_inbox()
    done = 0
    finished = asyncio.Event()
    subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"

    async def ask() -> None:
        await nc.publish(subject, b'{"batch":500,"expires":5000000000}', reply=inbox)

    async def on_msg(msg: Msg) -> None:
        nonlocal done
        if not msg.reply:  # a status: the request ended, ask again
            await ask()
            return
        decode(msg.data)
        await nc.publish(msg.reply, b"+ACK")
        done += 1
        if done % 500 == 0:
            await ask()
        if done >= messages:
            finished.set()

    sub = await nc.subscribe(inbox, cb=on_msg, pending_msgs_limit=200_000)
    t0 = time.perf_counter()
    await ask()
    await ask()
    await finished.wait()
    await nc.flush()
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    return elapsed
