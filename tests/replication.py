"""What the pipeline publishes on CANDLES, FEATURES, SCORES and SIGNALS, with its troubles,
and what the analytic store must hold afterwards, computed with pandas.

``published()`` makes candles with revisions and the features, scores and signals of each
revision, in a publish order with the troubles a replicator meets: a revision published
before the one it replaces, messages published twice (some long after a later revision). ``expected()`` reduces what was
published to the rows a table must hold: per natural key the highest revision, the later in
the stream among equals. It never asks the code under test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgspec
import pandas as pd

from contracts import streams, subjects
from contracts.codec import encode
from contracts.messages import Candle, FeatureVector, Score, Side, Signal, Timeframe

FEEDS = ("feed-a", "feed-b")
SYMBOLS = ("EURUSD", "US500.cash")
START_MS = 1_741_038_600_000  # 2025-03-03 21:50 UTC
FEATURE_SET = "fs-core-v3"
MODEL = "lgbm-2025-03-01"

# natural keys and revision of each table, as the schema defines them
KEYS = {
    "candles": ["feed", "symbol", "tf", "open_time_ms"],
    "features": ["feed", "symbol", "tf", "feature_set_id", "open_time_ms"],
    "scores": ["feed", "symbol", "tf", "model_version", "open_time_ms"],
    "signals": ["feed", "symbol", "tf", "model_version", "open_time_ms"],
}
REVISION = {
    "candles": "revision",
    "features": "candle_revision",
    "scores": "candle_revision",
    "signals": "candle_revision",
}
BASE = {
    "candles": streams.CANDLES,
    "features": streams.FEATURES,
    "scores": streams.SCORES,
    "signals": streams.SIGNALS,
}
SUBJECT = {
    "candles": subjects.candles,
    "features": subjects.features,
    "scores": subjects.scores,
    "signals": subjects.signals,
}


@dataclass(frozen=True)
class Published:
    table: str
    subject: str
    payload: bytes
    msg_id: str
    message: Candle | FeatureVector | Score | Signal


def _messages(rng: random.Random, feed: str, symbol: str, tf: Timeframe, i: int) -> list[Any]:
    """Every revision of one candle and what the pipeline derives from each."""
    open_ms = START_MS + i * tf.ms
    mid = rng.uniform(1.0, 5000.0)
    out: list[Any] = []
    for revision in range(1 + rng.choice((0, 0, 0, 1, 2))):
        out += _revision(rng, feed, symbol, tf, open_ms, mid, revision)
    return out


def _revision(
    rng: random.Random, feed: str, symbol: str, tf: Timeframe, open_ms: int, mid: float, rev: int
) -> list[Any]:
    o, c = (round(mid * (1 + rng.gauss(0, 1e-3)), 5) for _ in range(2))
    high = round(max(o, c) * (1 + abs(rng.gauss(0, 1e-3))), 5)
    low = round(min(o, c) * (1 - abs(rng.gauss(0, 1e-3))), 5)
    candle = Candle(
        feed=feed, symbol=symbol, tf=tf, open_time_ms=open_ms, close_time_ms=open_ms + tf.ms,
        open=o, high=high, low=low, close=c, tick_volume=rng.randrange(1, 500),
        real_volume=rng.uniform(0, 100), spread_mean=rng.uniform(0, 1e-3),
        spread_max=rng.uniform(1e-3, 2e-3), first_tick_ms=open_ms + rng.randrange(0, 1000),
        last_tick_ms=open_ms + tf.ms - rng.randrange(1, 1000), revision=rev,
    )  # fmt: skip
    features = FeatureVector(
        feed=feed, symbol=symbol, tf=tf, open_time_ms=open_ms, candle_revision=rev,
        close=c, close_time_ms=candle.close_time_ms, last_tick_ms=candle.last_tick_ms,
        feature_set_id=FEATURE_SET, values=[rng.gauss(0, 1) for _ in range(rng.randrange(3, 9))],
        warming_up=rng.random() < 0.1,
    )  # fmt: skip
    p = [rng.random() for _ in range(3)]
    total = sum(p)
    probabilities = [x / total for x in p]
    score = Score(
        feed=feed, symbol=symbol, tf=tf, open_time_ms=open_ms, candle_revision=rev,
        close=c, close_time_ms=candle.close_time_ms, last_tick_ms=candle.last_tick_ms,
        feature_set_id=FEATURE_SET, model_version=MODEL, probabilities=probabilities,
        score=probabilities[2] - probabilities[0],
    )  # fmt: skip
    out: list[Any] = [candle, features, score]
    if abs(score.score) > 0.2:
        signal_id = f"{feed}|{symbol}|{tf.value}|{open_ms}|{MODEL}"
        out.append(
            Signal(
                signal_id=signal_id,
                feed=feed,
                symbol=symbol,
                tf=tf,
                open_time_ms=open_ms,
                candle_revision=rev,
                side=Side.BUY if score.score > 0 else Side.SELL,
                strength=abs(score.score),
                ref_price=c,
                expires_ms=open_ms + 2 * tf.ms,
                model_version=MODEL,
                feature_set_id=FEATURE_SET,
                corrects=signal_id if rev else None,
            )
        )
    return out


_TABLE = {Candle: "candles", FeatureVector: "features", Score: "scores", Signal: "signals"}


def published(
    seed: int, candles_per_series: int, *, namespace: str, troubles: bool = True
) -> list[Published]:
    """Messages in publish order over two feeds, two symbols and M1 and M5."""
    rng = random.Random(seed)
    series = [(f, s, tf) for f in FEEDS for s in SYMBOLS for tf in (Timeframe.M1, Timeframe.M5)]
    ordered: list[Any] = []
    for i in range(candles_per_series):
        for feed, symbol, tf in series:
            ordered += _messages(rng, feed, symbol, tf, i)
    if troubles:
        # a revision overtaken by the one that replaces it, and messages published twice
        for j in range(len(ordered) - 1):
            if rng.random() < 0.04:
                ordered[j], ordered[j + 1] = ordered[j + 1], ordered[j]
        # and an old revision published again long after the one that replaced it
        for j in sorted(rng.sample(range(len(ordered)), len(ordered) // 30), reverse=True):
            ordered.insert(j + rng.choice((1, 10, 100, 1000)), ordered[j])
    out = []
    for n, m in enumerate(ordered):
        table = _TABLE[type(m)]
        subject = SUBJECT[table](m.feed, m.symbol, m.tf, namespace=namespace)
        out.append(Published(table, subject, encode(m), f"{table}|{n}", m))
    return out


def expected(messages: list[Published]) -> dict[str, list[dict[str, Any]]]:
    """Rows per table: highest revision per key, the later in the stream among equals."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table in KEYS:
        rows = [
            msgspec.structs.asdict(p.message) | {"stream_order": n}
            for n, p in enumerate(messages)
            if p.table == table
        ]
        if not rows:
            out[table] = []
            continue
        df = pd.DataFrame(rows)
        df["tf"] = df["tf"].map(lambda tf: tf.value)
        if "side" in df:
            df["side"] = df["side"].map(lambda side: side.value)
        df = df.sort_values([REVISION[table], "stream_order"], kind="stable")
        latest = df.drop_duplicates(KEYS[table], keep="last").sort_values(KEYS[table])
        latest = latest.drop(columns=["stream_order", "source"], errors="ignore")
        # the rebuild generation picks the message in force; the tables hold its values
        latest = latest.drop(columns=["rebuild"], errors="ignore")
        if table in ("features", "scores"):
            # The candle's close and times ride along for the signal path; the analytic
            # store keeps them once, in market.candles.
            latest = latest.drop(columns=["close", "close_time_ms", "last_tick_ms"])
        out[table] = _plain(latest.to_dict("records"))
    return out


def _plain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """numpy scalars to Python ones, pandas' NaN of a missing optional to None."""
    clean = []
    for row in rows:
        item = {}
        for k, v in row.items():
            if isinstance(v, float) and v != v:
                v = None
            elif hasattr(v, "item") and not isinstance(v, list):
                v = v.item()
            item[k] = v
        clean.append(item)
    return clean
