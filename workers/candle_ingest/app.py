"""candle-ingest: ticks -> M1..D1 candles by event time, into QuestDB and CANDLES.

consume TICKS (Tick, TickBatch, Bar, Watermark) -> ``Aggregator`` -> candles, published to
CANDLES with ``Nats-Msg-Id`` = natural key + revision and upserted into QuestDB, before the
ticks are acked.

Exactly once across crashes: the aggregator's state is snapshotted (object store) together
with the stream sequence it covers, only when every candle it emitted is durable. On start
the snapshot is loaded and the ticks between it and the consumer's ack floor are replayed
with output suppressed (their candles are durable already); ticks after the floor are
processed again, so candles a crash left half written are written again, identically, and
de-duplicated by upsert key in QuestDB. To CANDLES go only those it does not hold yet: its
duplicate window would not drop them once the process was down longer than it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Collection, Sequence
from typing import Annotated, ClassVar, Final, Protocol

import msgspec
from nats.js.errors import BucketNotFoundError, NotFoundError
from prometheus_client import Counter, Gauge
from pydantic import Field, field_validator, model_validator

from contracts import subjects
from contracts.codec import UNKNOWN_TYPE, ContractError, encode
from contracts.messages import (
    Bar,
    Candle,
    Tick,
    TickBatch,
    TickInput,
    TickRow,
    Timeframe,
    Watermark,
)
from contracts.streams import (
    CANDLE_INGEST,
    CANDLES,
    TICKS,
    ensure,
    stream_name,
    stream_specs,
)
from db.questdb import namespace_prefix
from workers.candle_ingest.aggregate import (
    Aggregator,
    AggregatorConfig,
    PriceSource,
    SnapshotMismatch,
)
from workers.candle_ingest.sink import QuestDBSink
from workers.candle_ingest.validate import FUTURE_TIME, SalvagedBatch, TicksCodec, check_bar
from workers.runtime.errors import ReplayFailed, TransientError
from workers.runtime.partition import PartitionedSettings, own_durables
from workers.runtime.publish import Outgoing, stored_already
from workers.runtime.pull import read_stream
from workers.runtime.settings import load
from workers.runtime.worker import (
    Batch,
    Commit,
    Context,
    Delivery,
    Worker,
    run_until_signalled,
)

log = logging.getLogger(__name__)

NAME: Final = CANDLE_INGEST
REPLAY_SUFFIX: Final = "-replay"
STATE_BUCKET: Final = "candle-ingest-state"
"""Object store of the open-candle snapshots (a replay namespace's: ``ns-<name>-...``)."""
UNKNOWN_SYMBOL: Final = "unknown_symbol"
OPEN_COUNT_EVERY_S: Final = 1.0
"""How often the open-candles gauge is counted again."""


class Settings(PartitionedSettings):
    worker: ClassVar[str] = NAME

    commit_depth: Annotated[int, Field(ge=1, le=64)] = 4
    """Batches on their way to QuestDB at once: candles are published as each batch is
    handled, and QuestDB writes grow rather than queue when it is slow."""
    questdb_ilp: str = "http::addr=127.0.0.1:9000;"
    questdb_http: str = "http://127.0.0.1:9000"
    price: PriceSource = PriceSource.BID
    day_start_minutes: Annotated[int, Field(ge=0, lt=1440)] = 0
    """UTC time of day (minutes) at which the broker's day starts: 1320 for UTC+2 servers."""
    server_tz: str | None = None
    """The time zone the broker's server clock follows (``America/New_York+7``,
    ``Europe/Athens``): D1 and H4 then start at its midnight all year, over its changes
    between UTC+2 and UTC+3; instead of ``day_start_minutes``."""
    allowed_lateness_s: Annotated[float, Field(ge=0)] = 60.0
    close_delay_s: Annotated[float, Field(ge=0)] = 0.0
    idle_close: bool = True
    """Close an idle symbol's candles by publishing a Watermark (in a replay namespace off
    unless set)."""
    idle_grace_s: Annotated[float, Field(gt=0)] = 5.0
    idle_silence_s: Annotated[float, Field(gt=0)] = 60.0
    """A symbol with no tick taken for this long whose ticks ran more than the allowed
    lateness behind the wall clock (a backfill that ended) is idle by the wall clock."""
    max_future_skew_s: Annotated[float, Field(gt=0)] = 60.0
    max_payload_bytes: Annotated[int, Field(gt=0)] = 1 << 20
    snapshot_interval_s: Annotated[float, Field(gt=0)] = 5.0
    symbols: str = ""
    """Comma-separated symbols the EAs may send, ``SYMBOL`` for every feed or
    ``feed/SYMBOL`` for one; empty: any legal symbol. Others are dead letters
    ``unknown_symbol``, so that a misconfigured EA cannot open thousands of series."""

    @field_validator("symbols")
    @classmethod
    def _legal_symbols(cls, value: str) -> str:
        for item in filter(None, (x.strip() for x in value.split(","))):
            feed, _, symbol = item.rpartition("/")
            if feed:
                subjects.check_name(feed, "feed")
            subjects.escape(symbol)
        return value

    @field_validator("server_tz")
    @classmethod
    def _a_regular_zone(cls, value: str | None) -> str | None:
        if value is None or not value.strip():  # TICKWIRE_SERVER_TZ= is not set
            return None
        return AggregatorConfig(server_tz=value).server_tz  # a zone Periods can follow

    @model_validator(mode="after")
    def _one_day_start(self) -> Settings:
        if self.server_tz is not None and self.day_start_minutes:
            raise ValueError("set TICKWIRE_SERVER_TZ or TICKWIRE_DAY_START_MINUTES, not both")
        return self

    @model_validator(mode="after")
    def _replays_close_by_their_watermarks(self) -> Settings:
        """In a replay namespace the copied range carries live's watermarks; a wall-clock
        timer there would close candles mid-replay. Off unless set explicitly."""
        if self.namespace is not None and "idle_close" not in self.model_fields_set:
            object.__setattr__(self, "idle_close", False)
        return self

    def allowed_symbols(self) -> frozenset[str] | None:
        """``SYMBOL`` and ``feed/SYMBOL`` entries, or None when every symbol is allowed."""
        items = frozenset(filter(None, (x.strip() for x in self.symbols.split(","))))
        return items or None

    def aggregator_config(self) -> AggregatorConfig:
        return AggregatorConfig(
            price=self.price,
            day_start_ms=self.day_start_minutes * 60_000,
            allowed_lateness_ms=round(self.allowed_lateness_s * 1000),
            close_delay_ms=round(self.close_delay_s * 1000),
            server_tz=self.server_tz,
        )


def feed_symbol(subject: str) -> str:
    """``<feed>.<symbol token>`` of a tick subject: what partitions are made of."""
    return ".".join(subject.rsplit(".", 2)[-2:])


class Metrics:
    """candle-ingest's own series, beside the runtime's."""

    def __init__(self, worker: Worker[TickInput]) -> None:
        r, w = worker.metrics.registry, worker.name
        self.ticks = Counter(
            "tickwire_ticks_in", "Ticks by outcome", ["worker", "outcome"], registry=r
        )
        self.candles = Counter(
            "tickwire_candles_out", "Candles published by timeframe", ["worker", "tf"], registry=r
        )
        self.revisions = Counter(
            "tickwire_candle_revisions", "Candles republished as revisions", ["worker"], registry=r
        )
        self.gaps = Counter(
            "tickwire_tick_sequence_gaps",
            "Ticks missing in the EA's per-symbol sequence when a later number came",
            ["worker"],
            registry=r,
        )
        self.gaps_filled = Counter(
            "tickwire_tick_sequence_gaps_filled",
            "Missing ticks that came after all, out of order (gaps minus these never came)",
            ["worker"],
            registry=r,
        )
        self.open = Gauge(
            "tickwire_open_candles", "Candles held open in memory", ["worker"], registry=r
        )
        self.late_shares = Counter(
            "tickwire_bar_shares_too_late",
            "Bars taken whose larger candle the ticks had published past the allowed lateness: "
            "it keeps what it had",
            ["worker"],
            registry=r,
        )
        self.accepted = self.ticks.labels(w, "accepted")
        self.duplicate = self.ticks.labels(w, "duplicate")
        self.rejected = self.ticks.labels(w, "rejected")
        self.revisions_w = self.revisions.labels(w)
        self.gaps_w = self.gaps.labels(w)
        self.filled_w = self.gaps_filled.labels(w)
        self.open_w = self.open.labels(w)
        self.late_shares_w = self.late_shares.labels(w)
        self.latency = worker.metrics.latency.labels(w, "tick_to_candle")
        self.by_tf = {tf.value: self.candles.labels(w, tf.value) for tf in Timeframe}


class Ingest:
    """The aggregator plus what it owes: candles emitted but not yet durable."""

    def __init__(
        self, settings: Settings, ctx: Context, sink: QuestDBSink, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.sink = sink
        self.agg = Aggregator(settings.aggregator_config())
        self.pending: list[Candle] = []
        self.trigger_ms: list[int] = []
        self.metrics = metrics
        self.namespace = settings.namespace
        self._snapshot_at = time.monotonic()
        self._counted_open_at = -OPEN_COUNT_EVERY_S
        self.counts: collections.Counter[str] = collections.Counter()
        """Tick outcomes since the last flush, added to the metrics there."""
        self._skew_ms = round(settings.max_future_skew_s * 1000)
        self._silence_ms = round(settings.idle_silence_s * 1000)
        self._late_ms = round(settings.allowed_lateness_s * 1000)
        self._periods = self.agg.periods
        self._allowed = settings.allowed_symbols()
        self.heard: dict[tuple[str, str], int] = {}
        """When this worker last took ticks of each symbol (wall clock, ms). How far the
        symbol's watermark was then behind the time TICKS stored them is in the state
        (``Aggregator.lag_ms``): its own clock runs that far behind the wall clock
        (``clock``), after a restart too."""
        self.started_ms = time.time_ns() // 1_000_000
        self._marks: dict[tuple[str, str], int] = {}
        """The time of the last Watermark published for each symbol by ``close_idle``."""
        self.recovered: dict[int, Recorded] = {}
        """Refusals made while recovering, by stream seq, until the message comes again."""
        self._bucket = _bucket_name(settings.namespace)
        self._key = settings.durable
        self.unsettled = 0
        """Commits sealed but not (yet) durable: no snapshot of the live state meanwhile."""
        self._sealed = 0
        self._written = 0
        """Seals whose candles are all in QuestDB, by number."""
        self._unwritten: list[Candle] = []
        self._unwritten_upto = 0
        self._published: asyncio.Future[None] = _done()
        """Set once the candles of the last seal are on CANDLES."""
        self._publishing: set[asyncio.Future[None]] = set()

    # --- applying input ---------------------------------------------------------------

    def _unknown(self, m: TickInput) -> tuple[str, str] | None:
        allowed = self._allowed
        if allowed is None or m.symbol in allowed or f"{m.feed}/{m.symbol}" in allowed:
            return None
        return UNKNOWN_SYMBOL, f"{m.feed}/{m.symbol} is not in TICKWIRE_SYMBOLS"

    def apply(self, batch: Refuser | None, d: Delivery[TickInput]) -> None:
        """Fold one message into the state; ``batch`` None: refusals are already recorded."""
        seq, stored = d.position()
        agg = self.agg
        if seq <= agg.last_stream_seq:
            # already in the state: a redelivery after a restart, or of a delivery lost on
            # the way and read back (the runtime hands messages over in stream order); what
            # recovery refused is dead-lettered now, with the message it belongs to
            recorded = self.recovered.pop(seq, None)
            if recorded is not None and batch is not None:
                recorded.replay_onto(batch, d)
            return
        m = d.value
        problem = _subject_problem(d.msg.subject, m) or self._unknown(m)
        if problem is not None:
            if batch is not None:
                batch.reject(d, *problem)
        elif isinstance(m, SalvagedBatch):  # some of its ticks did not decode
            self.counts["rejected"] += len(m.refused)
            if batch is not None:
                for place, raw, why, detail in m.refused:
                    batch.reject_part(d, place, raw, why, detail)
            self._ticks(batch, d, stored, m.feed, m.symbol, m.ticks, whole=False, index=m.index)
        elif isinstance(m, TickBatch):
            self._ticks(batch, d, stored, m.feed, m.symbol, m.ticks, whole=False)
        elif isinstance(m, Tick):
            self._ticks(batch, d, stored, m.feed, m.symbol, (m,), whole=True)
        elif isinstance(m, Bar):
            reason = check_bar(
                m,
                periods=self._periods,
                now_ms=stored,
                max_future_skew_ms=self._skew_ms,
            ) or agg.covered(m)
            if reason is None:
                self._emit(agg.add_bar(m), m.open_time_ms)
            elif batch is not None:
                detail = f"{m.feed} {m.symbol} {m.tf} open_time_ms={m.open_time_ms}"
                batch.reject(d, reason, detail)
        elif isinstance(m, Watermark):
            problem = _watermark_problem(d, m, stored, self._skew_ms)
            if problem is None:
                self._emit(agg.advance(m.feed, m.symbol, m.time_ms), m.time_ms)
            elif batch is not None:
                batch.reject(d, *problem)
        agg.last_stream_seq = seq

    def _ticks(
        self,
        batch: Refuser | None,
        d: Delivery[TickInput],
        stored: int,
        feed: str,
        symbol: str,
        rows: Sequence[Tick | TickRow],
        *,
        whole: bool,
        index: Sequence[int] = (),
    ) -> None:
        """The hot path: validate and fold the ticks; count once per message, not per tick.
        ``stored``: when TICKS stored the message (epoch ms)."""
        result = self.agg.add_rows(
            feed,
            symbol,
            rows,
            now_ms=stored,  # not the clock: a rebuild must refuse what was refused
            max_future_skew_ms=self._skew_ms,
            out=self.pending,
            out_times=self.trigger_ms,
        )
        if result.accepted:  # refused ticks say nothing of the symbol's clock
            wm = result.watermark
            if wm is not None:
                self.heard[feed, symbol] = time.time_ns() // 1_000_000
                self.agg.note_lag(feed, symbol, stored - wm)
        counts = self.counts
        counts["accepted"] += result.accepted
        counts["duplicate"] += result.duplicate
        counts["gap"] += result.gap
        if not result.refused:
            return
        counts["rejected"] += len(result.refused)
        if batch is None:
            return
        for i, reason in result.refused:
            t = rows[i]
            detail = f"{feed} {symbol} time_ms={t.time_ms} bid={t.bid} ask={t.ask}"
            if whole:
                batch.reject(d, reason, detail)
            else:  # by its place in the batch as sent
                place = index[i] if index else i
                batch.reject_part(d, place, msgspec.json.encode(t), reason, detail)

    def _emit(self, candles: list[Candle], trigger_ms: int) -> None:
        if candles:
            self.pending.extend(candles)
            self.trigger_ms.extend([trigger_ms] * len(candles))

    # --- making it durable ------------------------------------------------------------

    def seal(self, *, stored: Collection[int] = ()) -> Commit:
        """What the messages applied so far owe, as a commit the runtime runs in order.
        ``stored``: the places among the pending candles of those CANDLES holds already,
        written to QuestDB and not published.

        The candles pending now (and the state now, when a snapshot is due) are taken out
        of the ingest, so the next batch can be applied while this commit runs.

        - Publishing starts at once, in seal order: each seal's candles go to CANDLES as
          soon as those of the seal before are there, without waiting for QuestDB. A
          publish that fails is done again by its commit; later seals wait for it.
        - QuestDB gets, in one transaction per commit, every candle sealed and not yet
          written, its own and those of batches sealed since: when QuestDB is slow, its
          writes grow instead of queueing. Written in seal order, so the latest revision
          of a candle is the row left.
        - The commit returns once its candles are on CANDLES and in QuestDB; then the
          snapshot, if one was taken: a snapshot is saved only once every candle of the
          state it holds is durable (earlier commits finished first).
        """
        pending, triggers = self.pending, self.trigger_ms
        self.pending, self.trigger_ms = [], []
        m = self.metrics
        counts = self.counts
        if counts:
            m.accepted.inc(counts["accepted"])
            m.duplicate.inc(counts["duplicate"])
            m.rejected.inc(counts["rejected"])
            m.gaps_w.inc(counts["gap"])
            counts.clear()
        if self.agg.filled:
            m.filled_w.inc(self.agg.filled)
            self.agg.filled = 0
        if self.agg.late_shares:
            m.late_shares_w.inc(self.agg.late_shares)
            self.agg.late_shares = 0
        now = time.monotonic()
        if now - self._counted_open_at >= OPEN_COUNT_EVERY_S:
            # a walk over every series: once a second, not once a batch of one tick
            m.open_w.set(self.agg.open_candles())
            self._counted_open_at = now
        state = None
        # a snapshot must not cover refusals that are not dead letters yet
        if not self.recovered and (
            time.monotonic() - self._snapshot_at >= self.settings.snapshot_interval_s
        ):
            state = self.agg.snapshot()
            self._snapshot_at = time.monotonic()
        self.unsettled += 1
        self._sealed += 1
        number = self._sealed
        self._unwritten.extend(pending)
        self._unwritten_upto = number
        out = self._outgoing(pending)
        if stored:
            out = [o for i, o in enumerate(out) if i not in stored]
            pending = [c for i, c in enumerate(pending) if i not in stored]
            triggers = [t for i, t in enumerate(triggers) if i not in stored]
        early: asyncio.Future[None] | None = None
        published = self._published
        if out:
            before, published = published, asyncio.get_running_loop().create_future()
            self._published = published
            early = asyncio.ensure_future(
                self._publish_after(before, published, out, pending, triggers)
            )
            self._publishing.add(early)
            early.add_done_callback(self._publishing.discard)
        settled = False

        async def commit() -> None:
            nonlocal settled
            if not settled:
                if early is not None and not published.done():
                    # the early publish failed; every seal before this one is published
                    # (their commits finished), so publishing now keeps the order
                    await asyncio.wait({early})
                    if not published.done():
                        await self._publish(out, pending, triggers)
                        published.set_result(None)
                if self._written < number:
                    await self._write()
                settled = True
                self.unsettled -= 1
            if state is not None:
                await self._save(state)

        return commit

    async def flush(self, *, stored: Collection[int] = ()) -> None:
        """Seal and commit at once (start-up)."""
        await self.seal(stored=stored)()

    def _outgoing(self, pending: list[Candle]) -> list[Outgoing]:
        ns = self.namespace
        return [
            Outgoing(
                subjects.candles(c.feed, c.symbol, c.tf, namespace=ns),
                encode(c),
                f"{c.feed}|{c.symbol}|{c.tf.value}|{c.open_time_ms}|{c.revision}",
            )
            for c in pending
        ]

    async def _publish_after(
        self,
        before: asyncio.Future[None],
        published: asyncio.Future[None],
        out: list[Outgoing],
        pending: list[Candle],
        triggers: list[int],
    ) -> None:
        """Publish once the seal before is published; a failure is left to the commit."""
        await before
        try:
            await self._publish(out, pending, triggers)
        except TransientError as exc:
            log.info("%s: early publish failed (%s); the commit publishes again", NAME, exc)
        else:
            published.set_result(None)

    async def _publish(
        self, out: list[Outgoing], pending: list[Candle], triggers: list[int]
    ) -> None:
        """To CANDLES; raises TransientError (idempotent by message id: tried again)."""
        await self.ctx.publisher.publish(out)
        now_ms = time.time_ns() // 1_000_000
        m = self.metrics
        for c, trigger in zip(pending, triggers, strict=True):
            m.by_tf[c.tf.value].inc()
            if c.revision:
                m.revisions_w.inc()
            m.latency.observe(max(0, now_ms - trigger) / 1000)

    async def _write(self) -> None:
        """Every candle sealed and not yet in QuestDB, in one transaction; raises
        TransientError (the commit is tried again and writes them again)."""
        candles, upto = list(self._unwritten), self._unwritten_upto
        if candles:
            await self.sink.write(candles)
        del self._unwritten[: len(candles)]
        self._written = upto

    def cancel_publishing(self) -> None:
        """Stopping: early publishes still waiting for a seal that will not be published."""
        for task in list(self._publishing):
            task.cancel()

    async def snapshot(self) -> None:
        """Save the state now; only when every candle it emitted is durable."""
        assert not self.pending
        assert not self.unsettled
        await self._save(self.agg.snapshot())

    async def _save(self, state: bytes) -> None:
        try:
            store = await self.ctx.js.object_store(self._bucket)
            await store.put(self._key, state)
        except Exception as exc:  # a missed snapshot costs replay time, nothing else
            log.warning("%s: snapshot not saved: %r", NAME, exc)

    # --- start-up ---------------------------------------------------------------------

    async def restore(self, stream: str) -> None:
        """Load the snapshot and catch up, in stream order, with what a crash left behind.

        Up to the ack floor every effect is durable: those messages only rebuild the state.
        Messages delivered to the previous process but not acked are processed now, with
        output (de-duplicated where it was already written, and not published again where
        CANDLES holds it), before any newer message: the server would redeliver them only
        after their ack wait, behind newer ones.
        """
        js = self.ctx.js
        try:  # made by ops (R3 on a cluster), or here with the defaults
            store = await js.object_store(self._bucket)
        except BucketNotFoundError:
            store = await js.create_object_store(self._bucket)
        config = self.agg.config
        try:
            data = (await store.get(self._key)).data
        except NotFoundError:
            data = None
        if data:
            try:
                self.agg = Aggregator.restore(config, data)
            except SnapshotMismatch as exc:
                # the settings changed (timeframes, day start, lateness...): rebuild the state
                # from the start of the stream under the new ones, without output
                log.warning("%s: snapshot not usable (%s); rebuilding from the stream", NAME, exc)
        info = await js.consumer_info(stream, self.settings.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        delivered = info.delivered.stream_seq if info.delivered else 0
        start = self.agg.last_stream_seq
        if start < delivered:
            replayed = await self._replay(stream, start + 1, delivered, live_from=floor + 1)
            output = stream_name(CANDLES, namespace=self.namespace)
            stored = await stored_already(js, output, self._outgoing(self.pending))
            log.info(
                "%s: state rebuilt from seq %d to %d, output from %d (%d messages; %d candles"
                " on %s already)",
                NAME,
                start + 1,
                delivered,
                floor + 1,
                replayed,
                len(stored),
                output,
            )
            await self.flush(stored=stored)
        self.agg.last_stream_seq = max(self.agg.last_stream_seq, delivered)

    def _recorder(self, seq: int) -> Recorded:
        return self.recovered.setdefault(seq, Recorded())

    async def _replay(self, stream: str, first: int, last: int, *, live_from: int) -> int:
        codec = TicksCodec(max_bytes=self.settings.max_payload_bytes)
        accept = self.settings.acceptor(feed_symbol)
        done = 0
        # its own consumer, so that its NATS user may read that one and no other
        reading = read_stream(
            self.ctx.nc,
            self.ctx.js,
            stream,
            consumer=self.settings.durable + REPLAY_SUFFIX,
            filter_subjects=self.settings.consumer_spec().filter_subjects,
            first=first,
            last=last,
            desc=f"{NAME}: replaying {stream}",
        )
        skipped = self.ctx.skipped
        async with contextlib.aclosing(reading) as batches:  # its consumer gone on a failure
            async for batch in batches:
                for info, msg in batch:
                    seq = info.stream_seq
                    live = seq >= live_from
                    if (accept is None or accept(msg.subject)) and seq not in skipped:
                        try:
                            d = Delivery(msg, codec.decode(msg.data), info)
                        except ContractError:  # the runtime dead-letters it when it comes again
                            d = None
                        if d is not None:
                            try:
                                self.apply(self._recorder(seq) if live else None, d)
                            except Exception as exc:
                                raise ReplayFailed(msg, info, exc, acked=not live) from exc
                    if not live:  # acked: its candles are durable and its ticks counted already
                        self.pending.clear()
                        self.trigger_ms.clear()
                        self.counts.clear()
                        self.agg.filled = self.agg.late_shares = 0
                    self.agg.last_stream_seq = seq
                    done += 1
        self.recovered = {seq: r for seq, r in self.recovered.items() if r.calls}
        return done

    # --- idle symbols -----------------------------------------------------------------

    def clock(self, feed: str, symbol: str, now_ms: int, *, caught_up: bool) -> int | None:
        """The symbol's time now, as its EA keeps it: the wall clock less the symbol's lag
        when its latest ticks were taken. An EA whose clock runs behind the wall clock, or
        a backfill of ticks from the past, is then not taken for a symbol gone idle.

        A symbol whose ticks ran more than the allowed lateness behind (a backfill) has the
        wall clock once the worker is ``caught_up`` with TICKS and took none of its ticks
        for ``idle_silence_s`` (since the start, if none since): the backfill ended, and its
        last candles would otherwise stay open as long as their periods last. Not while
        the worker is behind: its ticks may still be waiting. One that ran less behind
        keeps its own clock, which closes them as soon and makes none of its later ticks
        late. None: the lag is not known yet."""
        lag = self.agg.lag_ms(feed, symbol)
        if lag is not None and lag <= self._late_ms:
            return now_ms - lag
        if caught_up and self.silent(feed, symbol, now_ms):
            return now_ms
        return None if lag is None else now_ms - lag

    def silent(self, feed: str, symbol: str, now_ms: int) -> bool:
        """No tick of the symbol taken for ``idle_silence_s``, and its ticks ran more than
        the allowed lateness behind (or how far is not known): it may take the wall clock."""
        taken = self.heard.get((feed, symbol), self.started_ms)
        lag = self.agg.lag_ms(feed, symbol)
        return (lag is None or lag > self._late_ms) and now_ms - taken >= self._silence_ms

    async def caught_up(self) -> bool:
        """Nothing on TICKS waits for this worker's durable (False when that is not known)."""
        stream = stream_name(TICKS, namespace=self.namespace)
        try:
            info = await self.ctx.js.consumer_info(stream, self.settings.durable)
        except Exception as exc:
            log.info("%s: consumer info for the idle close failed: %r", NAME, exc)
            return False
        return bool(info.num_pending == 0)

    async def close_idle(self) -> None:
        """Publish a Watermark for symbols whose open candle ended more than the grace ago
        by the symbol's own clock; not again while the last one published for the symbol
        is not taken yet (a worker behind on TICKS would add one a second to its backlog)."""
        s = self.settings
        grace_ms = round(s.idle_grace_s * 1000)
        now_ms = time.time_ns() // 1_000_000
        caught_up: bool | None = None  # asked of the server only when it matters
        out = []
        sending: list[tuple[tuple[str, str], int]] = []
        marks = self._marks
        for feed, symbol in self.agg.symbols():
            next_close = self.agg.next_close_ms(feed, symbol)
            if next_close is None:
                continue
            sent = marks.get((feed, symbol))
            if sent is not None and (self.agg.watermark(feed, symbol) or 0) < sent:
                continue
            if caught_up is None and self.silent(feed, symbol, now_ms):
                caught_up = await self.caught_up()
            clock = self.clock(feed, symbol, now_ms, caught_up=bool(caught_up))
            if clock is None or next_close > clock - grace_ms:
                continue
            mark = clock - grace_ms
            sending.append(((feed, symbol), mark))
            wm = Watermark(feed=feed, symbol=symbol, time_ms=mark)
            out.append(
                Outgoing(
                    subjects.ticks(feed, symbol, namespace=self.namespace),
                    encode(wm),
                    wm.msg_id,
                )
            )
        if out:
            await self.ctx.publisher.publish(out)
            marks.update(sending)


class Refuser(Protocol):
    """Where refusals go: the runtime's batch, or a record kept during recovery."""

    def reject(self, delivery: Delivery[TickInput], reason: str, detail: str = "") -> None: ...

    def reject_part(
        self,
        delivery: Delivery[TickInput],
        index: int,
        payload: bytes,
        reason: str,
        detail: str = "",
    ) -> None: ...


class Recorded:
    """Refusals of one message seen during recovery, handed to the batch it comes back in."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, bytes, str, str]] = []

    def reject(self, delivery: Delivery[TickInput], reason: str, detail: str = "") -> None:
        self.calls.append((None, b"", reason, detail))

    def reject_part(
        self,
        delivery: Delivery[TickInput],
        index: int,
        payload: bytes,
        reason: str,
        detail: str = "",
    ) -> None:
        self.calls.append((index, payload, reason, detail))

    def replay_onto(self, batch: Refuser, d: Delivery[TickInput]) -> None:
        for index, payload, reason, detail in self.calls:
            if index is None:
                batch.reject(d, reason, detail)
            else:
                batch.reject_part(d, index, payload, reason, detail)


def _done() -> asyncio.Future[None]:
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


def _watermark_problem(
    d: Delivery[TickInput], wm: Watermark, stored: int, skew_ms: int
) -> tuple[str, str] | None:
    """A watermark is tickwire's own: published with its message id, and not ahead of the
    time TICKS stored it by more than a tick may be."""
    msg_id = (d.msg.headers or {}).get("Nats-Msg-Id")
    if msg_id != wm.msg_id:
        return UNKNOWN_TYPE, (
            f"a watermark is tickwire's own (message id {wm.msg_id}), not an EA's: {msg_id!r}"
        )
    if wm.time_ms > stored + skew_ms:
        return FUTURE_TIME, f"{wm.feed} {wm.symbol} watermark time_ms={wm.time_ms}"
    return None


def _bucket_name(namespace: str | None) -> str:
    return STATE_BUCKET if namespace is None else f"ns-{namespace}-{STATE_BUCKET}"


def _subject_problem(subject: str, m: TickInput) -> tuple[str, str] | None:
    """A message must carry a legal symbol, and the feed and symbol of its subject."""
    try:
        token = subjects.escape(m.symbol)
    except subjects.SubjectError as exc:
        return "illegal_symbol", str(exc)
    tokens = subject.rsplit(".", 2)
    if tokens[-2] != m.feed or tokens[-1] != token:
        return "subject_mismatch", f"{m.feed}/{m.symbol} published on {subject}"
    return None


def build(settings: Settings) -> Worker[TickInput]:
    stream = stream_name(TICKS, namespace=settings.namespace)
    worker: Worker[TickInput] = Worker(
        NAME,
        stream=stream,
        durable=settings.durable,
        codec=TicksCodec(max_bytes=settings.max_payload_bytes),
        settings=settings,
        accept=settings.acceptor(feed_symbol),
        in_order=True,
        positions=True,  # Ingest.apply: where each message is in TICKS and when it was stored
    )
    metrics = Metrics(worker)  # once: a start-up step that failed is tried again
    idle_task: list[asyncio.Task[None]] = []

    @worker.on_startup
    async def start(ctx: Context) -> None:
        consumers = await own_durables(ctx.js, settings)
        await ensure(ctx.js, stream_specs(namespace=settings.namespace), consumers)
        sink = QuestDBSink(
            settings.questdb_ilp,
            settings.questdb_http,
            table_prefix=namespace_prefix(settings.namespace),
        )
        await sink.start()
        ingest = Ingest(settings, ctx, sink, metrics)
        try:
            await ingest.restore(stream)
        except BaseException:
            sink.close()  # the step tried again opens its own
            raise
        ctx.state["ingest"] = ingest
        if settings.idle_close:
            idle_task.append(asyncio.create_task(_idle_loop(worker, ingest)))

    @worker.handler
    async def on_ticks(batch: Batch[TickInput], ctx: Context) -> Commit:
        ingest: Ingest = ctx.state["ingest"]
        for i, d in enumerate(batch.items, 1):
            ingest.apply(batch, d)
            if not i % 64:
                await asyncio.sleep(0)  # let the previous batch's commit and acks move on
        return ingest.seal()

    @worker.on_shutdown
    async def stop(ctx: Context) -> None:
        for task in idle_task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        ingest: Ingest | None = ctx.state.get("ingest")
        if ingest is not None:
            ingest.cancel_publishing()
            settled = not ingest.pending and not ingest.recovered and not ingest.unsettled
            if settled and not worker.failed:
                await ingest.snapshot()
            ingest.sink.close()

    return worker


async def _idle_loop(worker: Worker[TickInput], ingest: Ingest) -> None:
    """Once a second; a failure is logged and tried again, never kills the worker. Nothing
    once the worker stops: its handler may have failed half-way through a message."""
    while True:
        await asyncio.sleep(1.0)
        if worker.stopping:
            return
        try:
            await ingest.close_idle()
        except Exception as exc:
            log.warning("%s: idle close failed: %r", worker.name, exc)


def main() -> int:
    run_until_signalled(build(load(Settings)))
    return 0
