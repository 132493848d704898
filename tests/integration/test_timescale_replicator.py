"""timescale-replicator on the real NATS and PostgreSQL: tables equal the streams' content.

Each test has its own namespace (its own CANDLES, FEATURES, SCORES, SIGNALS and DLQ
streams) and its own database, migrated by the admin role; the worker connects as a login
role of ``tickwire_replicator``, so every test also runs it with least privilege.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.codec import encode
from contracts.messages import Candle, DeadLetter, Score, Signal
from db.migrate import migrate
from infra.stack import LocalStack, StackUrls
from tests import replication
from tests.processes import running, spawn
from tests.replication import BASE, Published
from tests.waiting import eventually
from workers import replay
from workers.runtime.errors import Misdeployed
from workers.runtime.worker import CommitFailed
from workers.timescale_replicator.app import Replicator, Settings
from workers.timescale_replicator.store import Refused, Store
from workers.timescale_replicator.tables import CANDLE_TABLE, TABLES

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DURABLE = streams.TIMESCALE_REPLICATOR
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)

# What each table holds, as the messages name it (times back to epoch milliseconds); in the
# schema of the connection's search_path (a namespace's own, or market).
SELECT = {
    "candles": "SELECT * FROM candles",
    "features": "SELECT * FROM features",
    "scores": "SELECT * FROM scores",
    "signals": "SELECT * FROM signals",
}
TIMES = {"open_time": "open_time_ms", "close_time": "close_time_ms", "expires_at": "expires_ms"}


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    await streams.ensure(js, streams.stream_specs(namespace=unique), replicator_consumers(unique))
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)


def replicator_consumers(namespace: str) -> list[streams.ConsumerSpec]:
    return [c for c in streams.consumer_specs(namespace=namespace) if c.durable == DURABLE]


@pytest.fixture
async def writer_dsn(local_stack: LocalStack, pg_dsn: str, unique: str) -> AsyncIterator[str]:
    """The migrated test database, as a login role that is a member of tickwire_replicator."""
    await migrate(pg_dsn)
    role = f"{unique}_writer"
    # roles are cluster-wide: a name of this test's own, dropped afterwards
    with login_role(local_stack, role, "tickwire_replicator"):
        yield as_role(pg_dsn, role)


@contextlib.contextmanager
def login_role(local_stack: LocalStack, role: str, group: str) -> Iterator[None]:
    postgres = local_stack.postgres
    assert postgres is not None
    postgres.psql('CREATE ROLE :"role" LOGIN IN ROLE :"group";', role=role, group=group)
    try:
        yield
    finally:
        if postgres.running:
            postgres.psql('DROP ROLE IF EXISTS :"role";', role=role)


def as_role(dsn: str, role: str) -> str:
    return dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


def settings(stack: StackUrls, namespace: str, dsn: str, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "nats_url": stack.nats_url,
        "namespace": namespace,
        "postgres_dsn": dsn,
        "pull_expires_s": 1,
        "lag_interval_s": 0.2,
        "retry_backoff_max_s": 1.0,
    }
    return Settings(**(values | kw))


async def start(replicator: Replicator) -> asyncio.Task[None]:
    task = asyncio.create_task(replicator.run())
    await eventually(
        lambda: all(w.started.is_set() for w in replicator.workers) or task.done(),
        what="replicator start",
    )
    if task.done():
        task.result()
    return task


async def stop(replicator: Replicator, task: asyncio.Task[None]) -> None:
    replicator.stop()
    await asyncio.wait_for(task, 60)


async def publish(js: JetStreamContext, messages: list[Published]) -> None:
    futures = []
    for m in messages:
        futures.append(
            await js.publish_async(m.subject, m.payload, headers={"Nats-Msg-Id": m.msg_id})
        )
    await asyncio.gather(*futures)


async def replicated(js: JetStreamContext, namespace: str) -> bool:
    """Every replicator consumer has acked everything on its stream."""
    for spec in replicator_consumers(namespace):
        info = await js.consumer_info(spec.stream, spec.durable)
        last = (await js.stream_info(spec.stream)).state.last_seq
        if info.ack_floor.stream_seq != last or info.num_ack_pending:
            return False
    return True


async def connect(dsn: str, namespace: str | None) -> asyncpg.Connection:
    """A connection whose unqualified table names are the namespace's tables (or market's)."""
    schema = "market" if namespace is None else f"ns_{namespace}"
    return await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})


async def tables(dsn: str, namespace: str | None) -> dict[str, list[dict[str, Any]]]:
    conn = await connect(dsn, namespace)
    try:
        out = {}
        for table, sql in SELECT.items():
            rows = []
            for record in await conn.fetch(sql):
                row = {TIMES.get(k, k): v for k, v in dict(record).items()}
                for name in TIMES.values():
                    if name in row:
                        row[name] = (row[name] - EPOCH) // MS
                rows.append(row)
            keys = replication.KEYS[table]
            out[table] = sorted(rows, key=lambda r, keys=keys: [r[k] for k in keys])
        return out
    finally:
        await conn.close()


async def state(dsn: str, namespace: str | None) -> dict[str, int]:
    conn = await connect(dsn, namespace)
    try:
        rows = await conn.fetch("SELECT stream, consumer, last_seq FROM replication_state")
    finally:
        await conn.close()
    return {r["stream"]: r["last_seq"] for r in rows if r["consumer"] == DURABLE}


async def last_seqs(js: JetStreamContext, namespace: str) -> dict[str, int]:
    out = {}
    for base in BASE.values():
        name = streams.stream_name(base, namespace=namespace)
        out[name] = (await js.stream_info(name)).state.last_seq
    return out


async def dead_letters(js: JetStreamContext, namespace: str) -> list[DeadLetter]:
    name = streams.stream_name(streams.DLQ, namespace=namespace)
    info = await js.stream_info(name)
    if not info.state.messages:
        return []
    return [
        msgspec.json.decode((await js.get_msg(name, seq)).data, type=DeadLetter)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]


def sample(replicator: Replicator, name: str, **labels: str) -> float:
    value = replicator.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


# --- schema and roles ----------------------------------------------------------------------


async def test_roles_replicator_writes_market_only_reader_only_reads(
    local_stack: LocalStack, pg_dsn: str, writer_dsn: str, unique: str
) -> None:
    reader_role = f"{unique}_reader"
    with login_role(local_stack, reader_role, "tickwire_reader"):
        await _roles(pg_dsn, writer_dsn, as_role(pg_dsn, reader_role))


async def _roles(pg_dsn: str, writer_dsn: str, reader_dsn: str) -> None:
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("CREATE SCHEMA other; CREATE TABLE other.t (x int)")
    writer = await asyncpg.connect(writer_dsn)
    reader = await asyncpg.connect(reader_dsn)
    candle = (
        "INSERT INTO market.candles VALUES ('f', 'EURUSD', 'M1', to_timestamp(60),"
        " to_timestamp(120), 1.1, 1.2, 1.0, 1.05, 10, 0, 0.1, 0.2, 60000, 119000, 0, 1)"
    )
    try:
        await writer.execute(candle)
        await writer.execute("UPDATE market.candles SET revision = 1")
        assert await writer.fetchval("SELECT count(*) FROM market.candles") == 1
        refused_to_writer = [
            "DROP TABLE market.candles",
            "TRUNCATE market.candles",
            "DELETE FROM market.candles",
            "ALTER TABLE market.candles ADD COLUMN x int",
            "DROP SCHEMA market CASCADE",
            "CREATE TABLE market.mine (x int)",
            "CREATE TABLE public.mine (x int)",
            "CREATE SCHEMA mine",
            "SELECT * FROM public.schema_migrations",
            "INSERT INTO other.t VALUES (1)",
            "SELECT * FROM other.t",
        ]
        for sql in refused_to_writer:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute(sql)
        # its staging tables are temporary ones
        await writer.execute("CREATE TEMPORARY TABLE scratch (x int)")

        assert await reader.fetchval("SELECT revision FROM market.candles") == 1
        assert await reader.fetchval("SELECT m1_count FROM market.candles_h1") == 1
        for sql in [candle, "UPDATE market.candles SET revision = 2", "TRUNCATE market.candles",
                    "SELECT * FROM other.t", "CREATE TABLE public.mine (x int)"]:  # fmt: skip
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await reader.execute(sql)
    finally:
        await writer.close()
        await reader.close()
        await admin.close()


async def test_a_namespace_has_its_own_schema_with_the_replicators_rights_only(
    local_stack: LocalStack, pg_dsn: str, writer_dsn: str, unique: str
) -> None:
    """The same rows through a live store and a namespace's store land in market and in
    ns_<name> respectively; in ns_<name> the role may do what it may in market, no more."""
    messages = replication.published(seed=6, candles_per_series=2, namespace="x", troubles=False)
    candles = [m.message for m in messages if isinstance(m.message, Candle)]
    rows = [(seq, CANDLE_TABLE.row(c)) for seq, c in enumerate(candles, start=1)]
    live = Store(writer_dsn, CANDLE_TABLE, stream="CANDLES", consumer=DURABLE)
    replay = Store(writer_dsn, CANDLE_TABLE, stream="CANDLES", consumer=DURABLE, namespace=unique)
    try:
        await replay.write(rows[:3], 3)
        await live.write(rows, len(rows))
        assert (live.schema, replay.schema) == ("market", f"ns_{unique}")
    finally:
        await live.close()
        await replay.close()
    keys = [r[:4] for _, r in rows]  # revisions of a candle share its key
    assert len((await tables(pg_dsn, None))["candles"]) == len(set(keys))
    assert len((await tables(pg_dsn, unique))["candles"]) == len(set(keys[:3]))
    assert await state(pg_dsn, None) == {"CANDLES": len(rows)}
    assert await state(pg_dsn, unique) == {"CANDLES": 3}

    writer = await connect(writer_dsn, unique)
    reader_role = f"{unique}_reader"
    try:
        assert (
            await writer.execute("UPDATE candles SET revision = 1")
            == f"UPDATE {len(set(keys[:3]))}"
        )
        refused_to_writer = [
            "DELETE FROM candles",
            "TRUNCATE candles",
            "DROP TABLE candles",
            "ALTER TABLE candles ADD COLUMN x int",
            "CREATE TABLE mine (x int)",
            "SELECT market.drop_namespace('" + unique + "')",
        ]
        for sql in refused_to_writer:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await writer.execute(sql)
        with login_role(local_stack, reader_role, "tickwire_reader"):
            reader = await connect(as_role(pg_dsn, reader_role), unique)
            try:
                assert await reader.fetchval("SELECT count(*) FROM candles") == len(set(keys[:3]))
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await reader.execute("UPDATE candles SET revision = 2")
            finally:
                await reader.close()
    finally:
        await writer.close()


async def test_hourly_and_daily_views_aggregate_the_m1_candles(pg_dsn: str) -> None:
    """The H1/D1 views (continuous aggregates under TimescaleDB) against pandas resampling."""
    import pandas as pd

    await migrate(pg_dsn)
    rng = random.Random(5)
    rows = []
    for symbol in ("EURUSD", "XAUUSD"):
        for i in range(3000):  # a little over two days of minutes
            o, c = rng.uniform(1, 2), rng.uniform(1, 2)
            rows.append(
                ("f", symbol, "M1", EPOCH + (replication.START_MS + i * 60_000) * MS,
                 EPOCH + (replication.START_MS + (i + 1) * 60_000) * MS, o,
                 max(o, c) + rng.random(), min(o, c) - rng.random() / 2, c,
                 rng.randrange(1, 100), rng.random(), 0.0, rng.random(), 0, 0, 0, 1)
            )  # fmt: skip
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_records_to_table("candles", records=rows, schema_name="market")
        h1 = [dict(r) for r in await conn.fetch("SELECT * FROM market.candles_h1")]
        d1 = [dict(r) for r in await conn.fetch("SELECT * FROM market.candles_d1")]
    finally:
        await conn.close()
    columns = ["feed", "symbol", "tf", "open_time", "close_time", "open", "high", "low", "close",
               "tick_volume", "real_volume", "spread_mean", "spread_max"]  # fmt: skip
    df = pd.DataFrame([r[: len(columns)] for r in rows], columns=columns)
    for got, freq in ((h1, "1h"), (d1, "1D")):
        want = (
            df.sort_values("open_time")
            .groupby(["feed", "symbol", df["open_time"].dt.floor(freq)])
            .agg(
                open=("open", "first"),
                high=("high", "max"),
                low=("low", "min"),
                close=("close", "last"),
                tick_volume=("tick_volume", "sum"),
                spread_max=("spread_max", "max"),
                m1_count=("open", "size"),
            )
            .reset_index()
        )
        assert len(got) == len(want)
        by_key = {(r["feed"], r["symbol"], r["open_time"]): r for r in got}
        for w in want.to_dict("records"):
            g = by_key[w["feed"], w["symbol"], w["open_time"].to_pydatetime()]
            assert (g["open"], g["high"], g["low"], g["close"]) == (
                w["open"], w["high"], w["low"], w["close"],
            )  # fmt: skip
            assert (g["tick_volume"], g["spread_max"], g["m1_count"]) == (
                w["tick_volume"], w["spread_max"], w["m1_count"],
            )  # fmt: skip


# --- replication ---------------------------------------------------------------------------


async def test_tables_equal_the_streams_latest_revision_wins(
    stack: StackUrls, js: JetStreamContext, namespace: str, writer_dsn: str, pg_dsn: str
) -> None:
    messages = replication.published(seed=1, candles_per_series=150, namespace=namespace)
    replicator = Replicator(settings(stack, namespace, writer_dsn, handler_batch=700))
    task = await start(replicator)
    try:
        await publish(js, messages)
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
        # lag on /metrics: nothing left behind on any stream
        port = replicator.lead.metrics_server.port  # type: ignore[union-attr]

        def scraped() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        async def caught_up() -> bool:
            text = await asyncio.to_thread(scraped)  # the server runs on this loop
            lines = [ln for ln in text.splitlines() if ln.startswith("tickwire_replication_lag")]
            return len(lines) == 8 and all(ln.endswith(" 0.0") for ln in lines)

        await eventually(caught_up, what="lag 0 on /metrics")
    finally:
        await stop(replicator, task)

    want = replication.expected(messages)
    got = await tables(pg_dsn, namespace)
    for table in replication.KEYS:
        assert got[table] == want[table], table
    assert any(r["revision"] > 0 for r in got["candles"])
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)
    # the namespace's run left the live tables as they were: empty
    assert await tables(pg_dsn, None) == {table: [] for table in replication.KEYS}
    assert await state(pg_dsn, None) == {}
    published = Counter(m.table for m in messages)
    upserted = sum(
        sample(replicator, "tickwire_replicated_rows_total", worker=DURABLE, stream=b, outcome=o)
        for b in BASE.values()
        for o in ("upserted", "superseded")
    )
    assert upserted == sum(published.values())  # every message went through exactly once


async def test_each_streams_consumer_pending_is_its_own_series(
    stack: StackUrls, js: JetStreamContext, namespace: str, writer_dsn: str
) -> None:
    """One durable name on four streams: /metrics tells their backlogs apart by stream."""
    messages = replication.published(seed=3, candles_per_series=20, namespace=namespace)
    await publish(js, messages)
    replicator = Replicator(settings(stack, namespace, writer_dsn, fetch_batch=10))
    task = await start(replicator)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(replicator, task)
    pending = {
        tuple(sorted(s.labels.items())): s.value
        for family in replicator.metrics.registry.collect()
        if family.name == "tickwire_consumer_pending"
        for s in family.samples
    }
    want = {
        (("consumer", DURABLE), ("stream", spec.stream), ("worker", DURABLE)): 0.0
        for spec in replicator_consumers(namespace)
    }
    assert pending == want


def listening_ports() -> set[int]:
    """TCP ports this process listens on (its sockets in /proc/net/tcp, state LISTEN)."""
    fds = Path("/proc/self/fd")
    inodes = set()
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def test_one_replicator_process_listens_on_one_metrics_port(
    stack: StackUrls, namespace: str, writer_dsn: str
) -> None:
    """Its four stream consumers share one registry: the first serves it, the others open no
    port of their own (each was an open port on every interface nobody scraped)."""
    before = listening_ports()
    replicator = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(replicator)
    try:
        assert len(replicator.workers) == 4
        assert replicator.lead.metrics_server is not None
        assert listening_ports() - before == {replicator.lead.metrics_server.port}
    finally:
        await stop(replicator, task)


async def test_restart_skips_what_the_database_has(
    stack: StackUrls, js: JetStreamContext, namespace: str, writer_dsn: str, pg_dsn: str
) -> None:
    """A consumer that delivers everything again (made anew) rewrites nothing."""
    messages = replication.published(seed=2, candles_per_series=40, namespace=namespace)
    await publish(js, messages)
    first = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(first)
    await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    await stop(first, task)
    conn = await connect(pg_dsn, namespace)
    versions = "SELECT xmin::text, ctid::text FROM candles ORDER BY 1, 2"
    before = await conn.fetch(versions)

    for spec in replicator_consumers(namespace):
        await js.delete_consumer(spec.stream, spec.durable)
    await streams.ensure(js, [], replicator_consumers(namespace))
    again = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(again)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated again")
    finally:
        await stop(again, task)
    assert await conn.fetch(versions) == before  # no row was written again
    await conn.close()
    skipped = sum(
        sample(again, "tickwire_replicated_rows_total", worker=DURABLE, stream=b, outcome="skipped")
        for b in BASE.values()
    )
    assert skipped == len(messages)
    assert await tables(pg_dsn, namespace) == replication.expected(messages)


@pytest.mark.parametrize("candles_after", [10, 60], ids=["fewer", "more"])
async def test_a_replay_made_again_under_its_name_is_not_taken_for_the_one_stored(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
    candles_after: int,
) -> None:
    """A replay deleted without its PostgreSQL schema, made again under the same name: its
    streams number their messages from 1 again, fewer or more of them than the stored
    sequence. The replicator refuses to start rather than skip them as stored; once the
    replay is deleted with its schema and made again, the tables hold exactly the new run."""
    before = replication.published(seed=11, candles_per_series=30, namespace=namespace)
    await publish(js, before)
    first = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(first)
    await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    await stop(first, task)

    await replay.delete(js, namespace)  # no DSN: the schema stays
    await streams.ensure(
        js, streams.stream_specs(namespace=namespace), replicator_consumers(namespace)
    )
    after = replication.published(seed=12, candles_per_series=candles_after, namespace=namespace)
    await publish(js, after)
    refused = Replicator(settings(stack, namespace, writer_dsn))
    with pytest.raises(Misdeployed, match=f"tickwire replay delete {namespace}"):
        await stop(refused, await start(refused))  # started, it skips what it takes for stored
    assert await tables(pg_dsn, namespace) == replication.expected(before)  # nothing written

    await replay.delete(js, namespace, postgres_dsn=pg_dsn)
    await streams.ensure(
        js, streams.stream_specs(namespace=namespace), replicator_consumers(namespace)
    )
    await publish(js, after)
    again = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(again)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated anew")
    finally:
        await stop(again, task)
    assert await tables(pg_dsn, namespace) == replication.expected(after)
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)


@pytest.mark.parametrize("candles_after", [10, 60], ids=["fewer", "more"])
async def test_a_stream_made_again_under_a_running_replicator_stops_it(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
    candles_after: int,
) -> None:
    """The replay is deleted (its schema kept) and made again while the replicator runs:
    its durables come back with the streams, which number their messages from 1 again. The
    replicator stops with what to do rather than ack them as stored; none of them is acked
    and nothing of them is written."""
    before = replication.published(seed=11, candles_per_series=30, namespace=namespace)
    await publish(js, before)
    replicator = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(replicator)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
        await replay.delete(js, namespace)  # no DSN: the schema stays
        await streams.ensure(
            js, streams.stream_specs(namespace=namespace), replicator_consumers(namespace)
        )
        after = replication.published(
            seed=12, candles_per_series=candles_after, namespace=namespace
        )
        await publish(js, after)
        await eventually(
            lambda: task.done() or replicated(js, namespace), timeout=60, what="an outcome"
        )
        with pytest.raises(Misdeployed, match=f"tickwire replay delete {namespace}"):
            await stop(replicator, task)
    finally:
        if not task.done():
            await stop(replicator, task)
    assert await tables(pg_dsn, namespace) == replication.expected(before)  # nothing written
    assert set((await ack_floors(js, namespace)).values()) == {0}  # nor acked


async def test_a_stream_made_again_before_anything_was_stored_is_the_one_counted(
    stack: StackUrls, js: JetStreamContext, namespace: str, writer_dsn: str, pg_dsn: str
) -> None:
    """Made again while the replicator runs and has stored nothing yet: the new stream's
    messages are stored, counted as the new stream's, and the next start takes it for the
    one stored rather than refuse it."""
    replicator = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(replicator)
    try:
        await replay.delete(js, namespace)  # no DSN: the schema stays
        await streams.ensure(
            js, streams.stream_specs(namespace=namespace), replicator_consumers(namespace)
        )
        messages = replication.published(seed=13, candles_per_series=5, namespace=namespace)
        await publish(js, messages)
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(replicator, task)
    again = Replicator(settings(stack, namespace, writer_dsn))
    await stop(again, await start(again))
    assert await tables(pg_dsn, namespace) == replication.expected(messages)
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)


async def test_bad_input_is_dead_lettered_with_its_reason_and_the_rest_is_stored(
    stack: StackUrls, js: JetStreamContext, namespace: str, writer_dsn: str, pg_dsn: str
) -> None:
    good = replication.published(seed=3, candles_per_series=5, namespace=namespace, troubles=False)
    candle = next(m.message for m in good if isinstance(m.message, Candle))
    score = next(m.message for m in good if isinstance(m.message, Score))
    signal = next(m.message for m in good if isinstance(m.message, Signal))
    c_subject = subjects.candles(candle.feed, candle.symbol, candle.tf, namespace=namespace)
    s_subject = subjects.scores(score.feed, score.symbol, score.tf, namespace=namespace)
    g_subject = subjects.signals(signal.feed, signal.symbol, signal.tf, namespace=namespace)
    f_subject = subjects.features(candle.feed, candle.symbol, candle.tf, namespace=namespace)

    def body(m: Any, **change: Any) -> bytes:
        return msgspec.json.encode(msgspec.json.decode(encode(m)) | change)

    no_high = msgspec.json.decode(encode(candle))
    del no_high["high"]
    bad: list[tuple[str, str, bytes]] = [
        ("malformed_json", c_subject, b'{"type":"candle","v":1,'),
        ("unknown_schema_version", c_subject, body(candle, v=7, extra=1)),
        ("missing_field", c_subject, msgspec.json.encode(no_high)),
        ("invalid_value", c_subject, body(candle, tick_volume=-1)),
        ("invalid_value", g_subject, body(signal, strength=1.5)),
        ("unknown_type", c_subject, body(candle, type="candlestick")),
        ("out_of_range", c_subject, body(candle, low=candle.high + 1)),
        ("out_of_range", c_subject, body(candle, open_time_ms=7_258_118_400_000)),  # 2200
        ("out_of_range", c_subject, body(candle, revision=2**31)),
        ("out_of_range", s_subject, body(score, score=1.5)),
        ("out_of_range", s_subject, body(score, probabilities=[0.5, -0.1, 0.6])),
        ("out_of_range", g_subject, body(signal, expires_ms=signal.open_time_ms)),
        ("subject_mismatch", c_subject, body(candle, feed="feed-z")),
        ("subject_mismatch", c_subject, body(candle, tf="H4")),
        ("illegal_symbol", c_subject, body(candle, symbol="EUR\x00USD")),
        ("illegal_id", s_subject, body(score, model_version="")),
        ("illegal_id", f_subject, encode(replication.published(
            seed=3, candles_per_series=1, namespace=namespace, troubles=False)[1].message
        ).replace(b'"fs-core-v3"', b'"fs\\u0000v3"')),
    ]  # fmt: skip
    # bad messages between good ones, all within one batch per stream
    mixed: list[Published] = []
    for i, m in enumerate(good):
        mixed.append(m)
        if i < len(bad):
            reason, subject, payload = bad[i]
            mixed.append(Published("bad", subject, payload, f"bad|{i}", m.message))
    replicator = Replicator(settings(stack, namespace, writer_dsn))
    await publish(js, mixed)
    task = await start(replicator)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
        letters = await eventually(
            lambda: _at_least(dead_letters(js, namespace), len(bad)), what="dead letters"
        )
    finally:
        await stop(replicator, task)

    assert sorted(d.reason for d in letters) == sorted(reason for reason, _, _ in bad)
    assert {d.payload for d in letters} == {payload for _, _, payload in bad}
    assert all(d.worker == DURABLE and d.subject.startswith(f"ns.{namespace}.") for d in letters)
    assert await tables(pg_dsn, namespace) == replication.expected(good)
    by_reason = Counter(reason for reason, _, _ in bad)
    for reason, count in by_reason.items():
        got = sample(replicator, "tickwire_dead_letters_total", worker=DURABLE, reason=reason)
        assert got == count, reason


async def _at_least(letters: Awaitable[list[DeadLetter]], n: int) -> list[DeadLetter] | None:
    got = await letters
    return got if len(got) >= n else None


async def test_a_message_the_replicator_fails_on_stops_it_and_is_dead_lettered_at_restart(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug one candle triggers, every time. Retried while later batches were stored, the
    candle would come back below the stored sequence and be skipped without a word. The
    replicator stops instead; at its next start the catch-up dead-letters the candle and
    stores everything else, and the tables equal the streams without it."""
    messages = replication.published(
        seed=7, candles_per_series=10, namespace=namespace, troubles=False
    )
    candles = [m for m in messages if m.table == "candles"]
    poison = candles[len(candles) // 2]

    def row(c: Candle) -> Any:
        if c == poison.message:
            raise ZeroDivisionError("a bug this candle triggers")
        return CANDLE_TABLE.row(c)

    buggy = dataclasses.replace(CANDLE_TABLE, row=row)
    monkeypatch.setitem(TABLES, CANDLE_TABLE.stream, buggy)
    await publish(js, messages)
    first = Replicator(settings(stack, namespace, writer_dsn))
    with pytest.raises(CommitFailed, match="handler failed: ZeroDivisionError"):
        await asyncio.wait_for(first.run(), 60)
    assert await dead_letters(js, namespace) == []

    again = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(again)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(again, task)
    [letter] = await dead_letters(js, namespace)
    assert (letter.reason, letter.payload) == ("handler_error", poison.payload)
    assert letter.stream_seq == candles.index(poison) + 1
    assert "a bug this candle triggers" in letter.detail
    assert await tables(pg_dsn, namespace) == replication.expected(
        [m for m in messages if m is not poison]
    )


def _refused_by_the_database(
    monkeypatch: pytest.MonkeyPatch, poison: list[replication.Published]
) -> None:
    """The rows of ``poison`` get a timeframe the database refuses (no message can carry
    it): valid to the worker's checks, refused only by the transaction."""
    refused = [p.message for p in poison]

    def row(c: Candle) -> Any:
        out = CANDLE_TABLE.row(c)
        return (*out[:2], "M2", *out[3:]) if any(c == r for r in refused) else out

    monkeypatch.setitem(TABLES, CANDLE_TABLE.stream, dataclasses.replace(CANDLE_TABLE, row=row))


async def test_a_first_revision_stored_already_is_upserted_with_the_rest_of_its_batch(
    writer_dsn: str, pg_dsn: str
) -> None:
    """A batch of first revisions goes in as it is; where one of them is stored already (a
    candle published again after the duplicate window), the batch is upserted instead: the
    same revision replaces the stored row, a stored later revision stays, and the new rows
    of the batch are stored all the same."""
    messages = replication.published(seed=6, candles_per_series=3, namespace="x", troubles=False)
    candles = [m.message for m in messages if isinstance(m.message, Candle)]
    candles = [c for c in candles if c.revision == 0]  # the revisions are made here
    held_back, first = candles[-4:], candles[:-4]
    later = msgspec.structs.replace(first[1], revision=1, tick_volume=first[1].tick_volume + 7)
    again = msgspec.structs.replace(first[0], tick_volume=first[0].tick_volume + 1000)
    stale = msgspec.structs.replace(first[1], tick_volume=first[1].tick_volume + 2000)
    batches = [first, [later], [held_back[0], again, *held_back[1:3], stale, held_back[3]]]
    store = Store(writer_dsn, CANDLE_TABLE, stream="S", consumer=DURABLE)
    seq = 0
    try:
        for batch in batches:
            rows = [(seq + i, CANDLE_TABLE.row(c)) for i, c in enumerate(batch, start=1)]
            seq += len(batch)
            written = await store.write(rows, seq)
            assert (written.rows, written.skipped, written.last_seq) == (len(batch), 0, seq)
    finally:
        await store.close()
    order = [c for batch in batches for c in batch]
    want = replication.expected([Published("candles", "", b"", "", c) for c in order])
    assert (await tables(pg_dsn, None))["candles"] == want["candles"]


async def test_a_batch_the_database_refuses_is_stored_row_by_row(
    writer_dsn: str, pg_dsn: str
) -> None:
    """Rows the database refuses (here a timeframe no message can carry) are singled out."""
    messages = replication.published(seed=4, candles_per_series=3, namespace="x", troubles=False)
    candles = [m.message for m in messages if isinstance(m.message, Candle)]
    rows = [(seq, CANDLE_TABLE.row(c)) for seq, c in enumerate(candles, start=1)]
    rows[3] = (4, ("f", "EURUSD", "M2", *rows[3][1][3:]))
    store = Store(writer_dsn, CANDLE_TABLE, stream="S", consumer=DURABLE)
    try:
        with pytest.raises(Refused, match="candles_tf_check"):
            await store.write(rows, len(rows))
        assert await store.last_seq() == 0  # nothing of the refused batch stayed
        written = await store.write_each(rows, len(rows))
        assert [i for i, _ in written.refused] == [3]
        assert (written.rows, written.skipped) == (len(rows) - 1, 0)
        # a refused row is not recorded as stored: its dead letter is sent after the commit
        assert await store.last_seq() == 3
        assert (await store.write([], len(rows))).last_seq == len(rows)
    finally:
        await store.close()
    want = replication.expected([m for m in messages if m.message is not candles[3]])
    assert (await tables(pg_dsn, None))["candles"] == want["candles"]


async def test_a_batch_the_database_refuses_counts_its_stored_rows_as_upserted(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every candle message is counted once by its outcome, also when its batch went row by
    row: upserted or superseded when stored, dead-lettered when the database refused it."""
    messages = replication.published(seed=9, candles_per_series=6, namespace=namespace)
    candles = [m for m in messages if m.table == "candles"]
    poison = candles[len(candles) // 2]
    _refused_by_the_database(monkeypatch, [poison])
    await publish(js, messages)
    # batches of 20: more come after the one refused
    replicator = Replicator(settings(stack, namespace, writer_dsn, handler_batch=20))
    task = await start(replicator)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(replicator, task)
    [letter] = await dead_letters(js, namespace)
    assert (letter.reason, letter.payload) == ("db_refused", poison.payload)
    assert await tables(pg_dsn, namespace) == replication.expected(
        [m for m in messages if m is not poison]
    )
    counted = {
        outcome: sample(
            replicator,
            "tickwire_replicated_rows_total",
            worker=DURABLE,
            stream=streams.CANDLES,
            outcome=outcome,
        )
        for outcome in ("upserted", "superseded", "skipped")
    }
    assert counted["skipped"] == 0
    assert counted["upserted"] + counted["superseded"] == len(candles) - 1
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)


async def test_a_row_the_database_refuses_is_dead_lettered_though_stopped_before_that(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row the database refuses is known only once its batch is committed, and its dead
    letter goes out after that. A worker stopped (or killed) in between hands its batch
    back: the redelivered row must not be taken for stored, and is dead-lettered then."""
    messages = replication.published(
        seed=10, candles_per_series=6, namespace=namespace, troubles=False
    )
    candles = [m for m in messages if m.table == "candles"]
    poison = candles[len(candles) // 2]
    _refused_by_the_database(monkeypatch, [poison])
    # while the dead-letter stream is gone, no dead letter can be sent: the worker holds its
    # batch, committed, until it is stopped
    dlq_name = streams.stream_name(streams.DLQ, namespace=namespace)
    dlq = [s for s in streams.stream_specs(namespace=namespace) if s.name == dlq_name]
    await js.delete_stream(dlq_name)
    await publish(js, messages)
    first = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(first)
    retries = "tickwire_transient_retries_total"
    try:
        await eventually(
            lambda: sample(first, retries, worker=DURABLE) >= 2,
            timeout=60,
            what="the dead letter held back",
        )
    finally:
        await stop(first, task)
    await streams.ensure(js, dlq, [])

    again = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(again)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(again, task)
    [letter] = await dead_letters(js, namespace)
    assert (letter.reason, letter.payload) == ("db_refused", poison.payload)
    assert letter.stream_seq == candles.index(poison) + 1
    assert await tables(pg_dsn, namespace) == replication.expected(
        [m for m in messages if m is not poison]
    )
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)


async def test_a_row_the_database_refuses_while_catching_up_is_dead_lettered(
    stack: StackUrls,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Candles a dead process was given and never acked are stored by the catch-up at the
    next start; those the database refuses there are dead-lettered as they are when
    consumed, not recorded as stored and then acked unseen when they come again."""
    messages = replication.published(
        seed=8, candles_per_series=6, namespace=namespace, troubles=False
    )
    candles = [m for m in messages if m.table == "candles"]
    poison = [candles[len(candles) // 3], candles[len(candles) * 2 // 3]]
    _refused_by_the_database(monkeypatch, poison)
    # what the dead process held comes again after the ack wait: 5 s here instead of 60 s
    quick = [msgspec.structs.replace(c, ack_wait=5.0, backoff=(5.0, 10.0))
             for c in replicator_consumers(namespace)]  # fmt: skip
    await streams.ensure(js, [], quick)
    await publish(js, messages)
    # a process that was given every candle and died before storing any
    name = streams.stream_name(streams.CANDLES, namespace=namespace)
    sub = await js.pull_subscribe_bind(DURABLE, stream=name)
    given = 0
    while given < len(candles):
        given += len(await sub.fetch(len(candles) - given, timeout=5))
    await sub.unsubscribe()

    replicator = Replicator(settings(stack, namespace, writer_dsn))
    task = await start(replicator)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(replicator, task)
    letters = await dead_letters(js, namespace)
    assert [(d.reason, d.payload, d.stream_seq) for d in letters] == [
        ("db_refused", p.payload, candles.index(p) + 1) for p in poison
    ]
    assert all("candles_tf_check" in d.detail for d in letters)
    assert await tables(pg_dsn, namespace) == replication.expected(
        [m for m in messages if m not in poison]
    )
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)


# --- faults --------------------------------------------------------------------------------


async def test_postgres_stopped_and_restarted_mid_run(
    stack: StackUrls,
    local_stack: LocalStack,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,
    pg_dsn: str,
) -> None:
    postgres = local_stack.postgres
    assert postgres is not None
    messages = replication.published(seed=5, candles_per_series=120, namespace=namespace)
    half = len(messages) // 2
    replicator = Replicator(settings(stack, namespace, writer_dsn, handler_batch=500))
    task = await start(replicator)
    retries = "tickwire_transient_retries_total"
    try:
        await publish(js, messages[:half])
        await eventually(lambda: replicated(js, namespace), timeout=60, what="first half")
        postgres.stop()
        try:
            await publish(js, messages[half:])
            before = sample(replicator, retries, worker=DURABLE)
            await eventually(
                lambda: sample(replicator, retries, worker=DURABLE) >= before + 4,
                timeout=60,
                what="the worker holding batches while PostgreSQL is down",
            )
            floors = await ack_floors(js, namespace)
            lag = "tickwire_replication_lag_messages"
            await eventually(
                lambda: sample(replicator, lag, worker=DURABLE, stream="CANDLES") > 0,
                what="lag reported during the outage",
            )
            await eventually(
                lambda: sample(replicator, retries, worker=DURABLE) >= before + 8,
                timeout=60,
                what="more retries",
            )
            # nothing acked while nothing could be committed
            assert await ack_floors(js, namespace) == floors
        finally:
            postgres.start()
        await eventually(lambda: replicated(js, namespace), timeout=90, what="after restart")
    finally:
        await stop(replicator, task)
    assert await tables(pg_dsn, namespace) == replication.expected(messages)
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)


async def ack_floors(js: JetStreamContext, namespace: str) -> dict[str, int]:
    out = {}
    for spec in replicator_consumers(namespace):
        info = await js.consumer_info(spec.stream, spec.durable)
        out[spec.stream] = info.ack_floor.stream_seq
    return out


@contextlib.asynccontextmanager
async def commits_held(dsn: str, namespace: str | None) -> AsyncIterator[None]:
    """While inside, no replicator transaction gets past its first statement: each locks
    its stream's row of ``replication_state``, and this holds the whole table. A process
    killed meanwhile leaves a transaction that never commits."""
    conn = await connect(dsn, namespace)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE replication_state IN EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def test_kill_9_mid_batch_changes_nothing(
    stack: StackUrls, js: JetStreamContext, namespace: str, writer_dsn: str, pg_dsn: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The worker process is killed with SIGKILL five times while it works through the
    streams; afterwards the tables hold exactly the streams' content."""
    messages = replication.published(seed=6, candles_per_series=400, namespace=namespace)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.nats_url),
        "TICKWIRE_NAMESPACE": namespace,
        "TICKWIRE_POSTGRES_DSN": writer_dsn,
        "TICKWIRE_HANDLER_BATCH": "300",
        "TICKWIRE_FETCH_BATCH": "300",
        "TICKWIRE_PULL_EXPIRES_S": "1",
        "TICKWIRE_LOG_LEVEL": "INFO",
    }
    log = tmp_path / "replicator.log"
    candles = streams.stream_name(streams.CANDLES, namespace=namespace)
    # what a killed process held comes again after the ack wait: 5 s here instead of 60 s
    quick = [msgspec.structs.replace(c, ack_wait=5.0, backoff=(5.0, 10.0))
             for c in replicator_consumers(namespace)]  # fmt: skip
    await streams.ensure(js, [], quick)

    async def delivered_seq() -> int:
        return (await js.consumer_info(candles, DURABLE)).delivered.stream_seq

    async def consuming(past: int, proc: subprocess.Popen[bytes]) -> bool:
        """This instance has caught up and got candles past ``past``."""
        running(proc, log)
        return await delivered_seq() > past

    async def mid_work(past: int, proc: subprocess.Popen[bytes]) -> bool:
        """This instance got candles past ``past`` that the database does not hold yet (the
        next instance has to catch up on them), or it has got all there is."""
        running(proc, log)
        seq = await delivered_seq()
        if seq > past and seq > (await state(pg_dsn, namespace)).get(candles, 0):
            return True
        return seq >= (await js.stream_info(candles)).state.last_seq

    def through(n: int) -> int:
        """How many messages to publish for the stream to hold ``n`` candles."""
        seen = 0
        for i, m in enumerate(messages):
            seen += m.table == "candles"
            if seen == n:
                return i + 1
        return len(messages)

    # the stream is published in steps, one kill in each, so the kills spread over it
    total = sum(1 for m in messages if m.table == "candles")
    rng = random.Random(99)
    points = [total * k // 6 + rng.randrange(-total // 30, total // 30) for k in range(1, 6)]
    sent = 0
    held = 0
    for i, point in enumerate(points):
        past = await delivered_seq()
        if i % 2:
            # a kill wherever the worker happens to be
            await publish(js, messages[sent : through(point)])
            proc = spawn("timescale-replicator", env, log)
            await eventually(
                lambda past=past, proc=proc: mid_work(past, proc),
                timeout=120,
                what=f"CANDLES delivered past seq {past} and not all stored",
            )
            proc.kill()
        else:
            # a kill that surely lands between delivery and commit: the worker's commits
            # wait for a lock the test holds, so what it is delivered then stays unstored
            half = through((past + point) // 2)
            await publish(js, messages[sent:half])
            proc = spawn("timescale-replicator", env, log)
            await eventually(lambda past=past, proc=proc: consuming(past, proc), timeout=120)
            async with commits_held(pg_dsn, namespace):
                await publish(js, messages[half : through(point)])
                await eventually(
                    lambda proc=proc: mid_work(0, proc), timeout=120, what="CANDLES unstored"
                )
                proc.kill()
                proc.wait()
            held += 1
        proc.wait()
        sent = through(point)
    await publish(js, messages[sent:])
    proc = spawn("timescale-replicator", env, log)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=120, what="the end")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert await tables(pg_dsn, namespace) == replication.expected(messages)
    assert await state(pg_dsn, namespace) == await last_seqs(js, namespace)
    assert await dead_letters(js, namespace) == []
    # each kill with commits held left delivered candles for the next instance to catch up on
    assert held == 3
    assert log.read_text().count(f"{candles} caught up from seq") >= held, log.read_text()[-3000:]


# --- tickwire status -----------------------------------------------------------------------


async def test_status_prints_every_consumer_with_its_lag(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    messages = replication.published(seed=7, candles_per_series=10, namespace=namespace)
    await publish(js, messages)
    candles = streams.stream_name(streams.CANDLES, namespace=namespace)
    state_ = (await js.stream_info(candles)).state
    first = (await js.get_msg(candles, state_.first_seq)).time
    last = (await js.get_msg(candles, state_.last_seq)).time
    assert first is not None
    assert last is not None
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "workers.cli", "status"],
        env={"PATH": os.environ.get("PATH", ""), "TICKWIRE_NATS_URL": str(stack.nats_url)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("== consumers ==\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert lines[0].split()[:2] == ["stream", "consumer"]
    ours = {line.split()[0]: line.split() for line in lines if f"NS_{namespace}_" in line}
    assert set(ours) == {streams.stream_name(b, namespace=namespace) for b in BASE.values()}
    counts = Counter(m.table for m in messages)
    for table, base in BASE.items():
        row = ours[streams.stream_name(base, namespace=namespace)]
        # stream, consumer, last seq, ack floor, not delivered, ack pending, lag msgs, lag s
        assert row[1] == DURABLE
        assert [int(x) for x in row[2:7]] == [counts[table], 0, counts[table], 0, counts[table]]
    seconds = float(ours[candles][7])
    assert seconds == pytest.approx((last - first).total_seconds(), abs=0.051)
