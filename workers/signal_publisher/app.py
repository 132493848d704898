"""signal-publisher: scores -> trading signals, by a declarative policy.

consume SCORES (Score) -> ``Book`` (per feed/symbol/timeframe state, ``policy.decide``) ->
Signal published to SIGNALS with ``Nats-Msg-Id`` = its deterministic id, before the scores
are acked.

The policy comes from the file in ``TICKWIRE_SIGNAL_POLICY_FILE`` (or the defaults) and is
replaced by the KV entry ``policy`` of bucket ``signal-policy`` whenever that changes; a
policy that does not validate is refused with one log line and a metric, and the one in
force stays.

State comes from history, as in feature-builder: on start SCORES is read again from its
first message up to the last one the durable consumer delivered, through the same
decisions; after the ack floor the signals are published again, identically, but for those
SIGNALS holds already (a process down longer than the duplicate window would otherwise
send subscribers a signal twice). Then each series takes the side of its last signal where that differs
(the policy changed since, or SCORES no longer holds the entry): subscribers hold what they
were told, and the series' exit must reach them. The last signal is that of the latest
candle, not the last one published (``state.last_words``). It is also kept in the KV bucket
``signal-sides``, by this worker and by ``tickwire rebuild``, for when SIGNALS no longer has
it; a series told nothing holds no side.

A score ``tickwire rebuild`` published (``rebuild`` > 0) is acked and left out of the
state: the rebuild makes the signals that follow from it itself.

The same process turns a subscriber's exhausted deliveries into dead letters, from its
durable on ADVISORIES (``workers.signal_publisher.delivery``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, ClassVar, Final

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from prometheus_client import Counter, Gauge
from pydantic import Field, field_validator

from contracts import subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import Score, Side, Signal
from contracts.streams import (
    SCORES,
    SIGNAL_PUBLISHER,
    SIGNALS,
    ensure,
    exhausted_deliveries,
    stream_name,
    stream_specs,
)
from workers.runtime.history import warm_up
from workers.runtime.partition import PartitionedSettings, own_durables
from workers.runtime.publish import Outgoing, stored_already
from workers.runtime.settings import load
from workers.runtime.worker import Batch, Commit, Context, Delivery, Worker, run_until_signalled
from workers.signal_publisher.delivery import Exhausted
from workers.signal_publisher.policy import (
    POLICY_BUCKET,
    POLICY_KEY,
    SIDES_BUCKET,
    Policy,
    PolicyError,
    kv_bucket,
    parse_policy,
    read_policy,
)
from workers.signal_publisher.state import Book, Key, Refusal, last_words, side_key, supersedes

log = logging.getLogger(__name__)

NAME: Final = SIGNAL_PUBLISHER
REMEMBERED_REFUSALS: Final = 100_000


class Settings(PartitionedSettings):
    worker: ClassVar[str] = NAME

    signal_policy_file: Path | None = None
    """TOML or JSON policy; the defaults of ``policy.Rule`` when unset."""
    signal_policy_bucket: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = POLICY_BUCKET
    """KV bucket whose ``policy`` entry replaces the file's policy at run time."""
    revision_depth: Annotated[int, Field(ge=1, le=1000)] = 8
    """Candles of a series a revision may still correct."""
    allowed_lateness_s: Annotated[float, Field(ge=0)] = 60.0
    """candle-ingest's (the same variable): a revision, and so a correction, comes up to
    this long after its candle's close, and a correction stays valid this much longer."""
    max_payload_bytes: Annotated[int, Field(gt=0)] = 64 * 1024

    @field_validator("signal_policy_file")
    @classmethod
    def _readable_policy(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                read_policy(value)
            except PolicyError as exc:
                raise ValueError(str(exc)) from None
        return value

    def policy(self) -> Policy:
        return Policy() if self.signal_policy_file is None else read_policy(self.signal_policy_file)

    @property
    def bucket(self) -> str:
        """The policy bucket; a replay namespace has its own."""
        return kv_bucket(self.signal_policy_bucket, self.namespace)

    @property
    def sides_bucket(self) -> str:
        """The bucket of each series' last signal; a replay namespace has its own."""
        return kv_bucket(SIDES_BUCKET, self.namespace)


def feed_symbol(subject: str) -> str:
    """``<feed>.<symbol token>`` of a score subject: a symbol's timeframes stay together."""
    return ".".join(subject.rsplit(".", 3)[-3:-1])


class Metrics:
    def __init__(self, worker: Worker[Score]) -> None:
        r, w = worker.metrics.registry, worker.name
        self.signals = Counter(
            "tickwire_signals_out",
            "Signals published, by side and whether they correct an earlier one",
            ["worker", "side", "correction"],
            registry=r,
        )
        self.policy_updates = Counter(
            "tickwire_signal_policy_updates",
            "Policy updates from the KV entry, by outcome: applied, refused, deleted (back to"
            " the file's policy or the defaults)",
            ["worker", "outcome"],
            registry=r,
        )
        self.series = Gauge(
            "tickwire_signal_series",
            "Series (feed, symbol, timeframe) held",
            ["worker"],
            registry=r,
        )
        self.warmup = Counter(
            "tickwire_signal_warmup_scores",
            "Scores read from the stream at start to rebuild state",
            ["worker"],
            registry=r,
        )
        self.tick_latency = worker.metrics.latency.labels(w, "tick_to_signal")
        self.close_latency = worker.metrics.latency.labels(w, "close_to_signal")
        self.by_side = {
            (side, fix): self.signals.labels(w, side.value, str(fix).lower())
            for side in Side
            for fix in (False, True)
        }
        self.applied = self.policy_updates.labels(w, "applied")
        self.refused = self.policy_updates.labels(w, "refused")
        self.deleted = self.policy_updates.labels(w, "deleted")
        self.series_w = self.series.labels(w)
        self.warmup_w = self.warmup.labels(w)


class Signals:
    """The book plus what it owes: signals decided but not yet published."""

    def __init__(self, settings: Settings, ctx: Context, policy: Policy, metrics: Metrics) -> None:
        self.settings = settings
        self.ctx = ctx
        self.book = Book(policy, settings.revision_depth, round(settings.allowed_lateness_s * 1000))
        self.file_policy = policy
        """In force while the KV entry is absent."""
        self.metrics = metrics
        self.applied_seq = 0
        self.pending: list[Outgoing] = []
        self.pending_meta: list[tuple[Signal, Score]] = []
        self.refused: collections.OrderedDict[int, Refusal] = collections.OrderedDict()
        """Refusals by stream seq, for the score coming again."""
        self.said: dict[Key, Signal] = {}
        """The last word of each series in the sides bucket, as written from here."""

    def apply(self, batch: Batch[Score] | None, d: Delivery[Score], *, output: bool) -> None:
        seq = d.stream_seq
        if seq <= self.applied_seq:  # in the state already
            refusal = self.refused.get(seq)
            if refusal is not None and batch is not None:
                batch.reject(d, *refusal)
            return
        score = d.value
        self.applied_seq = seq
        if score.rebuild:  # ``tickwire rebuild`` decides on its scores itself
            return
        result = self.book.apply(score, d.msg.subject)
        if isinstance(result, Refusal):
            if output:
                self.refused[seq] = result
                if len(self.refused) > REMEMBERED_REFUSALS:
                    self.refused.popitem(last=False)
                if batch is not None:
                    batch.reject(d, *result)
            return
        if not output:
            return
        ns = self.settings.namespace
        for signal in result:
            subject = subjects.signals(signal.feed, signal.symbol, signal.tf, namespace=ns)
            self.pending.append(Outgoing(subject, encode(signal), signal.signal_id))
            self.pending_meta.append((signal, score))

    def seal(self, *, live: bool = True, stored: Collection[int] = ()) -> Commit:
        """The signals pending now, as the commit that publishes them; then the last of each
        series into the sides bucket, which keeps it after SIGNALS no longer does.
        ``stored``: the places among them of those SIGNALS holds already, left out (their
        last words are written again)."""
        pending, meta = self.pending, self.pending_meta
        self.pending, self.pending_meta = [], []
        self.metrics.series_w.set(len(self.book.series))
        # a correction for an earlier candle is no later word than a later candle's signal
        # (the book sends the side the series holds last, so its side is the same)
        words = [
            s
            for key, s in last_words(s for s, _ in meta).items()
            if (held := self.said.get(key)) is None or supersedes(s, held)
        ]
        # at the seal, not the commit: commits run in seal order, and one that fails stops
        # the worker, whose start reads the bucket again
        self.said.update(((s.feed, s.symbol, s.tf), s) for s in words)
        if stored:
            pending = [o for i, o in enumerate(pending) if i not in stored]
            meta = [m for i, m in enumerate(meta) if i not in stored]
        prefix = f"$KV.{self.settings.sides_bucket}."
        pending += [
            Outgoing(f"{prefix}{side_key(s)}", encode(s), f"side|{s.signal_id}") for s in words
        ]

        async def commit() -> None:
            if not pending:
                return
            await self.ctx.publisher.publish(pending)
            now_ms = time.time_ns() // 1_000_000
            m = self.metrics
            for signal, score in meta:
                m.by_side[signal.side, signal.corrects is not None].inc()
                if live:
                    m.tick_latency.observe(max(0, now_ms - score.last_tick_ms) / 1000)
                    m.close_latency.observe(max(0, now_ms - score.close_time_ms) / 1000)

        return commit

    def use(self, data: bytes) -> None:
        """A policy update from the KV entry: applied, or refused with the old one kept."""
        try:
            policy = parse_policy(data)
        except PolicyError as exc:
            self.metrics.refused.inc()
            log.error("%s: policy update refused, keeping the one in force: %s", NAME, exc)
            return
        self.book.policy = policy
        self.metrics.applied.inc()
        log.info("%s: policy updated", NAME)

    def use_file(self) -> None:
        """The KV entry was deleted: the policy of the file (or the defaults) again, as a
        restart would have it."""
        self.book.policy = self.file_policy
        self.metrics.deleted.inc()
        log.info("%s: policy entry deleted; the file's policy (or the defaults) again", NAME)

    async def restore(self, stream: str) -> None:
        """Rebuild every series from the stream, publishing again what was not acked and is
        not on SIGNALS yet."""
        info = await self.ctx.js.consumer_info(stream, self.settings.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        delivered = info.delivered.stream_seq if info.delivered else 0
        if delivered == 0:
            return
        read = await self._replay(stream, delivered, live_from=floor + 1)
        self.metrics.warmup_w.inc(read)
        output = stream_name(SIGNALS, namespace=self.settings.namespace)
        stored = await stored_already(self.ctx.js, output, self.pending)
        log.info(
            "%s: state rebuilt from %d scores up to seq %d (%d signals owed on %s already)",
            NAME,
            read,
            delivered,
            len(stored),
            output,
        )
        await self.seal(live=False, stored=stored)()
        self.applied_seq = max(self.applied_seq, delivered)
        await self._told()

    async def _told(self) -> None:
        """Each series holds the side subscribers were told last.

        Scores decided again under the policy in force now can end on another side than the
        signals did under an earlier one (the KV entry changed meanwhile), and SCORES keeps
        less than SIGNALS (a D1 position entered weeks ago). The last signal of each series
        is what subscribers act on: the later word (``last_words``) of the last one on SIGNALS
        and the one in the sides bucket, which keeps it once SIGNALS no longer does (a
        position held longer than a month), and which a rebuild's correction for an earlier
        candle, last on SIGNALS, does not replace. Where it says another side the
        series takes that side, from that signal's candle: its exit then comes as it would
        have. A series with neither was never told a side, and holds none.
        """
        ns = self.settings.namespace
        bucket = self.settings.sides_bucket
        kept = await self._last_signals(f"KV_{bucket}", f"$KV.{bucket}.>")
        sent = await self._last_signals(
            stream_name(SIGNALS, namespace=ns), subjects.wildcard(subjects.SIGNALS, namespace=ns)
        )
        last = last_words([*kept.values(), *sent.values()])
        self.said.update(last)
        taken = sum(self.book.told(signal) for signal in last.values())
        taken += sum(self.book.untold(key) for key in list(self.book.series) if key not in last)
        if taken:
            log.warning(
                "%s: %d of %d series take the side their last signal gave subscribers, not the"
                " one the scores give under the policy in force now",
                NAME,
                taken,
                len(self.book.series),
            )

    async def _last_signals(self, stream: str, wildcard: str) -> dict[Key, Signal]:
        """The last signal of each series of this instance that ``stream`` holds one for."""
        js = self.ctx.js
        info = await js.stream_info(stream, subjects_filter=wildcard)
        accept = self.settings.acceptor(feed_symbol)
        mine = [s for s in info.state.subjects or {} if accept is None or accept(s)]
        codec: Codec[Signal] = Codec(Signal, max_bytes=self.settings.max_payload_bytes)
        out: dict[Key, Signal] = {}
        for at in range(0, len(mine), 100):
            raws = await asyncio.gather(*(js.get_last_msg(stream, s) for s in mine[at : at + 100]))
            for raw in raws:
                try:
                    signal = codec.decode(raw.data or b"")
                except ContractError as exc:  # not one of ours: it told subscribers nothing
                    log.warning("%s: last message on %s is no signal: %s", NAME, raw.subject, exc)
                    continue
                out[signal.feed, signal.symbol, signal.tf] = signal
        return out

    async def _replay(self, stream: str, last: int, *, live_from: int) -> int:
        return await warm_up(
            self.ctx,
            stream,
            Codec(Score, max_bytes=self.settings.max_payload_bytes),
            self.settings,
            feed_symbol=feed_symbol,
            last=last,
            live_from=live_from,
            desc=f"{NAME} warm-up",
            apply=lambda d, output: self.apply(None, d, output=output),
        )


async def open_bucket(js: JetStreamContext, bucket: str, history: int) -> KeyValue:
    """The bucket: made by ops (R3 on a cluster), or here with the defaults."""
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, history=history)


async def keep_side(kv: KeyValue, signal: Signal) -> bool:
    """``signal`` into the sides bucket ``kv`` unless the entry there is a later word on its
    series (``last_words``); True when it was written. Compare-and-set: a signal-publisher
    writing a later one meanwhile is not overwritten."""
    key = side_key(signal)
    codec: Codec[Signal] = Codec(Signal)
    while True:
        try:
            entry: KeyValue.Entry | None = await kv.get(key)
        except KeyNotFoundError:  # never written, or deleted
            entry = None
        if entry is not None and entry.value:
            with contextlib.suppress(ContractError):  # not a signal: it is replaced
                if not supersedes(signal, codec.decode(entry.value)):
                    return False
        try:
            if entry is None:
                await kv.create(key, encode(signal))
            else:
                await kv.update(key, encode(signal), last=entry.revision)
        except KeyWrongLastSequenceError:
            continue  # written meanwhile: decide again against that
        return True


async def _watch_policy(watcher: KeyValue.KeyWatcher, signals: Signals) -> None:
    async for entry in watcher:
        if entry is None:
            continue
        if entry.operation in (KV_DEL, KV_PURGE):
            signals.use_file()
        else:  # an empty value too: refused as a policy that does not parse, and counted
            signals.use(entry.value or b"")


async def _unwatch(watcher: KeyValue.KeyWatcher, watching: asyncio.Future[None] | None) -> None:
    """End the policy watch: the task first, so its end is not taken for a failure."""
    if watching is not None:
        watching.cancel()
        with contextlib.suppress(BaseException):
            await watching
    with contextlib.suppress(Exception):
        await watcher.stop()  # type: ignore[no-untyped-call]


def build(settings: Settings) -> Worker[Score]:
    stream = stream_name(SCORES, namespace=settings.namespace)
    worker: Worker[Score] = Worker(
        NAME,
        stream=stream,
        durable=settings.durable,
        codec=Codec(Score, max_bytes=settings.max_payload_bytes),
        settings=settings,
        accept=settings.acceptor(feed_symbol),
        in_order=True,
    )
    metrics = Metrics(worker)  # once: a start-up step that failed is tried again

    @worker.on_startup
    async def start(ctx: Context) -> None:
        ns = settings.namespace
        consumers = [*await own_durables(ctx.js, settings), exhausted_deliveries(namespace=ns)]
        await ensure(ctx.js, stream_specs(namespace=ns), consumers)
        signals = Signals(settings, ctx, settings.policy(), metrics)
        await open_bucket(ctx.js, settings.sides_bucket, history=1)
        kv = await open_bucket(ctx.js, settings.bucket, history=5)
        watcher = await kv.watch(POLICY_KEY)
        watching: asyncio.Future[None] | None = None
        try:
            # the entry as it stands comes first, then a marker: in force before any score
            while (entry := await watcher.updates(settings.publish_timeout_s)) is not None:  # type: ignore[no-untyped-call]
                if entry.value:
                    signals.use(entry.value)
            watching = asyncio.ensure_future(_watch_policy(watcher, signals))
            watching.add_done_callback(lambda t: _stopped(t, worker, "policy watch"))
            await signals.restore(stream)
            exhausted = Exhausted(
                ctx.nc, ctx.js, ctx.publisher, ctx.metrics, ns, expires_s=settings.pull_expires_s
            )
            await exhausted.start()
        except BaseException:
            await _unwatch(watcher, watching)  # the step tried again watches anew
            raise
        assert exhausted.task is not None
        exhausted.task.add_done_callback(
            lambda t: None if exhausted.stopping else _stopped(t, worker, "dead-lettering")
        )
        ctx.state.update(signals=signals, watcher=watcher, watching=watching, exhausted=exhausted)

    @worker.on_shutdown
    async def stop(ctx: Context) -> None:
        if "signals" not in ctx.state:
            return
        await ctx.state["exhausted"].stop()
        await _unwatch(ctx.state["watcher"], ctx.state["watching"])

    @worker.handler
    async def on_scores(batch: Batch[Score], ctx: Context) -> Commit:
        signals: Signals = ctx.state["signals"]
        for i, d in enumerate(batch.items, 1):
            signals.apply(batch, d, output=True)
            if not i % 64:
                await asyncio.sleep(0)
        return signals.seal()

    return worker


def _stopped(task: asyncio.Future[None], worker: Worker[Score], what: str) -> None:
    """A side task ended on its own: the policy watch (without it the policy could go
    stale) or the dead-lettering of exhausted deliveries. Stop, to be restarted whole."""
    if task.cancelled():
        return
    log.error("%s: %s ended (%r); stopping", NAME, what, task.exception())
    worker.stop()


def main() -> int:
    run_until_signalled(build(load(Settings)))
    return 0
