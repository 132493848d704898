"""Delivery of signals to downstream subscribers, each on its own durable consumer.

- ``add``, ``remove``, ``listing``, ``rewind``: the subscribers' consumers on SIGNALS
  (``contracts.streams.signal_subscriber``: explicit ack, ack wait, backoff, delivery limit).
  JetStream cannot change a consumer's deliver policy in place, so ``rewind`` recreates one
  subscriber's consumer to start at a time; the others are untouched.
- ``subscribe``: the reference subscriber. It acts on a signal, then acks it; a signal at or
  past its ``expires_ms`` is reported as expired and terminated, never acted on.
- ``Exhausted``: the server gives up on a message after the delivery limit and says so in
  an advisory, which the stream ADVISORIES keeps; signal-publisher consumes it on a durable
  of its own and dead-letters the message to ``dlq.subscribers`` with the subscriber's name
  and delivery count, also when the advisory came while it was down. A pipeline worker
  dead-letters a message on its last delivery itself; if it was killed holding it, the
  advisory is the only trace, and the message goes to that worker's ``dlq.<worker>`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError
from prometheus_client import Counter

from contracts import subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import DeadLetter, Signal
from contracts.streams import (
    SIGNALS,
    consumer_specs,
    ensure,
    exhausted_deliveries,
    signal_subscriber,
    stream_name,
    to_consumer_config,
)
from workers.runtime.errors import TickwireError
from workers.runtime.metrics import WorkerMetrics
from workers.runtime.partition import PARTITIONED, consumers_of
from workers.runtime.publish import Outgoing, Publisher
from workers.runtime.pull import ACK, PullSource, Unanswered
from workers.runtime.worker import MAX_DELIVERIES

log = logging.getLogger(__name__)

SUBSCRIBER_DESCRIPTION: Final = "Signal subscriber "
DLQ_NAME: Final = "subscribers"


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


def check_free(name: str) -> None:
    """``SubscriberError`` for a name a pipeline worker's consumers go by: the worker's, a
    partition's (``<worker>-<k>of<n>``) or a short-lived one's (``<worker>-warmup``...). A
    subscriber of that name would be taken for the worker, its dead letters too."""
    for c in consumer_specs():
        worker = c.durable
        if name == worker or name.startswith(f"{worker}-"):
            raise SubscriberError(
                f"subscriber name {name!r}: names starting with {worker!r} belong to that worker"
            )


async def add(
    js: JetStreamContext, name: str, *, filter_subject: str | None, namespace: str | None = None
) -> ConsumerInfo:
    """Create the subscriber's durable consumer; an existing one is left alone (error), and
    so is a name a pipeline worker's consumers go by (``check_free``)."""
    check_free(name)
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
        (i for i in await consumers_of(js, stream) if _is_subscriber(i)),
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
    batch: int = 1,
    clock: Callable[[], int] = _now_ms,
) -> None:
    """Take this subscriber's signals until ``stop`` is set: act on each, then ack it.

    A signal whose ``expires_ms`` has come is handed to ``expired`` (if given) and
    terminated: it is not actionable and must not come again. A payload that is not a
    signal is terminated too. If ``act`` raises, the signal stays unacked and the server
    delivers it again after the ack wait, before any later one: the consumer hands out one
    signal at a time (a ``batch`` above 1 would only wait out the fetch for the others).
    A pull request nobody answers (JetStream away, or the consumer recreated by a rewind or
    gone) is logged and asked again a second later, as the pipeline's consumers do.
    """
    stream = stream_name(SIGNALS, namespace=namespace)
    sub = await js.pull_subscribe_bind(durable=name, stream=stream)
    unanswered = Unanswered(f"{stream} > {name}")
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except NatsTimeout:
                continue
            except ServiceUnavailableError:
                unanswered.ended()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)  # then ask again
                continue
            unanswered.answered()
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
    if clock() >= signal.expires_ms:  # valid until then: from then on, expired
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

DEAD_LETTERED: Final = "dead_lettered"
PIPELINE: Final = "pipeline"
IGNORED: Final = "ignored"
UNREADABLE: Final = "unreadable"
RETRY: Final = "retry"
_PARTITION: Final = re.compile(r"(.+)-\d+of\d+")


class Exhausted:
    """Dead-letters what a consumer never acked, from the delivery-limit advisories that
    the stream ADVISORIES keeps (``contracts.streams.exhausted_deliveries``).

    - A subscriber's on SIGNALS goes to ``dlq.subscribers``.
    - A pipeline worker's (any partition's) goes to that worker's ``dlq.<worker>``, as the
      worker would have sent it on the message's last delivery, with the same message id: a
      worker killed holding its last delivery leaves only the advisory, and ``tickwire dlq
      requeue`` brings the message back. Logged as an error: a worker was lost meanwhile.
    - Any other consumer's (a short-lived reader's) is acked, logged and counted.

    Each advisory is acked after its dead letter is stored; the dead letter's id is
    deterministic, so an advisory delivered again (a crash before the ack) stores nothing
    new. One that does not parse is acked, logged and counted. When the dead letter cannot
    be stored, the advisory stays unacked and comes again.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        publisher: Publisher,
        metrics: WorkerMetrics,
        namespace: str | None,
        *,
        expires_s: float = 5.0,
        batch: int = 100,
    ) -> None:
        self.nc = nc
        self.js = js
        self.publisher = publisher
        self.metrics = metrics
        self.namespace = namespace
        self.stream = stream_name(SIGNALS, namespace=namespace)
        self.dlq = subjects.dlq(DLQ_NAME, namespace=namespace)
        self.spec = exhausted_deliveries(namespace=namespace)
        self.workers = {(c.stream, c.durable) for c in consumer_specs(namespace=namespace)}
        """(stream, worker) of every pipeline worker's durable."""
        self.batch = batch
        self.source = PullSource(
            nc, self.spec.stream, self.spec.durable, batch=batch, expires_s=expires_s
        )
        self.task: asyncio.Future[None] | None = None
        self.stopping = False
        self._subscribers: dict[str, bool] = {}
        counter = Counter(
            "tickwire_exhausted_advisories",
            "Delivery-limit advisories by outcome: dead_lettered (a subscriber's), pipeline"
            " (a pipeline worker's, dead-lettered for it), ignored, unreadable, retry",
            ["worker", "outcome"],
            registry=metrics.registry,
        )
        self.outcomes = {
            o: counter.labels(metrics.worker, o)
            for o in (DEAD_LETTERED, PIPELINE, IGNORED, UNREADABLE, RETRY)
        }

    async def start(self) -> None:
        """Start consuming; ``task`` ends only by ``stop`` or by an error to supervise."""
        await self.source.start()
        self.task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)
        with contextlib.suppress(Exception):
            await self.source.stop()

    async def _run(self) -> None:
        while not self.stopping:
            for msg in await self.source.take(self.batch, timeout_s=1.0):
                await self._one(msg)

    async def _one(self, msg: Msg) -> None:
        try:
            adv = _advisory.decode(msg.data)
        except msgspec.DecodeError as exc:
            log.error("unreadable max-deliveries advisory acked (%s): %.300r", exc, msg.data)
            self.outcomes[UNREADABLE].inc()
            await self.nc.publish(msg.reply, ACK)
            return
        try:
            outcome = await self.handle(adv)
        except Exception as exc:
            # left unacked: the server delivers it again after the consumer's backoff step
            # (a nak's own delay would be offset by that step once backoff is set)
            log.warning(
                "consumer %s of %s: seq %d not dead-lettered yet, comes again: %r",
                adv.consumer,
                adv.stream,
                adv.stream_seq,
                exc,
            )
            self.outcomes[RETRY].inc()
            return
        self.outcomes[outcome].inc()
        await self.nc.publish(msg.reply, ACK)

    async def _subscriber(self, consumer: str) -> bool:
        known = self._subscribers.get(consumer)
        if known is None:
            try:
                known = _is_subscriber(await self.js.consumer_info(self.stream, consumer))
            except NotFoundError:
                log.warning(
                    "consumer %s of %s is gone: its advisory is ignored", consumer, self.stream
                )
                return False
            self._subscribers[consumer] = known
        return known

    def worker_of(self, stream: str, consumer: str) -> str | None:
        """The pipeline worker whose durable (or one of whose partitions' durables) this is."""
        m = _PARTITION.fullmatch(consumer)
        worker = consumer if m is None or m.group(1) not in PARTITIONED else m.group(1)
        return worker if (stream, worker) in self.workers else None

    async def handle(self, adv: _Advisory) -> str:
        """Dead-letter the message the advisory is about; the outcome, for the metric."""
        worker = self.worker_of(adv.stream, adv.consumer)
        if worker is not None:
            # its worker dead-letters a message on its last delivery: this one was lost on
            # the way (the worker killed holding it), and only this says so
            log.error(
                "pipeline consumer %s gave up on %s seq %d after %d deliveries without a"
                " dead letter (its worker was lost holding it): dead-lettered to dlq.%s",
                adv.consumer,
                adv.stream,
                adv.stream_seq,
                adv.deliveries,
                worker,
            )
            detail = (
                f"delivered {adv.deliveries} times to {adv.consumer} without an ack, the"
                " consumer's limit, and its worker was lost holding it: the server would not"
                " deliver it again"
            )
            dlq = subjects.dlq(worker, namespace=self.namespace)
            msg_id = f"dlq|{worker}|{adv.stream}|{adv.stream_seq}"
            # counted as that worker's, as its own dead letters are
            await self._dead_letter(adv, worker, dlq, detail, msg_id, counted_as=worker)
            return PIPELINE
        if adv.stream != self.stream or not await self._subscriber(adv.consumer):
            log.warning(
                "consumer %s of %s gave up on seq %d: neither a subscriber's nor a pipeline"
                " worker's, so not dead-lettered",
                adv.consumer,
                adv.stream,
                adv.stream_seq,
            )
            return IGNORED
        detail = f"subscriber {adv.consumer} did not ack after {adv.deliveries} deliveries"
        msg_id = f"dlq|subscriber|{adv.consumer}|{self.stream}|{adv.stream_seq}"
        await self._dead_letter(
            adv, adv.consumer, self.dlq, detail, msg_id, counted_as=self.metrics.worker
        )
        log.warning("subscriber %s: seq %d dead-lettered", adv.consumer, adv.stream_seq)
        return DEAD_LETTERED

    async def _dead_letter(
        self, adv: _Advisory, worker: str, dlq: str, detail: str, msg_id: str, *, counted_as: str
    ) -> None:
        try:
            raw = await self.js.get_msg(adv.stream, adv.stream_seq)
            subject, payload, headers = raw.subject or "", raw.data or b"", dict(raw.headers or {})
        except NotFoundError:
            # past the stream's age limit or deleted: the record that it was never acked
            # still matters more than the payload
            subject, payload, headers = "", b"", {}
            detail += f"; seq {adv.stream_seq} is no longer in {adv.stream}"
        letter = DeadLetter(
            worker=worker,
            reason=MAX_DELIVERIES,
            detail=detail,
            subject=subject,
            payload=payload,
            headers=headers,
            stream=adv.stream,
            stream_seq=adv.stream_seq,
            deliveries=adv.deliveries,
            failed_at_ms=_now_ms(),
        )
        await self.publisher.publish([Outgoing(dlq, encode(letter), msg_id)])
        self.metrics.dead_letters.labels(counted_as, MAX_DELIVERIES).inc()
