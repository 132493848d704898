"""candle-ingest's clock for closing idle symbols: each symbol's own, from the lag of its
ticks behind the time TICKS stored them, and the wall clock only where that would close
nothing early. Driven through ``Ingest.apply`` with deliveries as the server makes them,
taken now; ``S`` is now, as the test starts."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from contracts.codec import Codec
from contracts.messages import TickInput
from workers.candle_ingest.aggregate import Aggregator
from workers.candle_ingest.app import Ingest, Metrics, Settings
from workers.runtime.publish import Outgoing
from workers.runtime.worker import Delivery, Worker

SECOND = 1000
FEED, SYMBOL = "fx", "EURUSD"
CODEC: Codec[TickInput] = Codec(TickInput)


def ingest(**kw: Any) -> tuple[Ingest, list[int], int]:
    settings = Settings(idle_silence_s=60.0, allowed_lateness_s=60.0, **kw)
    worker: Worker[TickInput] = Worker(
        "candle-ingest", stream="TICKS", durable="candle-ingest", codec=CODEC, settings=settings
    )
    it = Ingest(settings, None, None, Metrics(worker))  # type: ignore[arg-type]
    return it, [0], it.started_ms


def take(it: Ingest, seq: list[int], stored_ms: int, *times_ms: int) -> None:
    """Ticks stamped ``times_ms`` in one message, stored by TICKS at ``stored_ms``."""
    ticks = [{"time_ms": t, "bid": 1.1, "ask": 1.1001} for t in times_ms]
    data = msgspec.json.encode(
        {"type": "tick_batch", "v": 1, "feed": FEED, "symbol": SYMBOL, "ticks": ticks}
    )
    deliver(it, seq, stored_ms, data)


def deliver(it: Ingest, seq: list[int], stored_ms: int, data: bytes) -> None:
    seq[0] += 1
    n = seq[0]
    reply = f"$JS.ACK.TICKS.candle-ingest.1.{n}.{n}.{stored_ms * 1_000_000}.0"
    msg = Msg(None, subject=f"ticks.{FEED}.{SYMBOL}", reply=reply, data=data)  # type: ignore[arg-type]
    it.apply(None, Delivery(msg, CODEC.decode(data)))


class Published:
    def __init__(self) -> None:
        self.out: list[Outgoing] = []

    async def publish(self, out: list[Outgoing]) -> None:
        self.out += out


async def test_an_idle_watermark_goes_out_once_until_the_worker_takes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker behind on TICKS has not taken its Watermark yet: asking again every second
    would add one a second to its backlog. Once taken, the next open candle gets its own."""
    it, seq, S = ingest()
    published = Published()
    it.ctx = SimpleNamespace(publisher=published)  # type: ignore[assignment]
    now = [S]
    monkeypatch.setattr(time, "time_ns", lambda: now[0] * 1_000_000)
    take(it, seq, S - 120 * SECOND, S - 120 * SECOND)  # on time, its minute long over
    await it.close_idle()
    now[0] += SECOND
    await it.close_idle()
    [first] = published.out
    assert msgspec.json.decode(first.payload)["time_ms"] == S - 5 * SECOND  # less the grace
    deliver(it, seq, S + SECOND, first.payload)  # taken: the minute closes
    take(it, seq, S + 2 * SECOND, S + 2 * SECOND)
    now[0] = S + 70 * SECOND
    await it.close_idle()
    assert len(published.out) == 2


async def test_an_ea_behind_the_wall_clock_keeps_its_own_even_when_quiet() -> None:
    it, seq, S = ingest()
    take(it, seq, S, S - 30 * SECOND)  # 30 s behind, less than the allowed lateness
    assert it.clock(FEED, SYMBOL, S + 10 * SECOND, caught_up=True) == S - 20 * SECOND
    # quiet for two minutes: still its own clock, so its next tick is not late
    assert it.clock(FEED, SYMBOL, S + 120 * SECOND, caught_up=True) == S + 90 * SECOND


async def test_refused_ticks_do_not_move_the_symbols_clock() -> None:
    it, seq, S = ingest(max_future_skew_s=60.0)
    take(it, seq, S, S - SECOND)
    take(it, seq, S + 100 * SECOND, S + 400 * SECOND)  # 300 s ahead: future_time
    assert it.agg.watermark(FEED, SYMBOL) == S - SECOND
    assert it.clock(FEED, SYMBOL, S + 200 * SECOND, caught_up=True) == S + 199 * SECOND


async def test_a_backfill_that_ended_takes_the_wall_clock_after_the_silence() -> None:
    it, seq, S = ingest()
    day = 86_400 * SECOND
    take(it, seq, S, S - 10 * day, S - 10 * day + SECOND)
    assert it.clock(FEED, SYMBOL, S + 59 * SECOND, caught_up=True) == S - 10 * day + 60 * SECOND
    assert it.clock(FEED, SYMBOL, S + 61 * SECOND, caught_up=True) == S + 61 * SECOND


async def test_a_worker_behind_on_a_backfill_keeps_its_clock() -> None:
    """Ticks of the backfill still wait on TICKS: no tick taken for a minute is no silence
    then, and a wall-clock watermark would make every one of them too late."""
    it, seq, S = ingest()
    day = 86_400 * SECOND
    take(it, seq, S, S - 10 * day)
    assert it.clock(FEED, SYMBOL, S + 600 * SECOND, caught_up=False) == S - 10 * day + 600 * SECOND


async def test_after_a_restart_an_ea_behind_the_wall_clock_keeps_its_own() -> None:
    """The lag is part of the state: a worker started from the snapshot, the EA 30 s behind
    and quiet since, still goes by the EA's clock. Taking the wall clock after the silence,
    as for a symbol whose lag is not known, would close its candles 30 s early, and its
    next ticks would revise them."""
    it, seq, S = ingest()
    take(it, seq, S, S - 30 * SECOND)
    again, _, _ = ingest()
    again.agg = Aggregator.restore(it.agg.config, it.agg.snapshot())
    assert again.heard == {}  # nothing taken since the start
    assert again.clock(FEED, SYMBOL, S + 120 * SECOND, caught_up=True) == S + 90 * SECOND
    assert not again.silent(FEED, SYMBOL, S + 120 * SECOND)


async def test_a_backfill_not_heard_since_the_start_waits_the_silence() -> None:
    it, seq, S = ingest()
    day = 86_400 * SECOND
    take(it, seq, S, S - day)
    again, _, start = ingest()
    again.agg = Aggregator.restore(it.agg.config, it.agg.snapshot())
    assert (
        again.clock(FEED, SYMBOL, start + 59 * SECOND, caught_up=True) == start + 59 * SECOND - day
    )
    assert again.clock(FEED, SYMBOL, start + 61 * SECOND, caught_up=True) == start + 61 * SECOND
    assert (
        again.clock(FEED, SYMBOL, start + 61 * SECOND, caught_up=False) == start + 61 * SECOND - day
    )
