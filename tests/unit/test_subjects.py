"""Subjects: symbols survive build -> parse, tokens are always legal, escaping is injective."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest

from contracts import subjects
from contracts.messages import Timeframe
from contracts.subjects import SubjectError

# A NATS token: no separator, no wildcard, no whitespace, not empty. Also a KV key.
NATS_TOKEN = re.compile(r"^[^.*>\s]+$")
KV_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")

# (symbol, its token) written out by hand
ESCAPES = [
    ("EURUSD", "EURUSD"),
    ("EURUSD_i", "EURUSD_i"),
    ("US-30", "US-30"),
    ("US500.cash", "US500=2Ecash"),
    ("BRK B", "BRK=20B"),
    ("EUR/USD", "EUR=2FUSD"),
    ("GER40*", "GER40=2A"),
    ("XAU>USD", "XAU=3EUSD"),
    ("#AAPL", "=23AAPL"),
    ("=A", "=3DA"),
    ("a=2Eb", "a=3D2Eb"),
    ("EURUSD.", "EURUSD=2E"),
    (".EURUSD", "=2EEURUSD"),
    ("Ü-ß", "=C3=9C-=C3=9F"),
    ("BTC€", "BTC=E2=82=AC"),
    ("😀", "=F0=9F=98=80"),
    ("a\\b", "a=5Cb"),
    ("%41", "=2541"),
]

TRICKY = [symbol for symbol, _ in ESCAPES] + [
    "SPX500.",
    "..",
    "a b c",
    "x*>y",
    "=",
    "==",
    "=3D",
    "=2e",
    "EUR/USD.r",
    "日経225",
    "NAS100m#",
    "A" * 64,
    "€" * 64,
]

DOMAINS: list[tuple[str, Callable[..., str], Timeframe | None]] = [
    (subjects.TICKS, subjects.ticks, None),
    *((subjects.CANDLES, subjects.candles, tf) for tf in Timeframe),
    *((subjects.FEATURES, subjects.features, tf) for tf in Timeframe),
    *((subjects.SCORES, subjects.scores, tf) for tf in Timeframe),
    *((subjects.SIGNALS, subjects.signals, tf) for tf in Timeframe),
]


@pytest.mark.parametrize(("symbol", "token"), ESCAPES, ids=[t for _, t in ESCAPES])
def test_escape_is_what_the_docs_say(symbol: str, token: str) -> None:
    assert subjects.escape(symbol) == token
    assert subjects.unescape(token) == symbol


def test_built_subjects_are_what_the_docs_say() -> None:
    assert subjects.ticks("icm-live", "US500.cash") == "ticks.icm-live.US500=2Ecash"
    assert subjects.candles("icm", "EUR/USD", Timeframe.M5) == "candles.icm.EUR=2FUSD.M5"
    assert subjects.signals("icm", "BRK B", Timeframe.D1) == "signals.icm.BRK=20B.D1"
    assert (
        subjects.features("icm", "US500.cash", Timeframe.H4, namespace="replay-1")
        == "ns.replay-1.features.icm.US500=2Ecash.H4"
    )
    assert subjects.dlq("candle-ingest") == "dlq.candle-ingest"
    assert subjects.dlq("candle-ingest", namespace="r1") == "ns.r1.dlq.candle-ingest"
    assert subjects.wildcard(subjects.TICKS) == "ticks.*.*"
    assert subjects.wildcard(subjects.SCORES) == "scores.*.*.*"
    assert subjects.wildcard(subjects.DLQ) == "dlq.*"
    assert (
        subjects.wildcard(subjects.CANDLES, feed="icm", namespace="r1") == "ns.r1.candles.icm.*.*"
    )


@pytest.mark.parametrize("namespace", [None, "replay-1", "NS_x"])
@pytest.mark.parametrize("symbol", TRICKY)
def test_every_domain_round_trips_tricky_symbols(symbol: str, namespace: str | None) -> None:
    for domain, build, tf in DOMAINS:
        args = ("icm-live", symbol) if tf is None else ("icm-live", symbol, tf)
        subject = build(*args, namespace=namespace)
        assert subjects.parse(subject) == subjects.Parsed(domain, "icm-live", symbol, tf, namespace)
        tokens = subject.split(".")
        assert all(NATS_TOKEN.match(t) and KV_KEY.match(t) for t in tokens), subject
        assert len(tokens) == (3 if tf is None else 4) + (0 if namespace is None else 2)
        assert _matches(subjects.wildcard(domain, namespace=namespace), subject)
        assert _matches(subjects.wildcard(domain, feed="icm-live", namespace=namespace), subject)
        assert not _matches(subjects.wildcard(domain, feed="other", namespace=namespace), subject)
        if namespace is not None:
            assert not _matches(subjects.wildcard(domain), subject)


def test_escaping_is_injective_on_a_large_set_of_symbols() -> None:
    symbols = set(TRICKY) | set(_random_symbols(random.Random(20260101), 20_000))
    tokens: dict[str, str] = {}
    for symbol in symbols:
        token = subjects.escape(symbol)
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", token), (symbol, token)
        assert KV_KEY.match(token)
        assert tokens.setdefault(token, symbol) == symbol, f"{symbol!r} and {tokens[token]!r}"
        assert subjects.unescape(token) == symbol
    assert len(tokens) == len(symbols)


def _random_symbols(rng: random.Random, n: int) -> list[str]:
    """Printable symbols: broker-like ASCII, escape look-alikes and random unicode."""
    ascii_pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-#/=*>+&$!%~ "
    planes = [(0x20, 0x7E), (0xA1, 0x24F), (0x370, 0x52F), (0x3040, 0x30FF), (0x4E00, 0x9FFF)]
    planes += [(0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x10FFF)]
    out: list[str] = []
    while len(out) < n:
        kind = rng.random()
        length = rng.randint(1, 64)
        if kind < 0.4:
            chars = [rng.choice(ascii_pool) for _ in range(length)]
        elif kind < 0.55:
            chars = [rng.choice("=2E3DAF0") for _ in range(length)]
        else:
            chars = []
            for _ in range(length):
                lo, hi = rng.choice(planes)
                chars.append(chr(rng.randint(lo, hi)))
        symbol = "".join(chars)
        try:
            subjects.check_symbol(symbol)
        except SubjectError:
            continue
        out.append(symbol)
    return out


@pytest.mark.parametrize(
    "token",
    [
        "",
        "=41",  # escaped although safe ("A")
        "EUR=5fUSD",  # lower-case hex
        "=2e",
        "=2",  # truncated escape
        "=",
        "=ZZ",
        "A.B",
        "A*",
        ">",
        "A B",
        "=C3",  # half a UTF-8 character
        "=C3=28",  # invalid UTF-8 sequence
        "=C0=AE",  # overlong encoding of "."
        "=ED=A0=80",  # a surrogate
        "=00",  # control character
        "EUR=0AUSD",  # newline
        "=20EURUSD",  # leading space
        "EURUSD=20",  # trailing space
        "EURUSD\n",  # a raw newline would end the protocol line
        "A" * 65,  # too long
        "=C3=A9" * 65,
    ],
)
def test_unescape_refuses_non_canonical_tokens(token: str) -> None:
    with pytest.raises(SubjectError):
        subjects.unescape(token)


@pytest.mark.parametrize(
    "symbol",
    [
        "",
        "A" * 65,
        "€" * 65,
        "EUR\x00USD",
        "EUR\nUSD",
        "EUR\tUSD",
        "\x7f",
        " EURUSD",
        "EURUSD ",
        "EURUSD\u00a0",
        "EUR\u200bUSD",  # zero-width space
        "\ud800",  # lone surrogate
    ],
)
def test_illegal_symbols_are_refused(symbol: str) -> None:
    with pytest.raises(SubjectError):
        subjects.escape(symbol)
    with pytest.raises(SubjectError):
        subjects.ticks("icm", symbol)
    with pytest.raises(SubjectError):
        subjects.candles("icm", symbol, Timeframe.M1)


@pytest.mark.parametrize(
    "feed", ["", "icm.live", "icm live", "icm*", ">", "icm/live", "Ü", "a" * 33, "icm\n"]
)
def test_illegal_feeds_are_refused(feed: str) -> None:
    with pytest.raises(SubjectError):
        subjects.ticks(feed, "EURUSD")
    with pytest.raises(SubjectError):
        subjects.scores(feed, "EURUSD", Timeframe.M1)
    with pytest.raises(SubjectError):
        subjects.wildcard(subjects.CANDLES, feed=feed)


@pytest.mark.parametrize("name", ["", "a.b", "a b", "*", "x" * 33])
def test_illegal_namespaces_and_workers_are_refused(name: str) -> None:
    with pytest.raises(SubjectError):
        subjects.ticks("icm", "EURUSD", namespace=name)
    with pytest.raises(SubjectError):
        subjects.dlq(name)


def test_unknown_timeframe_or_domain_is_refused() -> None:
    with pytest.raises(SubjectError):
        subjects.candles("icm", "EURUSD", "M2")  # type: ignore[arg-type]
    with pytest.raises(SubjectError):
        subjects.wildcard("quotes")


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "ticks",
        "ticks.icm",
        "ticks.icm.EURUSD.M1",
        "ticks.icm.EUR=2fUSD",
        "ticks.icm.=41",
        "candles.icm.EURUSD",
        "candles.icm.EURUSD.M2",
        "candles.icm.EURUSD.m1",
        "candles.icm.EURUSD.M1.extra",
        "quotes.icm.EURUSD",
        "dlq.candle-ingest",
        "ticks.icm live.EURUSD",
        "ticks.*.EURUSD",
        "ns.r1",
        "ns.r 1.ticks.icm.EURUSD",
        "ns.r1.ns.r2.ticks.icm.EURUSD",
        "ns.r1.candles.icm.EURUSD",
    ],
)
def test_parse_refuses_what_no_builder_makes(subject: str) -> None:
    with pytest.raises(SubjectError):
        subjects.parse(subject)


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))
