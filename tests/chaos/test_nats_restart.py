"""The one NATS server restarted under the running EA and workers (``make chaos``).

The default deployment has a single NATS server, and ops restart it (an upgrade, a host
reboot). A NATS server of the test's own; the session's QuestDB. The EA (``tickwire
ea-sim``, a process) publishes ticks at a steady rate; candle-ingest and feature-builder run
as processes. Mid-run the server is stopped, as a service manager stops it, kept down for
``DOWN_S`` seconds and started again on the same store and port. Nothing is restarted but
the server: the EA and the workers must reconnect and go on by themselves.

Then: the EA delivered every tick it made, each stored once on TICKS; the candles on CANDLES
and in QuestDB equal a pandas reference of those ticks in the order the server stored them
(none missing, none doubled, the latest revision in QuestDB); FEATURES holds exactly one
vector per candle key and revision on CANDLES; nothing was dead-lettered; and both workers
consumed everything their streams hold without a restart of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from contracts import streams, subjects
from contracts.messages import Candle, FeatureVector
from infra.stack import NatsServer, QuestDBUrls, StackUrls
from tests import market as scenario
from tests import reference
from tests.chaos.ingest_process import IngestProcess, start_ingest
from tests.chaos.test_cluster import read_all
from tests.integration.test_candle_ingest import latest, questdb_rows
from tests.integration.test_ea_sim import FEEDS, START, START_MS, SYMBOLS, tick_dicts
from tests.processes import spawn_started, tail, worker_env
from tests.waiting import eventually
from workers.ea_sim import market

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

TICKS = 60_000
RATE = 4_000
"""Ticks a second: the EA publishes for about 15 s, the workers busy all along."""
STOP_AT = 20_000
"""Ticks stored on TICKS when the server is stopped."""
DOWN_S = 5.0
"""How long the server stays down: a restart."""
LONG_DOWN_S = 25.0
"""Down longer than a publish waits for its answer (``TICKWIRE_PUBLISH_TIMEOUT_S``, 10 s)
twice over: a host rebooting."""
AFTER = 4_000
"""Ticks stored after the restart before the EA is waited for."""
SEED = 11


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def own_nc(own_nats: NatsServer) -> AsyncIterator[Client]:
    """The test's client of its server, reconnecting through the restart."""
    client = await nats.connect(
        own_nats.url, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    yield client
    await client.close()


async def start_ea(
    server: NatsServer, ns: str, err_path: Path, *pacing: str
) -> asyncio.subprocess.Process:
    """``tickwire ea-sim`` on ``server`` in namespace ``ns``, the test's feeds and symbols
    from ``START``: its summary on stdout (a pipe), its errors in ``err_path``."""
    args = ["--seed", str(SEED), "--feeds", ",".join(FEEDS), "--symbols", ",".join(SYMBOLS)]
    args += ["--start", START, "--namespace", ns, *pacing]
    with err_path.open("wb") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "workers.cli", "ea-sim", *args,
            env={**os.environ, "TICKWIRE_NATS_URL": server.url},
            stdout=asyncio.subprocess.PIPE, stderr=err,
        )  # fmt: skip


async def consumed(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("how", "down_s"),
    [("stop", DOWN_S), ("kill", DOWN_S), ("stop", LONG_DOWN_S)],
    ids=["stopped", "killed", "stopped-long"],
)
async def test_a_restart_of_the_one_nats_server_loses_and_doubles_nothing(
    own_nats: NatsServer,
    own_nc: Client,
    questdb: QuestDBUrls,
    unique: str,
    tmp_path: Path,
    how: str,
    down_s: float,
) -> None:
    """``how``: ``stop`` as a service manager stops the server (SIGTERM), ``kill`` as a
    crash does (SIGKILL); ``down_s``: how long it stays down."""
    server, ns = own_nats, unique
    js = own_nc.jetstream()
    name = {
        b: streams.stream_name(b, namespace=ns)
        for b in (streams.TICKS, streams.CANDLES, streams.FEATURES, streams.DLQ)
    }
    await streams.ensure(js, streams.stream_specs(namespace=ns))

    ea_err = tmp_path / "ea-sim.err"
    ea: asyncio.subprocess.Process | None = None
    ingest: IngestProcess | None = None
    builder_log = tmp_path / "feature-builder.log"
    urls = StackUrls(server.url, None, None, None, None, None)
    try:
        # Event time runs days ahead per minute of the run: a tick a restart puts out of
        # order (one the EA publishes again) can be hours late in it. The lateness allowed
        # is a day of event time here: what a few seconds are at real speed.
        ingest = start_ingest(
            server.url, questdb, ns, tmp_path / "candle-ingest.log", allowed_lateness_s="86400"
        )
        await eventually(ingest.ready, timeout=120, what="candle-ingest up")
        builder = await spawn_started(streams.FEATURE_BUILDER, worker_env(urls, ns), builder_log)

        def workers_alive() -> None:
            assert ingest is not None
            assert ingest.alive(), tail(ingest.log)
            assert builder.poll() is None, tail(builder_log)

        ea = await start_ea(server, ns, ea_err, "--ticks", str(TICKS), "--rate", str(RATE))

        async def stored_ticks(n: int) -> bool:
            workers_alive()
            assert ea is not None
            assert ea.returncode is None, ea_err.read_text()[-3000:]
            return (await js.stream_info(name[streams.TICKS])).state.last_seq >= n

        async def flowing() -> bool:
            # ticks stored, candles made and feature vectors published: the whole run moves
            return (
                await stored_ticks(STOP_AT)
                and (await js.stream_info(name[streams.FEATURES])).state.messages > 0
            )

        await eventually(flowing, timeout=120, what="ticks, candles and features flowing")

        # the restart: the server stopped or killed, down a while, started on the same store
        before = (await js.stream_info(name[streams.TICKS])).state.last_seq
        stopped_at = time.monotonic()
        await asyncio.to_thread(server.stop if how == "stop" else server.kill)
        await asyncio.sleep(down_s)  # the fault itself: the server down this long
        await asyncio.to_thread(server.start)
        back_at = time.monotonic()
        assert ea.returncode is None, ea_err.read_text()[-3000:]

        await eventually(
            lambda: stored_ticks(before + AFTER), timeout=120, what="ticks stored again"
        )
        ticks_again_s = time.monotonic() - back_at
        out, _ = await asyncio.wait_for(ea.communicate(), 180)
        assert ea.returncode == 0, ea_err.read_text()[-3000:]

        # every candle closed: a watermark per series far past the last tick
        sent = list(
            market.simulate(
                seed=SEED, feeds=FEEDS, symbols=SYMBOLS, start_ms=START_MS, max_ticks=TICKS
            )
        )
        end = max(m.ticks[-1].time_ms for m in sent) + 3 * 86_400_000
        for feed in FEEDS:
            for symbol in SYMBOLS:
                subject = subjects.ticks(feed, symbol, namespace=ns)
                wm = scenario.watermark(feed, symbol, end)
                await js.publish(subject, wm, headers=scenario.watermark_headers(feed, symbol, end))

        async def settled() -> bool:
            workers_alive()
            # twice: feature-builder may be handed candles after candle-ingest acked
            for _ in range(2):
                if not (
                    await consumed(js, name[streams.TICKS], streams.CANDLE_INGEST)
                    and await consumed(js, name[streams.CANDLES], streams.FEATURE_BUILDER)
                ):
                    return False
            return True

        await eventually(settled, timeout=180, interval=0.5, what="both workers consumed all")
        assert ingest.stop() == 0, tail(ingest.log)
        builder.terminate()
        assert builder.wait(60) == 0, tail(builder_log)
    finally:
        if ea is not None and ea.returncode is None:
            ea.kill()
            await ea.wait()
        if ingest is not None:
            ingest.stop()

    # the EA: every tick it made acknowledged, each stored once on TICKS
    summary = out.decode()
    counted = re.search(
        r"(\d+) ticks in \d+ messages published \((\d+) new, (\d+) duplicate\)", summary
    )
    assert counted is not None, summary
    assert int(counted[1]) == TICKS, summary
    assert int(counted[2]) + int(counted[3]) == TICKS, summary
    on_ticks = await read_all(js, name[streams.TICKS])
    kept = [
        (s.msg_id, s.data)
        for s in on_ticks
        if s.msg_id is not None and not s.msg_id.startswith("wm|")
    ]
    ids = Counter(msg_id for msg_id, _ in kept)
    lost = [m.msg_id for m in sent if m.msg_id not in ids]
    doubled_ticks = [i for i, n in ids.items() if n > 1]
    assert lost == [], f"{len(lost)} ticks the EA made are not on TICKS: {lost[:5]}"
    assert doubled_ticks == [], f"{len(doubled_ticks)} on TICKS twice: {doubled_ticks[:5]}"
    assert Counter(kept) == Counter((m.msg_id, m.payload) for m in sent)

    # candles: each revision once on CANDLES, the latest equal to the reference of the ticks
    # in the order the server stored them (the order candle-ingest read them)
    want = reference.candles(tick_dicts([data for _, data in kept]))
    published = [
        msgspec.json.decode(s.data, type=Candle) for s in await read_all(js, name[streams.CANDLES])
    ]
    revisions = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    doubled_candles = [k for k, n in revisions.items() if n > 1]
    got = latest(published)
    assert doubled_candles == [], f"candle revisions published twice: {doubled_candles[:5]}"
    assert reference.differences(got, want) == []

    rows = await questdb_rows(questdb, ns, wal_wait_s=120)
    by_key = Counter((r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]) for r in rows)
    row_of = {(r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): r for r in rows}
    assert len(rows) == len(want)
    for key, c in got.items():
        row_key = (key[0], key[1], key[2], c["first_tick_ms"])
        assert by_key[row_key] == 1, row_key
        row = row_of[row_key]
        assert (row["open"], row["high"], row["low"], row["close"], row["tick_volume"]) == (
            c["open"], c["high"], c["low"], c["close"], c["tick_volume"],
        ), row_key  # fmt: skip
        assert row["revision"] == c["revision"], row_key

    # features: one vector per candle key and revision, none missing, none doubled
    on_features = await read_all(js, name[streams.FEATURES])
    vectors = Counter(
        (v.feed, v.symbol, v.tf, v.open_time_ms, v.candle_revision)
        for v in (msgspec.json.decode(s.data, type=FeatureVector) for s in on_features)
    )
    missing_vectors = [k for k in revisions if k not in vectors]
    unexpected_vectors = [k for k in vectors if k not in revisions]
    doubled_vectors = [k for k, n in vectors.items() if n > 1]
    assert missing_vectors == [], f"{len(missing_vectors)} missing: {missing_vectors[:5]}"
    assert unexpected_vectors == [], unexpected_vectors[:5]
    assert doubled_vectors == [], f"{len(doubled_vectors)} doubled: {doubled_vectors[:5]}"
    assert len({s.msg_id for s in on_features}) == len(on_features), "a vector id twice"

    dead = await read_all(js, name[streams.DLQ])
    assert dead == [], [(s.msg_id, s.data[:300]) for s in dead[:3]]

    print(
        f"\nNATS server restart under the EA, candle-ingest and feature-builder:\n"
        f"  {how} at {before} ticks stored, down {back_at - stopped_at:.1f} s; ticks "
        f"stored again {ticks_again_s:.1f} s after it was back\n"
        f"  EA: {summary.strip()}\n"
        f"  ticks on TICKS {len(kept)}, candles expected {len(want)}, on CANDLES "
        f"{len(got)} ({len(published)} revisions), in QuestDB {len(rows)}, feature vectors "
        f"{len(on_features)}; nothing lost, doubled or dead-lettered"
    )


def ea_messages_in(server: NatsServer) -> int:
    """Messages the server has received from the EA's connection (its monitoring)."""
    with urllib.request.urlopen(f"{server.monitor_url}/connz", timeout=5) as response:
        conns = json.load(response).get("connections") or []
    return sum(int(c["in_msgs"]) for c in conns if c.get("name") == "tickwire-ea-sim")


async def test_the_ea_waits_for_a_stream_that_does_not_answer_yet(
    own_nats: NatsServer, own_nc: Client, unique: str, tmp_path: Path
) -> None:
    """A server that has just restarted, or is stopping, answers "no responders" for the
    stream until it has its streams loaded: the EA asks again (for up to its publish
    timeout) and delivers every tick, rather than stopping at the first such answer."""
    server, ns = own_nats, unique
    ticks = 2_000
    ea_err = tmp_path / "ea-sim.err"
    ea = await start_ea(server, ns, ea_err, "--ticks", str(ticks), "--speed", "max")
    try:
        # the EA publishes before any stream answers for its subjects (or has stopped)
        async def published() -> bool:
            return ea.returncode is not None or await asyncio.to_thread(ea_messages_in, server) > 0

        await eventually(published, timeout=60, what="the EA's ticks")
        js = own_nc.jetstream()
        await streams.ensure(js, streams.stream_specs(namespace=ns))
        out, _ = await asyncio.wait_for(ea.communicate(), 120)
        assert ea.returncode == 0, ea_err.read_text()[-3000:]
        assert f"{ticks} ticks in" in out.decode(), out.decode()
        kept = await read_all(js, streams.stream_name(streams.TICKS, namespace=ns))
        sent = market.simulate(
            seed=SEED, feeds=FEEDS, symbols=SYMBOLS, start_ms=START_MS, max_ticks=ticks
        )
        assert Counter(s.msg_id for s in kept) == Counter(m.msg_id for m in sent)
    finally:
        if ea.returncode is None:
            ea.kill()
            await ea.wait()
