"""A deterministic tick stream with the troubles of a real EA feed, and what it should yield.

``scenario()`` returns the messages to publish, in order (single ticks and batches, ticks out
of order within the lateness, duplicates, ticks far too late, bad ticks), together with the
ticks that must end up in candles and the dead letters to expect by reason. Everything
expected is decided here from how each tick was generated, never by the code under test.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

FEEDS = ("feed-a", "feed-b")
SYMBOLS = ("EURUSD", "US500.cash", "BRK B")
START_MS = 1_741_038_600_000  # 2025-03-03 21:50 UTC, ten minutes before a 22:00 day start
LATENESS_MS = 60_000


@dataclass
class Scenario:
    messages: list[tuple[str, str, bytes, str]] = field(default_factory=list)
    """(feed, symbol, payload, Nats-Msg-Id) in publish order."""
    accepted: list[dict[str, Any]] = field(default_factory=list)
    """Ticks that must be in the candles, in arrival order."""
    dead: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    symbols: list[tuple[str, str]] = field(default_factory=list)
    last_ms: int = 0

    def halves(self) -> tuple[Scenario, Scenario]:
        """Its messages in two parts to publish one after the other; the second closes."""
        first, second = Scenario(), Scenario()
        half = len(self.messages) // 2
        first.messages, second.messages = self.messages[:half], self.messages[half:]
        second.symbols, second.last_ms = self.symbols, self.last_ms
        return first, second


def _row(t: dict[str, Any]) -> dict[str, Any]:
    return {k: t[k] for k in ("time_ms", "bid", "ask", "last", "volume", "seq")}


def scenario(seed: int = 1, ticks: int = 20_000, *, troubles: bool = True) -> Scenario:
    rng = random.Random(seed)
    sc = Scenario()
    pairs = [(f, s) for f in FEEDS for s in SYMBOLS]
    sc.symbols = pairs
    state = {
        p: {"t": START_MS + rng.randrange(0, 5_000), "mid": rng.uniform(1.0, 5000.0), "seq": 0}
        for p in pairs
    }
    # generate per symbol, then interleave by time so arrival is roughly chronological
    streams: dict[tuple[str, str], list[dict[str, Any]]] = {p: [] for p in pairs}
    per = ticks // len(pairs)
    for p in pairs:
        st = state[p]
        digits = 5 if st["mid"] < 10 else 2
        for _ in range(per):
            gap = rng.expovariate(1 / 900)  # ~0.9 s between ticks
            if rng.random() < 0.0015:
                gap += rng.uniform(300_000, 2_400_000)  # the market goes quiet for a while
            st["t"] += max(1, int(gap))
            st["mid"] *= math.exp(rng.gauss(0, 3e-4))
            spread = round(st["mid"] * rng.uniform(2e-5, 8e-5), digits) or 10**-digits
            bid = round(st["mid"], digits)
            st["seq"] += 1
            volume = round(rng.uniform(0.1, 5.0), 2) if p[1] == "US500.cash" else None
            streams[p].append(
                {
                    "feed": p[0],
                    "symbol": p[1],
                    "time_ms": st["t"],
                    "bid": bid,
                    "ask": round(bid + spread, digits),
                    "last": None,
                    "volume": volume,
                    "seq": st["seq"],
                }
            )
    arrival: list[tuple[str, dict[str, Any]]] = []  # (kind, tick)
    slots = {p: [t["time_ms"] for t in streams[p]] for p in pairs}  # before any swap
    for p in pairs:
        ts = streams[p]
        if troubles:  # neighbours swapped: out of order, well within the lateness
            i = 1
            while i < len(ts):
                if rng.random() < 0.03 and ts[i]["time_ms"] - ts[i - 1]["time_ms"] < 5_000:
                    ts[i - 1], ts[i] = ts[i], ts[i - 1]
                    i += 2
                else:
                    i += 1
    # interleave the symbols by time; within a symbol keep the (partly swapped) order
    merged = sorted(
        ((slots[p][n], n, t) for p in pairs for n, t in enumerate(streams[p])),
        key=lambda x: (x[0], x[1]),
    )
    high: dict[tuple[str, str], int] = {}
    for _, _, t in merged:
        p = (t["feed"], t["symbol"])
        arrival.append(("good", t))
        high[p] = max(high.get(p, 0), t["time_ms"])
        if not troubles:
            continue
        r = rng.random()
        if r < 0.01:
            arrival.append(("duplicate", dict(t)))
        elif r < 0.012:
            late = {**t, "time_ms": high[p] - LATENESS_MS - rng.randrange(1_000, 600_000)}
            late["seq"] = None
            arrival.append(("too_late", late))
        elif r < 0.013:
            arrival.append(("bid_above_ask", {**t, "bid": t["ask"] * 1.01, "seq": None}))
        elif r < 0.014:
            arrival.append(("bad_price", {**t, "bid": -t["bid"], "seq": None}))
        elif r < 0.015:
            arrival.append(("negative_volume", {**t, "volume": -1.0, "seq": None}))
    # package: single ticks or batches of consecutive ticks of one symbol
    i = 0
    n_msg = 0
    while i < len(arrival):
        kind, t = arrival[i]
        p = (t["feed"], t["symbol"])
        size = 1 if rng.random() < 0.3 else rng.randint(2, 40)
        chunk = [(kind, t)]
        j = i + 1
        while (
            j < len(arrival)
            and len(chunk) < size
            and (
                arrival[j][1]["feed"],
                arrival[j][1]["symbol"],
            )
            == p
        ):
            chunk.append(arrival[j])
            j += 1
        i = j
        for k, tick in chunk:
            if k == "good":
                sc.accepted.append(tick)
            elif k == "duplicate":
                sc.duplicates += 1
            else:
                sc.dead[k] += 1
        if len(chunk) == 1:
            payload = msgspec.json.encode(
                {"type": "tick", "v": 1, "feed": p[0], "symbol": p[1], **_row(chunk[0][1])}
            )
        else:
            payload = msgspec.json.encode(
                {
                    "type": "tick_batch",
                    "v": 1,
                    "feed": p[0],
                    "symbol": p[1],
                    "ticks": [_row(tick) for _, tick in chunk],
                }
            )
        n_msg += 1
        sc.messages.append((p[0], p[1], payload, f"sim|{seed}|{n_msg}"))
    sc.last_ms = max(t["time_ms"] for t in sc.accepted)
    return sc


def watermark(feed: str, symbol: str, time_ms: int) -> bytes:
    return msgspec.json.encode(
        {"type": "watermark", "v": 1, "feed": feed, "symbol": symbol, "time_ms": time_ms}
    )


def watermark_headers(feed: str, symbol: str, time_ms: int) -> dict[str, str]:
    """The message id that makes a watermark tickwire's own (candle-ingest takes no other)."""
    return {"Nats-Msg-Id": f"wm|{feed}|{symbol}|{time_ms}"}
