"""NATS subjects: built and parsed here, never by f-strings elsewhere.

Layout (``<domain>.<feed>.<symbol>[.<tf>]``)::

    ticks.<feed>.<symbol>               Tick, TickBatch, Bar from the EA or backfill
    candles.<feed>.<symbol>.<tf>        Candle
    features.<feed>.<symbol>.<tf>       FeatureVector
    scores.<feed>.<symbol>.<tf>         Score
    signals.<feed>.<symbol>.<tf>        Signal
    dlq.<worker>                        DeadLetter

A replay namespace prefixes every subject with ``ns.<name>.`` so it never meets live
traffic.

Symbol tokens are escaped losslessly: ``[A-Za-z0-9_-]`` stand for themselves, every other
byte of the UTF-8 encoding becomes ``=XX`` (upper-case hex). The result is a valid NATS
token and also a valid JetStream KV key and stream-name fragment, e.g.
``US500.cash -> US500=2Ecash``, ``EUR/USD -> EUR=2FUSD``, ``BRK B -> BRK=20B``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Final, NamedTuple

from contracts.messages import Timeframe

_SAFE: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPED_TOKEN: Final = re.compile(r"(?:[A-Za-z0-9_-]|=[0-9A-F]{2})+")
_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_SYMBOL_CHARS: Final = 64

TICKS: Final = "ticks"
CANDLES: Final = "candles"
FEATURES: Final = "features"
SCORES: Final = "scores"
SIGNALS: Final = "signals"
DLQ: Final = "dlq"
NAMESPACE: Final = "ns"

_PER_TF: Final = frozenset({CANDLES, FEATURES, SCORES, SIGNALS})


class SubjectError(ValueError):
    """A subject, symbol, feed or name that tickwire cannot accept."""


class Parsed(NamedTuple):
    domain: str
    feed: str
    symbol: str
    tf: Timeframe | None
    namespace: str | None


def check_symbol(symbol: str) -> str:
    """Refuse symbols no terminal would send: empty, too long, control characters."""
    if not symbol or len(symbol) > MAX_SYMBOL_CHARS:
        raise SubjectError(f"symbol must be 1..{MAX_SYMBOL_CHARS} characters: {symbol!r}")
    if not symbol.isprintable() or symbol != symbol.strip():
        raise SubjectError(f"symbol has control or surrounding blank characters: {symbol!r}")
    return symbol


def check_name(name: str, what: str = "name") -> str:
    """Feeds, workers and namespaces are plain tokens: ``[A-Za-z0-9_-]{1,32}``."""
    if not _NAME.fullmatch(name):
        raise SubjectError(f"{what} must match [A-Za-z0-9_-]{{1,32}}: {name!r}")
    return name


@functools.lru_cache(maxsize=65_536)
def escape(symbol: str) -> str:
    """The subject token of ``symbol`` (cached: a worker meets the same few symbols)."""
    check_symbol(symbol)
    raw = symbol.encode()
    if all(b in _SAFE for b in raw):
        return symbol
    return "".join(chr(b) if b in _SAFE else f"={b:02X}" for b in raw)


def unescape(token: str) -> str:
    if not _ESCAPED_TOKEN.fullmatch(token):
        raise SubjectError(f"not an escaped symbol token: {token!r}")
    if "=" not in token:
        return check_symbol(token)
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "=":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    try:
        symbol = out.decode()
    except UnicodeDecodeError:
        raise SubjectError(f"escaped symbol is not UTF-8: {token!r}") from None
    if escape(symbol) != token:
        raise SubjectError(f"not the canonical escape of {symbol!r}: {token!r}")
    return symbol


def _prefix(namespace: str | None) -> str:
    return "" if namespace is None else f"{NAMESPACE}.{check_name(namespace, 'namespace')}."


def ticks(feed: str, symbol: str, *, namespace: str | None = None) -> str:
    return f"{_prefix(namespace)}{TICKS}.{check_name(feed, 'feed')}.{escape(symbol)}"


def _per_tf(domain: str, feed: str, symbol: str, tf: Timeframe, namespace: str | None) -> str:
    try:
        tf = Timeframe(tf)
    except ValueError:
        raise SubjectError(f"unknown timeframe: {tf!r}") from None
    return f"{_prefix(namespace)}{domain}.{check_name(feed, 'feed')}.{escape(symbol)}.{tf.value}"


def candles(feed: str, symbol: str, tf: Timeframe, *, namespace: str | None = None) -> str:
    return _per_tf(CANDLES, feed, symbol, tf, namespace)


def features(feed: str, symbol: str, tf: Timeframe, *, namespace: str | None = None) -> str:
    return _per_tf(FEATURES, feed, symbol, tf, namespace)


def scores(feed: str, symbol: str, tf: Timeframe, *, namespace: str | None = None) -> str:
    return _per_tf(SCORES, feed, symbol, tf, namespace)


def signals(feed: str, symbol: str, tf: Timeframe, *, namespace: str | None = None) -> str:
    return _per_tf(SIGNALS, feed, symbol, tf, namespace)


def dlq(worker: str, *, namespace: str | None = None) -> str:
    return f"{_prefix(namespace)}{DLQ}.{check_name(worker, 'worker')}"


def wildcard(domain: str, *, feed: str | None = None, namespace: str | None = None) -> str:
    """Every subject of a domain (optionally of one feed), for stream and consumer filters."""
    if domain not in _PER_TF | {TICKS, DLQ}:
        raise SubjectError(f"unknown domain: {domain!r}")
    if domain == DLQ:
        return f"{_prefix(namespace)}{DLQ}.*"
    feed_token = "*" if feed is None else check_name(feed, "feed")
    tail = ".*.*" if domain in _PER_TF else ".*"
    return f"{_prefix(namespace)}{domain}.{feed_token}{tail}"


MAX_DELIVERIES: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
"""The server's advisory that a consumer gave up on a message (delivery limit reached)."""


def max_deliveries(stream: str, consumer: str = "*") -> str:
    """``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>``: the advisories of
    one stream's consumers (every consumer by default), as the server publishes them."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", stream):
        raise SubjectError(f"not a stream name: {stream!r}")
    if consumer != "*":
        check_name(consumer, "consumer")
    return f"{MAX_DELIVERIES}.{stream}.{consumer}"


def check_filter(domain: str, pattern: str, *, namespace: str | None = None) -> str:
    """A consumer filter within one per-timeframe domain: ``<domain>.<feed>.<symbol>.<tf>``
    where each token may be ``*`` and the last given one ``>``."""
    if domain not in _PER_TF:
        raise SubjectError(f"unknown domain: {domain!r}")
    head = f"{_prefix(namespace)}{domain}."
    if not pattern.startswith(head):
        raise SubjectError(f"filter must start with {head!r}: {pattern!r}")
    tokens = pattern[len(head) :].split(".")
    if tokens[-1] == ">" and len(tokens) <= 3:
        tokens = tokens[:-1]
    elif len(tokens) != 3:
        raise SubjectError(f"filter must be {head}<feed>.<symbol>.<tf>: {pattern!r}")
    checks: tuple[Callable[[str], object], ...] = (
        lambda t: check_name(t, "feed"),
        unescape,
        Timeframe,
    )
    for token, check in zip(tokens, checks, strict=False):
        if token == "*":
            continue
        try:
            check(token)
        except ValueError:
            raise SubjectError(f"bad token {token!r} in filter {pattern!r}") from None
    return pattern


def parse(subject: str) -> Parsed:
    """Inverse of the builders for ticks, candles, features, scores and signals."""
    tokens = subject.split(".")
    namespace = None
    if tokens[0] == NAMESPACE and len(tokens) > 2:
        namespace = check_name(tokens[1], "namespace")
        tokens = tokens[2:]
    domain = tokens[0]
    if domain == TICKS and len(tokens) == 3:
        return Parsed(TICKS, check_name(tokens[1], "feed"), unescape(tokens[2]), None, namespace)
    if domain in _PER_TF and len(tokens) == 4:
        try:
            tf = Timeframe(tokens[3])
        except ValueError:
            raise SubjectError(f"unknown timeframe in {subject!r}") from None
        feed = check_name(tokens[1], "feed")
        return Parsed(domain, feed, unescape(tokens[2]), tf, namespace)
    raise SubjectError(f"not a tickwire market subject: {subject!r}")
