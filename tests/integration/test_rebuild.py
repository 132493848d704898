"""tickwire rebuild on the real servers, beside the live model-scorer and signal-publisher.

The live pipeline's feature vectors were made by a builder with a bug (the three returns
in basis points, with the wrong sign); scores and signals followed from them. After the fix, a rebuild of a
range must leave in the streams, and after the replicator in the tables, the values an
independent computation gives: the batch form of the features, the booster's own
predictions, and the positions a plain hysteresis over those scores holds. Outside the
range nothing changes, the live workers make nothing of the rebuilt messages, and a second
rebuild publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import Candle, FeatureVector, Score, Side, Signal, Timeframe
from infra.stack import StackUrls
from tests.candles import series
from tests.integration.test_feature_builder import (
    close_enough,
    consumed,
    run_worker,
    stream_messages,
)
from tests.integration.test_feature_builder import settings as builder_settings
from tests.integration.test_model_scorer import put
from tests.integration.test_signal_publisher import M1, T0, make_score, run_once, signals_of
from tests.integration.test_timescale_replicator import (
    replicated,
    replicator_consumers,
    start,
    stop,
    tables,
    writer_dsn,  # noqa: F401  (a fixture)
)
from tests.integration.test_timescale_replicator import settings as replicator_settings
from tests.scorer_models import expected_probabilities, train
from tests.waiting import eventually
from workers import cli
from workers.feature_builder import app as builder_app
from workers.features import DEFAULT, Candles
from workers.model_scorer import app as scorer_app
from workers.rebuild import plan
from workers.rebuild.app import Settings, rebuild
from workers.rebuild.plan import request
from workers.registry import Registry, bucket_name
from workers.signal_publisher import app as publisher_app
from workers.signal_publisher.policy import SIDES_BUCKET, kv_bucket
from workers.timescale_replicator.app import Replicator

pytestmark = pytest.mark.integration

FEED = "demo"
SYMBOLS = ("EURUSD", "US500.cash")
N = 150
FIRST, END = 60, 110
"""The range rebuilt, as candle indexes: [FIRST, END)."""
RETURNS = 3
"""ret_1, ret_5, ret_20: the values the bug got wrong (-1e4 times the right ones)."""


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    await streams.ensure(js, streams.stream_specs(namespace=unique), replicator_consumers(unique))
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    for bucket in (
        bucket_name(unique),
        kv_bucket(namespace=unique),
        kv_bucket(SIDES_BUCKET, unique),
    ):
        with contextlib.suppress(Exception):
            await js.delete_key_value(bucket)
    for store in (bucket_name(unique), builder_app.bucket_name(unique)):
        with contextlib.suppress(Exception):
            await js.delete_object_store(store)


def market() -> dict[str, list[Candle]]:
    return {
        s: series(N, seed=31 + i, feed=FEED, symbol=s, price=1.1 + 4000 * i)
        for i, s in enumerate(SYMBOLS)
    }


def vectors(candles: list[Candle], *, buggy: bool) -> list[FeatureVector]:
    """The batch form of the features (independent of the stepper the rebuild runs)."""
    values = DEFAULT.batch(Candles.from_bars(candles))
    if buggy:
        values[:, :RETURNS] *= -1e4
    return [
        FeatureVector(
            feed=c.feed,
            symbol=c.symbol,
            tf=c.tf,
            open_time_ms=c.open_time_ms,
            candle_revision=c.revision,
            close=c.close,
            close_time_ms=c.close_time_ms,
            last_tick_ms=c.last_tick_ms,
            feature_set_id=DEFAULT.id,
            values=[0.0 if np.isnan(x) else float(x) for x in row],
            warming_up=i + 1 < DEFAULT.warmup,
        )
        for i, (c, row) in enumerate(zip(candles, values, strict=True))
    ]


async def publish(
    js: JetStreamContext, namespace: str, items: list[Candle | FeatureVector]
) -> None:
    futures = []
    for m in items:
        make = subjects.candles if isinstance(m, Candle) else subjects.features
        revision = m.revision if isinstance(m, Candle) else m.candle_revision
        msg_id = f"{m.feed}|{m.symbol}|{m.tf.value}|{m.open_time_ms}|{revision}"
        if isinstance(m, FeatureVector):
            msg_id += f"|{m.feature_set_id}"
        subject = make(m.feed, m.symbol, m.tf, namespace=namespace)
        futures.append(
            await js.publish_async(subject, msgspec.json.encode(m), headers={"Nats-Msg-Id": msg_id})
        )
    await asyncio.gather(*futures)


def in_force(messages: list[bytes], tp: type) -> dict[tuple[str, int], object]:
    """Per (symbol, open time) the last message in the stream (one revision per candle here)."""
    decode = msgspec.json.Decoder(tp).decode
    out: dict[tuple[str, int], object] = {}
    for data in messages:
        m = decode(data)
        out[m.symbol, m.open_time_ms] = m
    return out


def hysteresis(scores: list[float], el: float, xl: float, es: float, xs: float) -> list[Side]:
    pos, out = Side.FLAT, []
    for s in scores:
        if pos is Side.BUY:
            pos = Side.SELL if s <= es else Side.FLAT if s <= xl else Side.BUY
        elif pos is Side.SELL:
            pos = Side.BUY if s >= el else Side.FLAT if s >= xs else Side.SELL
        else:
            pos = Side.BUY if s >= el else Side.SELL if s <= es else Side.FLAT
        out.append(pos)
    return out


def held(sides: dict[int, Side], times: list[int]) -> list[Side]:
    """The side held after each candle, from the signals in force."""
    pos, out = Side.FLAT, []
    for t in times:
        pos = sides.get(t, pos)
        out.append(pos)
    return out


async def idle(js: JetStreamContext, namespace: str) -> bool:
    for base, durable in ((streams.FEATURES, "model-scorer"), (streams.SCORES, "signal-publisher")):
        info = await js.consumer_info(streams.stream_name(base, namespace=namespace), durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def last_seqs(js: JetStreamContext, namespace: str) -> list[int]:
    return [
        (await js.stream_info(streams.stream_name(b, namespace=namespace))).state.last_seq
        for b in (streams.FEATURES, streams.SCORES, streams.SIGNALS)
    ]


async def test_rebuild_fixes_the_range_only_beside_live_workers_and_twice_changes_nothing(
    stack: StackUrls,
    nc: NATS,
    js: JetStreamContext,
    namespace: str,
    writer_dsn: str,  # noqa: F811
    pg_dsn: str,
) -> None:
    candles = market()
    good = {s: vectors(c, buggy=False) for s, c in candles.items()}
    bad = {s: vectors(c, buggy=True) for s, c in candles.items()}
    boosters = {s: train(7 + i) for i, s in enumerate(SYMBOLS)}

    def probabilities(vs: list[FeatureVector]) -> list[list[float]]:
        return [expected_probabilities(boosters[v.symbol], v) for v in vs]

    # thresholds where the live (buggy) scores cross them often
    live = [p[-1] - p[0] for s in SYMBOLS for p in probabilities(bad[s][DEFAULT.warmup - 1 :])]
    el, xl, es, xs = (float(np.quantile(live, q)) for q in (0.75, 0.5, 0.25, 0.45))
    policy = {"defaults": {"entry_long": el, "exit_long": xl, "entry_short": es, "exit_short": xs}}
    kv = await js.create_key_value(bucket=kv_bucket(namespace=namespace), history=5)
    await kv.put("policy", msgspec.json.encode(policy))
    registry = await Registry.open(js, namespace=namespace)
    for s in SYMBOLS:
        version = await put(registry, boosters[s], (s, Timeframe.M1))
        assert (await registry.promote(version, force=True))[0]

    await publish(js, namespace, [m for s in SYMBOLS for m in (*candles[s], *bad[s])])
    kw = {"nats_url": stack.nats_url, "namespace": namespace, "pull_expires_s": 1}
    scorer = scorer_app.build(scorer_app.Settings(**kw))
    publisher = publisher_app.build(publisher_app.Settings(**kw))
    tasks = [await run_worker(scorer), await run_worker(publisher)]
    try:
        await eventually(lambda: idle(js, namespace), timeout=60, what="live pipeline idle")
        before = {
            b: await stream_messages(js, b, namespace)
            for b in (streams.FEATURES, streams.SCORES, streams.SIGNALS)
        }
        times = [c.open_time_ms for c in candles[SYMBOLS[0]]]
        req = request(
            start=str(times[FIRST]), end=str(times[END]), stages="features,scores,signals"
        )
        settings = Settings(**kw)
        report = await rebuild(nc, settings, req)
        # the live workers take the rebuilt messages and make nothing of them
        await eventually(lambda: idle(js, namespace), timeout=60, what="live pipeline idle")
        after = {b: await stream_messages(js, b, namespace) for b in before}
        seqs = await last_seqs(js, namespace)
        again = await rebuild(nc, settings, req)
        assert await last_seqs(js, namespace) == seqs
    finally:
        scorer.stop()
        publisher.stop()
        await asyncio.gather(*tasks)
    assert sum(again.published.values()) == 0, again.lines()
    assert report.published["features"] == len(SYMBOLS) * (END - FIRST), report.lines()

    # nothing published before is gone or changed; what is new is the rebuild's alone
    for b, old in before.items():
        assert after[b][: len(old)] == old
        assert all(msgspec.json.decode(m)["rebuild"] == 1 for m in after[b][len(old) :]), b

    vs = in_force(after[streams.FEATURES], FeatureVector)
    ss = in_force(after[streams.SCORES], Score)
    sigs = in_force(after[streams.SIGNALS], Signal)
    corrected = 0
    for s in SYMBOLS:
        # what each candle holds now: fixed in the range, the old values outside
        want = [good[s][i] if FIRST <= i < END else bad[s][i] for i in range(N)]
        for i, w in enumerate(want):
            got = vs[s, w.open_time_ms]
            assert isinstance(got, FeatureVector)
            np.testing.assert_allclose(got.values, w.values, rtol=0, atol=1e-9, err_msg=f"{s} {i}")
            assert got.rebuild == (1 if FIRST <= i < END else 0)
        scored = want[DEFAULT.warmup - 1 :]
        for v, p in zip(scored, probabilities(scored), strict=True):
            got = ss[s, v.open_time_ms]
            assert isinstance(got, Score)
            np.testing.assert_allclose(got.probabilities, p, rtol=0, atol=1e-12)
        # the side subscribers hold after each candle is what the policy gives now
        ts = [v.open_time_ms for v in scored]
        sides = {t: sig.side for (sym, t), sig in sigs.items() if sym == s}  # type: ignore[attr-defined]
        convictions = [p[-1] - p[0] for p in probabilities(scored)]
        reference = hysteresis(convictions, el, xl, es, xs)
        upto = END - (DEFAULT.warmup - 1)
        assert held(sides, ts)[:upto] == reference[:upto], s
        for (sym, t), sig in sigs.items():
            assert isinstance(sig, Signal)
            if sym == s and sig.rebuild:
                assert times[FIRST] <= t < times[END]
                corrected += sig.corrects is not None
    assert corrected > 0, report.lines()  # the bug changed decisions, and they were corrected

    # signal-publisher's sides bucket keeps each series' last word: its latest candle's
    # signal in force, live or rebuilt
    kept = await js.key_value(kv_bucket(SIDES_BUCKET, namespace))
    for s in SYMBOLS:
        latest = max(t for sym, t in sigs if sym == s)
        entry = await kept.get(f"{FEED}.{subjects.escape(s)}.M1")
        assert msgspec.json.decode(entry.value or b"", type=Signal) == sigs[s, latest], s

    # the replicated tables end with the rebuilt values
    replicator = Replicator(replicator_settings(stack, namespace, writer_dsn))
    task = await start(replicator)
    try:
        await eventually(lambda: replicated(js, namespace), timeout=60, what="replicated")
    finally:
        await stop(replicator, task)
    got = await tables(pg_dsn, namespace)
    rows = {(r["symbol"], r["open_time_ms"]): r for r in got["features"]}
    assert len(rows) == len(SYMBOLS) * N
    for (sym, t), v in vs.items():
        assert rows[sym, t]["values"] == v.values  # type: ignore[attr-defined]
    rows = {(r["symbol"], r["open_time_ms"]): r for r in got["scores"]}
    for (sym, t), sc in ss.items():
        assert rows[sym, t]["probabilities"] == sc.probabilities  # type: ignore[attr-defined]
    rows = {(r["symbol"], r["open_time_ms"]): r for r in got["signals"]}
    assert {k: r["side"] for k, r in rows.items()} == {
        k: sig.side.value  # type: ignore[attr-defined]
        for k, sig in sigs.items()
    }


HELD = DEFAULT.memory + 20
"""T1 of the tests of a CANDLES that lost the series' start, as a candle index."""
LONG = HELD + 40


def short_of(kept: int) -> str:
    return (
        "not rebuilt: CANDLES no longer holds enough history before T1 for demo EURUSD M1"
        f" ({kept} candles, {DEFAULT.memory} needed)"
    )


async def purge_before(js: JetStreamContext, namespace: str, kept: int) -> None:
    """CANDLES' age drops all but the last ``kept`` candles before T1 (candle i is seq i + 1)."""
    name = streams.stream_name(streams.CANDLES, namespace=namespace)
    await js.purge_stream(name, seq=HELD - kept + 1)
    info = await js.stream_info(name)
    assert (info.state.first_seq, info.state.messages) == (HELD - kept + 1, LONG - HELD + kept)


@pytest.mark.parametrize("kept", [5, DEFAULT.warmup + 10, DEFAULT.memory])
async def test_features_are_rebuilt_past_candles_age_only_from_the_feature_sets_memory_on(
    stack: StackUrls, nc: NATS, js: JetStreamContext, namespace: str, kept: int
) -> None:
    """feature-builder's state outlives CANDLES' age (its snapshot): its vectors come from
    the series' whole history. Once the stream has dropped the start, a rebuild warmed from
    fewer candles than the feature set's memory (warming up, or EMAs drifting) would publish
    what differs from the live vectors only for that as corrections: the series is left
    out. From the memory on, the vectors are the live ones to rounding: nothing changed,
    nothing is published, and the series is not left out."""
    candles = series(LONG, seed=41, feed=FEED, symbol=SYMBOLS[0])
    await publish(js, namespace, list(candles))
    builder = builder_app.build(builder_settings(stack, namespace))
    task = await run_worker(builder)
    try:
        await eventually(lambda: consumed(js, namespace), timeout=60, what="all candles")
    finally:
        builder.stop()
        await asyncio.wait_for(task, 60)
    live = await stream_messages(js, streams.FEATURES, namespace)
    whole = Counter(msgspec.json.encode(v) for v in vectors(candles, buggy=False))
    assert close_enough(live, whole) == []
    await Registry.open(js, namespace=namespace)
    await purge_before(js, namespace, kept)
    seqs = await last_seqs(js, namespace)
    req = request(start=str(candles[HELD].open_time_ms), end=None, stages="features,scores,signals")
    report = await rebuild(nc, Settings(nats_url=stack.nats_url, namespace=namespace), req)
    assert await last_seqs(js, namespace) == seqs, report.lines()
    assert sum(report.published.values()) == 0, report.lines()
    if kept < DEFAULT.memory:
        assert short_of(kept) in report.lines(), report.lines()
        assert report.unchanged[plan.FEATURES] == 0, report.lines()
    else:
        assert not [x for x in report.lines() if x.startswith("not rebuilt")], report.lines()
        assert report.unchanged[plan.FEATURES] == LONG - HELD, report.lines()


async def test_a_candle_changed_in_range_is_rebuilt_with_its_dependants_past_candles_age(
    stack: StackUrls, nc: NATS, js: JetStreamContext, namespace: str
) -> None:
    """FEATURES holds the series' vectors from its whole history (the batch form: they
    differ from the rebuild's stepped ones by rounding), but computed with one candle of the
    range other than the stream has it. CANDLES holds only the feature set's memory before
    T1. The rebuild publishes that candle's vector and the later ones its change moved past
    the library's tolerance, with the values of the stream's candles; nothing else, and
    nothing the second time."""
    candles = series(LONG, seed=43, feed=FEED, symbol=SYMBOLS[0])
    j = HELD + 5
    c = candles[j]
    seen = list(candles)
    seen[j] = msgspec.structs.replace(c, close=c.high if c.close != c.high else c.low)
    stale = vectors(seen, buggy=False)
    await publish(js, namespace, [*candles, *stale])
    await purge_before(js, namespace, DEFAULT.memory)
    # what moved, measured here: the close, or a value past 1e-9 (absolute below 1)
    want = vectors(candles, buggy=False)
    moved = []
    for i in range(HELD, LONG):
        a, b = np.asarray(want[i].values), np.asarray(stale[i].values)
        far = np.abs(a - b) > 1e-9 * np.maximum(1.0, np.maximum(np.abs(a), np.abs(b)))
        if want[i].close != stale[i].close or far.any():
            moved.append(i)
    assert moved[0] == j, moved
    assert len(moved) > 10, moved  # the EMAs carry it on
    before = len(await stream_messages(js, streams.FEATURES, namespace))
    req = request(start=str(candles[HELD].open_time_ms), end=None, stages="features")
    settings = Settings(nats_url=stack.nats_url, namespace=namespace)
    report = await rebuild(nc, settings, req)
    assert report.published == {plan.FEATURES: len(moved)}, report.lines()
    assert report.unchanged == {plan.FEATURES: LONG - HELD - len(moved)}, report.lines()
    out = (await stream_messages(js, streams.FEATURES, namespace))[before:]
    decode = msgspec.json.Decoder(FeatureVector).decode
    assert sorted(decode(m).open_time_ms for m in out) == [candles[i].open_time_ms for i in moved]
    assert {decode(m).rebuild for m in out} == {1}
    fixed = Counter(msgspec.json.encode(want[i]) for i in moved)
    assert close_enough(out, fixed) == []
    again = await rebuild(nc, settings, req)
    assert again.published == {plan.FEATURES: 0}, again.lines()
    assert len(await stream_messages(js, streams.FEATURES, namespace)) == before + len(moved)


async def test_a_rebuilt_last_word_is_kept_past_signals_age(
    stack: StackUrls, nc: NATS, js: JetStreamContext, namespace: str
) -> None:
    """Live, under the default policy: BUY at bar 0 (0.7), then 0.45 three times, nothing.
    The policy then exits longs at 0.5, and a rebuild of the signals corrects bar 1 to FLAT:
    the series' last word. Once SIGNALS no longer holds it (a month on), a restart still
    takes the series as flat, so 0.7 at bar 4 enters BUY again."""
    live = [make_score("EURUSD", bar, v) for bar, v in enumerate((0.7, 0.45, 0.45, 0.45))]
    await run_once(stack, js, namespace, live)
    policy = await js.key_value(kv_bucket(namespace=namespace))
    await policy.put("policy", b'{"defaults": {"exit_long": 0.5}}')
    req = request(start=str(live[0].open_time_ms), end=None, stages="signals")
    report = await rebuild(nc, Settings(nats_url=stack.nats_url, namespace=namespace), req)
    assert report.published == {"signals": 1}, report.lines()
    sent = [(s.open_time_ms - T0, s.side.value, s.rebuild) for s in await signals_of(js, namespace)]
    assert sent == [(0, "BUY", 0), (M1, "FLAT", 1)]
    await js.purge_stream(streams.stream_name(streams.SIGNALS, namespace=namespace))
    await run_once(stack, js, namespace, [make_score("EURUSD", 4, 0.7)])
    got = [(s.open_time_ms - T0, s.side.value) for s in await signals_of(js, namespace)]
    assert got == [(4 * M1, "BUY")]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--from", "2025-03-03", "--stages", "features,prices"], "unknown stage 'prices'"),
        (["--from", "2025-03-03", "--to", "2025-03-02", "--stages", "scores"], "not after"),
        (["--from", "2025-03-03", "--stages", "features,signals"], "skips scores"),
        (["--from", "2025-03-03", "--stages", "signals,scores"], "pipeline order"),
        (["--from", "yesterday", "--stages", "scores"], "--from: not an ISO time"),
        # epoch seconds, or an ISO basic date, read as milliseconds would be January 1970
        (["--from", "1741000000", "--stages", "scores"], "--from: 1741000000 is ambiguous"),
        (["--from", "20250303", "--stages", "scores"], "--from: 20250303 is ambiguous"),
        (["--from", "2025-03-03", "--to", "1741100000", "--stages", "scores"], "--to: 1741"),
        (["--from", "2025-03-03", "--stages", "scores", "--feed", "a.b"], "feed must match"),
    ],
)
async def test_bad_arguments_say_why_in_one_line_exit_2_and_change_nothing(
    js: JetStreamContext,
    namespace: str,
    argv: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seqs = await last_seqs(js, namespace)
    code = await asyncio.to_thread(cli.main, ["rebuild", "--namespace", namespace, *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert says in err, err
    assert err.count("\n") == 1, err
    assert await last_seqs(js, namespace) == seqs
