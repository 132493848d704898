"""The EA simulator: deterministic, numbered, in session, realistic quotes; one-line CLI errors.

Expected properties are written here from the market's rules (UTC session hours, spreads in
pips or points), not read from the simulator's tables.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from contracts.codec import Codec
from contracts.messages import Tick, TickBatch, TickInput
from workers.ea_sim import app, market
from workers.ea_sim.market import Outgoing

FEEDS = ["icm-live", "pepper-demo"]
SYMBOLS = ["EURUSD", "US500.cash", "XAUUSD"]
MONDAY = int(datetime(2025, 3, 3, 6, 0, tzinfo=UTC).timestamp() * 1000)
FRIDAY_EVENING = int(datetime(2025, 3, 7, 18, 0, tzinfo=UTC).timestamp() * 1000)
codec: Codec[TickInput] = Codec(TickInput)

# (smallest, largest) spread in price units, and the decimals a price may have
SPREADS = {
    "EURUSD": (0.1 * 0.0001, 2 * 0.0001),  # 0.1 to 2 pips
    "US500.cash": (0.3, 1.5),
    "XAUUSD": (0.05, 0.6),
}
DIGITS = {"EURUSD": 5, "US500.cash": 2, "XAUUSD": 2}


def run(**kw: object) -> list[Outgoing]:
    args: dict[str, object] = {
        "seed": 7,
        "feeds": FEEDS,
        "symbols": SYMBOLS,
        "start_ms": MONDAY,
        "max_ticks": 6000,
    }
    return list(market.simulate(**(args | kw)))  # type: ignore[arg-type]


def ticks_of(messages: list[Outgoing]) -> dict[tuple[str, str], list[Tick]]:
    """Decoded with the contracts codec, per (feed, symbol), in publish order."""
    out: dict[tuple[str, str], list[Tick]] = defaultdict(list)
    for m in messages:
        decoded = codec.decode(m.payload)
        if isinstance(decoded, TickBatch):
            for r in decoded.ticks:
                out[decoded.feed, decoded.symbol].append(
                    Tick(
                        feed=decoded.feed,
                        symbol=decoded.symbol,
                        time_ms=r.time_ms,
                        bid=r.bid,
                        ask=r.ask,
                        last=r.last,
                        volume=r.volume,
                        seq=r.seq,
                        flags=r.flags,
                    )
                )
        else:
            assert isinstance(decoded, Tick)
            out[decoded.feed, decoded.symbol].append(decoded)
    return out


def as_bytes(messages: list[Outgoing]) -> list[tuple[str, str, bytes, str]]:
    return [(m.feed, m.symbol, m.payload, m.msg_id) for m in messages]


def test_same_seed_gives_identical_messages_and_another_seed_other_ones() -> None:
    first, again, other = run(), run(), run(seed=8)
    assert as_bytes(first) == as_bytes(again)
    assert as_bytes(first) != as_bytes(other)
    assert len({m.msg_id for m in first}) == len(first), "message ids must be unique"
    batched, batched_again = run(batch=50), run(batch=50)
    assert as_bytes(batched) == as_bytes(batched_again)


def test_sequences_run_from_one_without_gaps_per_feed_and_symbol() -> None:
    per = ticks_of(run(batch=20))
    assert set(per) == {(f, s) for f in FEEDS for s in SYMBOLS}
    for pair, ticks in per.items():
        assert [t.seq for t in ticks] == list(range(1, len(ticks) + 1)), pair
        times = [t.time_ms for t in ticks]
        assert times == sorted(times), f"{pair}: event time goes backwards"


def test_message_ids_are_the_eas_natural_keys() -> None:
    for m in run(max_ticks=200):
        t = codec.decode(m.payload)
        assert isinstance(t, Tick)
        assert m.msg_id == f"{t.feed}|{t.symbol}|{t.time_ms}|{t.seq}"
    for m in run(max_ticks=200, batch=10):
        b = codec.decode(m.payload)
        assert isinstance(b, TickBatch)
        first = b.ticks[0]
        assert m.msg_id == f"{b.feed}|{b.symbol}|{first.time_ms}|{first.seq}|{len(b.ticks)}"


def _fx_closed(ms: int) -> bool:
    """Friday 22:00 to Sunday 22:00 UTC."""
    t = datetime.fromtimestamp(ms / 1000, UTC)
    wd, h = t.weekday(), t.hour
    return (wd == 4 and h >= 22) or wd == 5 or (wd == 6 and h < 22)


def _us_index_closed(ms: int) -> bool:
    """The FX weekend from 21:00 Friday, and every day 21:00-22:00 UTC."""
    t = datetime.fromtimestamp(ms / 1000, UTC)
    return _fx_closed(ms) or t.hour == 21


def test_no_ticks_while_the_market_is_closed_and_ticks_on_both_sides_of_the_weekend() -> None:
    sunday_night = int(datetime(2025, 3, 9, 22, 0, tzinfo=UTC).timestamp() * 1000)
    end = sunday_night + 3 * 3_600_000
    per = ticks_of(run(start_ms=FRIDAY_EVENING, max_ticks=None, end_ms=end))
    for (feed, symbol), ticks in per.items():
        closed = _us_index_closed if symbol == "US500.cash" else _fx_closed
        assert not [t.time_ms for t in ticks if closed(t.time_ms)], (feed, symbol)
        assert any(t.time_ms < sunday_night for t in ticks), (feed, symbol)
        assert any(t.time_ms >= sunday_night for t in ticks), (feed, symbol)


def test_an_eu_index_trades_on_weekdays_in_european_hours_only() -> None:
    friday = MONDAY + 4 * 86_400_000 - 6 * 3_600_000  # Friday 00:00 to Monday 12:00
    end = friday + 3 * 86_400_000 + 12 * 3_600_000
    per = ticks_of(
        run(symbols=["GER40.cash"], start_ms=friday, max_ticks=None, end_ms=end, feeds=["f"])
    )
    hours = {datetime.fromtimestamp(t.time_ms / 1000, UTC).hour for t in per["f", "GER40.cash"]}
    days = {datetime.fromtimestamp(t.time_ms / 1000, UTC).weekday() for t in per["f", "GER40.cash"]}
    assert hours <= set(range(7, 21))
    assert days == {4, 0}


def test_bid_below_ask_and_spreads_and_digits_realistic() -> None:
    per = ticks_of(run(max_ticks=20_000))
    for (feed, symbol), ticks in per.items():
        low, high = SPREADS[symbol]
        for t in ticks:
            assert t.bid < t.ask, (feed, t)
            assert low - 1e-9 <= t.ask - t.bid <= high + 1e-9, (feed, symbol, t)
            for price in (t.bid, t.ask):
                assert round(price, DIGITS[symbol]) == price
            assert t.flags in (2, 4, 6)


def test_feeds_quote_the_same_symbol_close_but_differently() -> None:
    per = ticks_of(run(max_ticks=6000))
    for symbol in SYMBOLS:
        a, b = per[FEEDS[0], symbol], per[FEEDS[1], symbol]
        assert [(t.bid, t.ask) for t in a] != [(t.bid, t.ask) for t in b]
        mean_a = sum(t.bid for t in a) / len(a)
        mean_b = sum(t.bid for t in b) / len(b)
        assert abs(mean_a - mean_b) / mean_a < 0.01, symbol


def test_batched_and_single_messages_carry_the_same_ticks() -> None:
    single = run()
    batched = run(batch=25, wait_ms=600_000)
    assert all(len(m.ticks) == 1 for m in single)
    assert max(len(m.ticks) for m in batched) == 25
    assert len(batched) < len(single)

    def rows(per: dict[tuple[str, str], list[Tick]]) -> dict[tuple[str, str], list[tuple]]:
        return {k: [(t.time_ms, t.bid, t.ask, t.seq, t.flags) for t in v] for k, v in per.items()}

    assert rows(ticks_of(batched)) == rows(ticks_of(single))


def test_a_batch_goes_out_when_its_first_tick_has_waited_long_enough() -> None:
    out = run(batch=5, wait_ms=2_000)
    for m in out:
        assert m.ticks[-1].time_ms - m.ticks[0].time_ms < 2_000
        # sent when its last tick filled it, else by its timer: never before either
        want = m.ticks[-1].time_ms if len(m.ticks) == 5 else m.ticks[0].time_ms + 2_000
        assert m.sent_ms == want
    assert {len(m.ticks) == 5 for m in out} == {True, False}


def test_without_an_end_the_market_goes_on() -> None:
    args = app.parse_args(["--feeds", "icm-live", "--symbols", "EURUSD,XAUUSD"])
    start = int(datetime(2025, 3, 3, 10, 0, tzinfo=UTC).timestamp() * 1000)
    got = list(itertools.islice(app.simulated(args, start), 5_000))
    assert len(got) == 5_000
    assert got[-1].ticks[-1].time_ms > start


def test_event_time_is_paced_from_the_start_not_from_the_first_tick() -> None:
    """Started at speed 1 on a Saturday, the first tick (Sunday night's open) waits for its
    time to come rather than go out at once, 34 hours ahead of the clock."""
    saturday = int(datetime(2025, 3, 8, 12, 0, tzinfo=UTC).timestamp() * 1000)
    args = app.parse_args(["--feeds", "icm-live", "--symbols", "EURUSD", "--ticks", "2"])
    first = next(iter(app.simulated(args, saturday)))
    ahead_s = (first.sent_ms - saturday) / 1000
    assert ahead_s > 24 * 3600
    assert app.Pacer(1.0, None, saturday).delay(first) == pytest.approx(ahead_s, abs=5)
    assert app.Pacer(1.0, None).delay(first) == 0.0  # a replayed export: from its first tick


def test_csv_replay_numbers_ticks_and_carries_blank_prices(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(
        "<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>\n"
        "2025.03.03\t10:00:00.100\t1.08450\t1.08460\t\t\t6\n"
        "2025.03.03\t10:00:00.250\t1.08452\t\t\t\t2\n"
        "2025.03.03\tbroken\t1.08452\t\t\t\t2\n"
        "2025.03.03\t10:00:01.000\t\t1.08470\t\t\t4\n"
    )
    counts = app.Counts()
    items = app.mt5_csv.iter_ticks(path, feed="f", symbol="EURUSD", server_time=7_200_000)
    out = list(app.replayed(items, "f", "EURUSD", counts, batch=1, wait_ms=1000))
    got = [codec.decode(m.payload) for m in out]
    base = int(datetime(2025, 3, 3, 8, 0, tzinfo=UTC).timestamp() * 1000)
    assert [(t.time_ms, t.bid, t.ask, t.seq) for t in got if isinstance(t, Tick)] == [
        (base + 100, 1.08450, 1.08460, 1),
        (base + 250, 1.08452, 1.08460, 2),
        (base + 1000, 1.08452, 1.08470, 3),
    ]
    assert (counts.lines, counts.malformed) == (4, 1)


def ea_sim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "ea-sim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "",
            "TICKWIRE_NATS_URL": "nats://127.0.0.1:9",
            "TICKWIRE_NATS_CONNECT_TIMEOUT_S": "0.5",
        },
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--symbols", "EUR/USD"), "unknown symbol 'EUR/USD'"),
        (("--symbols", "EURUSD,EURUSD"), "a symbol is named twice"),
        (("--feeds", "icm live"), "feed must match"),
        (("--batch", "0"), "--batch: must be 1..5000: 0"),
        (("--rate", "-5"), "--rate: must be a finite number > 0"),
        (("--rate", "0"), "--rate: must be a finite number > 0"),
        (("--speed", "fast"), "--speed: not a number"),
        (("--speed", "2", "--rate", "10"), "not allowed with argument"),
        (("--start", "yesterday"), "not an ISO time"),
        (("--duration", "1 week"), "not a duration"),
        (("--csv", "/no/such.csv", "--feed", "f", "--symbol", "S"), "no such file"),
        (("--feed", "f", "--symbol", "S"), "go with --csv"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: tuple[str, ...], says: str) -> None:
    proc = ea_sim(*args)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert says in lines[0]
    assert lines[0].startswith("tickwire ea-sim")


def test_csv_without_feed_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("<DATE>\t<TIME>\t<BID>\t<ASK>\n")
    proc = ea_sim("--csv", str(path), "--symbol", "EURUSD")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tickwire ea-sim: error: --csv needs --feed and --symbol"


def test_unreachable_nats_is_one_line_and_exit_1() -> None:
    proc = ea_sim("--ticks", "5", "--start", "2025-03-03T10:00", "--speed", "max")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("tickwire ea-sim: cannot connect")


@pytest.mark.parametrize(("speed", "warned"), [("0.5", False), ("1", False), ("3", True)])
def test_only_a_run_from_now_faster_than_the_clock_is_warned_of(speed: str, warned: bool) -> None:
    proc = ea_sim("--ticks", "1", "--speed", speed)
    assert proc.returncode == 1
    assert ("runs faster than the clock" in proc.stderr) is warned
    assert "runs faster" not in ea_sim("--ticks", "1", "--rate", "5").stderr
