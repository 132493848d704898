"""Every worker under its own NATS user from the real ``infra/nats/accounts.conf``.

A nats-server of this module's own includes the deployed accounts file itself (not a copy),
with a fresh password per user. ``ops`` creates the streams and consumers, the ``ea`` user
publishes ticks, and candle-ingest, feature-builder and timescale-replicator each run under
their own user: candles, vectors, QuestDB and PostgreSQL rows must come out as an
unrestricted run makes them, through a restart of candle-ingest and feature-builder that
rebuilds their state. model-scorer, signal-publisher and a signal subscriber (through
``tickwire subscribe``, on its own inbox prefix) run under theirs too. Then each user is
refused what it must not do, with the server's permissions violation.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import secrets
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from contracts import streams, subjects
from contracts.messages import Candle, DeadLetter, Score, Timeframe
from db.migrate import migrate
from db.questdb import query, wait_for_wal
from infra.stack import NatsServer as LocalNats
from infra.stack import QuestDBUrls
from tests import reference
from tests.integration.test_candle_ingest import consumed, stream_messages
from tests.integration.test_feature_builder import close_enough, expected
from tests.waiting import eventually
from workers import candle_ingest, feature_builder, timescale_replicator
from workers.candle_ingest.app import build as build_ingest
from workers.candle_ingest.app import feed_symbol as ingest_key
from workers.feature_builder.app import build as build_features
from workers.permissions import block_name
from workers.runtime.partition import partition_of
from workers.runtime.pull import read_stream
from workers.runtime.worker import READ_BACK_SUFFIX
from workers.timescale_replicator.app import Replicator

pytestmark = pytest.mark.integration

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
ACCOUNTS = REPO / "infra" / "nats" / "accounts.conf"
# `{ user: ea, password: $NATS_EA_PASSWORD ...`, on one line or several
USER = re.compile(r"user:\s*([\w-]+)[\s,]+password:\s*\$(NATS_\w+_PASSWORD)")
START_MS = 1_741_039_200_000  # 2025-03-03 22:00 UTC
SYMBOL = "US500.cash"


class SecuredNats(LocalNats):
    """nats-server with JetStream whose users and permissions are the deployed ones."""

    def __init__(self, root: Path, passwords: Mapping[str, str], accounts: Path = ACCOUNTS) -> None:
        # the account may use 100G of disk (a limit, nothing is reserved): the server must
        # allow at least as much or it refuses the account
        super().__init__(root, max_file_store="100G")
        self.passwords = dict(passwords)
        self.accounts = accounts

    def _prepare(self) -> None:
        super()._prepare()
        # include resolves its path against the including file's directory
        accounts = os.path.relpath(self.accounts, self.config_path.parent)
        with self.config_path.open("a") as conf:
            conf.write(f"include {accounts}\n")

    def _env(self) -> Mapping[str, str]:
        return {**os.environ, **self.passwords}


@dataclass(frozen=True)
class Secured:
    url: str
    passwords: dict[str, str]
    """Password of each user of accounts.conf."""
    log: Path

    async def connect(self, user: str, errors: list[Exception] | None = None) -> Client:
        """A connection as ``user``; asynchronous server errors are appended to ``errors``."""

        async def on_error(exc: Exception) -> None:
            if errors is not None:
                errors.append(exc)

        return await nats.connect(
            self.url,
            user=user,
            password=self.passwords[user],
            connect_timeout=5,
            max_reconnect_attempts=0,
            error_cb=on_error,
        )

    def settings(self, user: str) -> dict[str, Any]:
        return {"nats_url": self.url, "nats_user": user, "nats_password": self.passwords[user]}


def users_of_accounts_file() -> dict[str, str]:
    """{user: password variable} as the deployed accounts file declares them."""
    return dict(USER.findall(ACCOUNTS.read_text()))


def serve(root: Path, accounts: Path = ACCOUNTS) -> Iterator[Secured]:
    users = users_of_accounts_file()
    passwords = {var: secrets.token_hex(12) for var in users.values()}
    server = SecuredNats(root, passwords, accounts)
    server.start()
    try:
        yield Secured(server.url, {u: passwords[v] for u, v in users.items()}, server.log_path)
    finally:
        server.stop()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    yield from serve(tmp_path)


@pytest.fixture
async def ops(secured: Secured) -> AsyncIterator[JetStreamContext]:
    """``ops`` with every live stream and consumer ensured, as `tickwire streams ensure`."""
    nc = await secured.connect("ops")
    js = nc.jetstream()
    await streams.ensure(js, streams.stream_specs(), streams.consumer_specs())
    yield js
    await nc.close()


# --- the pipeline -------------------------------------------------------------------------


def make_ticks(feed: str, count: int, seed: int, symbol: str = SYMBOL) -> list[dict[str, Any]]:
    """One symbol's ticks, in time order, about 10 s apart: some 70 minutes of M1 candles."""
    rng = random.Random(seed)
    t, mid = START_MS, 5000.0
    out = []
    for seq in range(1, count + 1):
        t += rng.randint(1_000, 19_000)
        mid = round(mid * (1 + rng.gauss(0, 3e-4)), 2)
        out.append(
            {
                "type": "tick",
                "v": 1,
                "feed": feed,
                "symbol": symbol,
                "time_ms": t,
                "bid": mid,
                "ask": round(mid + rng.choice((0.25, 0.5)), 2),
                "volume": round(rng.uniform(0.1, 5.0), 2),
                "seq": seq,
            }
        )
    return out


async def publish_ticks(js: JetStreamContext, ticks: list[dict[str, Any]]) -> None:
    futures = []
    for t in ticks:
        subject = subjects.ticks(t["feed"], t["symbol"])
        msg_id = f"{t['feed']}|{t['symbol']}|{t['time_ms']}|{t['seq']}"
        futures.append(
            await js.publish_async(subject, msgspec.json.encode(t), headers={"Nats-Msg-Id": msg_id})
        )
    await asyncio.gather(*futures)


async def started(worker: Any) -> tuple[Any, asyncio.Task[None]]:
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.started.is_set() or task.done(), what=f"{worker.name} start")
    if task.done():
        task.result()
    return worker, task


async def stop_all(running: list[tuple[Any, asyncio.Task[None]]]) -> None:
    """Stop cleanly, as SIGTERM does: each worker drains and saves its state."""
    for worker, _ in running:
        worker.stop()
    for _, task in running:
        await asyncio.wait_for(task, 30)


def as_candles(payloads: list[bytes]) -> list[Candle]:
    return [msgspec.json.decode(p, type=Candle) for p in payloads]


def fields(c: Candle) -> dict[str, Any]:
    return msgspec.structs.asdict(c)


def each_once(published: list[Candle]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    """Candles by key, checking that none was published twice."""
    keys = Counter((c.feed, c.symbol, c.tf.value, c.open_time_ms) for c in published)
    assert max(keys.values()) == 1, "a candle was published twice"
    return {(c.feed, c.symbol, c.tf.value, c.open_time_ms): fields(c) for c in published}


async def at_least(probe: Callable[[], Awaitable[list[T]]], count: int, what: str) -> list[T]:
    """The probe's list once it holds ``count`` items."""
    box: list[list[T]] = []

    async def enough() -> bool:
        box[:] = [await probe()]
        return len(box[0]) >= count

    await eventually(enough, timeout=30, what=what)
    return box[0]


async def test_the_pipeline_runs_with_each_worker_under_its_own_user(
    secured: Secured,
    ops: JetStreamContext,
    questdb: QuestDBUrls,
    pg_dsn: str,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="workers")
    feed = unique
    ticks = make_ticks(feed, 420, seed=5)
    first, second = ticks[:200], ticks[200:]
    bad = {**second[50], "bid": second[50]["ask"] + 1.0, "seq": None}
    await migrate(pg_dsn)

    ingest = candle_ingest.app.Settings(
        **secured.settings("candle-ingest"),
        questdb_ilp=questdb.ilp_conf,
        questdb_http=questdb.http,
        idle_close=False,
        snapshot_interval_s=3600.0,  # a snapshot only at a clean stop
        pull_expires_s=1,
    )
    features = feature_builder.app.Settings(**secured.settings("feature-builder"), pull_expires_s=1)
    replicator = Replicator(
        timescale_replicator.app.Settings(
            **secured.settings("timescale-replicator"),
            postgres_dsn=pg_dsn,
            pull_expires_s=1,
            lag_interval_s=0.2,
        )
    )
    ea_nc = await secured.connect("ea")
    ea = ea_nc.jetstream()
    running: list[tuple[Any, asyncio.Task[None]]] = []
    replicating = asyncio.create_task(replicator.run())
    try:
        await eventually(
            lambda: all(w.started.is_set() for w in replicator.workers) or replicating.done(),
            what="replicator start",
        )
        assert not replicating.done(), replicating.result()

        # first run: half of the ticks
        running = [await started(build_ingest(ingest)), await started(build_features(features))]
        await publish_ticks(ea, first)
        await eventually(lambda: consumed(ops, "TICKS", "candle-ingest"), what="first ticks")
        await eventually(lambda: consumed(ops, "CANDLES", "feature-builder"), what="candles")
        await stop_all(running)
        state = await ops.object_store("candle-ingest-state")
        assert (await state.get("candle-ingest")).data, "candle-ingest saved no snapshot"
        built = await ops.object_store("feature-builder-state")
        assert (await built.get("feature-builder")).data, "feature-builder saved no snapshot"

        # the rest, and a bad tick, while both are down; a process is given five ticks and
        # dies before acking them: the next one must rebuild its state past them
        await publish_ticks(ea, [*second[:50], bad, *second[50:]])
        given = await ops.pull_subscribe_bind("candle-ingest", stream="TICKS")
        for msg in await given.fetch(5, timeout=5):
            await msg.nak()
        await given.unsubscribe()

        # second run: restored from the snapshot and the stream; idle symbols are closed by
        # a Watermark candle-ingest publishes itself on the tick subject
        again = {"idle_close": True, "idle_grace_s": 0.5, "idle_silence_s": 1.0}
        running = [
            await started(build_ingest(ingest.model_copy(update=again))),
            await started(build_features(features)),
        ]
        want = reference.candles(ticks)
        await at_least(lambda: stream_messages(ops, "CANDLES"), len(want), "every candle")
        await eventually(lambda: consumed(ops, "TICKS", "candle-ingest"), what="all ticks")
        await eventually(lambda: consumed(ops, "CANDLES", "feature-builder"), what="all candles")
        await stop_all(running)
    finally:
        await stop_all(running)
        replicator.stop()
        await asyncio.wait_for(replicating, 30)
        await ea_nc.close()

    logged = caplog.text
    assert "candle-ingest: state rebuilt from seq 201" in logged
    assert re.search(r"feature-builder: \d+ series rebuilt from \d+ candles", logged)

    # CANDLES: every candle once, equal to the pandas reference
    published = as_candles(await stream_messages(ops, "CANDLES"))
    assert reference.differences(each_once(published), want) == []

    # FEATURES: one vector per candle, equal to the feature library's batch form
    vectors = await stream_messages(ops, "FEATURES")
    assert close_enough(vectors, expected(published)) == []

    # the bad tick is a dead letter of candle-ingest, with its reason
    letters = [msgspec.json.decode(p, type=DeadLetter) for p in await stream_messages(ops, "DLQ")]
    assert [(d.worker, d.reason) for d in letters] == [("candle-ingest", "bid_above_ask")]
    assert msgspec.json.decode(letters[0].payload)["bid"] == bad["bid"]

    # QuestDB: the same candles
    await asyncio.to_thread(wait_for_wal, questdb.http, "candles", timeout=60)
    rows = await asyncio.to_thread(query, questdb.http, "SELECT * FROM candles")
    mine = {
        (r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): r for r in rows if r["feed"] == feed
    }
    assert len(mine) == len(want)
    for key, c in want.items():
        row = mine[key[0], key[1], key[2], c["first_tick_ms"]]
        assert (row["open"], row["high"], row["low"], row["close"]) == (
            c["open"],
            c["high"],
            c["low"],
            c["close"],
        )

    # PostgreSQL: every candle and vector replicated
    conn = await asyncpg.connect(pg_dsn)
    try:

        async def replicated() -> bool:
            n_candles = await conn.fetchval("SELECT count(*) FROM market.candles")
            n_vectors = await conn.fetchval("SELECT count(*) FROM market.features")
            return (n_candles, n_vectors) == (len(want), len(vectors))

        await eventually(replicated, what="rows in PostgreSQL")
        closes = {
            (r["tf"], r["close"]) for r in await conn.fetch("SELECT tf, close FROM market.candles")
        }
        assert closes == {(k[2], c["close"]) for k, c in want.items()}
    finally:
        await conn.close()
    # every worker had what it needed: not one refusal
    violations = re.findall(r'user:([\w-]+)" - (\w+) Violation - Subject "([^"]+)"', log(secured))
    assert violations == []


def log(secured: Secured) -> str:
    return secured.log.read_text()


# --- what each user is refused ------------------------------------------------------------

F, S, TF = "feed-x", "EURUSD", Timeframe.M1
CANDLES = subjects.candles(F, S, TF)
FEATURES = subjects.features(F, S, TF)
SCORES = subjects.scores(F, S, TF)
SIGNALS = subjects.signals(F, S, TF)
TICKS = subjects.ticks(F, S)
# what the server says when a subscriber's consumer gives up on a signal: only the server
# may say it (a forged one would dead-letter a signal the subscriber did get)
EXAMPLE_EXHAUSTED = subjects.max_deliveries("SIGNALS", "example")

REFUSED = {
    "candle-ingest": [
        FEATURES,
        SCORES,
        SIGNALS,
        "dlq.feature-builder",
        "$JS.API.STREAM.CREATE.TICKS",
        "$JS.API.STREAM.UPDATE.CANDLES",
        "$JS.API.CONSUMER.CREATE.CANDLES",
        "$JS.API.CONSUMER.MSG.NEXT.CANDLES.feature-builder",
        "$JS.API.CONSUMER.DELETE.TICKS.candle-ingest",
        # feature-builder's snapshots are pickled: no other worker may write them
        "$O.feature-builder-state.M.ZmVhdHVyZS1idWlsZGVy",
        "$JS.API.STREAM.PURGE.OBJ_feature-builder-state",
    ],
    "feature-builder": [
        TICKS,
        CANDLES,
        SCORES,
        SIGNALS,
        "dlq.candle-ingest",
        "$JS.API.STREAM.CREATE.CANDLES",
        "$JS.API.CONSUMER.CREATE.CANDLES",
        "$JS.API.CONSUMER.MSG.NEXT.TICKS.candle-ingest",
        "$JS.API.CONSUMER.DELETE.CANDLES.feature-builder",
        "$O.candle-ingest-state.M.Y2FuZGxlLWluZ2VzdA==",
    ],
    "timescale-replicator": [
        TICKS,
        CANDLES,
        FEATURES,
        SCORES,
        SIGNALS,
        "$JS.API.CONSUMER.MSG.NEXT.TICKS.candle-ingest",
        "$JS.API.STREAM.PURGE.CANDLES",
    ],
    "ea": [
        CANDLES,
        FEATURES,
        SIGNALS,
        "dlq.candle-ingest",
        "$JS.API.CONSUMER.CREATE.TICKS",
        "$JS.API.CONSUMER.MSG.NEXT.TICKS.candle-ingest",
        "$JS.API.CONSUMER.MSG.NEXT.SIGNALS.example",
        "$JS.API.STREAM.MSG.GET.TICKS",
    ],
    "signal-publisher": [
        EXAMPLE_EXHAUSTED,
        "$JS.API.CONSUMER.CREATE.ADVISORIES",
        "$JS.API.CONSUMER.DELETE.ADVISORIES.signal-publisher",
        "$JS.API.STREAM.PURGE.ADVISORIES",
        "$JS.API.CONSUMER.MSG.NEXT.SIGNALS.example",
    ],
    # the subscriber template may not take or settle signal-publisher's advisories, nor
    # dead-letter anything itself
    "subscriber-example": [
        EXAMPLE_EXHAUSTED,
        "$JS.API.CONSUMER.MSG.NEXT.ADVISORIES.signal-publisher",
        "$JS.API.CONSUMER.INFO.ADVISORIES.signal-publisher",
        "$JS.ACK.ADVISORIES.signal-publisher.1.1.1.1.0",
        "$JS.API.STREAM.INFO.ADVISORIES",
        "dlq.subscribers",
    ],
}


def violation(kind: str, subject: str) -> str:
    """The error nats-py hands to the error callback (it lower-cases the server's line)."""
    return f'nats: permissions violation for {kind} to "{subject}"'.lower()


@pytest.mark.parametrize("user", sorted(REFUSED))
async def test_each_user_is_refused_what_it_must_not_publish(
    secured: Secured, ops: JetStreamContext, user: str
) -> None:
    errors: list[Exception] = []
    nc = await secured.connect(user, errors)
    try:
        for subject in REFUSED[user]:
            await nc.publish(subject, b"{}", reply=nc.new_inbox())
        await nc.flush()
        await eventually(lambda: len(errors) >= len(REFUSED[user]), what="the refusals")
        assert [str(e) for e in errors] == [violation("publish", s) for s in REFUSED[user]]
        assert nc.is_connected, "a refusal must not cost the connection"
    finally:
        await nc.close()
    # nothing refused reached a stream
    for name in ("TICKS", "CANDLES", "FEATURES", "SCORES", "SIGNALS", "DLQ", "ADVISORIES"):
        assert (await ops.stream_info(name)).state.messages == 0, name


async def test_the_ea_may_consume_nothing(secured: Secured, ops: JetStreamContext) -> None:
    errors: list[Exception] = []
    nc = await secured.connect("ea", errors)
    try:
        for subject in ("ticks.>", CANDLES, SIGNALS, "_INBOX_example.>"):
            await nc.subscribe(subject)
        await nc.flush()
        await eventually(lambda: len(errors) >= 4, what="the refusals")
        assert [str(e) for e in errors] == [
            violation("subscription", s) for s in ("ticks.>", CANDLES, SIGNALS, "_INBOX_example.>")
        ]
    finally:
        await nc.close()


@pytest.mark.parametrize("user", ["signal-publisher", "subscriber-example"])
async def test_advisories_are_read_from_their_stream_only(
    secured: Secured, ops: JetStreamContext, user: str
) -> None:
    """Listening to the advisories themselves is refused: signal-publisher reads them
    from its durable on ADVISORIES, and a subscriber not at all."""
    errors: list[Exception] = []
    nc = await secured.connect(user, errors)
    try:
        await nc.subscribe(subjects.max_deliveries("SIGNALS"))
        await nc.flush()
        await eventually(lambda: errors, what="the refusal")
        assert [str(e) for e in errors] == [
            violation("subscription", subjects.max_deliveries("SIGNALS"))
        ]
    finally:
        await nc.close()


async def test_what_each_user_needs_is_allowed(secured: Secured, ops: JetStreamContext) -> None:
    errors: list[Exception] = []
    clients = {u: await secured.connect(u, errors) for u in REFUSED}
    try:
        ea = clients["ea"].jetstream()
        tick = {"type": "tick", "v": 1, "feed": F, "symbol": S, "time_ms": START_MS}
        ack = await ea.publish(TICKS, msgspec.json.encode({**tick, "bid": 1.1, "ask": 1.2}))
        assert (ack.stream, ack.seq) == ("TICKS", 1)

        ingest = clients["candle-ingest"].jetstream()
        mark = {"type": "watermark", "v": 1, "feed": F, "symbol": S, "time_ms": START_MS}
        assert (await ingest.publish(TICKS, msgspec.json.encode(mark))).seq == 2
        assert (await ingest.publish(CANDLES, b"{}")).stream == "CANDLES"
        # a restart reads back the last candle of a series it owes again
        assert (await ingest.get_last_msg("CANDLES", CANDLES)).data == b"{}"
        assert (await ingest.publish("dlq.candle-ingest", b"{}")).stream == "DLQ"
        pulled = await ingest.pull_subscribe_bind("candle-ingest", stream="TICKS")
        got = await pulled.fetch(2, timeout=5)
        assert [m.metadata.sequence.stream for m in got] == [1, 2]
        for m in got:
            await m.ack()

        builder = clients["feature-builder"].jetstream()
        assert (await builder.publish(FEATURES, b"{}")).stream == "FEATURES"
        assert (await builder.get_last_msg("FEATURES", FEATURES)).data == b"{}"
        assert (await builder.consumer_info("CANDLES", "feature-builder")).num_pending == 1

        replicator = clients["timescale-replicator"].jetstream()
        for stream in ("CANDLES", "FEATURES"):
            info = await replicator.consumer_info(stream, "timescale-replicator")
            assert info.num_pending == 1
        assert (await replicator.stream_info("SIGNALS")).state.messages == 0

        # signal-publisher takes and acks the advisories ADVISORIES kept for it (the one
        # here published as the server would, by ops)
        publisher = clients["signal-publisher"].jetstream()
        await ops.publish(EXAMPLE_EXHAUSTED, b"{}")
        assert (await publisher.stream_info("ADVISORIES")).state.messages == 1
        assert (await publisher.consumer_info("ADVISORIES", "signal-publisher")).num_pending == 1
        advisories = await publisher.pull_subscribe_bind("signal-publisher", stream="ADVISORIES")
        (taken,) = await advisories.fetch(1, timeout=5)
        assert taken.subject == EXAMPLE_EXHAUSTED
        await taken.ack_sync()
        # and dead-letters for a pipeline worker lost holding a message on its last delivery
        assert (await publisher.get_msg("TICKS", 1)).data == (await ops.get_msg("TICKS", 1)).data
        for worker in ("candle-ingest", "feature-builder", "model-scorer", "timescale-replicator"):
            assert (await publisher.publish(f"dlq.{worker}", b"{}")).stream == "DLQ"

        # deliveries lost on the way are read back through each stateful worker's own
        # short-lived consumer, with its durable's filter
        await ops.publish(SCORES, b"{}")
        specs = {(c.stream, c.durable): c for c in streams.consumer_specs()}
        for user, stream in (
            ("candle-ingest", "TICKS"),
            ("feature-builder", "CANDLES"),
            ("signal-publisher", "SCORES"),
            ("timescale-replicator", "CANDLES"),
            ("timescale-replicator", "FEATURES"),
            ("timescale-replicator", "SCORES"),
        ):
            nc = clients[user]
            read = read_stream(
                nc,
                nc.jetstream(),
                stream,
                consumer=user + READ_BACK_SUFFIX,
                filter_subjects=specs[stream, user].filter_subjects,
                first=1,
                last=1,
                desc="read back",
                progress=False,
            )
            assert [info.stream_seq async for batch in read for info, _ in batch] == [1], user
    finally:
        for nc in clients.values():
            await nc.close()
    assert errors == []
    await eventually(lambda: consumed(ops, "TICKS", "candle-ingest"), what="acks")
    await eventually(lambda: consumed(ops, "ADVISORIES", "signal-publisher"), what="the ack")


async def test_signal_publisher_runs_under_its_own_user(
    secured: Secured, ops: JetStreamContext
) -> None:
    """Its policy bucket, warm-up, signals, and a subscriber's exhausted delivery turned
    into a dead letter, all with the deployed permissions."""
    from contextlib import suppress

    from nats.errors import TimeoutError as NatsTimeout

    from tests.integration.test_signal_publisher import make_score
    from workers.signal_publisher.app import Settings as SignalSettings
    from workers.signal_publisher.app import build as build_signals

    deaf = msgspec.structs.replace(
        streams.signal_subscriber("deaf"), ack_wait=1.0, backoff=(1.0,), max_deliver=2
    )
    await streams.ensure(ops, [], [deaf])
    worker = build_signals(SignalSettings(**secured.settings("signal-publisher"), pull_expires_s=1))
    running = [await started(worker)]
    try:
        score = msgspec.structs.replace(make_score(S, 0, 0.9), feed=F)
        await ops.publish(subjects.scores(F, S, TF), msgspec.json.encode(score))
        await eventually(lambda: consumed(ops, "SCORES", "signal-publisher"), what="the score")
        assert (await ops.stream_info("SIGNALS")).state.messages == 1
        pulled = await ops.pull_subscribe_bind("deaf", stream="SIGNALS")

        async def dead_lettered() -> bool:
            with suppress(NatsTimeout):
                await pulled.fetch(1, timeout=0.5)  # and never acked
            return (await ops.stream_info("DLQ")).state.messages == 1

        await eventually(dead_lettered, timeout=30, what="the subscriber's dead letter")
        await eventually(
            lambda: consumed(ops, "ADVISORIES", "signal-publisher"), what="the advisory acked"
        )
    finally:
        await stop_all(running)
    letter = msgspec.json.decode((await ops.get_msg("DLQ", 1)).data, type=DeadLetter)
    assert (letter.reason, letter.worker) == ("max_deliveries", "deaf")
    violations = re.findall(r'user:([\w-]+)" - (\w+) Violation - Subject "([^"]+)"', log(secured))
    assert violations == []


async def test_model_scorer_runs_under_its_own_user(
    secured: Secured, ops: JetStreamContext
) -> None:
    """The registry read, the hot-reload watch, scores, a dead letter and the look for a
    stored score, all with the deployed permissions; each score is the booster's own
    prediction."""
    from tests.scorer_models import card_for, expected_probabilities, train, vectors
    from workers.model_scorer.app import Settings as ScorerSettings
    from workers.model_scorer.app import build as build_scorer
    from workers.registry import Registry

    registry = await Registry.open(ops)
    booster = train(7)
    version = await registry.put(booster.model_to_string().encode(), card_for(booster, F, S, TF))
    assert (await registry.promote(version))[0]
    sent = vectors(F, S, TF, 40, seed=8)
    worker = build_scorer(ScorerSettings(**secured.settings("model-scorer"), pull_expires_s=1))
    running = [await started(worker)]
    try:
        for v in sent:
            await ops.publish(subjects.features(v.feed, v.symbol, v.tf), msgspec.json.encode(v))
        await ops.publish(subjects.features(F, S, TF), b"{not json")
        await eventually(lambda: consumed(ops, "FEATURES", "model-scorer"), what="the vectors")
    finally:
        await stop_all(running)
    info = await ops.stream_info("SCORES")
    got = [
        msgspec.json.decode((await ops.get_msg("SCORES", seq)).data, type=Score)
        for seq in range(info.state.first_seq, info.state.last_seq + 1)
    ]
    want = {v.open_time_ms: expected_probabilities(booster, v) for v in sent}
    assert {s.open_time_ms: s.probabilities for s in got} == want
    assert {s.model_version for s in got} == {version}
    letter = msgspec.json.decode((await ops.get_msg("DLQ", 1)).data, type=DeadLetter)
    assert letter.worker == "model-scorer"
    # a redelivered vector's score is looked for on SCORES before it is published again
    from workers.runtime.publish import MSG_ID, Outgoing, stored_since

    last = await ops.get_msg("SCORES", info.state.last_seq)
    score = Outgoing(last.subject, b"", (last.headers or {})[MSG_ID])
    nc = await secured.connect("model-scorer")
    try:
        assert await stored_since(nc, "SCORES", [score], [0], 5.0) == {0}
    finally:
        await nc.close()


async def test_a_subscriber_reads_its_own_consumer_with_its_own_inbox(
    secured: Secured, ops: JetStreamContext
) -> None:
    """``tickwire subscribe example`` as the deployed subscriber user: the signal is printed
    and acked; the same user with the default inbox is refused."""
    import sys

    from contracts.messages import Side, Signal

    await streams.ensure(ops, [], [streams.signal_subscriber("example")])
    signal = Signal(
        signal_id=f"{F}|{S}|M1|{START_MS}|m-1",
        feed=F,
        symbol=S,
        tf=TF,
        open_time_ms=START_MS,
        candle_revision=0,
        side=Side.BUY,
        strength=0.8,
        ref_price=1.1,
        expires_ms=4_102_444_800_000,  # 2100: actionable
        model_version="m-1",
        feature_set_id="fs",
    )
    await ops.publish(subjects.signals(F, S, TF), msgspec.json.encode(signal))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": secured.url,
        "TICKWIRE_NATS_USER": "subscriber-example",
        "TICKWIRE_NATS_PASSWORD": secured.passwords["subscriber-example"],
        "TICKWIRE_NATS_INBOX_PREFIX": "_INBOX_example",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.cli",
        "subscribe",
        "example",
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().startswith(f"SIGNAL {signal.signal_id} BUY")
        await eventually(lambda: consumed(ops, "SIGNALS", "example"), what="the ack")
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)

    errors: list[Exception] = []
    nc = await secured.connect("subscriber-example", errors)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.jetstream().consumer_info("SIGNALS", "example", timeout=2)
        await eventually(
            lambda: any('subscription to "_inbox.' in str(e).lower() for e in errors),
            what="the refusal of the default inbox",
        )
    finally:
        await nc.close()


# --- partitions ---------------------------------------------------------------------------


@pytest.fixture
def partitioned(tmp_path: Path) -> Iterator[Secured]:
    """A server on the deployed accounts file with candle-ingest's block as
    `tickwire nats-permissions candle-ingest --partitions 2` prints it."""
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "nats-permissions",
            "candle-ingest",
            "--partitions",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    lines = ACCOUNTS.read_text().splitlines()
    first = lines.index(f"{block_name('candle-ingest')}: {{")
    last = lines.index("}", first)
    accounts = tmp_path / "accounts.conf"
    accounts.write_text("\n".join([*lines[:first], printed, *lines[last + 1 :]]) + "\n")
    yield from serve(tmp_path / "server", accounts)


async def test_partitions_run_under_the_permissions_printed_for_them(
    partitioned: Secured, questdb: QuestDBUrls, unique: str
) -> None:
    """ops make every partition's consumer with `tickwire streams ensure --partitions`, and
    two candle-ingest partitions run under candle-ingest's own user: together they make
    every candle once. The deployed block alone does not allow a partition's consumer."""
    env = {
        **os.environ,
        "TICKWIRE_NATS_URL": partitioned.url,
        "TICKWIRE_NATS_USER": "ops",
        "TICKWIRE_NATS_PASSWORD": partitioned.passwords["ops"],
    }
    ensured = await asyncio.to_thread(
        subprocess.run,
        [
            *(sys.executable, "-m", "workers.cli", "streams", "ensure"),
            *("--partitions", "candle-ingest=2", "--partitions", "feature-builder=2"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ensured.returncode == 0, ensured.stderr
    for durable in ("candle-ingest-0of2", "candle-ingest-1of2", "feature-builder-1of2"):
        assert durable in ensured.stdout

    # symbols owned by each partition, as the workers split them
    feed = unique
    owner = {
        s: partition_of(ingest_key(subjects.ticks(feed, s)), 2)
        for s in ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "US500.cash", "GER40", "BTCUSD")
    }
    symbols = [next(s for s, k in owner.items() if k == p) for p in (0, 1)]
    ticks = [t for i, s in enumerate(symbols) for t in make_ticks(feed, 150, seed=i, symbol=s)]
    ea_nc = await partitioned.connect("ea")
    ops_nc = await partitioned.connect("ops")
    ops = ops_nc.jetstream()
    running: list[tuple[Any, asyncio.Task[None]]] = []
    try:
        # every tick is on the stream before the first watermark closes what is idle
        await publish_ticks(ea_nc.jetstream(), ticks)
        for k in (0, 1):
            settings = candle_ingest.app.Settings(
                **partitioned.settings("candle-ingest"),
                partitions=2,
                partition=k,
                questdb_ilp=questdb.ilp_conf,
                questdb_http=questdb.http,
                idle_close=True,
                idle_grace_s=0.5,
                idle_silence_s=1.0,  # the ticks are from the past: closed once they stop
                pull_expires_s=1,
            )
            running.append(await started(build_ingest(settings)))
        want = reference.candles(ticks)
        await at_least(lambda: stream_messages(ops, "CANDLES"), len(want), "every candle")
        for durable in ("candle-ingest-0of2", "candle-ingest-1of2"):
            await eventually(lambda d=durable: consumed(ops, "TICKS", d), what=durable)
        owned = [set(w.context.state["ingest"].agg.symbols()) for w, _ in running]
        await stop_all(running)
        running = []

        # without the printed lines a partition's consumer is refused
        errors: list[Exception] = []
        builder = await partitioned.connect("feature-builder", errors)
        try:
            await builder.publish(
                "$JS.API.CONSUMER.INFO.CANDLES.feature-builder-1of2", b"", reply=builder.new_inbox()
            )
            await builder.flush()
            await eventually(lambda: errors, what="the refusal")
        finally:
            await builder.close()
        assert [str(e) for e in errors] == [
            violation("publish", "$JS.API.CONSUMER.INFO.CANDLES.feature-builder-1of2")
        ]
    finally:
        await stop_all(running)
        await ea_nc.close()

    try:
        assert owned == [{(feed, symbols[0])}, {(feed, symbols[1])}]
        published = as_candles(await stream_messages(ops, "CANDLES"))
        assert reference.differences(each_once(published), want) == []
        letters = await stream_messages(ops, "DLQ")
        assert letters == []
    finally:
        await ops_nc.close()
