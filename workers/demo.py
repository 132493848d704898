"""``make demo``: the whole pipeline on a local stack, fed by the EA simulator.

1. NATS, PostgreSQL and QuestDB start in ``.stack/demo`` (kept: the next run reuses them);
   the migrations are applied and the streams and consumers created (or found).
2. Each series (two feeds x three symbols, M1) without an active model gets one: the
   simulator's ticks of 40 hours before the demo window are turned into M1 candles by
   candle-ingest's own aggregator, the trainer fits LightGBM on them walk-forward and
   promotes the model, by force if the gate refuses it: the simulator's market is a random
   walk, so a model of it ranks no better than chance. The signal policy's thresholds of
   that series are the 20/40/60/80 % quantiles of the model's scores on its holdout, so
   that its signals are neither constant nor absent (``.stack/demo/signal-policy.json``).
3. Every worker runs as its own process (``workers.up.Launcher``, as ``tickwire up``).
4. ``tickwire ea-sim`` publishes two hours of ticks at 300x speed, then one malformed
   message, then a watermark per series at the window's end (candle-ingest's wall-clock
   idle close is off: the ticks are from the past). Live lines show the latest candle,
   feature vector, score and signal, with the counts read from the workers' /metrics.
5. When every consumer has caught up: a summary from the workers' /metrics.

Event time: each run covers the next two market hours after what the previous run sent
(the first run starts two weeks back). Ticks older than a series' watermark would be
refused as ``too_late``, so a run never goes back; once the window reaches the clock it
ends there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import nats
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from contracts import streams, subjects
from contracts.codec import Codec, ContractError, encode
from contracts.messages import (
    Candle,
    FeatureVector,
    Score,
    Signal,
    Tick,
    TickBatch,
    TickInput,
    Timeframe,
    Watermark,
)
from infra.stack import LOOPBACK, REPO, LocalStack, StackUrls, describe
from workers.cli import WORKERS
from workers.ea_sim import market
from workers.up import Launcher, LaunchError, default_ports

FEEDS: Final = ("icmarkets-live", "pepperstone-demo")
SYMBOLS: Final = ("EURUSD", "XAUUSD", "US500.cash")
TF: Final = Timeframe.M1
ROOT: Final = REPO / ".stack" / "demo"
POLICY_FILE: Final = ROOT / "signal-policy.json"
WINDOW_MS: Final = 2 * 3_600_000
SPEED: Final = 300
HISTORY_MS: Final = 40 * 3_600_000
HORIZON: Final = 12
"""Label horizon of the demo's models, in M1 bars."""
SCHEDULE: Final = ";".join(f"{f}/{s}/{TF.value}@30 3 * * *" for f in FEEDS for s in SYMBOLS)
"""The scheduler retrains each series nightly (on stored candles; it does not fire here)."""
DRAIN_TIMEOUT_S: Final = 180.0
MALFORMED: Final = b'{"type":"tick",'

Series = tuple[str, str]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# --- event time -------------------------------------------------------------------------


def _all_open(t: int) -> int:
    """The first time at or after ``t`` at which every demo symbol is quoted."""
    specs = [market.SYMBOLS[s] for s in SYMBOLS]
    for _ in range(100):
        nxt = max(spec.next_open(t) for spec in specs)
        if nxt == t:
            return t
        t = nxt
    return t


def first_start(now_ms: int) -> int:
    """Tuesday 16:00 UTC two weeks back: the 40 hours before it are a trading Monday and
    Tuesday, the history the first models learn from."""
    day = dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC).date() - dt.timedelta(days=14)
    monday = day - dt.timedelta(days=day.weekday())
    t = dt.datetime.combine(monday, dt.time(16), dt.UTC) + dt.timedelta(days=1)
    return round(t.timestamp() * 1000)


def window(last_event_ms: int, now_ms: int) -> tuple[int, int]:
    """Event-time range [start, end) of this run's ticks."""
    start = (last_event_ms // 60000 + 1) * 60000 if last_event_ms else first_start(now_ms)
    start = _all_open(start)
    return start, min(start + WINDOW_MS, now_ms - 60_000)


async def _latest_event_ms(js: nats.js.JetStreamContext) -> int:
    """Event time of the newest tick or watermark already on TICKS (0 if none)."""
    stream = streams.stream_name(streams.TICKS)
    last = (await js.stream_info(stream)).state.last_seq
    codec: Codec[TickInput] = Codec(TickInput)
    newest = 0
    for seq in range(last, max(0, last - 50), -1):
        with contextlib.suppress(ContractError, nats.js.errors.NotFoundError):
            m = codec.decode((await js.get_msg(stream, seq)).data or b"")
            if isinstance(m, TickBatch):
                newest = max(newest, max(t.time_ms for t in m.ticks))
            elif isinstance(m, Tick | Watermark):
                newest = max(newest, m.time_ms)
    return newest


# --- models and the signal policy -------------------------------------------------------


def history_candles(start_ms: int, seed: int) -> dict[Series, list[Candle]]:
    """M1 candles of the simulator's ticks in [start - HISTORY_MS, start), per series, made
    by candle-ingest's aggregator (the live pipeline's candles, without the stream)."""
    from workers.candle_ingest.aggregate import Aggregator, AggregatorConfig

    rows: dict[Series, list[Any]] = defaultdict(list)
    for t, feed, symbol, row in market.ticks(seed, FEEDS, SYMBOLS, start_ms - HISTORY_MS):
        if t >= start_ms:
            break
        rows[feed, symbol].append(row)
    agg = Aggregator(AggregatorConfig(timeframes=(TF,)))
    out: dict[Series, list[Candle]] = {}
    for (feed, symbol), ticks in rows.items():
        candles: list[Candle] = []
        agg.add_rows(
            feed, symbol, ticks, now_ms=start_ms, max_future_skew_ms=0, out=candles, out_times=[]
        )
        candles += agg.advance(feed, symbol, start_ms)
        out[feed, symbol] = [c for c in candles if c.tf == TF]
    return out


def _thresholds(scores: np.ndarray) -> dict[str, float]:
    """Entry and exit levels at the 80/60 % (long) and 20/40 % (short) quantiles."""
    q = [float(x) for x in np.quantile(scores, [0.2, 0.4, 0.6, 0.8])]
    for i in range(1, 4):  # strictly increasing, as the policy requires
        q[i] = max(q[i], q[i - 1] + 1e-4)
    q = [round(min(1.0, max(-1.0, x)), 4) for x in q]
    return {"entry_short": q[0], "exit_short": q[1], "exit_long": q[2], "entry_long": q[3]}


async def train_missing(js: nats.js.JetStreamContext, start_ms: int) -> dict[Series, str]:
    """Train and promote a model for each series with none active; write its policy."""
    from workers.features import DEFAULT, Candles
    from workers.registry import Registry
    from workers.trainer import evaluate
    from workers.trainer.cli import card_for, store
    from workers.trainer.dataset import build
    from workers.trainer.train import Params, model_bytes, train

    registry = await Registry.open(js)
    missing = [
        (feed, symbol)
        for feed in FEEDS
        for symbol in SYMBOLS
        if await registry.active(feed, symbol, TF) is None
    ]
    if not missing:
        return {}
    print(f"  no active model for {len(missing)} series: training on simulated history ...")
    history = history_candles(start_ms, seed=start_ms // 60_000 % 2**31)
    policy = _read_policy_doc()
    overrides = {(o["feed"], o["symbol"]): o for o in policy["overrides"]}
    trained = {}
    for feed, symbol in missing:
        cs = history[feed, symbol]
        candles = Candles(
            open_time_ms=np.array([c.open_time_ms for c in cs], dtype=np.int64),
            open=np.array([c.open for c in cs]),
            high=np.array([c.high for c in cs]),
            low=np.array([c.low for c in cs]),
            close=np.array([c.close for c in cs]),
            tick_volume=np.array([c.tick_volume for c in cs], dtype=np.int64),
            spread_mean=np.array([c.spread_mean for c in cs]),
        )
        ds = build(candles, DEFAULT, HORIZON)
        training = train(ds, Params())
        rep = evaluate.report(ds, training)
        args = argparse.Namespace(feed=feed, symbol=symbol, tf=TF.value)
        card = card_for(args, ds, rep, cs[0].open_time_ms, cs[-1].close_time_ms + 1)
        # a backtest without trades has no Sharpe ratio: left out rather than made up
        metrics = {k: v for k, v in card.metrics.items() if math.isfinite(v)}
        card = msgspec.structs.replace(card, metrics=metrics)
        outcome = await store(
            registry, model_bytes(training.holdout), card, ds, training, promote=True
        )
        verdict = "promoted" if outcome.promoted else outcome.reason
        if outcome.promoted is False:
            # the simulator's market is a random walk: nothing in it can be predicted, so the
            # gate may well find the model no better than chance; the demo runs it anyway
            await registry.promote(outcome.version, force=True)
            verdict = f"promoted by force (the gate: {outcome.reason})"
        holdout_scores = 2 * training.holdout.predictions - 1
        overrides[feed, symbol] = {
            "feed": feed,
            "symbol": symbol,
            "tf": TF.value,
            **_thresholds(holdout_scores),
        }
        trained[feed, symbol] = outcome.version
        print(
            f"  {feed} {symbol} {TF}: {len(cs):,} candles, holdout AUC {card.metrics['auc']:.3f},"
            f" model {outcome.version[:12]} {verdict}"
        )
    policy["overrides"] = list(overrides.values())
    POLICY_FILE.write_text(json.dumps(policy, indent=2) + "\n")
    return trained


def _read_policy_doc() -> dict[str, Any]:
    if POLICY_FILE.exists():
        doc: dict[str, Any] = json.loads(POLICY_FILE.read_text())
        return doc
    # restating a side on every candle would flood the demo; an entry per 5 M1 bars at most
    return {"defaults": {"cooldown_bars": 5, "expiry_s": 300.0}, "overrides": []}


# --- what the workers say ---------------------------------------------------------------


def scrape(url: str) -> Samples:
    """Every sample of a worker's /metrics, keyed by name and labels."""
    with LOOPBACK.open(url, timeout=5) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name:
            out[dict(ls).get(label, "")] += v
    return dict(out)


def quantile(samples: Samples, name: str, q: float, **labels: str) -> float | None:
    """Upper bound of the histogram bucket holding the ``q`` quantile (None: no data)."""
    want = set(labels.items())
    buckets: dict[float, float] = defaultdict(float)
    for (n, ls), v in samples.items():
        if n == f"{name}_bucket" and want <= ls:
            buckets[float(dict(ls)["le"])] += v
    if not buckets or not buckets[math.inf]:
        return None
    count = buckets[math.inf]
    return next(le for le, c in sorted(buckets.items()) if c >= q * count)


@dataclass
class Live:
    """The newest message of each stage, as the subscriptions see them."""

    latest: dict[str, str] = field(default_factory=dict)

    async def subscribe(self, nc: Client) -> None:
        codecs: dict[str, Codec[Any]] = {
            subjects.CANDLES: Codec(Candle),
            subjects.FEATURES: Codec(FeatureVector),
            subjects.SCORES: Codec(Score),
            subjects.SIGNALS: Codec(Signal),
        }
        for domain, codec in codecs.items():

            async def on(msg: Msg, domain: str = domain, codec: Codec[Any] = codec) -> None:
                with contextlib.suppress(ContractError):
                    self.latest[domain] = _describe(codec.decode(msg.data))

            await nc.subscribe(subjects.wildcard(domain), cb=on)


def _hhmm(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%m-%d %H:%M")


def _describe(m: object) -> str:
    if isinstance(m, Candle):
        return (
            f"{m.feed} {m.symbol} {m.tf} {_hhmm(m.open_time_ms)} o {m.open:g} h {m.high:g}"
            f" l {m.low:g} c {m.close:g} ({m.tick_volume} ticks)"
        )
    if isinstance(m, FeatureVector):
        state = "warming up" if m.warming_up else f"{len(m.values)} values"
        return f"{m.feed} {m.symbol} {m.tf} {_hhmm(m.open_time_ms)} {state}"
    if isinstance(m, Score):
        return (
            f"{m.feed} {m.symbol} {m.tf} {_hhmm(m.open_time_ms)} score {m.score:+.3f}"
            f" (model {m.model_version[:8]})"
        )
    if isinstance(m, Signal):
        return f"{m.feed} {m.symbol} {m.tf} {_hhmm(m.open_time_ms)} {m.side} at {m.ref_price:g}"
    return ""


@dataclass
class Counts:
    ticks: float = 0.0
    candles: float = 0.0
    features: float = 0.0
    scores: float = 0.0
    signals: float = 0.0
    rows: float = 0.0
    dead: float = 0.0

    @classmethod
    def of(cls, metrics: dict[str, Samples]) -> Counts:
        def get(worker: str, name: str, **labels: str) -> float:
            return total(metrics.get(worker, {}), name, **labels)

        return cls(
            ticks=get("candle-ingest", "tickwire_ticks_in_total", outcome="accepted"),
            candles=get("candle-ingest", "tickwire_candles_out_total"),
            features=get("feature-builder", "tickwire_feature_vectors_out_total"),
            scores=get("model-scorer", "tickwire_scores_out_total"),
            signals=get("signal-publisher", "tickwire_signals_out_total"),
            rows=get("timescale-replicator", "tickwire_replicated_rows_total"),
            dead=sum(total(s, "tickwire_dead_letters_total") for s in metrics.values()),
        )


class Screen:
    """Five lines redrawn in place on a terminal; a line every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.drawn = 0
        self.last_plain = 0.0

    def show(self, c: Counts, live: Live, force: bool = False) -> None:
        lines = [
            f"  ticks   {c.ticks:>9,.0f} in   dead letters {c.dead:,.0f}",
            f"  candle  {c.candles:>9,.0f}  {live.latest.get(subjects.CANDLES, '')}",
            f"  feature {c.features:>9,.0f}  {live.latest.get(subjects.FEATURES, '')}",
            f"  score   {c.scores:>9,.0f}  {live.latest.get(subjects.SCORES, '')}",
            f"  signal  {c.signals:>9,.0f}  {live.latest.get(subjects.SIGNALS, '')}",
        ]
        if self.tty:
            if self.drawn:
                sys.stdout.write(f"\x1b[{self.drawn}F")
            sys.stdout.write("".join(f"\x1b[2K{line[:150]}\n" for line in lines))
            self.drawn = len(lines)
        elif force or time.monotonic() - self.last_plain >= 10:
            self.last_plain = time.monotonic()
            sys.stdout.write(
                f"  ticks {c.ticks:,.0f}, candles {c.candles:,.0f}, features {c.features:,.0f},"
                f" scores {c.scores:,.0f}, signals {c.signals:,.0f}, rows {c.rows:,.0f},"
                f" dead letters {c.dead:,.0f}\n"
            )
        sys.stdout.flush()


# --- the run ------------------------------------------------------------------------------


async def _caught_up(js: nats.js.JetStreamContext) -> bool:
    for c in streams.consumer_specs():
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.consumer_info(c.stream, c.durable)
            if info.num_pending or info.num_ack_pending:
                return False
    return True


async def _close_window(js: nats.js.JetStreamContext, end_ms: int) -> None:
    """One malformed message (a dead letter), then each series' watermark at ``end_ms``."""
    await js.publish(subjects.ticks(FEEDS[0], SYMBOLS[0]), MALFORMED)
    for feed in FEEDS:
        for symbol in SYMBOLS:
            wm = Watermark(feed=feed, symbol=symbol, time_ms=end_ms)
            await js.publish(
                subjects.ticks(feed, symbol),
                encode(wm),
                headers={"Nats-Msg-Id": wm.msg_id},
            )


def _scrape_all(launcher: Launcher) -> dict[str, Samples]:
    out = {}
    for name, child in launcher.children.items():
        with contextlib.suppress(OSError):
            out[name] = scrape(child.metrics_url)
    return out


async def feed_and_watch(
    urls: StackUrls, launcher: Launcher, env: dict[str, str], start_ms: int, end_ms: int
) -> tuple[dict[str, Samples], str]:
    """ea-sim over [start, end), live lines until every consumer has caught up."""
    nc = await nats.connect(urls.nats_url or "")
    js = nc.jetstream()
    live = Live()
    await live.subscribe(nc)
    screen = Screen()
    iso = dt.datetime.fromtimestamp(start_ms / 1000, dt.UTC).isoformat()
    argv = [sys.executable, "-m", "workers.cli", "ea-sim", "--feeds", ",".join(FEEDS)]
    argv += ["--symbols", ",".join(SYMBOLS), "--seed", str(start_ms // 60_000 % 2**31)]
    argv += ["--start", iso, "--duration", f"{(end_ms - start_ms) // 1000}s"]
    argv += ["--speed", str(SPEED), "--batch", "20", "--no-progress"]
    sim = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    wait_sim = asyncio.ensure_future(sim.communicate())
    try:
        while not wait_sim.done():
            launcher.check_alive()
            screen.show(Counts.of(_scrape_all(launcher)), live)
            await asyncio.wait({wait_sim}, timeout=1.0)  # a display refresh, not a sync
        out, err = wait_sim.result()
        if sim.returncode != 0:
            raise LaunchError(f"ea-sim exited with {sim.returncode}: {err.decode().strip()}")
        await _close_window(js, end_ms)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        settled = 0
        while settled < 3 and time.monotonic() < deadline:
            launcher.check_alive()
            settled = settled + 1 if await _caught_up(js) else 0
            screen.show(Counts.of(_scrape_all(launcher)), live)
            await asyncio.sleep(1.0)  # a display refresh while the consumers catch up
        metrics = _scrape_all(launcher)
        screen.show(Counts.of(metrics), live, force=True)
        return metrics, out.decode().strip()
    finally:
        if sim.returncode is None:
            sim.terminate()
            await sim.wait()
        await nc.close()


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


STAGES: Final = {
    "candle-ingest": "ticks -> candles (decode, aggregate, QuestDB, CANDLES, ack)",
    "feature-builder": "candles -> features",
    "model-scorer": "features -> scores (LightGBM)",
    "signal-publisher": "scores -> signals",
    "timescale-replicator": "streams -> PostgreSQL (COPY + upsert)",
}


def summary(
    metrics: dict[str, Samples], launcher: Launcher, sim_line: str, span: tuple[int, int]
) -> list[str]:
    ci = metrics.get("candle-ingest", {})
    fb = metrics.get("feature-builder", {})
    ms = metrics.get("model-scorer", {})
    sp = metrics.get("signal-publisher", {})
    tr = metrics.get("timescale-replicator", {})
    start, end = (dt.datetime.fromtimestamp(t / 1000, dt.UTC) for t in span)
    candles = by_label(ci, "tickwire_candles_out_total", "tf")
    vectors = total(fb, "tickwire_feature_vectors_out_total")
    warming = total(fb, "tickwire_feature_vectors_out_total", warming_up="true")
    sides = by_label(sp, "tickwire_signals_out_total", "side")
    rows = by_label(tr, "tickwire_replicated_rows_total", "stream")
    dead = {
        f"{worker} {reason}": v
        for worker, s in metrics.items()
        for reason, v in by_label(s, "tickwire_dead_letters_total", "reason").items()
        if v
    }
    scores_by = by_label(ms, "tickwire_scorer_vectors_total", "outcome")

    def counts(d: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:,.0f}" for k, v in d.items() if v) or "0"

    lines = [
        "summary",
        f"  event time       {start:%Y-%m-%d %H:%M} to {end:%H:%M} UTC, at {SPEED}x",
        f"  ea-sim           {sim_line}",
        f"  ticks in candles {total(ci, 'tickwire_ticks_in_total', outcome='accepted'):,.0f}",
        f"  candles          {counts({tf.value: candles.get(tf.value, 0) for tf in Timeframe})}",
        f"  feature vectors  {vectors:,.0f} ({warming:,.0f} still warming up)",
        f"  scores           {total(ms, 'tickwire_scores_out_total'):,.0f}"
        f" (vectors by outcome: {counts(scores_by)})",
        f"  signals          {total(sp, 'tickwire_signals_out_total'):,.0f} ({counts(sides)})",
        f"  PostgreSQL rows  {counts(rows)}",
        f"  dead letters     {counts(dead)}",
        "  latency per stage, batch taken to acked (p50 / p99, histogram bucket bounds):",
    ]
    for worker, what in STAGES.items():
        s = metrics.get(worker, {})
        p50 = quantile(s, "tickwire_processing_seconds", 0.5)
        p99 = quantile(s, "tickwire_processing_seconds", 0.99)
        lines.append(f"    {worker:21} {_ms(p50):>8} / {_ms(p99):>8}  {what}")
    f2s = [
        quantile(ms, "tickwire_e2e_latency_seconds", q, stage="feature_to_score")
        for q in (0.5, 0.99)
    ]
    lines.append(f"    feature published -> score published {_ms(f2s[0])} / {_ms(f2s[1])}")
    lines.append("  metrics and health:")
    for c in launcher.children.values():
        lines.append(f"    {c.name:21} {c.metrics_url}  (/healthz)  log {c.log}")
    return lines


def main(*, keep: bool = False, base_port: int = 9101) -> int:
    from db.migrate import migrate

    print(f"tickwire demo: starting the local stack in {ROOT} ...", flush=True)
    with LocalStack(ROOT) as stack:
        urls = stack.urls
        assert urls.postgres_dsn
        assert urls.nats_url
        print(describe(urls))
        applied = asyncio.run(migrate(urls.postgres_dsn))
        print(f"  PostgreSQL migrations: {len(applied)} applied this run")

        async def prepare() -> tuple[dict[str, str], int, int]:
            nc = await nats.connect(urls.nats_url or "")
            try:
                js = nc.jetstream()
                made = await streams.ensure(js, streams.stream_specs(), streams.consumer_specs())
                news = sum(1 for v in made.values() if v != "unchanged")
                print(f"  streams and consumers: {len(made)}, {news} created or updated")
                now_ms = time.time_ns() // 1_000_000
                start, end = window(await _latest_event_ms(js), now_ms)
                await train_missing(js, start)
                return made, start, end
            finally:
                await nc.close()

        _, start, end = asyncio.run(prepare())
        if end <= start:
            print("  the demo's event time has reached the clock: no new ticks to send")
            return 0
        env = os.environ | urls.env()
        env |= {
            "TICKWIRE_IDLE_CLOSE": "false",
            "TICKWIRE_SIGNAL_POLICY_FILE": str(POLICY_FILE),
            "TICKWIRE_TRAIN_SCHEDULE": SCHEDULE,
        }
        if not POLICY_FILE.exists():
            POLICY_FILE.write_text(json.dumps(_read_policy_doc(), indent=2) + "\n")
        launcher = Launcher(
            list(WORKERS), log_dir=ROOT / "logs", ports=default_ports(base_port), env=env
        )
        started = time.perf_counter()
        try:
            with launcher:
                launcher.wait_healthy()
                print(f"  {len(launcher.children)} workers healthy:")
                for c in launcher.children.values():
                    print(f"    {c.name:21} pid {c.process.pid:<7} {c.metrics_url}")
                print(f"  ea-sim: {len(FEEDS)} feeds x {len(SYMBOLS)} symbols ...", flush=True)
                metrics, sim_line = asyncio.run(
                    feed_and_watch(urls, launcher, dict(env), start, end)
                )
                print()
                for line in summary(metrics, launcher, sim_line, (start, end)):
                    print(line)
                print(f"  wall time        {time.perf_counter() - started:.1f}s")
                print(f"  candles in QuestDB: {urls.questdb_http} (table candles)")
                if keep:
                    print("\nworkers and stack running; Ctrl-C to stop")
                    while True:
                        launcher.check_alive()
                        time.sleep(1)  # idle until Ctrl-C
        except LaunchError as exc:
            print(f"tickwire demo: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ntickwire demo: stopping the workers and the stack ...", flush=True)
            return 130
    return 0
