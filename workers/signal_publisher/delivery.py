"""Delivery of signals to downstream subscribers, each on its own durable consumer.

- ``add``, ``remove``, ``listing``, ``rewind``: the subscribers' consumers on SIGNALS
  (``contracts.streams.signal_subscriber``: explicit ack, ack wait, backoff, delivery limit).
  JetStream cannot change a consumer's deliver policy in place, so ``rewind`` recreates one
  subscriber's consumer to start at a time; the others are untouched.
- ``subscribe``: the reference subscriber. It acts on a signal, then acks it; a signal past
  its ``expires_ms`` is reported as expired and terminated, never acted on.
- ``Exhausted``: the server gives up on a message after the delivery limit and says so in
  an advisory; the message is then dead-lettered to ``dlq.subscribers`` with the subscriber's
  name and delivery count.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts import subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import DeadLetter, Signal
from contracts.streams import (
    SIGNALS,
    ensure,
    signal_subscriber,
    stream_name,
    to_consumer_config,
)
from workers.runtime.errors import TickwireError
from workers.runtime.metrics import WorkerMetrics
from workers.runtime.publish import Outgoing, Publisher

log = logging.getLogger(__name__)

SUBSCRIBER_DESCRIPTION: Final = "Signal subscriber "
DLQ_NAME: Final = "subscribers"
MAX_DELIVERIES: Final = "max_deliveries"
_ADVISORY: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


class SubscriberError(TickwireError):
    """The subscriber cannot be changed as asked."""


def _is_subscriber(info: ConsumerInfo) -> bool:
    return (info.config.description or "").startswith(SUBSCRIBER_DESCRIPTION)


async def check(js: JetStreamContext, name: str, *, namespace: str | None = None) -> ConsumerInfo:
    """The subscriber's consumer; ``SubscriberError`` if there is none of that name."""
    stream = stream_name(SIGNALS, namespace=namespace)
    try:
        info: ConsumerInfo = await js.consumer_info(stream, name)
    except NotFoundError:
        raise SubscriberError(f"no subscriber {name!r} on {stream}") from None
    if not _is_subscriber(info):
        raise SubscriberError(f"{name!r} is a pipeline consumer, not a subscriber")
    return info


async def add(
    js: JetStreamContext, name: str, *, filter_subject: str | None, namespace: str | None = None
) -> ConsumerInfo:
    """Create the subscriber's durable consumer; an existing one is left alone (error)."""
    spec = signal_subscriber(name, filter_subject=filter_subject, namespace=namespace)
    with contextlib.suppress(NotFoundError):
        await js.consumer_info(spec.stream, spec.durable)
        raise SubscriberError(f"subscriber {name!r} exists; remove it first")
    await ensure(js, [], [spec])
    created: ConsumerInfo = await js.consumer_info(spec.stream, spec.durable)
    return created


async def remove(js: JetStreamContext, name: str, *, namespace: str | None = None) -> None:
    info = await check(js, name, namespace=namespace)
    await js.delete_consumer(info.stream_name, name)


async def listing(js: JetStreamContext, *, namespace: str | None = None) -> list[ConsumerInfo]:
    stream = stream_name(SIGNALS, namespace=namespace)
    return sorted(
        (i for i in await js.consumers_info(stream) if _is_subscriber(i)),
        key=lambda i: i.name,
    )


async def rewind(
    js: JetStreamContext, name: str, start: datetime.datetime, *, namespace: str | None = None
) -> ConsumerInfo:
    """Deliver this subscriber's signals again from ``start`` (stream time); others keep
    their place. The consumer is recreated with the same settings and filter."""
    info = await check(js, name, namespace=namespace)
    config = info.config
    filters = config.filter_subjects or ([config.filter_subject] if config.filter_subject else [])
    base = to_consumer_config(
        signal_subscriber(name, filter_subject=filters[0] if filters else None, namespace=namespace)
    )
    fresh: ConsumerConfig = base.evolve(
        filter_subjects=filters,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=start.astimezone(datetime.UTC),
    )
    await js.delete_consumer(info.stream_name, name)
    created: ConsumerInfo = await js.add_consumer(info.stream_name, fresh)
    return created


# --- the reference subscriber ----------------------------------------------------------


Act = Callable[[Signal], Awaitable[None]]
_codec: Final[Codec[Signal]] = Codec(Signal)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def subscribe(
    js: JetStreamContext,
    name: str,
    *,
    act: Act,
    expired: Act | None = None,
    stop: asyncio.Event,
    namespace: str | None = None,
    batch: int = 10,
    clock: Callable[[], int] = _now_ms,
) -> None:
    """Take this subscriber's signals until ``stop`` is set: act on each, then ack it.

    A signal whose ``expires_ms`` has passed is handed to ``expired`` (if given) and
    terminated: it is not actionable and must not come again. A payload that is not a
    signal is terminated too. If ``act`` raises, the signal stays unacked and the server
    delivers it again after the ack wait.
    """
    stream = stream_name(SIGNALS, namespace=namespace)
    sub = await js.pull_subscribe_bind(durable=name, stream=stream)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except NatsTimeout:
                continue
            for msg in msgs:
                await _one(msg, act, expired, clock)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _one(msg: Msg, act: Act, expired: Act | None, clock: Callable[[], int]) -> None:
    try:
        signal = _codec.decode(msg.data)
    except ContractError as exc:
        log.error("not a signal on %s (%s): terminated", msg.subject, exc.reason)
        await msg.term()
        return
    if clock() > signal.expires_ms:
        if expired is not None:
            await expired(signal)
        await msg.term()
        return
    await act(signal)
    await msg.ack_sync()


# --- exhausted deliveries -> dead letters ------------------------------------------------


class _Advisory(msgspec.Struct):
    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_advisory = msgspec.json.Decoder(_Advisory)


class Exhausted:
    """Listens to the delivery-limit advisories of SIGNALS; dead-letters what a subscriber
    never acked. Pipeline consumers on SIGNALS are left to their own dead-letter handling."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        publisher: Publisher,
        metrics: WorkerMetrics,
        namespace: str | None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.publisher = publisher
        self.metrics = metrics
        self.stream = stream_name(SIGNALS, namespace=namespace)
        self.dlq = subjects.dlq(DLQ_NAME, namespace=namespace)
        self._sub: Subscription | None = None
        self._subscribers: dict[str, bool] = {}

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{_ADVISORY}.{self.stream}.*", cb=self._on_advisory)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_advisory(self, msg: Msg) -> None:
        try:
            await self.handle(_advisory.decode(msg.data))
        except Exception:
            log.exception("max-deliveries advisory not handled: %.300r", msg.data)

    async def _subscriber(self, consumer: str) -> bool:
        known = self._subscribers.get(consumer)
        if known is None:
            try:
                known = _is_subscriber(await self.js.consumer_info(self.stream, consumer))
            except NotFoundError:
                return False
            self._subscribers[consumer] = known
        return known

    async def handle(self, adv: _Advisory) -> None:
        if adv.stream != self.stream or not await self._subscriber(adv.consumer):
            return
        raw = await self.js.get_msg(self.stream, adv.stream_seq)
        letter = DeadLetter(
            worker=adv.consumer,
            reason=MAX_DELIVERIES,
            detail=f"subscriber {adv.consumer} did not ack after {adv.deliveries} deliveries",
            subject=raw.subject or "",
            payload=raw.data or b"",
            headers=dict(raw.headers or {}),
            stream=self.stream,
            stream_seq=adv.stream_seq,
            deliveries=adv.deliveries,
            failed_at_ms=_now_ms(),
        )
        msg_id = f"dlq|subscriber|{adv.consumer}|{self.stream}|{adv.stream_seq}"
        await self.publisher.publish([Outgoing(self.dlq, encode(letter), msg_id)])
        self.metrics.dead_letters.labels(self.metrics.worker, MAX_DELIVERIES).inc()
        log.warning("subscriber %s: seq %d dead-lettered", adv.consumer, adv.stream_seq)
