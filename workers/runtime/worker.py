"""The loop every worker runs: take a batch, decode, handle, make the effect durable, ack.

The ack policy is decided here, once:

- decoded and handled      -> ack, after the handler returned (its publishes are acked by
                              JetStream and its writes committed by then)
- bad input                -> dead letter (payload, headers, reason) to ``dlq.<worker>``,
                              then ack; counted by reason
- ``TransientError``       -> a dependency is down (database, QuestDB, JetStream publish):
                              the batch is held, in-progress acks keep the server from
                              redelivering it, and it is tried again with exponential
                              backoff until it succeeds. Order is kept and no delivery
                              attempt is spent on an outage. Stopping naks what is held.
- ``Misdeployed``          -> the deployment changed under the worker: the batch is
                              handed back and the worker stops, raising it (one line,
                              exit code 1), as when it refuses to start
- any other exception      -> the batch is retried one message at a time so one poison
                              message cannot hold back the others; a failing message is
                              nak'd with backoff and redelivered, and dead-lettered on its
                              ``poison_deliveries``-th failure (or the one before the
                              consumer's ``max_deliver``-th, if sooner). Not so for a
                              stateful worker: see below
- the consumer's last delivery -> dead letter (reason ``max_deliveries``) without handling
                              it (when ``max_deliver`` allows more than one): after it the
                              server gives up on the message in silence. Deliveries run
                              out without a handler's failure when the message kills its
                              worker, or when every restart of a worker whose commit keeps
                              failing hands its batch back. A stopping worker dead-letters,
                              rather than naks, what it holds on its last delivery.

A handler may split its work in two: it updates its state and returns a *commit*, the
awaitable that makes the batch's effect durable (publishes, writes). The loop then takes
and handles the next batches while the commit runs (up to ``commit_depth`` handled batches
on their way at once); commits run one at a time, in batch order, and a batch is acked
only after its commit. Whatever waits is kept alive with in-progress acks, so a hold-up
longer than the ack wait redelivers nothing. A commit may still reject messages of
its batch (a database refusing a row): they are dead-lettered after it. A commit's
``TransientError`` holds the batch as above; any other exception stops the worker (its
state may be ahead of what is durable, so it must start again from what is).

A stateful worker (``in_order``) applies every message in stream order and takes one at or
below the last it applied as a redelivery. So its handler's failure cannot be retried later
(the message would come back behind later ones and be taken for applied), and its state may
hold part of the batch: the worker hands the batch back and stops (``CommitFailed``). Its next
start rebuilds the state from the stream; a message whose applying raises there
(``ReplayFailed``) is dead-lettered (``handler_error``) unless it was acked before, left out
(``Context.skipped``), and the start made again, so that the state is what it would be had
the message never come, and its redelivery is acked as applied. Deliveries lost on the way would break that; the
loop finds them by the consumer's delivery sequence and reads what they carried back from
the stream, ahead of the later messages (``workers.runtime.order``). Two instances on one
durable would split its messages between them, so a stateful worker does not start while
another consumes on its durable (its pull requests wait at the server): it waits, with
backoff, until that one stops.

A worker module only declares what it consumes, how to decode it, and a handler.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import itertools
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, NamedTuple, TypeVar

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

from contracts import subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import DeadLetter
from workers.runtime import wire
from workers.runtime.connection import connect
from workers.runtime.errors import Misdeployed, Rejected, ReplayFailed, TransientError
from workers.runtime.metrics import MetricsServer, WorkerMetrics
from workers.runtime.order import DeliveryOrder, Hole
from workers.runtime.publish import REQUEUED_FOR, Outgoing, Publisher
from workers.runtime.pull import (
    ACK,
    IN_PROGRESS,
    LOOK_AGAIN_S,
    NAK,
    AckInfo,
    PullSource,
    nak_payload,
    on_last_delivery,
    parse_reply,
    read_stream,
)
from workers.runtime.pull import deliveries as reply_deliveries
from workers.runtime.pull import delivery as reply_delivery
from workers.runtime.pull import position as reply_position
from workers.runtime.pull import stream_seq as reply_stream_seq
from workers.runtime.settings import RuntimeSettings

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)

HANDLER_ERROR = "handler_error"
MAX_DELIVERIES = "max_deliveries"
READ_BACK_SUFFIX = "-readback"
"""Lost deliveries are read back through the durable's name with this suffix."""
UNANSWERED: Final = (
    TransientError,
    TimeoutError,  # nats.errors.TimeoutError too
    nats.errors.NoRespondersError,
    ServiceUnavailableError,
)
"""What a start-up step that is tried again may raise: nothing is wrong but the moment."""


class DeadItem(NamedTuple):
    """A message, or one piece of it, on its way to the dead letters."""

    msg: Msg
    info: AckInfo
    reason: str
    detail: str
    part: int | None = None
    payload: bytes | None = None
    """The piece's own payload when ``part`` is set; the message's payload otherwise."""


class Delivery(Generic[T]):
    """One delivered message and its decoded value."""

    __slots__ = ("_info", "_position", "msg", "value")

    def __init__(
        self,
        msg: Msg,
        value: T,
        info: AckInfo | None = None,
        position: tuple[int, int] | None = None,
    ) -> None:
        self.msg = msg
        self.value = value
        self._info = info
        self._position = position

    @property
    def info(self) -> AckInfo:
        """Stream sequence, delivery count... parsed from the reply subject when asked."""
        if self._info is None:
            self._info = parse_reply(self.msg.reply)
        return self._info

    @property
    def stream_seq(self) -> int:
        """``info.stream_seq``, without building the rest for a handler that needs no more."""
        if self._info is None:
            return reply_stream_seq(self.msg.reply)
        return self._info.stream_seq

    def position(self) -> tuple[int, int]:
        """``(stream_seq, stored_ms)``: where the message is in its stream and when the
        stream stored it (epoch ms; the same on every delivery and read of it, where the
        wall clock is not), at the cost of one of them."""
        if self._position is not None:
            return self._position
        info = self._info
        if info is None:
            seq, stored_ns = reply_position(self.msg.reply)
            return seq, stored_ns // 1_000_000
        return info.stream_seq, info.timestamp_ns // 1_000_000


class Batch(Generic[T]):
    """The decoded messages of one pull, in stream order. Iterating skips rejected ones."""

    __slots__ = ("_rejected", "items", "parts")

    def __init__(self, items: list[Delivery[T]]) -> None:
        self.items = items
        self._rejected: dict[int, Rejected] = {}
        self.parts: dict[tuple[int, int], tuple[Delivery[T], int, bytes, Rejected]] = {}
        """Refused pieces of messages whose other pieces were handled."""

    def __iter__(self) -> Iterator[Delivery[T]]:
        rejected = self._rejected
        return (d for d in self.items if id(d) not in rejected) if rejected else iter(self.items)

    def __len__(self) -> int:
        return len(self.items) - len(self._rejected)

    def reject(self, delivery: Delivery[T], reason: str, detail: str = "") -> None:
        """Send this message to the dead letters (with ``reason``) instead of handling it."""
        self._rejected[id(delivery)] = Rejected(reason, detail)

    def reject_part(
        self, delivery: Delivery[T], index: int, payload: bytes, reason: str, detail: str = ""
    ) -> None:
        """Dead-letter one piece (e.g. a tick of a batch); the message itself is handled."""
        self.parts[id(delivery), index] = (delivery, index, payload, Rejected(reason, detail))

    def rejections(self) -> list[tuple[Delivery[T], Rejected]]:
        rejected = self._rejected
        if not rejected:
            return []
        return [(d, rejected[id(d)]) for d in self.items if id(d) in rejected]


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may use; made once at start-up."""

    worker: str
    settings: RuntimeSettings
    nc: Client
    js: JetStreamContext
    publisher: Publisher
    metrics: WorkerMetrics
    state: dict[str, Any]
    """Connections and state the worker's start-up hook creates."""
    skipped: set[int] = field(default_factory=set)
    """Stream sequences a stateful worker's start leaves out of its state: rebuilding it
    raised on them (``ReplayFailed``)."""


Commit = Callable[[], Awaitable[None]]
"""Makes a handled batch's effect durable; called again after a ``TransientError``."""
Handler = Callable[[Batch[T], Context], Awaitable[Commit | None]]
Hook = Callable[[Context], Awaitable[None]]


class CommitFailed(RuntimeError):
    """A commit, or a stateful worker's handler, raised something other than
    ``TransientError``: the worker stopped."""


@dataclass(slots=True)
class _Staged(Generic[T]):
    """A handled batch on its way to being acked."""

    msgs: Sequence[Msg]
    started: float
    acked: list[Delivery[T]]
    retry: list[tuple[Delivery[T], str]]
    dead: list[DeadItem]
    parts: list[DeadItem]
    commit: Commit | None
    batch: Batch[T] | None = None

    def late_rejections(self) -> list[DeadItem]:
        """Messages the commit rejected on the batch; taken out of ``acked``."""
        batch = self.batch
        if batch is None:
            return []
        known = {id(item.msg) for item in self.dead}
        late = [
            DeadItem(d.msg, d.info, rej.reason, rej.detail)
            for d, rej in batch.rejections()
            if id(d.msg) not in known
        ]
        if late:
            gone = {id(item.msg) for item in late}
            self.acked = [d for d in self.acked if id(d.msg) not in gone]
        return late


class Worker(Generic[T]):
    """One consumer of one JetStream durable consumer."""

    def __init__(
        self,
        name: str,
        *,
        stream: str,
        durable: str,
        codec: Codec[T],
        settings: RuntimeSettings,
        handler: Handler[T] | None = None,
        accept: Callable[[str], bool] | None = None,
        in_order: bool = False,
        positions: bool = False,
    ) -> None:
        """``accept(subject)`` False: the message belongs to another instance's partition
        and is acked unread. ``in_order``: the handler is given every message in stream
        order, what lost deliveries carried read back from the stream. ``positions``: the
        handler asks every delivery its ``position()``, read with the delivery count."""
        self.name = subjects.check_name(name, "worker")
        self.accept = accept
        self.in_order = in_order
        self._positions = positions
        self._order: DeliveryOrder | None = None
        self._filters: list[str] = []
        self.stream = stream
        self.durable = durable
        self.codec = codec
        self.settings = settings
        self.metrics = WorkerMetrics(name)
        self._handler = handler
        self._startup: list[Hook] = []
        self._shutdown: list[Hook] = []
        self._stop = asyncio.Event()
        self._source: PullSource | None = None
        self._ctx: Context | None = None
        self._alive_at = 0.0
        self._poison_limit = settings.poison_deliveries
        self._last_delivery = 0
        """The consumer's delivery limit, when its last delivery is kept for the dead
        letter (0: it is not)."""
        self._ack_wait = 30.0
        self._queued: dict[int, Sequence[Msg]] = {}
        """Handled batches waiting for the commit before them: kept alive while that holds."""
        self._working: dict[int, Sequence[Delivery[Any]]] = {}
        """Messages whose handler or commit is running: kept alive if it takes long."""
        self._toucher: asyncio.Task[None] | None = None
        self._keys = itertools.count()
        self._failed: BaseException | None = None
        self._failed_in = "commit"
        self._dlq_subject = subjects.dlq(name, namespace=settings.namespace)
        self.metrics_server: MetricsServer | None = None
        self.serves_metrics = True
        """False for a worker whose metrics another worker of the process serves."""
        self.started = asyncio.Event()
        """Set once connected, subscribed and serving metrics."""

    # --- declaration -----------------------------------------------------------------

    def handler(self, fn: Handler[T]) -> Handler[T]:
        self._handler = fn
        return fn

    def on_startup(self, fn: Hook) -> Hook:
        self._startup.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        self._shutdown.append(fn)
        return fn

    def stop(self) -> None:
        """Ask the loop to finish its current batch and drain (what SIGTERM does)."""
        self._stop.set()

    @property
    def failed(self) -> bool:
        """Stopped on a failure of a commit or of a stateful worker's handler."""
        return self._failed is not None

    @property
    def stopping(self) -> bool:
        """Asked to stop, or stopping on a failure: its state may not be published from."""
        return self._stop.is_set()

    @property
    def context(self) -> Context:
        assert self._ctx is not None, "worker not started"
        return self._ctx

    def healthy(self) -> bool:
        ctx = self._ctx
        if ctx is None or not ctx.nc.is_connected or self._stop.is_set():
            return False
        source = self._source
        if source is not None and source.unanswered_for() > self.settings.unanswered_unhealthy_s:
            return False  # connected, but nothing can come: JetStream or the consumer is away
        return time.monotonic() - self._alive_at < max(30.0, self.settings.pull_expires_s * 3)

    # --- running ---------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, start, consume until ``stop()``, then drain and close."""
        if self._handler is None:
            raise RuntimeError(f"worker {self.name} has no handler")
        s = self.settings
        connecting = asyncio.ensure_future(connect(s, name=self.name))
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            log.info("%s stopped before it could connect", self.name)
            return
        nc = connecting.result()
        js = nc.jetstream(timeout=s.publish_timeout_s)
        ctx = Context(
            worker=self.name,
            settings=s,
            nc=nc,
            js=js,
            publisher=Publisher(nc, self.metrics, s.publish_timeout_s),
            metrics=self.metrics,
            state={},
        )
        self._ctx = ctx
        if self.serves_metrics:
            self.metrics_server = MetricsServer(
                self.metrics, self.healthy, s.metrics_host, s.metrics_port
            )
        try:
            if self.in_order and not await self._until_ready(self._alone, ctx):
                return  # stopped meanwhile
            for hook in self._startup:
                await self._start(hook, ctx)
            info = await self._until_ready(
                lambda _: js.consumer_info(self.stream, self.durable), ctx
            )
            if info is None:  # stopped meanwhile
                return
            ack_wait = float(info.config.ack_wait or 30.0)
            self._ack_wait = ack_wait
            max_deliver = info.config.max_deliver or -1
            if self.in_order:
                delivered = info.delivered
                self._order = DeliveryOrder(
                    (delivered.stream_seq or 0) if delivered else 0,
                    (delivered.consumer_seq or 0) if delivered else 0,
                )
                config = info.config
                self._filters = list(config.filter_subjects or []) or (
                    [config.filter_subject] if config.filter_subject else []
                )
            if max_deliver > 1:
                # handled on the deliveries before the last; the last is for the dead letter
                self._last_delivery = max_deliver
                self._poison_limit = min(self._poison_limit, max_deliver - 1)
            elif max_deliver == 1:
                self._poison_limit = 1
            self._source = PullSource(
                nc,
                self.stream,
                self.durable,
                batch=s.fetch_batch,
                expires_s=s.pull_expires_s,
                max_buffered=max(s.fetch_batch, s.handler_batch) * 4,
                last_delivery=self._last_delivery,
            )
            if self.metrics_server is not None:
                await self.metrics_server.start()
            await self._source.start()
            self.metrics.up.labels(self.name).set(1)
            self._alive_at = time.monotonic()
            self.started.set()
            log.info("%s consuming %s/%s", self.name, self.stream, self.durable)
            self._toucher = asyncio.ensure_future(self._touching(ack_wait / 3))
            await self._loop(ctx, self._source)
        finally:
            if self._toucher is not None:
                self._toucher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._toucher
            self.metrics.up.labels(self.name).set(0)
            await self._drain(ctx)

    async def _alone(self, ctx: Context) -> bool:
        """True once no other instance consumes on the durable; TransientError (wait and
        look again) while one does: it has pull requests waiting at the server."""
        for look in range(2):
            if look:
                await asyncio.sleep(LOOK_AGAIN_S)
            try:
                info = await ctx.js.consumer_info(self.stream, self.durable)
            except NotFoundError:  # not made yet: nobody consumes on it
                return True
            if info.num_waiting:
                raise TransientError(
                    f"another instance consumes on {self.stream}/{self.durable}"
                    f" ({info.num_waiting} pull requests waiting); it must stop first: one"
                    " instance per durable keeps the stream's order"
                )
        return True

    async def _start(self, hook: Hook, ctx: Context) -> None:
        """Run a start-up hook. Where rebuilding the state raised on a message, that message
        is dead-lettered (unless it was acked before) and left out, and the hook runs again
        whole: the state is then what it would be had the message never come."""
        while True:
            try:
                await self._until_ready(hook, ctx)
                return
            except ReplayFailed as exc:
                seq = exc.info.stream_seq
                if seq in ctx.skipped:
                    raise  # left out already, and it still raised: not the message's doing
                ctx.skipped.add(seq)
                log.error(
                    "%s: rebuilding the state raised on seq %d (%r); it is left out of the"
                    " state%s and the start made again",
                    self.name,
                    seq,
                    exc.cause,
                    "" if exc.acked else " and dead-lettered",
                    exc_info=exc.cause,
                )
                if not exc.acked:
                    cause = exc.cause
                    if isinstance(cause, Rejected):  # bad input, found at start
                        item = DeadItem(exc.msg, exc.info, cause.reason, cause.detail)
                    else:
                        detail = f"{cause!r}, again when the state was rebuilt at start"
                        item = DeadItem(exc.msg, exc.info, HANDLER_ERROR, detail)
                    await self._until_ready(functools.partial(self._dead_letter, dead=[item]), ctx)

    async def _until_ready(self, step: Callable[[Context], Awaitable[R]], ctx: Context) -> R | None:
        """A start-up step whose dependency is down, or whose JetStream request went
        unanswered (a busy or restarting server), is tried again with backoff; its result,
        or None once the worker is stopped."""
        tries = 0
        while not self._stop.is_set():
            try:
                return await step(ctx)
            except UNANSWERED as exc:
                tries += 1
                delay = self._backoff(tries)
                log.warning("%s: not ready (%s); retry %d in %.1fs", self.name, exc, tries, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        return None

    async def _loop(self, ctx: Context, source: PullSource) -> None:
        """Take and handle the next batches while earlier ones commit; finish them in order.

        At most ``commit_depth`` handled batches are on their way to their ack: when that
        many are, the loop waits for the oldest before it takes more.
        """
        take_timeout = 0.25
        max_n = self.settings.handler_batch
        depth = self.settings.commit_depth
        finishing: collections.deque[asyncio.Future[bool]] = collections.deque()
        try:
            while not self._stop.is_set():
                self._alive_at = time.monotonic()
                if not await _settle(finishing, depth):
                    break
                msgs = await source.take(max_n, take_timeout)
                if not msgs:
                    continue
                if self._order is not None:
                    msgs = await self._in_order(ctx, msgs)
                    if not msgs:
                        continue
                before = finishing[-1] if finishing else None
                staged = await self._prepare(ctx, msgs, before=before)
                if staged is not None:
                    finishing.append(asyncio.ensure_future(self._finish_after(ctx, staged, before)))
                    # a turn for the commits on their way: with messages waiting, nothing
                    # above needs to suspend, and their publishes would wait for the
                    # loop to fill ``commit_depth``
                    await asyncio.sleep(0)
        finally:
            # no pull request open before batches are handed back: what is naked then goes
            # to the next consumer, not back into this one's buffer (a delivery spent)
            with contextlib.suppress(Exception):  # tried again, and raised, when draining
                await self._withdraw(ctx)
            for done in finishing:
                await done
        if isinstance(self._failed, Misdeployed):
            raise self._failed
        if self._failed is not None:
            raise CommitFailed(f"{self.name}: {self._failed_in} failed: {self._failed!r}") from (
                self._failed
            )

    async def _finish_after(
        self, ctx: Context, staged: _Staged[T], before: asyncio.Future[bool] | None
    ) -> bool:
        """Finish ``staged`` once the batch before it is finished; hand it back if that one
        was handed back. Meanwhile its messages are kept alive with the held ones."""
        if before is not None:
            self._queued[id(staged)] = staged.msgs
            try:
                finished = await before
            finally:
                del self._queued[id(staged)]
            if not finished:
                await self._hand_back(ctx, staged.msgs)
                return False
        return await self._finish(ctx, staged)

    async def _drain(self, ctx: Context) -> None:
        await self._withdraw(ctx)
        for hook in reversed(self._shutdown):
            try:
                await hook(ctx)
            except Exception:
                log.exception("%s: shutdown hook failed", self.name)
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        try:
            await asyncio.wait_for(ctx.nc.drain(), self.settings.drain_timeout_s)
        except Exception as exc:
            log.warning("%s: drain did not finish cleanly: %r", self.name, exc)
            await ctx.nc.close()
        log.info("%s stopped", self.name)

    # --- lost deliveries ---------------------------------------------------------------

    async def _in_order(self, ctx: Context, msgs: list[Msg]) -> list[Msg]:
        """``msgs`` with what lost deliveries carried read back in front of them, in stream
        order; empty when the worker stopped meanwhile (``msgs`` handed back)."""
        assert self._order is not None
        holes = self._order.holes([m.reply for m in msgs])
        if not holes:
            return msgs
        held = [Delivery(m, None) for m in msgs]
        out: list[Msg] = []
        start = 0
        for hole in holes:
            try:
                _, found = await self._holding(held, functools.partial(self._read_back, ctx, hole))
            except TransientError:
                await self._hand_back(ctx, msgs)
                return []
            out += msgs[start : hole.at]
            out += found
            start = hole.at
        out += msgs[start:]
        return out

    async def _read_back(self, ctx: Context, hole: Hole, _: Batch[Any]) -> list[Msg]:
        """The messages of ``hole`` that pass the durable's filter, read from the stream."""
        last = hole.before - 1
        found: list[Msg] = []
        try:
            async for batch in read_stream(
                ctx.nc,
                ctx.js,
                self.stream,
                consumer=self.durable + READ_BACK_SUFFIX,
                filter_subjects=self._filters,
                first=hole.first,
                last=last,
                desc=f"reading back {self.stream} {hole.first}..{last}",
                progress=False,
            ):
                found += [msg for _, msg in batch]
        except (nats.errors.Error, TimeoutError) as exc:
            raise TransientError(f"reading back seqs {hole.first}..{last}: {exc!r}") from exc
        if found:
            self.metrics.read_back.labels(self.name).inc(len(found))
            log.warning(
                "%s: %d messages of seqs %d..%d were delivered but never received;"
                " read back from %s ahead of seq %d",
                self.name,
                len(found),
                hole.first,
                last,
                self.stream,
                hole.before,
            )
        return found

    # --- one batch -------------------------------------------------------------------

    async def _prepare(
        self,
        ctx: Context,
        msgs: Sequence[Msg],
        *,
        before: asyncio.Future[bool] | None = None,
    ) -> _Staged[T] | None:
        """Decode and handle; what to ack, retry and dead-letter once the commit is done.

        ``before``: the previous batch's finish, awaited before anything is committed here
        out of turn (messages handled one by one commit as they go).
        """
        started = time.perf_counter()
        decode = self.codec.decode
        items: list[Delivery[T]] = []
        dead: list[DeadItem] = []
        if self.accept is not None:
            accept = self.accept
            skipped = [m for m in msgs if not accept(m.subject)]
            if skipped:
                await wire.send(ctx.nc, wire.acks([m.reply for m in skipped], ACK))
                self.metrics.in_skipped.inc(len(skipped))
                msgs = [m for m in msgs if accept(m.subject)]
                if not msgs:
                    return None
        name = self.name
        if any(m.headers and m.headers.get(REQUEUED_FOR, name) != name for m in msgs):
            # requeued for another consumer of the subject: this one took the original
            ours: list[Msg] = []
            others: list[str] = []
            for m in msgs:
                if m.headers and m.headers.get(REQUEUED_FOR, name) != name:
                    others.append(m.reply)
                else:
                    ours.append(m)
            await wire.send(ctx.nc, wire.acks(others, ACK))
            self.metrics.in_not_ours.inc(len(others))
            msgs = ours
            if not msgs:
                return None
        limit = self._last_delivery
        positions = self._positions
        position: tuple[int, int] | None = None
        for msg in msgs:
            if positions:  # one parse of the ack subject for both
                count, seq, stored_ns = reply_delivery(msg.reply)
                position = (seq, stored_ns // 1_000_000)
            else:
                count = reply_deliveries(msg.reply) if limit > 0 else 0
            if 0 < limit <= count:
                dead.append(self._exhausted(msg))
                continue
            try:
                items.append(Delivery(msg, decode(msg.data), None, position))
            except ContractError as exc:
                dead.append(DeadItem(msg, parse_reply(msg.reply), exc.reason, exc.detail))
        acked: list[Delivery[T]] = []
        retry: list[tuple[Delivery[T], str]] = []
        parts: list[DeadItem] = []
        commit: Commit | None = None
        batch: Batch[T] | None = None
        if not items:
            return _Staged(msgs, started, acked, retry, dead, parts, None)
        try:
            batch, commit = await self._holding(items, lambda b: self._call(ctx, b))
        except TransientError:
            # stopping while a dependency is down: hand everything back for redelivery
            await self._hand_back(ctx, msgs)
            return None
        except Misdeployed as exc:
            # the deployment changed under the running worker (its stream made again):
            # nothing of the batch is acked, and the worker stops as it would at start
            log.error("%s: stopping: %s", self.name, exc)
            self._failed, self._failed_in = exc, "handler"
            self.stop()
            await self._hand_back(ctx, msgs)
            return None
        except Exception as exc:
            if self.in_order and not (len(items) == 1 and isinstance(exc, Rejected)):
                # the state may hold part of the batch, and a message retried later would
                # be taken for a redelivery of one applied: stop; the next start rebuilds
                # the state from the stream and leaves out the message that raises there
                log.exception("%s: handler failed; stopping", self.name)
                self._failed, self._failed_in = exc, "handler"
                self.stop()
                await self._hand_back(ctx, msgs)
                return None
            # one by one commits as it goes: only after the batch before is done
            if before is not None and not await before:
                await self._hand_back(ctx, msgs)
                return None
            if len(items) == 1 and isinstance(exc, Rejected):
                dead.append(DeadItem(items[0].msg, items[0].info, exc.reason, exc.detail))
            elif len(items) == 1:
                retry.append((items[0], repr(exc)))
                log.exception("%s: handler failed", self.name)
            else:
                log.warning("%s: batch failed (%r); retrying one by one", self.name, exc)
                try:
                    await self._isolate(ctx, items, acked, retry, dead, parts)
                except TransientError:
                    await self._hand_back(ctx, msgs)
                    return None
        else:
            for d, rej in batch.rejections():
                dead.append(DeadItem(d.msg, d.info, rej.reason, rej.detail))
            parts.extend(_part_items(batch))
            acked.extend(batch)
        return _Staged(msgs, started, acked, retry, dead, parts, commit, batch)

    async def _finish(self, ctx: Context, staged: _Staged[T]) -> bool:
        """Dead-letter, commit, ack. False: the batch was handed back (stopping or failed)."""
        msgs, dead, retry = staged.msgs, staged.dead, staged.retry
        try:
            limit = self._poison_limit
            for d, err in retry:
                if d.info.deliveries >= limit:
                    dead.append(DeadItem(d.msg, d.info, HANDLER_ERROR, err))
            retry = [(d, err) for d, err in retry if d.info.deliveries < limit]
            # dead letters first: a commit may record the batch as done (a snapshot), and
            # what it records as done must include its refusals
            if dead or staged.parts:
                letters = dead + staged.parts
                held = [Delivery(item.msg, None, item.info) for item in letters]
                await self._holding(held, lambda _: self._dead_letter(ctx, letters))
            commit = staged.commit
            if commit is not None:
                every = [Delivery(m, None) for m in msgs]
                await self._holding(every, lambda b: self._keepalive(commit(), b.items))
                late = staged.late_rejections()
                if late:
                    # refused by the commit itself (e.g. by the database): acked as dead
                    held = [Delivery(item.msg, None, item.info) for item in late]
                    await self._holding(held, lambda _: self._dead_letter(ctx, late))
                    dead = dead + late
        except TransientError:
            await self._hand_back(ctx, msgs)
            return False
        except Exception as exc:
            log.exception("%s: commit failed; stopping", self.name)
            self._failed, self._failed_in = exc, "commit"
            self.stop()
            await self._hand_back(ctx, msgs)
            return False
        acked = staged.acked
        replies = [d.msg.reply for d in acked] + [item.msg.reply for item in dead]
        frames = [wire.acks(replies, ACK)]
        for d, _ in retry:
            frames.append(wire.acks([d.msg.reply], nak_payload(self._backoff(d.info.deliveries))))
        await wire.send(ctx.nc, frames)

        m = self.metrics
        m.in_ok.inc(len(acked))
        if dead:
            m.in_dead.inc(len(dead))
        if retry:
            m.in_retry.inc(len(retry))
        m.batch_size_w.observe(len(msgs))
        m.pending.labels(self.name, self.stream, self.durable).set(
            parse_reply(msgs[-1].reply).pending
        )
        m.processing_w.observe(time.perf_counter() - staged.started)
        return True

    async def _hand_back(self, ctx: Context, msgs: Sequence[Msg]) -> None:
        """Nak for redelivery: what a stopping worker could not make durable. What is on
        its last delivery is dead-lettered instead.

        The pull requests are withdrawn first: naked while one is open, a message would come
        straight back to this worker, one delivery nearer its limit for nothing.
        """
        if self._stop.is_set():
            with contextlib.suppress(Exception):  # tried again, and raised, when draining
                await self._withdraw(ctx)
        back: list[Msg] = []
        last: list[Msg] = []
        for m in msgs:
            (last if self._on_last(m) else back).append(m)
        if last:
            await self._dead_letter_last(ctx, last)
        await wire.send(ctx.nc, wire.acks([m.reply for m in back], NAK))
        self.metrics.in_retry.inc(len(back))

    def _on_last(self, msg: Msg) -> bool:
        return on_last_delivery(msg.reply, self._last_delivery)

    async def _withdraw(self, ctx: Context) -> None:
        """Stop the pull source (its requests withdrawn, what it holds handed back) and
        dead-letter what it held on its last delivery."""
        if self._source is not None:
            last = await self._source.stop()
            if last:
                await self._dead_letter_last(ctx, last)

    async def _dead_letter_last(self, ctx: Context, msgs: Sequence[Msg]) -> None:
        """Dead-letter and ack what a stopping worker holds on its last delivery: naked, or
        left to its ack wait, it would be dropped by the server."""
        try:
            await self._dead_letter(ctx, [self._exhausted(m) for m in msgs])
            await wire.send(ctx.nc, wire.acks([m.reply for m in msgs], ACK))
        except Exception as exc:
            log.error(
                "%s: %d messages on their last delivery are not dead-lettered (%r): stream"
                " seqs %s of %s come back as dead letters from the server's advisory",
                self.name,
                len(msgs),
                exc,
                [reply_stream_seq(m.reply) for m in msgs],
                self.stream,
            )
            return
        self.metrics.in_dead.inc(len(msgs))

    async def _holding(
        self, items: list[Delivery[Any]], attempt: Callable[[Batch[Any]], Awaitable[R]]
    ) -> tuple[Batch[Any], R]:
        """Run ``attempt`` on the batch until it does not raise ``TransientError``.

        Between tries the messages (and a handled batch queued behind them) stay unacked
        and are kept alive with in-progress acks; raises ``TransientError`` only when the
        worker is asked to stop.
        """
        tries = 0
        # one batch for every try: what a try refused stays refused
        batch = Batch(items)
        while True:
            try:
                return batch, await attempt(batch)
            except TransientError as exc:
                if self._stop.is_set():
                    raise
                tries += 1
                delay = self._backoff(tries)
                self.metrics.transient_retries.labels(self.name).inc()
                log.warning(
                    "%s: %s; holding %d messages, retry %d in %.1fs",
                    self.name,
                    exc,
                    len(items),
                    tries,
                    delay,
                )
                # wait in slices shorter than the ack wait, keeping everything delivered
                # to this worker alive: an outage costs no redelivery
                until = time.monotonic() + delay
                while not self._stop.is_set():
                    await self._touch(items)
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), min(left, self._ack_wait / 3))

    async def _touch(self, items: Sequence[Delivery[Any]]) -> None:
        """In-progress acks for ``items``, a handled batch queued behind them and what the
        pull source holds: everything this worker was given and has not acked yet."""
        replies = [d.msg.reply for d in items]
        for msgs in self._queued.values():
            replies += [m.reply for m in msgs]
        await wire.send(self.context.nc, wire.acks(replies, IN_PROGRESS))
        if self._source is not None:
            await self._source.keep_alive()
        self.metrics.keepalives.labels(self.name).inc()
        await self._show_pending()

    async def _show_pending(self) -> None:
        """``tickwire_consumer_pending`` from the server: while held up no batch is acked,
        so no ack reply tells how the backlog grows."""
        try:
            info = await self.context.js.consumer_info(
                self.stream, self.durable, timeout=self._ack_wait / 6
            )
        except Exception as exc:  # a report: JetStream away now shows as a stale value
            log.debug("%s: pending of %s not read: %r", self.name, self.durable, exc)
            return
        self.metrics.pending.labels(self.name, self.stream, self.durable).set(info.num_pending or 0)

    async def _call(self, ctx: Context, batch: Batch[T]) -> Commit | None:
        """Run the handler."""
        assert self._handler is not None
        return await self._keepalive(self._handler(batch, ctx), batch.items)

    async def _keepalive(self, work: Awaitable[R], items: Sequence[Delivery[Any]]) -> R:
        """Await ``work``; tell the server we are still working on ``items`` if it takes long.

        The worker's one toucher does the telling (``_touching``): most work is done in a
        millisecond, and a task and a timed wait around each handler call and commit cost
        more than the work at an EA's pace.
        """
        key = next(self._keys)
        self._working[key] = items
        try:
            return await work
        finally:
            del self._working[key]

    async def _touching(self, period: float) -> None:
        """Every ``period`` (a third of the ack wait), in-progress acks for whatever work is
        running then: no message is left a whole ack wait without one."""
        while True:
            await asyncio.sleep(period)
            if not self._working:
                continue
            items = [d for working in self._working.values() for d in working]
            try:
                await self._touch(items)
            except Exception as exc:  # connection down: the server redelivers, in order
                log.warning("%s: in-progress acks not sent: %r", self.name, exc)

    async def _call_and_commit(self, ctx: Context, batch: Batch[T]) -> None:
        commit = await self._call(ctx, batch)
        if commit is not None:
            await self._keepalive(commit(), batch.items)

    async def _isolate(
        self,
        ctx: Context,
        items: list[Delivery[T]],
        acked: list[Delivery[T]],
        retry: list[tuple[Delivery[T], str]],
        dead: list[DeadItem],
        parts: list[DeadItem],
    ) -> None:
        for d in items:
            try:
                single, _ = await self._holding([d], lambda b: self._call_and_commit(ctx, b))
            except TransientError:
                raise
            except Rejected as exc:
                dead.append(DeadItem(d.msg, d.info, exc.reason, exc.detail))
            except Exception as exc:
                retry.append((d, repr(exc)))
            else:
                for _, rej in single.rejections():
                    dead.append(DeadItem(d.msg, d.info, rej.reason, rej.detail))
                parts.extend(_part_items(single))
                acked.extend(single)

    def _exhausted(self, msg: Msg) -> DeadItem:
        info = parse_reply(msg.reply)
        log.error(
            "%s: seq %d is on its last delivery (%d) and is dead-lettered, not handled",
            self.name,
            info.stream_seq,
            info.deliveries,
        )
        return DeadItem(
            msg,
            info,
            MAX_DELIVERIES,
            f"delivered {info.deliveries} times without an ack, the consumer's limit: the"
            " server would not deliver it again",
        )

    def _backoff(self, deliveries: int) -> float:
        s = self.settings
        return float(min(s.retry_backoff_s * 2 ** max(deliveries - 1, 0), s.retry_backoff_max_s))

    async def _dead_letter(self, ctx: Context, dead: list[DeadItem]) -> None:
        now_ms = time.time_ns() // 1_000_000
        out = []
        for item in dead:
            msg, info = item.msg, item.info
            letter = DeadLetter(
                worker=self.name,
                reason=item.reason,
                detail=item.detail[:2000],
                subject=msg.subject,
                payload=msg.data if item.payload is None else item.payload,
                headers=dict(msg.headers or {}),
                stream=info.stream,
                stream_seq=info.stream_seq,
                deliveries=info.deliveries,
                failed_at_ms=now_ms,
            )
            msg_id = f"dlq|{self.name}|{info.stream}|{info.stream_seq}"
            if item.part is not None:
                msg_id = f"{msg_id}|{item.part}"
            out.append(Outgoing(self._dlq_subject, encode(letter), msg_id))
        await ctx.publisher.publish(out)
        for item in dead:
            self.metrics.dead_letters.labels(self.name, item.reason).inc()
            log.warning(
                "%s: dead letter %s seq=%d: %.200s",
                self.name,
                item.reason,
                item.info.stream_seq,
                item.detail,
            )


async def _settle(finishing: collections.deque[asyncio.Future[bool]], depth: int) -> bool:
    """Drop finished batches from the front; wait for the oldest while ``depth`` are on
    their way. False: one was handed back (stopping, or its commit failed)."""
    while finishing and (finishing[0].done() or len(finishing) >= depth):
        if not await finishing.popleft():
            return False
    return True


def _part_items(batch: Batch[Any]) -> list[DeadItem]:
    return [
        DeadItem(d.msg, d.info, rej.reason, rej.detail, part=index, payload=payload)
        for d, index, payload, rej in batch.parts.values()
    ]


def tune_interpreter() -> None:
    """The process's interpreter, set for thousands of messages a second once start-up is
    done.

    Each message brings a few objects that live for a batch or more (in the pull buffer,
    then on their way to the ack). At the collector's default threshold (700 allocations)
    every young collection promotes them all, and the full collections that follow scan
    everything in flight, and all the state a worker keeps, again and again: a tenth to a
    fifth of a worker's CPU. What start-up made (modules, settings, restored state) is
    frozen out of the collector's way and the young generation is collected every 50,000
    allocations; garbage cycles are rare here and wait a little longer. A worker whose
    database connection runs on a thread of its own (timescale-replicator) has that
    thread's round trips wait for the interpreter lock at most 1 ms instead of 5.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    sys.setswitchinterval(0.001)


def run_until_signalled(worker: Worker[Any]) -> None:
    """Run a worker in this process, its interpreter tuned once it has started; SIGTERM
    and SIGINT drain it and exit. A deployment the worker refuses (``Misdeployed``) is
    said in one log line, exit code 1."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        running = asyncio.ensure_future(worker.run())
        started = asyncio.ensure_future(worker.started.wait())
        await asyncio.wait({running, started}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            tune_interpreter()
        else:
            started.cancel()
        await running

    try:
        asyncio.run(main())
    except Misdeployed as exc:
        log.error("%s refuses to start: %s", worker.name, exc)
        raise SystemExit(1) from None
