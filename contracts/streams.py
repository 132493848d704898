"""JetStream streams and consumers, described as data and applied by one idempotent call.

Every stream uses ``limits`` retention on file storage: several independent consumers (the
next worker, the replicator, ad-hoc replays) read the same messages, and a replay needs them
after they were consumed, which rules out ``interest`` and ``workqueue``. Streams are bounded
by age, not by size: a per-stream ``max_bytes`` reserves that much storage up front on every
server, so disk is capped by the account's JetStream limit in ``infra/`` instead.

Consumers are durable pull consumers with explicit acks. ``ack_wait`` equals the first
``backoff`` step (the server forces that) and later redeliveries of an unacked message back
off further. A message that keeps failing is dead-lettered by the shared runtime well before
``max_deliver``; the server's limit is the backstop for a message that kills its worker,
which the runtime dead-letters, without handling it, on that last delivery.

A replay namespace gets its own streams (``NS_<namespace>_<STREAM>``) over its own subjects
(``ns.<namespace>.<domain>...``), with the same values as live ones, so a replay behaves
like production and never touches live data.

``ensure`` manages only the fields described here: fields set by someone else (sources of a
replay stream, metadata) are left as they are.

``ADVISORIES`` keeps what the server says once and never again: the advisory that a
consumer on a pipeline stream gave up on a message (its delivery limit). signal-publisher
turns each into a dead letter through a durable consumer, so one published while it is down
or disconnected waits for it instead of being lost: a subscriber's on SIGNALS, and a
pipeline worker's whose worker could not dead-letter the message on its last delivery (it
was killed holding it).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Any, Final

import msgspec
from nats.js import api
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.manager import JetStreamManager

from contracts import subjects

MINUTE: Final = 60.0
HOUR: Final = 3600.0
DAY: Final = 86_400.0
KiB: Final = 1024
MiB: Final = 1024 * KiB

# Stream base names; a namespace turns them into NS_<namespace>_<name>.
TICKS: Final = "TICKS"
CANDLES: Final = "CANDLES"
FEATURES: Final = "FEATURES"
SCORES: Final = "SCORES"
SIGNALS: Final = "SIGNALS"
DLQ: Final = "DLQ"
ADVISORIES: Final = "ADVISORIES"

# Durable consumer names, one per worker (the replicator uses the same name on each stream).
CANDLE_INGEST: Final = "candle-ingest"
FEATURE_BUILDER: Final = "feature-builder"
MODEL_SCORER: Final = "model-scorer"
SIGNAL_PUBLISHER: Final = "signal-publisher"
TIMESCALE_REPLICATOR: Final = "timescale-replicator"

UNLIMITED: Final = -1
"""``max_deliver`` of a consumer the server never gives up on."""

CREATED: Final = "created"
UPDATED: Final = "updated"
UNCHANGED: Final = "unchanged"

# Error code of "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE: Final = 10058
_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Retention(enum.StrEnum):
    LIMITS = "limits"
    INTEREST = "interest"
    WORKQUEUE = "workqueue"


class Storage(enum.StrEnum):
    FILE = "file"
    MEMORY = "memory"


class Discard(enum.StrEnum):
    OLD = "old"
    NEW = "new"


class DeliverPolicy(enum.StrEnum):
    ALL = "all"
    NEW = "new"
    LAST = "last"
    LAST_PER_SUBJECT = "last_per_subject"
    BY_START_SEQUENCE = "by_start_sequence"


class AckPolicy(enum.StrEnum):
    EXPLICIT = "explicit"


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One JetStream stream. Durations are seconds, sizes bytes, ``-1`` means unlimited."""

    name: str
    subjects: tuple[str, ...]
    description: str
    max_age: float
    duplicate_window: float
    """Window in which a repeated ``Nats-Msg-Id`` is dropped by the server."""
    retention: Retention = Retention.LIMITS
    storage: Storage = Storage.FILE
    replicas: int = 1
    max_msg_size: int = -1
    max_bytes: int = -1
    discard: Discard = Discard.OLD

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"stream name must match {_NAME.pattern}: {self.name!r}")
        if not self.subjects:
            raise ValueError(f"stream {self.name} has no subjects")
        if not 1 <= self.replicas <= 5:
            raise ValueError(f"stream {self.name}: replicas must be 1..5, not {self.replicas}")
        if self.max_age < 0 or self.duplicate_window < 0:
            raise ValueError(f"stream {self.name}: durations must not be negative")
        if self.max_age and self.duplicate_window > self.max_age:
            raise ValueError(f"stream {self.name}: duplicate_window longer than max_age")


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One durable pull consumer on a stream. Durations are seconds."""

    stream: str
    durable: str
    description: str
    filter_subjects: tuple[str, ...]
    ack_wait: float
    """How long a delivered message may stay unacked before it is redelivered."""
    max_deliver: int
    backoff: tuple[float, ...] = ()
    """Delays between redeliveries after an ack timeout; the last one repeats."""
    max_ack_pending: int
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    """Where a durable starts when it is created; one that exists keeps its start."""
    start_seq: int | None = None
    """Instead of ``deliver_policy``: the stream sequence a durable created now starts at
    (a partition's durable picking up where the worker's earlier durables stopped)."""
    ack_policy: AckPolicy = AckPolicy.EXPLICIT

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.durable):
            raise ValueError(f"consumer name must match {_NAME.pattern}: {self.durable!r}")
        if self.start_seq is not None and self.start_seq < 1:
            raise ValueError(f"consumer {self.durable}: start_seq must be 1 or more")
        unlimited = self.max_deliver == UNLIMITED
        if (
            self.ack_wait <= 0
            or self.max_ack_pending < 1
            or (self.max_deliver < 1 and not unlimited)
        ):
            raise ValueError(f"consumer {self.durable}: ack_wait, max_* must be positive")
        if self.backoff:
            # The server replaces ack_wait by the first step and needs a delivery per step.
            if self.backoff[0] != self.ack_wait:
                raise ValueError(f"consumer {self.durable}: ack_wait must equal backoff[0]")
            if not unlimited and self.max_deliver <= len(self.backoff):
                raise ValueError(f"consumer {self.durable}: max_deliver must exceed backoff")

    @property
    def label(self) -> str:
        return f"{self.stream}/{self.durable}"


def stream_name(base: str, *, namespace: str | None = None) -> str:
    """``TICKS`` live, ``NS_<namespace>_TICKS`` in a replay namespace."""
    if namespace is None:
        return base
    return f"NS_{subjects.check_name(namespace, 'namespace')}_{base}"


def stream_specs(*, namespace: str | None = None, replicas: int = 1) -> list[StreamSpec]:
    """Every stream of the pipeline (R1 for tests and the demo, R3 in a production cluster)."""

    def spec(base: str, domain: str, **values: Any) -> StreamSpec:
        return StreamSpec(
            name=stream_name(base, namespace=namespace),
            subjects=(subjects.wildcard(domain, namespace=namespace),),
            replicas=replicas,
            **values,
        )

    # Long enough to cover a crashed worker or EA restarting and republishing what it had
    # in flight; the sinks' idempotent upserts cover anything older.
    dedup = 10 * MINUTE
    return [
        spec(
            TICKS,
            subjects.TICKS,
            description="Ticks, tick batches and backfill bars from the EAs",
            # The replay source: a week covers a rebuild after a bad deploy found on Monday.
            max_age=7 * DAY,
            duplicate_window=dedup,
            # Same limit as the codec's: a larger tick batch must be split by the EA.
            max_msg_size=1 * MiB,
        ),
        spec(
            CANDLES,
            subjects.CANDLES,
            description="Closed candles and their revisions",
            # Rebuildable from ticks; TimescaleDB keeps them for good. Two weeks outlast
            # a long replicator outage.
            max_age=14 * DAY,
            duplicate_window=dedup,
            max_msg_size=64 * KiB,  # a candle is ~400 bytes of JSON
        ),
        spec(
            FEATURES,
            subjects.FEATURES,
            description="Feature vectors of closed candles",
            max_age=14 * DAY,  # rebuildable from candles, kept in TimescaleDB
            duplicate_window=dedup,
            max_msg_size=256 * KiB,  # room for feature sets with thousands of values
        ),
        spec(
            SCORES,
            subjects.SCORES,
            description="Model scores of feature vectors",
            max_age=14 * DAY,  # rebuildable from features, kept in TimescaleDB
            duplicate_window=dedup,
            max_msg_size=64 * KiB,
        ),
        spec(
            SIGNALS,
            subjects.SIGNALS,
            description="Trading signals for downstream subscribers",
            # Subscribers may be offline for days; a month is also the audit trail of
            # what was sent.
            max_age=30 * DAY,
            duplicate_window=dedup,
            max_msg_size=64 * KiB,
        ),
        spec(
            DLQ,
            subjects.DLQ,
            description="Messages a worker refused, with reason, for inspection and requeue",
            max_age=30 * DAY,  # a month to notice, fix and requeue
            # A worker killed after storing the dead letter of a message on its last
            # delivery, before acking it, leaves an advisory one ack wait later (the last
            # backoff step): signal-publisher's dead letter from it, with the same id, must
            # still be a repeat then.
            duplicate_window=max(dedup, 2 * max(_RETRY[-1], _REPLICATOR_RETRY[-1])),
            # Holds the original payload base64-encoded (4/3) plus headers: a full 1 MiB
            # tick batch must fit. Needs the server's max_payload raised to match.
            max_msg_size=2 * MiB,
        ),
        StreamSpec(
            name=stream_name(ADVISORIES, namespace=namespace),
            # the server publishes them under the stream's name: SIGNALS, or NS_<ns>_SIGNALS
            subjects=advised(namespace=namespace),
            description="Messages a consumer gave up on (the server's delivery-limit "
            "advisories), until signal-publisher has dead-lettered them",
            replicas=replicas,
            # a week covers signal-publisher down over a long weekend; the dead letters
            # themselves stay 30 days in DLQ
            max_age=7 * DAY,
            duplicate_window=dedup,
            max_msg_size=64 * KiB,  # an advisory is ~300 bytes of JSON
        ),
    ]


# Redelivery after an ack timeout (worker crashed or hung): 30 s, then slower, then every
# 10 min. A message that crashes its worker every time is not delivered forever: the runtime
# dead-letters it on its 10th delivery (about an hour), the last the server makes. Must stay
# above the runtime's poison_deliveries, which dead-letters a message that fails without
# crashing.
_RETRY: Final = (30.0, 60.0, 120.0, 300.0, 600.0)
_MAX_DELIVER: Final = 10
# The replicator may hold a whole COPY batch unacked until commit; it gets a longer first
# timeout so a slow commit does not cause redelivery of the batch.
_REPLICATOR_RETRY: Final = (60.0, 120.0, 300.0, 600.0)


def consumer_specs(*, namespace: str | None = None) -> list[ConsumerSpec]:
    """The durable consumers of the pipeline workers."""

    def spec(base: str, domain: str, durable: str, **values: Any) -> ConsumerSpec:
        return ConsumerSpec(
            stream=stream_name(base, namespace=namespace),
            durable=durable,
            filter_subjects=(subjects.wildcard(domain, namespace=namespace),),
            **values,
        )

    pipeline: dict[str, Any] = {
        "ack_wait": _RETRY[0],
        "backoff": _RETRY,
        "max_deliver": _MAX_DELIVER,
    }
    replicator: dict[str, Any] = {
        "ack_wait": _REPLICATOR_RETRY[0],
        "backoff": _REPLICATOR_RETRY,
        "max_deliver": _MAX_DELIVER,
        # Room for a COPY batch in flight plus the next fetch.
        "max_ack_pending": 20_000,
    }
    return [
        spec(
            TICKS,
            subjects.TICKS,
            CANDLE_INGEST,
            description="Ticks to M1 candles and higher timeframes",
            max_ack_pending=10_000,  # ticks arrive in bursts and are fetched in batches
            **pipeline,
        ),
        spec(
            CANDLES,
            subjects.CANDLES,
            FEATURE_BUILDER,
            description="Candles to feature vectors",
            max_ack_pending=10_000,  # commit_depth batches on their way and the next fetch
            **pipeline,
        ),
        spec(
            FEATURES,
            subjects.FEATURES,
            MODEL_SCORER,
            description="Feature vectors to model scores, in micro-batches",
            max_ack_pending=10_000,
            **pipeline,
        ),
        spec(
            SCORES,
            subjects.SCORES,
            SIGNAL_PUBLISHER,
            description="Scores to trading signals",
            max_ack_pending=1_000,
            **pipeline,
        ),
        *(
            spec(
                base,
                domain,
                TIMESCALE_REPLICATOR,
                description=f"{base.capitalize()} to TimescaleDB",
                **replicator,
            )
            for base, domain in (
                (CANDLES, subjects.CANDLES),
                (FEATURES, subjects.FEATURES),
                (SCORES, subjects.SCORES),
                (SIGNALS, subjects.SIGNALS),
            )
        ),
        # after its SCORES consumer: ``PartitionedSettings.consumer_spec`` takes the first
        exhausted_deliveries(namespace=namespace),
    ]


ADVISED: Final = (TICKS, CANDLES, FEATURES, SCORES, SIGNALS)
"""The streams whose consumers' delivery-limit advisories ADVISORIES keeps."""


def advised(*, namespace: str | None = None) -> tuple[str, ...]:
    """The delivery-limit advisories of every consumer of the ``ADVISED`` streams."""
    return tuple(subjects.max_deliveries(stream_name(s, namespace=namespace)) for s in ADVISED)


def exhausted_deliveries(*, namespace: str | None = None) -> ConsumerSpec:
    """signal-publisher's durable on ADVISORIES: the exhausted deliveries it dead-letters,
    the subscribers' and the pipeline's. One durable whatever the partitions, so each
    advisory is handled once. Delivered until its dead letter is stored, however long that
    takes (the stream's age limit aside): it is the last trace of its message, and nothing
    would read an advisory about this consumer giving up."""
    return ConsumerSpec(
        stream=stream_name(ADVISORIES, namespace=namespace),
        durable=SIGNAL_PUBLISHER,
        description="Exhausted deliveries to dead letters",
        filter_subjects=advised(namespace=namespace),
        ack_wait=_RETRY[0],
        backoff=_RETRY,
        max_deliver=UNLIMITED,
        max_ack_pending=100,
    )


def signal_subscriber(
    name: str,
    *,
    feed: str | None = None,
    namespace: str | None = None,
    filter_subject: str | None = None,
) -> ConsumerSpec:
    """A downstream subscriber's own durable consumer on SIGNALS (optionally one feed, or
    the signals matching ``filter_subject``, e.g. ``signals.*.EURUSD.M5``).

    It starts with signals published after its creation (older ones are stale for a
    trader) and is redelivered quickly: a signal is worth little after a few minutes. One
    signal at a time: the next is delivered once this one is acked or terminated, so a
    signal redelivered after a crash comes before those published after it (its correction,
    a later candle's), never after them.
    """
    if filter_subject is None:
        filter_subject = subjects.wildcard(subjects.SIGNALS, feed=feed, namespace=namespace)
    else:
        subjects.check_filter(subjects.SIGNALS, filter_subject, namespace=namespace)
    return ConsumerSpec(
        stream=stream_name(SIGNALS, namespace=namespace),
        durable=subjects.check_name(name, "subscriber"),
        description=f"Signal subscriber {name}",
        filter_subjects=(filter_subject,),
        deliver_policy=DeliverPolicy.NEW,
        ack_wait=10.0,
        backoff=(10.0, 30.0, 60.0, 120.0),
        max_deliver=5,
        max_ack_pending=1,
    )


# --- nats-py configuration ------------------------------------------------------------


def _stream_fields(spec: StreamSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "description": spec.description,
        "subjects": list(spec.subjects),
        "retention": api.RetentionPolicy(spec.retention.value),
        "storage": api.StorageType(spec.storage.value),
        "max_age": spec.max_age,
        "duplicate_window": spec.duplicate_window,
        "num_replicas": spec.replicas,
        "max_msg_size": spec.max_msg_size,
        "max_bytes": spec.max_bytes,
        "discard": api.DiscardPolicy(spec.discard.value),
    }


def _consumer_fields(spec: ConsumerSpec) -> dict[str, Any]:
    return {
        "name": spec.durable,
        "durable_name": spec.durable,
        "description": spec.description,
        "filter_subject": None,
        "filter_subjects": list(spec.filter_subjects),
        "ack_wait": spec.ack_wait,
        "max_deliver": spec.max_deliver,
        "backoff": list(spec.backoff) or None,
        "max_ack_pending": spec.max_ack_pending,
        "ack_policy": api.AckPolicy(spec.ack_policy.value),
    }


def _start_fields(spec: ConsumerSpec) -> dict[str, Any]:
    """Where a durable starts: set when it is created, never changed after."""
    if spec.start_seq is not None:
        return {
            "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
            "opt_start_seq": spec.start_seq,
        }
    return {"deliver_policy": api.DeliverPolicy(spec.deliver_policy.value)}


def to_stream_config(spec: StreamSpec) -> api.StreamConfig:
    return api.StreamConfig(**_stream_fields(spec))


def to_consumer_config(spec: ConsumerSpec) -> api.ConsumerConfig:
    return api.ConsumerConfig(**_consumer_fields(spec), **_start_fields(spec))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def stream_diff(spec: StreamSpec, config: api.StreamConfig) -> list[str]:
    """Names of the managed fields in which a server's stream config differs from ``spec``."""
    wanted = _stream_fields(spec)
    return [k for k, v in wanted.items() if _plain(v) != _plain(getattr(config, k))]


def consumer_diff(spec: ConsumerSpec, config: api.ConsumerConfig) -> list[str]:
    """Names of the managed fields in which a server's consumer config differs from ``spec``
    (where the durable started is not one: the server cannot change it)."""
    wanted = _consumer_fields(spec)
    actual = {k: getattr(config, k) for k in wanted}
    # One filter may come back in either field, depending on the server version.
    actual["filter_subjects"] = config.filter_subjects or (
        [config.filter_subject] if config.filter_subject else []
    )
    actual["filter_subject"] = None
    actual["backoff"] = config.backoff or None
    return [k for k, v in wanted.items() if _plain(v) != _plain(actual[k])]


async def ensure(
    js: JetStreamManager,
    streams: Iterable[StreamSpec],
    consumers: Iterable[ConsumerSpec] = (),
    *,
    rescale: bool = False,
) -> dict[str, str]:
    """Create what is missing and update what differs; idempotent.

    Returns, in order, each stream name and ``STREAM/consumer`` label with what was done:
    ``"created"``, ``"updated"`` or ``"unchanged"``. A change the server cannot apply in
    place (storage, retention) raises the server's error; nothing is deleted to force it.
    Where an existing durable started (its deliver policy) is left as it is.

    A stream that exists keeps its replica count unless ``rescale``: the count belongs to
    the deployment (``tickwire streams ensure --replicas 3`` on a cluster), and a worker
    ensuring its streams at start-up with the R1 default must not scale an R3 stream down.
    """
    report: dict[str, str] = {}
    for stream in streams:
        report[stream.name] = await _ensure_stream(js, stream, rescale=rescale)
    for consumer in consumers:
        report[consumer.label] = await _ensure_consumer(js, consumer)
    return report


async def _ensure_stream(js: JetStreamManager, spec: StreamSpec, *, rescale: bool) -> str:
    try:
        info = await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(to_stream_config(spec))
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            # Created concurrently by another process, with other values: update it.
            info = await js.stream_info(spec.name)
        else:
            return CREATED
    if not rescale:
        spec = msgspec.structs.replace(spec, replicas=info.config.num_replicas or 1)
    if not stream_diff(spec, info.config):
        return UNCHANGED
    await js.update_stream(info.config.evolve(**_stream_fields(spec)))
    return UPDATED


async def _ensure_consumer(js: JetStreamManager, spec: ConsumerSpec) -> str:
    try:
        info: api.ConsumerInfo = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        # Creating a durable is create-or-update on the server: a concurrent creator with
        # the same values is harmless.
        await js.add_consumer(spec.stream, to_consumer_config(spec))
        return CREATED
    if not consumer_diff(spec, info.config):
        return UNCHANGED
    await js.add_consumer(spec.stream, info.config.evolve(**_consumer_fields(spec)))
    return UPDATED


async def stored_subjects(js: JetStreamManager, stream: str, prefix: str) -> list[str]:
    """What follows ``prefix`` in each subject of ``stream`` that holds a message, sorted, as
    the stream's state lists them: a KV bucket's keys (``$KV.<bucket>.``), an object
    store's encoded names (``$O.<bucket>.M.``).

    Not ``KeyValue.keys()`` nor ``ObjectStore.list()``: their watch can say every entry was
    delivered before the last ones arrive (nats-io/nats.py#842), and a listing would then
    miss entries.
    """
    info = await js.stream_info(stream, subjects_filter=prefix + ">")
    return sorted(s.removeprefix(prefix) for s in info.state.subjects or {})
