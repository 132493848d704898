"""model-scorer: feature vectors -> scores, by the active model of each series.

consume FEATURES (FeatureVector) -> group the batch by (feed, symbol, timeframe) -> one
``Booster.predict`` per group on the matrix of its vectors, columns in the model card's
order -> Score published to SCORES with ``Nats-Msg-Id`` = candle key, candle revision and
model version, before the vectors are acked.

A vector the scorer was killed holding is redelivered an ack wait later, maybe behind newer
vectors of its series, and scored again. Its score, stored before the kill, would be stored
twice once older than SCORES' duplicate window; so the scores of a redelivered vector are
first looked for on SCORES (``stored_since``) and only those not found are published. A
first delivery is published without looking.

The active model comes from the registry and follows promotions and rollbacks as they are
written (``workers.model_scorer.models``). A vector still warming up is acked and not
scored, and so is a vector ``tickwire rebuild`` published (it scores those itself); a
vector no model may score (no active model, another feature set, NaN values...)
is a dead letter with the reason, so ops can requeue it once the cause is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, ClassVar, Final, NamedTuple

import numpy as np
from prometheus_client import Counter, Gauge, Histogram
from pydantic import Field

from contracts import subjects
from contracts.codec import encode
from contracts.messages import FeatureVector, Timeframe
from contracts.streams import FEATURES, MODEL_SCORER, SCORES, ensure, stream_name, stream_specs
from workers.model_scorer import scoring
from workers.model_scorer.models import ActiveModels
from workers.model_scorer.scoring import (
    BAD_VALUES,
    MODEL_UNUSABLE,
    NO_MODEL,
    REBUILT,
    SCORED,
    SUBJECT_MISMATCH,
    WARMING_UP,
    ModelError,
    VectorCodec,
)
from workers.registry import Registry, RegistryError
from workers.runtime.errors import TransientError
from workers.runtime.metrics import BATCH_BUCKETS, LATENCY_BUCKETS
from workers.runtime.partition import PartitionedSettings, own_durables
from workers.runtime.publish import Outgoing, stored_since
from workers.runtime.settings import load
from workers.runtime.worker import Batch, Commit, Context, Delivery, Worker, run_until_signalled

log = logging.getLogger(__name__)

NAME: Final = MODEL_SCORER
OUTCOMES: Final = (
    SCORED,
    WARMING_UP,
    REBUILT,
    scoring.FEATURE_SET_MISMATCH,
    NO_MODEL,
    BAD_VALUES,
    MODEL_UNUSABLE,
    SUBJECT_MISMATCH,
)
Series = tuple[str, str, Timeframe]


class Scored(NamedTuple):
    """A score on its way, with what its commit needs of the vector it is of."""

    position: int
    """The vector's stream sequence."""
    message: Outgoing
    vector: FeatureVector
    stored_ns: int
    """When FEATURES stored the vector: the score cannot be on SCORES from before."""
    redelivered: bool


class Settings(PartitionedSettings):
    worker: ClassVar[str] = NAME

    commit_depth: Annotated[int, Field(ge=1, le=64)] = 4
    """Batches on their way at once: JetStream acks a batch of publishes a round trip
    after its last one, and the next batches are handled meanwhile."""
    max_payload_bytes: Annotated[int, Field(gt=0)] = 256 * 1024
    """As FEATURES' ``max_msg_size``."""
    predict_threads: Annotated[int, Field(gt=0)] = 1
    """LightGBM threads per predict call (micro-batches gain little from more)."""
    registry_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Longest wait at start for the registry's pointers and models, before trying again."""


def feed_symbol(subject: str) -> str:
    """``<feed>.<symbol token>`` of a features subject: a symbol's timeframes go together."""
    return ".".join(subject.rsplit(".", 3)[-3:-1])


class Metrics:
    """model-scorer's own series, beside the runtime's."""

    def __init__(self, worker: Worker[FeatureVector]) -> None:
        r, w = worker.metrics.registry, worker.name
        self.vectors = Counter(
            "tickwire_scorer_vectors",
            "Feature vectors in, by outcome: scored, warming_up or the refusal reason",
            ["worker", "outcome"],
            registry=r,
        )
        self.scores = Counter(
            "tickwire_scores_out", "Scores published, by timeframe", ["worker", "tf"], registry=r
        )
        self.predict_rows = Histogram(
            "tickwire_scorer_predict_rows",
            "Vectors scored by one Booster.predict call",
            ["worker"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.predict_seconds = Histogram(
            "tickwire_scorer_predict_seconds",
            "Time of one Booster.predict call",
            ["worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active = Gauge(
            "tickwire_scorer_active_model",
            "1 for the model version each series is scored by now",
            ["worker", "key", "version"],
            registry=r,
        )
        self.feature_to_score = worker.metrics.latency.labels(w, "feature_to_score")
        self.close_to_score = worker.metrics.latency.labels(w, "close_to_score")
        self.by_outcome = {o: self.vectors.labels(w, o) for o in OUTCOMES}
        self.by_tf = {tf: self.scores.labels(w, tf.value) for tf in Timeframe}
        self.predict_rows_w = self.predict_rows.labels(w)
        self.predict_seconds_w = self.predict_seconds.labels(w)
        self._worker = w
        self._shown: dict[str, str] = {}

    def refused(self, reason: str, n: int = 1) -> None:
        counter = self.by_outcome.get(reason) or self.vectors.labels(self._worker, reason)
        counter.inc(n)

    def show_active(self, key: str, version: str | None) -> None:
        old = self._shown.pop(key, None)
        if old is not None:
            self.active.remove(self._worker, key, old)
        if version:
            self.active.labels(self._worker, key, version).set(1)
            self._shown[key] = version


class Scorer:
    """What one batch does: group, check, predict, and the commit that publishes."""

    def __init__(self, settings: Settings, ctx: Context, models: ActiveModels, m: Metrics) -> None:
        self.settings = settings
        self.ctx = ctx
        self.models = models
        self.metrics = m
        self.namespace = settings.namespace
        self.output = stream_name(SCORES, namespace=settings.namespace)
        self._subjects: dict[Series, tuple[str, str]] = {}
        """(features subject, scores subject) per series."""

    def subjects_of(self, series: Series) -> tuple[str, str]:
        known = self._subjects.get(series)
        if known is None:
            feed, symbol, tf = series
            ns = self.namespace
            known = (
                subjects.features(feed, symbol, tf, namespace=ns),
                subjects.scores(feed, symbol, tf, namespace=ns),
            )
            self._subjects[series] = known
        return known

    async def handle(self, batch: Batch[FeatureVector]) -> Commit:
        m = self.metrics
        groups: dict[Series, list[Delivery[FeatureVector]]] = {}
        warming = rebuilt = 0
        for d in batch.items:
            v = d.value
            series = (v.feed, v.symbol, v.tf)
            if d.msg.subject != self.subjects_of(series)[0]:
                self.reject(batch, d, SUBJECT_MISMATCH, f"a vector of {series} on {d.msg.subject}")
            elif v.warming_up:
                warming += 1
            elif v.rebuild:
                rebuilt += 1
            else:
                groups.setdefault(series, []).append(d)
        if warming:
            m.by_outcome[WARMING_UP].inc(warming)
        if rebuilt:
            m.by_outcome[REBUILT].inc(rebuilt)
        out: list[Scored] = []
        for series, group in groups.items():
            out += await self.score(batch, series, group)
        out.sort(key=lambda o: o.position)  # stream order
        return self.seal(out)

    async def score(
        self, batch: Batch[FeatureVector], series: Series, group: list[Delivery[FeatureVector]]
    ) -> list[Scored]:
        """Scores of one series' vectors."""
        key = self.models.key(*series)
        try:
            model = await self.models.model_for(key)
        except ModelError as exc:
            for d in group:
                self.reject(batch, d, MODEL_UNUSABLE, str(exc))
            return []
        if model is None:
            for d in group:
                self.reject(batch, d, NO_MODEL, f"no active model for {key}")
            return []
        usable: list[Delivery[FeatureVector]] = []
        for d in group:
            refusal = scoring.check(d.value, model)
            if refusal is None:
                usable.append(d)
            else:
                self.reject(batch, d, *refusal)
        if not usable:
            return []
        values = np.array([d.value.values for d in usable], dtype=np.float64)
        bad = scoring.non_finite(values)
        if bad.any():
            for d, is_bad in zip(usable, bad.tolist(), strict=True):
                if is_bad:
                    self.reject(batch, d, BAD_VALUES, "a value is NaN or infinite")
            usable = [d for d, is_bad in zip(usable, bad.tolist(), strict=True) if not is_bad]
            values = values[~bad]
        if not usable:
            return []
        vectors = [d.value for d in usable]
        started = time.perf_counter()
        made = scoring.scores(vectors, model, values)
        m = self.metrics
        m.predict_seconds_w.observe(time.perf_counter() - started)
        m.predict_rows_w.observe(len(usable))
        m.by_outcome[SCORED].inc(len(usable))
        subject = self.subjects_of(series)[1]
        return [
            Scored(
                d.info.stream_seq,
                Outgoing(subject, encode(s), scoring.message_id(s)),
                d.value,
                d.info.timestamp_ns,
                d.info.deliveries > 1,
            )
            for d, s in zip(usable, made, strict=True)
        ]

    def reject(
        self, batch: Batch[FeatureVector], d: Delivery[FeatureVector], reason: str, detail: str
    ) -> None:
        batch.reject(d, reason, detail)
        self.metrics.refused(reason)

    def seal(self, out: list[Scored]) -> Commit:
        """The commit that publishes the batch's scores; tried again after a TransientError."""
        again = [o for o in out if o.redelivered]

        async def commit() -> None:
            todo = out
            if again:
                stored = await stored_since(
                    self.ctx.nc,
                    self.output,
                    [o.message for o in again],
                    [o.stored_ns for o in again],
                    self.settings.publish_timeout_s,
                )
                if stored:
                    found = {id(again[i]) for i in stored}
                    todo = [o for o in out if id(o) not in found]
            if not todo:
                return
            await self.ctx.publisher.publish([o.message for o in todo])
            now_ns = time.time_ns()
            m = self.metrics
            for o in todo:
                v = o.vector
                m.by_tf[v.tf].inc()
                m.feature_to_score.observe(max(0, now_ns - o.stored_ns) / 1e9)
                m.close_to_score.observe(max(0, now_ns // 1_000_000 - v.close_time_ms) / 1000)

        return commit


def build(settings: Settings) -> Worker[FeatureVector]:
    stream = stream_name(FEATURES, namespace=settings.namespace)
    codec = VectorCodec(FeatureVector, max_bytes=settings.max_payload_bytes)
    worker: Worker[FeatureVector] = Worker(
        NAME,
        stream=stream,
        durable=settings.durable,
        codec=codec,
        settings=settings,
        accept=settings.acceptor(feed_symbol),
    )
    metrics = Metrics(worker)
    codec.refused = metrics.refused

    @worker.on_startup
    async def start(ctx: Context) -> None:
        consumers = await own_durables(ctx.js, settings)
        await ensure(ctx.js, stream_specs(namespace=settings.namespace), consumers)
        try:
            registry = await Registry.open(ctx.js, namespace=settings.namespace, create=False)
        except RegistryError as exc:
            raise TransientError(str(exc)) from None
        models = ctx.state.get("models")
        if models is None:
            models = ActiveModels(
                registry, threads=settings.predict_threads, on_change=metrics.show_active
            )
            ctx.state["models"] = models
        await models.start(settings.registry_timeout_s)
        ctx.state["scorer"] = Scorer(settings, ctx, models, metrics)

    @worker.on_shutdown
    async def stop(ctx: Context) -> None:
        models: ActiveModels | None = ctx.state.get("models")
        if models is not None:
            await models.stop()

    @worker.handler
    async def on_vectors(batch: Batch[FeatureVector], ctx: Context) -> Commit:
        scorer: Scorer = ctx.state["scorer"]
        commit = await scorer.handle(batch)
        await asyncio.sleep(0)  # let the previous batch's publishes and acks move on
        return commit

    return worker


def main() -> int:
    run_until_signalled(build(load(Settings)))
    return 0
