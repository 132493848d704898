"""A JetStream pull consumer that is not capped by nats-py's ``fetch()``.

``fetch()`` spends a task and a ``wait_for`` per message and stalls near 20-30 k msg/s. Here
one plain subscription on an inbox receives everything, and pull requests
(``$JS.API.CONSUMER.MSG.NEXT``) for ``batch`` messages are kept outstanding so the server
always has somewhere to send the next message. Acks, naks and in-progress signals are plain
publishes to each message's reply subject.

The server ends a pull request with a status message; ``Nats-Pending-Messages`` on it says
how many of the requested messages it will no longer send, which keeps the count of what is
still outstanding exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from tqdm import tqdm

from workers.runtime import wire
from workers.runtime.errors import TransientError

log = logging.getLogger(__name__)

ACK: Final = b"+ACK"
IN_PROGRESS: Final = b"+WPI"
NAK: Final = b"-NAK"

_STATUS: Final = "Status"
_PENDING_MSGS: Final = "Nats-Pending-Messages"
_NS: Final = 1_000_000_000
REQUEST_BYTES: Final = 8 << 20
"""Most payload bytes one pull request may bring: large messages cannot flood the client."""
BUFFER_BYTES: Final = 32 << 20
"""No new request while this much is received and not yet taken."""
LOOK_AGAIN_S: Final = 0.1
"""A running consumer asks again within a round trip when its pull request ends, so none of
its requests may wait at the server for that moment: whether one does is looked at twice,
this far apart, before an instance is taken for stopped."""


UNANSWERED_EVERY_S: Final = 60.0
"""While pull requests go unanswered, a line this often (they are asked again several times a
second)."""


class Unanswered:
    """The log of pull requests that nobody answers (JetStream away, or the consumer gone):
    a line when it starts, one every ``every_s`` while it lasts, one when it ends."""

    __slots__ = ("_clock", "_every_s", "_said_at", "_subject", "count", "since")

    def __init__(
        self,
        subject: str,
        every_s: float = UNANSWERED_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._subject = subject
        self._every_s = every_s
        self._clock = clock
        self._said_at = 0.0
        self.since: float | None = None
        """When the first of the unanswered requests ended; None while requests are answered."""
        self.count = 0

    def ended(self) -> None:
        """A pull request ended with no responders."""
        now = self._clock()
        self.count += 1
        if self.since is None:
            self.since = self._said_at = now
            log.info("pull request ended: no responders on %s; asking again", self._subject)
        elif now - self._said_at >= self._every_s:
            self._said_at = now
            log.warning(
                "pull requests on %s unanswered for %.0f s (%d of them): JetStream away, or"
                " the consumer gone",
                self._subject,
                now - self.since,
                self.count,
            )

    def lasted(self) -> float:
        """How long requests have gone unanswered; 0 while they are answered."""
        return 0.0 if self.since is None else self._clock() - self.since

    def answered(self) -> None:
        """The server answered a pull request again."""
        if self.since is None:
            return
        log.info(
            "pull requests on %s answered again after %.1f s and %d unanswered",
            self._subject,
            self._clock() - self.since,
            self.count,
        )
        self.since, self.count = None, 0


class _NextRequest(msgspec.Struct, omit_defaults=True):
    batch: int
    expires: int
    max_bytes: int = 0
    idle_heartbeat: int = 0


_encode = msgspec.json.Encoder().encode


class AckInfo(msgspec.Struct, frozen=True):
    """What the reply subject ``$JS.ACK...`` of a delivered message says."""

    stream: str
    consumer: str
    deliveries: int
    stream_seq: int
    consumer_seq: int
    timestamp_ns: int
    pending: int


def parse_reply(reply: str) -> AckInfo:
    """Parse ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``.

    The newer form inserts domain and account hash after ``ACK`` and appends a token.
    """
    t = reply.split(".")
    o = _offset(t, reply)
    return AckInfo(
        stream=t[o],
        consumer=t[o + 1],
        deliveries=int(t[o + 2]),
        stream_seq=int(t[o + 3]),
        consumer_seq=int(t[o + 4]),
        timestamp_ns=int(t[o + 5]),
        pending=int(t[o + 6]),
    )


def stream_seq(reply: str) -> int:
    """``parse_reply(reply).stream_seq`` without building the rest, which a batch of
    thousands would pay for."""
    t = reply.split(".")
    return int(t[_offset(t, reply) + 3])


def ack_numbers(reply: str) -> tuple[int, int, int]:
    """``(deliveries, stream seq, consumer seq)`` of an ack subject, for every message of
    every batch (``parse_reply`` builds the whole ``AckInfo``)."""
    t = reply.split(".")
    o = _offset(t, reply)
    return int(t[o + 2]), int(t[o + 3]), int(t[o + 4])


def deliveries(reply: str) -> int:
    """``parse_reply(reply).deliveries``, for every message of every batch: splits only as
    far as the count."""
    at = _stream_at(reply.count(".") + 1, reply) + 2
    return int(reply.split(".", at + 1)[at])


def on_last_delivery(reply: str, limit: int) -> bool:
    """The message is on its consumer's last delivery (``limit``, the consumer's
    ``max_deliver``; 0 or less: no limit)."""
    return limit > 0 and deliveries(reply) >= limit


def delivery(reply: str) -> tuple[int, int, int]:
    """``(deliveries, stream_seq, timestamp_ns)`` of ``parse_reply(reply)``: what a worker
    asks of every message it is handed (is it on its last delivery, where is it in its
    stream, when was it stored), in one split."""
    at = _stream_at(reply.count(".") + 1, reply) + 2
    t = reply.split(".", at + 4)
    return int(t[at]), int(t[at + 1]), int(t[at + 3])


def position(reply: str) -> tuple[int, int]:
    """``(stream_seq, timestamp_ns)`` of ``parse_reply(reply)``: where the message is in its
    stream and when the stream stored it, in one split only as far as the time."""
    at = _stream_at(reply.count(".") + 1, reply) + 3
    t = reply.split(".", at + 3)
    return int(t[at]), int(t[at + 2])


def _offset(tokens: list[str], reply: str) -> int:
    """Index of the stream name in an ack subject's tokens."""
    return _stream_at(len(tokens), reply)


def _stream_at(tokens: int, reply: str) -> int:
    """Index of the stream name in an ack subject of ``tokens`` tokens."""
    if tokens == 9:
        return 2
    if tokens >= 11:  # with domain and account hash (and a trailing token)
        return 4
    raise ValueError(f"not a JetStream ack subject: {reply!r}")


def nak_payload(delay_s: float) -> bytes:
    return b"-NAK " + _encode({"delay": int(delay_s * _NS)})


class PullSource:
    """Keeps pull requests outstanding and buffers what arrives, with backpressure."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        *,
        batch: int = 1000,
        expires_s: float = 5.0,
        max_buffered: int | None = None,
        last_delivery: int = 0,
    ) -> None:
        """``last_delivery``: the consumer's delivery limit. A message on it is not naked
        when the source stops, but returned by ``stop``: naked, the server would drop it."""
        self._nc = nc
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._batch = batch
        self._expires_s = expires_s
        self._heartbeat_s = max(expires_s / 5, 0.5)
        self._max_buffered = max_buffered or batch * 4
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._buffer: deque[Msg] = deque()
        self._buffered_bytes = 0
        self._ready = asyncio.Event()
        self._outstanding = 0
        self._last_heard = time.monotonic()
        self._closed = False
        self._unanswered = Unanswered(self._subject)
        self._last_delivery = last_delivery
        self._kept: list[Msg] = []
        self._stopping = asyncio.Lock()

    def unanswered_for(self) -> float:
        """How long its pull requests have gone unanswered; 0 while they are answered."""
        return self._unanswered.lasted()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            self._inbox, cb=self._on_msg, pending_msgs_limit=self._max_buffered + self._batch * 2
        )
        await self._request()

    def close(self) -> None:
        """Ask for nothing more; ``stop`` then hands back what was received."""
        self._closed = True

    async def stop(self) -> list[Msg]:
        """Stop asking and hand back everything received but not taken; what is on its last
        delivery is returned instead (the caller dead-letters it).

        First the inbox's interest is withdrawn and a round trip made (the subscription's
        drain): the server drops the pull requests still open on it, and what it sent before
        arrives ahead of the round trip's answer and is naked on arrival. Only then is the
        buffer naked: naked while a request was open, a message would come straight back to
        it, again and again, each time one delivery nearer its limit. Nothing sits unacked
        until its ack wait runs out, save a message the server had on its way while the
        interest went, or anything when the connection is gone: that comes after the ack wait.
        """
        self._closed = True
        async with self._stopping:  # a second caller waits until the requests are gone
            sub, self._sub = self._sub, None
            if sub is not None and not await self._drained(sub):
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            back: list[Msg] = []
            for m in self._buffer:
                (self._kept if self._on_last(m) else back).append(m)
            await wire.send(self._nc, wire.acks([m.reply for m in back], NAK))
            self._buffer.clear()
            self._buffered_bytes = 0
            kept, self._kept = self._kept, []
            return kept

    def _on_last(self, msg: Msg) -> bool:
        return on_last_delivery(msg.reply, self._last_delivery)

    async def _drained(self, sub: Subscription) -> bool:
        """Interest withdrawn at the server and what came before handled; False without a
        connection (the server then holds no requests of ours) or when that fails."""
        if not self._nc.is_connected:
            return False
        drain = sub.drain()  # type: ignore[no-untyped-call]
        try:
            await asyncio.wait_for(drain, self._expires_s + 1.0)
        except Exception as exc:
            log.debug("draining %s failed: %r", self._inbox, exc)
            return False
        return True

    async def _on_msg(self, msg: Msg) -> None:
        self._last_heard = time.monotonic()
        headers = msg.headers
        status = headers.get(_STATUS) if headers is not None and not msg.reply else None
        if self._unanswered.since is not None and status != "503":
            self._unanswered.answered()
        if status is not None:
            assert headers is not None
            if status == "100":  # idle heartbeat: the request is alive
                return
            if status == "503":
                # no responders: the consumer is gone or JetStream is away; nothing of the
                # request is left, and the next `take` asks again after its timeout
                self._outstanding = 0
                self._unanswered.ended()
                return
            unfilled = headers.get(_PENDING_MSGS)
            if unfilled is not None:
                self._outstanding = max(0, self._outstanding - int(unfilled))
            elif status in ("404", "408", "409"):
                # request ended without saying how much was left: assume all of it
                self._outstanding = 0
            if status not in ("404", "408", "409"):
                log.info("pull request ended: %s %s", status, headers.get("Description", ""))
            await self._request()  # keep the server busy while the handler works
            self._ready.set()
            return
        self._outstanding -= 1
        if self._closed:
            if self._on_last(msg):
                self._kept.append(msg)
            else:
                await self._nc.publish(msg.reply, NAK)
            return
        self._buffer.append(msg)
        self._buffered_bytes += len(msg.data)
        if self._outstanding <= self._batch // 2:
            await self._request()
        self._ready.set()

    async def _request(self) -> None:
        if self._closed or not self._nc.is_connected:
            return
        room = self._max_buffered - len(self._buffer) - self._outstanding
        if self._outstanding > self._batch // 2 or room < self._batch // 2:
            return
        if self._buffered_bytes > BUFFER_BYTES:
            return
        ask = min(self._batch, room)
        body = _NextRequest(
            batch=ask,
            expires=int(self._expires_s * _NS),
            max_bytes=REQUEST_BYTES,
            idle_heartbeat=int(self._heartbeat_s * _NS),
        )
        self._outstanding += ask
        self._last_heard = time.monotonic()
        await self._nc.publish(self._subject, _encode(body), reply=self._inbox)

    async def keep_alive(self) -> None:
        """Tell the server the messages received and not yet taken are being worked on.

        They were delivered and count against the ack wait like those being handled: while
        the worker is held up (a dependency down, a slow batch) they would otherwise be
        redelivered, all of them, every ack wait.
        """
        await wire.send(self._nc, wire.acks([m.reply for m in self._buffer], IN_PROGRESS))

    async def take(self, max_n: int, timeout_s: float) -> list[Msg]:
        """Up to ``max_n`` messages; waits at most ``timeout_s`` for the first one."""
        if not self._buffer:
            if self._outstanding > 0 and time.monotonic() - self._last_heard > (
                self._heartbeat_s * 3
            ):
                # neither messages nor heartbeats: the server lost our requests
                self._outstanding = 0
            await self._request()
            self._ready.clear()
            if not self._buffer and not self._closed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), timeout_s)
        buf = self._buffer
        n = min(max_n, len(buf))
        out = [buf.popleft() for _ in range(n)]
        self._buffered_bytes -= sum(len(m.data) for m in out)
        await self._request()
        return out


READ_BATCH: Final = 1000


async def read_stream(
    nc: Client,
    js: JetStreamContext,
    stream: str,
    *,
    consumer: str,
    filter_subjects: Sequence[str],
    last: int,
    desc: str,
    first: int = 1,
    progress: bool = True,
    headers_only: bool = False,
) -> AsyncGenerator[list[tuple[AckInfo, Msg]], None]:
    """Batches of ``(ack info, message)`` of the stream from seq ``first`` up to ``last``
    (fewer if the rest is gone from the stream), read through a short-lived consumer without
    acks named ``consumer`` (one a crashed process left behind is deleted first). A progress
    bar unless ``progress`` is False; a stall while messages are still pending raises
    ``TransientError``. ``headers_only``: the messages come without their payloads."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(stream, consumer)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            name=consumer,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if first > 1 else DeliverPolicy.ALL,
            opt_start_seq=first if first > 1 else None,
            filter_subjects=list(filter_subjects),
            inactive_threshold=60.0,
            mem_storage=True,
            headers_only=headers_only or None,
        ),
    )
    source = PullSource(nc, stream, consumer, batch=max(1, min(READ_BATCH, last - first + 1)))
    await source.start()
    bar = tqdm(total=last, initial=first - 1, desc=desc, unit="seq", disable=not progress or None)
    seq = first - 1
    try:
        while seq < last:
            msgs = await source.take(READ_BATCH, 5.0)
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
            bar.update(seq - bar.n)
    finally:
        bar.close()
        # asking for nothing more, then deleted: the server ends the pull request still
        # open at once, and no new one goes to a consumer that is gone
        source.close()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, consumer)
        await source.stop()
