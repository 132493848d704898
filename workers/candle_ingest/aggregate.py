"""Ticks and backfill bars -> candles, in event time. Pure: no I/O, no clock.

Per (feed, symbol) the aggregator keeps an event-time watermark ``W``, the largest tick time
it accepted. A candle opening at ``o`` and ending at ``e`` (``o + L`` for timeframe length
``L``, but see ``server_tz`` below) closes once ``W >= e + close_delay_ms`` and is then
emitted with revision 0. It is kept while ``e > W - allowed_lateness_ms``: a late tick
that falls into it updates it and emits it again with the next revision. A tick older than ``W - allowed_lateness_ms`` is refused as
``too_late``. Open candles are never emitted; a period without ticks has no candle.

Buckets are aligned on the broker's day start: ``o = (t - day_start) // L * L + day_start``.
Every timeframe length divides the next one, so the buckets of all timeframes nest. With a
server time zone instead (``server_tz``), H4 and D1 follow the server's clock over its
changes (``contracts.servertime.Periods``): those buckets still nest, and the one over a
change is an hour shorter or longer.

How it stays fast: only the smallest configured timeframe is updated per tick, in an
*accumulator* held in flat fields of the symbol's book (the candle of the bucket that holds
``W``). When the watermark leaves that bucket the accumulator is *folded*: it becomes the
smallest timeframe's candle and is merged into the candles of every larger timeframe. A tick
outside the accumulator's bucket (late, or into a period that already has a candle) is
applied to every timeframe directly. So each tick lands in each timeframe exactly once.
In-order ticks cost two comparisons and a handful of attribute updates; one integer,
``next_event``, says when anything (a close, an eviction, a fold) is due.

Bars and ticks of one (feed, symbol) meet at a handover, so that no candle is built twice
(once from each, under the same key and revision): bars own the time before it, ticks the
time after, and a larger candle whose period holds it takes both.

- The ticks' part starts at the smallest timeframe's period of the earliest tick taken; a
  bar ending after that is refused as ``covered_by_ticks`` (``covered``).
- The bars' part ends at the end of the latest bar taken (of any timeframe), rounded up to
  the smallest timeframe's period; a tick before that is refused as ``covered_by_bars``.
- Ticks after bars: every candle the bars left open (their periods hold the bars'
  watermark) moves to the ticks' book, which closes it (at once if it ended before the
  first tick).
- A bar's share of a larger candle whose period reaches the ticks' part, or holds the
  point where the ticks' book took the bars' candles over, joins the ticks' candle: an open
  one silently, a closed one still kept for revisions as its next revision; one already
  past the allowed lateness keeps what it had, and the share is counted in
  ``late_shares``. A late tick that starts the ticks' part earlier takes over the bars'
  open candles that now reach it.
- The bars' book closes its candles by its watermark without the close delay: bars are
  aggregated in time order only, so a candle ending at the watermark gets no more.
- Bars of a second timeframe: the bars' book builds every larger timeframe from its first
  bar on, so a bar of such a timeframe ending after that is refused as ``covered_by_bars``;
  one before it, or of a smaller timeframe, gives its own candle only.

Emission order for one call: revisions (timeframes M1..D1), then closes (timeframes M1..D1,
each by open time). The same sequence of calls yields equal candles, and ``snapshot`` /
``restore`` in between changes nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Final, NamedTuple, Protocol

import msgspec

from contracts.messages import Bar, Candle, Timeframe
from contracts.servertime import Periods, parse_zone
from workers.candle_ingest.validate import MAX_VALUE, check_tick

DAY_MS: Final = 86_400_000
MAX_MISSING_SEQS: Final = 10_000
"""Per symbol, at most this many missing EA sequence numbers are remembered (the newest)."""

SNAPSHOT_FORMAT: Final = 2

ACCEPTED: Final = "accepted"
DUPLICATE: Final = "duplicate"
TOO_LATE: Final = "too_late"
NO_LAST_PRICE: Final = "no_last_price"
COVERED_BY_BARS: Final = "covered_by_bars"
COVERED_BY_TICKS: Final = "covered_by_ticks"

_NEVER: Final = 1 << 62
"""A time no watermark reaches: ``next_event`` when nothing is pending."""
_NO_SEQ: Final = -(1 << 62)
"""``max_seq`` of a symbol that never sent a sequence number."""


class PriceSource(enum.StrEnum):
    BID = "bid"
    MID = "mid"
    LAST = "last"


@dataclass(frozen=True)
class AggregatorConfig:
    timeframes: tuple[Timeframe, ...] = tuple(Timeframe)
    price: PriceSource = PriceSource.BID
    day_start_ms: int = 0
    """UTC time of day at which the broker's day starts (79_200_000 for a UTC+2 server);
    normalised into [0, 86_400_000)."""
    allowed_lateness_ms: int = 60_000
    close_delay_ms: int = 0
    server_tz: str | None = None
    """The time zone the broker's server clock follows (``America/New_York+7``): H4 and D1
    then open at its midnight and every 4 hours of it, all year; ``day_start_ms`` is 0."""

    def __post_init__(self) -> None:
        tfs = tuple(sorted({Timeframe(tf) for tf in self.timeframes}, key=lambda tf: tf.ms))
        if not tfs:
            raise ValueError("at least one timeframe is needed")
        if self.allowed_lateness_ms < 0 or self.close_delay_ms < 0:
            raise ValueError("allowed_lateness_ms and close_delay_ms must be >= 0")
        object.__setattr__(self, "timeframes", tfs)
        object.__setattr__(self, "price", PriceSource(self.price))
        object.__setattr__(self, "day_start_ms", self.day_start_ms % DAY_MS)
        if self.server_tz is not None:
            if self.day_start_ms:
                raise ValueError("a day start is either a fixed time of day or a zone, not both")
            zone = parse_zone(self.server_tz)
            if not zone.regular():
                raise ValueError(
                    f"{zone}: the server clock's offsets must be whole hours and change by "
                    "one hour on a whole hour"
                )
            object.__setattr__(self, "server_tz", zone.name)

    def periods(self) -> Periods:
        zone = None if self.server_tz is None else parse_zone(self.server_tz)
        return Periods(self.day_start_ms, zone)


class TickResult(NamedTuple):
    outcome: str
    """``accepted``, ``duplicate``, ``too_late``, ``covered_by_bars`` or ``no_last_price``."""
    candles: list[Candle]
    """Candles to publish because of this tick (revisions, then closes)."""
    gap: int
    """EA sequence numbers this tick revealed as missing."""


class RowsResult(NamedTuple):
    """What ``add_rows`` did with a run of ticks; gaps as in ``TickResult``."""

    accepted: int
    duplicate: int
    gap: int
    refused: list[tuple[int, str]]
    """(row index, reason): ``check_tick``'s reasons, ``too_late``, ``covered_by_bars``,
    ``no_last_price``."""
    watermark: int | None
    """The symbol's watermark afterwards (``watermark``); None while it has no tick book."""


class TickLike(Protocol):
    """A ``Tick`` or a ``TickRow``."""

    @property
    def time_ms(self) -> int: ...
    @property
    def bid(self) -> float: ...
    @property
    def ask(self) -> float: ...
    @property
    def last(self) -> float | None: ...
    @property
    def volume(self) -> float | None: ...
    @property
    def seq(self) -> int | None: ...


class SnapshotMismatch(ValueError):
    """The snapshot was taken with another configuration or format: rebuild from the stream."""


# --- state: mutable msgspec structs, array-like so snapshots are compact ----------------


class _Cand(msgspec.Struct, array_like=True, gc=False):
    """A candle being built (open) or kept for revisions (closed)."""

    open_ms: int
    first_ms: int
    last_ms: int
    open: float
    high: float
    low: float
    close: float
    n: int
    """tick volume"""
    k: int
    """spread samples: ticks, or bars for candles built from bars"""
    volume: float
    spread_sum: float
    spread_max: float
    revision: int = 0


class _Series(msgspec.Struct, array_like=True):
    """One timeframe of one book: candles by open time."""

    open: dict[int, _Cand] = {}
    kept: dict[int, _Cand] = {}


class _Book(msgspec.Struct, array_like=True):
    feed: str
    symbol: str
    wm: int
    next_event: int
    series: list[_Series]
    """One per configured timeframe, smallest first."""


class _TickBook(_Book):
    # the accumulator: the smallest timeframe's candle of the bucket [a_open, a_close)
    # holding W, not yet folded anywhere; a_open == a_close == 0 when there is none
    a_open: int
    a_close: int
    a_first: int
    a_last: int
    a_op: float
    a_hi: float
    a_lo: float
    a_cl: float
    a_n: int
    a_vol: float
    a_ssum: float
    a_smax: float
    max_seq: int
    missing: dict[int, int]
    """missing seq -> watermark when it went missing"""
    low_seq: int = _NO_SEQ
    """The lowest seq seen since the EA's numbers (re)started: one below it is new."""
    start_ms: int = 0
    """Open of the smallest timeframe's period of the earliest tick taken: the ticks' part
    of the symbol's time starts here (``Aggregator`` docstring, bars and ticks)."""
    taken_ms: int = _NEVER
    """The bars' watermark when this book took over the candles they had open (the bars
    came first): a later bar's share of a period holding it joins the ticks' candle."""
    lag_ms: int | None = None
    """How far the symbol's ticks ran behind their arrival when ticks were last taken
    (``note_lag``): part of the state, so that a restart knows it too."""


class _BarBook(_Book):
    src_ms: int
    """Length of the timeframe whose bars this book aggregates (the first one it saw)."""
    end_ms: int = 0
    """The latest end of any bar taken, aggregated or not: the bars' part reaches it."""
    first_ms: int = 0
    """Open of the first bar: this book's timeframes larger than its bars' are its own from
    here on."""


class _Snapshot(msgspec.Struct, array_like=True):
    format: int
    config: tuple[tuple[str, ...], str, int | str, int, int]
    """Timeframes, price, day start (ms, or the server time zone), lateness, close delay."""
    last_stream_seq: int
    ticks: list[_TickBook]
    bars: list[_BarBook]


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(_Snapshot)

_R_DUPLICATE: Final = TickResult(DUPLICATE, [], 0)
_R_TOO_LATE: Final = TickResult(TOO_LATE, [], 0)
_R_NO_LAST: Final = TickResult(NO_LAST_PRICE, [], 0)
_R_COVERED: Final = TickResult(COVERED_BY_BARS, [], 0)


def _put(c: _Cand, t: int, p: float, s: float, v: float | None) -> None:
    if t >= c.last_ms:
        c.last_ms = t
        c.close = p
    elif t < c.first_ms:
        c.first_ms = t
        c.open = p
    if p > c.high:
        c.high = p
    elif p < c.low:
        c.low = p
    c.n += 1
    c.k += 1
    if v is not None:
        c.volume += v
    c.spread_sum += s
    if s > c.spread_max:
        c.spread_max = s


def _merge(into: _Cand, c: _Cand) -> None:
    if c.first_ms < into.first_ms:
        into.first_ms = c.first_ms
        into.open = c.open
    if c.last_ms >= into.last_ms:
        into.last_ms = c.last_ms
        into.close = c.close
    if c.high > into.high:
        into.high = c.high
    if c.low < into.low:
        into.low = c.low
    into.n += c.n
    into.k += c.k
    into.volume += c.volume
    into.spread_sum += c.spread_sum
    if c.spread_max > into.spread_max:
        into.spread_max = c.spread_max


def _copy_at(c: _Cand, open_ms: int) -> _Cand:
    return _Cand(
        open_ms, c.first_ms, c.last_ms, c.open, c.high, c.low, c.close,
        c.n, c.k, c.volume, c.spread_sum, c.spread_max,
    )  # fmt: skip


class Aggregator:
    """Candles of every configured timeframe for any number of (feed, symbol)."""

    __slots__ = (
        "_bars",
        "_day_start",
        "_delay",
        "_index",
        "_kind",
        "_late",
        "_lens",
        "_tfs",
        "_ticks",
        "_zoned",
        "config",
        "filled",
        "last_stream_seq",
        "late_shares",
        "periods",
    )

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.last_stream_seq: int = 0
        """Set by the caller (the last stream sequence applied), kept in snapshots."""
        self.filled = 0
        """Missing sequence numbers that came after all (each was counted in a gap when it
        went missing), until the caller takes the count and sets it back to 0."""
        self.late_shares = 0
        """Shares of bars in larger candles the ticks had closed past the allowed lateness
        (they keep what they had), until the caller takes the count and sets it back to 0."""
        self._tfs = config.timeframes
        self._lens = tuple(tf.ms for tf in self._tfs)
        self._index = {tf: i for i, tf in enumerate(self._tfs)}
        self._day_start = config.day_start_ms
        self.periods = config.periods()
        """Where each timeframe's candles open and close."""
        self._zoned = tuple(self.periods.zoned(tf) for tf in self._tfs)
        """Per timeframe: its periods follow the server's clock (the hot loops' fixed
        arithmetic is for the others)."""
        self._late = config.allowed_lateness_ms
        self._delay = config.close_delay_ms
        self._kind = (PriceSource.BID, PriceSource.MID, PriceSource.LAST).index(config.price)
        self._ticks: dict[str, dict[str, _TickBook]] = {}
        self._bars: dict[str, dict[str, _BarBook]] = {}

    # --- ticks --------------------------------------------------------------------------

    def add(
        self,
        feed: str,
        symbol: str,
        time_ms: int,
        bid: float,
        ask: float,
        last: float | None = None,
        volume: float | None = None,
        seq: int | None = None,
    ) -> TickResult:
        """Apply one validated tick. The result's candle list must not be mutated."""
        kind = self._kind
        if kind == 0:
            price = bid
        elif kind == 1:
            price = (bid + ask) / 2
        elif not last:  # MT5 gives 0 for a symbol without deals: no last price
            return _R_NO_LAST
        else:
            price = last
        syms = self._ticks.get(feed)
        b = None if syms is None else syms.get(symbol)
        if b is None:
            return self._new_book(feed, symbol, time_ms, price, ask - bid, volume, seq)
        if time_ms < b.wm - self._late:
            return _R_TOO_LATE
        if time_ms < b.start_ms:
            bb = self._bar_book(feed, symbol)
            if bb is not None and time_ms < self._bars_end(bb):
                return _R_COVERED
        gap = 0
        if seq is not None:
            if seq == b.max_seq + 1:
                b.max_seq = seq
            else:
                gap = self._check_seq(b, seq, time_ms)
                if gap < 0:
                    return _R_DUPLICATE
        if b.a_open <= time_ms < b.a_close:
            # hot path: the tick belongs to the accumulator
            spread = ask - bid
            if time_ms >= b.a_last:
                b.a_last = time_ms
                b.a_cl = price
            elif time_ms < b.a_first:
                b.a_first = time_ms
                b.a_op = price
            if price > b.a_hi:
                b.a_hi = price
            elif price < b.a_lo:
                b.a_lo = price
            b.a_n += 1
            if volume is not None:
                b.a_vol += volume
            b.a_ssum += spread
            if spread > b.a_smax:
                b.a_smax = spread
            if time_ms > b.wm:
                b.wm = time_ms
                if time_ms >= b.next_event:
                    out: list[Candle] = []
                    self._housekeep(b, out)
                    return TickResult(ACCEPTED, out, gap)
            return TickResult(ACCEPTED, [], gap)
        return TickResult(ACCEPTED, self._add_slow(b, time_ms, price, ask - bid, volume), gap)

    def add_rows(
        self,
        feed: str,
        symbol: str,
        rows: Sequence[TickLike],
        *,
        now_ms: int,
        max_future_skew_ms: int,
        out: list[Candle],
        out_times: list[int],
    ) -> RowsResult:
        """Validate (``check_tick``) and apply ticks of one symbol, in order.

        Exactly what ``check_tick`` then ``add`` per row would do; candles go to ``out``
        and the time of the tick that emitted each to ``out_times``. In-order ticks inside
        the accumulator, the common case, are folded into local variables and written back
        once per run instead of once per tick.
        """
        accepted = duplicate = gap = 0
        refused: list[tuple[int, str]] = []
        kind = self._kind
        limit = now_ms + max_future_skew_ms
        late = self._late
        top = MAX_VALUE
        n = len(rows)
        i = 0
        syms = self._ticks.get(feed)
        b = None if syms is None else syms.get(symbol)
        while i < n:
            if b is not None and b.a_close > b.a_open:
                # the fast run: stops before the first row that needs anything else
                a_open, a_close = b.a_open, b.a_close
                a_first, a_last = b.a_first, b.a_last
                op, hi, lo, cl = b.a_op, b.a_hi, b.a_lo, b.a_cl
                cnt, vol, ssum, smax = b.a_n, b.a_vol, b.a_ssum, b.a_smax
                wm, max_seq = b.wm, b.max_seq
                # nothing falls due before this: the accumulator's end, a close, a fold
                stop = a_close if a_close < b.next_event else b.next_event
                j = i
                while j < n:
                    t = rows[j]
                    tm, bid, ask = t.time_ms, t.bid, t.ask
                    last, volume, seq = t.last, t.volume, t.seq
                    # every check first: a row that breaks off has changed nothing
                    if not 0.0 < bid <= ask < top or tm > limit:
                        break
                    if last and not 0.0 < last < top:  # 0: none (MT5's word for it)
                        break
                    if volume is not None and not 0.0 <= volume < top:
                        break
                    if seq is not None and seq != max_seq + 1:
                        break
                    if kind == 0:
                        price = bid
                    elif kind == 1:
                        price = (bid + ask) / 2
                    elif not last:
                        break
                    else:
                        price = last
                    if tm > wm:  # in order: the accumulator holds the watermark
                        if tm >= stop:
                            break
                        wm = a_last = tm
                        cl = price
                    elif tm < a_open or tm < wm - late:
                        break
                    elif tm >= a_last:
                        a_last = tm
                        cl = price
                    elif tm < a_first:
                        a_first = tm
                        op = price
                    if seq is not None:
                        max_seq = seq
                    if price > hi:
                        hi = price
                    elif price < lo:
                        lo = price
                    if volume is not None:
                        vol += volume
                    spread = ask - bid
                    ssum += spread
                    if spread > smax:
                        smax = spread
                    j += 1
                if j > i:
                    b.a_first, b.a_last = a_first, a_last
                    b.a_op, b.a_hi, b.a_lo, b.a_cl = op, hi, lo, cl
                    b.a_n, b.a_vol, b.a_ssum, b.a_smax = cnt + j - i, vol, ssum, smax
                    b.wm, b.max_seq = wm, max_seq
                    accepted += j - i
                    i = j
                    if i == n:
                        break
            # one row the general way
            t = rows[i]
            tm = t.time_ms
            reason = check_tick(
                tm,
                t.bid,
                t.ask,
                t.last,
                t.volume,
                now_ms=now_ms,
                max_future_skew_ms=max_future_skew_ms,
            )
            if reason is None:
                r = self.add(feed, symbol, tm, t.bid, t.ask, t.last, t.volume, t.seq)
                gap += r.gap
                if r.outcome is ACCEPTED:
                    accepted += 1
                    if r.candles:
                        out.extend(r.candles)
                        out_times.extend([tm] * len(r.candles))
                elif r.outcome is DUPLICATE:
                    duplicate += 1
                else:
                    refused.append((i, r.outcome))
                if b is None:
                    syms = self._ticks.get(feed)
                    b = None if syms is None else syms.get(symbol)
            else:
                refused.append((i, reason))
            i += 1
        return RowsResult(accepted, duplicate, gap, refused, None if b is None else b.wm)

    def advance(self, feed: str, symbol: str, watermark_ms: int) -> list[Candle]:
        """Move the watermark of an idle symbol; returns what a tick at that time would close.

        Unknown symbols are ignored (they have nothing to close).
        """
        b = self._tick_book(feed, symbol)
        return [] if b is None else self._advance(b, watermark_ms)

    def watermark(self, feed: str, symbol: str) -> int | None:
        b = self._tick_book(feed, symbol)
        return None if b is None else b.wm

    def note_lag(self, feed: str, symbol: str, lag_ms: int) -> None:
        """Ticks of (feed, symbol) were taken, the latest ``lag_ms`` behind their arrival
        (the time TICKS stored them less the watermark): what its idle clock goes by."""
        b = self._tick_book(feed, symbol)
        if b is not None:
            b.lag_ms = lag_ms

    def lag_ms(self, feed: str, symbol: str) -> int | None:
        """The lag ``note_lag`` last noted for (feed, symbol); None if none was."""
        b = self._tick_book(feed, symbol)
        return None if b is None else b.lag_ms

    def next_close_ms(self, feed: str, symbol: str) -> int | None:
        """The watermark at which the earliest open candle of (feed, symbol) closes (its
        close time plus the close delay); None if it has no open candle."""
        b = self._tick_book(feed, symbol)
        if b is None:
            return None
        ends = [self._end(i, o) for i, ser in enumerate(b.series) for o in ser.open]
        if b.a_close > b.a_open:
            ends.append(b.a_close)
        return min(ends) + self._delay if ends else None

    def symbols(self) -> list[tuple[str, str]]:
        """(feed, symbol) of every book built from ticks, sorted."""
        return sorted((feed, symbol) for feed, syms in self._ticks.items() for symbol in syms)

    def open_candles(self) -> int:
        """Open candles across all timeframes and symbols, ticks and bars."""
        count = 0
        for bars in self._bars.values():
            for bb in bars.values():
                count += sum(len(ser.open) for ser in bb.series)
        for ticks in self._ticks.values():
            for b in ticks.values():
                count += sum(len(ser.open) for ser in b.series)
                if b.a_close > b.a_open:  # the accumulator, and larger candles only it opened
                    count += 1
                    for i in range(1, len(self._tfs)):
                        if self._open(i, b.a_open) not in b.series[i].open:
                            count += 1
        return count

    # --- bars ---------------------------------------------------------------------------

    def add_bar(self, bar: Bar) -> list[Candle]:
        """A backfill bar: its own candle now, and its share of every larger timeframe.

        The own candle is returned only if the bar's timeframe is configured. A book per
        (feed, symbol), apart from the ticks' one, aggregates bars of one timeframe (the
        first it sees) into larger timeframes that are multiples of it, in time order
        only: a bar starting before the bar watermark (the end of the latest bar aggregated,
        or what ``advance_bars`` set), a repeated bar, or a bar of another timeframe yields
        its own candle and nothing else. Larger candles close by that watermark; a share of
        a larger candle whose period reaches the ticks' part of the symbol joins the ticks'
        candle instead (module docstring). Raises ValueError for a bar not aligned on the
        day start, or one ``covered`` refuses.
        """
        tf = Timeframe(bar.tf)
        lb = tf.ms
        o = bar.open_time_ms
        periods = self.periods
        if not periods.aligned(tf, o):
            raise ValueError(f"{tf} bar at {o} is not aligned on the day start")
        reason = self.covered(bar)
        if reason is not None:
            raise ValueError(f"{tf} bar at {o} of {bar.feed} {bar.symbol}: {reason}")
        end = periods.end(tf, o)
        tb = self._tick_book(bar.feed, bar.symbol)
        out: list[Candle] = []
        if tf in self._index:
            out.append(
                Candle(
                    feed=bar.feed,
                    symbol=bar.symbol,
                    tf=tf,
                    open_time_ms=o,
                    close_time_ms=end,
                    open=bar.open,
                    high=bar.high,
                    low=bar.low,
                    close=bar.close,
                    tick_volume=bar.tick_volume,
                    real_volume=bar.real_volume,
                    spread_mean=bar.spread,
                    spread_max=bar.spread,
                    first_tick_ms=o,
                    last_tick_ms=end - 1,
                    revision=0,
                    source="bars",
                )
            )
        syms = self._bars.setdefault(bar.feed, {})
        b = syms.get(bar.symbol)
        if b is None:
            series = [_Series() for _ in self._tfs]
            b = _BarBook(bar.feed, bar.symbol, o, _NEVER, series, lb, first_ms=o)
            syms[bar.symbol] = b
        b.end_ms = max(b.end_ms, end)
        if b.src_ms != lb or o < b.wm:
            return out
        c = _Cand(
            o, o, end - 1, bar.open, bar.high, bar.low, bar.close,
            bar.tick_volume, 1, float(bar.real_volume), bar.spread, bar.spread,
        )  # fmt: skip
        joined = False
        for i, (L, ser) in enumerate(zip(self._lens, b.series, strict=True)):
            if lb < L and L % lb == 0:
                ho = self._open(i, o)
                he = self._end(i, ho)
                if tb is not None and (he > tb.start_ms or ho < tb.taken_ms < he):
                    self._join(tb, i, _copy_at(c, ho), out)
                    joined = True
                    continue
                h = ser.open.get(ho)
                if h is None:
                    ser.open[ho] = _copy_at(c, ho)
                else:
                    _merge(h, c)
        b.wm = max(b.wm, end)
        self._housekeep(b, out)
        if tb is not None and joined:
            self._housekeep(tb, out)
        return out

    def covered(self, bar: Bar) -> str | None:
        """Why ``add_bar`` refuses an aligned bar, or None: its period ends after the ticks
        of its symbol start (``covered_by_ticks``), or its timeframe is one the symbol's
        bars of a smaller timeframe build and its period ends after their first one
        (``covered_by_bars``): either way that candle is built by the others."""
        tf = Timeframe(bar.tf)
        end = self.periods.end(tf, bar.open_time_ms)
        tb = self._tick_book(bar.feed, bar.symbol)
        if tb is not None and end > tb.start_ms:
            return COVERED_BY_TICKS
        bb = self._bar_book(bar.feed, bar.symbol)
        if bb is not None and tf.ms > bb.src_ms and tf in self._index and end > bb.first_ms:
            return COVERED_BY_BARS
        return None

    def _tick_book(self, feed: str, symbol: str) -> _TickBook | None:
        ticks = self._ticks.get(feed)
        return None if ticks is None else ticks.get(symbol)

    def advance_bars(self, feed: str, symbol: str, watermark_ms: int) -> list[Candle]:
        """``advance`` for the book built from bars (e.g. at the end of a backfill)."""
        b = self._bar_book(feed, symbol)
        return [] if b is None else self._advance(b, watermark_ms)

    # --- snapshots ----------------------------------------------------------------------

    def _fingerprint(self) -> tuple[tuple[str, ...], str, int | str, int, int]:
        c = self.config
        names = tuple(tf.value for tf in self._tfs)
        day_start = c.day_start_ms if c.server_tz is None else c.server_tz
        return (names, c.price.value, day_start, c.allowed_lateness_ms, c.close_delay_ms)

    def snapshot(self) -> bytes:
        """The whole state, deterministic bytes (msgpack)."""
        snap = _Snapshot(
            SNAPSHOT_FORMAT,
            self._fingerprint(),
            self.last_stream_seq,
            [b for syms in self._ticks.values() for b in syms.values()],
            [b for syms in self._bars.values() for b in syms.values()],
        )
        return _ENCODER.encode(snap)

    @classmethod
    def restore(cls, config: AggregatorConfig, data: bytes) -> Aggregator:
        """The aggregator ``snapshot`` saved; SnapshotMismatch if the config differs."""
        try:
            snap = _DECODER.decode(data)
        except msgspec.DecodeError as e:
            raise SnapshotMismatch(f"not an aggregator snapshot: {e}") from None
        agg = cls(config)
        if snap.format != SNAPSHOT_FORMAT or snap.config != agg._fingerprint():
            raise SnapshotMismatch(
                f"snapshot of format {snap.format} with config {snap.config}, "
                f"expected format {SNAPSHOT_FORMAT} with {agg._fingerprint()}"
            )
        agg.last_stream_seq = snap.last_stream_seq
        for tb in snap.ticks:
            agg._ticks.setdefault(tb.feed, {})[tb.symbol] = tb
        for bb in snap.bars:
            agg._bars.setdefault(bb.feed, {})[bb.symbol] = bb
        return agg

    # --- the slow paths -----------------------------------------------------------------

    def _new_book(
        self, feed: str, symbol: str, t: int, p: float, s: float, v: float | None, seq: int | None
    ) -> TickResult:
        """The first tick of (feed, symbol): its book, after the bars' part if there is one."""
        bb = self._bar_book(feed, symbol)
        if bb is not None and t < self._bars_end(bb):
            return _R_COVERED
        o = self._open(0, t)
        end = self._end(0, o)
        b = _TickBook(
            feed, symbol, t, end, [_Series() for _ in self._tfs],
            o, end, t, t, p, p, p, p, 1, 0.0 if v is None else float(v), s, s,
            _NO_SEQ if seq is None else seq, {}, _NO_SEQ if seq is None else seq, o,
        )  # fmt: skip
        self._ticks.setdefault(feed, {})[symbol] = b
        if bb is None:
            return TickResult(ACCEPTED, [], 0)
        # the ticks' book finishes every candle the bars left open (their periods hold the
        # bars' watermark), at once those that ended before this tick
        for ser, bser in zip(b.series, bb.series, strict=True):
            ser.open, bser.open = bser.open, {}
        b.taken_ms = bb.wm
        out: list[Candle] = []
        if o in b.series[0].open:  # a period the bars left open: the tick joins its candle
            b.a_open = b.a_close = 0
            self._apply(b, t, p, s, v, out)
        self._housekeep(b, out)
        return TickResult(ACCEPTED, out, 0)

    def _bar_book(self, feed: str, symbol: str) -> _BarBook | None:
        bars = self._bars.get(feed)
        return None if bars is None else bars.get(symbol)

    def _bars_end(self, bb: _BarBook) -> int:
        """End of the bars' part: the end of the latest bar taken, rounded up to the
        smallest timeframe."""
        return self._end(0, self._open(0, max(bb.wm, bb.end_ms) - 1))

    def _take_over(self, b: _TickBook, bb: _BarBook, out: list[Candle]) -> None:
        """Candles the bars left open whose period reaches the ticks' part (it just started
        earlier) move to the ticks' book, which finishes them."""
        start = b.start_ms
        for i, bser in enumerate(bb.series):
            for o in sorted(o for o in bser.open if self._end(i, o) > start):
                self._join(b, i, bser.open.pop(o), out)

    def _join(self, b: _TickBook, i: int, c: _Cand, out: list[Candle]) -> None:
        """Bars' candle ``c`` of timeframe ``i`` into the ticks' candle of its period; the
        caller housekeeps ``b`` afterwards (a candle put in may be due to close)."""
        o = c.open_ms
        if i == 0 and b.a_open == o and b.a_close > b.a_open:
            self._fold(b)
        ser = b.series[i]
        into = ser.open.get(o)
        if into is not None:
            _merge(into, c)
            return
        into = ser.kept.get(o)
        if into is not None:
            _merge(into, c)
            into.revision += 1
            out.append(self._candle(b, i, into))
            return
        if self._end(i, o) <= b.wm - self._late:
            # published and forgotten past the allowed lateness (a period of the ticks'
            # part had a tick, see _TickBook.start_ms): it keeps what it had
            self.late_shares += 1
            return
        ser.open[o] = c

    def _check_seq(self, b: _TickBook, seq: int, t: int) -> int:
        """Gap size (>= 0) if the tick is new, -1 if it is a duplicate."""
        ms = b.max_seq
        if seq > ms:
            b.max_seq = seq
            if ms == _NO_SEQ:
                b.low_seq = seq
                return 0
            self._missing(b, ms + 1, seq, t)
            return seq - ms - 1
        if seq in b.missing:
            del b.missing[seq]
            self.filled += 1
            return 0
        if t > b.wm:  # newer than anything seen: the EA restarted and reset its sequence
            b.max_seq = b.low_seq = seq
            b.missing.clear()
            return 0
        if seq < b.low_seq:
            # below every number seen since they (re)started: sent before the first of them
            # and delayed (a publish the EA retried), not seen; those between went missing
            # (a gap, as above) and may come too
            low = b.low_seq
            self._missing(b, seq + 1, low, t)
            b.low_seq = seq
            return low - seq - 1
        return -1

    def _missing(self, b: _TickBook, first: int, stop: int, t: int) -> None:
        """Seqs ``first`` .. ``stop - 1`` are not seen yet: one of them coming later is new."""
        seen = max(b.wm, t)
        miss = b.missing
        for s in range(max(first, stop - MAX_MISSING_SEQS), stop):
            miss[s] = seen
        if len(miss) > MAX_MISSING_SEQS:
            b.missing = dict(islice(miss.items(), len(miss) - MAX_MISSING_SEQS, None))
        b.next_event = min(b.next_event, seen + self._late + 1)

    def _add_slow(self, b: _TickBook, t: int, p: float, s: float, v: float | None) -> list[Candle]:
        out: list[Candle] = []
        if t < b.start_ms:  # a late tick earlier than any before: the ticks' part grows
            b.start_ms = self._open(0, t)
            bb = self._bar_book(b.feed, b.symbol)
            if bb is not None:
                self._take_over(b, bb, out)
        if b.a_close > b.a_open and t >= b.a_close:
            self._fold(b)
        o = self._open(0, t)
        base = b.series[0]
        if t > b.wm:
            b.wm = t
        if b.a_close <= b.a_open and t >= b.wm and o not in base.open and o not in base.kept:
            b.a_open, b.a_close, b.a_first, b.a_last = o, self._end(0, o), t, t
            b.a_op = b.a_hi = b.a_lo = b.a_cl = p
            b.a_n = 1
            b.a_vol = 0.0 if v is None else float(v)
            b.a_ssum = b.a_smax = s
        else:
            self._apply(b, t, p, s, v, out)
        self._housekeep(b, out)
        return out

    def _apply(
        self, b: _TickBook, t: int, p: float, s: float, v: float | None, out: list[Candle]
    ) -> None:
        """A tick outside the accumulator: into every timeframe, emitting revisions."""
        ds = self._day_start
        closed_before = b.wm - self._delay
        for i, L in enumerate(self._lens):
            ser = b.series[i]
            o = self._open(i, t) if self._zoned[i] else (t - ds) // L * L + ds
            c = ser.open.get(o)
            if c is not None:
                _put(c, t, p, s, v)
                continue
            c = ser.kept.get(o)
            if c is not None:
                _put(c, t, p, s, v)
                c.revision += 1
                out.append(self._candle(b, i, c))
                continue
            c = _Cand(o, t, t, p, p, p, p, 1, 1, 0.0 if v is None else float(v), s, s)
            end = self._end(i, o) if self._zoned[i] else o + L
            if end <= closed_before:  # a late tick into a closed period that had none
                ser.kept[o] = c
                out.append(self._candle(b, i, c))
            else:
                ser.open[o] = c

    def _fold(self, b: _TickBook) -> None:
        """The accumulator becomes the smallest timeframe's candle and joins the larger ones."""
        o = b.a_open
        c = _Cand(
            o, b.a_first, b.a_last, b.a_op, b.a_hi, b.a_lo, b.a_cl,
            b.a_n, b.a_n, b.a_vol, b.a_ssum, b.a_smax,
        )  # fmt: skip
        b.series[0].open[o] = c
        ds = self._day_start
        zoned = self._zoned
        for i in range(1, len(self._lens)):
            L, ser = self._lens[i], b.series[i]
            ho = self._open(i, o) if zoned[i] else (o - ds) // L * L + ds
            h = ser.open.get(ho)
            if h is None:
                ser.open[ho] = _copy_at(c, ho)
            else:
                _merge(h, c)
        b.a_open = b.a_close = 0

    def _advance(self, b: _Book, w: int) -> list[Candle]:
        out: list[Candle] = []
        if w > b.wm:
            b.wm = w
            if w >= b.next_event:
                self._housekeep(b, out)
        return out

    def _housekeep(self, b: _Book, out: list[Candle]) -> None:
        """Fold, close, evict whatever the watermark made due; recompute ``next_event``."""
        w = b.wm
        nxt = _NEVER
        if isinstance(b, _TickBook) and b.a_close > b.a_open:
            if w >= b.a_close:
                self._fold(b)
            else:
                nxt = b.a_close
        # bars are aggregated in time order only: one ending at the watermark gets no more
        delay = self._delay if isinstance(b, _TickBook) else 0
        late = self._late
        floor = w - late
        for i, L in enumerate(self._lens):
            ser = b.series[i]
            zoned = self._zoned[i]
            opened = ser.open
            if opened:
                due: list[int] | None = None
                for o in opened:
                    end = (self._end(i, o) if zoned else o + L) + delay
                    if end <= w:
                        if due is None:
                            due = [o]
                        else:
                            due.append(o)
                    elif end < nxt:
                        nxt = end
                if due is not None:
                    due.sort()
                    kept = ser.kept
                    for o in due:
                        c = opened.pop(o)
                        kept[o] = c
                        out.append(self._candle(b, i, c))
            kept = ser.kept
            if kept:
                old: list[int] | None = None
                for o in kept:
                    end = self._end(i, o) if zoned else o + L
                    if end <= floor:
                        if old is None:
                            old = [o]
                        else:
                            old.append(o)
                    elif end + late < nxt:
                        nxt = end + late
                if old is not None:
                    for o in old:
                        del kept[o]
        if isinstance(b, _TickBook) and b.missing:
            if next(iter(b.missing.values())) < floor:
                b.missing = {s: seen for s, seen in b.missing.items() if seen >= floor}
            if b.missing:
                nxt = min(nxt, next(iter(b.missing.values())) + late + 1)
        b.next_event = nxt

    def _open(self, i: int, t: int) -> int:
        """Open time of the period of timeframe ``i`` that holds ``t``."""
        return self.periods.open(self._tfs[i], t)

    def _end(self, i: int, o: int) -> int:
        """End of the period of timeframe ``i`` that opens at ``o``."""
        return self.periods.end(self._tfs[i], o)

    def _candle(self, b: _Book, i: int, c: _Cand) -> Candle:
        return Candle(
            feed=b.feed,
            symbol=b.symbol,
            tf=self._tfs[i],
            open_time_ms=c.open_ms,
            close_time_ms=self._end(i, c.open_ms),
            open=c.open,
            high=c.high,
            low=c.low,
            close=c.close,
            tick_volume=c.n,
            real_volume=c.volume,
            spread_mean=c.spread_sum / c.k,
            spread_max=c.spread_max,
            first_tick_ms=c.first_ms,
            last_tick_ms=c.last_ms,
            revision=c.revision,
            source="bars" if isinstance(b, _BarBook) else "ticks",
        )
