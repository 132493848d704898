"""``tickwire ea-sim`` on the real NATS, into candle-ingest: what the EAs send becomes candles.

The simulator runs as its own process, as an EA would. What it stored is compared byte for
byte with the messages computed here in-process from the same arguments; the candles are
compared with a pandas reference computed here from those ticks (or, for the CSV replay,
from the file read with pandas), never with what the code under test says.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pandas as pd
import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.codec import Codec
from contracts.messages import Candle, TickBatch, TickInput
from infra.stack import QuestDBUrls, StackUrls
from tests import market as scenario
from tests import reference
from tests.integration.test_candle_ingest import consumed, latest, on_stream, stream_messages
from tests.integration.test_nats_users import Secured, secured  # noqa: F401 - a fixture
from tests.waiting import eventually
from workers.candle_ingest.app import Settings, build
from workers.ea_sim import app, market

pytestmark = pytest.mark.integration

FEEDS = ["icm-live", "pepper-demo"]
SYMBOLS = ["EURUSD", "US500.cash", "XAUUSD"]
START = "2025-03-03T09:00:00"
START_MS = int(datetime(2025, 3, 3, 9, 0, tzinfo=UTC).timestamp() * 1000)
codec: Codec[TickInput] = Codec(TickInput)


@pytest.fixture
async def namespace(js: JetStreamContext, unique: str) -> AsyncIterator[str]:
    await streams.ensure(js, streams.stream_specs(namespace=unique))
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)
    with contextlib.suppress(APIError):
        await js.delete_object_store(f"ns-{unique}-candle-ingest-state")


async def ea_sim(*args: str, **env: str) -> tuple[int, str, str]:
    """Run ``tickwire ea-sim`` as its own process; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.cli",
        "ea-sim",
        *args,
        env={**os.environ, "TICKWIRE_NATS_CONNECT_TIMEOUT_S": "2", **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def stored(js: JetStreamContext, stream: str) -> list[tuple[str, bytes, str]]:
    """(subject, payload, Nats-Msg-Id) of every message of ``stream``, in order."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        m = await js.get_msg(stream, seq)
        out.append((m.subject, m.data or b"", (m.headers or {}).get("Nats-Msg-Id", "")))
    return out


def tick_dicts(payloads: list[bytes]) -> list[dict[str, Any]]:
    """Every tick of the messages, as the reference takes them, in publish order."""
    out = []
    for p in payloads:
        m = codec.decode(p)
        rows = m.ticks if isinstance(m, TickBatch) else [m]
        for r in rows:
            fields = {k: v for k, v in msgspec.structs.asdict(r).items() if v is not None}
            out.append({"feed": m.feed, "symbol": m.symbol} | fields)  # type: ignore[union-attr]
    return out


async def candles_of(
    js: JetStreamContext,
    stack: StackUrls,
    questdb: QuestDBUrls,
    namespace: str,
    pairs: list[tuple[str, str]],
    last_ms: int,
) -> dict[tuple, dict[str, Any]]:
    """Run candle-ingest over the namespace's TICKS, close every candle, return the latest
    revision of each; no dead letter allowed."""
    for feed, symbol in pairs:
        subject = subjects.ticks(feed, symbol, namespace=namespace)
        end = last_ms + 3 * 86_400_000
        await js.publish(
            subject,
            scenario.watermark(feed, symbol, end),
            headers=scenario.watermark_headers(feed, symbol, end),
        )
    worker = build(
        Settings(
            nats_url=stack.nats_url,
            namespace=namespace,
            questdb_ilp=questdb.ilp_conf,
            questdb_http=questdb.http,
            idle_close=False,
            pull_expires_s=1,
        )
    )
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: worker.started.is_set() or task.done(), what="worker start")
        ticks = streams.stream_name(streams.TICKS, namespace=namespace)
        await eventually(
            lambda: task.done() or consumed(js, ticks, "candle-ingest"),
            timeout=120,
            what="all ticks consumed",
        )
        assert not task.done(), task.result()
    finally:
        worker.stop()
        await asyncio.wait_for(task, 60)
    dead = await stream_messages(js, streams.stream_name(streams.DLQ, namespace=namespace))
    assert dead == [], f"{len(dead)} dead letters, first: {dead[:1]}"
    return latest(await on_stream(js, streams.CANDLES, namespace, Candle))


async def test_simulated_feeds_become_the_candles_of_their_ticks(
    stack: StackUrls, questdb: QuestDBUrls, js: JetStreamContext, namespace: str
) -> None:
    args = ["--seed", "3", "--feeds", ",".join(FEEDS), "--symbols", ",".join(SYMBOLS)]
    args += ["--start", START, "--ticks", "6000", "--speed", "max", "--namespace", namespace]
    code, out, err = await ea_sim(*args, TICKWIRE_NATS_URL=stack.nats_url or "")
    assert code == 0, err
    assert "6000 ticks in 6000 messages published (6000 new, 0 duplicate)" in out

    want = [
        (subjects.ticks(m.feed, m.symbol, namespace=namespace), m.payload, m.msg_id)
        for m in market.simulate(
            seed=3, feeds=FEEDS, symbols=SYMBOLS, start_ms=START_MS, max_ticks=6000
        )
    ]
    ticks_stream = streams.stream_name(streams.TICKS, namespace=namespace)
    got = await stored(js, ticks_stream)
    assert got == want, "the stored messages differ from the simulation of the same arguments"

    ticks = tick_dicts([payload for _, payload, _ in got])
    assert {(t["feed"], t["symbol"]) for t in ticks} == {(f, s) for f in FEEDS for s in SYMBOLS}
    pairs = [(f, s) for f in FEEDS for s in SYMBOLS]
    candles = await candles_of(
        js, stack, questdb, namespace, pairs, max(t["time_ms"] for t in ticks)
    )
    assert reference.differences(candles, reference.candles(ticks)) == []
    # the two feeds' candles of one symbol are told apart by their prices
    for symbol in SYMBOLS:
        a = {k[2:]: v["close"] for k, v in candles.items() if k[:2] == (FEEDS[0], symbol)}
        b = {k[2:]: v["close"] for k, v in candles.items() if k[:2] == (FEEDS[1], symbol)}
        assert a != b, symbol

    # the same run again: every message is a duplicate by its id, nothing new is stored
    code, out, err = await ea_sim(*args, TICKWIRE_NATS_URL=stack.nats_url or "")
    assert code == 0, err
    assert "(0 new, 6000 duplicate)" in out


def mt5_tick_export(path: Path, rows: int) -> None:
    """A small MT5 tick export in server time: a price unchanged since the line before is
    left blank, as MT5 writes it."""
    lines = ["<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>"]
    bid, ask = 520_125, 520_175  # hundredths
    written: tuple[int, int] | None = None
    t = datetime(2025, 3, 4, 11, 58, 0)  # server time, crosses a few minutes
    for i in range(rows):
        t += timedelta(milliseconds=137 + (i % 7) * 291)
        if i % 2 == 0:
            bid += (i * 37) % 11 - 5 or 1
        if i % 2 == 1 or ask <= bid:
            ask = bid + 30 + (i % 5) * 10
        texts = [
            "" if written is not None and now == before else f"{now / 100:.2f}"
            for now, before in zip((bid, ask), written or (0, 0), strict=True)
        ]
        written = (bid, ask)
        stamp = f"{t:%Y.%m.%d}\t{t:%H:%M:%S}.{t.microsecond // 1000:03d}"
        lines.append(f"{stamp}\t{texts[0]}\t{texts[1]}\t\t\t6")
    path.write_text("\n".join(lines) + "\n")


async def test_an_mt5_tick_export_replayed_becomes_the_candles_of_its_ticks(
    stack: StackUrls,
    questdb: QuestDBUrls,
    js: JetStreamContext,
    namespace: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / "US500.cash_ticks.csv"
    mt5_tick_export(path, 800)
    args = ["--csv", str(path), "--feed", "mt5-export", "--symbol", "US500.cash"]
    args += ["--utc-offset", "2", "--speed", "max", "--batch", "50", "--namespace", namespace]
    code, out, err = await ea_sim(*args, TICKWIRE_NATS_URL=stack.nats_url or "")
    assert code == 0, err
    assert "800 ticks in" in out

    # the reference reads the file with pandas: blanks carry the previous price
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    df.columns = [c.strip("<>") for c in df.columns]
    server = pd.to_datetime(df["DATE"] + " " + df["TIME"], format="%Y.%m.%d %H:%M:%S.%f")
    utc = server - pd.Timedelta(hours=2)
    want_ticks = pd.DataFrame(
        {
            "feed": "mt5-export",
            "symbol": "US500.cash",
            "time_ms": (utc - pd.Timestamp("1970-01-01")) // pd.Timedelta(milliseconds=1),
            "bid": pd.to_numeric(df["BID"].replace("", None)).ffill(),
            "ask": pd.to_numeric(df["ASK"].replace("", None)).ffill(),
        }
    )
    stored_ticks = tick_dicts([p for _, p, _ in await stored(js, f"NS_{namespace}_TICKS")])
    assert [t["seq"] for t in stored_ticks] == list(range(1, 801))
    assert [(t["time_ms"], t["bid"], t["ask"]) for t in stored_ticks] == list(
        want_ticks[["time_ms", "bid", "ask"]].itertuples(index=False, name=None)
    )
    candles = await candles_of(
        js,
        stack,
        questdb,
        namespace,
        [("mt5-export", "US500.cash")],
        int(want_ticks["time_ms"].max()),
    )
    assert reference.differences(candles, reference.candles(want_ticks.to_dict("records"))) == []


async def test_a_rate_spreads_the_ticks_over_time_one_per_message(
    stack: StackUrls, js: JetStreamContext, namespace: str
) -> None:
    """``--rate``: what is due within ``PACE_AHEAD_S`` goes at once, nothing earlier.

    Tick k is due k / rate after the EA's start, which the test cannot see: the stored time
    minus k / rate is that start plus the tick's lateness, so the median over all ticks
    stands for it (a late first message, or a stall, moves it little). No tick may be more
    than ``PACE_AHEAD_S`` ahead of it; ``slack`` covers how unevenly the ticks travel."""
    rate, n, slack = 400, 400, 0.05
    args = ["--feeds", FEEDS[0], "--symbols", "EURUSD,XAUUSD", "--start", START]
    args += ["--ticks", str(n), "--rate", str(rate), "--namespace", namespace]
    code, out, err = await ea_sim(*args, TICKWIRE_NATS_URL=stack.nats_url or "")
    assert code == 0, err
    assert f"{n} ticks in {n} messages" in out
    stream = streams.stream_name(streams.TICKS, namespace=namespace)
    start = []
    for seq in range(1, n + 1):
        m = await js.get_msg(stream, seq)
        assert m.time is not None
        start.append(m.time.timestamp() - (seq - 1) / rate)
    median = sorted(start)[n // 2]
    early = [
        (k, round(s - median, 4))
        for k, s in enumerate(start)
        if s < median - app.PACE_AHEAD_S - slack
    ]
    assert early == [], f"ticks stored ahead of their time (tick, seconds): {early[:5]}"


async def test_publishes_as_the_ea_user_and_nothing_it_may_not(
    secured: Secured,  # noqa: F811 - the fixture
) -> None:
    ops_nc = await secured.connect("ops")
    try:
        await streams.ensure(ops_nc.jetstream(), streams.stream_specs())
        env = {"TICKWIRE_NATS_URL": secured.url}
        base = ["--symbols", "EURUSD,US500.cash", "--start", START, "--ticks", "300"]
        base += ["--speed", "max", "--batch", "7"]
        password = secured.passwords["ea"]
        code, out, err = await ea_sim(*base, "--user", "ea", "--password", password, **env)
        assert code == 0, err
        assert "300 ticks in" in out
        stored_ticks = tick_dicts([p for _, p, _ in await stored(ops_nc.jetstream(), "TICKS")])
        assert len(stored_ticks) == 300
        assert {t["symbol"] for t in stored_ticks} == {"EURUSD", "US500.cash"}

        # the credentials may come in the URL instead
        in_url = secured.url.replace("nats://", f"nats://ea:{password}@")
        code, out, err = await ea_sim(*base, "--seed", "2", TICKWIRE_NATS_URL=in_url)
        assert code == 0, err
        assert "300 ticks in" in out
        assert " new, 0 duplicate)" in out

        code, _, err = await ea_sim(*base, "--user", "ea", "--password", "wrong", **env)
        assert code == 1
        assert err.strip().splitlines()[-1].startswith("tickwire ea-sim: cannot connect")
        # a namespace is not the EA's to publish into: refused with the server's reason
        code, _, err = await ea_sim(
            *base,
            "--namespace",
            "x",
            "--user",
            "ea",
            "--password",
            password,
            **env,
            TICKWIRE_PUBLISH_TIMEOUT_S="2",
        )
        assert code == 1
        assert "publish to ns.x.ticks." in err.strip().splitlines()[-1]
    finally:
        await ops_nc.close()
