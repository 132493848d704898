"""Isolated replays on the real NATS server: exactly the range, only the filter, live untouched,
every trace removed, bad arguments refused without a change."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from contracts import streams, subjects
from db import questdb as qdb
from db.migrate import migrate
from infra.stack import QuestDBUrls
from workers import replay

ROOT = Path(__file__).resolve().parents[2]
SYMBOLS = ("EURUSD", "US500.cash", "XAUUSD")
FEEDS = ("feed-a", "feed-b")


async def publish(js: JetStreamContext, tag: str, n: int) -> list[int]:
    """``n`` messages round-robin over feeds and symbols; their live sequences."""
    seqs = []
    for i in range(n):
        feed, symbol = FEEDS[i % 2], SYMBOLS[i % 3]
        ack = await js.publish(
            subjects.ticks(feed, symbol),
            f'{{"tag":"{tag}","i":{i}}}'.encode(),
            headers={"Nats-Msg-Id": f"{tag}-{i}"},
        )
        seqs.append(ack.seq)
    return seqs


async def stored(js: JetStreamContext, stream: str, seq: int) -> tuple[str, bytes, dt.datetime]:
    msg = await js.get_msg(stream, seq)
    assert msg.subject is not None
    assert msg.data is not None
    assert msg.time is not None
    return msg.subject, msg.data, msg.time


async def contents(js: JetStreamContext, stream: str) -> list[tuple[str, bytes]]:
    state = (await js.stream_info(stream)).state
    out = []
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            subject, data, _ = await stored(js, stream, seq)
        except NotFoundError:
            continue
        out.append((subject, data))
    return out


def live_to(name: str, subject: str) -> str:
    return f"{subjects.NAMESPACE}.{name}.{subject}"


@pytest.fixture
async def live(js: JetStreamContext) -> AsyncIterator[JetStreamContext]:
    """The live streams, for this test only: left behind, the live DLQ (``dlq.*``) would
    overlap the streams other tests make for their workers' dead letters."""
    before = {i.config.name for i in await js.streams_info()}
    await streams.ensure(js, streams.stream_specs())
    yield js
    for spec in streams.stream_specs():
        if spec.name not in before:
            await js.delete_stream(spec.name)


async def live_state(js: JetStreamContext) -> tuple[object, ...]:
    infos = await js.streams_info()
    namespaced = ("NS_", "OBJ_ns-", "KV_ns-")
    live = sorted(n for i in infos if not (n := i.config.name or "").startswith(namespaced))
    ticks = await js.stream_info(streams.TICKS)
    consumers = sorted(c.name for c in await js.consumers_info(streams.TICKS))
    return (live, ticks.state.messages, ticks.state.last_seq, consumers)


async def test_a_replay_holds_exactly_the_range_and_live_is_untouched(
    live: JetStreamContext, unique: str
) -> None:
    js = live
    await js.add_consumer(
        streams.TICKS,
        ConsumerConfig(durable_name=f"watch{unique}", ack_policy=AckPolicy.EXPLICIT),
    )
    before = await publish(js, f"{unique}-before", 30)
    inside = await publish(js, f"{unique}-in", 60)
    after = await publish(js, f"{unique}-after", 30)
    start = (await stored(js, streams.TICKS, inside[0]))[2]
    end = (await stored(js, streams.TICKS, after[0]))[2]
    assert (await stored(js, streams.TICKS, before[-1]))[2] < start < end
    # what the range should hold, read independently from the live stream
    want = []
    for seq in inside:
        subject, data, _ = await stored(js, streams.TICKS, seq)
        want.append((live_to(unique, subject), data))
    state = await live_state(js)

    # the live stream keeps growing while the copy runs
    feeding = asyncio.create_task(publish(js, f"{unique}-live", 200))
    r = await replay.create(js, unique, stream="TICKS", start=start, end=end)
    await feeding

    assert (r.first_seq, r.last_seq) == (inside[0], inside[-1])
    assert r.copied == len(inside)
    target = streams.stream_name(streams.TICKS, namespace=unique)
    assert await contents(js, target) == want
    info = await js.stream_info(target)
    assert not info.config.sources  # the copy is finished, not still following live
    # every stream of the namespace exists, empty but for the copied one
    for spec in streams.stream_specs(namespace=unique):
        got = (await js.stream_info(spec.name)).state.messages
        assert got == (len(inside) if spec.name == target else 0), spec.name

    live_names, messages, last_seq, consumers = await live_state(js)
    assert (live_names, consumers) == (state[0], state[3])
    assert (messages, last_seq) == (state[1] + 200, state[2] + 200)

    await replay.delete(js, unique)


async def test_feed_and_symbol_filter(live: JetStreamContext, unique: str) -> None:
    js = live
    seqs = await publish(js, unique, 60)
    start = (await stored(js, streams.TICKS, seqs[0]))[2]
    end = (await stored(js, streams.TICKS, seqs[-1]))[2] + dt.timedelta(milliseconds=1)
    want = []
    for seq in seqs:
        subject, data, _ = await stored(js, streams.TICKS, seq)
        parsed = subjects.parse(subject)
        if parsed.feed == "feed-b" and parsed.symbol in ("US500.cash", "XAUUSD"):
            want.append((live_to(unique, subject), data))
    assert 0 < len(want) < len(seqs)

    r = await replay.create(
        js,
        unique,
        stream="TICKS",
        start=start,
        end=end,
        feed="feed-b",
        symbols=["US500.cash", "XAUUSD"],
    )
    target = streams.stream_name(streams.TICKS, namespace=unique)
    assert r.copied == len(want)
    assert await contents(js, target) == want
    await replay.delete(js, unique)


async def schemas(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace")}
    finally:
        await conn.close()


async def test_delete_removes_every_trace(
    live: JetStreamContext, unique: str, questdb: QuestDBUrls, pg_dsn: str
) -> None:
    js = live
    seqs = await publish(js, unique, 10)
    start = (await stored(js, streams.TICKS, seqs[0]))[2]
    end = start + dt.timedelta(hours=1)
    await replay.create(js, unique, stream="TICKS", start=start, end=end)
    # what a pipeline run in the namespace leaves behind: consumers, a state object store, a
    # key-value bucket
    target = streams.stream_name(streams.TICKS, namespace=unique)
    await js.add_consumer(target, ConsumerConfig(durable_name="candle-ingest"))
    await js.create_object_store(f"ns-{unique}-candle-ingest-state")
    await js.create_key_value(bucket=f"ns-{unique}-models")
    prefix = qdb.namespace_prefix(unique)
    other = qdb.namespace_prefix(unique + "x")
    for p in (prefix, other):
        await asyncio.to_thread(qdb.apply_ddl, questdb.http, table_prefix=p)
    # and the schemas a namespaced timescale-replicator makes
    await migrate(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        for name in (unique, unique + "x"):
            await conn.fetchval("SELECT market.open_namespace($1)", name)
    finally:
        await conn.close()
    state = await live_state(js)

    deleted = await replay.delete(js, unique, questdb_http=questdb.http, postgres_dsn=pg_dsn)

    assert f"OBJ_ns-{unique}-candle-ingest-state" in deleted
    assert f"KV_ns-{unique}-models" in deleted
    # the namespace's own advisories of its SIGNALS, as its signal-publisher reads them
    assert streams.stream_name(streams.ADVISORIES, namespace=unique) in deleted
    left = [i.config.name for i in await js.streams_info() if unique in (i.config.name or "")]
    assert left == []
    assert unique not in await replay.names(js)
    assert await live_state(js) == state
    tables = await asyncio.to_thread(qdb.query, questdb.http, "SELECT table_name FROM tables()")
    names = {t["table_name"] for t in tables}
    assert f"QuestDB {prefix}candles" in deleted
    assert not any(n.startswith(prefix) for n in names)
    assert f"{other}candles" in names  # another namespace's table stays
    assert f"PostgreSQL schema ns_{unique}" in deleted
    left_schemas = await schemas(pg_dsn)
    assert f"ns_{unique}" not in left_schemas
    assert {"market", f"ns_{unique}x"} <= left_schemas


def cli(*args: str, nats_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TICKWIRE_NATS_URL": nats_url}
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "replay", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_creates_and_refuses_bad_arguments_without_a_change(
    live: JetStreamContext, unique: str, nats_url: str
) -> None:
    js = live
    seqs = await publish(js, unique, 12)
    start = (await stored(js, streams.TICKS, seqs[0]))[2]
    end = start + dt.timedelta(hours=1)
    ok = await asyncio.to_thread(
        cli,
        "create",
        unique,
        "--stream",
        "TICKS",
        "--from",
        start.isoformat(),
        "--to",
        end.isoformat(),
        nats_url=nats_url,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"replay {unique}: {len(seqs)} messages of TICKS" in ok.stdout

    everything = sorted(i.config.name or "" for i in await js.streams_info())
    refused = {
        "unknown stream": ("create", "x" + unique, "--stream", "TOCKS", "--from", "2026-01-01",
                           "--to", "2026-01-02"),
        "T2 before T1": ("create", "x" + unique, "--stream", "TICKS", "--from", "2026-01-02",
                         "--to", "2026-01-01"),
        "bad time": ("create", "x" + unique, "--stream", "TICKS", "--from", "yesterday",
                     "--to", "2026-01-01"),
        "namespace exists": ("create", unique, "--stream", "TICKS", "--from", start.isoformat(),
                             "--to", end.isoformat()),
        "empty range": ("create", "x" + unique, "--stream", "TICKS", "--from", "2001-01-01",
                        "--to", "2001-01-02"),
        "bad name": ("create", "no.dots", "--stream", "TICKS", "--from", "2026-01-01",
                     "--to", "2026-01-02"),
        "symbols without feed": ("create", "x" + unique, "--stream", "TICKS", "--from",
                                 "2026-01-01", "--to", "2026-01-02", "--symbols", "EURUSD"),
        "unknown replay": ("delete", "x" + unique),
        "unknown replay to diff": ("diff", "x" + unique),
        "bad name to diff": ("diff", "no.dots"),
    }  # fmt: skip
    for what, args in refused.items():
        out = await asyncio.to_thread(cli, *args, nats_url=nats_url)
        assert out.returncode == 2, (what, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, (what, out.stderr)
        assert lines[0].startswith("tickwire replay: "), (what, lines)
        assert sorted(i.config.name or "" for i in await js.streams_info()) == everything, what

    gone = await asyncio.to_thread(cli, "delete", unique, nats_url=nats_url)
    assert gone.returncode == 0, gone.stderr
    assert unique not in await replay.names(js)
