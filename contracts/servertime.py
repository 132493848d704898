"""Broker server clocks, and where candles open and close on them. Pure: no I/O.

MT5 brokers keep their server clock on a time zone's rules, most of them on UTC+2 in
winter and UTC+3 in summer. Everything in tickwire is UTC; a ``ServerZone`` says which UTC
instant a server time is, and ``Periods`` where each timeframe's candles open and close:

- M1 to H1 on the UTC clock (counted from ``day_start_ms``, a fixed day start);
- H4 and D1 from the broker's day start: fixed, or, with a zone, at the server clock's
  midnight and every 4 hours of it, all year. Such a candle opens at the first instant the
  server clock shows its start, and ends where the next one opens: the H4 and D1 candles
  over a change of the clock are an hour shorter or longer than the others (``fits``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from contracts.messages import Timeframe

HOUR_MS: Final = 3_600_000
DAY_MS: Final = 86_400_000
_EPOCH: Final = datetime(1970, 1, 1)
_SHIFT: Final = re.compile(r"(.+?)([+-]\d+(?:\.\d+)?)")
_SECOND: Final = timedelta(seconds=1)
_MS: Final = timedelta(milliseconds=1)
_CACHED_HOURS: Final = 100_000
V = TypeVar("V")


class ServerZone:
    """A server clock that follows a time zone's rules: the zone's wall time, plus ``shift``.

    ``Europe/Athens`` is a server on Athens time (UTC+2, UTC+3 in summer). Brokers whose day
    ends at 17:00 New York are ``America/New_York+7``: New York time plus 7 hours, UTC+2 or
    UTC+3 as New York changes its clocks. Offsets are server time minus UTC, in ms.
    """

    def __init__(self, zone: str, shift_ms: int = 0, *, name: str | None = None) -> None:
        self.zone = ZoneInfo(zone)
        self.shift_ms = shift_ms
        self.name = name or zone
        self._walls: dict[int, tuple[int, ...]] = {}
        self._instants: dict[int, int] = {}

    def __str__(self) -> str:
        return self.name

    def offsets_ms(self, server_ms: int) -> tuple[int, ...]:
        """Offsets under which server time ``server_ms`` exists, the earliest instant first:
        one; two in the hour the clock turned back repeats; none in the hour it skipped."""
        return _by_hour(self._walls, self._wall_offsets, server_ms)

    def offset_at(self, utc_ms: int) -> int:
        """The offset in force at the instant ``utc_ms``."""
        return _by_hour(self._instants, self._instant_offset, utc_ms)

    def first_instant(self, server_ms: int) -> int:
        """The first instant the clock shows ``server_ms``, or, for a time in the hour it
        skipped, the instant it jumped over it."""
        offsets = self.offsets_ms(server_ms)
        if offsets:
            return server_ms - offsets[0]
        skipped = server_ms - server_ms % HOUR_MS  # a clock skips whole hours (``regular``)
        return skipped - self.offsets_ms(skipped - 1)[-1]

    def regular(self, years: range = range(1990, 2060)) -> bool:
        """Whether, over ``years``, every offset of the clock is a whole number of hours and
        every change of it is one hour, on a whole UTC hour: what ``Periods`` needs."""
        day = 86_400
        first = int((datetime(years.start, 1, 1) - _EPOCH) / _SECOND)
        last = int((datetime(years.stop, 1, 1) - _EPOCH) / _SECOND)
        before = self._instant_offset(first)
        if before % HOUR_MS:
            return False
        for s in range(first + day, last, day):
            offset = self._instant_offset(s)
            if offset == before:
                continue
            if abs(offset - before) != HOUR_MS or offset % HOUR_MS:
                return False
            # the change within the day before: on a whole hour
            for h in range(s - day, s, 3600):
                if self._instant_offset(h) != self._instant_offset(h + 3599):
                    return False
            before = offset
        return True

    def _wall_offsets(self, server_s: int) -> tuple[int, ...]:
        wall = _EPOCH + timedelta(milliseconds=server_s * 1000 - self.shift_ms)
        found = set()
        for fold in (0, 1):
            offset = wall.replace(tzinfo=self.zone, fold=fold).utcoffset()
            assert offset is not None  # a ZoneInfo always has one
            utc = (wall - _EPOCH - offset) // _SECOND
            if datetime.fromtimestamp(utc, self.zone).replace(tzinfo=None) == wall:
                found.add(offset // _MS + self.shift_ms)
        return tuple(sorted(found, reverse=True))

    def _instant_offset(self, utc_s: int) -> int:
        offset = datetime.fromtimestamp(utc_s, self.zone).utcoffset()
        assert offset is not None
        return offset // _MS + self.shift_ms


def _by_hour(cache: dict[int, V], of_second: Callable[[int], V], ms: int) -> V:
    """``of_second(ms // 1000)``, kept per hour: the clock changes on the hour. An hour with a
    change inside (not at its start) is not kept."""
    hour = ms // HOUR_MS
    found = cache.get(hour)
    if found is None:
        first = of_second(hour * 3600)
        if first != of_second(hour * 3600 + 3599):
            return of_second(ms // 1000)
        if len(cache) > _CACHED_HOURS:
            cache.clear()
        found = cache[hour] = first
    return found


def parse_zone(text: str) -> ServerZone:
    """A time zone (``Europe/Athens``), or one shifted by hours (``America/New_York+7``);
    ValueError in one line."""
    text = text.strip()
    readings = [(text, "0")]  # a zone whose name has a sign (Etc/GMT-2) first
    shifted = _SHIFT.fullmatch(text)
    if shifted is not None:
        readings.append((shifted[1], shifted[2]))
    for zone, hours in readings:
        try:
            shift = float(hours)
            if not -14 <= shift <= 14 or shift * HOUR_MS != int(shift * HOUR_MS):
                continue
            return ServerZone(zone, int(shift * HOUR_MS), name=text)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # a directory: America
            continue
    raise ValueError(
        f"not a time zone: {text!r} (e.g. Europe/Athens, or America/New_York+7 for New York "
        "time plus 7 hours)"
    )


class Periods:
    """Where the candles of each timeframe open and close (UTC ms).

    Without a zone every period is counted from the fixed ``day_start_ms``:
    ``open = (t - day_start) // L * L + day_start``, ``end = open + L``. With one (whose
    offsets are whole hours, so M1..H1 need no day start), H4 and D1 follow its clock.
    """

    def __init__(self, day_start_ms: int = 0, zone: ServerZone | None = None) -> None:
        if zone is not None and day_start_ms % DAY_MS:
            raise ValueError("a day start is either a fixed time of day or a zone, not both")
        self.day_start_ms = day_start_ms % DAY_MS
        self.zone = zone

    def zoned(self, tf: Timeframe) -> bool:
        """Whether ``tf``'s periods follow the zone (and may be an hour off their length)."""
        return self.zone is not None and tf.ms > HOUR_MS

    def open(self, tf: Timeframe, t: int) -> int:
        """Open time of the period of ``tf`` that holds the instant ``t``."""
        L = tf.ms
        zone = self.zone
        if zone is None or L <= HOUR_MS:
            ds = self.day_start_ms
            return (t - ds) // L * L + ds
        s = t + zone.offset_at(t)
        return zone.first_instant(s - s % L)

    def end(self, tf: Timeframe, o: int) -> int:
        """End (the next period's open) of the period of ``tf`` that opens at ``o``."""
        L = tf.ms
        zone = self.zone
        if zone is None or L <= HOUR_MS:
            return o + L
        s = o + zone.offset_at(o)
        return zone.first_instant(s - s % L + L)

    def aligned(self, tf: Timeframe, o: int) -> bool:
        return self.open(tf, o) == o


def fits(tf: Timeframe, open_ms: int, close_ms: int) -> bool:
    """Whether ``[open_ms, close_ms)`` has the length of a ``tf`` period: ``tf.ms``, or an
    hour more or less for an H4 or D1 candle over a change of its server's clock."""
    length = close_ms - open_ms
    L = tf.ms
    return length == L or (L > HOUR_MS and abs(length - L) == HOUR_MS)
