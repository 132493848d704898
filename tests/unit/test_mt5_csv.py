"""MT5 CSV exports: exact times, carried prices, numbered refusals, spreads in price units."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from contracts.messages import Bar, TickRow, Timeframe
from workers.candle_ingest import mt5_csv
from workers.candle_ingest.mt5_csv import HeaderError, ParseError

TICK_HEADER = "<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>"
BAR_HEADER = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
UTC2 = 2 * 3_600_000
# 2024-01-02 00:00:00 UTC in ms
JAN2 = 1_704_153_600_000


def write(
    tmp_path: Path, lines: list[str], *, encoding: str = "utf-8", name: str = "x.csv"
) -> Path:
    path = tmp_path / name
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode(encoding))
    return path


def ticks(path: Path, offset_ms: mt5_csv.ServerTime = 0) -> list[tuple[int, TickRow | ParseError]]:
    return list(mt5_csv.iter_ticks(path, feed="demo", symbol="EURUSD", server_time=offset_ms))


def bars(
    path: Path,
    tf: Timeframe = Timeframe.M5,
    offset_ms: mt5_csv.ServerTime = 0,
    point: Decimal | None = None,
) -> list[tuple[int, Bar | ParseError]]:
    return list(
        mt5_csv.iter_bars(
            path, feed="demo", symbol="US500.cash", tf=tf, server_time=offset_ms, point=point
        )
    )


# --- ticks ---------------------------------------------------------------------------


def test_ticks_exact_ms_with_utc_offset_and_carried_prices(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2024.01.02\t02:00:00.007\t1.10450\t1.10460\t\t\t6",
            "2024.01.02\t02:00:00.456\t\t1.10462\t\t\t4",  # bid unchanged
            "2024.01.02\t02:00:01.5\t1.10455\t\t\t\t2",  # ask unchanged; ".5" is 500 ms
            "2024.01.02\t02:00:01.500\t\t\t1.10458\t3\t24",  # only last and volume
            "2024.01.03\t01:59:59.999\t1.1047\t1.1048\t\t\t6",
        ],
    )
    assert ticks(path, UTC2) == [
        (2, TickRow(time_ms=JAN2 + 7, bid=1.1045, ask=1.1046, flags=6)),
        (3, TickRow(time_ms=JAN2 + 456, bid=1.1045, ask=1.10462, flags=4)),
        (4, TickRow(time_ms=JAN2 + 1500, bid=1.10455, ask=1.10462, flags=2)),
        (
            5,
            TickRow(
                time_ms=JAN2 + 1500, bid=1.10455, ask=1.10462, last=1.10458, volume=3.0, flags=24
            ),
        ),
        (6, TickRow(time_ms=JAN2 + 86_400_000 - 1, bid=1.1047, ask=1.1048, flags=6)),
    ]


def test_fractional_and_negative_utc_offsets_are_exact() -> None:
    assert mt5_csv.parse_utc_offset("2") == 7_200_000
    assert mt5_csv.parse_utc_offset("-5") == -18_000_000
    assert mt5_csv.parse_utc_offset("5.5") == 19_800_000
    assert mt5_csv.parse_utc_offset("5.75") == 20_700_000
    assert mt5_csv.parse_utc_offset("0.1") == 360_000  # 0.1 h is not a float problem here
    for bad in ("x", "15", "nan", "0.0000001"):
        with pytest.raises(ValueError, match=r"\w"):
            mt5_csv.parse_utc_offset(bad)


def iso_ms(text: str) -> int:
    """Milliseconds of an ISO time with its UTC offset written out."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_a_server_clock_on_daylight_saving_time_gives_utc_all_year(tmp_path: Path) -> None:
    # New York time plus 7 h: UTC+2 in winter, UTC+3 from the second Sunday of March
    # (2026-03-08) to the first Sunday of November (2026-11-01), as New York changes
    nyc7 = mt5_csv.parse_server_time("America/New_York+7")
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2026.01.15\t10:00:00.250\t1.1\t1.2\t\t\t6",
            "2026.03.06\t23:59:59.999\t1.1\t1.2\t\t\t6",  # Friday before the change
            "2026.03.09\t00:00:00.000\t1.1\t1.2\t\t\t6",  # Monday after it
            "2026.07.15\t10:00:00.000\t1.1\t1.2\t\t\t6",
            "2026.12.01\t10:00:00.000\t1.1\t1.2\t\t\t6",
        ],
    )
    assert [t.time_ms for _, t in ticks(path, nyc7) if isinstance(t, TickRow)] == [
        iso_ms("2026-01-15T08:00:00.250+00:00"),
        iso_ms("2026-03-06T21:59:59.999+00:00"),
        iso_ms("2026-03-08T21:00:00+00:00"),
        iso_ms("2026-07-15T07:00:00+00:00"),
        iso_ms("2026-12-01T08:00:00+00:00"),
    ]
    # a European server changes on the last Sunday of March (2026-03-29), three weeks later
    athens = mt5_csv.parse_server_time("Europe/Athens")
    assert [t.time_ms for _, t in ticks(path, athens) if isinstance(t, TickRow)][2:4] == [
        iso_ms("2026-03-08T22:00:00+00:00"),
        iso_ms("2026-07-15T07:00:00+00:00"),
    ]


def test_the_hour_a_server_clock_repeats_is_taken_in_order_and_the_skipped_one_refused(
    tmp_path: Path,
) -> None:
    # 2026-11-01: New York goes from 02:00 EDT back to 01:00 EST, so this server's clock
    # shows 08:00-09:00 twice (a symbol that trades on Sundays)
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2026.11.01\t08:30:00.000\t1.1\t1.2\t\t\t6",
            "2026.11.01\t08:59:59.999\t1.1\t1.2\t\t\t6",
            "2026.11.01\t08:00:00.000\t1.1\t1.2\t\t\t6",  # the second time round
            "2026.11.01\t08:30:00.000\t1.1\t1.2\t\t\t6",
            "2026.11.01\t09:00:00.000\t1.1\t1.2\t\t\t6",
            # 2026-03-08: 02:00 EST is 03:00 EDT, so 09:00-10:00 never shows on this clock
            "2026.03.08\t09:30:00.000\t1.1\t1.2\t\t\t6",
            "2026.11.01\t09:00:00.001\t1.1\t1.2\t\t\t6",
        ],
    )
    got = ticks(path, mt5_csv.parse_server_time("America/New_York+7"))
    assert [(n, t.time_ms) for n, t in got if isinstance(t, TickRow)] == [
        (2, iso_ms("2026-11-01T05:30:00+00:00")),
        (3, iso_ms("2026-11-01T05:59:59.999+00:00")),
        (4, iso_ms("2026-11-01T06:00:00+00:00")),
        (5, iso_ms("2026-11-01T06:30:00+00:00")),
        (6, iso_ms("2026-11-01T07:00:00+00:00")),
        (8, iso_ms("2026-11-01T07:00:00.001+00:00")),
    ]
    refused = [(n, e) for n, e in got if isinstance(e, ParseError)]
    assert [(n, e.reason) for n, e in refused] == [(7, mt5_csv.SKIPPED_TIME)]
    assert "2026-03-08 09:30:00" in refused[0][1].detail


def test_a_refused_line_does_not_move_the_pass_of_the_repeated_hour(tmp_path: Path) -> None:
    # Athens leaves summer time on 2026-10-25: 03:00-04:00 shows twice
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2026.10.25\t03:10:00\t1.1\t1.2\t\t\t6",
            "2026.11.25\t03:40:00\t1.3\t1.2\t\t\t6",  # a wrong date, and bid > ask
            "2026.10.25\t03:20:00\t1.1\t1.2\t\t\t6",
            "2026.10.25\t03:05:00\t1.1\t1.2\t\t\t6",  # the second time round
        ],
    )
    got = ticks(path, mt5_csv.parse_server_time("Europe/Athens"))
    assert [(n, t.time_ms) for n, t in got if isinstance(t, TickRow)] == [
        (2, iso_ms("2026-10-25T00:10:00+00:00")),
        (4, iso_ms("2026-10-25T00:20:00+00:00")),
        (5, iso_ms("2026-10-25T01:05:00+00:00")),
    ]
    assert [(n, e.reason) for n, e in got if isinstance(e, ParseError)] == [
        (3, mt5_csv.BID_ABOVE_ASK)
    ]


def test_a_tick_out_of_order_in_the_repeated_hour_is_refused_not_taken_for_its_second_pass(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2026.10.25\t03:10:00.005\t1.1\t1.2\t\t\t6",
            "2026.10.25\t03:10:00.004\t1.1\t1.2\t\t\t6",  # 1 ms out of order
            "2026.10.25\t03:20:00\t1.1\t1.2\t\t\t6",
            "2026.10.25\t03:05:00\t1.1\t1.2\t\t\t6",  # the second time round
        ],
    )
    got = ticks(path, mt5_csv.parse_server_time("Europe/Athens"))
    assert [(n, t.time_ms) for n, t in got if isinstance(t, TickRow)] == [
        (2, iso_ms("2026-10-25T00:10:00.005+00:00")),
        (4, iso_ms("2026-10-25T00:20:00+00:00")),
        (5, iso_ms("2026-10-25T01:05:00+00:00")),
    ]
    assert [(n, e.reason) for n, e in got if isinstance(e, ParseError)] == [
        (3, mt5_csv.OUT_OF_ORDER)
    ]


def test_bars_of_the_repeated_hour_take_its_second_pass(tmp_path: Path) -> None:
    # Athens left summer time on 2024-10-27: 03:00-04:00 showed twice
    path = write(
        tmp_path,
        [BAR_HEADER]
        + [
            f"2024.10.27\t{hh}:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t3" for hh in ("02", "03", "03", "04")
        ],
    )
    got = bars(path, Timeframe.H1, mt5_csv.parse_server_time("Europe/Athens"))
    assert [(n, b.open_time_ms) for n, b in got if isinstance(b, Bar)] == [
        (2, iso_ms("2024-10-26T23:00:00+00:00")),
        (3, iso_ms("2024-10-27T00:00:00+00:00")),
        (4, iso_ms("2024-10-27T01:00:00+00:00")),
        (5, iso_ms("2024-10-27T02:00:00+00:00")),
    ]


def test_a_refused_bar_of_the_repeated_hour_keeps_the_next_one_on_its_second_pass(
    tmp_path: Path,
) -> None:
    """The first 03:00 bar is refused for its prices: the second 03:00 is still the second
    pass, 01:00 UTC, not taken for the first one an hour early."""
    path = write(
        tmp_path,
        [
            BAR_HEADER,
            "2024.10.27\t02:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t3",
            "2024.10.27\t03:00\t1.1\t1.0\t1.0\t1.15\t10\t0\t3",  # high below the open
            "2024.10.27\t03:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t3",
            "2024.10.27\t04:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t3",
        ],
    )
    got = bars(path, Timeframe.H1, mt5_csv.parse_server_time("Europe/Athens"))
    assert [(n, b.open_time_ms) for n, b in got if isinstance(b, Bar)] == [
        (2, iso_ms("2024-10-26T23:00:00+00:00")),
        (4, iso_ms("2024-10-27T01:00:00+00:00")),
        (5, iso_ms("2024-10-27T02:00:00+00:00")),
    ]
    assert [(n, e.reason) for n, e in got if isinstance(e, ParseError)] == [(3, mt5_csv.BAD_OHLC)]


def test_an_empty_value_is_refused_and_never_carried(tmp_path: Path) -> None:
    """MT5's EMPTY_VALUE (DBL_MAX), or any price or volume from 1e15 on, is reported by line
    (candle-ingest would refuse it); a blank ask after it carries the last good one."""
    big = "1.7976931348623157e+308"
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2024.01.02\t00:00:00.000\t1.1\t1.2\t\t\t6",
            f"2024.01.02\t00:00:01.000\t1.1\t{big}\t\t\t6",
            "2024.01.02\t00:00:02.000\t1.1\t\t\t\t2",
            "2024.01.02\t00:00:03.000\t1.1\t1.2\t\t1e15\t6",
        ],
    )
    got = ticks(path)
    assert [(n, t.ask) for n, t in got if isinstance(t, TickRow)] == [(2, 1.2), (4, 1.2)]
    assert [(n, e.reason) for n, e in got if isinstance(e, ParseError)] == [
        (3, mt5_csv.TOO_LARGE),
        (5, mt5_csv.TOO_LARGE),
    ]


def test_a_last_of_zero_is_no_last_price_not_a_refused_line(tmp_path: Path) -> None:
    """MT5 writes a <LAST> of 0 for a symbol without deals (bid/ask-only FX): no last price,
    as the live path reads it, not a bad one; a negative last is still refused."""
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2024.01.02\t00:00:00.000\t1.1\t1.2\t0\t0\t6",
            "2024.01.02\t00:00:01.000\t\t1.3\t0.000\t\t4",
            "2024.01.02\t00:00:02.000\t1.1\t1.2\t-1\t\t6",
        ],
    )
    assert ticks(path) == [
        (2, TickRow(time_ms=JAN2, bid=1.1, ask=1.2, last=None, volume=0.0, flags=6)),
        (3, TickRow(time_ms=JAN2 + 1000, bid=1.1, ask=1.3, last=None, flags=4)),
        (4, ParseError(mt5_csv.NOT_POSITIVE, "<LAST> -1")),
    ]


def test_a_header_with_trailing_separators_and_counts_in_plain_digits(tmp_path: Path) -> None:
    """A trailing tab on the header is no column, as on a data line; FLAGS, TICKVOL and
    SPREAD are plain digits (int() would take "1_0" as 10 and "+5" as 5)."""
    path = write(
        tmp_path,
        [
            TICK_HEADER + "\t",
            "2024.01.02\t00:00:00.000\t1.1\t1.2\t\t\t6",
            "2024.01.02\t00:00:01.000\t1.1\t1.2\t\t\t1_0",
            "2024.01.02\t00:00:02.000\t1.1\t1.2\t\t\t+5",
            "2024.01.02\t00:00:03.000\t1.1\t1.2\t\t\t-5",
        ],
    )
    got = ticks(path)
    assert [(n, t.flags) for n, t in got if isinstance(t, TickRow)] == [(2, 6)]
    assert [(n, e.reason) for n, e in got if isinstance(e, ParseError)] == [
        (3, mt5_csv.BAD_NUMBER),
        (4, mt5_csv.BAD_NUMBER),
        (5, mt5_csv.NEGATIVE),
    ]


def test_a_date_a_time_zone_cannot_convert_is_a_refused_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2026.01.15\t10:00:00\t1.1\t1.2\t\t\t6",
            "0001.01.01\t00:00:00\t1.1\t1.2\t\t\t6",
            "9999.12.31\t23:00:00\t1.1\t1.2\t\t\t6",
        ],
    )
    for zone in ("America/New_York+7", "Europe/Athens", "America/New_York-5"):
        got = dict(ticks(path, mt5_csv.parse_server_time(zone)))
        assert isinstance(got[2], TickRow)
        assert isinstance(got[3], ParseError)
        assert got[3].reason in (mt5_csv.BAD_DATE, mt5_csv.BEFORE_EPOCH), zone
        # the end of 9999 converts, or is refused: never an exception
        assert isinstance(got[4], TickRow | ParseError)


def test_daily_bars_of_a_daylight_saving_server_open_at_its_midnight_in_utc(
    tmp_path: Path,
) -> None:
    header = "<DATE>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>"
    path = write(
        tmp_path,
        [header] + [f"2026.10.{d}\t1.1\t1.2\t1.0\t1.15\t10" for d in (22, 23, 26, 27)],
    )
    got = bars(path, Timeframe.D1, mt5_csv.parse_server_time("Europe/Athens"))
    # Athens leaves summer time on 2026-10-25: midnight is 21:00 UTC before, 22:00 after
    assert [b.open_time_ms for _, b in got if isinstance(b, Bar)] == [
        iso_ms("2026-10-21T21:00:00+00:00"),
        iso_ms("2026-10-22T21:00:00+00:00"),
        iso_ms("2026-10-25T22:00:00+00:00"),
        iso_ms("2026-10-26T22:00:00+00:00"),
    ]


def test_server_time_is_hours_or_a_time_zone_shifted_by_hours() -> None:
    assert mt5_csv.parse_server_time("2") == UTC2
    assert mt5_csv.parse_server_time(" -5.5 ") == -19_800_000
    for text, shift_ms in [
        ("Europe/Athens", 0),
        ("America/New_York+7", 25_200_000),
        ("UTC+2", UTC2),
        ("Etc/GMT-2", 0),  # a zone whose own name has a sign
        ("America/Port-au-Prince", 0),
    ]:
        zone = mt5_csv.parse_server_time(text)
        assert isinstance(zone, mt5_csv.ServerZone)
        assert (str(zone), zone.shift_ms) == (text, shift_ms)
    for bad, says in [
        ("Mars/Olympus", "not a number of hours nor a time zone: 'Mars/Olympus'"),
        ("America/New_York+20", "not a number of hours nor a time zone"),
        ("15", "UTC offset must be -14..14 hours: '15'"),
        ("", "not a number of hours: ''"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)) as err:
            mt5_csv.parse_server_time(bad)
        assert "\n" not in str(err.value)


def test_utf16_with_bom_and_any_column_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            "<TIME>\t<ASK>\t<DATE>\t<BID>\t<FLAGS>",  # no LAST/VOLUME, other order
            "00:00:00.100\t1.2\t2024.01.02\t1.1\t6",
            "00:00:00.200\t\t2024.01.02\t1.15\t2",
        ],
        encoding="utf-16",  # with BOM, native order
    )
    assert path.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert ticks(path) == [
        (2, TickRow(time_ms=JAN2 + 100, bid=1.1, ask=1.2, flags=6)),
        (3, TickRow(time_ms=JAN2 + 200, bid=1.15, ask=1.2, flags=2)),
    ]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-8-sig", "utf-8"])
def test_encodings_are_detected(tmp_path: Path, encoding: str) -> None:
    path = write(
        tmp_path, [TICK_HEADER, "2024.01.02\t00:00:00.000\t1.1\t1.2\t\t\t6"], encoding=encoding
    )
    assert ticks(path) == [(2, TickRow(time_ms=JAN2, bid=1.1, ask=1.2, flags=6))]


def test_comma_separated_export(tmp_path: Path) -> None:
    path = write(tmp_path, ["<DATE>,<TIME>,<BID>,<ASK>", "2024.01.02,00:00:00.250,1.1,1.2"])
    assert ticks(path) == [(2, TickRow(time_ms=JAN2 + 250, bid=1.1, ask=1.2))]


def test_malformed_tick_lines_are_numbered_and_later_lines_still_parse(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            TICK_HEADER,
            "2024.01.02\t00:00:00.000\t\t1.2\t\t\t4",  # 2: no bid known yet (ask is kept)
            "2024.01.02\t00:00:00.001\t1.1\t\t\t\t2",  # 3: bid now, ask carried from line 2
            "2024.01.02\t00:00:00.002\tabc\t1.2\t\t\t6",  # 4: not a number
            "",  # blank lines are skipped, not refused
            "2024.13.02\t00:00:00.003\t1.1\t1.2\t\t\t6",  # 6: month 13
            "2024.01.02\t24:00:00.003\t1.1\t1.2\t\t\t6",  # 7: hour 24
            "2024.01.02\t00:00:00.004\t1.3\t\t\t\t2",  # 8: bid above carried ask
            "2024.01.02\t00:00:00.005\tnan\t1.2\t\t\t6",  # 9
            "2024.01.02\t00:00:00.006\t-1.1\t1.2\t\t\t6",  # 10
            "2024.01.02\t00:00:00.007\t1.1\t1.2\t\t-3\t6",  # 11: negative volume
            "2024.01.02\t00:00:00.008\t1.1\t1.2",  # 12: truncated line
            "2024.01.02\t00:00:00.009\t\t\t\t\t0",  # 13: nothing at all
            "2024.01.02\t00:00:00.000\t1.1\t1.2\t\t\t6",  # 14: earlier than line 3
            "2024.01.02\t00:00:00.010\t\t1.25\t\t\t4",  # 15: bid carried from line 3
        ],
    )
    got = ticks(path)
    refused = {n: item.reason for n, item in got if isinstance(item, ParseError)}
    assert refused == {
        2: "no_previous_bid",
        4: "bad_number",
        6: "bad_date",
        7: "bad_time",
        8: "bid_above_ask",
        9: "not_finite",
        10: "not_positive",
        11: "negative",
        12: "field_count",
        13: "empty_tick",
        14: "out_of_order",
    }
    assert refused.keys() <= set(range(2, 16))
    assert all(r in mt5_csv.REASONS for r in refused.values())
    assert [(n, t) for n, t in got if isinstance(t, TickRow)] == [
        (3, TickRow(time_ms=JAN2 + 1, bid=1.1, ask=1.2, flags=2)),
        (15, TickRow(time_ms=JAN2 + 10, bid=1.1, ask=1.25, flags=4)),
    ]
    detail = dict(got)[4]
    assert isinstance(detail, ParseError)
    assert detail.detail == "<BID> 'abc'"


def test_time_before_epoch_after_offset_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, [TICK_HEADER, "1970.01.01\t01:00:00.000\t1.1\t1.2\t\t\t6"])
    [(_, error)] = ticks(path, UTC2)
    assert isinstance(error, ParseError)
    assert error.reason == "before_epoch"


def test_header_without_required_columns_refuses_the_file_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, [BAR_HEADER, "2024.01.02\t00:00:00\t1\t1\t1\t1\t1\t0\t0"])
    with pytest.raises(HeaderError) as info:
        ticks(path)
    message = str(info.value)
    assert "\n" not in message
    assert "not an MT5 ticks export: no <BID>, <ASK>" in message
    empty = write(tmp_path, [], name="empty.csv")
    empty.write_bytes(b"")
    with pytest.raises(HeaderError, match="empty file"):
        ticks(empty)


# --- bars ----------------------------------------------------------------------------


def test_bars_exact_values_spread_in_price_units(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            BAR_HEADER,
            "2024.01.02\t02:00:00\t1.10450\t1.10480\t1.10440\t1.10470\t120\t0\t12",
            "2024.01.02\t02:05:00\t1.10470\t1.10470\t1.10400\t1.10410\t98\t1500\t3",
        ],
    )
    got = bars(path, offset_ms=UTC2, point=Decimal("0.00001"))
    common = {"feed": "demo", "symbol": "US500.cash", "tf": Timeframe.M5}
    assert got == [
        (
            2,
            Bar(
                **common,
                open_time_ms=JAN2,
                open=1.1045,
                high=1.1048,
                low=1.1044,
                close=1.1047,
                tick_volume=120,
                real_volume=0.0,
                spread=0.00012,  # not 12 * 1e-05 == 0.00012000000000000002
            ),
        ),
        (
            3,
            Bar(
                **common,
                open_time_ms=JAN2 + 300_000,
                open=1.1047,
                high=1.1047,
                low=1.104,
                close=1.1041,
                tick_volume=98,
                real_volume=1500.0,
                spread=0.00003,
            ),
        ),
    ]


def test_point_is_inferred_from_the_prices_decimals(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            BAR_HEADER,
            "2024.01.02\t00:00:00\t151.2\t151.25\t151.1\t151.2\t5\t0\t7",
            "2024.01.02\t00:05:00\t151.2\t151.214\t151.2\t151.21\t5\t0\t7",
        ],
    )
    assert mt5_csv.infer_point(path) == Decimal("0.001")
    got = bars(path)  # point=None: inferred
    assert [b.spread for _, b in got if isinstance(b, Bar)] == [0.007, 0.007]
    integers = write(
        tmp_path, [BAR_HEADER, "2024.01.02\t00:00:00\t4700\t4710\t4690\t4705\t5\t0\t2"], name="i"
    )
    assert mt5_csv.infer_point(integers) == Decimal(1)


def test_d1_export_without_time_column(tmp_path: Path) -> None:
    header = "<DATE>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
    path = write(
        tmp_path,
        [
            header,
            "2024.01.02\t1.1\t1.2\t1.0\t1.15\t10\t0\t0",
            "2024.01.03\t1.15\t1.2\t1.1\t1.1\t9\t0\t0",
        ],
    )
    got = bars(path, tf=Timeframe.D1, offset_ms=UTC2)
    assert [(n, b.open_time_ms) for n, b in got if isinstance(b, Bar)] == [
        (2, JAN2 - UTC2),
        (3, JAN2 + 86_400_000 - UTC2),
    ]
    with pytest.raises(HeaderError, match="only a D1 export may omit"):
        bars(path, tf=Timeframe.H1)


def test_malformed_bar_lines_are_numbered_and_later_lines_still_parse(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            BAR_HEADER,
            "2024.01.02\t00:00:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t1",  # 2 ok
            "2024.01.02\t00:05:00\t1.1\t1.12\t1.0\t1.15\t10\t0\t1",  # 3 high below close
            "2024.01.02\t00:05:00\t1.1\t1.2\t1.11\t1.15\t10\t0\t1",  # 4 low above open
            "2024.01.02\t00:07:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t1",  # 5 not on an M5 boundary
            "2024.01.02\t00:00:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t1",  # 6 not after line 2
            "2024.01.02\t00:10:00\t1.1\t1.2\t1.0\t1.15\t-1\t0\t1",  # 7 negative tick volume
            "2024.01.02\t00:10:00\t1.1\t1.2\t1.0\t1.15\t10\t-5\t1",  # 8 negative volume
            "2024.01.02\t00:10:00\t1.1\t1.2\t1.0\tinf\t10\t0\t1",  # 9
            "2024.01.02\t00:10:00\t0\t1.2\t0\t1.15\t10\t0\t1",  # 10
            "2024.01.02\t00:10:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t1.5",  # 11 spread not points
            "2024.01.02\t00:10:00\t1.1\t1.2\t1.0\t1.15\t10\t0\t1",  # 12 ok
        ],
    )
    got = bars(path, point=Decimal("0.1"))
    refused = {n: item.reason for n, item in got if isinstance(item, ParseError)}
    assert refused == {
        3: "bad_ohlc",
        4: "bad_ohlc",
        5: "misaligned_time",
        6: "out_of_order",
        7: "negative",
        8: "negative",
        9: "not_finite",
        10: "not_positive",
        11: "bad_number",
    }
    ok = [(n, b.open_time_ms, b.spread) for n, b in got if isinstance(b, Bar)]
    assert ok == [(2, JAN2, 0.1), (12, JAN2 + 600_000, 0.1)]


def test_bad_feed_or_symbol_fails_before_reading(tmp_path: Path) -> None:
    path = write(tmp_path, [TICK_HEADER])
    with pytest.raises(ValueError, match="feed"):
        mt5_csv.iter_ticks(path, feed="a.b", symbol="EURUSD", server_time=0)
    with pytest.raises(ValueError, match="symbol"):
        mt5_csv.iter_ticks(path, feed="demo", symbol="EUR\nUSD", server_time=0)


def test_progress_reaches_the_file_size(tmp_path: Path) -> None:
    lines = [TICK_HEADER] + [
        f"2024.01.02\t00:00:{i // 1000:02d}.{i % 1000:03d}\t1.1\t1.2\t\t\t6" for i in range(3000)
    ]
    path = write(tmp_path, lines, encoding="utf-16")
    seen: list[int] = []
    rows = list(
        mt5_csv.iter_ticks(path, feed="demo", symbol="EURUSD", server_time=0, progress=seen.append)
    )
    assert len(rows) == 3000
    assert seen == sorted(seen)
    assert len(seen) > 1
    assert seen[-1] == path.stat().st_size
