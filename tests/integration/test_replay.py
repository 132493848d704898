"""Isolated replays on the real NATS server: exactly the range, only the filter, live untouched,
every trace removed, bad arguments refused without a change."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from contracts import streams, subjects
from db import questdb as qdb
from db.migrate import migrate
from infra.stack import QuestDBUrls
from workers import replay, status

ROOT = Path(__file__).resolve().parents[2]
SYMBOLS = ("EURUSD", "US500.cash", "XAUUSD")
FEEDS = ("feed-a", "feed-b")
STORES = ("TICKWIRE_POSTGRES_DSN", "TICKWIRE_QUESTDB_HTTP")


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


async def test_a_filtered_replay_copies_its_whole_range_however_much_follows_it(
    live: JetStreamContext, unique: str
) -> None:
    """One series is replayed while far more messages of another follow the range on live:
    the copy is whole only once the range's last message of the series is in."""
    js = live
    pad = "x" * 2000  # large enough that the copy takes a while

    async def burst(feed: str, symbol: str, tag: str, n: int) -> list[int]:
        seqs: list[int] = []
        for lo in range(0, n, 200):
            acks = await asyncio.gather(
                *(
                    js.publish(
                        subjects.ticks(feed, symbol),
                        f'{{"tag":"{tag}","i":{i},"pad":"{pad if feed == "feed-a" else ""}"}}'.encode(),
                        headers={"Nats-Msg-Id": f"{tag}-{i}"},
                    )
                    for i in range(lo, min(n, lo + 200))
                )
            )
            seqs += [a.seq for a in acks]
        return sorted(seqs)

    inside = await burst("feed-a", "EURUSD", f"{unique}-in", 4000)
    after = await burst("feed-b", "XAUUSD", f"{unique}-after", 12000)
    start = (await stored(js, streams.TICKS, inside[0]))[2]
    end = (await stored(js, streams.TICKS, after[0]))[2]
    assert start < end
    want = []
    for seq in (inside[0], inside[-1]):
        subject, data, _ = await stored(js, streams.TICKS, seq)
        want.append((live_to(unique, subject), data))

    r = await replay.create(
        js, unique, stream="TICKS", start=start, end=end, feed="feed-a", symbols=["EURUSD"]
    )
    try:
        target = streams.stream_name(streams.TICKS, namespace=unique)
        copied = await contents(js, target)
        assert r.copied == len(copied) == len(inside)
        assert [copied[0], copied[-1]] == want
    finally:
        await replay.delete(js, unique)


async def test_names_that_start_alike_are_separate_replays(
    live: JetStreamContext, unique: str
) -> None:
    """``u``, ``u_b`` and ``u-c`` are three names: none is taken for the start of another.
    Two names QuestDB would give the same tables (``u_b``, ``u-b``) cannot both exist."""
    js = live
    seqs = await publish(js, unique, 6)
    start = (await stored(js, streams.TICKS, seqs[0]))[2]
    end = start + dt.timedelta(hours=1)
    u, u_b, u_c = unique, f"{unique}_b", f"{unique}-c"

    async def make(name: str) -> list[str]:
        await replay.create(js, name, stream="TICKS", start=start, end=end)
        await js.create_key_value(bucket=f"ns-{name}-models")  # as a pipeline run makes it
        return await replay.streams_of(js, name)

    try:
        b_streams = await make(u_b)
        assert f"KV_ns-{u_b}-models" in b_streams
        with pytest.raises(replay.ReplayError, match="no replay named"):
            await replay.delete(js, u)
        assert await replay.streams_of(js, u_b) == b_streams
        with pytest.raises(replay.ReplayError, match="share QuestDB tables"):
            await replay.create(js, f"{unique}-b", stream="TICKS", start=start, end=end)

        c_streams = await make(u_c)
        u_streams = await make(u)  # not refused for u_b or u-c existing
        assert set(u_streams).isdisjoint(b_streams + c_streams)
        assert len(u_streams) == len(b_streams) == len(c_streams)
        assert {u, u_b, u_c} <= set(await replay.names(js))

        assert sorted(await replay.delete(js, u)) == u_streams
        assert await replay.streams_of(js, u_b) == b_streams
        assert await replay.streams_of(js, u_c) == c_streams
        assert u not in await replay.names(js)
    finally:
        for name in (u, u_b, u_c):
            if await replay.streams_of(js, name):
                await replay.delete(js, name)


async def test_replays_and_status_see_more_than_a_page_of_streams(
    live: JetStreamContext, unique: str
) -> None:
    """The server lists streams 256 to a page: a replay, and live TICKS with its consumer's
    lag in ``tickwire status``, are found however many streams sort before them."""
    js = live
    durable = f"watch{unique}"
    await js.add_consumer(
        streams.TICKS, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT)
    )
    seqs = await publish(js, unique, 3)
    start = (await stored(js, streams.TICKS, seqs[0]))[2]
    await replay.create(js, unique, stream="TICKS", start=start, end=start + dt.timedelta(hours=1))
    mine = await replay.streams_of(js, unique)
    fillers = [f"A{unique}{i:03d}" for i in range(260)]  # sort before NS_ and TICKS
    try:
        for name in fillers:
            await js.add_stream(
                StreamConfig(
                    name=name, subjects=[f"fill.{unique}.{name}"], storage=StorageType.MEMORY
                )
            )
        assert await replay.streams_of(js, unique) == mine
        assert unique in await replay.names(js)
        assert streams.TICKS in [s.name for s in await status.every_stream(js)]
        lags = {(x.stream, x.consumer): x for x in await status.every_lag(js)}
        assert lags[(streams.TICKS, durable)].messages >= len(seqs)
        assert sorted(await replay.delete(js, unique)) == mine
    finally:
        for name in fillers:
            await js.delete_stream(name)
        await js.delete_consumer(streams.TICKS, durable)
        if await replay.streams_of(js, unique):
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
    await js.create_object_store(f"ns-{unique}-feature-builder-state")
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
    assert f"OBJ_ns-{unique}-feature-builder-state" in deleted
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


def cli(*args: str, nats_url: str, **more: str) -> subprocess.CompletedProcess[str]:
    """``tickwire replay ARGS``; ``more``: environment variables, those of the stores unset
    unless given."""
    env = {k: v for k, v in os.environ.items() if k not in STORES}
    env |= {"TICKWIRE_NATS_URL": nats_url} | more
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "replay", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_delete_without_a_dsn_says_the_schema_stays_and_how_to_drop_it(
    live: JetStreamContext, unique: str, nats_url: str, pg_dsn: str
) -> None:
    """Kept, the schema's replication_state would take a replay made again under the name
    for this one; the kept schema is said, and dropped by a delete with the DSN after."""
    seqs = await publish(live, unique, 3)
    start = (await stored(live, streams.TICKS, seqs[0]))[2]
    await replay.create(
        live, unique, stream="TICKS", start=start, end=start + dt.timedelta(hours=1)
    )
    await migrate(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.fetchval("SELECT market.open_namespace($1)", unique)  # a replicator's run
    finally:
        await conn.close()
    mine = await replay.streams_of(live, unique)

    kept = await asyncio.to_thread(cli, "delete", unique, nats_url=nats_url)
    assert kept.returncode == 0, kept.stderr
    assert sorted(kept.stdout.splitlines()) == sorted(f"deleted {s}" for s in mine)
    [line] = [ln for ln in kept.stderr.splitlines() if "PostgreSQL" in ln]
    assert line == (
        f"tickwire replay: PostgreSQL schema ns_{unique}, if any, kept (no"
        f" TICKWIRE_POSTGRES_DSN): drop it with TICKWIRE_POSTGRES_DSN=<admin DSN> tickwire"
        f" replay delete {unique}"
    )
    assert f"ns_{unique}" in await schemas(pg_dsn)

    dropped = await asyncio.to_thread(
        cli, "delete", unique, nats_url=nats_url, TICKWIRE_POSTGRES_DSN=pg_dsn
    )
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.splitlines() == [f"deleted PostgreSQL schema ns_{unique}"]
    assert f"ns_{unique}" not in await schemas(pg_dsn)
    again = await asyncio.to_thread(
        cli, "delete", unique, nats_url=nats_url, TICKWIRE_POSTGRES_DSN=pg_dsn
    )
    assert (again.returncode, again.stderr) == (2, f"tickwire replay: no replay named {unique!r}\n")


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

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"nats://127.0.0.1:{closed.getsockname()[1]}"
    for args in [("list",), ("delete", unique)]:
        out = await asyncio.to_thread(cli, *args, nats_url=nowhere)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith(f"tickwire replay: NATS at {nowhere} did not answer"), lines

    gone = await asyncio.to_thread(cli, "delete", unique, nats_url=nats_url)
    assert gone.returncode == 0, gone.stderr
    assert unique not in await replay.names(js)
