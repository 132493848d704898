"""Refusal reasons for ticks and bars: machine-readable, checked before aggregation.

Each check returns ``None`` for good input or one reason from a small fixed vocabulary,
the ``reason`` of the dead letter. ``too_late``, ``duplicate`` and ``no_last_price`` depend
on state and come from the aggregator instead.
"""

from __future__ import annotations

from typing import Final

import msgspec

from contracts.codec import INVALID_VALUE, MISSING_FIELD, Codec, ContractError
from contracts.messages import Bar, TickBatch, TickInput, TickRow, Timeframe
from contracts.servertime import Periods
from contracts.subjects import SubjectError
from contracts.subjects import check_symbol as _check_symbol

BAD_PRICE: Final = "bad_price"
BID_ABOVE_ASK: Final = "bid_above_ask"
NEGATIVE_VOLUME: Final = "negative_volume"
BAD_VOLUME: Final = "bad_volume"
FUTURE_TIME: Final = "future_time"
ILLEGAL_SYMBOL: Final = "illegal_symbol"
BAD_OHLC: Final = "bad_ohlc"
MISALIGNED_BAR: Final = "misaligned_bar"

MAX_VALUE: Final = 1e15
"""A price or volume from here on is no market's: MT5's EMPTY_VALUE (DBL_MAX) sent by a
faulty EA, or garbage. Taken, it would overflow a mid price or a sum to inf, which JSON
carries as null and every consumer refuses."""


def check_tick(
    time_ms: int,
    bid: float,
    ask: float,
    last: float | None,
    volume: float | None,
    *,
    now_ms: int,
    max_future_skew_ms: int,
) -> str | None:
    """``bad_price``: NaN, zero, negative or from ``MAX_VALUE`` on (inf too) bid/ask, and
    last (except 0, which MT5 gives for a symbol without deals: no last price);
    ``bid_above_ask``; ``negative_volume``; ``bad_volume`` (NaN, or from ``MAX_VALUE`` on);
    ``future_time``: after ``now_ms + max_future_skew_ms``."""
    # a chained comparison is False for NaN
    if not (0.0 < bid < MAX_VALUE and 0.0 < ask < MAX_VALUE):
        return BAD_PRICE
    if last and not 0.0 < last < MAX_VALUE:  # 0 is MT5's "no deal": none, not a bad price
        return BAD_PRICE
    if bid > ask:
        return BID_ABOVE_ASK
    if volume is not None and not 0.0 <= volume < MAX_VALUE:
        return NEGATIVE_VOLUME if volume < 0.0 else BAD_VOLUME
    if time_ms > now_ms + max_future_skew_ms:
        return FUTURE_TIME
    return None


def check_symbol(symbol: str) -> str | None:
    """``illegal_symbol`` for what ``contracts.subjects.check_symbol`` refuses."""
    try:
        _check_symbol(symbol)
    except SubjectError:
        return ILLEGAL_SYMBOL
    return None


def check_bar(bar: Bar, *, periods: Periods, now_ms: int, max_future_skew_ms: int) -> str | None:
    """``bad_price`` (as ``check_tick``'s), ``bad_ohlc`` (high/low not enclosing open and
    close), ``bad_volume`` (volume or spread NaN or from ``MAX_VALUE`` on),
    ``misaligned_bar`` (open time not where a period of its timeframe opens: counted from
    the day start, or on the server's clock), ``future_time``; ``illegal_symbol`` is
    ``check_symbol``'s."""
    o, h, lo, c = bar.open, bar.high, bar.low, bar.close
    if not all(0.0 < p < MAX_VALUE for p in (o, h, lo, c)):
        return BAD_PRICE
    if not (lo <= o <= h and lo <= c <= h):
        return BAD_OHLC
    if not (bar.real_volume < MAX_VALUE and bar.spread < MAX_VALUE):  # >= 0 by the contract
        return BAD_VOLUME
    if not periods.aligned(Timeframe(bar.tf), bar.open_time_ms):
        return MISALIGNED_BAR
    if bar.open_time_ms > now_ms + max_future_skew_ms:
        return FUTURE_TIME
    return None


class SalvagedBatch(TickBatch, frozen=True, kw_only=True):
    """The ticks of a batch that decode, when some of its ticks do not: each of those is
    dead-lettered alone, as a tick that fails a value check is."""

    index: tuple[int, ...] = ()
    """Each kept tick's place in the batch as sent."""
    refused: tuple[tuple[int, bytes, str, str], ...] = ()
    """(place, the tick's JSON, reason, detail) of each tick that does not decode."""


class TicksCodec(Codec[TickInput]):
    """What may come on TICKS. A batch whose envelope (type, version, feed, symbol) is good
    but some of whose ticks are not (a field missing or of the wrong type, a negative time)
    is not refused whole: its good ticks are taken."""

    __slots__ = ()

    _row: Final = msgspec.json.Decoder(TickRow)

    def __init__(self, *, max_bytes: int = 1 << 20) -> None:
        super().__init__(TickInput, max_bytes=max_bytes)

    def decode(self, data: bytes) -> TickInput:
        try:
            return super().decode(data)
        except ContractError as exc:
            salvaged = self._salvage(data) if exc.reason in (MISSING_FIELD, INVALID_VALUE) else None
            if salvaged is None:
                raise
            return salvaged

    def _salvage(self, data: bytes) -> SalvagedBatch | None:
        try:
            loose = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return None
        if not isinstance(loose, dict) or loose.get("type") != "tick_batch":
            return None
        rows = loose.get("ticks")
        if not isinstance(rows, list):
            return None
        try:  # the envelope alone must be good
            head = super().decode(msgspec.json.encode({**loose, "ticks": []}))
        except ContractError:
            return None
        assert isinstance(head, TickBatch)
        kept: list[TickRow] = []
        index: list[int] = []
        refused: list[tuple[int, bytes, str, str]] = []
        for i, row in enumerate(rows):
            raw = msgspec.json.encode(row)
            try:
                kept.append(self._row.decode(raw))
                index.append(i)
            except msgspec.ValidationError as exc:
                reason = MISSING_FIELD if "missing required field" in str(exc) else INVALID_VALUE
                refused.append((i, raw, reason, f"ticks[{i}]: {exc}"))
            except msgspec.DecodeError as exc:
                refused.append((i, raw, INVALID_VALUE, f"ticks[{i}]: {exc}"))
        if not kept:
            return None
        return SalvagedBatch(
            v=head.v,
            feed=head.feed,
            symbol=head.symbol,
            ticks=kept,
            index=tuple(index),
            refused=tuple(refused),
        )
