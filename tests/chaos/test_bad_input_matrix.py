"""The bad-input matrix through the whole pipeline (``make chaos``).

A clean EA tick stream (tests/market.py, without its troubles) runs through candle-ingest,
feature-builder, model-scorer, signal-publisher and timescale-replicator, with bad input of
every class mixed into each stage's input stream: the classes of design invariant 4, a 1 MB
payload, ticks for 10,000 symbols the deployment does not know, a feed other than the
subject's (the credential side, a publish on another feed's subjects, is refused by the
NATS server: tests/integration/test_nats_users.py), a schema version from the future.
Every bad message must end in a dead-letter
subject with its reason, every good one must be processed as if the bad ones were not
there, and no bad row may be stored in QuestDB or PostgreSQL. The figures are printed as a
table.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import asyncpg
import msgspec
import pytest
from nats.js import JetStreamContext

from contracts import streams, subjects
from contracts.messages import Candle, DeadLetter, FeatureVector, Score, Timeframe
from db.migrate import migrate
from db.questdb import query, wait_for_wal
from infra.stack import QuestDBUrls, StackUrls
from tests import market, reference
from tests.integration.test_candle_ingest import (
    DAY_START_MS,
    drop_namespace,
    latest,
    on_stream,
    stream_messages,
)
from tests.scorer_models import card_for, train
from tests.waiting import eventually
from workers.candle_ingest import app as candle_ingest
from workers.feature_builder import app as feature_builder
from workers.model_scorer import app as model_scorer
from workers.registry import Registry, bucket_name
from workers.signal_publisher import app as signal_publisher
from workers.timescale_replicator.app import Replicator
from workers.timescale_replicator.app import Settings as ReplicatorSettings

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

T = TypeVar("T")

UNKNOWN_SYMBOLS = 10_000
MAX_PAYLOAD = 256 * 1024
"""candle-ingest's limit as deployed here: a batch of 1,000 ticks is some 100 KB."""
STAGES = {
    # input stream: the workers that consume it
    streams.TICKS: ("candle-ingest",),
    streams.CANDLES: ("feature-builder", "timescale-replicator"),
    streams.FEATURES: ("model-scorer", "timescale-replicator"),
    streams.SCORES: ("signal-publisher", "timescale-replicator"),
    streams.SIGNALS: ("timescale-replicator",),
}


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    yield unique
    await drop_namespace(js, unique)
    for bucket in (
        bucket_name(unique),
        f"ns-{unique}-signal-policy",
        f"ns-{unique}-signal-sides",
    ):
        with contextlib.suppress(Exception):
            await js.delete_object_store(bucket)
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)


def tick_body(feed: str, symbol: str, time_ms: int, **kw: Any) -> bytes:
    body = {"type": "tick", "v": 1, "feed": feed, "symbol": symbol, "time_ms": time_ms}
    return msgspec.json.encode(body | {"bid": 1.1, "ask": 1.1002} | kw)


def newest_ms(messages: list[tuple[str, str, bytes, str]], feed: str, symbol: str) -> int:
    """Time of the newest tick of ``feed``/``symbol`` among ``messages``."""
    newest = 0
    for f, s, payload, _ in messages:
        if (f, s) == (feed, symbol):
            body = msgspec.json.decode(payload)
            for tick in body.get("ticks", [body]):
                newest = max(newest, tick["time_ms"])
    return newest


def bad_ticks(sc: market.Scenario, ns: str, t: int) -> list[tuple[str, str, bytes, str]]:
    """(class, expected reason, payload, subject) of every bad tick, sent when the newest
    tick of the first symbol is at ``t``."""
    feed, symbol = sc.symbols[0]
    subject = subjects.ticks(feed, symbol, namespace=ns)
    now = int(time.time() * 1000)

    def tick(**kw: Any) -> bytes:
        return tick_body(kw.pop("feed", feed), kw.pop("symbol", symbol), kw.pop("time_ms", t), **kw)

    rows = [
        ("malformed JSON", "malformed_json", b'{"type":"tick","feed":', subject),
        ("schema version from the future", "unknown_schema_version", tick(v=2), subject),
        ("missing fields", "missing_field", b'{"type":"tick","v":1,"feed":"feed-a"}', subject),
        ("infinite price", "invalid_value", tick(bid=7.5).replace(b"7.5", b"1e999"), subject),
        ("NaN price (null)", "invalid_value", tick(bid=None), subject),
        ("zero price", "bad_price", tick(bid=0.0), subject),
        ("negative price", "bad_price", tick(ask=-1.1), subject),
        ("bid above ask", "bid_above_ask", tick(bid=1.2), subject),
        ("negative volume", "negative_volume", tick(volume=-1.0), subject),
        ("time far in the future", "future_time", tick(time_ms=now + 86_400_000), subject),
        ("time before the lateness window", "too_late", tick(time_ms=t - 3_600_000), subject),
        ("1 MB payload", "oversized", tick(comment="x" * 1_000_000), subject),
        ("illegal symbol", "illegal_symbol", tick(symbol="EUR\x07USD"), subject),
        ("wrong feed for the subject", "subject_mismatch", tick(feed="feed-z"), subject),
    ]
    for k in range(UNKNOWN_SYMBOLS):
        other = f"UNK{k:05d}"
        rows.append(
            (
                f"{UNKNOWN_SYMBOLS:,} unknown symbols",
                "unknown_symbol",
                tick_body(feed, other, t),
                subjects.ticks(feed, other, namespace=ns),
            )
        )
    return rows


def bad_downstream(sc: market.Scenario, ns: str) -> list[tuple[str, str, bytes, str]]:
    """(class, input stream, payload, subject) of bad messages on the later streams."""
    feed, symbol = sc.symbols[0]
    tf, t = Timeframe.M1, market.START_MS
    candle = Candle(
        feed=feed, symbol=symbol, tf=tf, open_time_ms=t, close_time_ms=t + tf.ms,
        open=1.1, high=1.0, low=1.2, close=1.1, tick_volume=3,
        first_tick_ms=t, last_tick_ms=t + 1_000, revision=99,
    )  # fmt: skip
    vector = FeatureVector(
        feed=feed, symbol=symbol, tf=tf, open_time_ms=t, candle_revision=99, close=1.1,
        close_time_ms=t + tf.ms, last_tick_ms=t + 1_000, feature_set_id="fs-unknown",
        values=[123456.5, 2.0],
    )  # fmt: skip
    score = Score(
        feed=feed, symbol=symbol, tf=tf, open_time_ms=t, candle_revision=99, close=-1.0,
        close_time_ms=t + tf.ms, last_tick_ms=t + 1_000, feature_set_id="fs",
        model_version="m-unknown", probabilities=[1.5, -0.5], score=2.0,
    )  # fmt: skip
    return [
        ("candle with high below low", streams.CANDLES, msgspec.json.encode(candle),
         subjects.candles(feed, symbol, tf, namespace=ns)),
        ("vector with an infinite value", streams.FEATURES,
         msgspec.json.encode(vector).replace(b"123456.5", b"1e999"),
         subjects.features(feed, symbol, tf, namespace=ns)),
        ("score out of range, negative price", streams.SCORES, msgspec.json.encode(score),
         subjects.scores(feed, symbol, tf, namespace=ns)),
        ("malformed signal", streams.SIGNALS, b'{"type":"signal","v":1,',
         subjects.signals(feed, symbol, tf, namespace=ns)),
    ]  # fmt: skip


async def publish_all(js: JetStreamContext, items: list[tuple[str, bytes, dict[str, str]]]) -> None:
    pending = []
    for subject, payload, headers in items:
        pending.append(await js.publish_async(subject, payload, headers=headers or None))
        if len(pending) >= 2_000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)


async def settled(js: JetStreamContext, ns: str) -> bool:
    """Every consumer of every stage has taken and acked everything."""
    for base, workers in STAGES.items():
        stream = streams.stream_name(base, namespace=ns)
        for durable in workers:
            info = await js.consumer_info(stream, durable)
            if info.num_pending or info.num_ack_pending:
                return False
    return True


async def pg_rows(dsn: str, ns: str, table: str) -> list[asyncpg.Record]:
    """The rows of a namespace's table (the replicator keeps them in schema ns_<name>)."""
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(f"SELECT feed, symbol FROM ns_{ns}.{table}")
        return rows
    finally:
        await conn.close()


async def test_every_bad_message_is_a_dead_letter_and_every_good_one_is_processed(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str, pg_dsn: str
) -> None:
    ns = namespace
    sc = market.scenario(seed=21, ticks=18_000, troubles=False)
    good_symbols = {s for _, s in sc.symbols}
    await migrate(pg_dsn)
    await streams.ensure(
        js, streams.stream_specs(namespace=ns), streams.consumer_specs(namespace=ns)
    )
    registry = await Registry.open(js, namespace=ns)
    for k, (feed, symbol) in enumerate(sc.symbols):  # M1: longer ones are still warming up
        booster = train(100 + k)
        card = card_for(booster, feed, symbol, Timeframe.M1)
        version = await registry.put(booster.model_to_string().encode(), card)
        assert (await registry.promote(version, force=True))[0]

    common: dict[str, Any] = {"nats_url": stack.nats_url, "namespace": ns, "pull_expires_s": 1}
    ingest = candle_ingest.build(
        candle_ingest.Settings(
            **common,
            questdb_ilp=questdb.ilp_conf,
            questdb_http=questdb.http,
            day_start_minutes=DAY_START_MS // 60_000,
            idle_close=False,
            max_payload_bytes=MAX_PAYLOAD,
            symbols=",".join(f"{f}/{s}" for f, s in sc.symbols),
        )
    )
    workers: list[Any] = [
        ingest,
        feature_builder.build(feature_builder.Settings(**common)),
        model_scorer.build(model_scorer.Settings(**common)),
        signal_publisher.build(signal_publisher.Settings(**common)),
        Replicator(ReplicatorSettings(**common, postgres_dsn=pg_dsn)),
    ]
    half = len(sc.messages) // 2
    bad = bad_ticks(sc, ns, newest_ms(sc.messages[:half], *sc.symbols[0]))
    downstream = bad_downstream(sc, ns)
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        await eventually(
            lambda: (
                all(getattr(w, "lead", w).started.is_set() for w in workers)
                or any(t.done() for t in tasks)
            ),
            timeout=60,
            what="every worker started",
        )
        ticks = [
            (subjects.ticks(f, s, namespace=ns), p, {"Nats-Msg-Id": i})
            for f, s, p, i in sc.messages
        ]
        await publish_all(js, ticks[:half])
        await publish_all(js, [(subj, payload, {}) for *_, payload, subj in bad])
        await publish_all(js, [(subj, payload, {}) for *_, payload, subj in downstream])
        await publish_all(js, ticks[half:])
        end = sc.last_ms + 3 * 86_400_000  # closes every candle
        await publish_all(
            js,
            [
                (
                    subjects.ticks(f, s, namespace=ns),
                    market.watermark(f, s, end),
                    market.watermark_headers(f, s, end),
                )
                for f, s in sc.symbols
            ],
        )
        await eventually(lambda: settled(js, ns), timeout=300, what="every stage settled")
    finally:
        for w in workers:
            w.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    letters = await on_stream(js, streams.DLQ, ns, DeadLetter)
    by_payload: defaultdict[bytes, list[tuple[str, str]]] = defaultdict(list)
    for d in letters:
        by_payload[d.payload].append((d.worker, d.reason))

    # every bad tick: one dead letter of candle-ingest with the expected reason
    table: Counter[tuple[str, str, str]] = Counter()
    problems = []
    for what, reason, payload, _ in bad:
        got = by_payload.get(payload, [])
        if got != [("candle-ingest", reason)]:
            problems.append(f"{what}: {got[:3]} instead of candle-ingest/{reason}")
        table[what, "TICKS", f"candle-ingest:{reason}"] += 1
    # every bad message of a later stage: a dead letter of each of its consumers
    for what, base, payload, _ in downstream:
        got = by_payload.get(payload, [])
        if sorted(w for w, _ in got) != sorted(STAGES[base]):
            problems.append(f"{what}: dead-lettered by {got}, not by each of {STAGES[base]}")
        table[what, base, " ".join(f"{w}:{r}" for w, r in sorted(got))] += 1
    bad_payloads = {p for *_, p, _ in bad} | {p for *_, p, _ in downstream}
    strays = [
        (d.worker, d.reason, d.payload[:80]) for d in letters if d.payload not in bad_payloads
    ]
    assert problems == []
    assert strays == [], "good input was dead-lettered"

    # every good tick taken, the candles those ticks make and nothing else
    sample = ingest.metrics.registry.get_sample_value
    accepted = sample("tickwire_ticks_in_total", {"worker": "candle-ingest", "outcome": "accepted"})
    assert accepted == len(sc.accepted)
    planted = {payload for *_, payload, _ in downstream}

    async def produced_on(base: str, tp: type[T]) -> list[T]:
        """What the pipeline published on a stream (the planted bad message left out)."""
        raw = await stream_messages(js, streams.stream_name(base, namespace=ns))
        return [msgspec.json.decode(m, type=tp) for m in raw if m not in planted]

    from_ingest = await produced_on(streams.CANDLES, Candle)
    want = reference.candles(sc.accepted, day_start_ms=DAY_START_MS)
    assert reference.differences(latest(from_ingest), want) == []
    vectors = await produced_on(streams.FEATURES, FeatureVector)
    assert len(vectors) == len(from_ingest)
    scores = await produced_on(streams.SCORES, Score)
    warm = [v for v in vectors if not v.warming_up]
    assert len(scores) == len(warm) > 0

    # no bad row stored
    prefix = f"ns_{ns}_"
    await asyncio.to_thread(wait_for_wal, questdb.http, f"{prefix}candles", timeout=60)
    quest = await asyncio.to_thread(
        query,
        questdb.http,
        "SELECT feed, symbol, count() n FROM {prefix}candles",
        table_prefix=prefix,
    )
    bad_rows = {"QuestDB": sum(r["n"] for r in quest if r["symbol"] not in good_symbols)}
    assert {r["symbol"] for r in quest} == good_symbols
    assert sum(r["n"] for r in quest) == len(want)
    stored = {t: await pg_rows(pg_dsn, ns, t) for t in ("candles", "features", "scores", "signals")}
    assert len(stored["candles"]) == len(want)
    assert len(stored["features"]) == len(keys(vectors))
    assert len(stored["scores"]) == len({score_key(s) for s in scores})
    good_pairs = set(sc.symbols)
    for t, rows in stored.items():
        bad_rows[f"PostgreSQL {t}"] = sum((r["feed"], r["symbol"]) not in good_pairs for r in rows)
    assert set(bad_rows.values()) == {0}, bad_rows

    print_table(table, len(sc.accepted), len(from_ingest), len(vectors), len(scores), stored)
    print("bad rows stored: " + ", ".join(f"{k} {n}" for k, n in bad_rows.items()))


def keys(vectors: list[FeatureVector]) -> set[tuple[str, str, str, int]]:
    return {(v.feed, v.symbol, v.tf.value, v.open_time_ms) for v in vectors}


def score_key(s: Score) -> tuple[str, str, str, int, str]:
    return (s.feed, s.symbol, s.tf.value, s.open_time_ms, s.model_version)


def print_table(
    table: Counter[tuple[str, str, str]],
    ticks: int,
    candles: int,
    vectors: int,
    scores: int,
    stored: dict[str, list[asyncpg.Record]],
) -> None:
    lines = [
        "",
        f"{'bad input':34} {'stream':9} {'sent':>6}  dead letters (worker:reason)",
    ]
    for (what, stream, letters), n in table.items():
        lines.append(f"{what:34} {stream:9} {n:>6}  {letters}")
    lines.append(
        f"good: {ticks:,} ticks taken -> {candles:,} candles -> {vectors:,} vectors -> "
        f"{scores:,} scores; PostgreSQL rows "
        + ", ".join(f"{t} {len(r):,}" for t, r in stored.items())
    )
    print("\n".join(lines))
