"""Server clocks and candle periods against pandas' own time zone arithmetic."""

from __future__ import annotations

import pandas as pd
import pytest

from contracts.messages import Timeframe
from contracts.servertime import HOUR_MS, Periods, fits, parse_zone

MINUTE = pd.Timedelta(minutes=1)


def reference_open(t: pd.Timestamp, zone: str, shift_h: int, tf: Timeframe) -> pd.Timestamp:
    """The first instant a server clock (``zone`` wall time plus ``shift_h``) showed the
    start of the ``tf`` period it was in at ``t``."""
    wall = t.tz_convert(zone).tz_localize(None) + pd.Timedelta(hours=shift_h)
    length = pd.Timedelta(milliseconds=tf.ms)
    start = wall.floor("D") + ((wall - wall.floor("D")) // length) * length
    return first_instant(start, zone, shift_h)


def first_instant(wall: pd.Timestamp, zone: str, shift_h: int) -> pd.Timestamp:
    local = (wall - pd.Timedelta(hours=shift_h)).tz_localize(
        zone, ambiguous=True, nonexistent="shift_forward"
    )
    return local.tz_convert("UTC")


def ms(t: pd.Timestamp) -> int:
    return int(t.value // 1_000_000)


@pytest.mark.parametrize(
    ("spec", "zone", "shift_h", "changes"),
    [
        # New York close brokers: New York's changes (2026-03-08, 2026-11-01)
        ("America/New_York+7", "America/New_York", 7, ("2026-03-05", "2026-10-29")),
        # a European server: the EU's (2026-03-29, 2026-10-25)
        ("Europe/Athens", "Europe/Athens", 0, ("2026-03-26", "2026-10-22")),
        # London + 3 h: the hour its clock skips, 04:00-05:00, starts an H4 period
        ("Europe/London+3", "Europe/London", 3, ("2026-03-26", "2026-10-22")),
    ],
)
@pytest.mark.parametrize("tf", [Timeframe.H4, Timeframe.D1])
def test_h4_and_d1_periods_follow_the_server_clock_over_its_changes(
    spec: str, zone: str, shift_h: int, changes: tuple[str, ...], tf: Timeframe
) -> None:
    periods = Periods(zone=parse_zone(spec))
    lengths = set()
    for first_day in changes:
        start = pd.Timestamp(first_day, tz="UTC")
        for k in range(0, 7 * 24 * 60, 7):  # a week, every 7 minutes
            t = start + k * MINUTE
            o = periods.open(tf, ms(t))
            assert o == ms(reference_open(t, zone, shift_h, tf)), t
            end = periods.end(tf, o)
            assert o <= ms(t) < end
            assert periods.open(tf, end) == end  # the next period opens where this ends
            assert fits(tf, o, end)
            lengths.add(end - o)
    # both changes show: one period an hour short, one an hour long
    assert lengths == {tf.ms - HOUR_MS, tf.ms, tf.ms + HOUR_MS}


def test_m1_to_h1_stay_on_the_utc_clock_and_nest_in_the_server_periods() -> None:
    periods = Periods(zone=parse_zone("America/New_York+7"))
    start = ms(pd.Timestamp("2026-10-31T20:00", tz="UTC"))
    for k in range(0, 24 * 60, 13):
        t = start + k * 60_000 + 17
        for tf in (Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.M30, Timeframe.H1):
            o = periods.open(tf, t)
            assert o == t - t % tf.ms
            assert periods.end(tf, o) == o + tf.ms
            assert periods.open(Timeframe.H4, o) == periods.open(Timeframe.H4, t)


def test_a_fixed_day_start_counts_every_period_from_it() -> None:
    periods = Periods(day_start_ms=22 * HOUR_MS)
    t = ms(pd.Timestamp("2026-07-15T21:30", tz="UTC"))
    assert periods.open(Timeframe.D1, t) == ms(pd.Timestamp("2026-07-14T22:00", tz="UTC"))
    assert periods.open(Timeframe.H4, t) == ms(pd.Timestamp("2026-07-15T18:00", tz="UTC"))
    assert periods.end(Timeframe.D1, periods.open(Timeframe.D1, t)) == ms(
        pd.Timestamp("2026-07-15T22:00", tz="UTC")
    )
    with pytest.raises(ValueError, match="either a fixed time of day or a zone"):
        Periods(day_start_ms=HOUR_MS, zone=parse_zone("Europe/Athens"))


def test_a_period_length_fits_its_timeframe_or_an_hour_off_for_h4_and_d1() -> None:
    assert fits(Timeframe.M1, 0, 60_000)
    assert not fits(Timeframe.M1, 0, 60_000 + HOUR_MS)
    assert not fits(Timeframe.H1, 0, 0)
    assert fits(Timeframe.D1, 0, 23 * HOUR_MS)
    assert fits(Timeframe.D1, 0, 25 * HOUR_MS)
    assert not fits(Timeframe.D1, 0, 22 * HOUR_MS)
    assert fits(Timeframe.H4, 0, 3 * HOUR_MS)
    assert not fits(Timeframe.H4, 0, 6 * HOUR_MS)


def test_a_regular_clock_has_whole_hour_offsets_that_change_by_an_hour_on_the_hour() -> None:
    for regular in ("America/New_York+7", "Europe/Athens", "Europe/London+2", "UTC+3"):
        assert parse_zone(regular).regular(), regular
    for irregular in (
        "Asia/Kolkata",  # UTC+5:30
        "Europe/Athens+0.5",
        "Australia/Adelaide+1.5",  # +11/+12, changing at 16:30 UTC
        "Antarctica/Troll+2",  # changes by two hours
    ):
        assert not parse_zone(irregular).regular(), irregular
    for bad in ("Mars/Olympus", "Europe/Athens+15", "", "2", "America", "America+7"):
        with pytest.raises(ValueError, match="not a time zone"):
            parse_zone(bad)
