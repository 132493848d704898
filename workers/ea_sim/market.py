"""Simulated MT5 terminals: the ticks several EAs would send, deterministic from a seed.

Pure: no NATS, no clock. ``simulate()`` yields the messages in event-time order, each with
the subject arguments and the ``Nats-Msg-Id`` an EA publishes it with.

The market of one symbol is a geometric Brownian motion on a tick clock: quotes arrive with
exponential gaps whose mean, and the volatility of each step, follow an intraday
seasonality (quiet Asian night, busy London and New York hours). It is shared by every feed
quoting the symbol. Each feed (broker) sees it through its own eyes: a fixed quote offset of
a few points, its own spread scale, and it skips a share of the market's quotes. So two
feeds quote the same symbol close to each other but never identically.

Trading sessions are UTC and weekly: FX and metals are closed from Friday 22:00 to Sunday
22:00, US index CFDs also every day 21:00-22:00, GER40.cash trades 07:00-21:00 on weekdays.
No quote is generated while a symbol is closed. Daylight saving time is not modelled.

Per (feed, symbol) the EA numbers its ticks ``seq`` = 1, 2, 3, ... and, with ``batch`` > 1,
sends them ``batch`` at a time in a ``TickBatch``; a batch also goes out when its first tick
is ``batch_wait_ms`` old in event time, and whatever is left at the end is sent too.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, NamedTuple

import msgspec

from contracts.codec import encode
from contracts.messages import Tick, TickBatch, TickRow

WEEK_MIN: Final = 7 * 1440
_EPOCH_WEEKDAY_MIN: Final = 3 * 1440
"""1970-01-01 was a Thursday: minutes from the Monday before it."""
TICK_FLAG_BID: Final = 2
TICK_FLAG_ASK: Final = 4
"""``MqlTick.flags`` bits: the bid, the ask changed."""


def _weekdays(open_min: int, close_min: int, days: Iterable[int]) -> tuple[tuple[int, int], ...]:
    return tuple((d * 1440 + open_min, d * 1440 + close_min) for d in days)


def _around_the_clock(close_min: int, reopen_min: int) -> tuple[tuple[int, int], ...]:
    """Open Sunday ``reopen_min`` to Friday ``close_min``, closed daily between the two
    (no daily break when they are equal). Minutes of the week from Monday 00:00 UTC."""
    spans = [(0, close_min)]
    for d in range(4):
        spans.append((d * 1440 + reopen_min, (d + 1) * 1440 + close_min))
    spans.append((6 * 1440 + reopen_min, WEEK_MIN))
    # merge touching spans (no daily break)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and merged[-1][1] >= start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return tuple(merged)


FX_SESSION: Final = _around_the_clock(22 * 60, 22 * 60)
"""Sunday 22:00 to Friday 22:00 UTC without a break."""
US_INDEX_SESSION: Final = _around_the_clock(21 * 60, 22 * 60)
"""Sunday 22:00 to Friday 21:00 UTC, closed daily 21:00-22:00."""
EU_INDEX_SESSION: Final = _weekdays(7 * 60, 21 * 60, range(5))
"""Monday to Friday 07:00-21:00 UTC."""


@dataclass(frozen=True)
class SymbolSpec:
    """How a symbol quotes: price level, digits, spread range in points, session, activity."""

    name: str
    price: float
    digits: int
    spread_points: tuple[int, int]
    """Smallest and largest spread of the symbol, in points (10^-digits); smallest >= 1."""
    session: tuple[tuple[int, int], ...]
    """Open spans, minutes of the week from Monday 00:00 UTC, sorted, end exclusive."""
    annual_vol: float
    mean_gap_ms: float
    """Mean time between market quotes in the busiest hours."""

    @property
    def point(self) -> float:
        return 10.0**-self.digits

    def is_open(self, time_ms: int) -> bool:
        minute = _week_minute(time_ms)
        return any(start <= minute < end for start, end in self.session)

    def next_open(self, time_ms: int) -> int:
        """``time_ms`` if open, else the start of the next open span."""
        if self.is_open(time_ms):
            return time_ms
        minute = _week_minute(time_ms)
        week_start_ms = time_ms - (time_ms % 60_000) - minute * 60_000
        for start, _ in self.session:
            if start > minute:
                return week_start_ms + start * 60_000
        return week_start_ms + (WEEK_MIN + self.session[0][0]) * 60_000


def _week_minute(time_ms: int) -> int:
    return (time_ms // 60_000 + _EPOCH_WEEKDAY_MIN) % WEEK_MIN


def _fx(name: str, price: float, digits: int = 5) -> SymbolSpec:
    # 0.1 to 2 pips: a pip is 10 points at 5 (or 3) digits
    return SymbolSpec(name, price, digits, (1, 20), FX_SESSION, 0.08, 700.0)


SYMBOLS: Final[dict[str, SymbolSpec]] = {
    s.name: s
    for s in (
        _fx("EURUSD", 1.08450),
        _fx("GBPUSD", 1.26710),
        _fx("AUDUSD", 0.65830),
        _fx("USDCHF", 0.88120),
        _fx("USDJPY", 151.420, 3),
        SymbolSpec("XAUUSD", 2345.60, 2, (8, 45), FX_SESSION, 0.15, 500.0),
        SymbolSpec("XAGUSD", 27.450, 3, (15, 40), FX_SESSION, 0.25, 900.0),
        SymbolSpec("US500.cash", 5210.25, 2, (40, 120), US_INDEX_SESSION, 0.16, 400.0),
        SymbolSpec("US30.cash", 39120.5, 2, (100, 300), US_INDEX_SESSION, 0.15, 450.0),
        SymbolSpec("US100.cash", 18250.75, 2, (100, 250), US_INDEX_SESSION, 0.2, 400.0),
        SymbolSpec("GER40.cash", 18400.5, 2, (80, 200), EU_INDEX_SESSION, 0.16, 500.0),
    )
}


def activity(time_ms: int) -> float:
    """Intraday seasonality of quote rate and volatility: ~0.35 at night, ~1 at the London
    and New York overlap (a smooth sum of two bumps over the UTC hour)."""
    hour = (time_ms % 86_400_000) / 3_600_000
    london = math.exp(-(((hour - 9.5) / 2.5) ** 2))
    new_york = math.exp(-(((hour - 15.0) / 2.5) ** 2))
    return 0.35 + 0.65 * min(1.0, london + new_york)


def _rng(*key: object) -> random.Random:
    """A generator seeded from ``key`` the same way in every process (no ``hash()``)."""
    digest = hashlib.sha256("|".join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class FeedLook:
    """How one feed quotes one symbol."""

    offset_points: int
    spread_scale: float
    skip: float
    """Share of the market's quotes this feed does not pass on."""


def feed_look(seed: int, feed: str, spec: SymbolSpec) -> FeedLook:
    rnd = _rng("look", seed, feed, spec.name)
    return FeedLook(
        offset_points=rnd.randint(-3, 3),
        spread_scale=rnd.uniform(0.6, 1.4),
        skip=rnd.uniform(0.05, 0.3),
    )


class Quote(NamedTuple):
    time_ms: int
    mid: float
    spread: float
    """Spread in points before a feed's scale, within the symbol's range."""


def market(seed: int, spec: SymbolSpec, start_ms: int) -> Iterator[Quote]:
    """The symbol's market quotes from ``start_ms`` on, endless, only while it is open."""
    rnd = _rng("market", seed, spec.name)
    log_mid = math.log(spec.price * rnd.uniform(0.97, 1.03))
    low, high = spec.spread_points
    year_ms = 365.25 * 86_400_000
    t = start_ms
    while True:
        a = activity(t)
        gap = max(1, round(rnd.expovariate(1.0 / (spec.mean_gap_ms / a))))
        nxt = spec.next_open(t + gap)
        if nxt != t + gap:  # closed meanwhile: the first quote a little after the open
            nxt += rnd.randrange(1, 5_000)
        dt = min(nxt - t, 3_600_000)  # a reopening gaps by an hour's move at most
        t = nxt
        sigma = spec.annual_vol * a * math.sqrt(dt / year_ms)
        log_mid += sigma * rnd.gauss(0.0, 1.0) - 0.5 * sigma * sigma
        # spreads: tight when busy, wide when quiet, now and then a jump
        base = low + (high - low) * (1.0 - a) * rnd.random()
        if rnd.random() < 0.02:
            base = high
        yield Quote(t, math.exp(log_mid), base)


class Outgoing(NamedTuple):
    """One message as the EA publishes it."""

    feed: str
    symbol: str
    payload: bytes
    msg_id: str
    ticks: tuple[TickRow, ...]
    """The ticks it carries (one for a ``Tick``)."""
    sent_ms: int
    """Event time the EA sends it: its last tick's, or for a batch sent by its timer, its
    first tick's plus the wait."""


def tick_msg_id(feed: str, symbol: str, time_ms: int, seq: int) -> str:
    return f"{feed}|{symbol}|{time_ms}|{seq}"


def batch_msg_id(feed: str, symbol: str, first: TickRow, count: int) -> str:
    return f"{feed}|{symbol}|{first.time_ms}|{first.seq}|{count}"


class Batcher:
    """Packs one EA's ticks into messages: a ``Tick`` each, or ``TickBatch`` of up to
    ``batch`` ticks, also sent once its first tick is ``wait_ms`` old."""

    def __init__(self, feed: str, symbol: str, batch: int, wait_ms: int) -> None:
        self.feed, self.symbol, self.batch, self.wait_ms = feed, symbol, batch, wait_ms
        self.rows: list[TickRow] = []

    def add(self, row: TickRow) -> Outgoing | None:
        if self.batch == 1:
            tick = Tick(feed=self.feed, symbol=self.symbol, **msgspec.structs.asdict(row))
            assert row.seq is not None
            msg_id = tick_msg_id(self.feed, self.symbol, row.time_ms, row.seq)
            return Outgoing(self.feed, self.symbol, encode(tick), msg_id, (row,), row.time_ms)
        self.rows.append(row)
        return self.flush(full=True) if len(self.rows) >= self.batch else None

    def due(self, now_ms: int) -> bool:
        return bool(self.rows) and now_ms - self.rows[0].time_ms >= self.wait_ms

    def flush(self, *, full: bool = False) -> Outgoing | None:
        """The batch: ``full`` when its last tick filled it, else sent by its timer."""
        if not self.rows:
            return None
        rows, self.rows = self.rows, []
        payload = encode(TickBatch(feed=self.feed, symbol=self.symbol, ticks=rows))
        msg_id = batch_msg_id(self.feed, self.symbol, rows[0], len(rows))
        sent = rows[-1].time_ms if full else rows[0].time_ms + self.wait_ms
        return Outgoing(self.feed, self.symbol, payload, msg_id, tuple(rows), sent)


def _feed_ticks(
    seed: int, feed: str, spec: SymbolSpec, quotes: Iterator[Quote]
) -> Iterator[tuple[int, str, str, TickRow]]:
    """What one feed's EA sees of the market: (time_ms, feed, symbol, tick)."""
    look = feed_look(seed, feed, spec)
    rnd = _rng("feed", seed, feed, spec.name)
    low, high = spec.spread_points
    digits, point = spec.digits, spec.point
    seq = 0
    bid = ask = 0.0
    for q in quotes:
        if rnd.random() < look.skip:
            continue
        spread = min(high, max(low, round(q.spread * look.spread_scale)))
        new_bid = round(q.mid - spread * point / 2 + look.offset_points * point, digits)
        new_ask = round(new_bid + spread * point, digits)
        flags = (TICK_FLAG_BID if new_bid != bid else 0) | (TICK_FLAG_ASK if new_ask != ask else 0)
        if not flags:  # nothing changed: the terminal raises no tick
            continue
        bid, ask = new_bid, new_ask
        seq += 1
        yield (
            q.time_ms,
            feed,
            spec.name,
            TickRow(time_ms=q.time_ms, bid=bid, ask=ask, seq=seq, flags=flags),
        )


def ticks(
    seed: int, feeds: Iterable[str], symbols: Iterable[str], start_ms: int
) -> Iterator[tuple[int, str, str, TickRow]]:
    """Every feed's ticks of every symbol, endless, merged in event-time order.

    Ties are broken by feed and symbol order as given, so the order is deterministic.
    """
    feeds, specs = list(feeds), [SYMBOLS[s] for s in symbols]
    streams: list[Iterator[tuple[int, str, str, TickRow]]] = []
    for spec in specs:
        copies = itertools.tee(market(seed, spec, start_ms), len(feeds))
        streams.extend(
            _feed_ticks(seed, feed, spec, copy) for feed, copy in zip(feeds, copies, strict=True)
        )
    keyed = (((t, i, f, s, row) for t, f, s, row in stream) for i, stream in enumerate(streams))
    for t, _, f, s, row in heapq.merge(*keyed):
        yield t, f, s, row


def package(
    rows: Iterable[tuple[int, str, str, TickRow]], *, batch: int, wait_ms: int
) -> Iterator[Outgoing]:
    """Ticks in event-time order -> the messages the EAs send, in the order they send them."""
    batchers: dict[tuple[str, str], Batcher] = {}
    waiting: list[Batcher] = []
    for t, feed, symbol, row in rows:
        if waiting:
            due = [b for b in waiting if b.due(t)]
            for b in due:
                out = b.flush()
                if out is not None:
                    yield out
            if due:
                waiting = [b for b in waiting if b.rows]
        b = batchers.get((feed, symbol)) or Batcher(feed, symbol, batch, wait_ms)
        batchers[feed, symbol] = b
        out = b.add(row)
        if out is not None:
            yield out
        elif b.rows and b not in waiting:
            waiting.append(b)
    for b in batchers.values():
        out = b.flush()
        if out is not None:
            yield out


def simulate(
    *,
    seed: int,
    feeds: Iterable[str],
    symbols: Iterable[str],
    start_ms: int,
    end_ms: int | None = None,
    max_ticks: int | None = None,
    batch: int = 1,
    wait_ms: int = 1_000,
) -> Iterator[Outgoing]:
    """The messages of the simulated EAs, until ``end_ms`` (exclusive) or ``max_ticks``;
    with neither, for as long as they are taken."""
    limited = _limit(ticks(seed, feeds, symbols, start_ms), end_ms, max_ticks)
    return package(limited, batch=batch, wait_ms=wait_ms)


def _limit(
    rows: Iterator[tuple[int, str, str, TickRow]], end_ms: int | None, max_ticks: int | None
) -> Iterator[tuple[int, str, str, TickRow]]:
    for n, item in enumerate(rows):
        if (end_ms is not None and item[0] >= end_ms) or (max_ticks is not None and n >= max_ticks):
            return
        yield item
