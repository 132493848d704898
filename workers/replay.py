"""Isolated replays: a range of a live stream copied into a namespace of its own.

``create`` makes the namespace's stream a JetStream *sourced* stream of the live one: the
server copies the messages from the first sequence at or after ``start``, through a subject
transform that moves ``ticks.<feed>.<symbol>`` to ``ns.<name>.ticks.<feed>.<symbol>`` (and
likewise for the per-timeframe domains). The transforms' sources double as the feed and
symbol filter. Once the copy has passed the last sequence at or before ``end`` the source
is removed, and what it copied beyond that sequence is deleted again, so the namespace
holds exactly the range. Nothing is written to, or read from, a live consumer.

The pipeline then runs in the namespace (``TICKWIRE_NAMESPACE``): its consumers, streams,
subjects, object stores and key-value buckets all carry the name. ``delete`` removes every
one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from nats.js import JetStreamContext
from nats.js.api import StreamConfig, StreamSource, SubjectTransform
from nats.js.errors import NotFoundError
from tqdm import tqdm

from contracts import subjects
from contracts.streams import ensure, stream_name, stream_specs
from db import questdb

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


def _stream_prefixes(name: str) -> tuple[str, ...]:
    """Streams that belong to namespace ``name``: its pipeline streams, object stores and
    key-value buckets (``ns-<name>-...``)."""
    return (f"NS_{name}_", f"OBJ_ns-{name}-", f"KV_ns-{name}-")


async def streams_of(js: JetStreamContext, name: str) -> list[str]:
    prefixes = _stream_prefixes(name)
    return sorted(
        s.config.name
        for s in await js.streams_info()
        if s.config.name and s.config.name.startswith(prefixes)
    )


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
    if existing := await streams_of(js, name):
        raise ReplayError(f"namespace {name!r} exists ({', '.join(existing)})")
    try:
        await js.stream_info(stream)
    except NotFoundError:
        raise ReplayError(f"stream {stream} does not exist on this server") from None
    first = await first_at_or_after(js, stream, start)
    after = await first_at_or_after(js, stream, end)
    last = (after - 1) if after is not None else (await js.stream_info(stream)).state.last_seq
    if first is None or first > last:
        raise ReplayError(f"{stream} holds no message from {start} to {end}")

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
        await _wait_copied(js, stream, target, first, last, timeout_s)
    except BaseException:
        await delete(js, name)
        raise
    await js.update_stream(_without_sources(sourced))
    await _cut_after(js, target, last)
    copied = (await js.stream_info(target)).state.messages
    log.info("replay %s: %s seq %d..%d, %d messages", name, stream, first, last, copied)
    return Replay(name, stream, first, last, copied)


def _without_sources(config: StreamConfig) -> StreamConfig:
    return config.evolve(sources=None)


async def _wait_copied(
    js: JetStreamContext, live: str, target: str, first: int, last: int, timeout_s: float
) -> None:
    """Until the source has gone past ``last`` (the live stream may keep growing)."""
    progress = tqdm(total=last - first + 1, desc=f"copying {live}", unit="msg", disable=None)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        while True:
            live_last = (await js.stream_info(live)).state.last_seq
            info = await js.stream_info(target)
            source = info.sources[0] if info.sources else None
            if source is not None and source.error:
                raise ReplayError(f"copying {live} failed: {source.error}")
            # `active` is -1 until the source has made contact, and its lag means nothing
            if source is not None and source.lag is not None and (source.active or -1) >= 0:
                done = live_last - source.lag  # a lower bound: the live stream only grows
                progress.update(max(0, min(done, last) - first + 1) - progress.n)
                if done >= last:
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


async def delete(js: JetStreamContext, name: str, *, questdb_http: str | None = None) -> list[str]:
    """Remove every stream, consumer, object store and bucket of namespace ``name``, and
    its QuestDB tables when ``questdb_http`` is given."""
    subjects.check_name(name, "replay name")
    names = await streams_of(js, name)
    if not names:
        raise ReplayError(f"no replay named {name!r}")
    for stream in names:
        await js.delete_stream(stream)
    if questdb_http is not None:
        try:
            tables = await asyncio.to_thread(
                questdb.drop_tables, questdb_http, table_prefix=questdb.namespace_prefix(name)
            )
        except questdb.QuestDBError as exc:
            raise ReplayError(f"streams deleted, QuestDB tables not: {exc}") from exc
        names += [f"QuestDB {t}" for t in tables]
    return names


async def names(js: JetStreamContext) -> list[str]:
    """Every namespace that has a pipeline stream."""
    out = set()
    for s in await js.streams_info():
        if s.config.name and s.config.name.startswith("NS_"):
            out.add(s.config.name[3:].rsplit("_", 1)[0])
    return sorted(out)


# --- tickwire replay create | list | delete --------------------------------------------


def _time(text: str, flag: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(f"{flag}: not an ISO date or time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def run(args: argparse.Namespace) -> int:
    """The CLI: one line on stderr and exit code 2 for anything refused, nothing changed."""
    from workers.runtime.connection import connect
    from workers.runtime.settings import RuntimeSettings, load

    settings = load(RuntimeSettings)

    async def go() -> int:
        nc = await connect(settings, name="tickwire-replay")
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
                print(f"run the pipeline on it with TICKWIRE_NAMESPACE={r.name}")
            elif args.action == "list":
                for name in await names(js):
                    print(name)
            else:
                qdb = os.environ.get("TICKWIRE_QUESTDB_HTTP")
                for stream in await delete(js, args.name, questdb_http=qdb):
                    print(f"deleted {stream}")
            return 0
        finally:
            await nc.close()

    try:
        return asyncio.run(asyncio.wait_for(go(), CLI_TIMEOUT_S))
    except (ReplayError, subjects.SubjectError) as exc:
        sys.stderr.write(f"tickwire replay: {exc}\n")
    except TimeoutError:
        sys.stderr.write(f"tickwire replay: no answer from NATS at {settings.nats_url}\n")
    return 2
