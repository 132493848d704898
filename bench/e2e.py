"""The whole pipeline under EA load: candle close -> signal published, from outside.

``tickwire ea-sim`` publishes 2,000 ticks/s for 60 s, one tick per message as an EA does,
from two simulated feeds quoting ten symbols each (20 feed/symbol series, partitioned on by
every stateful worker), as four EA processes of 500 ticks/s (one per feed and half its
symbols). candle-ingest, feature-builder, model-scorer, signal-publisher and
timescale-replicator run as their own processes (``python -m workers.cli run NAME``) with
their default settings, except:

- ``TICKWIRE_IDLE_CLOSE=false``: the ticks' event time is a Tuesday afternoon of 2025,
  replayed about 70 times faster than real time (20 series quote ~28 times a second in
  event time; 2,000 a second are asked). A wall-clock grace timer would close every candle
  at "now" and make all later ticks too late; here every candle is closed by a tick.
- a promoted model (small LightGBM, ``tests.scorer_models``) for every series and
  timeframe, and 40 candles of history per series and timeframe on CANDLES before the run,
  so every feature vector of the run is warm and scored;
- a signal policy that restates the side on every candle (``only_on_change`` off, entry
  thresholds at the ends of the score range): every candle closed in the run gives one
  signal, so every close is a sample. Deciding costs the same as with any other policy.

**Candle close.** In event time a candle closes when the first tick at or after its close
time arrives (the grace timer is off, see above). Its ``close_time_ms`` is event time, on
the simulator's accelerated clock, so it cannot be compared with the wall clock. The real
moment of the close is when that tick was stored on TICKS: from then on the pipeline knows
the candle is complete. Candle close -> signal is therefore the JetStream stored time of
the closing tick (the first tick of the series with ``time_ms >= close_time_ms``) to the
stored time of the signal on SIGNALS: both stamped by the same server clock, four hops
(TICKS -> candle-ingest -> CANDLES -> feature-builder -> FEATURES -> model-scorer ->
SCORES -> signal-publisher -> SIGNALS). Tick -> signal (informational) starts at the stored
time of the candle's last tick (``last_tick_ms``), as the workers' ``tick_to_signal`` does in
event time. The stored times on CANDLES, FEATURES and SCORES split the total by stage.

The workers' own ``close_to_signal`` histogram is ``now - close_time_ms``: event time. It is
read from signal-publisher's /metrics and set beside the same quantity computed from
outside (signal stored time - ``close_time_ms``); under an accelerated feed both say how far
event time is behind the clock, not how fast the pipeline is.

**Floor.** One bare JetStream hop measured in the same run: a publish of a tick-sized
message and its arrival at a pull consumer already waiting (nats-py, no decode, acked),
one at a time, every 50 ms while the EAs publish (and 300 times on the idle machine before,
printed only). Its p99 under load times the four hops is the baseline: what the machine,
busy as it is during the run, allows with no worker at all.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import numpy as np
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from bench.report import Figure
from contracts import streams
from contracts.codec import Codec, encode
from contracts.messages import Candle, FeatureVector, Score, Signal, Tick, TickInput, Timeframe
from db.migrate import migrate
from infra.stack import LocalStack
from tests.candles import history_before
from tests.candles import publish as publish_candles
from tests.scorer_models import promote_each
from workers.registry import Registry, bucket_name
from workers.runtime.pull import ACK, PullSource, parse_reply
from workers.signal_publisher.policy import POLICY_BUCKET, SIDES_BUCKET, kv_bucket

NS = "benche2e"
FEEDS = ("brokera", "brokerb")
SYMBOLS = (
    "EURUSD", "GBPUSD", "AUDUSD", "USDCHF", "USDJPY",
    "XAUUSD", "XAGUSD", "US500.cash", "US30.cash", "GER40.cash",
)  # fmt: skip
START = "2025-03-04T15:00:00"
"""A Tuesday, New York hours: every symbol open, quotes at their busiest."""
RATE = 2_000
SECONDS = 60
HOPS = 4
TARGET_P99_US = 20_000.0
HISTORY = 40
"""Candles per series and timeframe on CANDLES before the run (the feature set needs 34)."""
WORKERS = (
    streams.CANDLE_INGEST,
    streams.FEATURE_BUILDER,
    streams.MODEL_SCORER,
    streams.SIGNAL_PUBLISHER,
    streams.TIMESCALE_REPLICATOR,
)
POLICY = {
    "defaults": {
        "entry_long": -0.99,
        "exit_long": -1.0,
        "entry_short": -1.0,
        "exit_short": -0.995,
        "only_on_change": False,
    }
}
"""BUY at the first scored candle of a series, then BUY restated on every candle."""
ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / ".stack" / "bench-e2e"
"""Each process's output of the last run."""
POLL_S = 0.5

Key = tuple[str, str, Timeframe, int, int]
"""feed, symbol, timeframe, candle open time, candle revision."""


# --- set-up -------------------------------------------------------------------------------


async def _cleanup(js: JetStreamContext) -> None:
    for spec in streams.stream_specs(namespace=NS):
        with contextlib.suppress(Exception):
            await js.delete_stream(spec.name)
    with contextlib.suppress(Exception):
        await js.delete_stream(_hop_stream())
    for name in (bucket_name(NS), f"ns-{NS}-candle-ingest-state", f"ns-{NS}-feature-builder-state"):
        with contextlib.suppress(Exception):
            await js.delete_object_store(name)
    for name in (bucket_name(NS), kv_bucket(POLICY_BUCKET, NS), kv_bucket(SIDES_BUCKET, NS)):
        with contextlib.suppress(Exception):
            await js.delete_key_value(name)


def _series() -> Iterator[tuple[str, str]]:
    for feed in FEEDS:
        for symbol in SYMBOLS:
            yield feed, symbol


async def _models(js: JetStreamContext) -> None:
    registry = await Registry.open(js, namespace=NS)
    await promote_each(registry, ((f, s, tf) for f, s in _series() for tf in Timeframe))


# --- the floor: one bare JetStream hop ----------------------------------------------------


def _hop_stream() -> str:
    return f"{NS}-hop"


class HopProbe:
    """A bare JetStream hop: publish a tick-sized message, time its arrival at a pull
    consumer that is already waiting (nats-py, no decode, acked)."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.stream, self.subject = _hop_stream(), f"{NS}.hop"
        self.arrived: asyncio.Queue[int] = asyncio.Queue()
        self.payload = encode(Tick(feed=FEEDS[0], symbol="EURUSD", time_ms=1, bid=1.08, ask=1.09))
        self.inbox = nc.new_inbox()
        self.sub: Subscription | None = None

    async def start(self) -> None:
        await self.js.add_stream(StreamConfig(name=self.stream, subjects=[self.subject]))
        await self.js.add_consumer(
            self.stream, ConsumerConfig(durable_name="hop", ack_policy=AckPolicy.EXPLICIT)
        )

        async def on_msg(msg: Msg) -> None:
            if msg.reply:
                self.arrived.put_nowait(time.perf_counter_ns())
                await self.nc.publish(msg.reply, ACK)
            elif self.sub is not None:  # the request ended: ask again
                await self.ask()

        self.sub = await self.nc.subscribe(self.inbox, cb=on_msg)
        await self.ask()
        await self.nc.flush()

    async def stop(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            await sub.unsubscribe()

    async def ask(self) -> None:
        body = json.dumps({"batch": 100_000, "expires": 600 * 10**9}).encode()
        await self.nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self.stream}.hop", body, reply=self.inbox
        )

    async def hop(self) -> float:
        """Seconds of one hop."""
        t0 = time.perf_counter_ns()
        await self.js.publish(self.subject, self.payload)
        t1 = await asyncio.wait_for(self.arrived.get(), 10)
        return (t1 - t0) / 1e9

    async def idle(self, n: int) -> list[float]:
        return [await self.hop() for _ in tqdm(range(n), desc="bare hop", leave=False)]

    async def under_load(self, out: list[float], stop: asyncio.Event) -> None:
        """A hop every 50 ms until ``stop``: the floor while the pipeline is busy."""
        while not stop.is_set():
            out.append(await self.hop())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)


# --- the worker processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port: int = 0

    def get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as r:
            return bytes(r.read())

    def tail(self) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(True)[-20:])


def _spawn(name: str, argv: list[str], env: dict[str, str], logs: Path, port: int = 0) -> Process:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *argv], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    return Process(name, proc, log, port)


def _start_workers(stack: LocalStack, dsn: str, logs: Path) -> dict[str, Process]:
    urls = stack.urls
    policy = logs / "policy.json"
    policy.write_text(json.dumps(POLICY))
    base = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(urls.nats_url),
        "TICKWIRE_NAMESPACE": NS,
        "TICKWIRE_LOG_LEVEL": "WARNING",
    }
    own = {
        streams.CANDLE_INGEST: {
            "TICKWIRE_QUESTDB_ILP": str(urls.questdb_ilp_conf),
            "TICKWIRE_QUESTDB_HTTP": str(urls.questdb_http),
            "TICKWIRE_IDLE_CLOSE": "false",
        },
        streams.SIGNAL_PUBLISHER: {"TICKWIRE_SIGNAL_POLICY_FILE": str(policy)},
        streams.TIMESCALE_REPLICATOR: {"TICKWIRE_POSTGRES_DSN": dsn},
    }
    out = {}
    for name in WORKERS:
        port = _free_port()
        env = base | own.get(name, {}) | {"TICKWIRE_METRICS_PORT": str(port)}
        out[name] = _spawn(name, ["run", name], env, logs, port)
    return out


def _check_alive(procs: Iterable[Process]) -> None:
    for p in procs:
        if p.proc.poll() is not None:
            raise RuntimeError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")


async def _healthy(procs: dict[str, Process], timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    waiting = set(procs)
    with tqdm(total=len(procs), desc="workers up", unit="worker", leave=False) as bar:
        while waiting:
            _check_alive(procs.values())
            for name in sorted(waiting):
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(procs[name].get, "/healthz")
                    waiting.discard(name)
                    bar.update()
            if time.monotonic() > deadline:
                tails = "\n".join(f"{procs[n].log}:\n{procs[n].tail()}" for n in sorted(waiting))
                raise TimeoutError(f"not healthy after {timeout_s:g} s:\n{tails}")
            await asyncio.sleep(POLL_S)  # waiting for processes to start, in a benchmark


async def _backlog(js: JetStreamContext) -> int:
    """Messages the pipeline's durable consumers have not acked yet."""
    left = 0
    for spec in streams.consumer_specs(namespace=NS):
        info = await js.consumer_info(spec.stream, spec.durable)
        left += info.num_pending + info.num_ack_pending
    return left


async def _drain(js: JetStreamContext, procs: dict[str, Process], desc: str) -> None:
    """Until every durable consumer of the pipeline has acked everything (twice in a row:
    a worker may publish what the next one has not seen yet)."""
    quiet = 0
    deadline = time.monotonic() + 300
    with tqdm(desc=desc, unit="msg left", leave=False) as bar:
        while quiet < 2:
            _check_alive(procs.values())
            left = await _backlog(js)
            bar.set_postfix(left=left)
            quiet = quiet + 1 if left == 0 else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"{desc}: {left} messages still not acked after 300 s")
            await asyncio.sleep(POLL_S)  # sampling progress of a run


def _stop(procs: Iterable[Process]) -> None:
    for p in procs:
        if p.proc.poll() is None:
            p.proc.terminate()
    for p in procs:
        try:
            p.proc.wait(60)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


class CpuMeter:
    """CPU seconds (user + system) each named process tree spent, from ``/proc``.

    Sampled while the run goes, so that a process that has exited keeps its last reading;
    a tree is a process and its live descendants (PostgreSQL's backends, for one) that are
    not trees of their own.
    """

    def __init__(self) -> None:
        self.roots: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.started: float | None = None
        self.ended = 0.0

    def watch(self, name: str, pid: int | None) -> None:
        if pid is not None:
            self.roots[name] = pid

    def sample(self) -> None:
        own: dict[int, float] = {}
        children: dict[int, list[int]] = collections.defaultdict(list)
        tick = os.sysconf("SC_CLK_TCK")
        self.ended = time.monotonic()
        if self.started is None:
            self.started = self.ended
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                pid = int(entry.name)
                # after the command: state ppid ... utime(12th) stime(13th)
                children[int(fields[1])].append(pid)
                own[pid] = (int(fields[11]) + int(fields[12])) / tick
        roots = set(self.roots.values())
        for name, root in self.roots.items():
            if root not in own:
                continue
            total, todo = 0.0, [root]
            while todo:
                pid = todo.pop()
                total += own.get(pid, 0.0)
                todo.extend(c for c in children.get(pid, ()) if c not in roots)
            self.first.setdefault(name, total)
            self.last[name] = total

    def spent(self) -> dict[str, float]:
        return {name: self.last[name] - self.first[name] for name in self.last}

    def lines(self) -> list[str]:
        """Each tree's CPU seconds and share of one core over the sampled time, the busiest
        first, and the machine's share in all."""
        wall = self.ended - (self.started or self.ended)
        if wall <= 0:
            return []
        spent = self.spent()
        cores = os.cpu_count() or 1
        out = [
            f"  {name:24} {cpu:8.1f} s  {cpu / wall:6.0%} of a core"
            for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1])
        ]
        total = sum(spent.values())
        out.append(
            f"  {'all of the above':24} {total:8.1f} s  {total / (wall * cores):6.0%} of "
            f"{cores} cores over {wall:.0f} s"
        )
        return out


# --- the run ------------------------------------------------------------------------------


async def _last_seq(js: JetStreamContext, base: str) -> int:
    return int((await js.stream_info(streams.stream_name(base, namespace=NS))).state.last_seq)


def _eas() -> Iterator[tuple[str, tuple[str, ...]]]:
    """One EA process per feed and half of its symbols (an EA runs per chart in MT5; one
    ``ea-sim`` process waits for each publish acknowledgement while on schedule, so one
    process alone does not reach 2,000 messages/s here)."""
    half = len(SYMBOLS) // 2
    for feed in FEEDS:
        yield feed, SYMBOLS[:half]
        yield feed, SYMBOLS[half:]


async def _load(
    js: JetStreamContext,
    stack: LocalStack,
    procs: dict[str, Process],
    logs: Path,
    probe: HopProbe,
    cpu: CpuMeter,
) -> tuple[int, list[float]]:
    """The EAs at ``RATE`` ticks/s in all for ``SECONDS`` s; (worst exit code, hops meanwhile)."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "TICKWIRE_NATS_URL": str(stack.urls.nats_url),
        "TICKWIRE_LOG_LEVEL": "WARNING",
    }
    eas = list(_eas())
    rate, ticks = RATE / len(eas), RATE * SECONDS // len(eas)
    signals0 = await _last_seq(js, streams.SIGNALS)
    sims = []
    for k, (feed, symbols) in enumerate(eas):
        argv = [
            "ea-sim",
            *("--feeds", feed, "--symbols", ",".join(symbols), "--start", START),
            *("--rate", f"{rate:g}", "--ticks", str(ticks), "--namespace", NS, "--no-progress"),
        ]
        sims.append(_spawn(f"ea-sim-{k}", argv, env, logs))
        cpu.watch(f"ea-sim-{k}", sims[-1].proc.pid)
    cpu.sample()
    hops: list[float] = []
    stop = asyncio.Event()
    probing = asyncio.create_task(probe.under_load(hops, stop))
    deadline = time.monotonic() + SECONDS * 4
    try:
        with tqdm(total=ticks * len(eas), desc="e2e run", unit="tick", leave=False) as bar:
            while any(s.proc.poll() is None for s in sims):
                _check_alive(procs.values())
                bar.update(await _last_seq(js, streams.TICKS) - bar.n)
                bar.set_postfix(signals=await _last_seq(js, streams.SIGNALS) - signals0)
                cpu.sample()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the EAs did not finish in {SECONDS * 4} s")
                await asyncio.sleep(POLL_S)  # sampling progress of a run
            bar.update(await _last_seq(js, streams.TICKS) - bar.n)
    finally:
        stop.set()
        await probing
        _stop(sims)
    for sim in sims:
        if sim.proc.returncode:
            print(f"{sim.name} exited with {sim.proc.returncode}:\n{sim.tail()}", flush=True)
    return max(s.proc.returncode for s in sims), hops


@dataclass
class Stored:
    seq: int
    ns: int
    data: bytes


async def _read(nc: Client, base: str, first: int) -> list[Stored]:
    """Every message of a stream from seq ``first``, with its stored time."""
    js = nc.jetstream()
    stream = streams.stream_name(base, namespace=NS)
    last = int((await js.stream_info(stream)).state.last_seq)
    if last < first:
        return []
    info = await js.add_consumer(
        stream,
        ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=first,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    source = PullSource(nc, stream, info.name, batch=1000)
    out: list[Stored] = []
    await source.start()
    try:
        with tqdm(total=last - first + 1, desc=f"reading {base}", unit="msg", leave=False) as bar:
            while not out or out[-1].seq < last:
                msgs = await source.take(1000, 10.0)
                if not msgs:
                    raise TimeoutError(f"reading {stream} stalled after seq {out[-1].seq}")
                for m in msgs:
                    a = parse_reply(m.reply)
                    out.append(Stored(a.stream_seq, a.timestamp_ns, m.data))
                bar.update(len(msgs))
    finally:
        await source.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, info.name)
    return out


# --- what the streams say -----------------------------------------------------------------


@dataclass
class Timeline:
    """Stored times (ns) of every step of each signal's path, by candle key."""

    ticks: dict[tuple[str, str], tuple[list[int], list[int]]] = field(default_factory=dict)
    """Per series: tick event times (ascending) and their stored times."""
    candles: dict[Key, tuple[int, Candle]] = field(default_factory=dict)
    features: dict[Key, int] = field(default_factory=dict)
    scores: dict[Key, int] = field(default_factory=dict)
    signals: list[tuple[int, Signal]] = field(default_factory=list)

    def stored_at(self, feed: str, symbol: str, time_ms: int, *, first_after: bool) -> int | None:
        """Stored time of the first tick at or after ``time_ms`` (``first_after``), or of the
        last tick at or before it."""
        times, stored = self.ticks.get((feed, symbol), ([], []))
        if first_after:
            i = bisect.bisect_left(times, time_ms)
        else:
            i = bisect.bisect_right(times, time_ms) - 1
        return stored[i] if 0 <= i < len(times) else None


def _timeline(raw: dict[str, list[Stored]]) -> Timeline:
    t = Timeline()
    codec: Codec[TickInput] = Codec(TickInput)
    per: dict[tuple[str, str], list[tuple[int, int]]] = collections.defaultdict(list)
    for s in raw[streams.TICKS]:
        m = codec.decode(s.data)
        if isinstance(m, Tick):
            per[m.feed, m.symbol].append((m.time_ms, s.ns))
    for k, rows in per.items():
        rows.sort()
        t.ticks[k] = ([r[0] for r in rows], [r[1] for r in rows])
    candle = msgspec.json.Decoder(Candle).decode
    for s in raw[streams.CANDLES]:
        c = candle(s.data)
        t.candles[c.feed, c.symbol, c.tf, c.open_time_ms, c.revision] = (s.ns, c)
    vector = msgspec.json.Decoder(FeatureVector).decode
    for s in raw[streams.FEATURES]:
        v = vector(s.data)
        t.features[v.feed, v.symbol, v.tf, v.open_time_ms, v.candle_revision] = s.ns
    score = msgspec.json.Decoder(Score).decode
    for s in raw[streams.SCORES]:
        sc = score(s.data)
        t.scores[sc.feed, sc.symbol, sc.tf, sc.open_time_ms, sc.candle_revision] = s.ns
    signal = msgspec.json.Decoder(Signal).decode
    t.signals = [(s.ns, signal(s.data)) for s in raw[streams.SIGNALS]]
    return t


STAGES = (
    (streams.CANDLE_INGEST, "closing tick stored -> candle stored"),
    (streams.FEATURE_BUILDER, "candle stored -> feature vector stored"),
    (streams.MODEL_SCORER, "feature vector stored -> score stored"),
    (streams.SIGNAL_PUBLISHER, "score stored -> signal stored"),
)


@dataclass
class Paths:
    close: list[float] = field(default_factory=list)
    tick: list[float] = field(default_factory=list)
    event: list[float] = field(default_factory=list)
    """Signal stored time - candle close_time_ms: what the workers' histogram measures."""
    stages: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    unmatched: int = 0
    doubled: int = 0
    without_signal: int = 0


def _paths(t: Timeline) -> Paths:
    """Seconds along each signal's path, from the stored times."""
    p = Paths()
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    for sig_ns, s in t.signals:
        seen[s.signal_id, s.candle_revision] += 1
        key = (s.feed, s.symbol, s.tf, s.open_time_ms, s.candle_revision)
        close_ms = s.open_time_ms + s.tf.ms
        closing = t.stored_at(s.feed, s.symbol, close_ms, first_after=True)
        found = t.candles.get(key)
        if closing is None or found is None or key not in t.features or key not in t.scores:
            p.unmatched += 1
            continue
        candle_ns, candle = found
        last = t.stored_at(s.feed, s.symbol, candle.last_tick_ms, first_after=False)
        p.close.append((sig_ns - closing) / 1e9)
        if last is not None:
            p.tick.append((sig_ns - last) / 1e9)
        p.event.append(sig_ns / 1e9 - close_ms / 1e3)
        steps = (closing, candle_ns, t.features[key], t.scores[key], sig_ns)
        for (stage, _), a, b in zip(STAGES, steps, steps[1:], strict=False):
            p.stages[stage].append((b - a) / 1e9)
    p.doubled = sum(n - 1 for n in seen.values())
    keys = {(s.feed, s.symbol, s.tf, s.open_time_ms, s.candle_revision) for _, s in t.signals}
    p.without_signal = sum(1 for k in t.scores if k not in keys)
    return p


# --- the workers' own view ----------------------------------------------------------------


def _histograms(
    text: str,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]]:
    """Cumulative buckets by (metric, labels other than ``le``)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_bucket"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                out.setdefault((family.name, labels), []).append((float(s.labels["le"]), s.value))
    for buckets in out.values():
        buckets.sort()
    return out


def _counter(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def _scrape(procs: dict[str, Process]) -> dict[str, str]:
    return {n: (await asyncio.to_thread(p.get, "/metrics")).decode() for n, p in procs.items()}


@dataclass
class Scrapes:
    """Each worker's /metrics before the run (history done) and after it."""

    before: dict[str, str]
    after: dict[str, str]

    def counter(self, worker: str, name: str, **labels: str) -> float:
        return _counter(self.after[worker], name, **labels) - _counter(
            self.before[worker], name, **labels
        )

    def histograms(
        self, worker: str
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[float, float]]]:
        """The run's own observations: after minus before, bucket by bucket."""
        old = _histograms(self.before[worker])
        out = {}
        for key, buckets in _histograms(self.after[worker]).items():
            was = dict(old.get(key, []))
            out[key] = [(le, n - was.get(le, 0.0)) for le, n in buckets]
        return out


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Upper bound of the bucket holding the ``q`` quantile (inf: above the last bound)."""
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


def _worker_view(scrapes: Scrapes) -> list[str]:
    """Lines: each worker's batch handling time and size, and its latency histograms."""
    lines = []
    for name in WORKERS:
        hists = scrapes.histograms(name)
        for (metric, labels), buckets in sorted(hists.items()):
            if metric not in (
                "tickwire_processing_seconds",
                "tickwire_batch_size",
                "tickwire_e2e_latency_seconds",
                "tickwire_scorer_predict_seconds",
            ):
                continue
            what = ",".join(f"{k}={v}" for k, v in labels if k != "worker")
            n = buckets[-1][1] if buckets else 0
            p50, p99 = _bucket_quantile(buckets, 0.5), _bucket_quantile(buckets, 0.99)
            lines.append(
                f"  {name:22} {metric.removeprefix('tickwire_'):24} {what:24} "
                f"n={n:<8,.0f} p50<={p50:<8g} p99<={p99:g}"
            )
    return lines


# --- putting it together ------------------------------------------------------------------


def _pct(xs: list[float], q: float) -> float:
    """Percentile in microseconds (nan for no sample)."""
    return float(np.percentile(np.asarray(xs) * 1e6, q)) if xs else float("nan")


@dataclass
class Result:
    idle: list[float]
    floor: list[float]
    paths: Paths
    asked: int
    stored_ticks: int
    accepted: float
    rate: float
    dead_letters: float
    sim_exit: int
    scrapes: Scrapes
    signals: int
    cpu: CpuMeter


async def _run(stack: LocalStack, dsn: str, logs: Path) -> Result:
    urls = stack.urls
    nc = await nats.connect(str(urls.nats_url))
    js = nc.jetstream()
    procs: dict[str, Process] = {}
    probe = HopProbe(nc)
    try:
        await _cleanup(js)
        # as ops do with `tickwire streams ensure`: the replicator expects its consumers
        await streams.ensure(
            js, streams.stream_specs(namespace=NS), streams.consumer_specs(namespace=NS)
        )
        await probe.start()
        idle = await probe.idle(300)
        await _models(js)
        start_ms = round(datetime.fromisoformat(START).replace(tzinfo=UTC).timestamp() * 1000)
        await publish_candles(
            js, history_before(start_ms, _series(), HISTORY), namespace=NS, progress=True
        )
        procs = _start_workers(stack, dsn, logs)
        await _healthy(procs)
        await _drain(js, procs, "history through the pipeline")
        firsts = {
            b: await _last_seq(js, b) + 1
            for b in (
                streams.TICKS,
                streams.CANDLES,
                streams.FEATURES,
                streams.SCORES,
                streams.SIGNALS,
            )
        }
        before = await _scrape(procs)
        cpu = CpuMeter()
        for name, proc in procs.items():
            cpu.watch(name, proc.proc.pid)
        for server in stack.servers:
            cpu.watch(server.name, server.pid)
        cpu.watch("bench (this process)", os.getpid())
        sim_exit, floor = await _load(js, stack, procs, logs, probe, cpu)
        await _drain(js, procs, "draining the pipeline")
        cpu.sample()
        after = await _scrape(procs)
        _stop(procs.values())
        raw = {b: await _read(nc, b, first) for b, first in firsts.items()}
    finally:
        _stop(procs.values())
        await probe.stop()
        await _cleanup(js)
        await nc.close()
    ticks = raw[streams.TICKS]
    rate = (len(ticks) - 1) / ((ticks[-1].ns - ticks[0].ns) / 1e9) if len(ticks) > 1 else 0.0
    scrapes = Scrapes(before, after)
    return Result(
        idle=idle,
        floor=floor,
        paths=_paths(_timeline(raw)),
        asked=RATE * SECONDS,
        stored_ticks=len(ticks),
        accepted=scrapes.counter(
            streams.CANDLE_INGEST, "tickwire_ticks_in_total", outcome="accepted"
        ),
        rate=rate,
        dead_letters=sum(scrapes.counter(n, "tickwire_dead_letters_total") for n in WORKERS),
        sim_exit=sim_exit,
        scrapes=scrapes,
        signals=len(raw[streams.SIGNALS]),
        cpu=cpu,
    )


def _print(r: Result) -> None:
    p = r.paths
    print(
        f"e2e: {len(p.close):,} signals measured ({p.unmatched} not matched to a path, "
        f"{p.without_signal} scores without a signal), {r.dead_letters:g} dead letters"
    )
    print(
        f"e2e: bare JetStream hop, idle: p50 {_pct(r.idle, 50):,.0f} us, "
        f"p99 {_pct(r.idle, 99):,.0f} us; during the run ({len(r.floor)} hops): "
        f"p50 {_pct(r.floor, 50):,.0f} us, p99 {_pct(r.floor, 99):,.0f} us"
    )
    print("e2e: where the time goes, from the stored times (us):")
    for stage, what in STAGES:
        xs = p.stages.get(stage, [])
        print(
            f"  {stage:22} {what:40} p50 {_pct(xs, 50):>9,.0f}  p99 {_pct(xs, 99):>9,.0f}  "
            f"max {_pct(xs, 100):>9,.0f}"
        )
    print("e2e: CPU spent from the EAs' start to the pipeline drained, per process:")
    for line in r.cpu.lines():
        print(line)
    print("e2e: the workers' own histograms (seconds; bucket bounds):")
    for line in _worker_view(r.scrapes):
        print(line)
    print(
        f"e2e: close_to_signal from outside (signal stored - close_time_ms, event time): "
        f"p50 {_pct(p.event, 50) / 1e6:,.1f} s, p99 {_pct(p.event, 99) / 1e6:,.1f} s",
        flush=True,
    )


def measure(stack: LocalStack) -> list[Figure]:
    print(
        f"e2e: ea-sim {RATE:,} ticks/s for {SECONDS} s, {len(FEEDS)} feeds x {len(SYMBOLS)} "
        "symbols, through the five workers as processes ...",
        flush=True,
    )
    postgres = stack.postgres
    assert postgres is not None
    dsn = postgres.create_database("benche2e")
    asyncio.run(migrate(dsn))
    try:
        LOGS.mkdir(parents=True, exist_ok=True)
        r = asyncio.run(_run(stack, dsn, LOGS))
    finally:
        postgres.drop_database("benche2e")
    _print(r)
    p = r.paths
    floor_name = f"{HOPS} x bare hop p99 under load"
    floor = HOPS * _pct(r.floor, 99)
    stage_p99 = [
        Figure(
            f"e2e: {stage} stage p99", _pct(p.stages.get(stage, []), 99), "us", floor_name, floor
        )
        for stage, _ in STAGES
    ]
    return [
        Figure("e2e: candle close -> signal p50", _pct(p.close, 50), "us", floor_name, floor),
        Figure(
            "e2e: candle close -> signal p99",
            _pct(p.close, 99),
            "us",
            floor_name,
            floor,
            limit=TARGET_P99_US,
        ),
        Figure("e2e: tick -> signal p50", _pct(p.tick, 50), "us", floor_name, floor),
        Figure("e2e: tick -> signal p99", _pct(p.tick, 99), "us", floor_name, floor),
        *stage_p99,
        Figure("e2e: tick rate achieved", r.rate, "ticks/s", "asked", float(RATE)),
        Figure(
            "e2e: ticks lost",
            max(0.0, r.asked - min(r.accepted, r.stored_ticks)),
            "ticks",
            "ticks asked",
            float(r.asked),
            limit=0.0,
        ),
        Figure(
            "e2e: signals doubled",
            float(p.doubled),
            "signals",
            "signals published",
            float(r.signals),
            limit=0.0,
        ),
    ]
