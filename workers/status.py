"""How far behind its stream every consumer is: ``tickwire status`` and the replicator's lag.

Lag of a consumer, from the server's view of it:

- messages: published on the stream and not yet acked by the consumer (not yet delivered
  plus delivered and waiting for an ack);
- seconds: stream time between the stream's last message and the last message the consumer
  has acked everything up to (its ack floor); 0 when it has nothing left.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StreamInfo
from nats.js.errors import NotFoundError


@dataclass(frozen=True, slots=True)
class Lag:
    stream: str
    consumer: str
    not_delivered: int
    ack_pending: int
    ack_floor: int
    last_seq: int
    seconds: float

    @property
    def messages(self) -> int:
        return self.not_delivered + self.ack_pending


async def _time_of(js: JetStreamContext, stream: str, seq: int) -> datetime | None:
    """Stream time of message ``seq``, or of the next one if it is gone."""
    try:
        msg = await js.get_msg(stream, seq, next=True)
    except NotFoundError:
        return None
    return msg.time


async def consumer_lag(
    js: JetStreamContext,
    stream: str,
    consumer: str,
    *,
    info: ConsumerInfo | None = None,
    stream_info: StreamInfo | None = None,
) -> Lag:
    info = info or await js.consumer_info(stream, consumer)
    sinfo = stream_info or await js.stream_info(stream)
    state = sinfo.state
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    not_delivered = info.num_pending or 0
    ack_pending = info.num_ack_pending or 0
    seconds = 0.0
    if not_delivered + ack_pending and state.messages:
        newest, oldest = await asyncio.gather(
            _time_of(js, stream, state.last_seq),
            _time_of(js, stream, max(floor, state.first_seq)),
        )
        if newest is not None and oldest is not None:
            seconds = max(0.0, (newest - oldest).total_seconds())
    return Lag(stream, consumer, not_delivered, ack_pending, floor, state.last_seq, seconds)


async def every_lag(js: JetStreamContext) -> list[Lag]:
    """Every consumer of every stream, by stream and consumer name."""
    out: list[Lag] = []
    for sinfo in sorted(await js.streams_info(), key=lambda s: s.config.name or ""):
        stream = sinfo.config.name or ""
        for info in sorted(await js.consumers_info(stream), key=lambda c: c.name):
            out.append(await consumer_lag(js, stream, info.name, info=info, stream_info=sinfo))
    return out


HEADER = ("stream", "consumer", "last seq", "ack floor", "not delivered", "ack pending",
          "lag msgs", "lag s")  # fmt: skip


def table(lags: list[Lag]) -> str:
    rows = [HEADER] + [
        (
            lag.stream,
            lag.consumer,
            str(lag.last_seq),
            str(lag.ack_floor),
            str(lag.not_delivered),
            str(lag.ack_pending),
            str(lag.messages),
            f"{lag.seconds:.1f}",
        )
        for lag in lags
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]

    def line(r: tuple[str, ...]) -> str:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    lines = [line(r) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not lags:
        lines.append("(no consumers)")
    return "\n".join(lines)


def main(*, timeout_s: float = 10.0) -> int:
    """``tickwire status``: the lag table of every consumer, from ``TICKWIRE_NATS_URL``."""
    import sys

    from workers.runtime.connection import connect
    from workers.runtime.settings import RuntimeSettings, load

    settings = load(RuntimeSettings)

    async def lags() -> list[Lag]:
        nc = await connect(settings, name="tickwire-status")
        try:
            return await every_lag(nc.jetstream())
        finally:
            await nc.close()

    try:
        found = asyncio.run(asyncio.wait_for(lags(), timeout_s))
    except (TimeoutError, OSError) as exc:
        sys.stderr.write(f"tickwire status: NATS at {settings.nats_url} did not answer: {exc!r}\n")
        return 1
    print(table(found))
    return 0
