"""A NATS node killed and a stream leader stalled under the running pipeline (``make chaos``).

A 3-node JetStream cluster on loopback (``infra.stack.NatsCluster``, every write fsynced),
every stream R3. The NATS side of the pipeline, candle-ingest, feature-builder, model-scorer
(a promoted model per series and timeframe, in an R3 registry) and signal-publisher (a
policy that restates the side on every candle), runs as processes whose
``TICKWIRE_NATS_URL`` lists the three nodes; 40 candles of history per series and timeframe
are on CANDLES first, so every candle of the run is scored. QuestDB is the session's. The
EAs publish the simulated market
(``workers.ea_sim.market``), one lane per feed/symbol paced to a tick rate, each message
published with its deterministic ``Nats-Msg-Id`` and retried until JetStream acknowledges
it, as an EA does: a tick is *acknowledged* once a PubAck came back for it. In one run:

1. kill -9 the node leading TICKS; wait until ticks are stored and candles published again;
   restart it and wait until every stream and consumer has it current again and every
   worker has processed what its stream held when the node came back;
2. SIGSTOP the node then leading TICKS for 5 s, SIGCONT it, and wait the same way.

Then every acknowledged tick must be on TICKS exactly once, and the candles on CANDLES and
in QuestDB equal a pandas resample of the acknowledged ticks, none missing, none doubled;
no feature vector, score or signal is on its stream twice. Recovery times are taken from the servers' stored timestamps of the first tick and candle
after each fault. The figures are printed as a table (``-s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig, ObjectStoreConfig

from contracts import streams, subjects
from contracts.messages import Candle, Timeframe
from infra.stack import NatsCluster, NatsNode, QuestDBUrls, StackUrls
from tests import market as scenario
from tests import reference
from tests.candles import history_before
from tests.candles import publish as publish_candles
from tests.integration.test_candle_ingest import latest, questdb_rows
from tests.processes import spawn, worker_env
from tests.scorer_models import promote_each
from tests.waiting import eventually
from workers.ea_sim import market
from workers.ea_sim.market import Outgoing
from workers.registry import Registry, bucket_name
from workers.registry.store import KV_HISTORY
from workers.runtime.publish import MSG_ID

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

FEEDS = ("brokera", "brokerb")
SYMBOLS = ("EURUSD", "XAUUSD", "US500.cash")
START_MS = int(datetime(2025, 3, 4, 15, 0, tzinfo=UTC).timestamp() * 1000)
"""A Tuesday, New York hours: every symbol open."""
RATE = 240
"""Ticks per second over all lanes: event time runs about 30 times faster than the clock,
so every series closes an M1 candle every few seconds."""
MAX_TICKS = 120_000
"""More than the run can publish; the lanes stop when the faults are over."""
PUBLISH_TIMEOUT_S = 2.0
RETRY_S = 0.1
STALL_S = 5.0
WARM_TICKS = 2_000
AFTER_TICKS = 2_000
"""Acknowledged after the last fault recovered, before the EAs stop."""
RECOVERY_TIMEOUT_S = 120.0
HISTORY = 40
"""Candles per series and timeframe on CANDLES before the run (the feature set needs 34)."""
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
CONSUMERS = {
    streams.TICKS: streams.CANDLE_INGEST,
    streams.CANDLES: streams.FEATURE_BUILDER,
    streams.FEATURES: streams.MODEL_SCORER,
    streams.SCORES: streams.SIGNAL_PUBLISHER,
}
"""Each stream of the pipeline and the worker consuming it."""
READ_BACK = re.compile(r": (\d+) messages of seqs \d+\.\.\d+ were delivered but never received")


# --- the EAs ----------------------------------------------------------------------------


@dataclass
class Eas:
    """The EAs: what they sent, what JetStream acknowledged, when."""

    js: JetStreamContext
    namespace: str
    acked: dict[str, Outgoing] = field(default_factory=dict)
    retries: int = 0
    ack_duplicates: int = 0
    """PubAcks saying "duplicate": a retry of a message stored before its ack was lost."""
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, subject: str, payload: bytes, msg_id: str) -> None:
        """Publish until acknowledged, with the same id: JetStream stores it once."""
        while True:
            try:
                ack = await self.js.publish(
                    subject, payload, timeout=PUBLISH_TIMEOUT_S, headers={MSG_ID: msg_id}
                )
            except (TimeoutError, nats.errors.Error):
                self.retries += 1
                await asyncio.sleep(RETRY_S)  # the EA's retry delay, not a synchronisation
                continue
            self.ack_duplicates += bool(ack.duplicate)
            return

    async def lane(self, messages: list[Outgoing], rate: float) -> None:
        """One EA's series, in order, ``rate`` messages a second, until ``stop``."""
        t0 = time.monotonic()
        for i, m in enumerate(messages):
            if self.stop.is_set():
                return
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing to the tick rate
            subject = subjects.ticks(m.feed, m.symbol, namespace=self.namespace)
            await self.send(subject, m.payload, m.msg_id)
            self.acked[m.msg_id] = m

    def ticks(self) -> list[dict[str, Any]]:
        """The acknowledged ticks, as the pandas reference takes them."""
        return [
            {"feed": m.feed, "symbol": m.symbol, **msgspec.structs.asdict(row)}
            for m in self.acked.values()
            for row in m.ticks
        ]


def lanes() -> Iterator[list[Outgoing]]:
    """The simulated market, one list of messages per feed/symbol, each in sending order."""
    by_series: dict[tuple[str, str], list[Outgoing]] = {}
    for m in market.simulate(
        seed=7, feeds=FEEDS, symbols=SYMBOLS, start_ms=START_MS, max_ticks=MAX_TICKS
    ):
        by_series.setdefault((m.feed, m.symbol), []).append(m)
    yield from by_series.values()


# --- models and history ----------------------------------------------------------------


async def promote_models(js: JetStreamContext, namespace: str) -> None:
    """A promoted model of its own for every series and timeframe, in an R3 registry."""
    name = bucket_name(namespace)
    await js.create_object_store(
        name, config=ObjectStoreConfig(description="tickwire model files", replicas=3)
    )
    await js.create_key_value(
        KeyValueConfig(
            bucket=name, history=KV_HISTORY, description="tickwire active models", replicas=3
        )
    )
    registry = await Registry.open(js, namespace=namespace, create=False)
    await promote_each(registry, ((f, s, tf) for f in FEEDS for s in SYMBOLS for tf in Timeframe))


# --- watching the cluster ---------------------------------------------------------------


async def answered(coro: Any) -> Any:
    """The answer, or None when the cluster does not give one now (a node is down)."""
    try:
        return await coro
    except (TimeoutError, nats.errors.Error):
        return None


async def leader(js: JetStreamContext, stream: str) -> str | None:
    info = await answered(js.stream_info(stream))
    return info.cluster.leader if info is not None and info.cluster is not None else None


async def all_current(js: JetStreamContext, names: list[str], namespace: str) -> bool:
    """Every stream and every worker's consumer: a leader and both followers current."""
    infos = [await answered(js.stream_info(name)) for name in names]
    for base, durable in CONSUMERS.items():
        stream = streams.stream_name(base, namespace=namespace)
        infos.append(await answered(js.consumer_info(stream, durable)))
    for info in infos:
        if info is None or info.cluster is None or not info.cluster.leader:
            return False
        peers = info.cluster.replicas or []
        if len(peers) != 2 or not all(p.current and not p.offline for p in peers):
            return False
    return True


async def last_seqs(js: JetStreamContext, namespace: str) -> dict[str, int] | None:
    """Each pipeline stream's last sequence, or None while the cluster does not answer."""
    out = {}
    for base in CONSUMERS:
        info = await answered(js.stream_info(streams.stream_name(base, namespace=namespace)))
        if info is None:
            return None
        out[base] = info.state.last_seq
    return out


async def processed_up_to(js: JetStreamContext, namespace: str, seqs: dict[str, int]) -> bool:
    """Every worker has acked its stream up to ``seqs``."""
    for base, durable in CONSUMERS.items():
        stream = streams.stream_name(base, namespace=namespace)
        info = await answered(js.consumer_info(stream, durable))
        if info is None or info.ack_floor.stream_seq < seqs[base]:
            return False
    return True


async def consumed(js: JetStreamContext, namespace: str) -> bool:
    """Every worker has acked everything on its stream."""
    for base, durable in CONSUMERS.items():
        stream = streams.stream_name(base, namespace=namespace)
        info = await answered(js.consumer_info(stream, durable))
        if info is None or info.num_pending or info.num_ack_pending:
            return False
    return True


def check_alive(procs: dict[str, subprocess.Popen[bytes]], logs: Path) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"{name} exited with {proc.returncode}:\n{tail}")


@dataclass
class Fault:
    name: str
    at: float
    """Wall-clock time (the servers' clock) of the fault."""
    at_mono: float
    over_mono: float = 0.0
    """When the node was back: restarted, or thawed."""
    caught_up_mono: float = 0.0


async def recovered(
    js: JetStreamContext,
    names: list[str],
    namespace: str,
    fault: Fault,
    procs: dict[str, subprocess.Popen[bytes]],
    logs: Path,
) -> None:
    """Wait until every replica is current and every worker processed what its stream held
    when the node came back."""
    target = await eventually(
        lambda: last_seqs(js, namespace), timeout=RECOVERY_TIMEOUT_S, what="the streams"
    )

    async def caught_up() -> bool:
        check_alive(procs, logs)
        return await all_current(js, names, namespace) and await processed_up_to(
            js, namespace, target
        )

    await eventually(caught_up, timeout=RECOVERY_TIMEOUT_S, interval=0.2, what="caught up")
    fault.caught_up_mono = time.monotonic()


# --- reading what is stored ---------------------------------------------------------------


@dataclass
class Stored:
    data: bytes
    msg_id: str | None
    at: float
    """The server's stored time, epoch seconds."""


async def read_all(js: JetStreamContext, stream: str) -> list[Stored]:
    """Every message of ``stream`` with its id and stored time, through one ephemeral
    consumer (a get per message is too slow for tens of thousands)."""
    info = await js.stream_info(stream)
    total = info.state.messages
    if total == 0:
        return []
    sub = await js.pull_subscribe(
        "",
        stream=stream,
        config=ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.ALL,
            mem_storage=True,
            inactive_threshold=60.0,
        ),
    )
    out: list[Stored] = []

    async def fetched() -> list[Msg] | None:
        try:
            return await sub.fetch(min(1000, total - len(out)), timeout=10)
        except nats.js.errors.ServiceUnavailableError:
            return None  # the consumer just made is not answering on this cluster yet

    try:
        while len(out) < total:
            msgs = await eventually(fetched, timeout=60, interval=0.5, what=f"{stream} read")
            for msg in msgs:
                headers = msg.headers or {}
                stamp = msg.metadata.timestamp.timestamp()
                out.append(Stored(msg.data, headers.get(MSG_ID), stamp))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out


def first_after(stored: list[Stored], t: float) -> float | None:
    """Seconds from ``t`` to the first message stored after it."""
    later = [s.at for s in stored if s.at > t]
    return min(later) - t if later else None


# --- the test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture
async def cnc(cluster: NatsCluster) -> AsyncIterator[Client]:
    """The test's own client: every node, reconnecting for ever."""
    client = await nats.connect(
        cluster.url.split(","),
        connect_timeout=2,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    yield client
    await client.close()


@pytest.mark.timeout(900)
async def test_a_killed_node_and_a_stalled_leader_lose_and_double_nothing(
    cluster: NatsCluster,
    stack: StackUrls,
    questdb: QuestDBUrls,
    cnc: Client,
    unique: str,
    tmp_path: Path,
) -> None:
    ns = unique
    js = cnc.jetstream(timeout=PUBLISH_TIMEOUT_S)
    specs = streams.stream_specs(namespace=ns, replicas=3)
    names = [s.name for s in specs]
    name = {b: streams.stream_name(b, namespace=ns) for b in (*CONSUMERS, "SIGNALS", "DLQ")}
    await streams.ensure(js, specs, rescale=True)
    await promote_models(js, ns)
    past = history_before(START_MS, ((f, s) for f in FEEDS for s in SYMBOLS), HISTORY)
    await publish_candles(js, past, namespace=ns)
    past_keys = {(c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in past}

    policy = tmp_path / "policy.json"
    policy.write_text(msgspec.json.encode(POLICY).decode())
    env = worker_env(stack, ns, nats_url=cluster.url)
    own = {
        streams.CANDLE_INGEST: {
            "TICKWIRE_QUESTDB_ILP": str(questdb.ilp_conf),
            "TICKWIRE_QUESTDB_HTTP": str(questdb.http),
            "TICKWIRE_IDLE_CLOSE": "false",
        },
        streams.SIGNAL_PUBLISHER: {"TICKWIRE_SIGNAL_POLICY_FILE": str(policy)},
    }
    procs = {w: spawn(w, env | own.get(w, {}), tmp_path / f"{w}.log") for w in CONSUMERS.values()}
    eas = Eas(js, ns)
    tasks: list[asyncio.Task[None]] = []
    faults: list[Fault] = []
    try:

        async def started() -> bool:
            check_alive(procs, tmp_path)
            for base, durable in CONSUMERS.items():
                if await answered(js.consumer_info(name[base], durable)) is None:
                    return False
            return True

        await eventually(started, timeout=120, what="every worker's consumer")
        series = list(lanes())
        tasks = [asyncio.create_task(eas.lane(m, RATE / len(series))) for m in series]

        def acked(n: int) -> bool:
            assert not any(t.done() for t in tasks), "an EA stopped early"
            return len(eas.acked) >= n

        await eventually(lambda: acked(WARM_TICKS), timeout=60, what="warm-up ticks")

        # 1. kill -9 the node leading TICKS, then restart it
        node = cluster.node(str(await leader(js, name[streams.TICKS])))
        kill = Fault(f"kill -9 {node.server_name} (TICKS leader)", time.time(), time.monotonic())
        faults.append(kill)
        node.kill()
        n = len(eas.acked)
        await eventually(lambda: acked(n + 100), timeout=RECOVERY_TIMEOUT_S, what="ticks again")
        await asyncio.to_thread(node.start)
        kill.over_mono = time.monotonic()
        await recovered(js, names, ns, kill, procs, tmp_path)

        # 2. SIGSTOP the node leading TICKS now for STALL_S, then SIGCONT
        stalled: NatsNode = cluster.node(str(await leader(js, name[streams.TICKS])))
        stall = Fault(
            f"SIGSTOP {stalled.server_name} (TICKS leader) {STALL_S:g} s",
            time.time(),
            time.monotonic(),
        )
        faults.append(stall)
        stalled.pause()
        try:
            await asyncio.sleep(STALL_S)  # the fault itself: a node frozen this long
        finally:
            stalled.resume()
        stall.over_mono = time.monotonic()
        await recovered(js, names, ns, stall, procs, tmp_path)

        n = len(eas.acked)
        await eventually(lambda: acked(n + AFTER_TICKS), timeout=120, what="ticks after")
    finally:
        eas.stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    try:
        # every candle closed: a watermark per series far past the last tick
        end = max(m.ticks[-1].time_ms for m in eas.acked.values()) + 3 * 86_400_000
        for feed in FEEDS:
            for symbol in SYMBOLS:
                await eas.send(
                    subjects.ticks(feed, symbol, namespace=ns),
                    scenario.watermark(feed, symbol, end),
                    scenario.watermark_headers(feed, symbol, end)["Nats-Msg-Id"],
                )

        async def settled() -> bool:
            check_alive(procs, tmp_path)
            # twice, a moment apart: a worker may publish after the one before it acked
            return await consumed(js, ns) and await consumed(js, ns)

        await eventually(settled, timeout=240, interval=0.5, what="every stage consumed")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # --- what is stored
    replicas = {n: (await js.stream_info(n)).config.num_replicas for n in names}
    on_ticks = await read_all(js, name[streams.TICKS])
    ids = Counter(s.msg_id for s in on_ticks if s.msg_id and not s.msg_id.startswith("wm|"))
    acked_ticks = sum(len(m.ticks) for m in eas.acked.values())
    lost = [i for i in eas.acked if i not in ids]
    doubled_ticks = sum(c - 1 for c in ids.values())
    unknown = [i for i in ids if i not in eas.acked]

    on_candles = await read_all(js, name[streams.CANDLES])
    run_candles = [
        (s, c)
        for s in on_candles
        if (c := msgspec.json.decode(s.data, type=Candle))
        and (c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) not in past_keys
    ]
    made = [s for s, _ in run_candles]
    published = [c for _, c in run_candles]
    revisions = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    doubled_candles = sum(c - 1 for c in revisions.values())
    want = reference.candles(eas.ticks())
    got = latest(published)
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    diffs = reference.differences(got, want)

    downstream = {}
    for base in (streams.FEATURES, streams.SCORES, streams.SIGNALS):
        stored = await read_all(js, name[base])
        counts = Counter(s.msg_id for s in stored)
        downstream[base] = (stored, len(counts), sum(c - 1 for c in counts.values()))
    signals = downstream[streams.SIGNALS][0]
    dead = (await js.stream_info(name["DLQ"])).state.messages

    rows = await questdb_rows(questdb, ns, wal_wait_s=120)
    in_questdb = Counter((r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]) for r in rows)
    questdb_wrong = [
        key for key, c in got.items() if in_questdb[key[0], key[1], key[2], c["first_tick_ms"]] != 1
    ]

    # --- the figures
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    table = [
        ("streams", ", ".join(f"{n.split('_')[-1]} R{r}" for n, r in replicas.items())),
        ("ticks acknowledged to the EAs", f"{acked_ticks} in {len(eas.acked)} messages"),
        ("EA publish retries / acks saying duplicate", f"{eas.retries} / {eas.ack_duplicates}"),
        ("ticks on TICKS (distinct ids / messages)", f"{len(ids)} / {sum(ids.values())}"),
        ("acknowledged ticks lost", str(len(lost))),
        ("ticks doubled on TICKS", str(doubled_ticks)),
        ("ticks on TICKS never acknowledged", str(len(unknown))),
        ("candles expected (pandas)", str(len(want))),
        ("candles on CANDLES (distinct / messages)", f"{len(got)} / {len(published)}"),
        (
            "candles missing / unexpected / differing",
            f"{len(missing)} / {len(extra)} / {len(diffs)}",
        ),
        ("candle revisions doubled on CANDLES", str(doubled_candles)),
        ("candles in QuestDB (rows / wrong)", f"{len(rows)} / {len(questdb_wrong)}"),
    ]
    for base, (_, distinct, doubled) in downstream.items():
        table.append((f"{base.lower()} (distinct / doubled)", f"{distinct} / {doubled}"))
    table.append(("dead letters", str(dead)))
    # what each worker's runtime logged when it read back deliveries lost in a failover
    read_back = {
        w: sum(
            int(n) for n in READ_BACK.findall((tmp_path / f"{w}.log").read_text("utf-8", "replace"))
        )
        for w in CONSUMERS.values()
    }
    table.append(("lost deliveries read back", ", ".join(f"{w} {n}" for w, n in read_back.items())))
    for f in faults:
        table += [
            (f"{f.name}: first tick stored", secs(first_after(on_ticks, f.at))),
            (f"{f.name}: first candle stored", secs(first_after(made, f.at))),
            (f"{f.name}: first signal stored", secs(first_after(signals, f.at))),
            (f"{f.name}: node back -> caught up", secs(f.caught_up_mono - f.over_mono)),
            (f"{f.name}: fault -> caught up", secs(f.caught_up_mono - f.at_mono)),
        ]
    width = max(len(k) for k, _ in table)
    print("\nNATS cluster failover under the pipeline (EAs -> candle-ingest -> ... -> signals)")
    for k, v in table:
        print(f"  {k:<{width}}  {v}")

    assert set(replicas.values()) == {3}, "a worker's ensure changed the replica count"
    assert lost == [], f"acknowledged ticks lost: {lost[:5]}"
    assert doubled_ticks == 0, f"doubled: {[i for i, c in ids.items() if c > 1][:5]}"
    assert unknown == [], f"stored but never acknowledged: {unknown[:5]}"
    assert doubled_candles == 0, "a candle revision was published twice"
    assert diffs == [], diffs
    assert len(rows) == len(want)
    assert questdb_wrong == []
    assert {base: d[2] for base, d in downstream.items()} == dict.fromkeys(downstream, 0)
    assert downstream[streams.SIGNALS][1] > 0, "no signal at all: the scorer never scored"
    assert dead == 0
