"""``tickwire rebuild``: reprocess stored data downstream of a stage, in place.

read CANDLES / FEATURES / SCORES / SIGNALS (what the stages need) -> ``plan`` (feature
library, active models, current policy) -> publish only what differs, as the key's next
rebuild generation, to the live FEATURES, SCORES, SIGNALS -> the replicator upserts it (same
candle revision: the later message wins) and subscribers get the correcting signals. A
series' last word among them goes to signal-publisher's sides bucket where no later candle's
signal came after it (``_keep_sides``).

Running beside the live workers is safe:

- model-scorer and signal-publisher ack a rebuilt message (``rebuild`` > 0) without effect:
  what follows from it is this rebuild's to publish, so nothing is made twice;
- each stage reads its input only up to what the live worker of that stage has acked: a
  candle, vector or score the live worker has still to handle is left to it (a later
  candle revision then wins in the tables by the replicator's revision rule).

Everything read is read at start, and everything is published with deterministic ids, so a
rebuild stopped half-way and run again publishes the rest and nothing twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from tqdm import tqdm

from contracts import streams, subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import Candle, FeatureVector, Score, Signal
from workers.features import DEFAULT
from workers.model_scorer.scoring import Model, ModelError
from workers.rebuild import plan
from workers.rebuild.plan import FEATURES, SCORES, SIGNALS, RebuildError, Request
from workers.registry import Registry, RegistryError
from workers.runtime.metrics import WorkerMetrics
from workers.runtime.partition import consumers_of
from workers.runtime.publish import Outgoing, Publisher
from workers.runtime.pull import read_stream
from workers.runtime.worker import Context
from workers.signal_publisher.app import Settings, keep_side, open_bucket
from workers.signal_publisher.policy import POLICY_KEY, Policy, PolicyError, parse_policy
from workers.signal_publisher.state import last_words

log = logging.getLogger(__name__)

NAME: Final = "rebuild"
READER: Final = "rebuild-reader"
"""The short-lived consumer the streams are read through."""
PUBLISH_CHUNK: Final = 2000
V = TypeVar("V", FeatureVector, Score)


@dataclass(slots=True)
class Report:
    """What a rebuild did, per stage: published and unchanged messages."""

    published: dict[str, int] = field(default_factory=dict)
    unchanged: dict[str, int] = field(default_factory=dict)
    left_to_live: dict[str, int] = field(default_factory=dict)
    """Input messages beyond what the live worker has acked, per stream."""
    sides_kept: int = 0
    """Series whose last word to subscribers is now one of this rebuild's signals."""
    no_model: list[str] = field(default_factory=list)
    """Series without a usable active model (their scores are not rebuilt)."""
    short_history: list[str] = field(default_factory=list)
    """Series whose start CANDLES no longer holds, nor the feature set's memory of candles
    before T1 (nothing of theirs is rebuilt)."""

    def lines(self) -> list[str]:
        out = [
            f"{stage}: {self.published[stage]} published, {self.unchanged[stage]} unchanged"
            for stage in self.published
        ]
        if self.sides_kept:
            out.append(f"signals: the last word on {self.sides_kept} series")
        out += [f"{s}: {n} messages left to the live worker" for s, n in self.left_to_live.items()]
        out += [f"scores: no usable model for {key}" for key in self.no_model]
        out += [
            f"not rebuilt: {streams.CANDLES} no longer holds enough history before T1 for {key}"
            for key in self.short_history
        ]
        return out


class _Unreachable(Exception):
    """NATS could not be reached: nothing was read or changed."""


class Rebuild:
    def __init__(self, settings: Settings, ctx: Context, req: Request) -> None:
        self.settings = settings
        self.ctx = ctx
        self.req = req
        self.ns = settings.namespace
        self.report = Report()
        self.left_out: set[plan.Series] = set()
        """Series the features stage left out: the later stages leave them too."""

    # --- reading -------------------------------------------------------------------------

    async def _messages(
        self, base: str, domain: str, codec: Codec[Any]
    ) -> AsyncIterator[tuple[int, str, Any]]:
        """``(seq, subject, message)`` of the series asked for, up to the stream's last
        message now; undecodable ones left out (they are the live workers' dead letters)."""
        stream = streams.stream_name(base, namespace=self.ns)
        last = (await self.ctx.js.stream_info(stream)).state.last_seq
        if last == 0:
            return
        batches = read_stream(
            self.ctx.nc,
            self.ctx.js,
            stream,
            consumer=READER,
            filter_subjects=self.req.filters(domain, self.ns),
            last=last,
            desc=f"reading {stream}",
        )
        async for batch in batches:
            for info, msg in batch:
                with contextlib.suppress(ContractError):
                    m = codec.decode(msg.data)
                    if self.req.wants(m.feed, m.symbol):
                        yield info.stream_seq, msg.subject, m

    async def _acked(self, base: str, worker: str) -> int | None:
        """Stream sequence up to which every live consumer of ``worker`` has acked; None
        when the worker has no consumer on the stream. Its durable, or its partitions'
        (``<worker>-<k>of<n>``); not the short-lived readers of warm-up or read-back."""
        stream = streams.stream_name(base, namespace=self.ns)
        durable = re.compile(rf"{re.escape(worker)}(-\d+of\d+)?")
        floors = [
            c.ack_floor.stream_seq if c.ack_floor else 0
            for c in await consumers_of(self.ctx.js, stream)
            if durable.fullmatch(c.name)
        ]
        return min(floors) if floors else None

    def _left(self, stream: str, seq: int, floor: int | None) -> bool:
        if floor is None or seq <= floor:
            return False
        self.report.left_to_live[stream] = self.report.left_to_live.get(stream, 0) + 1
        return True

    # --- the stages ----------------------------------------------------------------------

    async def run(self) -> Report:
        stages = self.req.stages
        vectors: dict[plan.CandleKey, FeatureVector] | None = None
        scores: dict[plan.CandleKey, Score] | None = None
        if FEATURES in stages:
            vectors = await self._features()
        if SCORES in stages:
            scores = await self._scores(vectors)
        if SIGNALS in stages:
            await self._signals(scores or {})
        return self.report

    async def _features(self) -> dict[plan.CandleKey, FeatureVector]:
        floor = await self._acked(streams.CANDLES, streams.FEATURE_BUILDER)
        codec: Codec[Candle] = Codec(Candle)
        candles = [
            (subject, c)
            async for seq, subject, c in self._messages(streams.CANDLES, subjects.CANDLES, codec)
            if not self._left(streams.CANDLES, seq, floor)
        ]
        # feature-builder's state goes back to each series' first candle (its snapshot
        # outlives the stream's age); what was read does only if the stream has lost none
        # of its first messages by now. Which series they held is not known: none is whole,
        # and each must have the feature set's memory of candles before T1 (``plan``).
        stream = streams.stream_name(streams.CANDLES, namespace=self.ns)
        whole = (await self.ctx.js.stream_info(stream)).state.first_seq <= 1
        stored = await self._stored(
            streams.FEATURES, subjects.FEATURES, FeatureVector, plan.feature_key
        )
        result = plan.features(
            candles, stored, self.req, DEFAULT, self.settings.revision_depth, lambda _: whole
        )
        self.left_out.update(result.left_out)
        self.report.short_history += [
            f"{f} {s} {tf.value} ({result.held_before[f, s, tf]} candles, {DEFAULT.memory} needed)"
            for f, s, tf in result.left_out
        ]
        await self._publish(FEATURES, result, subjects.features)
        return result.current

    async def _scores(
        self, rebuilt: dict[plan.CandleKey, FeatureVector] | None
    ) -> dict[plan.CandleKey, Score]:
        if rebuilt is None:
            floor = await self._acked(streams.FEATURES, streams.MODEL_SCORER)
            held: plan.Stored[plan.CandleKey, FeatureVector] = plan.Stored()
            codec: Codec[FeatureVector] = Codec(FeatureVector, max_bytes=1 << 20)
            async for seq, _, v in self._messages(streams.FEATURES, subjects.FEATURES, codec):
                if self.req.covers(v.open_time_ms) and not self._left(streams.FEATURES, seq, floor):
                    held.add(plan.candle_key(v), v, v.candle_revision)
            vectors = [h.message for h in held.by_key.values()]
        else:
            vectors = list(rebuilt.values())
        models = await self._models({(v.feed, v.symbol, v.tf) for v in vectors})
        stored = await self._stored(streams.SCORES, subjects.SCORES, Score, plan.score_key)
        result = plan.scores(vectors, models.get, stored)
        await self._publish(SCORES, result, subjects.scores)
        return result.current

    async def _signals(self, rebuilt: dict[plan.CandleKey, Score]) -> None:
        floor = await self._acked(streams.SCORES, streams.SIGNAL_PUBLISHER)
        codec: Codec[Score] = Codec(Score)
        stream = [
            (subject, s)
            async for seq, subject, s in self._messages(streams.SCORES, subjects.SCORES, codec)
            if not self._left(streams.SCORES, seq, floor)
        ]
        chains = plan.effective_scores(stream, rebuilt)
        for series in self.left_out:
            chains.pop(series, None)
        in_force: plan.Stored[plan.CandleKey, Signal] = plan.Stored()
        async for _, _, sig in self._messages(streams.SIGNALS, subjects.SIGNALS, Codec(Signal)):
            in_force.add(plan.candle_key(sig), sig, sig.candle_revision)
        result = plan.signals(chains, in_force, self.req, await self._policy())
        await self._publish(SIGNALS, result, subjects.signals)
        await self._keep_sides(result)

    async def _keep_sides(self, result: plan.Result[Signal]) -> None:
        """signal-publisher's sides bucket keeps the last word subscribers got on each
        series, for when SIGNALS no longer holds it: a correction here is that word only where
        no later candle's signal came after it."""
        last = last_words(o.message for o in result.publish)
        if not last:
            return
        kv = await open_bucket(self.ctx.js, self.settings.sides_bucket, history=1)
        kept = [await keep_side(kv, s) for s in last.values()]
        self.report.sides_kept = sum(kept)

    async def _stored(
        self, base: str, domain: str, tp: type[V], key: Callable[[V], Hashable]
    ) -> plan.Stored[Any, V]:
        stored: plan.Stored[Any, V] = plan.Stored()
        async for _, _, m in self._messages(base, domain, Codec(tp, max_bytes=1 << 20)):
            stored.add(key(m), m, m.candle_revision)
        return stored

    async def _models(self, series: set[plan.Series]) -> dict[plan.Series, Model]:
        """The active model of each series that has a usable one."""
        try:
            registry = await Registry.open(self.ctx.js, namespace=self.ns, create=False)
        except RegistryError as exc:
            raise RebuildError(f"scores: {exc}") from None
        out: dict[plan.Series, Model] = {}
        for s in sorted(series, key=lambda s: (s[0], s[1], s[2].ms)):
            pointer = await registry.active(*s)
            if pointer is None:
                self.report.no_model.append(f"{s[0]} {s[1]} {s[2].value}")
                continue
            try:
                card, booster = await registry.get(pointer.version)
                out[s] = Model.load(card, booster)
            except (RegistryError, ModelError) as exc:
                self.report.no_model.append(f"{s[0]} {s[1]} {s[2].value}: {exc}")
        return out

    async def _policy(self) -> Policy:
        """The policy signal-publisher is in force with: its KV entry, else its file."""
        policy = self.settings.policy()
        try:
            kv = await self.ctx.js.key_value(self.settings.bucket)
            entry = await kv.get(POLICY_KEY)
        except (BucketNotFoundError, KeyNotFoundError, NotFoundError):
            return policy
        if entry.value:
            try:
                policy = parse_policy(entry.value)
            except PolicyError as exc:
                log.warning("%s: the policy entry is refused, using the file's: %s", NAME, exc)
        return policy

    # --- publishing ----------------------------------------------------------------------

    async def _publish(self, stage: str, result: plan.Result[Any], subject_of: Any) -> None:
        out = [
            Outgoing(
                subject_of(o.message.feed, o.message.symbol, o.message.tf, namespace=self.ns),
                encode(o.message),
                o.msg_id,
            )
            for o in result.publish
        ]
        with tqdm(total=len(out), desc=f"publishing {stage}", unit="msg", disable=None) as bar:
            for at in range(0, len(out), PUBLISH_CHUNK):
                chunk = out[at : at + PUBLISH_CHUNK]
                await self.ctx.publisher.publish(chunk)
                bar.update(len(chunk))
        self.report.published[stage] = len(out)
        self.report.unchanged[stage] = result.unchanged


async def rebuild(nc: Client, settings: Settings, req: Request) -> Report:
    """Run the rebuild ``req`` on the streams ``nc`` reaches (``settings.namespace``'s)."""
    js: JetStreamContext = nc.jetstream()
    metrics = WorkerMetrics(NAME)
    ctx = Context(
        worker=NAME,
        settings=settings,
        nc=nc,
        js=js,
        publisher=Publisher(nc, metrics, settings.publish_timeout_s),
        metrics=metrics,
        state={},
    )
    for base in (streams.CANDLES, streams.FEATURES, streams.SCORES, streams.SIGNALS):
        try:
            await js.stream_info(streams.stream_name(base, namespace=settings.namespace))
        except NotFoundError:
            raise RebuildError(
                f"stream {streams.stream_name(base, namespace=settings.namespace)} does not exist"
            ) from None
    return await Rebuild(settings, ctx, req).run()


def run(args: argparse.Namespace) -> int:
    """The CLI: one line on stderr and exit code 2 for a bad argument, 1 when NATS is out
    of reach; nothing changed."""
    from workers.runtime.connection import connect_once
    from workers.runtime.settings import load

    try:
        req = plan.request(
            start=args.start,
            end=args.end,
            stages=args.stages,
            feed=args.feed,
            symbols=args.symbols or (),
        )
    except RebuildError as exc:
        sys.stderr.write(f"tickwire rebuild: {exc}\n")
        return 2
    overrides: dict[str, Any] = {}
    if args.namespace is not None:
        overrides["namespace"] = args.namespace
    settings = load(Settings, **overrides)

    async def go() -> Report:
        try:
            nc = await connect_once(settings, "tickwire-rebuild")
        except (TimeoutError, OSError) as exc:
            raise _Unreachable(
                f"NATS at {settings.nats_url} did not answer: {exc or 'timed out'}"
            ) from None
        try:
            return await rebuild(nc, settings, req)
        finally:
            await nc.close()

    try:
        report = asyncio.run(go())
    except RebuildError as exc:
        sys.stderr.write(f"tickwire rebuild: {exc}\n")
        return 2
    except _Unreachable as exc:
        sys.stderr.write(f"tickwire rebuild: {exc}\n")
        return 1
    for line in report.lines():
        print(line)
    return 0
