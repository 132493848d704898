"""feature-builder: closed candles -> feature vectors, one series at a time.

consume CANDLES (Candle) -> ``Builder`` (per feed/symbol/timeframe engines of the shared
feature library) -> FeatureVector published to FEATURES with ``Nats-Msg-Id`` = candle key,
candle revision and feature-set id, before the candles are acked.

State survives restarts by a snapshot and the stream. Every ``snapshot_interval_s`` (and at a
clean stop) the builder is saved to the object store ``feature-builder-state``, one object
per durable, with the stream sequence it covers: taken as a batch is sealed, saved in the
background once that batch's vectors, and those of every batch before, are published (and
its refusals dead-lettered). On start the snapshot is loaded and CANDLES is read from the
message after it up to the last one the durable consumer delivered, through the same
engines, so every series is in the state an uninterrupted run has, to the last bit, however
little of its history CANDLES still keeps (14 days). Up to the ack floor that only rebuilds
state; after it (what a crashed process was given but did not ack) the vectors are
published again, identically, but for those FEATURES holds already: the stream's duplicate
window would not drop them once the process was down longer than it. When those candles
come again through the durable consumer they are acked without a second effect.

Without a usable snapshot (none yet, another feature set, revision depth or stream, or the
stream no longer holds the candle after it) the state is rebuilt from the first message
CANDLES holds, with a warning saying why: a series whose start is gone is then warm again
only after the feature set's warm-up, and its EMAs differ from an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Annotated, ClassVar, Final

from nats.js.errors import BucketNotFoundError, NotFoundError
from prometheus_client import Counter, Gauge
from pydantic import Field

from contracts import subjects
from contracts.codec import Codec, encode
from contracts.messages import Candle, Timeframe
from contracts.streams import (
    CANDLES,
    FEATURE_BUILDER,
    FEATURES,
    ensure,
    stream_name,
    stream_specs,
)
from workers.feature_builder.state import (
    Builder,
    Refusal,
    Snapshot,
    SnapshotMismatch,
    message_id,
)
from workers.features import DEFAULT
from workers.runtime.history import warm_up
from workers.runtime.partition import PartitionedSettings, own_durables
from workers.runtime.publish import Outgoing, stored_already
from workers.runtime.settings import load
from workers.runtime.worker import Batch, Commit, Context, Delivery, Worker, run_until_signalled

log = logging.getLogger(__name__)

NAME: Final = FEATURE_BUILDER
REMEMBERED_REFUSALS: Final = 100_000
SNAPSHOT_STEP: Final = 16
"""Series pickled at a time while a snapshot is taken (about 0.4 ms each)."""
STATE_BUCKET: Final = "feature-builder-state"
"""Object store of the builder snapshots, one per durable (a replay namespace's:
``ns-<name>-...``). Written by feature-builder alone: a snapshot is pickled."""


class Settings(PartitionedSettings):
    worker: ClassVar[str] = NAME

    commit_depth: Annotated[int, Field(ge=1, le=64)] = 4
    """Batches on their way at once: JetStream acks a batch of publishes a round trip
    after its last one, and the next batches are handled meanwhile."""
    revision_depth: Annotated[int, Field(ge=1, le=1000)] = 8
    """This many of a series' latest candles can be revised; older is ``revision_too_old``."""
    max_payload_bytes: Annotated[int, Field(gt=0)] = 64 * 1024
    snapshot_interval_s: Annotated[float, Field(gt=0)] = 60.0
    """How often the builder is saved: a restart reads CANDLES from the last snapshot on."""


def feed_symbol(subject: str) -> str:
    """``<feed>.<symbol token>`` of a candle subject: every timeframe of a symbol goes to the
    same partition."""
    return ".".join(subject.rsplit(".", 3)[-3:-1])


class Metrics:
    """feature-builder's own series, beside the runtime's."""

    def __init__(self, worker: Worker[Candle]) -> None:
        r, w = worker.metrics.registry, worker.name
        self.vectors = Counter(
            "tickwire_feature_vectors_out",
            "Feature vectors published, by timeframe and whether warming up",
            ["worker", "tf", "warming_up"],
            registry=r,
        )
        self.revisions = Counter(
            "tickwire_feature_revisions",
            "Vectors recomputed for a revised candle",
            ["worker"],
            registry=r,
        )
        self.warmup = Counter(
            "tickwire_feature_warmup_candles",
            "Candles read from the stream at start to rebuild state",
            ["worker"],
            registry=r,
        )
        self.series = Gauge(
            "tickwire_feature_series",
            "Series (feed, symbol, timeframe) held",
            ["worker"],
            registry=r,
        )
        self.latency = worker.metrics.latency.labels(w, "candle_to_feature")
        self.by_tf = {
            (tf, warming): self.vectors.labels(w, tf.value, str(warming).lower())
            for tf in Timeframe
            for warming in (False, True)
        }
        self.revisions_w = self.revisions.labels(w)
        self.warmup_w = self.warmup.labels(w)
        self.series_w = self.series.labels(w)


class Features:
    """The builder plus what it owes: vectors computed but not yet published."""

    def __init__(self, settings: Settings, ctx: Context, metrics: Metrics) -> None:
        self.settings = settings
        self.ctx = ctx
        self.builder = Builder(DEFAULT, settings.revision_depth)
        self.metrics = metrics
        self.applied_seq = 0
        """Stream sequence of the last candle folded into the state."""
        self.pending: list[Outgoing] = []
        self.pending_meta: list[tuple[Timeframe, bool, int, bool]] = []
        """(tf, warming up, candle close ms, revised) of each pending vector."""
        self.subjects: dict[tuple[str, str, Timeframe], str] = {}
        """FEATURES subject of each series."""
        self.refused: collections.OrderedDict[int, Refusal] = collections.OrderedDict()
        """Refusals by stream seq, for the candle coming again (a retried batch, or a
        redelivery after a restart whose replay refused it)."""
        self.owed: set[int] = set()
        """Stream seqs the start's replay refused, not dead letters until their candle comes
        again: no snapshot may cover them meanwhile (its start would not refuse them)."""
        self.context: dict[str, str] = {}
        """What the state is built under besides the feature set and the depth (``restore``
        sets it): a snapshot taken under anything else is not used."""
        self.unsettled = 0
        """Commits sealed but not (yet) done: no snapshot of the state meanwhile."""
        self._bucket = bucket_name(settings.namespace)
        self._key = settings.durable
        self._snapshot_at = time.monotonic()
        self._saving: asyncio.Task[None] | None = None

    def apply(self, batch: Batch[Candle] | None, d: Delivery[Candle], *, output: bool) -> None:
        seq = d.stream_seq
        if seq <= self.applied_seq:  # in the state already
            refusal = self.refused.get(seq)
            if refusal is not None and batch is not None:
                batch.reject(d, *refusal)
                self.owed.discard(seq)
            return
        c = d.value
        revisions = self.builder.revisions
        result = self.builder.apply(c, d.msg.subject)
        self.applied_seq = seq
        if isinstance(result, Refusal):
            if output:
                self.refused[seq] = result
                if len(self.refused) > REMEMBERED_REFUSALS:
                    self.refused.popitem(last=False)
                if batch is not None:
                    batch.reject(d, *result)
                else:
                    self.owed.add(seq)
            return
        if not output:
            return
        key = (c.feed, c.symbol, c.tf)
        subject = self.subjects.get(key)
        if subject is None:
            ns = self.settings.namespace
            subject = self.subjects[key] = subjects.features(*key, namespace=ns)
        self.pending.append(Outgoing(subject, encode(result), message_id(result)))
        revised = self.builder.revisions != revisions
        self.pending_meta.append((c.tf, result.warming_up, c.close_time_ms, revised))

    def seal(self) -> Commit:
        """The vectors pending now, as the commit that publishes them (the runtime runs it
        while the next batch is applied); tried again after a TransientError.

        When a snapshot is due, the state now is taken, pickled in the background and saved
        once the commit is done: the runtime runs commits in batch order, each after its
        batch's dead letters, so then every effect of every candle the state holds is
        durable. Not while a refusal of the start's replay waits for its candle to come
        again to be dead-lettered, nor while the snapshot before is on its way."""
        pending, meta = self.pending, self.pending_meta
        self.pending, self.pending_meta = [], []
        self.metrics.series_w.set(len(self.builder.series))
        committed: asyncio.Future[None] | None = None
        now = time.monotonic()
        if (
            self.context
            and not self.owed
            and now - self._snapshot_at >= self.settings.snapshot_interval_s
            and (self._saving is None or self._saving.done())
        ):
            committed = asyncio.get_running_loop().create_future()
            taking = self.builder.begin_snapshot(self.applied_seq, self.context)
            self._saving = asyncio.create_task(self._take(taking, committed))
            self._snapshot_at = now
        self.unsettled += 1
        settled = False

        async def commit() -> None:
            nonlocal settled
            if not settled:
                if pending:
                    await self._publish(pending, meta)
                settled = True
                self.unsettled -= 1
            if committed is not None and not committed.done():
                committed.set_result(None)

        return commit

    async def _publish(
        self, pending: list[Outgoing], meta: list[tuple[Timeframe, bool, int, bool]]
    ) -> None:
        await self.ctx.publisher.publish(pending)
        now_ms = time.time_ns() // 1_000_000
        m = self.metrics
        observe = m.latency.observe
        for _, _, close_ms, _ in meta:
            observe(max(0, now_ms - close_ms) / 1000)
        # counted once per timeframe of the batch: a counter's lock per vector is not free
        for (tf, warming), n in collections.Counter((x[0], x[1]) for x in meta).items():
            m.by_tf[tf, warming].inc(n)
        revised = sum(x[3] for x in meta)
        if revised:
            m.revisions_w.inc(revised)

    async def flush(self) -> None:
        """Seal and commit at once (start-up)."""
        await self.seal()()

    async def _take(self, taking: Snapshot, committed: asyncio.Future[None]) -> None:
        """Pickle the snapshot a few series at a time between batches, then save it once
        the commit of the batch it was taken after is done."""
        try:
            while not taking.step(SNAPSHOT_STEP):  # noqa: ASYNC110 - a turn, not a wait
                await asyncio.sleep(0)  # the candles go on meanwhile
        finally:
            self.builder.end_snapshot()
        await committed
        # every series is pickled: what is left is copying bytes, in turns with the loop
        data = await asyncio.to_thread(taking.data)
        await self._save(data)

    async def saved(self) -> None:
        """The snapshot on its way, done."""
        if self._saving is not None:
            await self._saving

    def drop_snapshot(self) -> None:
        """Stopping with commits not done: the snapshot on its way would wait for ever."""
        if self._saving is not None:
            self._saving.cancel()

    async def snapshot(self) -> None:
        """Save the state now; only when every effect of it is durable (a clean stop)."""
        assert not self.pending
        assert not self.unsettled
        assert not self.owed
        await self.saved()
        await self._save(self.builder.snapshot(self.applied_seq, self.context))

    async def _save(self, state: bytes) -> None:
        try:
            store = await self.ctx.js.object_store(self._bucket)
            await store.put(self._key, state)
        except Exception as exc:  # a missed snapshot costs replay time, nothing else
            log.warning("%s: snapshot not saved: %r", NAME, exc)

    async def restore(self, stream: str) -> None:
        """Load the snapshot and rebuild every series from the stream after it (from its
        start without one), publishing again what was not acked and is not on FEATURES yet."""
        js = self.ctx.js
        try:  # made by ops (R3 on a cluster), or here with the defaults
            store = await js.object_store(self._bucket)
        except BucketNotFoundError:
            store = await js.create_object_store(self._bucket)
        info = await js.consumer_info(stream, self.settings.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        delivered = info.delivered.stream_seq if info.delivered else 0
        held = await js.stream_info(stream)
        self.context = {
            "stream": stream,
            # a stream deleted and made again numbers its messages from 1 again
            "stream created": held.created.isoformat() if held.created else "",
            "durable": self.settings.durable,
            # a larger candle is a dead letter, not in the state
            "max payload bytes": str(self.settings.max_payload_bytes),
        }
        if delivered == 0:
            return
        try:
            data: bytes | None = (await store.get(self._key)).data
        except NotFoundError:
            data = None
        unusable = self._load(data, delivered, held.state.first_seq)
        if unusable is not None:
            log.warning(
                "%s: %s; every series rebuilt from the first candle CANDLES holds", NAME, unusable
            )
        first = self.applied_seq + 1
        read = 0
        if first <= delivered:
            read = await self._replay(stream, first, delivered, live_from=floor + 1)
        self.metrics.warmup_w.inc(read)
        output = stream_name(FEATURES, namespace=self.settings.namespace)
        stored = await stored_already(self.ctx.js, output, self.pending)
        if stored:
            self.pending = [o for i, o in enumerate(self.pending) if i not in stored]
            self.pending_meta = [m for i, m in enumerate(self.pending_meta) if i not in stored]
        log.info(
            "%s: %d series rebuilt from %d candles from seq %d (%s) up to seq %d, "
            "output from seq %d (%d vectors on %s already)",
            NAME,
            len(self.builder.series),
            read,
            first,
            "the stream's start" if unusable else "after the snapshot",
            delivered,
            floor + 1,
            len(stored),
            output,
        )
        await self.flush()
        self.applied_seq = max(self.applied_seq, delivered)

    def _load(self, data: bytes | None, delivered: int, first_held: int) -> str | None:
        """Take the snapshot's state; why not, if it is not usable."""
        if not data:
            return "no snapshot"
        try:
            builder, seq = Builder.restore(
                DEFAULT, self.settings.revision_depth, data, self.context
            )
        except SnapshotMismatch as exc:
            return f"snapshot not usable: {exc}"
        if seq > delivered:
            return f"snapshot of seq {seq}, past the consumer's last delivered seq {delivered}"
        if first_held > seq + 1:
            return (
                f"snapshot of seq {seq}, but the stream no longer holds seq {seq + 1} "
                f"(it starts at seq {first_held})"
            )
        self.builder, self.applied_seq = builder, seq
        return None

    async def _replay(self, stream: str, first: int, last: int, *, live_from: int) -> int:
        return await warm_up(
            self.ctx,
            stream,
            Codec(Candle, max_bytes=self.settings.max_payload_bytes),
            self.settings,
            feed_symbol=feed_symbol,
            last=last,
            live_from=live_from,
            desc=f"{NAME} warm-up",
            apply=lambda d, output: self.apply(None, d, output=output),
            first=first,
        )


def bucket_name(namespace: str | None) -> str:
    return STATE_BUCKET if namespace is None else f"ns-{namespace}-{STATE_BUCKET}"


def build(settings: Settings) -> Worker[Candle]:
    stream = stream_name(CANDLES, namespace=settings.namespace)
    worker: Worker[Candle] = Worker(
        NAME,
        stream=stream,
        durable=settings.durable,
        codec=Codec(Candle, max_bytes=settings.max_payload_bytes),
        settings=settings,
        accept=settings.acceptor(feed_symbol),
        in_order=True,
    )
    metrics = Metrics(worker)  # once: a start-up step that failed is tried again

    @worker.on_startup
    async def start(ctx: Context) -> None:
        consumers = await own_durables(ctx.js, settings)
        await ensure(ctx.js, stream_specs(namespace=settings.namespace), consumers)
        features = Features(settings, ctx, metrics)
        await features.restore(stream)
        ctx.state["features"] = features

    @worker.on_shutdown
    async def stop(ctx: Context) -> None:
        features: Features | None = ctx.state.get("features")
        if features is None:
            return
        settled = not features.pending and not features.unsettled and not features.owed
        if settled and not worker.failed:
            await features.saved()
            await features.snapshot()
        else:
            features.drop_snapshot()

    @worker.handler
    async def on_candles(batch: Batch[Candle], ctx: Context) -> Commit:
        features: Features = ctx.state["features"]
        for i, d in enumerate(batch.items, 1):
            features.apply(batch, d, output=True)
            if not i % 64:
                await asyncio.sleep(0)  # let the previous batch's publishes and acks move on
        return features.seal()

    return worker


def main() -> int:
    run_until_signalled(build(load(Settings)))
    return 0
