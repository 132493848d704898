"""Candles computed the plain way, with pandas, to check the streaming aggregation against.

Sort the accepted ticks by time (ties keep arrival order), bucket each timeframe by flooring
the time (shifted by the day start), and take first/max/min/last of the bid per bucket. Bars
(backfill) join in as one sample each over their whole period.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

TIMEFRAMES = {
    "M1": 60_000,
    "M5": 300_000,
    "M15": 900_000,
    "M30": 1_800_000,
    "H1": 3_600_000,
    "H4": 14_400_000,
    "D1": 86_400_000,
}


def candles(ticks: list[dict[str, Any]], *, day_start_ms: int = 0) -> dict[tuple, dict[str, Any]]:
    """{(feed, symbol, tf, open_time_ms): candle fields} from accepted ticks in arrival order."""
    return with_bars([], ticks, day_start_ms=day_start_ms)


def with_bars(
    bars: list[dict[str, Any]], ticks: list[dict[str, Any]], *, day_start_ms: int = 0
) -> dict[tuple, dict[str, Any]]:
    """``candles`` of bars and ticks together: a bar is one sample over its whole period
    (its OHLC, its tick volume, its spread once), a tick one sample at its time."""
    df = pd.DataFrame(ticks)
    if df.empty:
        df = pd.DataFrame(columns=["feed", "symbol", "time_ms", "bid", "ask", "volume"])
    # None where a tick has no real volume: a column of objects until made numeric
    volume = df["volume"].astype("float64").fillna(0.0) if "volume" in df else 0.0
    spread = df["ask"] - df["bid"]
    samples = pd.DataFrame(
        {
            "feed": df["feed"], "symbol": df["symbol"], "first": df["time_ms"],
            "last": df["time_ms"], "open": df["bid"], "high": df["bid"], "low": df["bid"],
            "close": df["bid"], "n": 1, "volume": volume, "spread": spread, "smax": spread,
        }
    )  # fmt: skip
    if bars:
        b = pd.DataFrame(bars)
        bar_samples = pd.DataFrame(
            {
                "feed": b["feed"], "symbol": b["symbol"], "first": b["open_time_ms"],
                "last": b["open_time_ms"] + b["tf"].map(TIMEFRAMES) - 1, "open": b["open"],
                "high": b["high"], "low": b["low"], "close": b["close"],
                "n": b["tick_volume"], "volume": b["real_volume"],
                "spread": b["spread"], "smax": b["spread"],
            }
        )  # fmt: skip
        parts = [bar_samples, samples] if len(samples) else [bar_samples]
        samples = pd.concat(parts, ignore_index=True)
    samples["arrival"] = range(len(samples))
    samples = samples.sort_values(["first", "arrival"], kind="stable")
    out: dict[tuple, dict[str, Any]] = {}
    for tf, length in TIMEFRAMES.items():
        samples["open_time_ms"] = (
            samples["first"] - day_start_ms
        ) // length * length + day_start_ms
        grouped = samples.groupby(["feed", "symbol", "open_time_ms"], sort=True).agg(
            open=("open", "first"),
            high=("high", "max"),
            low=("low", "min"),
            close=("close", "last"),
            tick_volume=("n", "sum"),
            real_volume=("volume", "sum"),
            spread_mean=("spread", "mean"),
            spread_max=("smax", "max"),
            first_tick_ms=("first", "min"),
            last_tick_ms=("last", "max"),
        )
        for (feed, symbol, open_ms), row in grouped.iterrows():
            out[feed, symbol, tf, int(open_ms)] = {
                "close_time_ms": int(open_ms) + length,
                "open": float(row["open"]),
                "high": float(row["high"]),
                "low": float(row["low"]),
                "close": float(row["close"]),
                "tick_volume": int(row["tick_volume"]),
                "real_volume": float(row["real_volume"]),
                "spread_mean": float(row["spread_mean"]),
                "spread_max": float(row["spread_max"]),
                "first_tick_ms": int(row["first_tick_ms"]),
                "last_tick_ms": int(row["last_tick_ms"]),
            }
    return out


EXACT = (
    "close_time_ms",
    "open",
    "high",
    "low",
    "close",
    "tick_volume",
    "spread_max",
    "first_tick_ms",
    "last_tick_ms",
)


def differences(
    got: dict[tuple, dict[str, Any]], want: dict[tuple, dict[str, Any]], limit: int = 10
) -> list[str]:
    """Human-readable differences; sums and means compared to 1e-9 relative."""
    diffs = []
    for key in sorted(set(got) | set(want)):
        if key not in got:
            diffs.append(f"missing {key}")
        elif key not in want:
            diffs.append(f"unexpected {key}: {got[key]}")
        else:
            g, w = got[key], want[key]
            for name in EXACT:
                if g[name] != w[name]:
                    diffs.append(f"{key} {name}: got {g[name]!r} want {w[name]!r}")
            for name in ("real_volume", "spread_mean"):
                if abs(g[name] - w[name]) > 1e-9 * max(1.0, abs(w[name])):
                    diffs.append(f"{key} {name}: got {g[name]!r} want {w[name]!r}")
        if len(diffs) >= limit:
            break
    return diffs
