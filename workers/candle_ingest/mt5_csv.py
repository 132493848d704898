"""MT5 CSV exports (bars and ticks) read line by line into contract messages.

Pure: no NATS, no clock. The importer publishes what this yields.

What MT5 writes, and what is accepted here:

- Tab-separated text, UTF-8 or UTF-16 (MT5's default), with or without a byte-order mark;
  the encoding is detected from the first bytes. A comma-separated file is accepted too.
- A header row of angle-bracketed names (``<DATE>\\t<TIME>\\t<BID>...``). Columns are found
  by name, so their order does not matter and unknown columns are ignored; a header that
  lacks a required column refuses the whole file (``HeaderError``, one line).
- ``<DATE>`` is ``2024.01.02``; ``<TIME>`` is ``13:05`` or ``13:05:00`` or ``13:05:00.123``.
  Both are the broker's *server* time, turned into UTC by ``server_time``: a fixed offset
  (server time minus UTC, in milliseconds), or a ``ServerZone`` for a server whose clock
  follows daylight saving time (most MT5 brokers: UTC+2 in winter, UTC+3 in summer), so
  that a year's export is UTC all year. All arithmetic is on integer milliseconds.
- Bars: ``<DATE> [<TIME>] <OPEN> <HIGH> <LOW> <CLOSE> [<TICKVOL>] [<VOL>] [<SPREAD>]``.
  ``<TIME>`` may be missing only in a D1 export. ``<SPREAD>`` is in points and becomes
  price units with ``point`` (``infer_point`` when not given).
- Ticks: ``<DATE> <TIME> [<BID>] [<ASK>] [<LAST>] [<VOLUME>] [<FLAGS>]``. A blank bid or ask
  means "unchanged": it carries the previous line's value. Blank last or volume is ``None``;
  so is a last of 0, MT5's "no deal" for a symbol with bid and ask only.

Each data line yields ``(line_number, item)`` where item is the message or a
``ParseError(reason, detail)``: a bad line is reported with its number (the header is line
1) and the lines after it are still read. Blank lines are skipped. ``reason`` is one of
``REASONS``; a price, volume or spread from ``MAX_VALUE`` on (MT5's ``EMPTY_VALUE``) is
``too_large``, as candle-ingest would refuse it.
"""

from __future__ import annotations

import codecs
import io
import itertools
import math
import re
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from os import PathLike
from typing import Final, NamedTuple

from contracts.messages import Bar, TickRow, Timeframe
from contracts.servertime import ServerZone, parse_zone
from contracts.subjects import check_name, check_symbol
from workers.candle_ingest.validate import MAX_VALUE

StrPath = str | PathLike[str]
Progress = Callable[[int], None]
"""Called with the number of bytes of the file read so far."""

FIELD_COUNT: Final = "field_count"
BAD_DATE: Final = "bad_date"
BAD_TIME: Final = "bad_time"
BEFORE_EPOCH: Final = "before_epoch"
BAD_NUMBER: Final = "bad_number"
NOT_FINITE: Final = "not_finite"
NOT_POSITIVE: Final = "not_positive"
NEGATIVE: Final = "negative"
BID_ABOVE_ASK: Final = "bid_above_ask"
NO_PREVIOUS_BID: Final = "no_previous_bid"
NO_PREVIOUS_ASK: Final = "no_previous_ask"
EMPTY_TICK: Final = "empty_tick"
BAD_OHLC: Final = "bad_ohlc"
MISALIGNED_TIME: Final = "misaligned_time"
OUT_OF_ORDER: Final = "out_of_order"
SKIPPED_TIME: Final = "skipped_time"
TOO_LARGE: Final = "too_large"

REASONS: Final = frozenset(
    {
        FIELD_COUNT,
        BAD_DATE,
        BAD_TIME,
        BEFORE_EPOCH,
        BAD_NUMBER,
        NOT_FINITE,
        NOT_POSITIVE,
        NEGATIVE,
        BID_ABOVE_ASK,
        NO_PREVIOUS_BID,
        NO_PREVIOUS_ASK,
        EMPTY_TICK,
        BAD_OHLC,
        MISALIGNED_TIME,
        OUT_OF_ORDER,
        SKIPPED_TIME,
        TOO_LARGE,
    }
)

BAR_REQUIRED: Final = ("DATE", "OPEN", "HIGH", "LOW", "CLOSE")
TICK_REQUIRED: Final = ("DATE", "TIME")
TICK_PRICES: Final = ("BID", "ASK")
POINT_SAMPLE_LINES: Final = 1000
"""Data lines ``infer_point`` looks at."""

_DATE: Final = re.compile(r"(\d{4})[.-](\d{1,2})[.-](\d{1,2})")
_COUNT: Final = re.compile(r"(-?)([0-9]+)")
_TIME: Final = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,3}))?)?")
_DECIMALS: Final = re.compile(r"[+-]?\d*\.(\d+)")
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_EPOCH: Final = datetime(1970, 1, 1)
_DAY_MS: Final = 86_400_000


class ParseError(NamedTuple):
    """Why one line was refused: ``reason`` from ``REASONS``, ``detail`` for a human."""

    reason: str
    detail: str


class _Refused(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.error = ParseError(reason, detail)


class HeaderError(ValueError):
    """The file is not an MT5 export of the expected kind (empty, or a required column missing)."""


def detect_encoding(head: bytes) -> str:
    """UTF-16 (either byte order, with or without BOM) or UTF-8 (with or without BOM)."""
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"  # the codec reads the BOM and drops it
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    # No BOM: a header starts with "<", which UTF-16 writes next to a zero byte.
    if len(head) >= 2 and head[0] != 0 and head[1] == 0:
        return "utf-16-le"
    if len(head) >= 2 and head[0] == 0 and head[1] != 0:
        return "utf-16-be"
    return "utf-8"


class _Export:
    """An open export: the header's column positions, then numbered data lines."""

    def __init__(self, path: StrPath, required: tuple[str, ...], kind: str) -> None:
        self.path = path
        self._raw = open(path, "rb")  # noqa: SIM115 - closed by lines() or close()
        try:
            encoding = detect_encoding(self._raw.peek(4)[:4])
            # A byte that does not decode spoils its own line only (the number will not parse).
            self._text = io.TextIOWrapper(self._raw, encoding=encoding, errors="replace")
            header = self._text.readline()
            if not header.strip():
                raise HeaderError(f"{path}: empty file, no header row")
            header = header.lstrip("\ufeff").rstrip("\r\n")
            self.sep = "\t" if "\t" in header or "," not in header else ","
            names = [h.strip().strip("<>").strip().upper() for h in header.split(self.sep)]
            while names and not names[-1]:
                names.pop()  # trailing separators, as on data lines
            self.width = len(names)
            self.columns = {name: i for i, name in enumerate(names) if name}
            missing = [name for name in required if name not in self.columns]
            if missing:
                found = ", ".join(f"<{n}>" for n in self.columns) or "nothing"
                wanted = ", ".join(f"<{n}>" for n in missing)
                raise HeaderError(f"{path}: not an MT5 {kind} export: no {wanted} (found {found})")
        except BaseException:
            self._raw.close()
            raise

    def close(self) -> None:
        self._text.close()

    def lines(self, progress: Progress | None) -> Iterator[tuple[int, list[str]]]:
        """Yield (line number, fields) for every non-blank data line, then close the file."""
        sep, width = self.sep, self.width
        reported = 0
        try:
            for number, line in enumerate(self._text, start=2):
                if progress is not None:
                    position = self._raw.tell()
                    if position != reported:
                        reported = position
                        progress(position)
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split(sep)
                while len(fields) > width and not fields[-1].strip():
                    fields.pop()  # trailing separators
                yield number, fields
        finally:
            self.close()


# --- fields --------------------------------------------------------------------------


ServerTime = int | ServerZone
"""How an export's server time becomes UTC: a fixed offset (server time minus UTC, in
milliseconds), or a ``ServerZone``."""


PASS_JITTER_MS: Final = 1_000
"""How far a tick's time may go back in the repeated hour and still be on the same pass."""


class _Clock:
    """Server-time DATE and TIME to UTC milliseconds, exactly, with a per-date cache.

    In the hour a server's clock turned back, a time is taken at its first pass unless the
    last line taken (``after``) has already gone past that (for ticks by more than
    ``PASS_JITTER_MS``): then it is the second pass. A tick a few milliseconds out of order
    there is refused as ``out_of_order``, as anywhere else, rather than taken for the second
    pass with every later tick of the first one.
    """

    def __init__(self, server_time: ServerTime) -> None:
        self._offset = server_time if isinstance(server_time, int) else 0
        self._zone = None if isinstance(server_time, int) else server_time
        self._days: dict[str, int] = {}

    def day_ms(self, text: str) -> int:
        ms = self._days.get(text)
        if ms is None:
            m = _DATE.fullmatch(text.strip())
            if m is None:
                raise _Refused(BAD_DATE, f"<DATE> {text!r}")
            try:
                day = date(int(m[1]), int(m[2]), int(m[3]))
            except ValueError:
                raise _Refused(BAD_DATE, f"<DATE> {text!r}") from None
            ms = (day.toordinal() - _EPOCH_ORDINAL) * _DAY_MS
            if len(self._days) > 100_000:
                self._days.clear()
            self._days[text] = ms
        return ms

    @staticmethod
    def time_of_day_ms(text: str) -> int:
        m = _TIME.fullmatch(text.strip())
        if m is None:
            raise _Refused(BAD_TIME, f"<TIME> {text!r}")
        hours, minutes = int(m[1]), int(m[2])
        seconds = int(m[3]) if m[3] else 0
        millis = int(m[4].ljust(3, "0")) if m[4] else 0  # ".1" is 100 ms
        if hours > 23 or minutes > 59 or seconds > 59:
            raise _Refused(BAD_TIME, f"<TIME> {text!r}")
        return ((hours * 60 + minutes) * 60 + seconds) * 1000 + millis

    def server_ms(self, date_text: str, time_text: str | None) -> int:
        tod = 0 if time_text is None else self.time_of_day_ms(time_text)
        return self.day_ms(date_text) + tod

    def repeated(self, server_ms: int) -> bool:
        """Whether ``server_ms`` is in an hour the clock turned back, which shows twice."""
        return self._zone is not None and len(self._zone.offsets_ms(server_ms)) > 1

    def utc_ms(self, server_ms: int, after: int, jitter_ms: int = 0) -> int:
        zone = self._zone
        if zone is None:
            utc = server_ms - self._offset
        else:
            try:
                offsets = zone.offsets_ms(server_ms)
            except (OverflowError, ValueError, OSError):  # years the platform cannot convert
                when = _when(server_ms)
                raise _Refused(BAD_DATE, f"{when} is out of the {zone} clock's range") from None
            if not offsets:
                when = _when(server_ms)
                raise _Refused(SKIPPED_TIME, f"{when} is in the hour a {zone} clock skips")
            utc = server_ms - offsets[-1]
            for offset in offsets:
                if server_ms - offset >= after - jitter_ms:
                    utc = server_ms - offset
                    break
        if utc < 0:
            raise _Refused(BEFORE_EPOCH, f"{utc} ms is before 1970-01-01 UTC")
        return utc


def _when(server_ms: int) -> str:
    return f"{_EPOCH + timedelta(milliseconds=server_ms):%Y-%m-%d %H:%M:%S}"


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Refused(BAD_NUMBER, f"<{name}> {text!r}") from None
    if "_" in text:  # float() accepts "1_0"; an export never writes it
        raise _Refused(BAD_NUMBER, f"<{name}> {text!r}")
    if not math.isfinite(value):
        raise _Refused(NOT_FINITE, f"<{name}> {text!r}")
    return value


def _price(name: str, text: str) -> float:
    value = _number(name, text)
    if value <= 0:
        raise _Refused(NOT_POSITIVE, f"<{name}> {text.strip()}")
    if value >= MAX_VALUE:  # MT5's EMPTY_VALUE: candle-ingest would refuse it
        raise _Refused(TOO_LARGE, f"<{name}> {text.strip()}")
    return value


def _last(text: str) -> float | None:
    """A ``<LAST>`` of 0 is MT5's "no deal" (bid/ask-only symbols): no last price, as
    candle-ingest reads a live tick's."""
    if _number("LAST", text) == 0:
        return None
    return _price("LAST", text)


def _volume(name: str, text: str) -> float:
    value = _number(name, text)
    if value < 0:
        raise _Refused(NEGATIVE, f"<{name}> {text.strip()}")
    if value >= MAX_VALUE:
        raise _Refused(TOO_LARGE, f"<{name}> {text.strip()}")
    return value


def _count(name: str, text: str) -> int:
    m = _COUNT.fullmatch(text.strip())  # int() also takes "1_0", "+5" and other digits
    if m is None:
        raise _Refused(BAD_NUMBER, f"<{name}> {text!r}")
    if m[1]:
        raise _Refused(NEGATIVE, f"<{name}> {text.strip()}")
    return int(m[2])


def _field(fields: list[str], index: int | None) -> str:
    """The stripped text of an optional column; blank when the column does not exist."""
    return "" if index is None else fields[index].strip()


def _check_width(fields: list[str], width: int) -> None:
    if len(fields) != width:
        raise _Refused(FIELD_COUNT, f"{len(fields)} fields, the header has {width}")


# --- bars ----------------------------------------------------------------------------


def infer_point(path: StrPath, *, lines: int = POINT_SAMPLE_LINES) -> Decimal:
    """The point size of a bar export: 10^-d for the most decimals d among the prices of the
    first ``lines`` data lines (``1.10450`` -> ``0.00001``; no decimals -> ``1``).

    MT5 prints prices with the symbol's digits, so this is the symbol's point. It would come
    out too large only if every price looked at ended in a zero MT5 did not print; pass the
    point explicitly for such files.
    """
    export = _Export(path, BAR_REQUIRED, "bars")
    columns = [export.columns[name] for name in ("OPEN", "HIGH", "LOW", "CLOSE")]
    decimals = 0
    for _, fields in itertools.islice(export.lines(None), lines):
        for i in columns:
            if i < len(fields):
                m = _DECIMALS.fullmatch(fields[i].strip())
                if m is not None:
                    decimals = max(decimals, len(m[1]))
    export.close()
    return Decimal(1).scaleb(-decimals)


def iter_bars(
    path: StrPath,
    *,
    feed: str,
    symbol: str,
    tf: Timeframe,
    server_time: ServerTime,
    point: Decimal | None = None,
    progress: Progress | None = None,
) -> Iterator[tuple[int, Bar | ParseError]]:
    """Bars of an MT5 bar export, one per data line, or why a line was refused.

    Reads the header at once (``HeaderError`` here, not on the first ``next``). A bar's open
    time must fall on a ``tf`` boundary of server time and come after the previous bar's.
    """
    check_name(feed, "feed")
    check_symbol(symbol)
    tf = Timeframe(tf)
    export = _Export(path, BAR_REQUIRED, "bars")
    if "TIME" not in export.columns and tf is not Timeframe.D1:
        export.close()
        raise HeaderError(f"{path}: no <TIME> column, which only a D1 export may omit")
    if point is None:
        point = infer_point(path)
    elif not point > 0:
        export.close()
        raise ValueError(f"point must be positive: {point}")
    return _bars(export, feed, symbol, tf, _Clock(server_time), point, progress)


def _bars(
    export: _Export,
    feed: str,
    symbol: str,
    tf: Timeframe,
    clock: _Clock,
    point: Decimal,
    progress: Progress | None,
) -> Iterator[tuple[int, Bar | ParseError]]:
    c = export.columns
    i_date, i_time = c["DATE"], c.get("TIME")
    i_open, i_high, i_low, i_close = c["OPEN"], c["HIGH"], c["LOW"], c["CLOSE"]
    i_tickvol, i_vol, i_spread = c.get("TICKVOL"), c.get("VOL"), c.get("SPREAD")
    tf_ms = tf.ms
    previous: int | None = None
    # past the latest bar of a repeated hour, refused for its prices or not: the next bar at
    # the same server time is of the second pass
    passed = -1
    for number, fields in export.lines(progress):
        try:
            _check_width(fields, export.width)
            server_ms = clock.server_ms(fields[i_date], None if i_time is None else fields[i_time])
            if server_ms % tf_ms:
                when = f"{fields[i_date].strip()} {_field(fields, i_time)}".strip()
                raise _Refused(MISALIGNED_TIME, f"{when} is not on a {tf.value} boundary")
            # a bar opens after the one before it: in a repeated hour, its second pass
            after = -1 if previous is None else previous + 1
            open_time_ms = clock.utc_ms(server_ms, max(after, passed))
            if previous is not None and open_time_ms <= previous:
                raise _Refused(OUT_OF_ORDER, f"bar time {open_time_ms} not after {previous}")
            if clock.repeated(server_ms):
                passed = open_time_ms + 1
            o = _price("OPEN", fields[i_open])
            h = _price("HIGH", fields[i_high])
            lo = _price("LOW", fields[i_low])
            cl = _price("CLOSE", fields[i_close])
            if h < max(o, cl) or lo > min(o, cl):
                raise _Refused(BAD_OHLC, f"open {o} high {h} low {lo} close {cl}")
            tickvol = _field(fields, i_tickvol)
            vol = _field(fields, i_vol)
            spread = _field(fields, i_spread)
            spread_points = _count("SPREAD", spread) if spread else 0
            if spread_points * point >= MAX_VALUE:
                raise _Refused(TOO_LARGE, f"<SPREAD> {spread}")
            bar = Bar(
                feed=feed,
                symbol=symbol,
                tf=tf,
                open_time_ms=open_time_ms,
                open=o,
                high=h,
                low=lo,
                close=cl,
                tick_volume=_count("TICKVOL", tickvol) if tickvol else 0,
                real_volume=_volume("VOL", vol) if vol else 0.0,
                # exact decimal product, then the nearest double: 12 * 0.00001 is 0.00012
                spread=float(spread_points * point) if spread_points else 0.0,
            )
        except _Refused as refused:
            yield number, refused.error
            continue
        previous = open_time_ms
        yield number, bar


# --- ticks ---------------------------------------------------------------------------


def iter_ticks(
    path: StrPath,
    *,
    feed: str,
    symbol: str,
    server_time: ServerTime,
    progress: Progress | None = None,
) -> Iterator[tuple[int, TickRow | ParseError]]:
    """Ticks of an MT5 tick export, one per data line, or why a line was refused.

    A blank bid or ask carries the previous value. A refused line does not change what is
    carried, except that a line refused only because the *other* price was never given
    still sets the price it does give. Times must not go backwards. ``feed`` and ``symbol``
    are checked here (the rows do not carry them) so that a bad one fails before any line
    is read; so does a header without ``<BID>`` or ``<ASK>``.
    """
    check_name(feed, "feed")
    check_symbol(symbol)
    export = _Export(path, TICK_REQUIRED + TICK_PRICES, "ticks")
    return _ticks(export, _Clock(server_time), progress)


def _ticks(
    export: _Export, clock: _Clock, progress: Progress | None
) -> Iterator[tuple[int, TickRow | ParseError]]:
    c = export.columns
    i_date, i_time, i_bid, i_ask = c["DATE"], c["TIME"], c["BID"], c["ASK"]
    i_last, i_volume, i_flags = c.get("LAST"), c.get("VOLUME"), c.get("FLAGS")
    bid: float | None = None
    ask: float | None = None
    previous = -1
    for number, fields in export.lines(progress):
        try:
            _check_width(fields, export.width)
            server_ms = clock.server_ms(fields[i_date], fields[i_time])
            time_ms = clock.utc_ms(server_ms, previous, PASS_JITTER_MS)
            if time_ms < previous:
                raise _Refused(OUT_OF_ORDER, f"tick time {time_ms} before {previous}")
            bid_text, ask_text = fields[i_bid].strip(), fields[i_ask].strip()
            last_text, volume_text = _field(fields, i_last), _field(fields, i_volume)
            if not (bid_text or ask_text or last_text or volume_text):
                raise _Refused(EMPTY_TICK, "no <BID>, <ASK>, <LAST> or <VOLUME>")
            new_bid = _price("BID", bid_text) if bid_text else bid
            new_ask = _price("ASK", ask_text) if ask_text else ask
            last = _last(last_text) if last_text else None
            volume = _volume("VOLUME", volume_text) if volume_text else None
            flags_text = _field(fields, i_flags)
            flags = _count("FLAGS", flags_text) if flags_text else 0
            if new_bid is None or new_ask is None:
                # Keep the price this line does give: the next line may need it.
                bid, ask = new_bid, new_ask
                missing = NO_PREVIOUS_BID if new_bid is None else NO_PREVIOUS_ASK
                side = "bid" if new_bid is None else "ask"
                raise _Refused(missing, f"blank <{side.upper()}> and no earlier {side}")
            if new_bid > new_ask:
                raise _Refused(BID_ABOVE_ASK, f"bid {new_bid} > ask {new_ask}")
        except _Refused as refused:
            yield number, refused.error
            continue
        bid, ask, previous = new_bid, new_ask, time_ms
        yield (
            number,
            TickRow(
                time_ms=time_ms, bid=new_bid, ask=new_ask, last=last, volume=volume, flags=flags
            ),
        )


def parse_utc_offset(text: str) -> int:
    """``--utc-offset`` hours (``2``, ``-5``, ``5.5``, ``5.75``) as exact milliseconds."""
    try:
        hours = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number of hours: {text!r}") from None
    if not hours.is_finite() or not -14 <= hours <= 14:
        raise ValueError(f"UTC offset must be -14..14 hours: {text!r}")
    ms = hours * 3_600_000
    if ms != ms.to_integral_value():
        raise ValueError(f"UTC offset is not a whole number of milliseconds: {text!r}")
    return int(ms)


def parse_server_time(text: str) -> ServerTime:
    """``--utc-offset``: hours (``2``, ``-5``, ``5.5``) as exact milliseconds, or a time zone
    the server's clock follows, shifted by hours if need be (``Europe/Athens``,
    ``America/New_York+7``)."""
    text = text.strip()
    if not text[:1].isalpha():
        return parse_utc_offset(text)
    try:
        return parse_zone(text)
    except ValueError:
        raise ValueError(
            f"not a number of hours nor a time zone: {text!r} "
            "(e.g. 2, -5, Europe/Athens, America/New_York+7)"
        ) from None


def parse_point(text: str) -> Decimal:
    """``--point`` (``0.00001``) as an exact decimal."""
    try:
        point = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None
    if not point.is_finite() or point <= 0:
        raise ValueError(f"point must be a positive number: {text!r}")
    return point
