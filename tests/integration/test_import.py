"""Backfill from MT5 CSV exports onto a real JetStream server, in a namespace per test.

The expected ticks and bars are computed here from the generated numbers (integer points
and integer milliseconds), not by the parser under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy
from nats.js.errors import APIError

from contracts import streams, subjects
from contracts.messages import Bar, TickBatch, TickRow, Timeframe
from tests.crashing_worker import window_gone_by
from workers.candle_ingest import importer

pytestmark = pytest.mark.integration

FEED = "demo"
SYMBOL = "EURUSD.m"  # a dot: the subject token is escaped, the message id is not
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
TICK_HEADER = "<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>"
BAR_HEADER = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"


@pytest.fixture
async def namespace(
    js: JetStreamContext, unique: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """The importer's settings point at the test server and at this test's namespace."""
    monkeypatch.setenv("TICKWIRE_NATS_URL", nats_url)
    monkeypatch.setenv("TICKWIRE_NAMESPACE", unique)
    yield unique
    for spec in streams.stream_specs(namespace=unique):
        with contextlib.suppress(APIError):
            await js.delete_stream(spec.name)


def price(points: int) -> str:
    """Five-digit price text, as MT5 prints EURUSD."""
    return f"{points // 100_000}.{points % 100_000:05d}"


def utc_ms(server: datetime, offset_hours: int) -> int:
    return (server - timedelta(hours=offset_hours) - EPOCH) // MS


@dataclass
class TickFile:
    path: Path
    expected: list[TickRow]
    first_line: int
    malformed: list[int]


def tick_export(path: Path, *, count: int, offset_hours: int, seed: int) -> TickFile:
    """An MT5-style tick export: unchanged bid or ask left blank, two broken lines."""
    rnd = random.Random(seed)
    server = datetime(2024, 3, 4, 23, 59, 30, tzinfo=UTC)  # crosses server midnight
    bid, ask = 108_450, 108_462  # in points
    lines = [TICK_HEADER]
    expected: list[TickRow] = []
    malformed: list[int] = []
    blanks = 0
    for i in range(count):
        if i in (1000, 3000):
            lines.append(
                "2024.03.05\t25:00:00.000\t1.1\t1.2\t\t\t6"
                if i == 1000
                else "2024.03.05\t23:00:00.000\t1.1O\t1.2\t\t\t6"
            )
            malformed.append(len(lines))  # its line number (the header is line 1)
        server += rnd.randrange(0, 400) * MS
        change = "both" if i == 0 else rnd.choice(("bid", "ask", "both"))
        new_bid, new_ask = bid, ask
        if change == "bid":
            new_bid = rnd.choice([p for p in range(ask - 20, ask) if p != bid])
        elif change == "ask":
            new_ask = rnd.choice([p for p in range(bid, bid + 21) if p != ask])
        else:
            new_bid = bid + rnd.choice((-3, -2, -1, 1, 2, 3))
            new_ask = new_bid + rnd.randint(8, 20)
        bid_changed, ask_changed = new_bid != bid or i == 0, new_ask != ask or i == 0
        bid, ask = new_bid, new_ask
        blanks += not (bid_changed and ask_changed)
        flags = (2 if bid_changed else 0) | (4 if ask_changed else 0)
        last = volume = ""
        if i % 97 == 0:
            last, volume, flags = price(bid + 5), str(rnd.randint(1, 9)), flags | 8 | 16
        lines.append(
            f"{server:%Y.%m.%d}\t{server:%H:%M:%S}.{server.microsecond // 1000:03d}\t"
            f"{price(bid) if bid_changed else ''}\t{price(ask) if ask_changed else ''}\t"
            f"{last}\t{volume}\t{flags}"
        )
        expected.append(
            TickRow(
                time_ms=utc_ms(server, offset_hours),
                bid=bid / 100_000,
                ask=ask / 100_000,
                last=(bid + 5) / 100_000 if last else None,
                volume=float(volume) if volume else None,
                flags=flags,
            )
        )
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode("utf-16"))
    assert count < 100 or blanks > count // 2  # blank bid or ask: most lines
    return TickFile(path, expected, 2, malformed)


async def stored(js: JetStreamContext, stream: str) -> list[tuple[str, bytes, str]]:
    """(subject, payload, Nats-Msg-Id) of every message of a stream, in order."""
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        assert msg.data is not None
        assert msg.headers is not None
        out.append((msg.subject, msg.data, msg.headers["Nats-Msg-Id"]))
    return out


def run_import(*argv: str) -> int:
    """The importer runs its own event loop: call it off the test's loop."""
    return importer.main(list(argv))


async def test_tick_import_publishes_exactly_the_exported_ticks_once(
    js: JetStreamContext, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tick_export(tmp_path / "EURUSD.m_ticks.csv", count=5000, offset_hours=2, seed=7)
    argv = ["mt5-ticks", str(export.path), "--feed", FEED, "--symbol", SYMBOL]
    argv += ["--utc-offset", "2", "--batch", "700"]

    assert await asyncio.to_thread(run_import, *argv) == 0

    out, err = capsys.readouterr()
    assert out.strip().endswith(
        "5002 lines read, 5000 ticks in 8 messages published (8 new, 0 duplicate), "
        "2 malformed lines skipped"
    )
    assert err.splitlines() == [
        f"line {export.malformed[0]}: bad_time: <TIME> '25:00:00.000'",
        f"line {export.malformed[1]}: bad_number: <BID> '1.1O'",
    ]
    stream = f"NS_{namespace}_TICKS"
    messages = await stored(js, stream)
    assert len(messages) == 8  # 7 x 700 + 100
    subject = subjects.ticks(FEED, SYMBOL, namespace=namespace)
    assert subject == f"ns.{namespace}.ticks.demo.EURUSD=2Em"
    batches = [msgspec.json.decode(data, type=TickBatch) for _, data, _ in messages]
    assert all(s == subject for s, _, _ in messages)
    assert all(b.feed == FEED and b.symbol == SYMBOL for b in batches)
    assert [len(b.ticks) for b in batches] == [700] * 7 + [100]
    assert [t for b in batches for t in b.ticks] == export.expected
    first = export.expected[0]
    assert messages[0][2] == f"mt5ticks|demo|EURUSD.m|{first.time_ms}|2"
    assert len({msg_id for _, _, msg_id in messages}) == 8

    # The same import again stores nothing new.
    assert await asyncio.to_thread(run_import, *argv) == 0
    out, _ = capsys.readouterr()
    assert "8 messages on the stream already, 0 messages published (0 new, 0 duplicate)" in out
    assert (await js.stream_info(stream)).state.messages == 8


async def test_an_import_run_again_after_the_duplicate_window_stores_nothing_twice(
    js: JetStreamContext, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stopped after three of its eight messages and run again once the stream's duplicate
    window has gone by (1 s here, 10 minutes deployed): the rest goes out, nothing twice."""
    specs = streams.stream_specs(namespace=namespace)
    await streams.ensure(js, [msgspec.structs.replace(s, duplicate_window=1.0) for s in specs])
    export = tick_export(tmp_path / "EURUSD.m_ticks.csv", count=5000, offset_hours=2, seed=7)
    # the export up to its 2,100th tick (a malformed line among them): the first three
    # messages of 700 of a run that stopped there
    lines = export.path.read_bytes().decode("utf-16").split("\r\n")
    stopped = tmp_path / "stopped.csv"
    stopped.write_bytes("".join(f"{line}\r\n" for line in lines[:2102]).encode("utf-16"))
    args = ["--feed", FEED, "--symbol", SYMBOL, "--utc-offset", "2", "--batch", "700"]
    stream = f"NS_{namespace}_TICKS"

    assert await asyncio.to_thread(run_import, "mt5-ticks", str(stopped), *args) == 0
    assert (await js.stream_info(stream)).state.messages == 3
    await window_gone_by(js, f"W_{namespace}", 1.0)
    capsys.readouterr()
    assert await asyncio.to_thread(run_import, "mt5-ticks", str(export.path), *args) == 0
    out, _ = capsys.readouterr()
    assert "3 messages on the stream already, 5 messages published (5 new, 0 duplicate)" in out

    messages = await stored(js, stream)
    batches = [msgspec.json.decode(data, type=TickBatch) for _, data, _ in messages]
    assert [t for b in batches for t in b.ticks] == export.expected  # each once, in order
    assert len({msg_id for _, _, msg_id in messages}) == len(messages) == 8

    await window_gone_by(js, f"W_{namespace}", 1.0)
    assert await asyncio.to_thread(run_import, "mt5-ticks", str(export.path), *args) == 0
    out, _ = capsys.readouterr()
    assert "8 messages on the stream already, 0 messages published" in out
    assert (await js.stream_info(stream)).state.messages == 8


def bar_import(path: Path, lines: list[str], tf: str, utc_offset: str) -> list[str]:
    """Write a bar export; the arguments that import it."""
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    argv = ["mt5-bars", str(path), "--feed", FEED, "--symbol", SYMBOL, "--tf", tf]
    return [*argv, "--utc-offset", utc_offset]


async def test_bar_import_publishes_each_bar_once_with_spread_in_price_units(
    js: JetStreamContext, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rnd = random.Random(11)
    server = datetime(2024, 3, 4, 20, 0, tzinfo=UTC)
    lines = [BAR_HEADER]
    expected = []
    close = 108_450
    for _ in range(300):  # M15 bars over three server days
        o = close
        close = o + rnd.randint(-30, 30)
        high = max(o, close) + rnd.randint(0, 10)
        low = min(o, close) - rnd.randint(0, 10)
        tickvol, spread_points = rnd.randint(1, 500), rnd.randint(0, 25)
        lines.append(
            f"{server:%Y.%m.%d}\t{server:%H:%M:%S}\t{price(o)}\t{price(high)}\t{price(low)}\t"
            f"{price(close)}\t{tickvol}\t0\t{spread_points}"
        )
        expected.append(
            Bar(
                feed=FEED,
                symbol=SYMBOL,
                tf=Timeframe.M15,
                open_time_ms=utc_ms(server, 3),
                open=o / 100_000,
                high=high / 100_000,
                low=low / 100_000,
                close=close / 100_000,
                tick_volume=tickvol,
                spread=spread_points / 100_000,  # the point, inferred from 5 decimals
            )
        )
        server += timedelta(minutes=15)
    argv = bar_import(tmp_path / "EURUSD.m_M15.csv", lines, "M15", "3")

    assert await asyncio.to_thread(run_import, *argv) == 0

    out, err = capsys.readouterr()
    assert "300 lines read, 300 bars in 300 messages published (300 new, 0 duplicate)" in out
    assert "spread point 0.00001 (inferred" in out
    assert err == ""
    stream = f"NS_{namespace}_TICKS"
    messages = await stored(js, stream)
    assert [msgspec.json.decode(data, type=Bar) for _, data, _ in messages] == expected
    assert [msg_id for _, _, msg_id in messages] == [
        f"bar|demo|EURUSD.m|M15|{bar.open_time_ms}" for bar in expected
    ]

    assert await asyncio.to_thread(run_import, *argv) == 0
    out, _ = capsys.readouterr()
    assert "300 messages on the stream already, 0 messages published (0 new, 0 duplicate)" in out
    assert (await js.stream_info(stream)).state.messages == 300


async def test_bars_of_a_server_on_new_york_daylight_saving_time_are_stored_in_utc(
    js: JetStreamContext, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # H1 bars of a UTC+2/UTC+3 broker (New York time plus 7 h) over the week New York moved
    # its clocks forward (Sunday 2026-03-08): UTC+2 up to Friday's close, UTC+3 from Monday
    lines, expected = [BAR_HEADER], []
    server = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)
    while server < datetime(2026, 3, 11, tzinfo=UTC):
        if server.weekday() < 5:  # no bars on the weekend
            lines.append(f"{server:%Y.%m.%d}\t{server:%H:%M:%S}\t1.1\t1.2\t1.0\t1.15\t7\t0\t3")
            summer = server >= datetime(2026, 3, 9, tzinfo=UTC)
            expected.append(utc_ms(server, 3 if summer else 2))
        server += timedelta(hours=1)
    argv = bar_import(tmp_path / "EURUSD.m_H1.csv", lines, "H1", "America/New_York+7")

    assert await asyncio.to_thread(run_import, *argv) == 0

    out, err = capsys.readouterr()
    assert f"{len(expected)} bars in {len(expected)} messages published" in out
    assert err == ""
    messages = await stored(js, f"NS_{namespace}_TICKS")
    got = [msgspec.json.decode(data, type=Bar).open_time_ms for _, data, _ in messages]
    assert got == expected
    # Friday's last bar (23:00) and Monday's first (00:00) are 49 h of server time apart,
    # 48 h in UTC
    friday = expected.index(utc_ms(datetime(2026, 3, 6, 23, tzinfo=UTC), 2))
    assert got[friday + 1] - got[friday] == 48 * 3_600_000


async def test_a_file_without_a_valid_line_exits_1(
    js: JetStreamContext, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.csv"
    path.write_text(f"{TICK_HEADER}\n2024.03.05\t00:00:00.000\t\t1.2\t\t\t4\n")
    argv = ["mt5-ticks", str(path), "--feed", FEED, "--symbol", SYMBOL]

    assert await asyncio.to_thread(run_import, *argv) == 1

    out, err = capsys.readouterr()
    assert "1 lines read, 0 ticks in 0 messages" in out
    assert err.splitlines() == [
        "line 2: no_previous_bid: blank <BID> and no earlier bid",
        f"tickwire import: {path}: no valid line, nothing imported",
    ]
    assert (await js.stream_info(f"NS_{namespace}_TICKS")).state.messages == 0


async def test_an_existing_stream_keeps_its_limits_and_a_too_large_batch_is_refused(
    js: JetStreamContext, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ticks = streams.to_stream_config(streams.stream_specs(namespace=namespace)[0])
    assert ticks.name == f"NS_{namespace}_TICKS"
    await js.add_stream(ticks.evolve(max_msg_size=512))
    export = tick_export(tmp_path / "t.csv", count=50, offset_hours=0, seed=1)
    argv = ["mt5-ticks", str(export.path), "--feed", FEED, "--symbol", SYMBOL, "--batch", "20"]

    assert await asyncio.to_thread(run_import, *argv) == 1

    out, err = capsys.readouterr()
    assert "0 messages published" in out
    assert out.rstrip().endswith("(stopped)")
    [line] = err.splitlines()
    assert line.startswith("tickwire import: a message of ")
    assert "bytes exceeds the stream's max_msg_size 512: use a smaller --batch" in line
    info = await js.stream_info(ticks.name)
    assert info.config.max_msg_size == 512
    assert info.state.messages == 0


async def test_a_publish_the_server_refuses_stops_the_import_with_the_reason(
    js: JetStreamContext,
    namespace: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TICKWIRE_PUBLISH_TIMEOUT_S", "1")
    ticks = streams.to_stream_config(streams.stream_specs(namespace=namespace)[0])
    await js.add_stream(ticks.evolve(max_msgs=3, discard=DiscardPolicy.NEW))
    export = tick_export(tmp_path / "t.csv", count=50, offset_hours=0, seed=1)
    argv = ["mt5-ticks", str(export.path), "--feed", FEED, "--symbol", SYMBOL, "--batch", "10"]

    assert await asyncio.to_thread(run_import, *argv) == 1

    out, err = capsys.readouterr()
    assert "3 messages published (3 new, 0 duplicate)" in out
    last = err.splitlines()[-1]
    assert last.startswith("tickwire import: publish failed after 3 acknowledged messages: ")
    assert "maximum messages exceeded" in last
    assert (await js.stream_info(ticks.name)).state.messages == 3


# --- argument errors: one line, exit code 2, before any connection ---------------------


def test_unknown_timeframe_via_the_console_script(tmp_path: Path) -> None:
    path = tmp_path / "bars.csv"
    path.write_text(f"{BAR_HEADER}\n")
    options = ["--feed", FEED, "--symbol", SYMBOL, "--tf", "M2"]
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "import", "mt5-bars", str(path), *options],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "TICKWIRE_NATS_URL": "nats://127.0.0.1:1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tickwire import mt5-bars: error: argument --tf")
    assert "invalid choice: 'M2'" in lines[0]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"--feed": "a.b"}, "argument --feed: feed must match"),
        ({"--symbol": "EUR\tUSD"}, "argument --symbol: symbol has control"),
        ({"file": "/nonexistent.csv"}, "argument FILE: no such file: /nonexistent.csv"),
        (
            {"--utc-offset": "UTC + 2"},
            "argument --utc-offset: not a number of hours nor a time zone: 'UTC + 2'",
        ),
        ({"--batch": "0"}, "argument --batch: must be 1..5000: 0"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict[str, str], says: str
) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(f"{TICK_HEADER}\n")
    options = {"file": str(path), "--feed": FEED, "--symbol": SYMBOL, **change}
    argv = ["mt5-ticks", options.pop("file")]
    for name, value in options.items():
        argv += [name, value]
    with pytest.raises(SystemExit) as exit_info:
        importer.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tickwire import mt5-ticks: error: ")
    assert says in lines[0]


def test_a_bar_export_given_as_ticks_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TICKWIRE_NATS_URL", "nats://127.0.0.1:1")  # never reached
    path = tmp_path / "bars.csv"
    path.write_text(f"{BAR_HEADER}\n2024.01.02\t00:00:00\t1\t1\t1\t1\t1\t0\t0\n")
    code = importer.main(["mt5-ticks", str(path), "--feed", FEED, "--symbol", SYMBOL])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"tickwire import: {path}: not an MT5 ticks export: no <BID>, <ASK> " + (
        "(found <DATE>, <TIME>, <OPEN>, <HIGH>, <LOW>, <CLOSE>, <TICKVOL>, <VOL>, <SPREAD>)\n"
    )
