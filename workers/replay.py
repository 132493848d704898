"""Isolated replays: a range of a live stream copied into a namespace of its own.

``create`` makes the namespace's stream a JetStream *sourced* stream of the live one: the
server copies the messages from the first sequence at or after ``start``, through a subject
transform that moves ``ticks.<feed>.<symbol>`` to ``ns.<name>.ticks.<feed>.<symbol>`` (and
likewise for the per-timeframe domains). The transforms' sources double as the feed and
symbol filter. Once the copy has passed the last sequence at or before ``end`` the source
is removed, and what it copied beyond that sequence is deleted again, so the namespace
holds exactly the range. Nothing is written to, or read from, a live consumer.

The pipeline then runs in the namespace (``TICKWIRE_NAMESPACE``): its consumers, streams,
subjects, object stores and key-value buckets all carry the name. So that it computes what
live computed, ``create`` also copies what live decides with: the active models of the
range's series (artifacts, cards and pointers, byte for byte) into the namespace's model
registry and the signal policy's run-time entry into the namespace's policy bucket. The
range and filter are recorded in the namespace stream's metadata, for ``diff``.

``diff`` compares what the namespace produced with what live produced for the same range:
the candles, feature vectors, scores and signals of the recorded feed and symbols whose
period overlaps the event time of the replayed messages, read from the JetStream streams
and keyed by their natural key; payloads are compared byte for byte. ``delete`` removes
every stream, bucket and object store of the namespace, its QuestDB tables and its
PostgreSQL schema (those two also once the streams are gone: the CLI says when it kept them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StreamConfig,
    StreamSource,
    SubjectTransform,
)
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from tqdm import tqdm

from contracts import subjects
from contracts.codec import Codec, ContractError
from contracts.messages import Bar, Tick, TickBatch, TickInput, Timeframe, Watermark
from contracts.streams import (
    CANDLES,
    FEATURES,
    SCORES,
    SIGNALS,
    TICKS,
    ensure,
    stored_subjects,
    stream_name,
    stream_specs,
)
from db import questdb
from db.queries import query
from workers.candle_ingest.app import STATE_BUCKET
from workers.feature_builder.app import STATE_BUCKET as FEATURES_STATE_BUCKET
from workers.registry.store import (
    ACTIVE_PREFIX,
    CARD_SUFFIX,
    KV_HISTORY,
    MODEL_SUFFIX,
    bucket_name,
)
from workers.registry.store import BUCKET as REGISTRY_BUCKET
from workers.runtime import partition
from workers.signal_publisher.policy import POLICY_BUCKET, POLICY_KEY, SIDES_BUCKET, kv_bucket

log = logging.getLogger(__name__)

SOURCE_HEADER: Final = "Nats-Stream-Source"
DOMAINS: Final = {
    "TICKS": subjects.TICKS,
    "CANDLES": subjects.CANDLES,
    "FEATURES": subjects.FEATURES,
    "SCORES": subjects.SCORES,
    "SIGNALS": subjects.SIGNALS,
}
"""Live streams a replay can start from, and their subject domain."""
POLL_S: Final = 0.1
CLI_TIMEOUT_S: Final = 900.0
META: Final = "tickwire.replay."
"""Prefix of the metadata keys that record a replay on its namespace's stream."""
COMPARED: Final = (CANDLES, FEATURES, SCORES, SIGNALS)
"""Streams ``diff`` compares: those of them that come after the replayed one."""
SHOWN: Final = 5
"""Differing keys printed per stream."""
READ_BATCH: Final = 1000
"""Messages fetched at once by ``diff``."""


class ReplayError(Exception):
    """A replay cannot be made or removed as asked; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Replay:
    name: str
    stream: str
    """The live stream copied."""
    first_seq: int
    last_seq: int
    """The live stream's sequences of the range, both included."""
    copied: int
    """Messages in the namespace's stream (after the feed and symbol filter)."""
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    feed: str | None = None
    symbols: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    """Active model versions copied from the live registry."""
    policy: bool = False
    """Whether a live run-time signal policy was copied."""

    def metadata(self) -> dict[str, str]:
        assert self.start is not None
        assert self.end is not None
        return {
            META + "stream": self.stream,
            META + "from": self.start.isoformat(),
            META + "to": self.end.isoformat(),
            META + "feed": self.feed or "",
            META + "symbols": json.dumps(list(self.symbols)),
            META + "first_seq": str(self.first_seq),
            META + "last_seq": str(self.last_seq),
            META + "models": json.dumps(list(self.models)),
        }

    @classmethod
    def from_metadata(cls, name: str, copied: int, meta: dict[str, str]) -> Replay:
        try:
            return cls(
                name,
                meta[META + "stream"],
                int(meta[META + "first_seq"]),
                int(meta[META + "last_seq"]),
                copied,
                dt.datetime.fromisoformat(meta[META + "from"]),
                dt.datetime.fromisoformat(meta[META + "to"]),
                meta[META + "feed"] or None,
                tuple(json.loads(meta[META + "symbols"])),
                tuple(json.loads(meta.get(META + "models", "[]"))),
            )
        except (KeyError, ValueError) as exc:
            raise ReplayError(
                f"replay {name!r} has no readable record of its range: {exc}"
            ) from None


PIPELINE_STREAMS: Final = tuple(spec.name for spec in stream_specs())
"""Live names of the pipeline streams; a namespace's are ``NS_<name>_<live name>``."""
NAMESPACE_BUCKETS: Final = (
    REGISTRY_BUCKET,
    STATE_BUCKET,
    FEATURES_STATE_BUCKET,
    POLICY_BUCKET,
    SIDES_BUCKET,
)
"""The buckets (KV and object stores) the pipeline makes in a namespace, ``ns-<name>-<b>``."""


def owner(stream: str, known: Iterable[str] = ()) -> str | None:
    """The namespace a stream on the server belongs to; None for a live one.

    Names may hold ``_`` and ``-``, so a namespace is never matched by prefix alone (``u``
    would take ``u_b``'s streams): a pipeline stream ends in one of the pipeline's names, a
    bucket in one of ``NAMESPACE_BUCKETS``; a bucket of another name (a signal policy
    bucket set by hand) goes to the longest ``known`` namespace it starts with.
    """
    if stream.startswith("NS_"):
        for base in PIPELINE_STREAMS:
            if stream.endswith(f"_{base}") and len(stream) > len(base) + 4:
                return stream[3 : -len(base) - 1]
        return None
    for kind in ("KV_ns-", "OBJ_ns-"):
        if stream.startswith(kind):
            rest = stream[len(kind) :]
            for base in NAMESPACE_BUCKETS:
                if rest.endswith(f"-{base}") and len(rest) > len(base) + 1:
                    return rest[: -len(base) - 1]
            starting = [n for n in known if rest.startswith(f"{n}-")]
            return max(starting, key=len) if starting else None
    return None


async def _stream_names(js: JetStreamContext) -> list[str]:
    return [s.config.name for s in await partition.every_stream(js) if s.config.name]


def _namespaces(every: Iterable[str]) -> set[str]:
    """The namespaces that have a pipeline stream among the streams ``every``."""
    return {n for s in every if s.startswith("NS_") and (n := owner(s)) is not None}


def _of(every: Sequence[str], name: str) -> list[str]:
    known = _namespaces(every) | {name}
    return sorted(s for s in every if owner(s, known) == name)


async def streams_of(js: JetStreamContext, name: str) -> list[str]:
    """Every stream, object store and KV bucket of namespace ``name``."""
    return _of(await _stream_names(js), name)


def transforms(
    domain: str, name: str, feed: str | None, symbols: Sequence[str]
) -> list[SubjectTransform]:
    """Live subjects of the range (one per symbol, or the feed, or all) to the namespace's."""
    tail = 1 if domain != subjects.TICKS else 0  # the timeframe token
    feed_token = "*" if feed is None else subjects.check_name(feed, "feed")
    tokens = [[feed_token, subjects.escape(subjects.check_symbol(s))] for s in symbols] or [
        [feed_token, "*"]
    ]
    out = []
    for pattern in tokens:
        pattern = [*pattern, *["*"] * tail]
        n = 0
        dest = []
        for token in pattern:
            if token == "*":
                n += 1
                dest.append(f"{{{{wildcard({n})}}}}")
            else:
                dest.append(token)
        out.append(
            SubjectTransform(
                src=".".join([domain, *pattern]),
                dest=".".join([subjects.NAMESPACE, name, domain, *dest]),
            )
        )
    return out


async def _time_of(js: JetStreamContext, stream: str, seq: int) -> tuple[int, dt.datetime] | None:
    """(seq, stream time) of the first message at or after ``seq``."""
    try:
        msg = await js.get_msg(stream, seq, next=True)
    except NotFoundError:
        return None
    assert msg.seq is not None
    assert msg.time is not None
    return msg.seq, msg.time


async def first_at_or_after(js: JetStreamContext, stream: str, t: dt.datetime) -> int | None:
    """The first sequence stored at or after ``t``, by binary search over stream time."""
    state = (await js.stream_info(stream)).state
    lo, hi, found = state.first_seq, state.last_seq, None
    while lo <= hi:
        mid = (lo + hi) // 2
        got = await _time_of(js, stream, mid)
        if got is None:
            hi = mid - 1
            continue
        seq, time = got
        if time >= t:
            found, hi = seq, mid - 1
        else:
            lo = seq + 1
    return found


async def create(
    js: JetStreamContext,
    name: str,
    *,
    stream: str,
    start: dt.datetime,
    end: dt.datetime,
    feed: str | None = None,
    symbols: Sequence[str] = (),
    timeout_s: float = 600.0,
) -> Replay:
    """Copy ``stream`` from ``start`` (included) to ``end`` (excluded) into namespace
    ``name``, with the namespace's other streams empty beside it."""
    subjects.check_name(name, "replay name")
    if stream not in DOMAINS:
        raise ReplayError(f"unknown stream {stream!r}: one of {', '.join(DOMAINS)}")
    if end <= start:
        raise ReplayError(f"--to {end.isoformat()} is not after --from {start.isoformat()}")
    if symbols and feed is None:
        raise ReplayError("--symbols needs --feed: a symbol's prices are per feed")
    domain = DOMAINS[stream]
    wanted = transforms(domain, name, feed, symbols)
    every = await _stream_names(js)
    if existing := _of(every, name):
        raise ReplayError(f"namespace {name!r} exists ({', '.join(existing)})")
    if sharing := sharing_tables(name, _namespaces(every)):
        raise ReplayError(
            f"replay name {name!r} would share QuestDB tables with replay {sharing[0]!r}"
            " (QuestDB ignores case, and '-' becomes '_' in table names): choose another"
        )
    try:
        await js.stream_info(stream)
    except NotFoundError:
        raise ReplayError(f"stream {stream} does not exist on this server") from None
    first = await first_at_or_after(js, stream, start)
    after = await first_at_or_after(js, stream, end)
    last = (after - 1) if after is not None else (await js.stream_info(stream)).state.last_seq
    if first is None or first > last:
        raise ReplayError(f"{stream} holds no message from {start} to {end}")
    last_wanted = await last_matching(js, stream, first, last, [t.src for t in wanted])
    if last_wanted is None:
        of = f" of {feed} {' '.join(symbols)}".rstrip() if feed is not None else ""
        raise ReplayError(f"{stream} holds no message{of} from {start} to {end}")

    specs = stream_specs(namespace=name)
    target = stream_name(stream, namespace=name)
    spec = next(s for s in specs if s.name == target)
    await ensure(js, [s for s in specs if s.name != target])
    await ensure(js, [spec])
    info = await js.stream_info(target)
    sourced = info.config.evolve(
        sources=[StreamSource(name=stream, opt_start_seq=first, subject_transforms=wanted)]
    )
    await js.update_stream(sourced)
    try:
        await _wait_copied(js, stream, target, first, last_wanted, timeout_s)
    except BaseException:
        await delete(js, name)
        raise
    try:
        unsourced = _without_sources(sourced)
        await js.update_stream(unsourced)
        await _cut_after(js, target, last)
        copied = (await js.stream_info(target)).state.messages
        models = await copy_models(js, name, feed, symbols)
        policy = await copy_policy(js, name)
        r = Replay(
            name, stream, first, last, copied, start, end, feed, tuple(symbols), models, policy
        )
        await js.update_stream(
            unsourced.evolve(metadata={**(unsourced.metadata or {}), **r.metadata()})
        )
    except BaseException:
        await delete(js, name)
        raise
    log.info("replay %s: %s seq %d..%d, %d messages", name, stream, first, last, copied)
    return r


def _without_sources(config: StreamConfig) -> StreamConfig:
    return config.evolve(sources=None)


def _series_wanted(key: str, feed: str | None, symbols: Sequence[str]) -> bool:
    """Whether an active-model key (``active.<feed>.<symbol token>.<tf>``) is in the filter."""
    tokens = key.split(".")
    if len(tokens) != 4 or tokens[0] != ACTIVE_PREFIX:
        return False
    if feed is not None and tokens[1] != feed:
        return False
    return not symbols or tokens[2] in {subjects.escape(s) for s in symbols}


async def copy_models(
    js: JetStreamContext, name: str, feed: str | None, symbols: Sequence[str]
) -> tuple[str, ...]:
    """The live registry's active models of the filter's series, into the namespace's
    registry as they are (artifact, card, pointer): the replay scores with the models live
    scores with now. Returns the versions copied; none when live has no registry."""
    live = bucket_name()
    try:
        live_objects = await js.object_store(live)
        live_pointers = await js.key_value(live)
    except BucketNotFoundError:
        return ()
    keys = [k for k in await _kv_keys(js, live) if _series_wanted(k, feed, symbols)]
    ns = bucket_name(name)
    objects = await js.create_object_store(ns, description="tickwire model files")
    pointers = await js.create_key_value(
        bucket=ns, history=KV_HISTORY, description="tickwire active models"
    )
    versions: list[str] = []
    for key in keys:
        try:
            entry = await live_pointers.get(key)
        except KeyNotFoundError:
            continue  # deleted since listed
        if not entry.value:
            continue
        version = msgspec.json.decode(entry.value)["version"]
        if version not in versions:
            for suffix in (MODEL_SUFFIX, CARD_SUFFIX):  # the card last, as the registry does
                got = await live_objects.get(version + suffix)
                await objects.put(version + suffix, bytes(got.data or b""))
            versions.append(version)
        await pointers.put(key, entry.value)
    return tuple(versions)


async def _kv_keys(js: JetStreamContext, bucket: str) -> list[str]:
    """Every key a KV bucket holds an entry for (deleted ones too)."""
    return await stored_subjects(js, f"KV_{bucket}", f"$KV.{bucket}.")


async def copy_policy(js: JetStreamContext, name: str, base: str = POLICY_BUCKET) -> bool:
    """The live run-time signal policy (its KV entry), into the namespace's policy bucket."""
    try:
        entry = await (await js.key_value(base)).get(POLICY_KEY)
    except (BucketNotFoundError, KeyNotFoundError):
        return False
    if not entry.value:
        return False
    kv = await js.create_key_value(bucket=kv_bucket(base, name), history=5)
    await kv.put(POLICY_KEY, entry.value)
    return True


async def _next_matching(
    js: JetStreamContext, stream: str, seq: int, filters: Sequence[str]
) -> int | None:
    """The first sequence at or after ``seq`` on any of ``filters``."""
    found = []
    for subject in filters:
        try:
            msg = await js.get_msg(stream, seq, subject=subject, next=True)
        except NotFoundError:
            continue
        if msg.seq is not None:
            found.append(msg.seq)
    return min(found, default=None)


async def last_matching(
    js: JetStreamContext, stream: str, first: int, last: int, filters: Sequence[str]
) -> int | None:
    """The last sequence from ``first`` to ``last`` on any of ``filters``: what a copy of
    that range must have reached to be whole. None when the range holds none."""
    found = await _next_matching(js, stream, first, filters)
    if found is None or found > last:
        return None
    lo, hi = found + 1, last
    while lo <= hi:  # found is on a filter; is there one in [lo, last]?
        mid = (lo + hi) // 2
        seq = await _next_matching(js, stream, mid, filters)
        if seq is not None and seq <= last:
            found, lo = seq, seq + 1
        else:
            hi = mid - 1
    return found


async def _wait_copied(
    js: JetStreamContext, live: str, target: str, first: int, last: int, timeout_s: float
) -> None:
    """Until the target holds the copy of live sequence ``last``, the last one the range
    holds on the source's filters: a source copies in order, so all before it are there.
    (The source's own ``lag`` counts what its filter still has to copy, not sequences.)"""
    progress = tqdm(total=last - first + 1, desc=f"copying {live}", unit="msg", disable=None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            info = await js.stream_info(target)
            source = info.sources[0] if info.sources else None
            if source is not None and source.error:
                raise ReplayError(f"copying {live} failed: {source.error}")
            reached = 0
            if info.state.messages:
                with contextlib.suppress(NotFoundError):
                    newest = await js.get_msg(target, info.state.last_seq)
                    reached = _origin_seq(newest.headers) or 0
            progress.update(max(0, min(reached, last) - first + 1) - progress.n)
            if reached >= last:
                return
            if loop.time() > deadline:
                raise ReplayError(f"copying {live} did not finish in {timeout_s:g}s")
            await asyncio.sleep(POLL_S)  # the server reports progress only when asked
    finally:
        progress.close()


def _origin_seq(headers: dict[str, str] | None) -> int | None:
    """The live stream sequence of a sourced message, from ``Nats-Stream-Source``."""
    value = (headers or {}).get(SOURCE_HEADER)
    if not value:
        return None
    parts = value.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


async def _cut_after(js: JetStreamContext, target: str, last: int) -> None:
    """Delete what the source copied past ``last``: the newest messages, newest first."""
    seq = (await js.stream_info(target)).state.last_seq
    while seq > 0:
        try:
            msg = await js.get_msg(target, seq)
        except NotFoundError:
            seq -= 1
            continue
        origin = _origin_seq(msg.headers)
        if origin is None or origin <= last:
            return
        await js.delete_msg(target, seq)
        seq -= 1


async def delete(
    js: JetStreamContext,
    name: str,
    *,
    questdb_http: str | None = None,
    postgres_dsn: str | None = None,
) -> list[str]:
    """Remove every stream, consumer, object store and bucket of namespace ``name``, its
    QuestDB tables when ``questdb_http`` is given, and its PostgreSQL schema when
    ``postgres_dsn`` (an admin's: the schema's owner) is given; the tables and schema also
    when its streams are gone already (deleted without them)."""
    subjects.check_name(name, "replay name")
    every = await _stream_names(js)
    removed = _of(every, name)
    if not removed and questdb_http is None and postgres_dsn is None:
        raise ReplayError(f"no replay named {name!r}")
    for stream in removed:
        await js.delete_stream(stream)
    sharing = sharing_tables(name, _namespaces(every))
    if questdb_http is not None and sharing:
        log.warning(
            "QuestDB tables %s* kept: replay %r uses them too",
            questdb.namespace_prefix(name),
            sharing[0],
        )
    elif questdb_http is not None:
        try:
            tables = await asyncio.to_thread(
                questdb.drop_tables, questdb_http, table_prefix=questdb.namespace_prefix(name)
            )
        except questdb.QuestDBError as exc:
            raise ReplayError(f"streams deleted, QuestDB tables not: {exc}") from exc
        removed += [f"QuestDB {t}" for t in tables]
    if postgres_dsn is not None:
        try:
            schema = await drop_schema(postgres_dsn, name)
        except Exception as exc:
            raise ReplayError(f"streams deleted, PostgreSQL schema not: {exc}") from exc
        if schema is not None:
            removed.append(f"PostgreSQL schema {schema}")
    if not removed:
        raise ReplayError(f"no replay named {name!r}")
    return removed


def postgres_schema(name: str) -> str:
    """The PostgreSQL schema of namespace ``name``, as ``market.namespace_schema`` names it."""
    return f"ns_{name}"


async def drop_schema(dsn: str, name: str) -> str | None:
    """Drop the namespace's schema (``ns_<name>``); its name, or None when there was none."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        async with conn.transaction():
            schema: str = await conn.fetchval(query("replay_namespace_schema"), name)
            dropped = await conn.fetchval(query("replay_drop_namespace"), name)
    finally:
        await conn.close()
    return schema if dropped else None


async def names(js: JetStreamContext) -> list[str]:
    """Every namespace that has a pipeline stream."""
    return sorted(_namespaces(await _stream_names(js)))


def sharing_tables(name: str, others: Iterable[str]) -> list[str]:
    """Other namespaces whose QuestDB tables are ``name``'s: QuestDB ignores the case of
    table names, and ``-`` in a namespace becomes ``_`` in its table prefix."""
    prefix = questdb.namespace_prefix(name).lower()
    return sorted(n for n in others if n != name and questdb.namespace_prefix(n).lower() == prefix)


# --- diff ------------------------------------------------------------------------------


async def recorded(js: JetStreamContext, name: str) -> Replay:
    """The replay ``name`` as ``create`` recorded it on its namespace's stream."""
    subjects.check_name(name, "replay name")
    for base in DOMAINS:
        try:
            info = await js.stream_info(stream_name(base, namespace=name))
        except NotFoundError:
            continue
        meta = info.config.metadata or {}
        if META + "stream" in meta:
            return Replay.from_metadata(name, info.state.messages, meta)
    if await streams_of(js, name):
        raise ReplayError(f"namespace {name!r} was not made by `tickwire replay create`")
    raise ReplayError(f"no replay named {name!r}")


class _Key(msgspec.Struct):
    """The natural-key fields of a candle, feature vector, score or signal."""

    feed: str
    symbol: str
    tf: Timeframe
    open_time_ms: int
    revision: int | None = None
    candle_revision: int | None = None
    feature_set_id: str | None = None
    model_version: str | None = None
    close_time_ms: int | None = None
    """The end of its candle's period, where the message carries it (not a signal)."""

    def key(self) -> tuple[Any, ...]:
        revision = self.revision if self.revision is not None else self.candle_revision
        out: tuple[Any, ...] = (self.feed, self.symbol, self.tf.value, self.open_time_ms)
        out += (revision,)
        if self.feature_set_id is not None and self.model_version is None:
            out += (self.feature_set_id,)  # feature vectors: one per feature set
        if self.model_version is not None:
            out += (self.model_version,)
        return out


_key_decoder: Final = msgspec.json.Decoder(_Key)


def label(key: tuple[Any, ...]) -> str:
    """``feed|symbol|tf|open time (UTC)|revision[|feature set or model version]``."""
    opened = dt.datetime.fromtimestamp(key[3] / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return "|".join(str(k) for k in (*key[:3], opened, *key[4:]))


@dataclass
class StreamDiff:
    """One stream's comparison: payloads by natural key, live and replayed."""

    stream: str
    live: dict[tuple[Any, ...], bytes] = field(default_factory=dict)
    replay: dict[tuple[Any, ...], bytes] = field(default_factory=dict)

    @property
    def equal(self) -> list[tuple[Any, ...]]:
        return sorted(k for k, v in self.replay.items() if self.live.get(k) == v)

    @property
    def differing(self) -> list[tuple[Any, ...]]:
        return sorted(k for k, v in self.replay.items() if k in self.live and self.live[k] != v)

    @property
    def only_live(self) -> list[tuple[Any, ...]]:
        return sorted(self.live.keys() - self.replay.keys())

    @property
    def only_replay(self) -> list[tuple[Any, ...]]:
        return sorted(self.replay.keys() - self.live.keys())

    @property
    def identical(self) -> bool:
        return self.live == self.replay

    def fields(self, key: tuple[Any, ...]) -> list[tuple[str, Any, Any]]:
        """``(field, live value, replayed value)`` of each field that differs."""
        a = json.loads(self.live[key])
        b = json.loads(self.replay[key])
        names = list(dict.fromkeys([*a, *b]))
        return [(n, a.get(n), b.get(n)) for n in names if a.get(n) != b.get(n)]


@dataclass
class Diff:
    replay: Replay
    window_ms: tuple[int, int] | None
    """Event time of the replayed messages, first and last; None when there were none."""
    streams: list[StreamDiff]

    @property
    def identical(self) -> bool:
        return all(s.identical for s in self.streams)


def _event_times(m: Any) -> Iterable[int]:
    if isinstance(m, Tick | Watermark):
        yield m.time_ms
    elif isinstance(m, TickBatch):
        yield from (t.time_ms for t in m.ticks)
    elif isinstance(m, Bar):
        yield m.open_time_ms
        yield m.open_time_ms + m.tf.ms - 1
    else:
        yield m.open_time_ms


async def _read(
    nc: Client,
    stream: str,
    filters: Sequence[str],
    *,
    start: dt.datetime | None,
    desc: str,
) -> list[tuple[str, bytes]]:
    """``(subject, payload)`` of every message of ``stream`` on ``filters`` (from stream
    time ``start``), in stream order, through a consumer of its own that acks nothing."""
    js = nc.jetstream()
    consumer = f"replay-diff-{secrets.token_hex(4)}"
    config = ConsumerConfig(
        name=consumer,
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.ALL if start is None else DeliverPolicy.BY_START_TIME,
        opt_start_time=start,
        filter_subjects=list(filters),
        inactive_threshold=60.0,
        mem_storage=True,
    )
    info = await js.add_consumer(stream, config)
    total = info.num_pending or 0
    out: list[tuple[str, bytes]] = []
    progress = tqdm(total=total, desc=desc, unit="msg", disable=None, leave=False)
    try:
        if total:
            sub = await js.pull_subscribe_bind(consumer, stream)
            try:
                while len(out) < total:
                    try:
                        msgs = await sub.fetch(min(READ_BATCH, total - len(out)), timeout=5)
                    except TimeoutError:
                        if not (await js.consumer_info(stream, consumer)).num_pending:
                            break  # the rest is gone from the stream (its age limit)
                        continue
                    out.extend((m.subject, m.data) for m in msgs)
                    progress.update(len(msgs))
            finally:
                await sub.unsubscribe()
    finally:
        progress.close()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, consumer)
    return out[:total]


def _filters(domain: str, r: Replay, namespace: str | None) -> list[str]:
    """The subjects of the replay's feed and symbols in ``domain``."""
    prefix = "" if namespace is None else f"{subjects.NAMESPACE}.{namespace}."
    feed = "*" if r.feed is None else r.feed
    symbols = [subjects.escape(s) for s in r.symbols] or ["*"]
    tail = ".*" if domain != subjects.TICKS else ""
    return [f"{prefix}{domain}.{feed}.{s}{tail}" for s in symbols]


def _period_end(key: tuple[Any, ...], payload: bytes) -> int:
    """Where the period of a keyed message ends: its close time, or (a signal) its open
    time plus the timeframe's length, an hour off for an H4 or D1 candle over a change of a
    server's clock."""
    close = _key_decoder.decode(payload).close_time_ms
    return int(key[3]) + Timeframe(key[2]).ms if close is None else close


def _keyed(messages: Iterable[tuple[str, bytes]], what: str) -> dict[tuple[Any, ...], bytes]:
    out: dict[tuple[Any, ...], bytes] = {}
    for subject, payload in messages:
        try:
            k = _key_decoder.decode(payload).key()
        except (msgspec.DecodeError, ValueError):
            log.warning("%s: not a %s payload on %s, left out", what, what, subject)
            continue
        out[k] = payload  # a later message of the same key is what a reader sees last
    return out


async def diff(nc: Client, name: str) -> Diff:
    """What the namespace produced against what live produced for the replay's range."""
    js = nc.jetstream()
    r = await recorded(js, name)
    source = stream_name(r.stream, namespace=name)
    codec: Codec[Any] = Codec(TickInput) if r.stream == TICKS else Codec(_Key)
    times: list[int] = []
    for _, payload in await _read(nc, source, [">"], start=None, desc=f"reading {source}"):
        with contextlib.suppress(ContractError):
            times.extend(_event_times(codec.decode(payload)))
    window = (min(times), max(times)) if times else None
    compared = list(COMPARED[COMPARED.index(r.stream) + 1 :] if r.stream in COMPARED else COMPARED)
    out = []
    for base in compared:
        domain = DOMAINS[base]
        d = StreamDiff(base)
        replayed = await _read(
            nc,
            stream_name(base, namespace=name),
            _filters(domain, r, name),
            start=None,
            desc=f"reading {stream_name(base, namespace=name)}",
        )
        d.replay = _keyed(replayed, base)
        if window is not None:
            lo, hi = window
            live = _keyed(
                await _read(
                    nc, base, _filters(domain, r, None), start=r.start, desc=f"reading {base}"
                ),
                base,
            )
            # a period overlapping the replayed event time: [open, close) meets [lo, hi]
            d.live = {k: v for k, v in live.items() if k[3] <= hi and _period_end(k, v) > lo}
        out.append(d)
    return Diff(r, window, out)


def report(d: Diff, out: TextIO) -> None:
    """The comparison as a table, then the first differing keys of each stream."""
    r = d.replay
    scope = f"feed {r.feed}" if r.feed else "every feed"
    if r.symbols:
        scope += f", symbols {' '.join(r.symbols)}"
    out.write(f"replay {r.name}: {r.stream} seq {r.first_seq}..{r.last_seq}, {scope}\n")
    if d.window_ms is not None:
        lo, hi = (dt.datetime.fromtimestamp(t / 1000, dt.UTC).isoformat() for t in d.window_ms)
        out.write(f"event time {lo} .. {hi}\n")
    head = ("stream", "live", "replay", "equal", "differing", "only-live", "only-replay")
    rows = [head] + [
        (
            s.stream,
            *(str(n) for n in (len(s.live), len(s.replay), len(s.equal), len(s.differing))),
            str(len(s.only_live)),
            str(len(s.only_replay)),
        )
        for s in d.streams
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        out.write(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            + "\n"
        )
    for s in d.streams:
        for key in s.differing[:SHOWN]:
            changes = "; ".join(f"{f} live={a!r} replay={b!r}" for f, a, b in s.fields(key))
            out.write(f"{s.stream} differs at {label(key)}: {changes}\n")
        for what, keys in (("only live", s.only_live), ("only replay", s.only_replay)):
            for key in keys[:SHOWN]:
                out.write(f"{s.stream} {what}: {label(key)}\n")
    out.write("identical\n" if d.identical else "differ\n")


# --- tickwire replay create | list | delete --------------------------------------------


def _time(text: str, flag: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(f"{flag}: not an ISO date or time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def run(args: argparse.Namespace) -> int:
    """The CLI: one line on stderr and exit code 2 for anything refused, nothing changed."""
    from workers.runtime.connection import connect_once
    from workers.runtime.settings import RuntimeSettings, load

    settings = load(RuntimeSettings)

    async def go() -> int:
        try:
            nc = await connect_once(settings, "tickwire-replay")
        except (TimeoutError, OSError) as exc:
            raise ReplayError(f"NATS at {settings.nats_url} did not answer: {exc!r}") from None
        js = nc.jetstream()
        try:
            if args.action == "create":
                r = await create(
                    js,
                    args.name,
                    stream=args.stream,
                    start=_time(args.start, "--from"),
                    end=_time(args.end, "--to"),
                    feed=args.feed,
                    symbols=args.symbols or (),
                )
                print(
                    f"replay {r.name}: {r.copied} messages of {r.stream} "
                    f"(seq {r.first_seq}..{r.last_seq}) in {stream_name(r.stream, namespace=r.name)}"
                )
                print(f"active models copied: {', '.join(r.models) or 'none'}")
                print(f"signal policy entry copied: {'yes' if r.policy else 'none live'}")
                print(f"run the pipeline on it with TICKWIRE_NAMESPACE={r.name}")
            elif args.action == "list":
                for name in await names(js):
                    print(name)
            elif args.action == "diff":
                result = await diff(nc, args.name)
                report(result, sys.stdout)
                return 0 if result.identical else 1
            else:
                qdb = os.environ.get("TICKWIRE_QUESTDB_HTTP")
                pg = os.environ.get("TICKWIRE_POSTGRES_DSN")
                for stream in await delete(js, args.name, questdb_http=qdb, postgres_dsn=pg):
                    print(f"deleted {stream}")
                # kept, they would hold this replay's rows for one made again under the name
                if pg is None:
                    sys.stderr.write(
                        f"tickwire replay: PostgreSQL schema {postgres_schema(args.name)},"
                        " if any, kept (no TICKWIRE_POSTGRES_DSN): drop it with"
                        " TICKWIRE_POSTGRES_DSN=<admin DSN> tickwire replay delete"
                        f" {args.name}\n"
                    )
                if qdb is None:
                    sys.stderr.write(
                        f"tickwire replay: QuestDB tables {questdb.namespace_prefix(args.name)}*,"
                        " if any, kept (no TICKWIRE_QUESTDB_HTTP): drop them with"
                        " TICKWIRE_QUESTDB_HTTP=<QuestDB HTTP URL> tickwire replay delete"
                        f" {args.name}\n"
                    )
            return 0
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(go(), CLI_TIMEOUT_S))
    except (ReplayError, subjects.SubjectError) as exc:
        sys.stderr.write(f"tickwire replay: {exc}\n")
    except TimeoutError:
        sys.stderr.write(f"tickwire replay: {args.action} did not finish in {CLI_TIMEOUT_S:g}s\n")
    return 2
