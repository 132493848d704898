"""The NATS server's JetStream file store fills up under the EA and candle-ingest (``make chaos``).

A NATS server of the test's own with a small ``max_file_store`` (the server's limit, the one a
deployment hits when its volume is sized too small); a filler stream takes most of it. The EA
(``tickwire ea-sim``, a process) publishes ticks until the server refuses them for want of
room; candle-ingest (a process) comes up behind it on the same server, and its CANDLES
publishes are refused too. Then the filler is purged, as an operator frees the room, and everything must go on by
itself: the EA delivers every tick it holds, candle-ingest catches up, and the candles on
CANDLES and in QuestDB equal a pandas reference of the ticks the server acknowledged: none
lost, none doubled. A restart of the server finally reads back the same streams.
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
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from contracts import streams, subjects
from contracts.messages import Candle
from infra.stack import NatsServer, QuestDBUrls
from tests import market as scenario
from tests import reference
from tests.chaos.ingest_process import IngestProcess, start_ingest
from tests.integration.test_candle_ingest import latest, on_stream, questdb_rows, stream_messages
from tests.integration.test_ea_sim import FEEDS, START, START_MS, SYMBOLS, stored, tick_dicts
from tests.waiting import eventually
from workers.ea_sim import market

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

MiB = 1024 * 1024
LIMIT = 16 * MiB
"""The server's ``max_file_store``."""
ROOM = 1 * MiB
"""What the filler leaves: a few thousand ticks."""
HOLD_S = 20.0
"""How long the store stays full once candle-ingest is refused too."""
TICKS = 20_000
FILLER = "FILLER"


@pytest.fixture
async def small_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path, max_file_store=str(LIMIT))
    server.start()
    yield server
    server.stop()


def store_used(server: NatsServer) -> int:
    """Bytes of the server's JetStream file store in use, from its monitoring endpoint."""
    with urllib.request.urlopen(f"{server.monitor_url}/jsz", timeout=5) as response:
        return int(json.load(response)["storage"])


async def fill(js: JetStreamContext, server: NatsServer) -> None:
    """A stream of something else takes the store up to ``ROOM`` below the limit."""
    await js.add_stream(StreamConfig(name=FILLER, subjects=["filler.>"]))
    chunk = b"f" * (64 * 1024)
    while await asyncio.to_thread(store_used, server) < LIMIT - ROOM - len(chunk):
        await js.publish("filler.x", chunk)


async def state(js: JetStreamContext, namespace: str) -> dict[str, Any]:
    """Message counts and sequences of every stream and the consumer: what a restart must keep."""
    out: dict[str, Any] = {}
    for name in [*(s.name for s in streams.stream_specs(namespace=namespace)), FILLER]:
        st = (await js.stream_info(name)).state
        out[name] = (st.messages, st.bytes, st.first_seq, st.last_seq)
    ticks = streams.stream_name(streams.TICKS, namespace=namespace)
    info = await js.consumer_info(ticks, "candle-ingest")
    out["consumer"] = (info.ack_floor.stream_seq, info.num_pending, info.num_ack_pending)
    return out


async def test_a_full_store_refuses_loudly_and_everything_recovers_once_there_is_room(
    small_nats: NatsServer, questdb: QuestDBUrls, unique: str, tmp_path: Path
) -> None:
    server, ns = small_nats, unique
    nc: Client = await nats.connect(server.url)
    js = nc.jetstream()
    ticks_stream = streams.stream_name(streams.TICKS, namespace=ns)
    await streams.ensure(js, streams.stream_specs(namespace=ns))
    await fill(js, server)
    filled = await asyncio.to_thread(store_used, server)

    ea_err = tmp_path / "ea-sim.err"
    ea: asyncio.subprocess.Process | None = None
    ingest: IngestProcess | None = None
    try:
        args = ["--seed", "5", "--feeds", ",".join(FEEDS), "--symbols", ",".join(SYMBOLS)]
        args += ["--start", START, "--ticks", str(TICKS), "--speed", "max", "--namespace", ns]
        with ea_err.open("wb") as err:
            ea = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "workers.cli", "ea-sim", *args,
                env={**os.environ, "TICKWIRE_NATS_URL": server.url},
                stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        ea_started = time.monotonic()

        # the EA is refused, says so in one line and keeps its ticks
        said = await eventually(
            lambda: [ln for ln in ea_err.read_text().splitlines() if "store full" in ln],
            timeout=90,
            what="the EA to report the full store",
        )
        ea_full_at = time.monotonic() - ea_started
        assert ea.returncode is None, "the EA gave up"
        # candle-ingest comes up behind the EA (as after a deploy): its candles are refused
        # on CANDLES and it holds the batch they came from
        ingest = start_ingest(server.url, questdb, ns, tmp_path / "candle-ingest.log")
        await eventually(ingest.ready, timeout=60, what="candle-ingest up")
        await eventually(
            lambda: ingest.alive_and(retried(ingest)),
            timeout=90,
            what="candle-ingest to be refused",
        )
        ingest_full_at = time.monotonic() - ea_started
        assert ingest is not None
        floor = (await js.consumer_info(ticks_stream, "candle-ingest")).ack_floor.stream_seq
        seen = {"held": 0}
        held_since = time.monotonic()

        async def full_for_a_while() -> bool:
            info = await js.consumer_info(ticks_stream, "candle-ingest")
            last = (await js.stream_info(ticks_stream)).state.last_seq
            seen["held"] = max(seen["held"], info.num_ack_pending)
            assert info.ack_floor.stream_seq == floor, "acked ticks whose candles were refused"
            assert floor < last
            assert ingest.alive(), ingest.log.read_text()[-3000:]
            assert ea.returncode is None, ea_err.read_text()[-3000:]
            return time.monotonic() - held_since >= HOLD_S

        await eventually(full_for_a_while, timeout=HOLD_S + 30, interval=0.5, what="the hold")
        acked_when_full = (await js.stream_info(ticks_stream)).state.last_seq
        ingest_said = [line.partition(" WARNING ")[2] for line in ingest.lines("holding")[:1]]
        assert ingest_said, "candle-ingest logged no refusal"
        # the held batch names the server's reason, not a bare timeout
        assert "insufficient resources" in ingest_said[0], ingest_said[0]
        retries_full = await ingest.metric("tickwire_transient_retries_total")

        # room again: the operator purges what filled the store
        await js.purge_stream(FILLER)
        room_at = time.monotonic()
        out, _ = await asyncio.wait_for(ea.communicate(), 180)
        assert ea.returncode == 0, ea_err.read_text()[-3000:]
        await eventually(
            lambda: consumed_all(js, ticks_stream), timeout=180, what="candle-ingest to catch up"
        )
        recovered_s = time.monotonic() - room_at
        assert ingest.alive(), "candle-ingest was restarted or died"

        # close every candle, then stop it cleanly
        for feed in FEEDS:
            for symbol in SYMBOLS:
                subject = subjects.ticks(feed, symbol, namespace=ns)
                end = START_MS + 10 * 86_400_000
                wm = scenario.watermark(feed, symbol, end)
                await js.publish(subject, wm, headers=scenario.watermark_headers(feed, symbol, end))
        await eventually(lambda: consumed_all(js, ticks_stream), timeout=120, what="the close")
        assert ingest.stop() == 0, ingest.log.read_text()[-3000:]
    finally:
        if ea is not None and ea.returncode is None:
            ea.kill()
            await ea.wait()
        if ingest is not None:
            ingest.stop()

    # what the EA holds is exactly what the server acknowledged: none lost, none doubled
    summary = out.decode()
    counted = re.search(
        r"(\d+) ticks in \d+ messages published \((\d+) new, (\d+) duplicate\), "
        r"(\d+) refusals of a full store",
        summary,
    )
    assert counted is not None, summary
    assert int(counted[1]) == TICKS
    assert int(counted[2]) + int(counted[3]) == TICKS
    refused = int(counted[4])
    sent = [
        (subjects.ticks(m.feed, m.symbol, namespace=ns), m.payload, m.msg_id)
        for m in market.simulate(
            seed=5, feeds=FEEDS, symbols=SYMBOLS, start_ms=START_MS, max_ticks=TICKS
        )
    ]
    kept = [m for m in await stored(js, ticks_stream) if not m[2].startswith("wm|")]
    assert Counter(kept) == Counter(sent)
    out_of_place = sum(a != b for a, b in zip(kept, sent, strict=True))

    # candles: each revision once on CANDLES, the latest equal to the reference of the ticks
    # in the order the server stored them (the order candle-ingest read them)
    want = reference.candles(tick_dicts([payload for _, payload, _ in kept]))
    published = await on_stream(js, streams.CANDLES, ns, Candle)
    revisions = Counter((c.feed, c.symbol, c.tf, c.open_time_ms, c.revision) for c in published)
    doubled = sum(n - 1 for n in revisions.values())
    got = latest(published)
    missing = len(set(want) - set(got))
    assert doubled == 0
    assert reference.differences(got, want) == []
    assert await stream_messages(js, streams.stream_name(streams.DLQ, namespace=ns)) == []

    rows = await questdb_rows(questdb, ns, wal_wait_s=120)
    by_key = {(r["feed"], r["symbol"], r["tf"], r["first_tick_ms"]): r for r in rows}
    assert len(rows) == len(want)
    for key, c in got.items():
        row = by_key[key[0], key[1], key[2], c["first_tick_ms"]]
        assert (row["open"], row["high"], row["low"], row["close"], row["tick_volume"]) == (
            c["open"], c["high"], c["low"], c["close"], c["tick_volume"],
        )  # fmt: skip
        assert row["revision"] == c["revision"]

    # no corruption: a restarted server reads back the same streams and consumer
    before = await state(js, ns)
    candles_before = await stream_messages(js, streams.stream_name(streams.CANDLES, namespace=ns))
    await nc.close()
    server.restart()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        after = await state(js, ns)
        candles_after = await stream_messages(
            js, streams.stream_name(streams.CANDLES, namespace=ns)
        )
    finally:
        await nc.close()
    assert after == before
    assert candles_after == candles_before

    print(
        f"\nJetStream store full: max_file_store {LIMIT // MiB} MiB, {filled / MiB:.1f} MiB "
        f"taken by a filler stream.\n"
        f"  EA said so {ea_full_at:.1f} s after it started, at {acked_when_full} of {TICKS} "
        f"ticks: {said[0]}\n"
        f"  candle-ingest refused {ingest_full_at:.1f} s after the EA started: "
        f"{' | '.join(ingest_said)}\n"
        f"  held {HOLD_S:.0f} s: ack floor stayed at {floor}, up to {seen['held']} ticks "
        f"unacked, {retries_full:.0f} tries of the held commit; the worker never exited\n"
        f"  ticks: {TICKS} acknowledged in the end ({counted[2]} new, {counted[3]} found "
        f"stored when asked again), {acked_when_full} before the store filled, {refused} "
        f"publishes refused and retried, {out_of_place} stored out of the EA's order\n"
        f"  after the filler was purged: EA done and candle-ingest caught up in "
        f"{recovered_s:.1f} s, no restart\n"
        f"  candles: {len(want)} expected, {len(got)} stored on CANDLES and {len(rows)} in "
        f"QuestDB, {missing} missing, {doubled} doubled; server restart: stream and "
        f"consumer state unchanged {before}"
    )


async def consumed_all(js: JetStreamContext, stream: str) -> bool:
    info = await js.consumer_info(stream, "candle-ingest")
    return info.num_pending == 0 and info.num_ack_pending == 0


async def retried(ingest: IngestProcess) -> bool:
    return await ingest.metric("tickwire_transient_retries_total") > 0
